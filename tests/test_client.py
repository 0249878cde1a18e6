"""Tests for viewport.client against small real servers on loopback."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol

from tests.client_servers import TOKEN, Harness as ClientHarness, Server, failure_of, harness_fixture
from viewport.client import (
    CloseInfo,
    ConnectionClosed,
    HandshakeFailed,
    MessageTimeout,
    OpenTimeout,
    UpgradeRefused,
    build_url,
    connect,
    is_status,
    parse_status_line,
)


@dataclass
class Recorded:
    """One upgrade request as the echo server saw it."""

    uri: str
    path: str
    params: dict[str, list[str]]
    headers: dict[str, str]
    protocols: list[str]


class EchoProtocol(WebSocketServerProtocol):
    """Records the upgrade, selects the first non-``auth.`` subprotocol and echoes every message."""

    def onConnect(self, request: ConnectionRequest) -> str | None:
        """Record the request, then accept (or deny, when the test says so)."""
        server: EchoServer = self.factory.server
        server.requests.append(
            Recorded(
                uri=self.http_request_uri,
                path=request.path,
                params=request.params,
                headers=dict(request.headers),
                protocols=list(request.protocols),
            )
        )
        if server.deny is not None:
            raise ConnectionDeny(server.deny)
        for offered in request.protocols:
            if not offered.startswith("auth."):
                return str(offered)
        return None

    def onOpen(self) -> None:
        """Remember the open connection so a test can act on it."""
        self.factory.server.opened.append(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Echo the message with its frame type."""
        self.sendMessage(payload, isBinary)


@dataclass
class EchoServer(Server):
    """An echo server: the upgrades it recorded, and the HTTP status it denies them with (None: accept)."""

    requests: list[Recorded] = field(default_factory=list)
    deny: int | None = None


class Harness(ClientHarness):
    """Echo and raw servers and client connections, torn down after the test."""

    def echo_server(self, deny: int | None = None) -> EchoServer:
        """An Autobahn echo server."""
        return self.websocket_server(EchoServer(self.reactor, deny=deny), EchoProtocol)


harness = harness_fixture(Harness)


# -- URL and token placement ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_query_carries_role_and_encoded_ids(harness: Harness) -> None:
    """The upgrade URL is the /ws path with role, workspaceId and runtimeTargetId, each URL-encoded."""
    server = harness.echo_server()
    await harness.connect(
        server.url,
        role="workspace-daemon",
        workspace_id="ws 1/ä:x",
        runtime_target_id="rt&x=1?",
        extra_query={"clientVersion": "1.2"},
    )
    [req] = server.requests
    assert req.path == "/ws"
    assert req.uri == (
        "/ws?role=workspace-daemon&workspaceId=ws%201%2F%C3%A4%3Ax"
        "&runtimeTargetId=rt%26x%3D1%3F&clientVersion=1.2"
    )
    assert req.params == {
        "role": ["workspace-daemon"],
        "workspaceId": ["ws 1/ä:x"],
        "runtimeTargetId": ["rt&x=1?"],
        "clientVersion": ["1.2"],
    }


@pytest_twisted.ensureDeferred
async def test_runtime_target_omitted_when_none(harness: Harness) -> None:
    """Without a runtime target the query has no runtimeTargetId parameter at all."""
    server = harness.echo_server()
    conn = await harness.connect(server.url)
    assert server.requests[0].uri == "/ws?role=client&workspaceId=ws-1"
    assert conn.url == server.url + "?role=client&workspaceId=ws-1"


def test_build_url_appends_to_an_existing_query() -> None:
    """A base URL that already has a query gets the relay parameters appended with '&'."""
    url = build_url("ws://h/ws?x=1", role="client", workspace_id="w", token="t t")
    assert url == "ws://h/ws?x=1&role=client&workspaceId=w&token=t%20t"


@pytest_twisted.ensureDeferred
async def test_token_via_header(harness: Harness) -> None:
    """The default sends the token as a Bearer Authorization header and offers no subprotocol."""
    server = harness.echo_server()
    conn = await harness.connect(server.url)
    [req] = server.requests
    assert req.headers["authorization"] == f"Bearer {TOKEN}"
    assert req.protocols == []
    assert "token" not in req.params
    assert conn.subprotocol is None


@pytest_twisted.ensureDeferred
async def test_token_via_subprotocol(harness: Harness) -> None:
    """Browser style offers [subprotocol, auth.<token>] and the connection reports the selected one."""
    server = harness.echo_server()
    conn = await harness.connect(server.url, token_via="subprotocol")
    [req] = server.requests
    assert req.protocols == ["viewport-relay-v1", f"auth.{TOKEN}"]
    assert "authorization" not in req.headers
    assert "token" not in req.params
    assert conn.subprotocol == "viewport-relay-v1"


@pytest_twisted.ensureDeferred
async def test_token_via_subprotocol_custom_name(harness: Harness) -> None:
    """The plain subprotocol name offered first is configurable."""
    server = harness.echo_server()
    conn = await harness.connect(server.url, token_via="subprotocol", subprotocol="other-v2")
    assert server.requests[0].protocols == ["other-v2", f"auth.{TOKEN}"]
    assert conn.subprotocol == "other-v2"


@pytest_twisted.ensureDeferred
async def test_token_via_query(harness: Harness) -> None:
    """Dev style sends the token as the last query parameter, with no header and no subprotocol."""
    server = harness.echo_server()
    await harness.connect(server.url, token_via="query")
    [req] = server.requests
    assert req.uri == f"/ws?role=client&workspaceId=ws-1&token={TOKEN}"
    assert "authorization" not in req.headers
    assert req.protocols == []


def test_unknown_token_via_is_refused() -> None:
    """An unknown token placement is a programming error raised at once."""
    from twisted.internet import reactor

    with pytest.raises(ValueError):
        connect(
            reactor,
            "ws://127.0.0.1:1/ws",
            token=TOKEN,
            role="client",
            workspace_id="w",
            token_via="cookie",  # type: ignore[arg-type]
        )


@pytest_twisted.ensureDeferred
async def test_no_permessage_deflate_offered(harness: Harness) -> None:
    """The client never offers permessage-deflate."""
    server = harness.echo_server()
    await harness.connect(server.url)
    assert "sec-websocket-extensions" not in server.requests[0].headers


# -- messages ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_echo_text_json_and_binary(harness: Harness) -> None:
    """Text, compact JSON and binary messages round-trip, binary keeping its bytes and frame type."""
    server = harness.echo_server()
    conn = await harness.connect(server.url)
    assert conn.send_text("héllo")
    assert await conn.next_message() == "héllo"
    conn.send_json({"type": "ping", "n": [1, 2]})
    assert await conn.next_message() == '{"type":"ping","n":[1,2]}'
    conn.send_json({"a": 1})
    assert await conn.next_json() == {"a": 1}
    conn.send_binary(b"\x00\xffbin")
    frame = await conn.next_frame()
    assert (frame.payload, frame.is_binary) == (b"\x00\xffbin", True)


@pytest_twisted.ensureDeferred
async def test_next_json_rejects_non_objects(harness: Harness) -> None:
    """next_json fails on a JSON array and on NaN, which the relay would not accept either."""
    server = harness.echo_server()
    conn = await harness.connect(server.url)
    conn.send_text("[1]")
    assert isinstance(await failure_of(conn.next_json()), ValueError)
    conn.send_text('{"x": NaN}')
    assert isinstance(await failure_of(conn.next_json()), ValueError)


@pytest_twisted.ensureDeferred
async def test_waiters_are_served_in_arrival_order(harness: Harness) -> None:
    """Several outstanding next_message calls receive messages in the order they arrived."""
    server = harness.echo_server()
    conn = await harness.connect(server.url)
    waiting = [conn.next_message() for _ in range(3)]
    for text in ("one", "two", "three"):
        conn.send_text(text)
    assert [await d for d in waiting] == ["one", "two", "three"]


@pytest_twisted.ensureDeferred
async def test_messages_queued_before_close_stay_readable(harness: Harness) -> None:
    """Messages received before a close are kept in order, listed by pending_messages and still consumable."""
    server = harness.echo_server()
    conn = await harness.connect(server.url)
    [proto] = server.opened
    for text in ("a", "b", "c"):
        proto.sendMessage(text.encode())
    proto.sendClose(4008, "runtime scope only")
    info = await conn.closed
    assert info == CloseInfo(code=4008, reason="runtime scope only", was_clean=True)
    assert conn.pending_messages() == ["a", "b", "c"]
    assert [await conn.next_message() for _ in range(3)] == ["a", "b", "c"]
    assert conn.pending_messages() == []
    err = await failure_of(conn.next_message())
    assert isinstance(err, ConnectionClosed) and err.info.code == 4008


@pytest_twisted.ensureDeferred
async def test_next_message_timeout(harness: Harness) -> None:
    """next_message fails with MessageTimeout when nothing arrives, and a later message is not lost."""
    server = harness.echo_server()
    conn = await harness.connect(server.url)
    err = await failure_of(conn.next_message(timeout=0.05))
    assert isinstance(err, MessageTimeout) and isinstance(err, TimeoutError)
    conn.send_text("late")
    assert await conn.next_message() == "late"


@pytest_twisted.ensureDeferred
async def test_cancelled_wait_does_not_swallow_a_message(harness: Harness) -> None:
    """A cancelled next_message leaves the next message for the next caller."""
    server = harness.echo_server()
    conn = await harness.connect(server.url)
    d = conn.next_message(timeout=None)
    d.cancel()
    assert isinstance(await failure_of(d), CancelledError)
    conn.send_text("kept")
    assert await conn.next_message() == "kept"


@pytest_twisted.ensureDeferred
async def test_waiter_fails_when_connection_closes(harness: Harness) -> None:
    """A pending next_message fails with ConnectionClosed as soon as the socket closes."""
    server = harness.echo_server()
    conn = await harness.connect(server.url)
    d = conn.next_message(timeout=None)
    # Autobahn's sendClose refuses 1001; the relay's shutdown close uses the frame-level call too.
    server.opened[0].sendCloseFrame(code=1001, reasonUtf8=b"relay shutting down")
    err = await failure_of(d)
    assert isinstance(err, ConnectionClosed)
    assert err.info == CloseInfo(1001, "relay shutting down", True)


@pytest_twisted.ensureDeferred
async def test_paused_client_reads_nothing_until_resumed(harness: Harness) -> None:
    """pause_reading stops delivery (as for a slow client); resume_reading delivers what was held back."""
    server = harness.echo_server()
    conn = await harness.connect(server.url)
    conn.pause_reading()
    server.opened[0].sendMessage(b"held")
    assert isinstance(await failure_of(conn.next_message(timeout=0.2)), MessageTimeout)
    conn.resume_reading()
    assert await conn.next_message() == "held"


# -- closing -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_server_close_code_and_reason(harness: Harness) -> None:
    """A server close 4008 with a reason is reported as a clean close with that code and reason."""
    server = harness.echo_server()
    conn = await harness.connect(server.url)
    first, second = conn.closed, conn.closed
    server.opened[0].sendClose(4008, "buffer overflow")
    expected = CloseInfo(code=4008, reason="buffer overflow", was_clean=True)
    assert await first == expected
    assert await second == expected
    assert await conn.closed == expected
    assert conn.close_info == expected
    assert not conn.is_open
    assert conn.send_text("ignored") is False


@pytest_twisted.ensureDeferred
async def test_client_close(harness: Harness) -> None:
    """close() sends the code and reason and fires with the server's reply once the socket is gone."""
    server = harness.echo_server()
    conn = await harness.connect(server.url)
    info = await conn.close(4000, "bye")
    proto = server.opened[0]
    assert (proto.remoteCloseCode, proto.remoteCloseReason) == (4000, "bye")
    # Autobahn servers answer 1000 unless told to echo the code.
    assert info == CloseInfo(code=1000, reason=None, was_clean=True)


@pytest_twisted.ensureDeferred
async def test_abrupt_drop_is_1006(harness: Harness) -> None:
    """A TCP drop without a close frame is reported as an unclean 1006."""
    server = harness.echo_server()
    conn = await harness.connect(server.url)
    server.opened[0].transport.abortConnection()  # type: ignore[union-attr]
    info = await conn.closed
    assert info.code == 1006 and not info.was_clean


@pytest_twisted.ensureDeferred
async def test_max_message_bytes_drops_oversize(harness: Harness) -> None:
    """An incoming message over max_message_bytes makes the client drop the connection (reported as 1006)."""
    server = harness.echo_server()
    conn = await harness.connect(server.url, max_message_bytes=64)
    server.opened[0].sendMessage(b"x" * 64)
    assert await conn.next_message() == "x" * 64
    server.opened[0].sendMessage(b"x" * 65)
    info = await conn.closed
    assert info.code == 1006 and not info.was_clean
    assert info.reason is not None and "exceeds payload limit" in info.reason


# -- refused and failed upgrades -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connection_deny_429(harness: Harness) -> None:
    """An upgrade answered with HTTP 429 fails with UpgradeRefused(429)."""
    server = harness.echo_server(deny=429)
    err = await failure_of(harness.connect(server.url))
    assert isinstance(err, UpgradeRefused) and err.status == 429


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b"HTTP/1.1 503 Service Unavailable\r\n\r\n", 503),
        (b"HTTP/1.1 429 Too Many Requests\r\n\r\n", 429),
        (b"HTTP/1.1 401 Unauthorized\r\n", 401),
        (b"", None),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bare_refusals(harness: Harness, answer: bytes, status: int | None) -> None:
    """A bare status line then close (or a close with nothing written) fails with UpgradeRefused(status)."""
    server = harness.raw_server(answer)
    err = await failure_of(harness.connect(server.url))
    assert isinstance(err, UpgradeRefused) and err.status == status


@pytest_twisted.ensureDeferred
async def test_invalid_101_is_handshake_failed(harness: Harness) -> None:
    """A 101 without the WebSocket headers fails with HandshakeFailed, not UpgradeRefused."""
    server = harness.raw_server(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    err = await failure_of(harness.connect(server.url))
    assert isinstance(err, HandshakeFailed) and not isinstance(err, UpgradeRefused)


@pytest_twisted.ensureDeferred
async def test_library_refusal_with_body(harness: Harness) -> None:
    """A refusal with headers and a body (as WebSocket libraries write them) still yields its status."""
    server = harness.raw_server(
        b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/html\r\n"
        b"Content-Length: 22\r\n\r\nInvalid Upgrade header"
    )
    err = await failure_of(harness.connect(server.url))
    assert isinstance(err, UpgradeRefused) and err.status == 400


@pytest_twisted.ensureDeferred
async def test_open_timeout(harness: Harness) -> None:
    """A server that never answers the upgrade makes connect fail with OpenTimeout after open_timeout."""
    server = harness.raw_server(None)
    started = harness.reactor.seconds()
    err = await failure_of(harness.connect(server.url, open_timeout=0.3))
    assert isinstance(err, OpenTimeout) and isinstance(err, TimeoutError)
    assert 0.25 <= harness.reactor.seconds() - started < 3.0
    await server.lost[0]


@pytest_twisted.ensureDeferred
async def test_cancel_connect(harness: Harness) -> None:
    """Cancelling the connect Deferred fails it with CancelledError and drops the socket."""
    server = harness.raw_server(None)
    d = connect(harness.reactor, server.url, token=TOKEN, role="client", workspace_id="w")
    await server.accepted
    d.cancel()
    assert isinstance(await failure_of(d), CancelledError)
    await server.lost[0]


@pytest_twisted.ensureDeferred
async def test_connection_refused(harness: Harness) -> None:
    """A closed port fails with Twisted's ConnectionRefusedError."""
    port = harness.reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    d = connect(harness.reactor, f"ws://127.0.0.1:{number}/ws", token=TOKEN, role="client", workspace_id="w")
    assert isinstance(await failure_of(d), ConnectionRefusedError)


# -- pure helpers --------------------------------------------------------------------------------


def test_is_status() -> None:
    """is_status matches relay_status frames by code only."""
    frame = {"type": "relay_status", "code": "DAEMON_UNAVAILABLE", "retryable": True}
    assert is_status(frame, "DAEMON_UNAVAILABLE")
    assert not is_status(frame, "RELAY_REDIRECT")
    assert not is_status({"type": "other", "code": "DAEMON_UNAVAILABLE"}, "DAEMON_UNAVAILABLE")
    assert not is_status({}, "DAEMON_UNAVAILABLE")


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"HTTP/1.1 101 Switching Protocols\r\n", 101),
        (b"HTTP/1.0 404 Not Found\r\n\r\n", 404),
        (b"HTTP/1.1 429\r\n", 429),
        (b"HTTP/1.1 503 Service", None),
        (b"garbage\r\n", None),
        (b"", None),
    ],
)
def test_parse_status_line(data: bytes, status: int | None) -> None:
    """Only a complete HTTP status line yields a status code."""
    assert parse_status_line(data) == status
