"""
Small real servers on loopback for the viewport.client tests (test_client.py, test_client_reconnect.py):
a listening server that reports every connection it loses, a raw TCP peer with a canned answer, and a
harness that tears every server and client of a test down. Each test module adds its own WebSocket
protocol and server fields (an echo server, a scriptable relay) on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Self, TypeVar

import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from viewport.client import RelayConnection, connect

TOKEN = "tok-0123456789abcdef"


@dataclass
class Server:
    """A listening test server and everything it accepted (a test module's own servers add fields)."""

    reactor: Any
    requests: list[Any] = field(default_factory=list)
    opened: list[WebSocketServerProtocol] = field(default_factory=list)
    raw_answer: bytes | None = None
    port: IListeningPort | None = None
    lost: list[Deferred[None]] = field(default_factory=list)
    accepted: Deferred[None] = field(default_factory=Deferred)

    @property
    def url(self) -> str:
        """The ``/ws`` base URL of this server."""
        assert self.port is not None
        return f"ws://127.0.0.1:{self.port.getHost().port}/ws"  # type: ignore[attr-defined]

    def listen(self, factory: Factory[Any]) -> Self:
        """Listen on a free loopback port; every accepted connection reports its loss."""
        factory.server = self  # type: ignore[attr-defined]
        original = factory.buildProtocol
        lost = self.lost

        def build(addr: Any) -> Protocol:
            proto = original(addr)
            assert proto is not None
            done: Deferred[None] = Deferred()
            lost.append(done)
            inner = proto.connectionLost

            def connection_lost(reason: Failure) -> None:
                inner(reason)
                done.callback(None)

            proto.connectionLost = connection_lost  # type: ignore[method-assign]
            if not self.accepted.called:
                self.accepted.callback(None)
            return proto

        factory.buildProtocol = build  # type: ignore[method-assign]
        self.port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        return self


class RawProtocol(Protocol):
    """A plain TCP peer that writes a canned answer and closes, or stays silent when there is none."""

    def connectionMade(self) -> None:
        """Count the connection as a request, then answer as configured."""
        server: Server = self.factory.server  # type: ignore[attr-defined]
        server.requests.append(None)
        if server.raw_answer is not None:
            self.transport.write(server.raw_answer)  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]


S = TypeVar("S", bound=Server)


class Harness:
    """Creates servers and client connections and tears all of them down after the test."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.servers: list[Server] = []
        self.connections: list[RelayConnection] = []

    def websocket_server(self, server: S, protocol: type[WebSocketServerProtocol]) -> S:
        """``server`` serving Autobahn's ``protocol`` (no auto-ping, no open-handshake timeout)."""
        factory = WebSocketServerFactory()
        factory.protocol = protocol
        factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=0)
        self.servers.append(server.listen(factory))
        return server

    def raw_server(self, answer: bytes | None) -> Server:
        """A plain TCP server that writes ``answer`` and closes, or never answers when it is None."""
        server = Server(self.reactor, raw_answer=answer).listen(Factory.forProtocol(RawProtocol))
        self.servers.append(server)
        return server

    async def connect(self, url: str, **kwargs: Any) -> RelayConnection:
        """connect() to ``url`` with defaults a test can override."""
        args: dict[str, Any] = {"token": TOKEN, "role": "client", "workspace_id": "ws-1"}
        args.update(kwargs)
        conn = await connect(self.reactor, url, **args)
        self.connections.append(conn)
        return conn

    def within(self, d: Deferred[Any], seconds: float = 5.0) -> Deferred[Any]:
        """``d`` with a timeout, so a broken test fails instead of hanging."""
        return d.addTimeout(seconds, self.reactor)

    async def cleanup(self) -> None:
        """Drop every client, wait for every server-side connection to go, stop listening."""
        for conn in self.connections:
            await conn.abort()
        for server in self.servers:
            self._abort_opened(server)
            for done in server.lost:
                if not done.called:
                    self._abort_opened(server)  # one may have opened while an earlier one went
                await self.within(done)
            assert server.port is not None
            stopped = server.port.stopListening()
            if stopped is not None:
                await stopped

    @staticmethod
    def _abort_opened(server: Server) -> None:
        for proto in server.opened:
            if proto.transport is not None:
                proto.transport.abortConnection()  # type: ignore[attr-defined]


H = TypeVar("H", bound=Harness)


def harness_fixture(make: Callable[[Any], H]) -> Any:
    """A pytest fixture (assign it to ``harness``): ``make(reactor)``, cleaned up after the test."""

    @pytest_twisted.async_yield_fixture()
    async def harness() -> Any:
        """A harness bound to the running reactor, cleaned up after the test."""
        from twisted.internet import reactor

        h = make(reactor)
        try:
            yield h
        finally:
            await h.cleanup()

    return harness


async def failure_of(d: Awaitable[Any]) -> BaseException:
    """Await ``d`` and return the exception it failed with (fail the test if it succeeded)."""
    try:
        result = await d
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        return exc
    raise AssertionError(f"expected a failure, got {result!r}")
