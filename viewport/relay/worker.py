"""Worker transport: a managed executor's HTTP request, forwarded to the platform with a deadline."""

from __future__ import annotations

from typing import Any, Mapping

from treq.client import HTTPClient
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from viewport.relay import frames
from viewport.relay.httpcall import HttpAnswer, bounded_request
from viewport.relay.registry import Connection

WORKER_FORWARD_TIMEOUT_MS = 30_000


class WorkerForwarder:
    """
    Sends an already path-checked worker request to the platform and answers the worker.

    The reference relay had no deadline here; ours gives up after ``timeout_ms`` with the same
    502 ``WORKER_TRANSPORT_FORWARD_FAILED`` answer as a network error, and caps the response at
    what fits in one frame.
    """

    _log = Logger()

    def __init__(
        self,
        *,
        http_client: HTTPClient,
        clock: IReactorTime,
        server_url: str,
        metrics: Any,
        max_response_bytes: int,
        timeout_ms: int = WORKER_FORWARD_TIMEOUT_MS,
    ) -> None:
        self._http = http_client
        self._clock = clock
        self._origin = server_url.rstrip("/")
        self._metrics = metrics
        self._max_response_bytes = max_response_bytes
        self._timeout_ms = timeout_ms

    def __call__(self, conn: Connection, frame: Mapping[str, Any], path: str) -> None:
        """Forward one request; the answer frame is sent when the platform replies or fails."""
        request_id = str(frame["requestId"])
        method = str(frame["method"])
        raw_headers = frame.get("headers")
        allowed = frames.filter_worker_request_headers(raw_headers if isinstance(raw_headers, dict) else {})
        headers: dict[str | bytes, str | bytes] = {name: value for name, value in allowed.items()}
        body = None if method == "GET" else str(frame.get("body") or "").encode("utf-8")
        d = bounded_request(
            self._http,
            self._clock,
            method,
            self._origin + path,
            data=body,
            headers=headers,
            timeout_ms=self._timeout_ms,
            max_response_bytes=self._max_response_bytes,
        )
        d.addCallbacks(self._answered, self._failed, callbackArgs=(conn, request_id), errbackArgs=(conn, request_id))

    def _answered(self, answer: HttpAnswer, conn: Connection, request_id: str) -> None:
        self._metrics.relay_worker_transport_forwarded.inc()
        text = answer.body.decode("utf-8", "replace")
        conn.peer.send_text(
            frames.worker_response(
                request_id, answer.status, frames.filter_worker_response_headers(answer.headers), text
            )
        )

    def _failed(self, failure: Failure, conn: Connection, request_id: str) -> None:
        self._metrics.relay_worker_transport_forward_failed.inc()
        self._log.warn(
            "worker transport forward failed",
            relay_event="worker_transport_forward_failed",
            workspaceId=conn.workspace_id,
            requestId=request_id,
            error=str(failure.value),
        )
        conn.peer.send_text(frames.worker_forward_failed(request_id))
