"""A relay connection kept alive across drops, refusals and redirects: :class:`ReconnectingConnection`."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Collection, Mapping
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTCP,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from viewport.client.connection import CloseInfo, Frame, RelayConnection
from viewport.client.errors import ConnectionClosed, UpgradeRefused
from viewport.client.protocol import connect
from viewport.client.retry import (
    DEFAULT_FATAL_CLOSE_REASONS,
    DEFAULT_FATAL_STATUSES,
    Backoff,
    UniformSource,
    is_fatal_close,
    is_fatal_refusal,
)
from viewport.client.status import relay_redirect_url
from viewport.client.url import DEFAULT_SUBPROTOCOL, TokenVia, base_url_of, is_relay_base_url

ConnectFunction = Callable[..., Deferred[RelayConnection]]
"""Something called like :func:`~viewport.client.connect` (inject a fake one to test without sockets)."""

TokenFactory = Callable[[], str | Deferred[str]]
"""Returns the relay token for the next attempt, at once or as a Deferred (e.g. a platform call)."""

_NORMAL_CLOSE = 1000


class ReconnectingConnection:
    """One relay connection that is reopened whenever it fails or closes, until :meth:`stop`.

    The connection is made for ``role`` (``"workspace-daemon"``, ``"client"`` or ``"worker"``) with the same
    query and token placement as :func:`~viewport.client.connect`; ``token_factory`` is called before every
    attempt, so each one can carry a freshly issued token.

    Retries: after a failed attempt or a close, the next attempt waits ``uniform(0, min(max_delay,
    base_delay * 2**n))`` seconds (capped exponential backoff with full jitter); ``n`` starts again from 0
    once a connection stayed open for ``reset_after`` seconds. An upgrade refused with a status in
    ``fatal_statuses`` (401, 403) or a 4008 close whose reason is in ``fatal_close_reasons`` (claim
    mismatches, ``stale daemon generation``) is final: the reconnector stops and calls ``on_gave_up``.
    Everything else, ``daemon already connected`` and 429/503 included, is retried with backoff.

    Redirects: an in-band ``RELAY_REDIRECT`` naming another relay closes this connection and opens one to
    ``relayWsBaseUrl`` at once (at most ``max_redirects`` times in a row without a stable connection; after
    that the advisory redirect is ignored and the connection kept). 307/308 answers are followed by
    :func:`~viewport.client.connect` (ask for them with ``http_redirect=True``). The relay named by a
    redirect is used for later attempts too, until an attempt to it fails; then the configured ``url`` is
    tried again.

    Sending: ``send_*`` sends at once while connected; otherwise the message is queued (at most
    ``max_queued_messages`` messages and ``max_queued_bytes`` payload bytes, oldest dropped first and
    counted in :attr:`dropped`) and the queue is flushed, in order, right after the next connection opens.
    Delivery is at most once: a message sent just before a drop is lost.

    Events are plain attributes, settable at any time: ``on_connected(conn)``, ``on_disconnected(info)``,
    ``on_redirected(url)`` (the new relay's base URL), ``on_message(text)`` (every received message, the
    redirect included; :meth:`RelayConnection.next_message` is not used), ``on_attempt_failed(error)`` (a
    retryable failure before a connection opened) and ``on_gave_up(error)`` (an :class:`UpgradeRefused` or a
    :class:`ConnectionClosed`). An exception from a callback is logged and otherwise ignored.

    ``clock`` (default: ``reactor``) runs the backoff timers and ``random`` (anything with ``uniform``)
    draws the jitter; ``connect_function`` replaces :func:`~viewport.client.connect` in tests.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTCP,
        url: str,
        *,
        token_factory: TokenFactory,
        role: str,
        workspace_id: str,
        runtime_target_id: str | None = None,
        token_via: TokenVia = "header",
        subprotocol: str | None = DEFAULT_SUBPROTOCOL,
        extra_query: Mapping[str, str] | None = None,
        open_timeout: float = 8.0,
        max_message_bytes: int | None = None,
        tls_options: IOpenSSLClientConnectionCreator | None = None,
        http_redirect: bool = False,
        follow_redirects: bool = True,
        follow_in_band_redirects: bool = True,
        max_redirects: int = 3,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        reset_after: float = 10.0,
        close_timeout: float = 5.0,
        fatal_statuses: Collection[int] = DEFAULT_FATAL_STATUSES,
        fatal_close_reasons: Collection[str] = DEFAULT_FATAL_CLOSE_REASONS,
        max_queued_messages: int = 500,
        max_queued_bytes: int = 4 * 1024 * 1024,
        on_connected: Callable[[RelayConnection], object] | None = None,
        on_disconnected: Callable[[CloseInfo], object] | None = None,
        on_redirected: Callable[[str], object] | None = None,
        on_message: Callable[[str], object] | None = None,
        on_gave_up: Callable[[Exception], object] | None = None,
        on_attempt_failed: Callable[[BaseException], object] | None = None,
        clock: IReactorTime | None = None,
        random: UniformSource | None = None,
        connect_function: ConnectFunction = connect,
    ) -> None:
        if not is_relay_base_url(url):
            raise ValueError(f"url must be a ws:// or wss:// URL, not {url!r}")
        if max_redirects < 0 or reset_after < 0 or close_timeout <= 0:
            raise ValueError("max_redirects and reset_after must not be negative, close_timeout must be positive")
        if max_queued_messages < 0 or max_queued_bytes < 0:
            raise ValueError("queue limits must not be negative")
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else IReactorTime(reactor)
        self._home = url
        self._target = url
        self._token_factory = token_factory
        self._connect_function = connect_function
        self._connect_options: dict[str, Any] = {
            "role": role,
            "workspace_id": workspace_id,
            "runtime_target_id": runtime_target_id,
            "token_via": token_via,
            "subprotocol": subprotocol,
            "extra_query": extra_query,
            "open_timeout": open_timeout,
            "max_message_bytes": max_message_bytes,
            "tls_options": tls_options,
            "http_redirect": http_redirect,
            "follow_redirects": follow_redirects,
            "max_redirects": max_redirects,
        }
        self._follow_in_band = follow_in_band_redirects
        self._max_redirects = max_redirects
        self._backoff = Backoff(base_delay, max_delay, random)
        self._reset_after = reset_after
        self._close_timeout = close_timeout
        self._fatal_statuses = frozenset(fatal_statuses)
        self._fatal_close_reasons = frozenset(fatal_close_reasons)
        self._max_queued_messages = max_queued_messages
        self._max_queued_bytes = max_queued_bytes

        self.on_connected = on_connected
        """Called with the new :class:`RelayConnection` after each (re)connect, once the queue is flushed."""
        self.on_disconnected = on_disconnected
        """Called with the :class:`CloseInfo` whenever the current connection has closed."""
        self.on_redirected = on_redirected
        """Called with the base URL of the relay a redirect (in-band or HTTP) sends this connection to."""
        self.on_message = on_message
        """Called with the text of every message received on any connection."""
        self.on_gave_up = on_gave_up
        """Called with the error when a non-retryable outcome stopped the reconnector."""
        self.on_attempt_failed = on_attempt_failed
        """Called with the error of a failed attempt (token, TCP or upgrade) once its retry is scheduled."""

        self.current: RelayConnection | None = None
        """The open (or closing) connection, or None between connections."""
        self.dropped = 0
        """How many outbound messages the bounded queue dropped (oldest first) while disconnected."""
        self.connections = 0
        """How many connections were opened since construction."""
        self.fatal_error: Exception | None = None
        """The non-retryable error that stopped the reconnector, or None."""

        self._running = False
        self._connecting: Deferred[RelayConnection] | None = None
        self._delayed: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None
        self._opened_at = 0.0
        self._redirect_pending: str | None = None
        self._redirect_streak = 0
        self._queue: deque[tuple[str | bytes, int]] = deque()
        self._queued_bytes = 0
        self._stop_waiters: list[Deferred[None]] = []

    # -- state -----------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a connection is OPEN right now (messages sent now go out at once)."""
        return self.current is not None and self.current.is_open

    @property
    def running(self) -> bool:
        """Whether the reconnector was started and has neither been stopped nor given up."""
        return self._running

    @property
    def attempts(self) -> int:
        """Consecutive retries since the last stable connection (the exponent of the next backoff)."""
        return self._backoff.attempts

    @property
    def url(self) -> str:
        """The base URL the current or next attempt goes to (the configured one, or a redirect's)."""
        return self._target

    @property
    def queued(self) -> int:
        """How many outbound messages wait for the next connection."""
        return len(self._queue)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Make the first attempt now; raise RuntimeError if running or still stopping."""
        if self._running or not self._idle():
            raise RuntimeError("the reconnecting connection is already running or still stopping")
        self._running = True
        self.fatal_error = None
        self._backoff.reset()
        self._redirect_streak = 0
        self._attempt()

    def stop(self) -> Deferred[None]:
        """Stop reconnecting: cancel a pending retry or attempt, close the connection with 1000.

        The result fires once no socket or timer of this reconnector is left (a connection that does not
        finish its closing handshake within ``close_timeout`` seconds is aborted). Queued messages stay queued
        for a later :meth:`start`.
        """
        self._running = False
        self._redirect_pending = None
        if self._delayed is not None:
            if self._delayed.active():
                self._delayed.cancel()
            self._delayed = None
        if self._idle():
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._stop_waiters.append(d)
        if self._connecting is not None:
            self._connecting.cancel()
        if self.current is not None:
            self._shut(self.current, "")
        return d

    # -- sending ---------------------------------------------------------------------------------

    def send_text(self, text: str) -> bool:
        """Send a text message now (True) or queue it for the next connection (False)."""
        return self._send(text, len(text.encode("utf-8")))

    def send_json(self, obj: dict[str, Any]) -> bool:
        """Send ``obj`` as compact JSON text now (True) or queue it (False)."""
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return self._send(text, len(text.encode("utf-8")))

    def send_binary(self, data: bytes) -> bool:
        """Send a binary message now (True) or queue it (False)."""
        return self._send(bytes(data), len(data))

    def _send(self, item: str | bytes, size: int) -> bool:
        """Send on the open connection unless older messages still wait; else queue."""
        conn = self.current
        if conn is not None and not self._queue and self._send_on(conn, item):
            return True
        self._enqueue(item, size)
        return False

    @staticmethod
    def _send_on(conn: RelayConnection, item: str | bytes) -> bool:
        """Send one queued item on ``conn`` (False if it is no longer OPEN)."""
        return conn.send_binary(item) if isinstance(item, bytes) else conn.send_text(item)

    def _enqueue(self, item: str | bytes, size: int) -> None:
        """Queue a message, dropping the oldest ones beyond the limits (a message too big alone is dropped)."""
        if size > self._max_queued_bytes or self._max_queued_messages == 0:
            self.dropped += 1
            return
        self._queue.append((item, size))
        self._queued_bytes += size
        while len(self._queue) > self._max_queued_messages or self._queued_bytes > self._max_queued_bytes:
            _, old_size = self._queue.popleft()
            self._queued_bytes -= old_size
            self.dropped += 1

    def _flush(self, conn: RelayConnection) -> None:
        """Send the queued messages in order while ``conn`` stays OPEN."""
        while self._queue:
            item, size = self._queue[0]
            if not self._send_on(conn, item):
                return
            self._queue.popleft()
            self._queued_bytes -= size

    # -- attempts --------------------------------------------------------------------------------

    def _attempt(self) -> None:
        """Get a token and open a connection to the current target."""
        self._delayed = None
        target = self._target
        d: Deferred[RelayConnection] = maybeDeferred(self._token_factory).addCallback(self._open, target)
        self._connecting = d
        d.addCallbacks(self._opened, self._attempt_failed, callbackArgs=(target,), errbackArgs=(target,))
        d.addErrback(self._bug)

    def _open(self, token: object, target: str) -> Deferred[RelayConnection]:
        """Connect with the token the factory produced."""
        if not isinstance(token, str) or not token:
            raise ValueError("token_factory produced no token")
        return self._connect_function(self._reactor, target, token=token, **self._connect_options)

    def _opened(self, conn: RelayConnection, target: str) -> None:
        """A connection is OPEN: adopt a followed HTTP redirect, flush the queue, start delivering."""
        self._connecting = None
        self.current = conn
        self.connections += 1
        self._opened_at = self._clock.seconds()
        conn.closed.addCallback(self._closed, conn).addErrback(self._bug)
        if self.current is not conn:
            return
        if not self._running:
            self._shut(conn, "")
            return
        self._log.info("relay connection open to {url}", relay_event="relay_connection_open", url=base_url_of(conn.url))
        if conn.redirected_from:
            landed = base_url_of(conn.url)
            if landed != base_url_of(target):
                self._target = landed
                self._notify(self.on_redirected, landed)
        self._flush(conn)
        self._notify(self.on_connected, conn)
        if self.current is conn:
            conn.set_message_handler(self._received)

    def _attempt_failed(self, failure: Failure, target: str) -> None:
        """An attempt failed before a connection opened: give up, or retry after a backoff."""
        self._connecting = None
        if not self._running:
            self._check_stopped()
            return
        error = failure.value
        if isinstance(error, Exception) and is_fatal_refusal(error, self._fatal_statuses):
            self._give_up(error)
            return
        status = error.status if isinstance(error, UpgradeRefused) else None
        self._log.info(
            "relay connection to {url} failed ({error}, status {status})", relay_event="relay_connection_failed",
            url=base_url_of(target),
            error=type(error).__name__,
            status=status,
        )
        if self._target != self._home:
            self._target = self._home
        self._retry_later()
        self._notify(self.on_attempt_failed, error)

    def _closed(self, info: CloseInfo, conn: RelayConnection) -> None:
        """The connection closed: follow a pending redirect at once, give up, or retry after a backoff."""
        if self.current is conn:
            self.current = None
        self._cancel_abort()
        stable = self._clock.seconds() - self._opened_at >= self._reset_after
        self._log.info(
            "relay connection to {url} closed: code {code} reason {reason}", relay_event="relay_connection_closed",
            url=base_url_of(conn.url),
            code=info.code,
            reason=info.reason,
        )
        self._notify(self.on_disconnected, info)
        if not self._running:
            self._check_stopped()
            return
        redirect, self._redirect_pending = self._redirect_pending, None
        if redirect is not None:
            self._target = redirect
            self._delayed = self._clock.callLater(0, self._attempt)
            return
        if is_fatal_close(info, self._fatal_close_reasons):
            self._give_up(ConnectionClosed(info))
            return
        if stable:
            self._backoff.reset()
            self._redirect_streak = 0
        self._retry_later()

    def _retry_later(self) -> None:
        """Schedule the next attempt after the next backoff delay."""
        delay = self._backoff.next_delay()
        self._log.debug("next relay connection attempt in {delay:.3f} s", relay_event="relay_connection_retry_scheduled", delay=delay)
        self._delayed = self._clock.callLater(delay, self._attempt)

    def _give_up(self, error: Exception) -> None:
        """Stop for good after a non-retryable outcome."""
        self._running = False
        self.fatal_error = error
        self._log.warn("relay connection gave up: {error}", relay_event="relay_connection_gave_up", error=type(error).__name__)
        self._notify(self.on_gave_up, error)
        self._check_stopped()

    # -- receiving and redirects -----------------------------------------------------------------

    def _received(self, frame: Frame) -> None:
        """Deliver a message, then act on an in-band redirect."""
        text = frame.text
        self._notify(self.on_message, text)
        if self._follow_in_band:
            url = relay_redirect_url(text)
            if url is not None:
                self._redirect(url)

    def _redirect(self, url: str) -> None:
        """Close the current connection and reconnect to ``url`` as soon as it has closed."""
        conn = self.current
        if conn is None or not self._running or self._redirect_pending is not None:
            return
        if not is_relay_base_url(url):
            self._log.warn("ignoring a relay redirect to a URL that is not ws/wss", relay_event="relay_redirect_ignored")
            return
        if base_url_of(url) == base_url_of(self._target):
            return
        if self._clock.seconds() - self._opened_at >= self._reset_after:
            self._redirect_streak = 0
        if self._redirect_streak >= self._max_redirects:
            self._log.warn("ignoring a relay redirect to {url}: too many redirects in a row", relay_event="relay_redirect_ignored", url=url)
            return
        self._redirect_streak += 1
        self._redirect_pending = url
        self._log.info("relay redirects to {url}", relay_event="relay_redirect_followed", url=url)
        self._notify(self.on_redirected, url)
        self._shut(conn, "relay redirect")

    # -- helpers ---------------------------------------------------------------------------------

    def _shut(self, conn: RelayConnection, reason: str) -> None:
        """Close ``conn`` with 1000, aborting it if the closing handshake takes too long."""
        conn.close(_NORMAL_CLOSE, reason)
        if self._abort_call is None and conn.close_info is None:
            self._abort_call = self._clock.callLater(self._close_timeout, self._abort, conn)

    def _abort(self, conn: RelayConnection) -> None:
        """The closing handshake timed out: drop the socket."""
        self._abort_call = None
        conn.abort()

    def _cancel_abort(self) -> None:
        """Cancel the close timeout."""
        if self._abort_call is not None:
            if self._abort_call.active():
                self._abort_call.cancel()
            self._abort_call = None

    def _idle(self) -> bool:
        """Whether no connection, attempt or timer is left."""
        return self.current is None and self._connecting is None and self._delayed is None

    def _check_stopped(self) -> None:
        """Fire the :meth:`stop` results once everything is gone."""
        if self._running or not self._idle():
            return
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)

    def _notify(self, callback: Callable[..., object] | None, *args: object) -> None:
        """Call an event callback; its exceptions are logged, never allowed to break reconnecting."""
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            self._log.failure("relay connection event callback failed", relay_event="relay_connection_callback_error")

    def _bug(self, failure: Failure) -> None:
        """Log an unexpected error in the reconnector's own callbacks."""
        self._log.failure("relay reconnector failed", failure, relay_event="relay_reconnector_error")
