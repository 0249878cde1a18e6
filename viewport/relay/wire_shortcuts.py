"""
Every place the relay reaches below Autobahn's and Twisted's public API, with the cost it saves.

The relay forwards small frames at high rates, and a few library paths cost more per frame than the
forwarding itself. Each shortcut here replaces one of them, keeps the library's behaviour for what the
relay uses, and is pinned by tests that compare it with the library's own output
(tests/test_frame_writer.py) or drive it through the real protocol over an in-memory transport
(tests/test_socket_*.py). They were measured with autobahn 26.11 and Twisted 26.10 (the dependency
ranges in setup.cfg stop before the next major of each) by ``benchmarks/wire_shortcuts.py``, which
times each library path and its shortcut alternately in one process (2026-12-03, two runs):

=================================  ==========  ========  =================
path                               library     shortcut  shortcut/library
=================================  ==========  ========  =================
receive a 256 B frame (``feed``,   19.5 µs     13.2 µs   0.65–0.68
``deliver_message``)
send a 256 B text frame            4.8 µs      0.6 µs    0.12–0.14
send an empty ping                 3.3 µs      0.3 µs    0.08
=================================  ==========  ========  =================

``pending_write_bytes`` saves nothing: no public API tells how much a TCP transport holds unsent.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.xormasker import create_xor_masker

#: Twisted pauses a registered producer once its TCP transport holds this much (``FileDescriptor.bufferSize``).
TRANSPORT_PAUSE_THRESHOLD = 64 * 1024


def feed(protocol: Any, data: bytes) -> None:
    """
    Hand received bytes to Autobahn's frame parser, skipping ``WebSocketAdapterProtocol.dataReceived``,
    which formats a debug log event (with ``hltype``/``hlval`` calls) for every read even when debug
    logging is off.
    """
    protocol._dataReceived(data)


def deliver_message(protocol: Any, on_message: Callable[[bytes, bool], None]) -> None:
    """
    The body of Autobahn's ``onMessageEnd`` without its ``fire("message", ...)``: that creates and
    resolves a Deferred per message for listeners the relay never registers. Call from ``onMessageEnd``.
    """
    if not protocol.failedByMe:
        on_message(b"".join(protocol.message_data), protocol.message_is_binary)
    protocol.message_data = None


def write_text_frame(transport: Any, payload: bytes) -> None:
    """
    Write one unmasked, final, uncompressed text frame: what ``sendMessage(payload, False)`` writes
    with the relay's options (no compression, no auto-fragmentation), without its generic option
    handling. Only when Autobahn's own send queue is empty (the caller checks ``send_queue``).
    """
    length = len(payload)
    if length < 126:
        transport.write(bytes((0x81, length)) + payload)
    elif length < 65536:
        transport.write(b"\x81\x7e" + length.to_bytes(2, "big") + payload)
    else:
        transport.writeSequence((b"\x81\x7f" + length.to_bytes(8, "big"), payload))


def write_empty_ping(transport: Any) -> None:
    """An empty ping frame, as ``sendPing()`` writes it (the heartbeat sends thousands per interval)."""
    transport.write(b"\x89\x00")


def pending_write_bytes(transport: Any, queued_since_pause: int) -> int:
    """
    Bytes a transport holds unsent: read from Twisted's TCP buffers (``dataBuffer``, ``offset``,
    ``_tempDataLen``) when it has them; else (TLS) the pause threshold plus what was queued since
    the transport paused its producer.
    """
    try:
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except AttributeError:
        return TRANSPORT_PAUSE_THRESHOLD + queued_since_pause


#: Up to this many bytes an integer XOR unmasks faster than Autobahn's masker (NVX, in C), whose
#: setup costs about 4 µs per frame; above it the masker is faster (benchmarks/wire_shortcuts.py).
INT_UNMASK_MAX = 1024
#: ``next_client_text_frame``'s answer when the frame is not the common case: the library parses it.
NEEDS_LIBRARY = -1
_STATE_OPEN = WebSocketProtocol.STATE_OPEN


def unmask(payload: bytes, key: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``key``, as RFC 6455 §5.3 unmasks a client frame."""
    size = len(payload)
    if size > INT_UNMASK_MAX:
        return create_xor_masker(key, size).process(payload)
    if not size:
        return b""
    mask = int.from_bytes((key * ((size + 3) >> 2))[:size], "little")
    return (int.from_bytes(payload, "little") ^ mask).to_bytes(size, "little")


def next_client_text_frame(data: bytes, offset: int, max_payload: int) -> Tuple[Optional[bytes], int]:
    """
    The frame at ``data[offset]`` when it is the common case: final, text, masked, no RSV bits, its length
    minimally encoded in 7 or 16 bits and at most ``max_payload``. Returns (its unmasked payload, the offset
    after it); ``(None, offset)`` when ``data`` ends before the frame does; ``(None, NEEDS_LIBRARY)`` for
    anything else (control frames, binary, fragments, protocol violations, 64-bit lengths, oversize frames),
    which Autobahn must parse, refuse or close for.
    """
    available = len(data) - offset
    if available < 2:
        return None, offset
    if data[offset] != 0x81 or data[offset + 1] < 0x80:
        return None, NEEDS_LIBRARY
    length = data[offset + 1] & 0x7F
    if length < 126:
        start = offset + 6
    elif length == 126:
        if available < 4:
            return None, offset
        length = (data[offset + 2] << 8) | data[offset + 3]
        if length < 126:
            return None, NEEDS_LIBRARY
        start = offset + 8
    else:
        return None, NEEDS_LIBRARY
    if length > max_payload:
        return None, NEEDS_LIBRARY
    end = start + length
    if end > len(data):
        return None, offset
    return unmask(data[start:end], data[start - 4:start]), end


def receive(protocol: Any, data: bytes, max_payload: int) -> None:
    """
    A server protocol's ``dataReceived``: the common client frames at the start of ``data`` (several per
    read, ``next_client_text_frame``) go straight to ``protocol.onMessage``, and everything from the first
    frame that is not the common case on goes to Autobahn. Autobahn's parser costs about 10 µs per small
    frame: it builds a frame header object and a masker, slices its buffer once per frame, and fires
    per-frame hooks the relay does not use. A frame that has only partly arrived waits in
    ``protocol.held_bytes`` for the next read.

    The fast path runs only while the WebSocket is open and Autobahn holds no part of a frame or of a
    fragmented message, so the two parsers never share one; once a message closes the WebSocket, the
    rest of the read is Autobahn's too.
    """
    held = protocol.held_bytes
    if held:
        data = held + data
        protocol.held_bytes = b""
    if (
        protocol.state != _STATE_OPEN
        or protocol.current_frame is not None
        or protocol.inside_message
        or protocol.data
    ):
        feed(protocol, data)
        return
    offset = 0
    while True:
        payload, after = next_client_text_frame(data, offset, max_payload)
        if payload is None:
            break
        offset = after
        protocol.onMessage(payload, False)
        if protocol.state != _STATE_OPEN:
            after = NEEDS_LIBRARY
            break
    if offset == len(data):
        return
    if after == NEEDS_LIBRARY:
        feed(protocol, data[offset:] if offset else data)
    else:
        protocol.held_bytes = data[offset:] if offset else data
