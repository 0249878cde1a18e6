"""
The relay's own parser of common client frames (viewport/relay/wire_shortcuts.py) against Autobahn's.

Two server protocols over in-memory transports get the same byte stream, cut at the same random
places: one with Autobahn's ``dataReceived``, one with ``wire_shortcuts.receive``. Streams mix the
common frame (final, masked text, 7- or 16-bit length) with everything the fast path must leave to
Autobahn: pings, pongs, binary frames, fragments, oversize and 64-bit lengths, unmasked frames, RSV
bits, non-minimal lengths, reserved opcodes and closes. What each delivers (messages, in order) and
writes (pongs, close frames), and its state, must be the same.
"""

from __future__ import annotations

import os
import random
from typing import Any, List, Tuple

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from viewport.relay import wire_shortcuts

MAX_PAYLOAD = 2048


class LibraryParser(WebSocketServerProtocol):
    """Autobahn's parser, recording every message."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: List[Tuple[bytes, bool]] = []

    def onMessageEnd(self) -> None:
        wire_shortcuts.deliver_message(self, self.onMessage)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append((payload, isBinary))


class FastParser(LibraryParser):
    """The relay's parser in front of Autobahn's."""

    held_bytes = b""

    def dataReceived(self, data: bytes) -> None:
        wire_shortcuts.receive(self, data, MAX_PAYLOAD)


class ClosingFastParser(FastParser):
    """Closes the WebSocket on a message saying ``close``, as the router closes a peer mid-read."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        super().onMessage(payload, isBinary)
        if payload == b"close":
            self.sendCloseFrame(code=4008, reasonUtf8=b"policy", isReply=False)


class ClosingLibraryParser(LibraryParser):
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        super().onMessage(payload, isBinary)
        if payload == b"close":
            self.sendCloseFrame(code=4008, reasonUtf8=b"policy", isReply=False)


class _Producer:
    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def open_protocol(cls: type) -> Tuple[Any, StringTransport]:
    """A protocol of ``cls``, its handshake done, over a StringTransport, with the relay's options."""
    factory = WebSocketServerFactory()
    factory.setProtocolOptions(
        perMessageCompressionAccept=lambda _: None, autoPingInterval=0, utf8validateIncoming=False,
        maxFramePayloadSize=MAX_PAYLOAD, maxMessagePayloadSize=MAX_PAYLOAD, failByDrop=False,
    )
    protocol = cls()
    protocol.factory = factory
    transport = StringTransport()
    protocol.makeConnection(transport)
    # As the relay does on open (Autobahn unregisters it when it drops the connection).
    transport.registerProducer(_Producer(), True)
    protocol._connectionMade()
    protocol.state = WebSocketProtocol.STATE_OPEN
    protocol.websocket_version = 13
    protocol.websocket_protocol_in_use = None
    protocol.websocket_extensions_in_use = []
    protocol._perMessageCompress = None
    protocol.current_frame = None
    protocol.data = b""
    protocol.inside_message = False
    return protocol, transport


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0,
          length_form: str = "minimal") -> bytes:
    """One frame as a client writes it; ``length_form`` "16" or "64" forces a longer length encoding."""
    size = len(payload)
    head = bytes(((0x80 if fin else 0) | (rsv << 4) | opcode,))
    mask_bit = 0x80 if masked else 0
    if length_form == "64" or (length_form == "minimal" and size > 65535):
        head += bytes((mask_bit | 127,)) + size.to_bytes(8, "big")
    elif length_form == "16" or size >= 126:
        head += bytes((mask_bit | 126,)) + size.to_bytes(2, "big")
    else:
        head += bytes((mask_bit | size,))
    if not masked:
        return head + payload
    key = os.urandom(4)
    body = create_xor_masker(key, size).process(payload) if size else b""
    return head + key + body


def common(rng: random.Random) -> bytes:
    size = rng.choice([0, 1, 5, 125, 126, 127, 300, 1024, 1025, MAX_PAYLOAD, rng.randrange(0, MAX_PAYLOAD + 1)])
    return frame(0x1, bytes(rng.randrange(32, 127) for _ in range(size)))


def unusual(rng: random.Random) -> bytes:
    text = b"x" * rng.randrange(0, 40)
    kind = rng.randrange(11)
    if kind == 0:
        return frame(0x9, text)  # ping: Autobahn answers with a pong
    if kind == 1:
        return frame(0xA, text)
    if kind == 2:
        return frame(0x2, os.urandom(rng.randrange(0, 300)))
    if kind == 3:
        return frame(0x1, b"frag-", fin=False) + frame(0x9, b"p") + frame(0x0, b"ment")
    if kind == 4:
        return frame(0x1, b"y" * (MAX_PAYLOAD + 1))  # over the limit: Autobahn closes 1009
    if kind == 5:
        return frame(0x1, text, length_form="64")  # 64-bit length for a short frame: a violation
    if kind == 6:
        return frame(0x1, text, masked=False)  # unmasked client frame: a violation
    if kind == 7:
        return frame(0x1, text, rsv=1)
    if kind == 8:
        return frame(0x1, text, length_form="16")  # non-minimal 16-bit length: a violation
    if kind == 9:
        return frame(0x3, text)  # reserved data opcode
    return frame(0x8, (1000).to_bytes(2, "big") + b"bye")


def stream(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randrange(1, 40)):
        parts.append(common(rng) if rng.random() < 0.8 else unusual(rng))
    return b"".join(parts)


def chunks(data: bytes, rng: random.Random) -> List[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(0, 12)))) if len(data) > 1 else []
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def outcome(protocol: Any, transport: StringTransport) -> Tuple[Any, ...]:
    return (protocol.messages, transport.value(), protocol.state, transport.disconnecting)


class EquivalenceTests(SynchronousTestCase):
    """The fast path delivers and writes exactly what Autobahn does, for any stream and any cuts."""

    def check(self, data: bytes, pieces: List[bytes], fast_cls: type, library_cls: type) -> None:
        fast, fast_transport = open_protocol(fast_cls)
        library, library_transport = open_protocol(library_cls)
        for piece in pieces:
            fast.dataReceived(piece)
            library.dataReceived(piece)
        self.assertEqual(outcome(fast, fast_transport), outcome(library, library_transport),
                         f"stream {data[:80]!r}… cut into {len(pieces)} reads")

    def test_random_streams_and_cuts(self) -> None:
        for seed in range(600):
            rng = random.Random(seed)
            data = stream(rng)
            self.check(data, chunks(data, rng), FastParser, LibraryParser)

    def test_a_close_from_a_message_hands_the_rest_of_the_read_to_autobahn(self) -> None:
        for seed in range(200):
            rng = random.Random(seed)
            data = b"".join([stream(rng), frame(0x1, b"close"), stream(rng)])
            self.check(data, chunks(data, rng), ClosingFastParser, ClosingLibraryParser)

    def test_byte_by_byte(self) -> None:
        rng = random.Random(7)
        data = b"".join(common(rng) for _ in range(20)) + frame(0x9, b"ping") + common(rng)
        self.check(data, [data[i:i + 1] for i in range(len(data))], FastParser, LibraryParser)


class FastPathTests(SynchronousTestCase):
    """What the fast path takes, and that it leaves Autobahn's per-frame machinery out."""

    def test_common_frames_never_reach_autobahn(self) -> None:
        fed: List[bytes] = []
        protocol, _ = open_protocol(FastParser)
        protocol._dataReceived = fed.append
        payloads = [b"a", b"b" * 126, b"c" * MAX_PAYLOAD]
        data = b"".join(frame(0x1, payload) for payload in payloads)
        protocol.dataReceived(data[:10])
        protocol.dataReceived(data[10:])
        self.assertEqual(protocol.messages, [(payload, False) for payload in payloads])
        self.assertEqual(fed, [])

    def test_unmask_matches_autobahn_on_both_sides_of_the_integer_limit(self) -> None:
        for size in (0, 1, 3, 4, 5, 255, wire_shortcuts.INT_UNMASK_MAX, wire_shortcuts.INT_UNMASK_MAX + 1, 65535):
            payload, key = os.urandom(size), os.urandom(4)
            expected = create_xor_masker(key, size).process(payload) if size else b""
            self.assertEqual(wire_shortcuts.unmask(payload, key), expected, size)
