"""
Orderly shutdown over in-memory sockets (docs/protocol.md §6, 1001): ``ListeningService.stopService`` as twistd
runs it on SIGTERM refuses upgrades, withdraws presence, closes every socket ``1001 "relay shutting down"``
and drops what is still open before the grace ends, all on the fake clock.
"""

from __future__ import annotations

import json
from typing import List, cast

from treq.testing import StubTreq
from twisted.internet.base import DelayedCall
from twisted.trial.unittest import SynchronousTestCase

from tests.support import CHANNEL
from tests.test_socket_layer import (
    HeldPlatform,
    RawPeer,
    RelayHarness,
    WsPeer,
    platform_admission,
    upgrade_head,
    was_dropped,
    ws_target,
)
from viewport.testing import RecordingBackplane

SHUTDOWN = (True, 1001, "relay shutting down")
#: A cross-relay configuration (its backplane is a RecordingBackplane: no Redis is reached).
CROSS_RELAY_ENV = {
    "RELAY_BACKPLANE_MODE": "redis",
    "RELAY_REDIS_URL": "redis://127.0.0.1:6379",
    "RELAY_BUS_HMAC_KEY": "h" * 32,
}


class ShutdownTests(SynchronousTestCase):
    """Every role is told; nobody who answers waits for the grace."""

    def everyone(self, harness: RelayHarness) -> List[WsPeer]:
        """A daemon, a runtime client, a session-events client and a worker of ``bye``."""
        return [
            harness.open("workspace-daemon", "bye", "rt1")[0],
            harness.open("client", "bye", "rt1")[0],
            harness.open("client", "bye", "rt1", scope="session-events", sessionChannels=[CHANNEL])[0],
            harness.open("worker", "bye", managedExecutorId="me1")[0],
        ]

    def test_every_socket_is_closed_1001_and_the_stop_does_not_wait_for_the_grace(self) -> None:
        """All four roles read close 1001 "relay shutting down"; the stop finishes at once, with no timer left."""
        harness = RelayHarness(self)
        peers = self.everyone(harness)
        harness.advance_to(3.0)
        stopped = harness.stop()
        harness.flush()
        self.assertEqual([peer.closed_with for peer in peers], [SHUTDOWN] * 4)
        self.successResultOf(stopped)
        self.assertEqual(harness.clock.seconds(), 3.0)
        self.assertEqual(harness.open_sockets(), 0)
        self.assertEqual(len(harness.logged("relay_stopped")), 1)
        # No timer outlives the stop (the last tick's pong check is cancelled with the sockets).
        pending = [cast(DelayedCall, call).func.__name__ for call in harness.clock.getDelayedCalls()]
        self.assertEqual(pending, [])

    def test_upgrade_on_a_socket_accepted_before_the_stop_is_503(self) -> None:
        """A socket accepted before the stop whose head arrives after it is refused with a bare 503; /ready says so."""
        harness = RelayHarness(self)
        late_upgrade, late_probe = RawPeer(), RawPeer()
        harness.accept(late_upgrade)
        harness.accept(late_probe)
        harness.flush()
        harness.stop()
        harness.flush()
        late_upgrade.send(upgrade_head(ws_target("client", "bye", "rt1"), "Authorization: Bearer ignored-token"))
        late_probe.send(b"GET /ready HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        harness.flush()
        self.assertEqual(late_upgrade.received, b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
        self.assertTrue(late_upgrade.lost)
        status, _, body = late_probe.http_response()
        self.assertEqual((status, json.loads(body)["reason"]), (503, "SHUTTING_DOWN"))

    def test_peer_that_never_answers_is_dropped_by_the_close_timeout_within_the_grace(self) -> None:
        """With the default 10 s grace a peer that does not read is dropped at Autobahn's 5 s close timeout; the stop ends."""
        harness = RelayHarness(self, grace_seconds=10.0)
        reader, _ = harness.open("client", "bye", "rt1")
        stuck, stuck_link = harness.open("workspace-daemon", "bye", "rt1")
        stuck_link.relay_side.reading = False
        stopped = harness.stop()
        harness.flush()
        self.assertEqual(reader.closed_with, SHUTDOWN)
        harness.advance_to(4.999)
        self.assertNoResult(stopped)
        self.assertIsNone(stuck.closed_with)
        harness.advance_to(5.0)
        self.assertTrue(was_dropped(stuck), stuck.closed_with)
        self.successResultOf(stopped)
        self.assertEqual(harness.open_sockets(), 0)

    def test_short_grace_drops_what_is_still_open_one_second_before_its_end(self) -> None:
        """With a 3 s grace the sockets get 2 s (1 s is kept for the backplane): the stuck one is dropped at 2 s."""
        harness = RelayHarness(self, grace_seconds=3.0)
        reader, _ = harness.open("client", "bye", "rt1")
        stuck, stuck_link = harness.open("client", "bye", "rt1", ip="10.0.0.8")
        stuck_link.relay_side.reading = False
        stopped = harness.stop()
        harness.flush()
        self.assertEqual(reader.closed_with, SHUTDOWN)
        harness.advance_to(1.999)
        self.assertNoResult(stopped)
        self.assertIsNone(stuck.closed_with)
        harness.advance_to(2.0)
        self.assertTrue(was_dropped(stuck), stuck.closed_with)
        self.successResultOf(stopped)
        self.assertLessEqual(harness.clock.seconds(), 3.0)

    def test_presence_is_withdrawn_before_the_daemons_socket_closes(self) -> None:
        """The "disconnected" presence is announced while the daemon is still connected, and only once."""
        backplane = RecordingBackplane("relay-a", cross_relay=True)
        harness = RelayHarness(self, CROSS_RELAY_ENV, backplane=backplane)
        daemon, _ = harness.open("workspace-daemon", "bye", "rt1", machineId="m1")
        harness.stop()
        self.assertIsNone(daemon.closed_with)
        self.assertEqual([(p.workspace_id, p.daemon_connected) for p in backplane.announcements],
                         [("bye", True), ("bye", False)])
        self.assertEqual([json.loads(frame.payload)["code"] for frame in backplane.published], ["DAEMON_UNAVAILABLE"])
        harness.flush()
        self.assertEqual(daemon.closed_with, SHUTDOWN)
        self.assertEqual(len(backplane.announcements), 2)
        self.assertFalse(backplane.running)


class AdmissionDuringShutdownTests(SynchronousTestCase):
    """An upgrade that passed the gate before the stop but is admitted after it."""

    def test_upgrade_admitted_after_the_stop_is_not_left_open(self) -> None:
        """
        The peer is refused rather than left open on a relay that has stopped (the drain was only checked
        on the request head once, so an admission answered after ``close_all`` opened a socket nobody closed).
        """
        platform = HeldPlatform()
        stub = StubTreq(platform)
        harness = RelayHarness(self, {"SERVER_URL": "http://platform.test"}, admission=platform_admission(stub),
                               secret=False)
        peer, _ = harness.connect("workspace-daemon", "bye", "rt1", bearer="tok-platform-daemon")
        stub.flush()
        self.assertEqual(len(platform.waiting), 1)
        stopped = harness.stop()
        harness.flush()
        self.successResultOf(stopped)
        platform.admit_all({"workspaceId": "bye", "runtimeTargetId": "rt1", "role": "workspace-daemon"})
        stub.flush()
        harness.flush()
        self.assertFalse(peer.still_open, "the relay stopped with an open, registered socket")
        self.assertEqual(harness.open_sockets(), 0)
