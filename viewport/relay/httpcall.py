"""One bounded outbound HTTP call: a deadline on the injected clock and a streamed response size cap."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union, cast

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from viewport.failures import describe_failure

_log = Logger()

HeaderMap = Mapping[Union[str, bytes], Union[str, bytes]]


@dataclass(frozen=True)
class HttpAnswer:
    """A complete response: status, headers as (lower-cased name, value) pairs, body bytes."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class HttpCallFailed(Exception):
    """The call produced no usable answer; ``kind`` is ``timeout``, ``too_large`` or ``network``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class ResponseTooLarge(Exception):
    """A response body went over its byte cap."""


class CappedBody(Protocol):
    """Collects a response body, stopping the connection as soon as it exceeds ``max_bytes``."""

    def __init__(self, max_bytes: int, declared_length: Optional[int]) -> None:
        self.done: Deferred[bytes] = Deferred()
        self._max_bytes = max_bytes
        self._declared_length = declared_length
        self._chunks: list[bytes] = []
        self._size = 0
        self._finished = False

    def connectionMade(self) -> None:
        """Refuse a body that announces its excessive length up front."""
        if self._declared_length is not None and self._declared_length > self._max_bytes:
            self.stop(ResponseTooLarge())

    def dataReceived(self, data: bytes) -> None:
        """Count and keep a chunk; chunks buffered before a stop are dropped."""
        if self._finished:
            return
        self._size += len(data)
        if self._size > self._max_bytes:
            self.stop(ResponseTooLarge())
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The body ended: complete, or cut short by the server or the network."""
        if self._finished:
            return
        self._finished = True
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)

    def stop(self, error: Exception) -> None:
        """Give up on the body: drop what arrived, close the connection, fail ``done``."""
        if self._finished:
            return
        self._finished = True
        self._chunks = []
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()
        self.done.errback(error)


class BoundedCall:
    """
    One request with a deadline and a response cap; ``result`` fires with an ``HttpAnswer`` or
    fails with ``HttpCallFailed`` (never anything else, unless the caller cancels it).
    """

    def __init__(self, http: HTTPClient, clock: IReactorTime, timeout_ms: int, max_response_bytes: int) -> None:
        self._http = http
        self._clock = clock
        self._timeout_ms = timeout_ms
        self._max_response_bytes = max_response_bytes
        self._request: Optional[Deferred[Any]] = None
        self._body: Optional[CappedBody] = None
        self._timer: Optional[IDelayedCall] = None
        self._settled = False
        self.result: Deferred[HttpAnswer] = Deferred(self._cancelled)

    def start(self, method: str, url: str, data: Optional[bytes], headers: HeaderMap) -> "Deferred[HttpAnswer]":
        """Arm the deadline and send; even a synchronous failure becomes the result."""
        self._timer = self._clock.callLater(self._timeout_ms / 1000.0, self._timed_out)
        try:
            request: Deferred[Any] = self._http.request(
                method, url, data=data, headers=dict(headers), unbuffered=True, allow_redirects=False
            )
        except Exception:
            self._bug(Failure())
            return self.result
        self._request = request
        request.addCallbacks(self._got_response, self._request_failed)
        request.addErrback(self._bug)
        return self.result

    def _settle(self, outcome: Union[HttpAnswer, HttpCallFailed]) -> None:
        if self._settled:
            return
        self._settled = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if isinstance(outcome, HttpAnswer):
            self.result.callback(outcome)
        else:
            self.result.errback(Failure(outcome))

    def _abandon(self) -> None:
        request, self._request = self._request, None
        if request is not None and not request.called:
            request.cancel()
        if self._body is not None:
            self._body.stop(CancelledError())

    def _timed_out(self) -> None:
        self._settle(HttpCallFailed("timeout", f"request timed out after {self._timeout_ms}ms"))
        self._abandon()

    def _cancelled(self, result: "Deferred[HttpAnswer]") -> None:
        self._settled = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._abandon()

    def _request_failed(self, failure: Failure) -> None:
        self._settle(HttpCallFailed("network", f"request failed: {describe_failure(failure)}"))

    def _got_response(self, response: IResponse) -> None:
        if self._settled:
            discard = CappedBody(0, None)
            discard.done.addErrback(lambda _: None)
            response.deliverBody(discard)
            discard.stop(CancelledError())
            return
        declared = None if response.length is UNKNOWN_LENGTH else int(response.length)
        body = CappedBody(self._max_response_bytes, declared)
        self._body = body
        status = response.code
        headers = tuple(
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, values in response.headers.getAllRawHeaders()
            for value in values
        )
        body.done.addCallbacks(
            lambda data: self._settle(HttpAnswer(status, headers, data)),
            self._body_failed,
        )
        body.done.addErrback(self._bug)
        response.deliverBody(body)

    def _body_failed(self, failure: Failure) -> None:
        if failure.check(ResponseTooLarge):
            self._settle(HttpCallFailed("too_large", "response too large"))
        elif not failure.check(CancelledError):
            self._settle(HttpCallFailed("network", f"response failed: {describe_failure(failure)}"))

    def _bug(self, failure: Failure) -> None:
        _log.failure("bounded HTTP call failed unexpectedly", failure, relay_event="http_call_error")
        self._settle(HttpCallFailed("network", "internal error"))
        self._abandon()


def bounded_request(
    http: HTTPClient,
    clock: IReactorTime,
    method: str,
    url: str,
    *,
    data: Optional[bytes],
    headers: HeaderMap,
    timeout_ms: int,
    max_response_bytes: int,
) -> "Deferred[HttpAnswer]":
    """Send one request; fires with the whole answer or fails with ``HttpCallFailed``."""
    return BoundedCall(http, clock, timeout_ms, max_response_bytes).start(method, url, data, headers)
