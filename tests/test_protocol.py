"""The relay's socket code over in-memory transports: the head dispatcher and the upgrade path's refusals."""

from __future__ import annotations

import gc
import weakref
from typing import Any, List, Optional

import txaio
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.test.iosim import FakeTransport, connect
from twisted.trial.unittest import SynchronousTestCase

from tests.support import TEST_SECRET
from tests.support import token as mint
from viewport.relay.admission import AdmissionResult, LocalAdmission
from viewport.relay.backplane.single import SingleBackplane
from viewport.relay.config import load_config
from viewport.relay.core import Relay
from viewport.relay.protocol import RelayPortFactory, RelayWebSocketProtocol
from viewport.relay.web import make_site
from viewport.tokens import LocalTokenVerifier

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


class RawClient(Protocol):
    """Writes raw bytes and keeps everything the relay answers."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.lost = False

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class BrokenAdmission:
    """An admission whose code has a bug."""

    def admit(self, token: str, role: str, workspace_id: str, runtime_target_id: Optional[str]) -> "Deferred[AdmissionResult]":
        raise ZeroDivisionError("bug in admission with Bearer " + token)


def head(target: str = "/ws?role=client&workspaceId=w1&runtimeTargetId=rt1", **headers: str) -> bytes:
    """A WebSocket upgrade request head with extra headers (underscores in names become dashes)."""
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Version: 13", f"Sec-WebSocket-Key: {KEY}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class UpgradeRefusalTests(SynchronousTestCase):
    """What a peer receives when the upgrade is refused, driven over iosim with a clock."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self._loop = txaio.config.loop
        txaio.config.loop = self.clock
        self.addCleanup(setattr, txaio.config, "loop", self._loop)
        self.events: List[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def relay(self, admission: Any = None) -> Relay:
        config = load_config({"RELAY_TOKEN_SECRET": TEST_SECRET}, home="/nonexistent-home")
        if admission is None:
            admission = LocalAdmission(LocalTokenVerifier(TEST_SECRET, ["HS256"]), self.clock)
        return Relay(config=config, clock=self.clock, backplane=SingleBackplane("r1"), admission=admission)

    def exchange(self, relay: Relay, request: bytes) -> RawClient:
        """Connect a raw client to a fresh relay socket and run the conversation to its end."""
        server = RelayPortFactory(relay, make_site(relay)).buildProtocol(None)
        client = RawClient(request)
        pump = connect(server, FakeTransport(server, True), client, FakeTransport(client, False), greet=True)
        for _ in range(20):
            pump.pump()
            self.clock.advance(0.1)
        return client

    def status_line(self, client: RawClient) -> bytes:
        return client.received.split(b"\r\n", 1)[0]

    def test_bug_in_admission_is_a_bare_500_counted_and_logged(self) -> None:
        """An exception in the admission chain answers a bare 500 (no exception text), is counted and logged."""
        relay = self.relay(BrokenAdmission())
        bearer = mint("client", "w1", "rt1", now=0)
        client = self.exchange(relay, head(Authorization=f"Bearer {bearer}"))
        self.assertEqual(client.received, b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
        self.assertEqual(relay.metrics.relay_upgrade_errors.value, 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual([e.get("relay_event") for e in self.events if e.get("log_failure")], ["upgrade_error"])

    def test_handshake_refusals_carry_a_fixed_reason_phrase(self) -> None:
        """A duplicated auth.<token> subprotocol is a 400 whose reason phrase does not quote the token."""
        bearer = mint("client", "w1", "rt1", now=0)
        client = self.exchange(
            self.relay(), head(Sec_WebSocket_Protocol=f"auth.{bearer}, auth.{bearer}")
        )
        self.assertEqual(client.received, b"HTTP/1.1 400 Bad Request\r\n\r\n")
        refused = [e for e in self.events if e.get("relay_event") == "handshake_refused"]
        self.assertEqual([e["status"] for e in refused], [400])

    def test_oversize_head_in_one_read_is_431(self) -> None:
        """A request head over 16 KiB is refused with 431 even when it arrives complete in one read."""
        bearer = mint("client", "w1", "rt1", now=0)
        client = self.exchange(self.relay(), head(Authorization=f"Bearer {bearer}", X_Padding="p" * 20_000))
        self.assertEqual(self.status_line(client), b"HTTP/1.1 431 Request Header Fields Too Large")

    def test_a_closed_socket_is_freed_without_the_cyclic_collector(self) -> None:
        """Once a socket (with a large head) has closed, nothing keeps its protocol alive: reference counting frees it."""
        relay = self.relay()
        bearer = mint("client", "w1", "rt1", now=0)
        server = RelayPortFactory(relay, make_site(relay)).buildProtocol(None)
        client = RawClient(head(Authorization=f"Bearer {bearer}", Sec_WebSocket_Protocol=", ".join(
            f"p{n}" for n in range(1500)) + f", auth.{bearer}"))
        was_enabled = gc.isenabled()
        gc.disable()
        self.addCleanup(lambda: gc.enable() if was_enabled else None)
        server_transport = FakeTransport(server, True)
        pump = connect(server, server_transport, client, FakeTransport(client, False), greet=True)
        pump.pump()
        self.assertTrue(client.received.startswith(b"HTTP/1.1 101"))
        protocol = server.transport.protocol
        self.assertIsInstance(protocol, RelayWebSocketProtocol)
        alive = weakref.ref(protocol)
        del protocol, server
        client.transport.loseConnection()  # type: ignore[union-attr]
        for _ in range(10):
            pump.pump()
            self.clock.advance(1)
        # twisted.internet.tcp.Connection drops its protocol once it is lost; iosim's transport does not.
        server_transport.protocol = None
        del pump, server_transport
        self.assertIsNone(alive(), "the closed protocol is only reachable through a reference cycle")

    def test_upgrade_answers_with_a_neutral_server_header(self) -> None:
        """The 101 response names no library or version in its Server header."""
        bearer = mint("client", "w1", "rt1", now=0)
        client = self.exchange(self.relay(), head(Authorization=f"Bearer {bearer}"))
        response = client.received.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower().split("\r\n")
        self.assertEqual(response[0], "http/1.1 101 switching protocols")
        self.assertIn("server: viewport-relay", response)
        self.assertFalse([line for line in response if "autobahn" in line or "twisted" in line])
