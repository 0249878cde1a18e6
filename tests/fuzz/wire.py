"""The wire: client frames of any shape, and a client that writes whatever it is given and parses the answer."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def ws_frame(payload: bytes, opcode: int = OP_TEXT, *, fin: bool = True, rsv: int = 0, masked: bool = True,
             key: bytes = b"\x11\x22\x33\x44", length: Optional[int] = None) -> bytes:
    """One client frame; ``length`` overrides the advertised payload length (a lie)."""
    size = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)
    bit = 0x80 if masked else 0
    if size < 126:
        head = bytes((first, bit | size))
    elif size < 65536:
        head = bytes((first, bit | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first, bit | 127)) + size.to_bytes(8, "big")
    if not masked:
        return head + payload
    stream = (key * (len(payload) // 4 + 1))[: len(payload)]
    body = (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(len(payload), "little") if payload else b""
    return head + key + body


class RawPeer(Protocol):
    """
    A TCP client that writes bytes exactly as given and parses what comes back: the HTTP response
    head, then (after a 101) the relay's frames, answering pings and close frames itself.
    """

    def __init__(self, request: bytes = b"") -> None:
        self.request = request
        self.received = b""
        self.head: Optional[bytes] = None
        self.status: Optional[int] = None
        self.answered: Deferred[RawPeer] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.messages: List[Tuple[int, bytes]] = []
        self.close_code: Optional[int] = None
        self.close_reason = b""
        self.problems: List[str] = []
        self.on_message: Optional[Callable[[RawPeer, int, bytes], None]] = None
        self._buffer = bytearray()
        self._fragments: List[bytes] = []
        self._fragment_op = 0
        self._pongs: Dict[bytes, Deferred[bool]] = {}
        self._syncs = 0
        self.connected_at = 0.0
        self.ended_at = 0.0
        self.lost = False

    @property
    def is_open(self) -> bool:
        """True after a 101 until a close frame or the end of the connection."""
        return self.status == 101 and self.close_code is None and not self.lost

    def connectionMade(self) -> None:
        """Write the prepared request, if any."""
        self.connected_at = time.monotonic()
        if self.request:
            self.transport.write(self.request)  # type: ignore[union-attr]

    def write(self, data: bytes) -> None:
        """Write raw bytes while connected."""
        if not self.lost and self.transport is not None:
            self.transport.write(data)  # type: ignore[union-attr]

    def abort(self) -> None:
        """Drop the connection."""
        if self.transport is not None and not self.lost:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Settle everything that waits on this connection."""
        self.lost = True
        self.ended_at = time.monotonic()
        if not self.answered.called:
            self.answered.callback(self)
        for waiter in list(self._pongs.values()):
            if not waiter.called:
                waiter.callback(False)
        self._pongs.clear()
        self.ended.callback(None)

    def dataReceived(self, data: bytes) -> None:
        """The response head first, then frames."""
        if self.status != 101:
            self.received += data
            if self.head is None:
                end = self.received.find(b"\r\n\r\n")
                if end < 0:
                    return
                self.head = self.received[: end + 4]
                line = self.head.split(b"\r\n", 1)[0].split(b" ")
                self.status = int(line[1]) if len(line) > 1 and line[1].isdigit() else -1
                if not self.answered.called:
                    self.answered.callback(self)
                if self.status != 101:
                    return
                data = self.received[end + 4:]
            else:
                return
        self._buffer += data
        self._parse()

    def _parse(self) -> None:
        buf = self._buffer
        while len(buf) >= 2:
            first, second = buf[0], buf[1]
            if second & 0x80:
                self.problems.append("relay sent a masked frame")
            size, start = second & 0x7F, 2
            if size == 126:
                if len(buf) < 4:
                    return
                size, start = int.from_bytes(buf[2:4], "big"), 4
            elif size == 127:
                if len(buf) < 10:
                    return
                size, start = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < start + size:
                return
            payload = bytes(buf[start: start + size])
            del buf[: start + size]
            self._frame(first, payload)

    def _frame(self, first: int, payload: bytes) -> None:
        opcode, fin = first & 0x0F, bool(first & 0x80)
        if first & 0x70:
            self.problems.append(f"relay set RSV bits: {first:#x}")
        if opcode == OP_PING:
            self.write(ws_frame(payload, OP_PONG))
        elif opcode == OP_PONG:
            waiter = self._pongs.pop(payload, None)
            if waiter is not None and not waiter.called:
                waiter.callback(True)
        elif opcode == OP_CLOSE:
            if self.close_code is None:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.close_reason = payload[2:]
                self.write(ws_frame(payload[:2], OP_CLOSE))
            if self.transport is not None:
                self.transport.loseConnection()  # type: ignore[union-attr]
        elif opcode in (OP_TEXT, OP_BINARY, OP_CONT):
            if opcode != OP_CONT:
                self._fragment_op = opcode
            self._fragments.append(payload)
            if fin:
                message = b"".join(self._fragments)
                self._fragments = []
                self.messages.append((self._fragment_op, message))
                if self.on_message is not None:
                    self.on_message(self, self._fragment_op, message)
        else:
            self.problems.append(f"relay sent opcode {opcode:#x}")

    def sync(self, timeout: float = 5.0) -> "Deferred[str]":
        """Ping and wait for the pong: ``"open"``, ``"closed"`` (it ended first) or ``"timeout"``."""
        if not self.is_open:
            return succeed("closed")
        self._syncs += 1
        token = b"fzsync%d" % self._syncs
        waiter: Deferred[bool] = Deferred()
        self._pongs[token] = waiter
        self.write(ws_frame(token, OP_PING))

        def timed_out(failure: Failure) -> str:
            failure.trap(DeferredTimeout)
            return "timeout"

        waiter.addTimeout(timeout, reactor)
        return waiter.addCallbacks(lambda got: "open" if got else "closed", timed_out)  # type: ignore[return-value]

    @inlineCallbacks
    def close(self, timeout: float = 2.0) -> Any:
        """A normal closing handshake, then drop whatever is left."""
        if self.is_open:
            self.write(ws_frame(b"\x03\xe8", OP_CLOSE))
            try:
                yield self.ended.addTimeout(timeout, reactor)  # type: ignore[union-attr]
            except DeferredTimeout:
                pass
        self.abort()


@inlineCallbacks
def connect_raw(host: str, port: int, request: bytes = b"", timeout: float = 5.0) -> Any:
    """A connected ``RawPeer`` that has written ``request``."""
    peer = RawPeer(request)
    yield connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=timeout), peer)
    return peer


def build_head(target: str, headers: Sequence[Tuple[str, str]], *, request_line: Optional[str] = None,
               eol: str = "\r\n", key: Optional[str] = "dGhlIHNhbXBsZSBub25jZQ==", base: bool = True) -> bytes:
    """An upgrade head: the usual lines (unless ``base`` is false) plus ``headers``, in order."""
    lines = [request_line if request_line is not None else f"GET {target} HTTP/1.1"]
    if base:
        lines += ["Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13"]
        if key is not None:
            lines.append(f"Sec-WebSocket-Key: {key}")
    lines += [f"{name}: {value}" for name, value in headers]
    return (eol.join(lines) + eol + eol).encode("latin-1", "replace")


def ws_target(role: str, workspace: str, target: Optional[str], **extra: str) -> str:
    """``/ws?role=…&workspaceId=…[&runtimeTargetId=…]`` plus ``extra`` parameters."""
    query = f"role={quote(role)}&workspaceId={quote(workspace)}"
    if target is not None:
        query += f"&runtimeTargetId={quote(target)}"
    for name, value in extra.items():
        query += f"&{name}={quote(value, safe='')}"
    return f"/ws?{query}"
