"""
The heartbeat over in-memory sockets (docs/protocol.md §7.3), driven by the service's own timer on the fake
clock: sockets pinged one slice per tenth of RELAY_PING_INTERVAL_MS, dropped when their pong misses its
deadline (RELAY_PONG_TIMEOUT_MS after that ping) or when idle at their visit.

With RELAY_PING_INTERVAL_MS=10000 a slice is one second; the timer ticks at 0, 1, 2, ... s, and the i-th
socket opened (at 0 s, after the first tick) sits in slice i % 10, so it is pinged at i % 10 s (10 s for
slice 0), then every 10 s.
"""

from __future__ import annotations

from typing import Dict, List, Set, Tuple

from twisted.trial.unittest import SynchronousTestCase

from tests.test_socket_layer import Link, RelayHarness, WsPeer, was_dropped

SLICES = 10


def heartbeat_env(pong_timeout_ms: int = 2000, idle_timeout_ms: int = 300000) -> Dict[str, str]:
    """A one-second slice, the given pong and idle timeouts."""
    return {
        "RELAY_PING_INTERVAL_MS": "10000",
        "RELAY_PONG_TIMEOUT_MS": str(pong_timeout_ms),
        "RELAY_IDLE_TIMEOUT_MS": str(idle_timeout_ms),
    }


class HeartbeatCase(SynchronousTestCase):
    """Clients of one scope, opened at 0 s in order (so the n-th lands in slice n % 10)."""

    harness: RelayHarness

    def clients(self, count: int) -> List[Tuple[WsPeer, Link]]:
        """``count`` clients of ``hb``/``rt1``, opened now, in order."""
        return [self.harness.open("client", "hb", "rt1", clientId=f"c{n}") for n in range(count)]

    def assertDropped(self, peer: WsPeer) -> None:
        """The relay dropped the socket without a closing handshake (the peer sees 1006)."""
        self.assertTrue(was_dropped(peer), peer.closed_with)


class SliceTests(HeartbeatCase):
    """Pings are spread over ten slices."""

    def test_each_slice_is_pinged_in_turn_once_per_interval(self) -> None:
        """Each one-second tick pings exactly the sockets of one slice; after two intervals each socket was pinged twice."""
        self.harness = RelayHarness(self, heartbeat_env())
        peers = [peer for peer, _ in self.clients(2 * SLICES)]
        for second in range(1, 2 * SLICES + 1):
            before = [peer.ping_count for peer in peers]
            self.harness.advance_to(float(second))
            pinged: Set[int] = {n for n, peer in enumerate(peers) if peer.ping_count > before[n]}
            self.assertEqual(pinged, {n for n in range(len(peers)) if n % SLICES == second % SLICES}, second)
        self.assertEqual([peer.ping_count for peer in peers], [2] * len(peers))
        self.assertTrue(all(peer.still_open for peer in peers))
        self.assertEqual(self.harness.count("relay_ws_stale_terminated_total"), 0)

    def test_a_socket_opened_later_joins_the_next_slice(self) -> None:
        """Slices are filled round robin: the eleventh socket shares slice 0 with the first, whenever it opens."""
        self.harness = RelayHarness(self, heartbeat_env())
        peers = [peer for peer, _ in self.clients(SLICES)]
        self.harness.advance_to(4.5)
        late, _ = self.harness.open("client", "hb", "rt1", clientId="late")
        self.harness.advance_to(9.999)
        self.assertEqual(late.ping_count, 0)
        self.harness.advance_to(10.0)
        self.assertEqual((late.ping_count, peers[0].ping_count), (1, 1))


class PongDeadlineTests(HeartbeatCase):
    """A ping's pong is due RELAY_PONG_TIMEOUT_MS after that ping."""

    def test_peer_that_does_not_pong_is_dropped_at_the_deadline(self) -> None:
        """A client that stopped reading, pinged at 1 s, is open at 2.999 s and dropped at 3 s; its neighbour stays."""
        self.harness = RelayHarness(self, heartbeat_env(pong_timeout_ms=2000))
        (healthy, _), (silent, silent_link) = self.clients(2)
        silent_link.relay_side.reading = False
        self.harness.advance_to(2.999)
        self.assertTrue(silent.still_open)
        self.harness.advance_to(3.0)
        self.assertDropped(silent)
        self.assertEqual(silent.ping_count, 0)
        self.assertEqual(self.harness.count("relay_ws_stale_terminated_total"), 1)
        self.assertEqual([event["reason"] for event in self.harness.logged("ws_terminated")], ["heartbeat timeout"])
        self.assertEqual(self.harness.open_sockets(), 1)
        self.harness.advance_to(13.0)
        self.assertTrue(healthy.still_open)
        self.assertEqual(healthy.ping_count, 1)
        self.assertEqual(self.harness.count("relay_ws_stale_terminated_total"), 1)

    def test_pong_arriving_before_the_deadline_keeps_the_socket(self) -> None:
        """The same client reading again at 2.5 s answers the ping in time and is pinged again next interval."""
        self.harness = RelayHarness(self, heartbeat_env(pong_timeout_ms=2000))
        _, (slow, slow_link) = self.clients(2)
        slow_link.relay_side.reading = False
        self.harness.advance_to(2.5)
        slow_link.relay_side.reading = True
        self.harness.flush()
        self.assertEqual(slow.ping_count, 1)
        self.harness.advance_to(11.0)
        self.assertTrue(slow.still_open)
        self.assertEqual(slow.ping_count, 2)
        self.assertEqual(self.harness.count("relay_ws_stale_terminated_total"), 0)

    def test_outstanding_ping_is_not_repeated_when_the_deadline_is_past_the_next_visit(self) -> None:
        """With a 15 s pong timeout and a 10 s interval the 20 s visit sends no second ping; the 25 s deadline holds."""
        self.harness = RelayHarness(self, heartbeat_env(pong_timeout_ms=15000))
        peers = self.clients(SLICES + 1)
        (late_reader, late_link), (never_reader, never_link) = peers[0], peers[SLICES]
        late_link.relay_side.reading = False
        never_link.relay_side.reading = False
        self.harness.advance_to(24.5)
        late_link.relay_side.reading = True
        self.harness.flush()
        self.assertEqual(late_reader.ping_count, 1)
        self.harness.advance_to(24.999)
        self.assertTrue(never_reader.still_open)
        self.harness.advance_to(25.0)
        self.assertDropped(never_reader)
        self.assertTrue(late_reader.still_open)
        self.assertEqual(self.harness.count("relay_ws_stale_terminated_total"), 1)


class IdleTests(HeartbeatCase):
    """No activity for RELAY_IDLE_TIMEOUT_MS: dropped at the socket's next visit."""

    def test_idle_peer_is_dropped_at_its_visit_and_pongs_count_as_activity(self) -> None:
        """A silent client (15 s idle limit, 30 s pong timeout) is pinged at 10 s, dropped as idle at 20 s; a ponging one stays."""
        self.harness = RelayHarness(self, heartbeat_env(pong_timeout_ms=30000, idle_timeout_ms=15000))
        (silent, silent_link), (healthy, _) = self.clients(2)
        silent_link.relay_side.reading = False
        self.harness.advance_to(19.999)
        self.assertTrue(silent.still_open)
        self.harness.advance_to(20.0)
        self.assertDropped(silent)
        self.assertEqual(self.harness.count("relay_ws_idle_terminated_total"), 1)
        self.assertEqual([event["reason"] for event in self.harness.logged("ws_terminated")], ["idle timeout"])
        self.harness.advance_to(41.0)
        self.assertTrue(healthy.still_open)
        self.assertEqual(healthy.ping_count, 5)
        self.assertEqual(self.harness.count("relay_ws_stale_terminated_total"), 0)
