"""The calls of the server backplane: JSON POSTs to the platform's internal relay API, and how their answers read."""

from __future__ import annotations

import json
from typing import Any, Optional

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from viewport.failures import describe_failure
from viewport.relay.httpcall import HttpAnswer, HttpCallFailed, bounded_request
from viewport.strict_json import reject_constant

__all__ = ["BusCalls", "describe", "ok_document"]



class BusCalls:
    """POSTs of JSON bodies to one platform origin, with the internal key, a deadline and a response cap."""

    def __init__(
        self,
        *,
        origin: str,
        internal_key: Optional[str],
        http_client: HTTPClient,
        clock: IReactorTime,
        timeout_ms: int,
        max_response_bytes: int,
    ) -> None:
        """``origin`` is ``scheme://host[:port]``; without a key (allowed outside prod) calls carry none."""
        self._origin = origin
        self._headers: dict[str | bytes, str | bytes] = {"content-type": "application/json"}
        if internal_key:
            self._headers["x-relay-internal-key"] = internal_key
        self._http = http_client
        self._clock = clock
        self._timeout_ms = timeout_ms
        self._max_response_bytes = max_response_bytes

    def post(
        self,
        path: str,
        body: dict[str, Any],
        timeout_ms: Optional[int] = None,
        max_response_bytes: Optional[int] = None,
    ) -> "Deferred[HttpAnswer]":
        """Send ``body`` to ``path``; fires with the whole answer or fails with ``HttpCallFailed``."""
        # ASCII output (non-ASCII escaped) is what the C encoder writes fastest.
        data = _Body(json.dumps(body, separators=(",", ":")).encode("ascii"))
        return bounded_request(
            self._http,
            self._clock,
            "POST",
            self._origin + path,
            data=data,
            headers=self._headers,
            timeout_ms=timeout_ms if timeout_ms is not None else self._timeout_ms,
            max_response_bytes=max_response_bytes if max_response_bytes is not None else self._max_response_bytes,
        )


@implementer(IBodyProducer)
class _Body(bytes):
    """
    A request body that is its own producer and writes itself at once, right behind the headers.
    (treq's producer for bytes writes them from a Cooperator on a later reactor turn: one more turn
    of latency per bus call, and headers and body in separate segments.)
    """

    @property
    def length(self) -> int:
        """The body's size."""
        return len(self)

    def startProducing(self, consumer: IConsumer) -> "Deferred[None]":
        """Write the whole body now."""
        consumer.write(self)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: everything was written."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""


def ok_document(answer: HttpAnswer) -> Optional[dict[str, Any]]:
    """The decoded body when the call succeeded (2xx and ``ok`` exactly true), else None."""
    if not 200 <= answer.status < 300:
        return None
    try:
        document = json.loads(answer.body.decode("utf-8", "replace"), parse_constant=reject_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or document.get("ok") is not True:
        return None
    return document


def describe(failure: Failure) -> str:
    """A short description of a failed call (no secrets: an HTTP failure's own detail)."""
    error = failure.value
    if isinstance(error, HttpCallFailed):
        return error.detail
    return describe_failure(failure)
