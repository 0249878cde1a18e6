"""The relay's hand-written frame writer (``RelayWebSocketProtocol.send_payload``, ``send_ping``) against Autobahn."""

from __future__ import annotations

from typing import Callable, Tuple

from twisted.trial.unittest import SynchronousTestCase

from tests.test_socket_layer import RelayHarness

#: Every branch of the length encoding and its edges: 7-bit, 16-bit (126..65535), 64-bit (65536 and up).
SIZES = (0, 1, 125, 126, 127, 65535, 65536, 65537, 200_000)


def payload_of(size: int) -> bytes:
    """``size`` bytes of digits in sequence, so a frame cut or shifted anywhere shows."""
    return bytes(48 + n % 10 for n in range(size))


class FrameWriterTests(SynchronousTestCase):
    """What the relay writes itself is byte for byte what Autobahn's ``sendMessage``/``sendPing`` would write."""

    def setUp(self) -> None:
        self.harness = RelayHarness(self)
        self.peer, self.link = self.harness.open("workspace-daemon", "frames", "rt1")
        self.protocol = self.link.relay_protocol
        self.assertFalse(self.protocol.send_queue)

    def written(self, write: Callable[[], object]) -> bytes:
        """The bytes one call puts on the socket (still unread by the peer)."""
        before = b"".join(self.link.relay_side.stream)
        write()
        after = b"".join(self.link.relay_side.stream)
        self.assertTrue(after.startswith(before))
        return after[len(before):]

    def both(self, payload: bytes) -> Tuple[bytes, bytes]:
        """The relay's frame for ``payload``, then Autobahn's, both left for the peer to read."""
        ours = self.written(lambda: self.protocol.send_payload(payload))
        autobahn = self.written(lambda: self.protocol.sendMessage(payload, isBinary=False))
        return ours, autobahn

    def test_text_frames_match_autobahn_for_every_length_encoding(self) -> None:
        """Payloads of 0, 125, 126, 65535, 65536 bytes (and neighbours) frame exactly as ``sendMessage`` frames them."""
        for size in SIZES:
            ours, autobahn = self.both(payload_of(size))
            self.assertEqual(ours, autobahn, f"{size}-byte payload")
            self.assertEqual(len(ours), size + (2 if size < 126 else 4 if size < 65536 else 10))
        self.harness.flush()
        self.assertEqual(self.peer.received, [payload_of(size) for size in SIZES for _ in range(2)])
        self.assertTrue(self.peer.still_open)

    def test_header_bytes_of_the_three_encodings(self) -> None:
        """FIN+text, then the length: 7 bits up to 125, 126 and 16 bits up to 65535, 127 and 64 bits from 65536."""
        expected = {
            0: b"\x81\x00",
            125: b"\x81\x7d",
            126: b"\x81\x7e\x00\x7e",
            65535: b"\x81\x7e\xff\xff",
            65536: b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00",
        }
        for size, header in expected.items():
            ours = self.written(lambda: self.protocol.send_payload(b"a" * size))
            self.assertEqual(ours[: len(header)], header, size)
            self.assertEqual(ours[len(header):], b"a" * size, size)

    def test_relay_originated_text_is_utf8_framed_like_autobahn(self) -> None:
        """``send_text`` frames the UTF-8 bytes (not the characters) of a non-ASCII text, as Autobahn does."""
        text = '{"message":"Grüße ✓"}' * 7
        ours = self.written(lambda: self.protocol.send_text(text))
        autobahn = self.written(lambda: self.protocol.sendMessage(text.encode("utf-8"), isBinary=False))
        self.assertEqual(ours, autobahn)
        self.harness.flush()
        self.assertEqual([message.decode("utf-8") for message in self.peer.received], [text, text])

    def test_heartbeat_ping_matches_autobahn(self) -> None:
        """``send_ping`` writes the empty ping ``sendPing()`` writes, and the peer answers it."""
        ours = self.written(self.protocol.send_ping)
        autobahn = self.written(self.protocol.sendPing)
        self.assertEqual(ours, b"\x89\x00")
        self.assertEqual(ours, autobahn)
        self.harness.flush()
        self.assertEqual(self.peer.ping_count, 2)

    def test_frames_queue_behind_autobahns_own_queue(self) -> None:
        """While Autobahn's send queue holds a frame, the relay hands its frame to Autobahn, so the order holds."""
        self.protocol.sendFrame(opcode=1, payload=b"first", chopsize=2)
        self.assertTrue(self.protocol.send_queue)
        self.protocol.send_payload(b"second")
        self.protocol.send_payload(b"x" * 70_000)
        for _ in range(20):
            self.harness.advance(0.001)
        self.assertFalse(self.protocol.send_queue)
        self.assertEqual(self.peer.received, [b"first", b"second", b"x" * 70_000])

    def test_nothing_is_written_once_the_socket_is_not_open(self) -> None:
        """After the relay's close frame, ``send_payload`` and ``send_text`` write nothing."""
        self.protocol.close(1000, "bye")
        self.assertEqual(self.written(lambda: self.protocol.send_payload(b"late")), b"")
        self.assertEqual(self.written(lambda: self.protocol.send_text("late")), b"")
        self.harness.flush()
        self.assertEqual(self.peer.received, [])
        self.assertEqual(self.peer.closed_with, (True, 1000, "bye"))

