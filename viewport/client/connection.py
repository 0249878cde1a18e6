"""An open relay connection: send frames, await received ones in order, observe the close."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autobahn.twisted.websocket import WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITransport

from viewport import strict_json
from viewport.client.errors import ConnectionClosed, MessageTimeout


@dataclass(frozen=True, slots=True)
class CloseInfo:
    """How a connection ended: the peer's close code and reason (1006 for an abrupt drop)."""

    code: int | None
    reason: str | None
    was_clean: bool


@dataclass(frozen=True, slots=True)
class Frame:
    """One received WebSocket message, as its payload bytes and its frame type."""

    payload: bytes
    is_binary: bool

    @property
    def text(self) -> str:
        """The payload as text (binary payloads are decoded leniently, as the relay does)."""
        if self.is_binary:
            return self.payload.decode("utf-8", errors="replace")
        return self.payload.decode("utf-8")




def parse_json_object(text: str) -> dict[str, Any]:
    """Parse ``text`` as a JSON object (strictly: no NaN/Infinity, top level must be an object)."""
    value = strict_json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


class _Waiter:
    """A pending ``next_frame`` call and its timeout timer."""

    __slots__ = ("deferred", "timer")

    def __init__(self) -> None:
        self.deferred: Deferred[Frame] = Deferred(self._cancelled)
        self.timer: IDelayedCall | None = None

    def _cancelled(self, _d: Deferred[Frame]) -> None:
        """Stop the timer; the owning connection drops the waiter when it next looks at it."""
        self.stop_timer()

    def stop_timer(self) -> None:
        """Cancel the timeout timer if it is still pending."""
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None


class RelayConnection:
    """A WebSocket connection to the relay once it is OPEN (made by :func:`~viewport.client.connect`).

    Received messages are queued in arrival order until a ``next_*`` call consumes them; messages that
    arrived before the close stay readable after it. Alternatively :meth:`set_message_handler` hands every
    message to a callable as it arrives.
    """

    def __init__(self, protocol: WebSocketClientProtocol, clock: IReactorTime, url: str) -> None:
        self._protocol = protocol
        self._clock = clock
        self.url = url
        """The full URL, query included, that this connection was opened with."""
        self.redirected_from: list[str] = []
        """The URLs that answered the upgrade with a followed redirect, in order (empty if none did)."""
        self._handler: Callable[[Frame], None] | None = None
        self._frames: deque[Frame] = deque()
        self._waiters: deque[_Waiter] = deque()
        self._close_info: CloseInfo | None = None
        self._close_observers: list[Deferred[CloseInfo]] = []

    # -- properties ------------------------------------------------------------------------------

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol the server selected, or ``None``."""
        selected = self._protocol.websocket_protocol_in_use
        return None if selected is None else str(selected)

    @property
    def transport(self) -> ITransport:
        """The underlying TCP (or TLS) transport."""
        transport = self._protocol.transport
        assert transport is not None
        return transport

    @property
    def is_open(self) -> bool:
        """Whether the WebSocket is still OPEN (sends are possible)."""
        return bool(self._protocol.state == WebSocketProtocol.STATE_OPEN)

    @property
    def close_info(self) -> CloseInfo | None:
        """How the connection ended, or ``None`` while it has not closed."""
        return self._close_info

    @property
    def closed(self) -> Deferred[CloseInfo]:
        """A new Deferred that fires with a :class:`CloseInfo` once the socket has closed.

        Each access returns its own Deferred, so several observers never disturb each other's results.
        """
        if self._close_info is not None:
            return succeed(self._close_info)
        d: Deferred[CloseInfo] = Deferred(self._close_observers.remove)
        self._close_observers.append(d)
        return d

    # -- sending ---------------------------------------------------------------------------------

    def send_text(self, text: str) -> bool:
        """Send a text message; return False (sending nothing) if the socket is no longer OPEN."""
        return self._send(text.encode("utf-8"), False)

    def send_json(self, obj: dict[str, Any]) -> bool:
        """Send ``obj`` as compact JSON text; return False if the socket is no longer OPEN."""
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return self._send(text.encode("utf-8"), False)

    def send_binary(self, data: bytes) -> bool:
        """Send a binary message; return False if the socket is no longer OPEN."""
        return self._send(data, True)

    def _send(self, payload: bytes, is_binary: bool) -> bool:
        """Send one message if OPEN (like a browser, sends on a closing socket are skipped)."""
        if self._protocol.state != WebSocketProtocol.STATE_OPEN:
            return False
        self._protocol.sendMessage(payload, isBinary=is_binary)
        return True

    # -- receiving -------------------------------------------------------------------------------

    def next_frame(self, timeout: float | None = 10.0) -> Deferred[Frame]:
        """The next unconsumed message as a :class:`Frame`.

        Fails with :class:`MessageTimeout` after ``timeout`` seconds (``None`` waits forever), or with
        :class:`ConnectionClosed` if the socket closes with nothing left in the queue.
        """
        if self._frames:
            return succeed(self._frames.popleft())
        if self._close_info is not None:
            return fail(ConnectionClosed(self._close_info))
        waiter = _Waiter()
        if timeout is not None:
            waiter.timer = self._clock.callLater(timeout, self._expire, waiter, timeout)
        self._waiters.append(waiter)
        return waiter.deferred

    def next_message(self, timeout: float | None = 10.0) -> Deferred[str]:
        """The next unconsumed message as text (see :meth:`next_frame` for the failures)."""
        return self.next_frame(timeout).addCallback(lambda frame: frame.text)

    def next_json(self, timeout: float | None = 10.0) -> Deferred[dict[str, Any]]:
        """The next unconsumed message parsed as a JSON object (fails with ValueError otherwise)."""
        return self.next_message(timeout).addCallback(parse_json_object)

    def set_message_handler(self, handler: Callable[[Frame], None] | None) -> None:
        """Deliver every message to ``handler`` as it arrives instead of queueing it (``None`` queues again).

        Messages already queued are handed over first, in order. While a handler is set, ``next_*`` calls
        receive nothing (they fail with :class:`ConnectionClosed` at the close, or time out). An exception
        from the handler closes the connection with 1011, as any bug in a receive path does.
        """
        self._handler = handler
        while handler is not None and self._frames and self._handler is handler:
            handler(self._frames.popleft())

    def pending_messages(self) -> list[str]:
        """The messages that arrived and were not consumed yet, oldest first (they stay queued)."""
        return [frame.text for frame in self._frames]

    def _expire(self, waiter: _Waiter, timeout: float) -> None:
        """A waiter's timeout ran out: fail it."""
        waiter.timer = None
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        waiter.deferred.errback(MessageTimeout(timeout))

    def _next_waiter(self) -> _Waiter | None:
        """Pop the oldest waiter still waiting (cancelled ones are dropped)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.deferred.called:
                waiter.stop_timer()
                return waiter
        return None

    # -- closing ---------------------------------------------------------------------------------

    def close(self, code: int = 1000, reason: str = "") -> Deferred[CloseInfo]:
        """Start the closing handshake; the result fires like :attr:`closed`."""
        if self._protocol.state == WebSocketProtocol.STATE_OPEN:
            self._protocol.sendClose(code=code, reason=reason or None)
        return self.closed

    def abort(self) -> Deferred[CloseInfo]:
        """Drop the TCP connection without a closing handshake; the result fires like :attr:`closed`."""
        if self._close_info is None:
            transport = self._protocol.transport
            if transport is not None:
                transport.abortConnection()  # type: ignore[attr-defined]
        return self.closed

    def pause_reading(self) -> None:
        """Stop reading from the socket (simulates a client that no longer drains its receive buffer)."""
        IPushProducer(self.transport).pauseProducing()

    def resume_reading(self) -> None:
        """Resume reading after :meth:`pause_reading`."""
        IPushProducer(self.transport).resumeProducing()

    # -- events from the protocol ----------------------------------------------------------------

    def _message_received(self, payload: bytes, is_binary: bool) -> None:
        """Hand a received message to the oldest waiter, or queue it."""
        frame = Frame(payload, is_binary)
        if self._handler is not None:
            self._handler(frame)
            return
        waiter = self._next_waiter()
        if waiter is None:
            self._frames.append(frame)
        else:
            waiter.deferred.callback(frame)

    def _connection_closed(self, info: CloseInfo) -> None:
        """Record the close, fail waiters (the queue is empty if any wait) and notify observers."""
        if self._close_info is not None:
            return
        self._close_info = info
        while (waiter := self._next_waiter()) is not None:
            waiter.deferred.errback(ConnectionClosed(info))
        observers, self._close_observers = self._close_observers, []
        for d in observers:
            d.callback(info)
