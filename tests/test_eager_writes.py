"""EagerWrites on real TCP sockets: bytes leave before the reactor polls again; closing sockets are the reactor's."""

from __future__ import annotations

import socket
from typing import Any, List

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from tests.support import poll_until
from viewport.relay.eager_writes import EagerWrites


class _Accepted(Protocol):
    def connectionMade(self) -> None:
        self.factory.accepted.callback(self)  # type: ignore[attr-defined]


class _Pair:
    """Our server-side transport of a real TCP connection, the raw client socket, and an EagerWrites on a fake clock."""

    def __init__(self, transport: Any, raw: socket.socket) -> None:
        self.transport = transport
        self.raw = raw
        self.clock = task.Clock()
        self.eager = EagerWrites(self.clock)


@pytest_twisted.async_yield_fixture
async def pair() -> Any:
    """A connected pair on loopback; closed (and the port stopped) after the test."""
    factory = Factory.forProtocol(_Accepted)
    factory.accepted = Deferred()  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    raw = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    proto = await factory.accepted  # type: ignore[attr-defined]
    raw.setblocking(False)
    try:
        yield _Pair(proto.transport, raw)
    finally:
        raw.close()
        await port.stopListening()


def _received(raw: socket.socket) -> bytes:
    chunks: List[bytes] = []
    while True:
        try:
            chunk = raw.recv(65536)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks) + b"<EOF>"
        chunks.append(chunk)


@pytest_twisted.inlineCallbacks
def test_writes_of_a_pass_leave_in_the_call_scheduled_for_the_next(pair: _Pair) -> Any:
    """
    Two writes noted during one pass schedule one call; when it runs (here the fake clock stands
    for the reactor's next pass) both frames are on the wire and the reactor has no write left.
    """
    transport = pair.transport
    transport.write(b"one,")
    pair.eager.wrote(transport)
    transport.write(b"two")
    pair.eager.wrote(transport)
    assert len(pair.clock.getDelayedCalls()) == 1
    assert transport in reactor.getWriters()
    pair.clock.advance(0)
    # Sent within the call, before the reactor ran again: nothing buffered, no write registered.
    assert transport.dataBuffer == b"" and not transport._tempDataLen
    assert transport not in reactor.getWriters()
    received = yield poll_until(lambda: _received(pair.raw) or None, 5.0, "bytes on the wire")
    assert received == b"one,two"


@pytest_twisted.inlineCallbacks
def test_a_closing_socket_is_left_to_the_reactor(pair: _Pair) -> Any:
    """After loseConnection the reactor sends what is buffered and closes; EagerWrites does not act."""
    transport = pair.transport
    transport.write(b"last words")
    pair.eager.wrote(transport)
    transport.loseConnection()
    pair.clock.advance(0)
    assert transport.dataBuffer or transport._tempDataLen  # untouched: the reactor's to send
    received: List[bytes] = []

    def closed() -> bool:
        received.append(_received(pair.raw))
        return b"".join(received).endswith(b"<EOF>")

    yield poll_until(closed, 5.0, "data then EOF")
    assert b"".join(received) == b"last words<EOF>"


def test_transports_without_a_socket_are_ignored() -> None:
    """A transport that is no TCP connection (a test double, a pipe) schedules nothing."""
    clock = task.Clock()
    eager = EagerWrites(clock)
    eager.wrote(StringTransport())
    assert clock.getDelayedCalls() == []
