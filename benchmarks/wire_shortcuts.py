"""
The cost each shortcut of viewport/relay/wire_shortcuts.py saves: the library path and the shortcut,
per call, in this process over an in-memory transport (the two timed alternately, best of seven
rounds each). Prints numbers only.

    .venv/bin/python benchmarks/wire_shortcuts.py [--calls 100000]
"""

from __future__ import annotations

import argparse
import os
import sys
import timeit
from typing import Any, Callable, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol  # noqa: E402
from autobahn.websocket.protocol import WebSocketProtocol  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from viewport.relay import wire_shortcuts  # noqa: E402

ENVELOPE = b'{"type":"e2ee","sessionId":"s","payload":"' + b"x" * 200 + b'"}'


def masked_frame(payload: bytes) -> bytes:
    """One masked text frame as a browser sends it."""
    key = os.urandom(4)
    body = bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
    size = len(payload)
    head = bytes((0x81, 0x80 | size)) if size < 126 else bytes((0x81, 0x80 | 126)) + size.to_bytes(2, "big")
    return head + key + body


class LibraryPath(WebSocketServerProtocol):
    """Autobahn's own receive path (``dataReceived``, ``onMessageEnd``)."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        pass


class ShortcutPath(LibraryPath):
    """The relay's receive path: common frames parsed by ``wire_shortcuts.receive``, the rest as Autobahn does."""

    held_bytes = b""

    def dataReceived(self, data: bytes) -> None:
        wire_shortcuts.receive(self, data, 1 << 20)

    def onMessageEnd(self) -> None:
        wire_shortcuts.deliver_message(self, self.onMessage)


class FedPath(LibraryPath):
    """Autobahn's parser without its per-read debug event and per-message signal (``feed``, ``deliver_message``)."""

    def dataReceived(self, data: bytes) -> None:
        wire_shortcuts.feed(self, data)

    def onMessageEnd(self) -> None:
        wire_shortcuts.deliver_message(self, self.onMessage)


def open_protocol(cls: type) -> Tuple[Any, StringTransport]:
    """A protocol of ``cls`` in the open state over a StringTransport, with the relay's options."""
    factory = WebSocketServerFactory()
    factory.setProtocolOptions(perMessageCompressionAccept=lambda _: None, autoFragmentSize=0)
    protocol = cls()
    protocol.factory = factory
    transport = StringTransport()
    protocol.makeConnection(transport)
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


def paired_us(slow: Callable[[], Any], fast: Callable[[], Any], calls: int, rounds: int = 7) -> Tuple[float, float]:
    """
    Both paths timed alternately, ``rounds`` times each (so a busy moment of a shared machine hits
    both alike); the best round of each, in µs per call.
    """
    best_slow = best_fast = float("inf")
    for _ in range(rounds):
        best_slow = min(best_slow, timeit.timeit(slow, number=calls))
        best_fast = min(best_fast, timeit.timeit(fast, number=calls))
    return best_slow / calls * 1e6, best_fast / calls * 1e6


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=100000)
    calls = parser.parse_args(argv).calls
    frame = masked_frame(ENVELOPE)
    library, _ = open_protocol(LibraryPath)
    shortcut, _ = open_protocol(ShortcutPath)
    fed, _ = open_protocol(FedPath)
    burst = frame * 20
    sender, transport = open_protocol(LibraryPath)

    def send_library() -> None:
        sender.sendMessage(ENVELOPE, False)
        transport.clear()

    def send_shortcut() -> None:
        wire_shortcuts.write_text_frame(transport, ENVELOPE)
        transport.clear()

    def ping_library() -> None:
        sender.sendPing()
        transport.clear()

    def ping_shortcut() -> None:
        wire_shortcuts.write_empty_ping(transport)
        transport.clear()

    rows = [
        ("receive a 256 B frame: feed + deliver_message", lambda: library.dataReceived(frame), lambda: fed.dataReceived(frame)),
        ("receive a 256 B frame: receive", lambda: library.dataReceived(frame), lambda: shortcut.dataReceived(frame)),
        ("receive 20 × 256 B in one read: receive", lambda: library.dataReceived(burst),
         lambda: shortcut.dataReceived(burst)),
        ("send a 256 B text frame", send_library, send_shortcut),
        ("send an empty ping", ping_library, ping_shortcut),
    ]
    print("| path | library µs | shortcut µs | shortcut/library |\n|---|---|---|---|")
    for name, slow, fast in rows:
        slow_us, fast_us = paired_us(slow, fast, calls)
        print(f"| {name} | {slow_us:.2f} | {fast_us:.2f} | {fast_us / slow_us:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
