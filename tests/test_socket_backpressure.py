"""
Back-pressure over in-memory sockets (docs/protocol.md §7.2): a peer that stops reading is closed
``4008 "buffer overflow"`` once its transport paused the relay and holds more than RELAY_MAX_PENDING_BYTES,
and dropped one second later if it has not read the close by then.
"""

from __future__ import annotations

import json
from typing import List, Tuple, cast

from twisted.internet.base import DelayedCall
from twisted.trial.unittest import SynchronousTestCase

from tests.support import envelope, kex_init, kex_response
from tests.test_socket_layer import Link, RelayHarness, SocketBuffer, TlsLikeBuffer, WsPeer, was_dropped

LIMIT = 65536
PADDING = "x" * 32768


def padded_envelope(seq: int) -> str:
    """An E2EE envelope of session ``s1`` with 32 KiB of padding (forwarded as it is)."""
    return envelope("s1", seq)[:-1] + f',"pad":"{PADDING}"}}'


def frame_size(text: str) -> int:
    """The bytes of the text frame the relay writes for ``text`` (under 64 KiB: a 4-byte header)."""
    return 4 + len(text.encode("utf-8"))


class SlowPeerCase(SynchronousTestCase):
    """A daemon and a client of ``flood``/``rt1`` after a key exchange: the client owns session ``s1``."""

    def setUp(self) -> None:
        self.harness = RelayHarness(self, {"RELAY_MAX_PENDING_BYTES": str(LIMIT)})

    def pair(self, client_side: type = SocketBuffer) -> Tuple[WsPeer, Link, WsPeer, Link]:
        """The daemon and the client (the relay's end of its socket a ``client_side``) with ``s1`` set up."""
        daemon, daemon_link = self.harness.open("workspace-daemon", "flood", "rt1")
        client, client_link = self.harness.open("client", "flood", "rt1", ip="10.0.0.8", relay_side=client_side)
        client.send_text(kex_init("r1"))
        self.harness.flush()
        daemon.send_text(kex_response("r1", "s1"))
        self.harness.flush()
        self.assertEqual([m["type"] for m in client.json_messages()], ["relay_key_exchange_response"])
        client.received.clear()
        return daemon, daemon_link, client, client_link

    def flood(self, daemon: WsPeer, count: int) -> None:
        """The daemon sends ``count`` padded envelopes (seq 1, 2, ...) and the relay handles them."""
        for seq in range(1, count + 1):
            daemon.send_text(padded_envelope(seq))
            self.harness.flush()

    def seqs(self, peer: WsPeer) -> List[int]:
        """The ``seq`` of every envelope a peer received."""
        return [json.loads(m)["seq"] for m in peer.received]


class BufferOverflowTests(SlowPeerCase):
    """A client that stops reading while its daemon keeps sending."""

    def test_overflow_closes_4008_and_a_peer_that_catches_up_reads_the_backlog_first(self) -> None:
        """The frame finding over 64 KiB pending is dropped, the client closed 4008; reading in time, it gets 1–2, then the close."""
        daemon, _, client, client_link = self.pair()
        client_link.relay_side.reading = False
        self.flood(daemon, 3)
        pending = 2 * frame_size(padded_envelope(1))
        self.assertEqual(client_link.unsent, pending + len(b"\x88\x11\x0f\xa8buffer overflow"))
        self.assertEqual(self.harness.count("relay_ws_slow_client_terminated_total"), 1)
        [logged] = self.harness.logged("ws_slow_peer_closed")
        self.assertEqual(
            (logged["role"], logged["workspaceId"], logged["pendingBytes"], logged["limitBytes"]),
            ("client", "flood", pending, LIMIT),
        )
        self.harness.advance_to(0.5)
        client_link.relay_side.reading = True
        self.harness.flush()
        self.assertEqual(self.seqs(client), [1, 2])
        self.assertEqual(client.closed_with, (True, 4008, "buffer overflow"))
        self.assertTrue(daemon.still_open)
        self.assertEqual(self.harness.open_sockets(), 1)
        # The closed client's abort timer went with it.
        timers = [getattr(cast(DelayedCall, call).func, "__name__", "") for call in self.harness.clock.getDelayedCalls()]
        self.assertNotIn("_abort_if_connected", timers)
        self.harness.advance_to(1.5)
        self.assertTrue(daemon.still_open)

    def test_peer_that_never_reads_is_dropped_one_second_after_the_4008(self) -> None:
        """Still connected at 0.999 s, dropped at 1 s (not at the 5 s close timeout); it never sees the 4008."""
        daemon, _, client, client_link = self.pair()
        client_link.relay_side.reading = False
        self.flood(daemon, 3)
        closed_at = self.harness.clock.seconds()
        self.harness.advance_to(closed_at + 0.999)
        self.assertIsNone(client.closed_with)
        self.assertEqual(self.harness.open_sockets(), 2)
        self.harness.advance_to(closed_at + 1.0)
        self.assertTrue(was_dropped(client), client.closed_with)
        self.assertEqual(client.received, [])
        self.assertEqual(self.harness.open_sockets(), 1)
        self.assertEqual(self.harness.count("relay_ws_connections_closed_total"), 1)
        self.assertTrue(daemon.still_open)

    def test_frames_for_a_closing_peer_are_dropped_silently(self) -> None:
        """After the 4008 further frames for the client are not written, counted or logged again."""
        daemon, _, client, client_link = self.pair()
        client_link.relay_side.reading = False
        self.flood(daemon, 3)
        unsent = client_link.unsent
        for seq in (4, 5, 6):
            daemon.send_text(padded_envelope(seq))
            self.harness.flush()
        self.assertEqual(client_link.unsent, unsent)
        self.assertEqual(self.harness.count("relay_ws_slow_client_terminated_total"), 1)
        self.assertEqual(len(self.harness.logged("ws_slow_peer_closed")), 1)

    def test_peer_that_drains_before_the_limit_is_not_closed(self) -> None:
        """A pause alone closes nothing: once the client reads again the relay resumes and later frames flow."""
        daemon, _, client, client_link = self.pair()
        client_link.relay_side.reading = False
        self.flood(daemon, 2)
        self.assertTrue(client_link.relay_side.producer_paused)
        client_link.relay_side.reading = True
        self.harness.flush()
        self.assertFalse(client_link.relay_side.producer_paused)
        client_link.relay_side.reading = False
        self.flood(daemon, 2)
        client_link.relay_side.reading = True
        self.harness.flush()
        self.assertEqual(self.seqs(client), [1, 2, 1, 2])
        self.assertTrue(client.still_open)
        self.assertEqual(self.harness.count("relay_ws_slow_client_terminated_total"), 0)

    def test_without_tcp_buffer_sizes_the_relay_counts_what_it_queued_since_the_pause(self) -> None:
        """Over a transport hiding its buffer (TLS), pending is 64 KiB plus what was sent since the pause: frame 4 overflows."""
        daemon, _, client, client_link = self.pair(TlsLikeBuffer)
        client_link.relay_side.reading = False
        self.flood(daemon, 4)
        [logged] = self.harness.logged("ws_slow_peer_closed")
        # The estimate counts payloads, not frame headers.
        self.assertEqual(logged["pendingBytes"], LIMIT + len(padded_envelope(3).encode("utf-8")))
        client_link.relay_side.reading = True
        self.harness.flush()
        self.assertEqual(self.seqs(client), [1, 2, 3])
        self.assertEqual(client.closed_with, (True, 4008, "buffer overflow"))


class SlowDaemonTests(SlowPeerCase):
    """A daemon that stops reading is treated like any peer."""

    def test_daemon_that_stops_reading_is_closed_and_its_clients_told(self) -> None:
        """The daemon is closed 4008 and dropped a second later; its client then gets DAEMON_UNAVAILABLE."""
        daemon, daemon_link, client, _ = self.pair()
        daemon_link.relay_side.reading = False
        for seq in (1, 2, 3):
            client.send_text(padded_envelope(seq))
            self.harness.flush()
        [logged] = self.harness.logged("ws_slow_peer_closed")
        self.assertEqual((logged["role"], logged["workspaceId"]), ("workspace-daemon", "flood"))
        self.assertIsNone(daemon.closed_with)
        self.harness.advance(1.0)
        self.assertTrue(was_dropped(daemon), daemon.closed_with)
        [notice] = client.json_messages()
        self.assertEqual((notice["type"], notice["code"]), ("relay_status", "DAEMON_UNAVAILABLE"))
        self.assertTrue(client.still_open)
