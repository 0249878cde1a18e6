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

from typing import Any, Callable

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
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen  # type: ignore[no-any-return]
    except AttributeError:
        return TRANSPORT_PAUSE_THRESHOLD + queued_since_pause
