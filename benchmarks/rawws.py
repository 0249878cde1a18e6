"""
The load generator's side: a lean RFC 6455 client on plain Twisted, relay frames of exact sizes,
and the stdin/stdout command loop a generator process runs.

The client costs a few microseconds per message (no per-message Deferreds, prebuilt masked frames
sent as-is, a bytearray parser), so a single generator process can keep a relay core busy while the
relay's CPU per frame is what gets measured. Handshakes reuse ``viewport.client.handshake_for`` and
tokens ``viewport.tokens.mint_token``, so URLs and credentials match what the real clients send.
"""

from __future__ import annotations

import base64
import gc
import json
import os
import sys
import time
import traceback
from hashlib import sha1
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from benchmarks.harness import BENCH_SECRET
from viewport.client import handshake_for
from viewport.tokens import mint_token

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

Handler = Callable[["RawWebSocket", bytes], None]


def mask(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte masking ``key`` (as one big integer: fast for any size)."""
    size = len(payload)
    if not size:
        return b""
    stream = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(size, "little")


def client_frame(payload: bytes, opcode: int = OP_TEXT, key: Optional[bytes] = None) -> bytes:
    """One complete, masked client-to-server frame (FIN set) carrying ``payload``."""
    key = os.urandom(4) if key is None else key
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    elif size < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    return head + key + mask(payload, key)


def e2ee_envelope(session_id: str, size: int, seq: int = 1) -> bytes:
    """An e2ee v2 envelope whose whole JSON text is exactly ``size`` bytes (ciphertext padded)."""
    head = (
        '{"type":"e2ee","version":2,"profile":"noise-ik","sessionId":"%s","epoch":1,"seq":%d,'
        '"iv":"AAAAAAAAAAAAAAAA","tag":"AAAAAAAAAAAAAAAAAAAAAA==","ciphertext":"' % (session_id, seq)
    )
    tail = '"}'
    pad = size - len(head) - len(tail)
    if pad < 4:
        raise ValueError(f"an envelope for session {session_id!r} needs at least {len(head) + 6} bytes")
    ciphertext = base64.b64encode(os.urandom(pad))[:pad].decode("ascii")
    text = (head + ciphertext + tail).encode("ascii")
    assert len(text) == size
    return text


def kex_init(request_id: str) -> bytes:
    """A key exchange init v3 (what a browser sends to open a session)."""
    return json.dumps(
        {
            "type": "relay_key_exchange_init",
            "version": 3,
            "profile": "noise-ik",
            "requestId": request_id,
            "clientEphemeralPublicKey": base64.b64encode(os.urandom(32)).decode(),
            "encryptedClientStatic": base64.b64encode(os.urandom(48)).decode(),
        },
        separators=(",", ":"),
    ).encode()


def kex_response(request_id: str, session_id: str) -> bytes:
    """The daemon's key exchange response v3 naming the new session."""
    return json.dumps(
        {
            "type": "relay_key_exchange_response",
            "version": 3,
            "profile": "noise-ik",
            "requestId": request_id,
            "daemonPublicKey": base64.b64encode(os.urandom(32)).decode(),
            "daemonEphemeralPublicKey": base64.b64encode(os.urandom(32)).decode(),
            "encryptedMetadata": base64.b64encode(os.urandom(64)).decode(),
            "sessionId": session_id,
            "proof": base64.b64encode(os.urandom(32)).decode(),
            "epoch": 1,
        },
        separators=(",", ":"),
    ).encode()


def token(role: str, workspace_id: str, runtime_target_id: str, client_id: Optional[str] = None) -> str:
    """A relay token signed with the benchmark secret (each client its own clientId, so own rate buckets)."""
    claims: Dict[str, Any] = {"role": role, "workspaceId": workspace_id, "runtimeTargetId": runtime_target_id}
    if role == "client":
        claims["scope"] = "runtime"
        claims["clientId"] = client_id or f"client-{workspace_id}"
    return mint_token(key=BENCH_SECRET, algorithm="HS256", claims=claims, ttl_seconds=86400, now=time.time())


class HandshakeError(Exception):
    """The relay answered the upgrade with something other than 101, or closed first."""


class RawWebSocket(Protocol):
    """
    A minimal WebSocket client: one upgrade request, then server frames parsed from a bytearray.

    ``on_message(ws, payload)`` runs for every text/binary message; ``after_read(ws)`` (optional)
    once per socket read, after its messages, so a sender can refill a window with one write.
    Pings are answered; a close frame is recorded in ``close_code``/``close_reason``.
    """

    #: Called (with the socket) after every ping the relay sent was answered; one hook per process.
    on_ping: Optional[Callable[["RawWebSocket"], None]] = None

    def __init__(self, request: bytes, accept: bytes) -> None:
        self._request = request
        self._accept = accept
        self._buffer = bytearray()
        self._open = False
        self._fragments: List[bytes] = []
        self.opened: Deferred[RawWebSocket] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.on_message: Handler = lambda ws, payload: None
        self.after_read: Optional[Callable[["RawWebSocket"], None]] = None
        self.close_code: Optional[int] = None
        self.close_reason = ""
        self.started = 0.0
        self.handshake_seconds = 0.0
        self.tag: Any = None

    def connectionMade(self) -> None:
        """Send the upgrade request (no Nagle delay: latency is measured)."""
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        self.transport.write(self._request)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        """Fail a pending handshake; tell whoever waits for the end."""
        self._open = False
        if not self.opened.called:
            self.opened.errback(HandshakeError(f"connection lost during handshake: {reason.getErrorMessage()}"))
        if not self.lost.called:
            self.lost.callback(None)

    @property
    def is_open(self) -> bool:
        """True between the 101 response and the close."""
        return self._open

    def send(self, payload: bytes) -> None:
        """Mask and send one text message."""
        self.transport.write(client_frame(payload))  # type: ignore[union-attr]

    def write(self, frames: bytes) -> None:
        """Send prebuilt, already masked frames as they are."""
        self.transport.write(frames)  # type: ignore[union-attr]

    def abort(self) -> None:
        """Drop the TCP connection."""
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        """Complete the handshake, then parse every complete frame in the buffer."""
        buffer = self._buffer
        buffer += data
        if not self._open:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            status = head.split(b"\r\n", 1)[0]
            if not status.startswith(b"HTTP/1.1 101") or b": " + self._accept not in head:
                self.opened.errback(HandshakeError(status.decode("latin-1")))
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            self._open = True
            self.handshake_seconds = time.perf_counter() - self.started
            self.opened.callback(self)
        size = len(buffer)
        pos = 0
        on_message = self.on_message
        while size - pos >= 2:
            first = buffer[pos]
            length = buffer[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = (buffer[pos + 2] << 8) | buffer[pos + 3]
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > size:
                break
            opcode = first & 0x0F
            payload = bytes(buffer[start:end])
            pos = end
            if opcode == OP_TEXT or opcode == OP_BINARY or opcode == OP_CONT:
                if first & 0x80:
                    if self._fragments:
                        payload = b"".join(self._fragments) + payload
                        self._fragments = []
                    on_message(self, payload)
                else:
                    self._fragments.append(payload)
            elif opcode == OP_PING:
                self.transport.write(client_frame(payload, OP_PONG))  # type: ignore[union-attr]
                if RawWebSocket.on_ping is not None:
                    RawWebSocket.on_ping(self)
            elif opcode == OP_CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.close_reason = payload[2:].decode("utf-8", "replace")
                self._open = False
                self.transport.write(client_frame(payload[:2], OP_CLOSE))  # type: ignore[union-attr]
                self.transport.loseConnection()  # type: ignore[union-attr]
                break
        if pos:
            del buffer[:pos]
        if self.after_read is not None:
            self.after_read(self)


class _OneShotFactory(ClientFactory):
    """Hands out one prepared protocol and reports a failed TCP connect on its ``opened``."""

    noisy = False

    def __init__(self, protocol: RawWebSocket) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> RawWebSocket:
        """The prepared protocol."""
        return self.protocol_instance

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        """TCP failed before any protocol ran."""
        if not self.protocol_instance.opened.called:
            self.protocol_instance.opened.errback(reason)


def open_websocket(
    reactor: Any, base_url: str, *, token_text: str, role: str, workspace_id: str, runtime_target_id: str
) -> "Deferred[RawWebSocket]":
    """Connect and upgrade like ``viewport.client.connect`` (token in ``Authorization``); fire when OPEN."""
    handshake = handshake_for(
        base_url, token=token_text, role=role, workspace_id=workspace_id, runtime_target_id=runtime_target_id
    )
    split = urlsplit(handshake.url)
    host = split.hostname or "127.0.0.1"
    port = split.port or 80
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(sha1(key + _WS_GUID).digest())
    lines = [
        f"GET {split.path}?{split.query} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{name}: {value}" for name, value in handshake.headers.items()]
    if handshake.protocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(handshake.protocols))
    protocol = RawWebSocket(("\r\n".join(lines) + "\r\n\r\n").encode(), accept)
    protocol.started = time.perf_counter()
    reactor.connectTCP(host, port, _OneShotFactory(protocol), timeout=30)
    return protocol.opened


class Pair:
    """One workspace: its daemon and its client sockets, and the session the client holds."""

    def __init__(self, index: int, prefix: str) -> None:
        self.index = index
        self.workspace_id = f"{prefix}-w{index}"
        self.runtime_target_id = f"{prefix}-rt{index}"
        self.session_id = f"{prefix}-s{index}"
        self.daemon_token = token("workspace-daemon", self.workspace_id, self.runtime_target_id)
        self.client_token = token("client", self.workspace_id, self.runtime_target_id, f"{prefix}-c{index}")
        self.daemon: Optional[RawWebSocket] = None
        self.client: Optional[RawWebSocket] = None

    def open_daemon(self, reactor: Any, url: str) -> "Deferred[RawWebSocket]":
        """Connect the daemon socket."""
        d = open_websocket(
            reactor, url, token_text=self.daemon_token, role="workspace-daemon",
            workspace_id=self.workspace_id, runtime_target_id=self.runtime_target_id,
        )
        return d.addCallback(self._set, "daemon")

    def open_client(self, reactor: Any, url: str) -> "Deferred[RawWebSocket]":
        """Connect the client socket (after the daemon, so its frames have somewhere to go)."""
        d = open_websocket(
            reactor, url, token_text=self.client_token, role="client",
            workspace_id=self.workspace_id, runtime_target_id=self.runtime_target_id,
        )
        return d.addCallback(self._set, "client")

    def _set(self, ws: RawWebSocket, which: str) -> RawWebSocket:
        ws.tag = self
        setattr(self, which, ws)
        return ws

    def key_exchange(self) -> "Deferred[None]":
        """Client init → daemon → response with this pair's session id → client; fire when it arrived."""
        daemon, client = self.daemon, self.client
        assert daemon is not None and client is not None
        done: Deferred[None] = Deferred()
        request_id = f"kx-{self.index}"

        def daemon_got(ws: RawWebSocket, payload: bytes) -> None:
            frame = json.loads(payload)
            if frame.get("type") == "relay_key_exchange_init":
                ws.send(kex_response(frame["requestId"], self.session_id))

        def client_got(ws: RawWebSocket, payload: bytes) -> None:
            frame = json.loads(payload)
            if done.called:
                return
            if frame.get("type") == "relay_key_exchange_response" and frame.get("sessionId") == self.session_id:
                done.callback(None)
            else:
                done.errback(RuntimeError(f"unexpected frame during key exchange: {payload[:200]!r}"))

        daemon.on_message = daemon_got
        client.on_message = client_got
        client.send(kex_init(request_id))
        return done


def bounded(items: List[Any], concurrency: int, start: Callable[[Any], "Deferred[Any]"]) -> "Deferred[List[Any]]":
    """Run ``start(item)`` for every item with at most ``concurrency`` running; results in item order."""
    semaphore = defer.DeferredSemaphore(concurrency)
    return defer.gatherResults([semaphore.run(start, item) for item in items], consumeErrors=True)


class CommandLoop(LineReceiver):
    """Reads one JSON command per stdin line, calls ``handler.cmd_<name>(**args)``, writes one JSON answer."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 24

    def __init__(self, handler: Any, reactor: Any) -> None:
        self._handler = handler
        self._reactor = reactor
        self._queue: Deferred[None] = defer.succeed(None)

    def lineReceived(self, line: bytes) -> None:
        """Queue the command behind the previous one."""
        request = json.loads(line)
        self._queue.addCallback(lambda _: self._run(request))

    def _run(self, request: Dict[str, Any]) -> "Deferred[None]":
        # The generator runs with the cyclic GC off (a full pass over thousands of sockets stalls it
        # for 100+ ms, which would show up as relay latency); it collects only between commands.
        gc.collect()
        name = request.pop("command")
        if name == "quit":
            self._reply({"ok": True})
            self._reactor.callLater(0, self._reactor.stop)
            return defer.succeed(None)
        d = defer.maybeDeferred(getattr(self._handler, f"cmd_{name}"), **request)

        def failed(failure: Failure) -> Dict[str, Any]:
            traceback.print_exception(failure.value, file=sys.stderr)
            return {"error": f"{failure.type.__name__}: {failure.getErrorMessage()}"}

        d.addErrback(failed)
        d.addCallback(self._reply)
        return d

    def _reply(self, answer: Dict[str, Any]) -> None:
        self.transport.write(json.dumps(answer).encode() + b"\n")  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        """The measuring process went away: stop."""
        if self._reactor.running:
            self._reactor.stop()


def run_generator(handler_factory: Callable[[Any], Any], nofile: Optional[int] = None) -> None:
    """Run a generator process: the command loop on stdio until ``quit`` or end of input."""
    from twisted.internet import reactor, stdio

    gc.disable()
    if nofile is not None:
        from benchmarks.harness import raise_nofile

        raise_nofile(nofile)
    stdio.StandardIO(CommandLoop(handler_factory(reactor), reactor))
    reactor.run()  # type: ignore[attr-defined]


def elapsed_since(start: float) -> float:
    """Seconds on the performance counter since ``start``."""
    return time.perf_counter() - start


def summary_ms(samples: List[float]) -> Dict[str, float]:
    """p50/p99/max/mean of samples in seconds, as milliseconds."""
    from benchmarks.harness import percentile

    ordered = sorted(samples)
    if not ordered:
        return {"count": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan"), "mean_ms": float("nan")}
    return {
        "count": len(ordered),
        "p50_ms": percentile(ordered, 0.50) * 1000,
        "p99_ms": percentile(ordered, 0.99) * 1000,
        "max_ms": ordered[-1] * 1000,
        "mean_ms": sum(ordered) / len(ordered) * 1000,
    }


__all__: Tuple[str, ...] = (
    "RawWebSocket", "Pair", "CommandLoop", "bounded", "client_frame", "e2ee_envelope", "open_websocket",
    "run_generator", "summary_ms", "token",
)
