"""
The harness of the socket-layer tests (tests/test_socket_*.py, tests/test_frame_writer.py), and the checks
that tie its in-memory socket to Twisted's real one.

A relay is the real thing: ``Relay`` and ``ListeningService`` from the environment, listening on a
``MemoryReactorClock``, which is also every clock involved (the relay's, the service's timers, and Autobahn's
through ``txaio.config.loop``). Each accepted socket is the real ``RelayPortFactory`` protocol over an
``iosim`` pump; peers are Autobahn's own WebSocket client, or raw bytes. Nothing sleeps and nothing reads the
wall clock: time moves only when a test advances it.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast
from urllib.parse import urlencode

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from tests.support import TEST_SECRET, token
from viewport.relay.admission import LocalAdmission, PlatformAdmission
from viewport.relay.backplane.single import SingleBackplane
from viewport.relay.config import load_config
from viewport.relay.core import Relay
from viewport.relay.interfaces import IAdmission, IBackplane
from viewport.relay.protocol import RelayWebSocketProtocol
from viewport.relay.wire_shortcuts import pending_write_bytes
from viewport.relay.service import ListeningService
from viewport.relay.web import make_site
from viewport.tokens import LocalTokenVerifier

#: Twisted's ``FileDescriptor.bufferSize``: past this many unsent bytes a socket pauses its producer.
SOCKET_BUFFER_SIZE = 64 * 1024
DEFAULT_PEER_IP = "10.0.0.7"
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
_FLUSH_ROUNDS = 1000
#: How far the cleanup moves the clock, at most, to let every timer of a test run out.
_SETTLE_SECONDS = 120


class SocketBuffer(FakeTransport):
    """
    The relay's side of one in-memory socket, with the write side of a Twisted TCP transport.

    What the relay writes stays here until the peer reads it: ``reading = False`` is a peer that stopped
    reading. As in ``twisted.internet.abstract.FileDescriptor``, a streaming producer is paused on every
    write that leaves more than ``SOCKET_BUFFER_SIZE`` bytes unsent and resumed once they drained; the
    unsent bytes are exposed under the names Twisted's TCP transport uses (``dataBuffer``, ``offset``,
    ``_tempDataLen``), which ``wire_shortcuts.pending_write_bytes`` reads. A close waits until what was written
    has been read; an abort discards it, as a TCP reset does. ``SocketBufferTests`` compares it with a
    real ``FileDescriptor``.
    """

    dataBuffer = b""
    offset = 0

    def __init__(self, protocol: Any, isServer: bool, hostAddress: Any = None, peerAddress: Any = None) -> None:
        """As ``FakeTransport``; the peer reads until told otherwise."""
        super().__init__(protocol, isServer, hostAddress, peerAddress)
        self.reading = True
        self.producer_paused = False
        self._close_when_drained = False

    @property
    def _tempDataLen(self) -> int:
        return sum(len(chunk) for chunk in self.stream)

    def _pause_if_full(self) -> None:
        if self.producer is not None and self.streamingProducer and self._tempDataLen > SOCKET_BUFFER_SIZE:
            self.producer_paused = True
            self.producer.pauseProducing()

    def write(self, data: bytes) -> None:
        """Buffer ``data`` (dropped once closing), pausing the producer if the buffer is full."""
        if self._close_when_drained:
            return
        super().write(data)
        if data:
            self._pause_if_full()

    def writeSequence(self, iovec: Sequence[bytes]) -> None:
        """Buffer the chunks as one write."""
        self.write(b"".join(iovec))

    def getOutBuffer(self) -> Optional[bytes]:
        """What the peer reads now: nothing while it does not read; a paused producer resumes once drained."""
        if not self.reading:
            return None
        data = super().getOutBuffer()
        if self.producer_paused and self.producer is not None:
            self.producer_paused = False
            self.producer.resumeProducing()
        if self._close_when_drained:
            FakeTransport.loseConnection(self)
        return cast(Optional[bytes], data)

    def loseConnection(self) -> None:
        """Close once the peer has read what was written."""
        self._close_when_drained = True
        if not self.stream:
            FakeTransport.loseConnection(self)

    def abortConnection(self) -> None:
        """Drop the connection now, with whatever was not read yet."""
        self.stream = []
        FakeTransport.abortConnection(self)


class TlsLikeBuffer(SocketBuffer):
    """
    A ``SocketBuffer`` without Twisted's TCP buffer attributes, as the relay sees a TLS transport: its
    producer is paused once when the buffer fills (as TLS's producer membrane does), and the relay has to
    estimate what is pending.
    """

    def __getattribute__(self, name: str) -> Any:
        """Hide the TCP buffer attributes."""
        if name in ("dataBuffer", "offset", "_tempDataLen"):
            raise AttributeError(name)
        return super().__getattribute__(name)

    def _unsent(self) -> int:
        return sum(len(chunk) for chunk in self.stream)

    def _pause_if_full(self) -> None:
        if (
            self.producer is not None
            and self.streamingProducer
            and not self.producer_paused
            and self._unsent() > SOCKET_BUFFER_SIZE
        ):
            self.producer_paused = True
            self.producer.pauseProducing()


class WsPeer(WebSocketClientProtocol):
    """A daemon, client or worker: Autobahn's WebSocket client, recording what reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = False
        self.received: List[bytes] = []
        self.ping_count = 0
        #: ``(wasClean, code, reason)`` once closed.
        self.closed_with: Optional[Tuple[bool, Optional[int], Optional[str]]] = None

    def onOpen(self) -> None:
        """The upgrade succeeded."""
        self.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Keep every message."""
        self.received.append(payload)

    def onPing(self, payload: bytes) -> None:
        """Count the ping, then answer it as Autobahn does."""
        self.ping_count += 1
        super().onPing(payload)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        """Keep how the connection ended."""
        self.closed_with = (wasClean, code, reason)

    def json_messages(self) -> List[Dict[str, Any]]:
        """The messages received, parsed."""
        return [json.loads(message) for message in self.received]

    def send_text(self, text: str) -> None:
        """Send one text message."""
        self.sendMessage(text.encode("utf-8"), isBinary=False)

    @property
    def still_open(self) -> bool:
        """Open and not closed since."""
        return self.opened and self.closed_with is None


def was_dropped(peer: WsPeer) -> bool:
    """The relay dropped the peer's connection without a closing handshake (the peer saw 1006)."""
    return peer.closed_with is not None and peer.closed_with[:2] == (False, 1006)


class RawPeer(Protocol):
    """Writes raw bytes (on connecting, or later) and keeps everything the relay answers."""

    def __init__(self, request: bytes = b"") -> None:
        self.request = request
        self.received = b""
        self.lost = False

    def connectionMade(self) -> None:
        """Send the request, if there is one yet."""
        if self.request:
            self.send(self.request)

    def send(self, data: bytes) -> None:
        """Write more bytes to the relay."""
        self.transport.write(data)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        """Keep the answer."""
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The relay closed (or dropped) the socket."""
        self.lost = True

    def http_response(self) -> Tuple[int, Dict[str, str], bytes]:
        """Status, lower-cased headers and body of a plain HTTP answer."""
        head, _, body = self.received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split(" ")[1]), headers, body


class Link:
    """One accepted socket: its pump, the relay's end (a ``SocketBuffer``) and the peer's end."""

    def __init__(self, pump: IOPump, relay_side: SocketBuffer, peer_side: FakeTransport) -> None:
        self.pump = pump
        self.relay_side = relay_side
        self.peer_side = peer_side

    @property
    def relay_protocol(self) -> RelayWebSocketProtocol:
        """The relay's WebSocket protocol on this socket (after the dispatcher handed it over)."""
        protocol = self.relay_side.protocol
        assert isinstance(protocol, RelayWebSocketProtocol), protocol
        return protocol

    @property
    def unsent(self) -> int:
        """Bytes the relay wrote that the peer has not read."""
        return sum(len(chunk) for chunk in self.relay_side.stream)


def upgrade_head(
    target: str = "/ws?role=client&workspaceId=w1&runtimeTargetId=rt1",
    *headers: str,
    method: str = "GET",
    version: str = "HTTP/1.1",
    key: Optional[str] = WS_KEY,
    ws_version: str = "13",
) -> bytes:
    """A raw WebSocket upgrade request head; ``headers`` are extra ``Name: value`` lines."""
    lines = [f"{method} {target} {version}", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Version: {ws_version}"]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    lines.extend(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def ws_target(role: str, workspace: str, runtime_target: Optional[str] = None, **extra: str) -> str:
    """The ``/ws`` request target for an upgrade."""
    query = [("role", role), ("workspaceId", workspace)]
    if runtime_target is not None:
        query.append(("runtimeTargetId", runtime_target))
    query.extend(extra.items())
    return "/ws?" + urlencode(query)


class HeldPlatform(Resource):
    """The platform's validate endpoint (``PlatformAdmission`` reaches it through ``StubTreq``), answering when told."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: List[Request] = []

    def render_POST(self, request: Request) -> Union[bytes, int]:
        """Hold the request."""
        self.waiting.append(request)
        return NOT_DONE_YET

    def admit_all(self, claims: Mapping[str, Any]) -> None:
        """Answer every held request ``{"ok": true, "claims": claims}``."""
        for request in self.waiting:
            request.setHeader(b"content-type", b"application/json")
            request.write(json.dumps({"ok": True, "claims": dict(claims)}).encode("utf-8"))
            request.finish()
        self.waiting = []


AdmissionFactory = Callable[[IReactorTime], IAdmission]


def platform_admission(stub: StubTreq, timeout_ms: int = 2000) -> AdmissionFactory:
    """Admission by the platform behind ``stub``, on the relay's clock."""

    def build(clock: IReactorTime) -> IAdmission:
        return PlatformAdmission(cast(HTTPClient, stub), clock, "http://platform.test", None, timeout_ms, 4096)

    return build


class RelayHarness:
    """
    One relay built from ``env`` (plus the test secret) as the tap builds it, started, on a fake clock.

    The cleanup stops the service, lets every timer run out and fails the test if a delayed call is
    still pending then; ``txaio.config.loop`` is restored after it.
    """

    def __init__(
        self,
        case: SynchronousTestCase,
        env: Optional[Mapping[str, str]] = None,
        *,
        backplane: Optional[IBackplane] = None,
        admission: Optional[AdmissionFactory] = None,
        grace_seconds: float = 10.0,
        secret: bool = True,
    ) -> None:
        self.case = case
        self.clock = MemoryReactorClock()
        # Autobahn's own timers (handshake and close timeouts) are scheduled on txaio's loop.
        txaio_config = cast(Any, txaio).config
        previous_loop = txaio_config.loop
        txaio_config.loop = self.clock
        case.addCleanup(setattr, txaio_config, "loop", previous_loop)
        self.events: List[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        case.addCleanup(globalLogPublisher.removeObserver, observer)
        base = {"RELAY_TOKEN_SECRET": TEST_SECRET} if secret else {}
        self.config = load_config({**base, **(env or {})}, home="/nonexistent-home")
        if admission is None:
            chosen: IAdmission = LocalAdmission(LocalTokenVerifier(TEST_SECRET, ["HS256"]), self.clock)
        else:
            chosen = admission(self.clock)
        self.backplane: IBackplane = backplane if backplane is not None else SingleBackplane("relay-under-test")
        self.relay = Relay(config=self.config, clock=self.clock, backplane=self.backplane, admission=chosen)
        self.service = ListeningService(
            self.relay, TCP4ServerEndpoint(self.clock, 0, interface="127.0.0.1"), grace_seconds, make_site(self.relay)
        )
        self.service.privilegedStartService()
        self.service.startService()
        self.port_factory = self.clock.tcpServers[-1][1]
        self.links: List[Link] = []
        self.stopped: Optional[Deferred[Any]] = None
        case.addCleanup(self._settle)

    # -- time and traffic --------------------------------------------------------------------------

    def flush(self) -> None:
        """Move bytes (and zero-delay calls) between the relay and every peer until nothing moves."""
        for _ in range(_FLUSH_ROUNDS):
            if not any([link.pump.pump() for link in self.links]):
                return
        raise AssertionError("the relay and its peers never went quiet")

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass on the clock (see ``advance_to``)."""
        self.advance_to(self.clock.seconds() + seconds)

    def advance_to(self, moment: float) -> None:
        """
        Move the clock to ``moment`` (seconds since the relay started) through every delayed call due on
        the way, moving bytes after each: one jump would make a ``LoopingCall`` skip the ticks it missed.
        """
        while True:
            due = [call.getTime() for call in self.clock.getDelayedCalls() if call.getTime() <= moment]
            step = min(due) if due else moment
            self.clock.advance(max(0.0, step - self.clock.seconds()))
            self.flush()
            if not due:
                return

    # -- peers -------------------------------------------------------------------------------------

    def accept(self, peer: Protocol, ip: str = DEFAULT_PEER_IP, relay_side: type = SocketBuffer) -> Link:
        """A new TCP connection from ``ip`` to the relay, with ``peer`` at the other end (not flushed)."""
        address = IPv4Address("TCP", ip, 40000 + len(self.links))
        dispatcher = self.port_factory.buildProtocol(address)
        relay_end = relay_side(dispatcher, True, hostAddress=IPv4Address("TCP", "127.0.0.1", 8787),
                               peerAddress=address)
        peer_end = FakeTransport(peer, False, hostAddress=address, peerAddress=IPv4Address("TCP", "127.0.0.1", 8787))
        link = Link(connect(dispatcher, relay_end, peer, peer_end, greet=False, clock=self.clock), relay_end, peer_end)
        self.links.append(link)
        return link

    def raw(self, request: bytes = b"", ip: str = DEFAULT_PEER_IP) -> RawPeer:
        """Send raw bytes on a new socket and run the exchange until nothing moves."""
        peer = RawPeer(request)
        self.accept(peer, ip)
        self.flush()
        return peer

    def connect(
        self,
        role: str,
        workspace: str,
        runtime_target: Optional[str] = None,
        *,
        ip: str = DEFAULT_PEER_IP,
        bearer: Optional[str] = None,
        protocols: Sequence[str] = (),
        headers: Optional[Mapping[str, str]] = None,
        relay_side: type = SocketBuffer,
        **claims: Any,
    ) -> Tuple[WsPeer, Link]:
        """
        A WebSocket peer through the upgrade (open unless refused); its token names ``role``, the scope and
        ``claims`` (camelCase) unless ``bearer`` is given, and goes in the ``Authorization`` header.
        """
        if bearer is None:
            bearer = token(role, workspace, runtime_target, now=self.clock.seconds(), **claims)
        sent = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        sent.update(headers or {})
        factory = WebSocketClientFactory(
            "ws://127.0.0.1:8787" + ws_target(role, workspace, runtime_target),
            headers=sent, protocols=list(protocols) or None, reactor=self.clock,
        )
        factory.protocol = WsPeer
        peer = cast(WsPeer, factory.buildProtocol(None))
        link = self.accept(peer, ip, relay_side)
        self.flush()
        return peer, link

    def open(
        self, role: str, workspace: str, runtime_target: Optional[str] = None, **options: Any
    ) -> Tuple[WsPeer, Link]:
        """``connect``, failing the test unless the socket opened and was registered."""
        peer, link = self.connect(role, workspace, runtime_target, **options)
        self.case.assertTrue(peer.still_open, f"{role} of {workspace} did not open: {peer.closed_with}")
        return peer, link

    # -- what the relay says -------------------------------------------------------------------------

    def count(self, name: str) -> int:
        """A counter's value, by its exposed name (``relay_..._total``)."""
        return self.relay.metrics.counter_values().get(name, 0)

    def logged(self, relay_event: str) -> List[LogEvent]:
        """The log events of one ``relay_event`` name, in order."""
        return [event for event in self.events if event.get("relay_event") == relay_event]

    def open_sockets(self) -> int:
        """Sockets the relay holds open (registered with its heartbeat)."""
        return len(self.relay.sockets)

    # -- stopping ----------------------------------------------------------------------------------

    def stop(self) -> "Deferred[Any]":
        """Stop the service as twistd does on SIGTERM (not flushed)."""
        self.stopped = cast("Deferred[Any]", self.service.stopService())
        return self.stopped

    def _settle(self) -> None:
        if self.service.running:
            self.stop()
        self.flush()
        for _ in range(_SETTLE_SECONDS):
            if not self.clock.getDelayedCalls():
                break
            self.advance(1.0)
        self.case.assertEqual(self.clock.getDelayedCalls(), [], "a timer outlived the test")


# -- the harness's own checks ------------------------------------------------------------------------


@implementer(IPushProducer)
class _RecordingProducer:
    """A streaming producer that notes each pause and resume."""

    def __init__(self) -> None:
        self.calls: List[str] = []

    def pauseProducing(self) -> None:
        """Note a pause."""
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        """Note a resume."""
        self.calls.append("resume")

    def stopProducing(self) -> None:
        """Note a stop."""
        self.calls.append("stop")


class _Descriptor(FileDescriptor):
    """Twisted's own socket buffering, with a kernel that takes everything on each write attempt."""

    connected = 1

    def writeSomeData(self, data: bytes) -> int:
        """The kernel took it all."""
        return len(data)


class SocketBufferTests(SynchronousTestCase):
    """The in-memory socket the socket tests use behaves as Twisted's ``FileDescriptor`` where the relay looks."""

    def test_pauses_reports_and_resumes_like_a_twisted_socket(self) -> None:
        """Same pause on every write past 64 KiB, same unsent-byte count for the relay, same resume once drained."""
        real = _Descriptor(MemoryReactor())
        fake = SocketBuffer(Protocol(), True)
        fake.reading = False
        real_producer, fake_producer = _RecordingProducer(), _RecordingProducer()
        real.registerProducer(real_producer, True)
        fake.registerProducer(fake_producer, True)
        for size in (30_000, 30_000, 10_000, 1, 0, 5):
            real.write(b"x" * size)
            fake.write(b"x" * size)
            self.assertEqual(fake_producer.calls, real_producer.calls, size)
            self.assertEqual(pending_write_bytes(fake, 0), pending_write_bytes(real, 0), size)
        self.assertEqual(real_producer.calls, ["pause", "pause", "pause"])
        real.doWrite()
        fake.reading = True
        self.assertEqual(len(fake.getOutBuffer() or b""), 70_006)
        self.assertEqual(fake_producer.calls, real_producer.calls)
        self.assertEqual(real_producer.calls[-1], "resume")
        self.assertEqual(pending_write_bytes(fake, 0), pending_write_bytes(real, 0))

    def test_tls_like_buffer_hides_the_tcp_attributes_and_pauses_once(self) -> None:
        """The TLS stand-in makes the relay estimate (64 KiB plus what was queued since the pause)."""
        fake = TlsLikeBuffer(Protocol(), True)
        fake.reading = False
        producer = _RecordingProducer()
        fake.registerProducer(producer, True)
        for _ in range(3):
            fake.write(b"x" * 40_000)
        self.assertEqual(producer.calls, ["pause"])
        self.assertEqual(pending_write_bytes(fake, 123), SOCKET_BUFFER_SIZE + 123)

    def test_close_waits_for_the_reader_and_abort_does_not(self) -> None:
        """``loseConnection`` lets the peer read first; ``abortConnection`` discards what is unread."""
        closing = SocketBuffer(Protocol(), True)
        closing.reading = False
        closing.write(b"last words")
        closing.loseConnection()
        self.assertFalse(closing.disconnecting)
        closing.write(b"dropped")
        closing.reading = True
        self.assertEqual(closing.getOutBuffer(), b"last words")
        self.assertTrue(closing.disconnecting)
        aborted = SocketBuffer(Protocol(), True)
        aborted.write(b"never read")
        aborted.abortConnection()
        self.assertTrue(aborted.disconnecting)
        self.assertIsNone(aborted.getOutBuffer())


class HarnessTests(SynchronousTestCase):
    """The harness runs a real handshake on the fake clock and leaves nothing scheduled behind."""

    def test_a_daemon_opens_and_its_timers_are_the_relays(self) -> None:
        """A daemon upgrades and registers; only the service's own timers are pending afterwards."""
        harness = RelayHarness(self)
        peer, link = harness.open("workspace-daemon", "w1", "rt1")
        self.assertEqual(harness.open_sockets(), 1)
        self.assertEqual(link.relay_protocol.conn.role, "workspace-daemon")  # type: ignore[union-attr]
        self.assertEqual(harness.count("relay_ws_connections_opened_total"), 1)
        pending = [repr(call) for call in harness.clock.getDelayedCalls()]
        self.assertEqual(len(pending), 2, pending)
        self.assertTrue(all("LoopingCall" in call for call in pending), pending)
