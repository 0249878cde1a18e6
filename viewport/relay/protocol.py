"""The relay's sockets: a dispatcher that reads the HTTP head, and the Autobahn WebSocket protocol."""

from __future__ import annotations

from http import HTTPStatus
from pprint import pformat
from time import perf_counter
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.server import Site
from zope.interface import implementer

from viewport.relay.eager_writes import EagerWrites
from viewport.relay.heartbeat import OpenSockets
from viewport.relay.interfaces import AdmissionResult, IAdmission, IPeer
from viewport.relay.metrics import LatencyHistogram, RelayMetrics
from viewport.relay.registry import Connection
from viewport.relay.router import Router
from viewport.relay.routing.upgrades import UpgradeOutcome
from viewport.relay import wire_shortcuts
from viewport.relay.upgrade_gate import UpgradeGate
from viewport.sockets import set_no_delay
from viewport.relay.upgrade import (
    SERVER_HEADER,
    UpgradeAccepted,
    UpgradeRefused,
    bare_refusal_bytes,
    select_subprotocol,
)

if TYPE_CHECKING:
    from viewport.relay.core import Relay

MAX_HEAD_BYTES = 16 * 1024
#: Per-socket attributes only the upgrade reads (``RelayWebSocketProtocol._release_handshake``).
_HANDSHAKE_STATE = (
    "http_request_data", "http_headers", "http_status_line", "http_request_uri", "http_request_path",
    "http_request_params", "http_request_host", "http_response_data", "websocket_origin", "websocket_protocols",
    "websocket_extensions", "upgrade",
)
MAX_LOGGED_REASON_CHARS = 200
HEAD_TIMEOUT_SECONDS = 10.0
STATE_OPEN = WebSocketProtocol.STATE_OPEN

Handler = Callable[[Connection, bytes, float], None]


class LazyPrettyFormat:
    """
    ``pprint.pformat(value)`` when (and only if) it is turned into text.

    Autobahn's ``_connectionMade`` pretty-prints its ~29 protocol options for a debug message on
    every socket, logged or not: about 100 µs per connection, a tenth of what an upgrade costs the
    relay. Given this in place of ``pformat`` (``_defer_autobahn_option_dump``), the message
    reads the same when debug logging is on and costs nothing when it is off.
    """

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return pformat(self.value)

    __repr__ = __str__


def _defer_autobahn_option_dump() -> None:
    """Make ``autobahn.websocket.protocol`` pretty-print its options only when they are logged."""
    import autobahn.websocket.protocol as autobahn_protocol

    if getattr(autobahn_protocol, "pformat", None) is pformat:
        autobahn_protocol.pformat = LazyPrettyFormat  # type: ignore[assignment]
        # The module's one use of pformat whose result must be text (``__str__``) keeps the real one.
        timings = getattr(autobahn_protocol, "Timings", None)
        if timings is not None:
            timings.__str__ = lambda self: pformat(self._timings)


_defer_autobahn_option_dump()


def _status_phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def parse_head(head: bytes) -> Optional[Tuple[str, str, Dict[str, str]]]:
    """Split an HTTP request head into method, target and lower-cased headers (repeats joined)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            return None
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return parts[0], parts[1], headers


def hand_over(transport: Any, protocol: Protocol, buffered: bytes) -> None:
    """Give a connection (plain or TLS) to another protocol and replay what was read so far."""
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    protocol.makeConnection(transport)
    if buffered:
        protocol.dataReceived(buffered)


class HandshakeDispatcher(Protocol):
    """
    Reads one HTTP request head, then hands the socket over.

    Plain HTTP goes to the twisted.web site; an upgrade runs the relay's cheap pre-checks (rate
    limit, caps, path, query, token) and, if they pass, goes to the Autobahn protocol, which
    validates the handshake before admission calls the platform.
    """

    _log = Logger()
    transport: Any

    def __init__(
        self,
        *,
        gate: UpgradeGate,
        site: Site,
        ws_factory: "RelayWebSocketFactory",
        clock: IReactorTime,
        metrics: RelayMetrics,
        addr: IAddress,
    ) -> None:
        self._gate = gate
        self._site = site
        self._ws_factory = ws_factory
        self._clock = clock
        self._m = metrics
        self._addr = addr
        self._buffer = b""
        self._timeout: Any = None
        self._handed_over = False

    def connectionMade(self) -> None:
        """
        Turn Nagle off (every protocol this socket is handed to writes small frames in bursts) and
        give the client a bounded time to send its request head.
        """
        set_no_delay(self.transport)
        self._timeout = self._clock.callLater(HEAD_TIMEOUT_SECONDS, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._timeout = None
        self.transport.abortConnection()

    def _cancel_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        """The peer left before sending a complete head."""
        self._cancel_timeout()

    def dataReceived(self, data: bytes) -> None:
        """Collect the head; dispatch once it is complete."""
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                self._refuse(431)
            return
        self._cancel_timeout()
        if end + 4 > MAX_HEAD_BYTES:
            self._refuse(431)
            return
        try:
            self._dispatch(self._buffer[: end + 4])
        except Exception:
            self._m.relay_upgrade_errors.inc()
            self._log.failure("upgrade failed", relay_event="upgrade_error")
            if self._handed_over:
                self.transport.abortConnection()
            else:
                self._refuse(500)

    def _refuse(self, status: int) -> None:
        self._cancel_timeout()
        self.transport.write(bare_refusal_bytes(status))
        self.transport.loseConnection()

    def _dispatch(self, head: bytes) -> None:
        parsed = parse_head(head)
        if parsed is None:
            self._refuse(400)
            return
        method, target, headers = parsed
        transport = self.transport
        if "upgrade" not in headers:
            self._handed_over = True
            hand_over(transport, self._site.buildProtocol(self._addr), self._buffer)
            return
        gate = self._gate
        if not gate.accepting:
            self._refuse(503)
            return
        peer = transport.getPeer()
        ip = gate.client_ip(getattr(peer, "host", None), headers.get("x-forwarded-for"))
        decision = gate.check(target, headers, ip, self._clock.seconds() * 1000.0)
        if isinstance(decision, UpgradeRefused):
            status = decision.refusal.status
            if status is None:
                transport.abortConnection()
            else:
                self._refuse(status)
            return
        protocol = cast(RelayWebSocketProtocol, self._ws_factory.buildProtocol(self._addr))
        protocol.upgrade = decision
        protocol.ip = ip
        self._handed_over = True
        hand_over(transport, protocol, self._buffer)


class _BackPressure:
    """
    Registered on the transport as a push producer, so the relay learns when writes pile up.

    While paused it also counts what was queued since, for transports (TLS) whose own buffer
    size cannot be read.
    """

    __slots__ = ("paused", "queued_since_pause")

    def __init__(self) -> None:
        self.paused = False
        self.queued_since_pause = 0

    def pauseProducing(self) -> None:
        """The transport's buffer is full."""
        self.paused = True
        self.queued_since_pause = 0

    def resumeProducing(self) -> None:
        """The transport drained its buffer."""
        self.paused = False

    def stopProducing(self) -> None:
        """The connection is going away."""
        self.paused = False


#: After a ``buffer overflow`` close, how long a peer has to read its backlog (and the close frame
#: behind it) before the socket is dropped.
SLOW_PEER_ABORT_SECONDS = 1.0


@implementer(IPeer)
class RelayWebSocketProtocol(WebSocketServerProtocol):
    """
    One relay WebSocket: admission in ``onConnect``, then every message handed to the router.

    Also the router's ``IPeer``: sends check the socket state and the transport's pending writes
    (closing with 4008 ``buffer overflow`` when a peer stops reading).
    """

    _log = Logger()
    factory: "RelayWebSocketFactory"
    upgrade: UpgradeAccepted
    ip: str
    conn: Optional[Connection] = None
    _handler: Optional[Handler] = None
    _back_pressure: Optional[_BackPressure] = None
    on_closed: Optional["Deferred[None]"] = None
    heartbeat_slot: int = 0
    _latency: Optional[LatencyHistogram] = None
    _redirect_location: Optional[str] = None
    _redirect_in_band: Optional[str] = None
    _slow_peer_abort: Optional[IDelayedCall] = None
    #: The start of a frame still arriving, parsed by ``wire_shortcuts.receive`` when it is complete.
    held_bytes: bytes = b""

    def dataReceived(self, data: bytes) -> None:
        """Frames in: the common ones parsed here, the rest by Autobahn (``wire_shortcuts.receive``)."""
        wire_shortcuts.receive(self, data, self.factory.max_frame_bytes)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        """
        Autobahn's teardown, then break the reference cycles a closed socket is left in: Autobahn
        resolves ``is_closed`` with the protocol itself, and ``Connection.peer`` points back at
        it. Freed by reference counting, a closed socket no longer waits, with its request head,
        headers and offered subprotocols, for a cyclic collection (which the service's GC
        thresholds run only every few hundred sockets): RSS grew by about 100 MB over 2000
        16 KB upgrades, and without bound under the frame fuzz, before this.
        """
        super().connectionLost(reason)
        self.is_closed = succeed(None)
        self.conn = None
        abort = self._slow_peer_abort
        if abort is not None and abort.active():
            abort.cancel()
        self._slow_peer_abort = None

    def onConnect(self, request: ConnectionRequest) -> Any:
        """
        The handshake is valid: ask the platform (or the local verifier) about the token, then the
        router what becomes of the upgrade (client cap, redirects). The protocol decides nothing.

        A bug anywhere in admission or in the decisions after it is logged with its traceback,
        counted, and answered with a bare 500: Autobahn would put the exception's text in the
        response.
        """
        try:
            query = self.upgrade.query
            d = self.factory.admission.admit(self.upgrade.token, query.role, query.workspace_id, query.runtime_target_id)
            d.addCallback(self._admitted, request)
        except Exception:
            d = fail()
        d.addErrback(self._upgrade_failed)
        return d

    def _upgrade_failed(self, failure: Failure) -> Failure:
        if failure.check(ConnectionDeny):
            return failure
        self.factory.metrics.relay_upgrade_errors.inc()
        self._log.failure("upgrade failed", failure, relay_event="upgrade_error", ip=self.ip)
        return Failure(ConnectionDeny(500, "Internal Server Error"))

    def _admitted(self, result: AdmissionResult, request: ConnectionRequest) -> Any:
        factory = self.factory
        query = self.upgrade.query
        if not result.ok or result.claims is None:
            factory.metrics.relay_admission_denied.inc()
            self._log.warn(
                "admission denied for a {role} of workspace {workspaceId}",
                relay_event="admission_denied",
                role=query.role,
                workspaceId=query.workspace_id,
                reason=result.reason,
                status=result.status,
                ip=self.ip,
            )
            raise ConnectionDeny(401, "Unauthorized")
        factory.metrics.relay_admission_ok.inc()
        self.conn = Connection(self, query.role, query.workspace_id, self.ip, result.claims, factory.now_ms())
        http_redirect = request.params.get("redirect", [""])[0] == "http"
        d = factory.router.upgrade_outcome(query, result.claims, http_redirect)
        return d.addCallback(self._decided, request)

    def _decided(self, outcome: UpgradeOutcome, request: ConnectionRequest) -> Optional[str]:
        if not self.factory.gate.accepting:
            # Admission answered after the relay began to drain: nobody would close this socket.
            raise ConnectionDeny(503, _status_phrase(503))
        if outcome.refuse_status is not None:
            raise ConnectionDeny(outcome.refuse_status, _status_phrase(outcome.refuse_status))
        if outcome.location is not None:
            self._redirect_location = outcome.location
            raise ConnectionDeny(307, "Temporary Redirect")
        self._redirect_in_band = outcome.in_band_redirect
        return select_subprotocol(request.protocols)

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """
        Refuse the handshake with a fixed reason phrase (``400 Bad Request``) and the ``Location``
        of an HTTP redirect. Autobahn's own reason texts quote header values (``duplicate protocol
        "auth.<token>"``), so they go neither into the response nor, unscrubbed, into the log.
        """
        if code == 307 and self._redirect_location is not None:
            responseHeaders = [("Location", self._redirect_location)]
        self.wasNotCleanReason = "opening handshake refused"
        self._log.info(
            "handshake refused with {status}",
            relay_event="handshake_refused",
            status=code,
            reason=reason[:MAX_LOGGED_REASON_CHARS],
            ip=getattr(self, "ip", None),
        )
        self.sendHttpErrorResponse(code, _status_phrase(code), responseHeaders)
        self.dropConnection(abort=False)

    def onOpen(self) -> None:
        """Register with the router; from here on frames flow."""
        factory = self.factory
        conn = self.conn
        assert conn is not None
        try:
            back_pressure = _BackPressure()
            self.transport.registerProducer(back_pressure, True)  # type: ignore[union-attr]
            self._back_pressure = back_pressure
            factory.sockets.add(self)
            router = factory.router
            role = conn.role
            metrics = factory.metrics
            self._latency = (
                metrics.relay_forward_daemon_to_client_seconds
                if role == "workspace-daemon"
                else metrics.relay_forward_client_to_daemon_seconds if role == "client" else None
            )
            self._handler = (
                router.daemon_frame
                if role == "workspace-daemon"
                else router.client_frame if role == "client" else router.worker_frame
            )
            runtime_target_id = self.upgrade.query.runtime_target_id
            self._release_handshake()
            opened = router.open_connection(conn, runtime_target_id, factory.now_ms())
            if opened and self._redirect_in_band is not None:
                router.send_redirect(conn, self._redirect_in_band, with_runtime_target=False)
        except Exception:
            self._internal_error()

    def _release_handshake(self) -> None:
        """
        Drop what only the upgrade needed: the request head and its parsed headers, path and query
        (Autobahn's) and the upgrade decision with the token (ours). An open socket keeps them for
        its whole life otherwise: a kilobyte or more each, and the token in memory for no reason.
        """
        state = self.__dict__
        for name in _HANDSHAKE_STATE:
            state.pop(name, None)

    def onMessageEnd(self) -> None:
        """A complete message: straight to ``onMessage`` (``wire_shortcuts.deliver_message``)."""
        wire_shortcuts.deliver_message(self, self.onMessage)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """
        Hand one message to the router. Text is checked to be UTF-8 here, once per message
        (close 1007 otherwise); binary frames are read as UTF-8 text with replacement.
        """
        conn = self.conn
        handler = self._handler
        if conn is None or handler is None or not conn.registered:
            return
        if isBinary:
            payload = payload.decode("utf-8", "replace").encode("utf-8")
        else:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                self.close(1007, "invalid UTF-8 in text message")
                return
        started = perf_counter()
        try:
            handler(conn, payload, self.factory.now_ms())
        except Exception:
            self._internal_error()
            return
        latency = self._latency
        if latency is not None:
            latency.observe(perf_counter() - started)

    def onPong(self, payload: bytes) -> None:
        """A pong proves the peer is alive."""
        conn = self.conn
        if conn is not None:
            conn.awaiting_pong = False
            conn.last_activity_ms = self.factory.now_ms()

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        """Unregister; the router tells a scope's clients when their daemon left."""
        factory = self.factory
        factory.sockets.remove(self)
        conn = self.conn
        if conn is not None:
            try:
                factory.router.close_connection(conn, factory.now_ms())
            except Exception:
                self._log.failure("closing a socket failed", relay_event="close_error")
        if self.on_closed is not None and not self.on_closed.called:
            self.on_closed.callback(None)

    def _internal_error(self) -> None:
        self._log.failure("a WebSocket handler failed; closing 1011", relay_event="ws_handler_error")
        self.close(1011, "internal error")

    # IPeer

    def send_text(self, text: str) -> None:
        """Send a relay-originated frame."""
        self.send_payload(text.encode("utf-8"))

    def send_payload(self, payload: bytes) -> None:
        """
        Forward text unchanged, unless the peer stopped reading (then close 4008).

        The frame is written straight to the transport (``wire_shortcuts.write_text_frame``) unless
        Autobahn's own queue holds anything.
        """
        if self.state != STATE_OPEN:
            return
        back_pressure = self._back_pressure
        if back_pressure is not None and back_pressure.paused:
            limit = self.factory.max_pending_bytes
            pending = wire_shortcuts.pending_write_bytes(self.transport, back_pressure.queued_since_pause)
            back_pressure.queued_since_pause += len(payload)
            if pending > limit:
                self._overflowed(pending, limit)
                return
        if self.send_queue:
            self.sendMessage(payload, False)
        else:
            wire_shortcuts.write_text_frame(self.transport, payload)
        self.factory.eager_writes.wrote(self.transport)

    def _overflowed(self, pending: int, limit: int) -> None:
        """
        The peer stopped reading: close 4008 ``buffer overflow``, then drop the socket after a short
        grace. The close frame sits behind the peer's own unread backlog, so a peer that does not
        catch up within the grace never sees it (it sees the connection drop: 1006).
        """
        factory = self.factory
        factory.metrics.relay_ws_slow_client_terminated.inc()
        conn = self.conn
        self._log.warn(
            "slow peer closed: {pendingBytes} bytes pending",
            relay_event="ws_slow_peer_closed",
            role=conn.role if conn is not None else None,
            workspaceId=conn.workspace_id if conn is not None else None,
            pendingBytes=pending,
            limitBytes=limit,
            ip=getattr(self, "ip", None),
        )
        self.close(4008, "buffer overflow")
        self._slow_peer_abort = factory.clock.callLater(SLOW_PEER_ABORT_SECONDS, self._abort_if_connected)

    def _abort_if_connected(self) -> None:
        self._slow_peer_abort = None
        transport = self.transport
        if transport is not None and self.state != WebSocketProtocol.STATE_CLOSED:
            transport.abortConnection()  # type: ignore[attr-defined]

    def close(self, code: int, reason: str) -> None:
        """
        Close the WebSocket with a code and reason. Goes through ``sendCloseFrame`` because
        Autobahn's ``sendClose`` refuses the protocol codes the contract uses (1001, 1009, 1011).
        """
        if self.state == STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8"), isReply=False)

    def can_send(self) -> bool:
        """True while the WebSocket is open."""
        return self.state == STATE_OPEN

    def send_ping(self) -> None:
        """An empty ping frame, written directly (the heartbeat sends thousands per interval)."""
        if self.state == STATE_OPEN and not self.send_queue:
            wire_shortcuts.write_empty_ping(self.transport)
        else:
            self.sendPing()

    def terminate(self) -> None:
        """Drop the TCP connection without a closing handshake (heartbeat and idle timeouts)."""
        self.transport.abortConnection()  # type: ignore[union-attr]


class RelayWebSocketFactory(WebSocketServerFactory):
    """
    Autobahn settings of the contract (no compression, max message size, no auto-ping), and what
    each socket works with: admission, the router, the open-socket set, metrics and the clock.
    """

    protocol = RelayWebSocketProtocol  # type: ignore[assignment]

    def __init__(
        self,
        *,
        clock: IReactorTime,
        gate: UpgradeGate,
        admission: IAdmission,
        router: Router,
        sockets: OpenSockets,
        metrics: RelayMetrics,
        max_frame_bytes: int,
        max_pending_bytes: int,
        admission_timeout_ms: int,
        eager_writes: Optional[EagerWrites] = None,
    ) -> None:
        super().__init__(reactor=clock, server=SERVER_HEADER)
        #: Sends the frames written in one reactor pass at the start of the next (``EagerWrites``).
        self.eager_writes = eager_writes if eager_writes is not None else EagerWrites(clock)
        self.clock = clock
        self.gate = gate
        self.admission = admission
        self.router = router
        self.sockets = sockets
        self.metrics = metrics
        self.max_frame_bytes = max_frame_bytes
        self.max_pending_bytes = max_pending_bytes
        self.setProtocolOptions(
            # Text is validated once per message in onMessage: Autobahn's incremental validator
            # costs ~30 µs per 16 KiB, a strict bytes.decode under 1 µs.
            utf8validateIncoming=False,
            maxFramePayloadSize=max_frame_bytes,
            maxMessagePayloadSize=max_frame_bytes,
            perMessageCompressionAccept=lambda offers: None,
            autoPingInterval=0,
            failByDrop=False,
            # Origins are the relay's own check (RELAY_ALLOWED_ORIGINS, before admission); Autobahn's
            # default here refuses ``Origin: null`` (a file:// page) with a 400.
            allowNullOrigin=True,
            openHandshakeTimeout=10 + admission_timeout_ms / 1000.0,
            closeHandshakeTimeout=5,
        )

    def now_ms(self) -> float:
        """The clock, in milliseconds."""
        return self.clock.seconds() * 1000.0


class RelayPortFactory(Factory):
    """The listening factory: every accepted socket starts with a ``HandshakeDispatcher``."""

    noisy = False

    def __init__(self, relay: "Relay", site: Site) -> None:
        self._relay = relay
        self._site = site
        config = relay.config
        self.ws_factory = RelayWebSocketFactory(
            clock=relay.clock,
            gate=relay.gate,
            admission=relay.admission,
            router=relay.router,
            sockets=relay.sockets,
            metrics=relay.metrics,
            max_frame_bytes=config.limits.max_frame_bytes,
            max_pending_bytes=config.limits.max_pending_bytes,
            admission_timeout_ms=config.admission.timeout_ms,
        )

    def buildProtocol(self, addr: Any) -> HandshakeDispatcher:
        """A dispatcher for one new socket."""
        relay = self._relay
        protocol = HandshakeDispatcher(
            gate=relay.gate, site=self._site, ws_factory=self.ws_factory, clock=relay.clock,
            metrics=relay.metrics, addr=addr,
        )
        protocol.factory = self
        return protocol
