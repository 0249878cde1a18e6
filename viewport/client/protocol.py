"""Opening a relay connection with Autobahn: the client protocol, its factory and :func:`connect`."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import NotConnectingError
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorSSL,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

from viewport.client.connection import CloseInfo, RelayConnection
from viewport.client.errors import HandshakeFailed, OpenTimeout, TooManyRedirects, UpgradeRefused
from viewport.client.url import DEFAULT_SUBPROTOCOL, TokenVia, handshake_for, redirect_url
from viewport.sockets import set_no_delay

_STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)?[ \t]+(\d{3})(?:[ \t]|$)")
_INTERNAL_ERROR = 1011

FOLLOWED_REDIRECT_STATUSES = frozenset({307, 308})
"""The upgrade answers :func:`connect` follows: the redirects that keep the method (a GET upgrade)."""


def parse_status_line(data: bytes) -> int | None:
    """The status code of a complete HTTP status line at the start of ``data``, or None."""
    end = data.find(b"\n")
    if end < 0:
        return None
    match = _STATUS_LINE.match(data[:end].rstrip(b"\r"))
    return int(match.group(1)) if match else None


def parse_location(data: bytes) -> str | None:
    """The ``Location`` header of the HTTP response head at the start of ``data``, or None.

    Only complete header lines count: a head cut off by a closed socket never yields half a URL.
    """
    end = data.find(b"\r\n\r\n")
    head = data[:end] if end >= 0 else data[: data.rfind(b"\n") + 1]
    for line in head.split(b"\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"location":
            return value.strip().decode("utf-8", errors="replace") or None
    return None


class _Attempt:
    """One connection attempt: owns the result Deferred and the open timeout until the socket is OPEN."""

    def __init__(self, clock: IReactorTime, url: str, open_timeout: float) -> None:
        self.clock = clock
        self.url = url
        self.open_timeout = open_timeout
        self.result: Deferred[RelayConnection] = Deferred(self._cancelled)
        self.connector: IConnector | None = None
        self.protocol: _RelayClientProtocol | None = None
        self._abandoned: Exception | None = None
        self._timer: IDelayedCall | None = clock.callLater(open_timeout, self._timed_out)

    def opened(self, protocol: _RelayClientProtocol) -> None:
        """The handshake completed: fire the result with a :class:`RelayConnection`."""
        self._stop_timer()
        if self.result.called or self._abandoned is not None:
            protocol.dropConnection(abort=True)
            return
        connection = RelayConnection(protocol, self.clock, self.url)
        protocol.connection = connection
        self.result.callback(connection)

    def closed_before_open(self, protocol: _RelayClientProtocol, info: CloseInfo) -> None:
        """The socket closed during the handshake: report why, now that the socket is gone."""
        if self._abandoned is not None:
            self._fail(self._abandoned)
            return
        status = protocol.http_status
        data = getattr(protocol, "data", b"") or b""
        if status is None:
            status = parse_status_line(data)
        if status is None:
            self._fail(UpgradeRefused(None))
        elif status != 101:
            self._fail(UpgradeRefused(status, location=parse_location(data)))
        else:
            self._fail(HandshakeFailed(str(protocol.wasNotCleanReason or info.reason)))

    def tcp_failed(self, reason: Failure) -> None:
        """The TCP connection could not be made."""
        self._fail(self._abandoned if self._abandoned is not None else reason)

    def _timed_out(self) -> None:
        """The open timeout ran out before the connection was OPEN."""
        self._timer = None
        self._abandon(OpenTimeout(self.open_timeout))

    def _cancelled(self, _d: Deferred[RelayConnection]) -> None:
        """The caller cancelled the result: tear the attempt down (the result fails with CancelledError)."""
        self._stop_timer()
        self._abandon(CancelledError())

    def _abandon(self, exc: Exception) -> None:
        """Give up: drop the socket; the result fails with ``exc`` once the socket is gone."""
        if self._abandoned is not None:
            return
        self._abandoned = exc
        protocol = self.protocol
        if protocol is not None and protocol.transport is not None:
            protocol.dropConnection(abort=True)
            return
        if self.connector is not None:
            try:
                self.connector.stopConnecting()
                return
            except NotConnectingError:
                pass
        self._fail(exc)

    def _fail(self, reason: Exception | Failure) -> None:
        """Fail the result unless it already fired."""
        self._stop_timer()
        if not self.result.called:
            self.result.errback(reason)

    def _stop_timer(self) -> None:
        """Cancel the open timeout (the only per-connection timer the client starts)."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None


class _RelayClientProtocol(WebSocketClientProtocol):
    """Autobahn client protocol that feeds a :class:`RelayConnection` and records refusals."""

    _log = Logger()
    factory: _RelayClientFactory
    connection: RelayConnection | None = None
    http_status: int | None = None

    def connectionMade(self) -> None:
        """
        Turn Nagle off ourselves: Autobahn tries, but reads the option before copying it from the
        factory and hides the error, so its own attempt never takes effect.
        """
        set_no_delay(self.transport)
        super().connectionMade()

    def processHandshake(self) -> None:
        """Turn a non-101 response into a recorded status before Autobahn rejects it with text only."""
        if self.http_status is None and b"\r\n\r\n" in self.data:
            status = parse_status_line(self.data)
            if status is not None:
                self.http_status = status
                if status != 101:
                    self.failHandshake(f"upgrade refused with HTTP {status}")
                    return
        super().processHandshake()

    def onOpen(self) -> None:
        """The handshake completed."""
        try:
            self.factory.attempt.opened(self)
        except Exception:
            self._log.failure("relay client failed to handle open", relay_event="relay_client_open_error")
            self.dropConnection(abort=True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Queue or deliver a received message."""
        connection = self.connection
        if connection is None:
            return
        try:
            connection._message_received(payload, isBinary)
        except Exception:
            self._log.failure("relay client failed to handle a message", relay_event="relay_client_message_error")
            self._fail_connection(_INTERNAL_ERROR, "internal error")

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        """Report the close to the open connection, or to the attempt if never opened."""
        if self.remoteCloseCode is not None:
            code, reason = self.remoteCloseCode, self.remoteCloseReason
        info = CloseInfo(code=code, reason=reason, was_clean=bool(wasClean))
        try:
            if self.connection is not None:
                self.connection._connection_closed(info)
            else:
                self.factory.attempt.closed_before_open(self, info)
        except Exception:
            self._log.failure("relay client failed to handle close", relay_event="relay_client_close_error")


class _RelayClientFactory(WebSocketClientFactory):
    """A factory for exactly one connection attempt."""

    def __init__(
        self,
        attempt: _Attempt,
        *,
        reactor: IReactorTCP,
        headers: dict[str, str],
        protocols: list[str],
        max_message_bytes: int | None,
    ) -> None:
        super().__init__(attempt.url, protocols=protocols, headers=headers, reactor=reactor)
        self.attempt = attempt
        limit = max_message_bytes or 0
        # Our own open timeout replaces Autobahn's; no auto-ping and no compression keep 4000 idle
        # benchmark connections free of timers and deflate state.
        self.setProtocolOptions(
            openHandshakeTimeout=0,
            autoPingInterval=0,
            autoPingTimeout=0,
            perMessageCompressionOffers=[],
            maxMessagePayloadSize=limit,
            maxFramePayloadSize=limit,
        )

    def buildProtocol(self, addr: IAddress | None) -> _RelayClientProtocol:  # type: ignore[override]
        """Build the protocol and let the attempt see it (to abort it on timeout)."""
        protocol = _RelayClientProtocol()
        protocol.factory = self
        self.attempt.protocol = protocol
        return protocol

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        """TCP connect failed (refused, unreachable, or stopped by the open timeout)."""
        self.attempt.tcp_failed(reason)


def _open(
    reactor: IReactorTCP,
    url: str,
    *,
    headers: dict[str, str],
    protocols: list[str],
    open_timeout: float,
    max_message_bytes: int | None,
    tls_options: IOpenSSLClientConnectionCreator | None,
) -> Deferred[RelayConnection]:
    """One upgrade attempt at the full ``url``: the Deferred of its :class:`_Attempt`."""
    attempt = _Attempt(IReactorTime(reactor), url, open_timeout)
    factory = _RelayClientFactory(
        attempt,
        reactor=reactor,
        headers=headers,
        protocols=protocols,
        max_message_bytes=max_message_bytes,
    )
    # Twisted's own connect timeout only backs ours up; ours covers the handshake as well.
    tcp_timeout = open_timeout + 1.0
    if factory.isSecure:
        creator = tls_options if tls_options is not None else optionsForClientTLS(factory.host)
        # connectSSL accepts a connection creator at runtime; its annotation predates them.
        attempt.connector = IReactorSSL(reactor).connectSSL(
            factory.host,
            factory.port,
            factory,
            creator,  # type: ignore[arg-type]
            timeout=tcp_timeout,
            bindAddress=None,
        )
    else:
        attempt.connector = reactor.connectTCP(factory.host, factory.port, factory, timeout=tcp_timeout)
    return attempt.result


async def _follow_redirects(
    open_url: Callable[[str], Deferred[RelayConnection]],
    url: str,
    *,
    token: str,
    token_via: TokenVia,
    max_redirects: int,
) -> RelayConnection:
    """Open ``url``, following 307/308 answers to their ``Location`` up to ``max_redirects`` times."""
    redirected_from: list[str] = []
    while True:
        try:
            connection = await open_url(url)
        except UpgradeRefused as refused:
            if refused.status not in FOLLOWED_REDIRECT_STATUSES or refused.location is None:
                raise
            target = redirect_url(refused.location, url, token=token, token_via=token_via)
            if target is None:
                raise
            redirected_from.append(url)
            if len(redirected_from) > max_redirects:
                assert refused.status is not None
                raise TooManyRedirects(refused.status, refused.location, redirected_from) from refused
            url = target
            continue
        connection.redirected_from = redirected_from
        return connection


def connect(
    reactor: IReactorTCP,
    url: str,
    *,
    token: str,
    role: str,
    workspace_id: str,
    runtime_target_id: str | None = None,
    token_via: TokenVia = "header",
    subprotocol: str | None = DEFAULT_SUBPROTOCOL,
    open_timeout: float = 8.0,
    max_message_bytes: int | None = None,
    extra_query: Mapping[str, str] | None = None,
    tls_options: IOpenSSLClientConnectionCreator | None = None,
    follow_redirects: bool = True,
    max_redirects: int = 3,
    http_redirect: bool = False,
) -> Deferred[RelayConnection]:
    """Open a WebSocket to the relay at ``url`` (its ``/ws`` base URL) as ``role``.

    The result fires with a :class:`RelayConnection` once the socket is OPEN, or fails with
    :class:`UpgradeRefused` (non-101 status, or ``status=None`` when the relay closed without answering),
    :class:`HandshakeFailed` (an invalid 101 response), :class:`OpenTimeout` after ``open_timeout``
    seconds, or a Twisted ``ConnectionRefusedError`` (or another ``ConnectError``) when TCP fails. It fires
    only once the socket is gone. ``reactor`` must also provide ``IReactorTime`` (and ``IReactorSSL`` for
    ``wss://``).

    Redirects: ``http_redirect=True`` adds ``redirect=http`` to the query, asking the relay to answer a
    client whose daemon is on another relay with ``307`` and the owner's URL instead of an in-band
    ``RELAY_REDIRECT`` frame. With ``follow_redirects`` (the default) a 307/308 answer carrying a
    ``Location`` is followed with the same token in the same place, the relay's query kept as written, up to
    ``max_redirects`` times (then :class:`TooManyRedirects`); the connection's
    :attr:`~RelayConnection.redirected_from` lists the URLs that redirected. The token goes to whatever host
    the relay names, and ``open_timeout`` and ``tls_options`` apply to each hop. Without
    ``follow_redirects`` a redirect fails as ``UpgradeRefused`` with its ``location``.
    """
    if open_timeout <= 0:
        raise ValueError("open_timeout must be positive")
    if max_redirects < 0:
        raise ValueError("max_redirects must not be negative")
    query = dict(extra_query or {})
    if http_redirect:
        query["redirect"] = "http"
    handshake = handshake_for(
        url,
        token=token,
        role=role,
        workspace_id=workspace_id,
        runtime_target_id=runtime_target_id,
        token_via=token_via,
        subprotocol=subprotocol,
        extra_query=query,
    )
    open_url = partial(
        _open,
        reactor,
        headers=handshake.headers,
        protocols=handshake.protocols,
        open_timeout=open_timeout,
        max_message_bytes=max_message_bytes,
        tls_options=tls_options,
    )
    if not follow_redirects:
        return open_url(handshake.url)
    return Deferred.fromCoroutine(
        _follow_redirects(open_url, handshake.url, token=token, token_via=token_via, max_redirects=max_redirects)
    )
