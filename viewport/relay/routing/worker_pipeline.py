"""Worker transport requests: a managed executor's HTTP calls tunnelled to the platform (docs/protocol.md §4.8)."""

from __future__ import annotations

from typing import Callable, Optional

from viewport.relay import frames
from viewport.relay.config import RelayConfig
from viewport.relay.limits import Limiters
from viewport.relay.metrics import RelayMetrics
from viewport.relay.registry import Connection
from viewport.relay.routing.events import Refusals

WorkerForward = Callable[[Connection, dict, str], None]


class WorkerPipeline:
    """Checks a worker's request (rate, shape, path under its executor) and hands it to the forwarder."""

    def __init__(
        self,
        *,
        config: RelayConfig,
        metrics: RelayMetrics,
        limiters: Limiters,
        refusals: Refusals,
        forward: Optional[WorkerForward],
    ) -> None:
        self._config = config
        self._m = metrics
        self._limiters = limiters
        self._refusals = refusals
        self._forward = forward

    def frame(self, conn: Connection, payload: bytes, now_ms: float) -> None:
        """Handle one worker transport request."""
        conn.last_activity_ms = now_ms
        m = self._m
        if not self._limiters.daemon.allow(conn.workspace_id, now_ms):
            self._refusals.refuse(conn, m.relay_frames_daemon_rate_limited, event="worker_frame_rate_limited",
                                  close="worker rate limit exceeded", workspaceId=conn.workspace_id)
            return
        if self._refusals.too_large(conn, payload, self._config.limits.max_frame_bytes, m.relay_ws_frame_too_large):
            return
        frame = frames.parse_frame(payload)
        if frame is None or not frames.is_worker_request(frame):
            self._refusals.refuse(conn, m.relay_frames_daemon_rejected, event="worker_frame_rejected",
                                  workspaceId=conn.workspace_id, reason="invalid_worker_transport_frame")
            return
        request_id = str(frame["requestId"])
        path = frames.worker_path_allowed(str(frame["path"]), conn.workspace_id, conn.claims.managed_executor_id)
        if path is None or self._forward is None:
            denied = frames.worker_response(
                request_id, 403, {"content-type": "application/json"}, '{"ok":false,"reason":"WORKER_TRANSPORT_PATH_DENIED"}'
            )
            self._refusals.refuse(conn, m.relay_worker_transport_rejected, reply=denied)
            return
        self._forward(conn, frame, path)
