"""Router: frames across relays (bus inbound, ordered remote forwarding, clients told when their path breaks)."""

from __future__ import annotations

import json
from typing import List, Optional

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from tests.routing_support import (
    B_URL,
    Harness,
    MINUTE,
    REDIS_ENV,
    RT,
    WS,
    e2ee,
    kex_init,
    kex_response,
    pairing_offer,
    pairing_response,
    peer,
    session_event,
    subscribe,
)
from viewport.relay import frames
from viewport.relay.interfaces import BusFrame, Presence
from viewport.relay.router import Router


class BusTests(SynchronousTestCase):
    """Frames from other relays (docs/protocol.md §10), with the reply path of §9 item 1 fixed."""

    def setUp(self) -> None:
        self.h = Harness()

    def test_client_to_daemon_forwarded(self) -> None:
        """A client frame from another relay reaches the local daemon verbatim."""
        daemon = self.h.daemon()
        payload = kex_init("k1")
        self.h.bus(payload)
        self.assertEqual(peer(daemon).payloads, [payload])
        self.assertEqual(self.h.count("relay_bus_frames_to_daemon"), 1)

    def test_client_to_daemon_without_daemon(self) -> None:
        """A client frame from the bus with no local daemon is dropped, counted, and the sender's relay is told."""
        self.h.bus(kex_init(), source="relay-b")
        self.assertEqual(self.h.count("relay_bus_frames_dropped"), 1)
        self.assertEqual(self.h.backplane.published, [
            BusFrame(WS, RT, "relay-a", "relay-b", "daemon_to_clients", frames.daemon_unavailable(WS, RT))])

    def test_daemon_gone_notice_makes_the_backplane_forget_that_relay(self) -> None:
        """A relay's notice that the scope's daemon left reaches the local clients and tells the backplane to forget its presence."""
        client = self.h.client()
        notice = frames.daemon_unavailable(WS, RT).encode("utf-8")
        self.h.bus(notice, "daemon_to_clients", source="relay-b")
        self.assertEqual(peer(client).payloads, [notice])
        self.assertEqual(self.h.backplane.forgotten, [(WS, RT, "relay-b")])
        self.h.bus(e2ee("s1"), "daemon_to_clients", source="relay-b")
        self.assertEqual(self.h.backplane.forgotten, [(WS, RT, "relay-b")], "only the notice says the daemon left")

    def test_kex_response_published_to_source_relay(self) -> None:
        """The daemon's answer to a remote key exchange is published back to the asking relay."""
        daemon = self.h.daemon()
        self.h.bus(kex_init("k1"), source="relay-b")
        response = kex_response("k1", "s1")
        self.h.router.daemon_frame(daemon, response, 1)
        self.assertEqual(self.h.backplane.published, [
            BusFrame(WS, RT, "relay-a", "relay-b", "daemon_to_clients", response.decode())])
        self.assertEqual(self.h.count("relay_key_exchange_response_routed_bus"), 1)

    def test_remote_session_frames_published(self) -> None:
        """Later session frames of a remote owner are published to its relay."""
        daemon = self.h.daemon()
        self.h.bus(kex_init("k1"), source="relay-b")
        self.h.router.daemon_frame(daemon, kex_response("k1", "s1"), 1)
        envelope = e2ee("s1")
        self.h.router.daemon_frame(daemon, envelope, 2)
        self.assertEqual(self.h.backplane.published[-1],
                         BusFrame(WS, RT, "relay-a", "relay-b", "daemon_to_clients", envelope.decode()))
        self.assertEqual(self.h.count("relay_session_frame_routed_bus"), 1)

    def test_pairing_response_published_to_source_relay(self) -> None:
        """The daemon's answer to a remote pairing request is published back to the asking relay."""
        daemon = self.h.daemon()
        self.h.bus(pairing_offer("r1"), source="relay-c")
        self.h.router.daemon_frame(daemon, pairing_response("r1"), 1)
        self.assertEqual([(f.target_relay_id, f.direction) for f in self.h.backplane.published],
                         [("relay-c", "daemon_to_clients")])

    def test_remote_session_kept_alive_by_bus_traffic(self) -> None:
        """Client frames arriving over the bus keep a remote owner's session alive like local ones."""
        daemon = self.h.daemon()
        self.h.bus(kex_init("k1"), now=0)
        self.h.router.daemon_frame(daemon, kex_response("k1", "s1"), 0)
        self.h.bus(e2ee("s1"), now=20 * MINUTE)
        self.h.router.daemon_frame(daemon, e2ee("s1"), 45 * MINUTE)
        self.assertEqual(len(self.h.backplane.published), 2)

    def test_daemon_to_clients_reaches_local_owner(self) -> None:
        """A daemon's answer over the bus reaches the local client that asked, and then its session frames."""
        self.h.backplane.presence[(WS, RT)] = Presence(WS, RT, "relay-b", B_URL, True)
        a, b = self.h.client(client_id="a"), self.h.client(client_id="b")
        self.h.router.client_frame(a, kex_init("k1"), 0)
        response, envelope = kex_response("k1", "s1"), e2ee("s1")
        self.h.bus(response, "daemon_to_clients", now=1)
        self.h.bus(envelope, "daemon_to_clients", now=2)
        self.assertEqual((peer(a).payloads, peer(b).frames), ([response, envelope], []))
        self.assertEqual(self.h.count("relay_bus_frames_to_clients"), 2)

    def test_daemon_to_clients_unknown_session(self) -> None:
        """A bus session frame for an unknown session reaches nobody and is not counted as delivered."""
        a = self.h.client()
        self.h.bus(e2ee("ghost"), "daemon_to_clients")
        self.assertEqual((peer(a).frames, self.h.count("relay_bus_frames_to_clients")), ([], 0))

    def test_missing_runtime_target_rejected(self) -> None:
        """A bus frame without a runtime target is rejected."""
        self.h.bus(kex_init(), rt="")
        self.assertEqual(self.h.count("relay_bus_frames_rejected"), 1)

    def test_invalid_client_payload_rejected(self) -> None:
        """A client_to_daemon bus frame that is no valid client frame is rejected, not forwarded."""
        daemon = self.h.daemon()
        for junk in (b"{", kex_response()):
            self.h.bus(junk)
        self.assertEqual((peer(daemon).frames, self.h.count("relay_bus_frames_rejected")), ([], 2))

    def test_invalid_daemon_payload_rejected(self) -> None:
        """A daemon_to_clients bus frame that is no valid daemon frame is rejected."""
        a = self.h.client()
        for junk in (b"[]", kex_init(), b'{"type":"ack"}'):
            self.h.bus(junk, "daemon_to_clients")
        self.assertEqual((peer(a).frames, self.h.count("relay_bus_frames_rejected")), ([], 3))

    def test_bus_daemon_limiter(self) -> None:
        """Bus daemon frames beyond the workspace's daemon bucket are dropped without closing anything."""
        h = Harness({"RELAY_DAEMON_RUNTIME_RATE_PER_MINUTE": "1"})
        viewer = h.client("session-events")
        h.router.client_frame(viewer, subscribe(), 0)
        h.bus(session_event(), "daemon_to_clients", now=1)
        h.bus(session_event(), "daemon_to_clients", now=2)
        self.assertEqual((len(peer(viewer).payloads), peer(viewer).closes), (1, []))
        self.assertEqual(h.count("relay_bus_frames_daemon_rate_limited"), 1)

    def test_bus_daemon_limiter_shared_with_local_daemon(self) -> None:
        """A local daemon's frames use up the bucket bus daemon frames of the workspace draw from."""
        h = Harness({"RELAY_DAEMON_RUNTIME_RATE_PER_MINUTE": "1"})
        h.key_exchange(h.client(), h.daemon())
        viewer = h.client("session-events", rt="rt2", client_id="v1")
        h.router.client_frame(viewer, subscribe(), 0)
        h.bus(session_event(), "daemon_to_clients", rt="rt2", now=1)
        self.assertEqual(h.count("relay_bus_frames_daemon_rate_limited"), 1)


class RemoteOrderingTests(SynchronousTestCase):
    """A client's frames for a daemon on another relay are published in the order they arrived."""

    def test_slow_presence_lookup_does_not_reorder(self) -> None:
        """The second frame waits for the first one's presence lookup, even if its own lookup is faster."""
        h = Harness({k: v for k, v in REDIS_ENV.items() if k != "RELAY_CLIENT_REDIRECT_ENABLED"})
        remote = Presence(WS, RT, "relay-b", B_URL, True)
        lookups: List[Deferred] = []

        def slow_resolve(workspace_id: str, runtime_target_id: Optional[str]) -> Deferred:
            d: Deferred = Deferred()
            lookups.append(d)
            return d

        conn = h.client()
        h.backplane.resolve_presence = slow_resolve  # type: ignore[method-assign]
        h.router.client_frame(conn, e2ee(seq=1), 0)
        h.router.client_frame(conn, e2ee(seq=2), 0)
        self.assertEqual(len(lookups), 1)
        lookups[0].callback(remote)
        self.assertEqual(len(lookups), 2)
        lookups[1].callback(remote)
        self.assertEqual([json.loads(f.payload)["seq"] for f in h.backplane.published], [1, 2])
        self.assertIsNone(conn.bus_queue)

    def _stalled_first_lookup(self, h: Harness) -> List[Deferred]:
        """The first presence lookup waits for the test; later ones answer at once from ``h.backplane.presence``."""
        lookups: List[Deferred] = []
        original = h.backplane.resolve_presence

        def resolve(workspace_id: str, runtime_target_id: Optional[str]) -> Deferred:
            if not lookups:
                d: Deferred = Deferred()
                lookups.append(d)
                return d
            return original(workspace_id, runtime_target_id)

        h.backplane.resolve_presence = resolve  # type: ignore[method-assign]
        return lookups

    def test_long_queue_answered_without_recursion(self) -> None:
        """Thousands of frames queued behind a slow lookup are each answered when lookups then answer at once."""
        env = {k: v for k, v in REDIS_ENV.items() if k != "RELAY_CLIENT_REDIRECT_ENABLED"}
        h = Harness({**env, "RELAY_RUNTIME_RATE_PER_MINUTE": "100000", "RELAY_RUNTIME_RATE_PER_MINUTE_WORKSPACE": "100000"})
        conn = h.client()
        lookups = self._stalled_first_lookup(h)
        for seq in range(1, 3002):
            h.router.client_frame(conn, e2ee(seq=seq), 0)
        lookups[0].callback(None)
        self.assertEqual(len(peer(conn).texts), 3001)
        self.assertIsNone(conn.bus_queue)

    def test_waiting_frames_go_to_a_daemon_that_connected_meanwhile(self) -> None:
        """Frames waiting for a remote route are delivered, in order, to a daemon that connected here meanwhile."""
        h = Harness({k: v for k, v in REDIS_ENV.items() if k != "RELAY_CLIENT_REDIRECT_ENABLED"})
        conn = h.client()
        lookups = self._stalled_first_lookup(h)
        h.router.client_frame(conn, e2ee(seq=1), 0)
        h.router.client_frame(conn, e2ee(seq=2), 0)
        daemon = h.daemon()
        h.router.client_frame(conn, e2ee(seq=3), 0)
        self.assertEqual(peer(daemon).payloads, [])
        lookups[0].callback(None)
        self.assertEqual([json.loads(p)["seq"] for p in peer(daemon).payloads], [1, 2, 3])
        self.assertEqual(peer(conn).texts, [])


class RemotePathTests(SynchronousTestCase):
    """Clients whose daemon is on another relay are told when their path breaks (issue: faults without silent loss)."""

    def setUp(self) -> None:
        self.h = Harness()
        self.h.backplane.presence[(WS, RT)] = Presence(WS, RT, "relay-b", B_URL, True)

    def test_lost_inbound_path_tells_clients_of_remote_daemons_once(self) -> None:
        """When the backplane loses its inbound path, clients with a remote daemon get DAEMON_UNAVAILABLE, once per outage."""
        remote = self.h.client(client_id="remote")
        local_daemon = self.h.daemon(rt="rt2")
        local = self.h.client(client_id="local", rt="rt2")
        self.h.router.path_changed(False, 1)
        self.h.router.path_changed(False, 2)
        self.assertEqual(peer(remote).texts, [frames.daemon_unavailable(WS, RT)])
        self.assertEqual((peer(local).texts, peer(local_daemon).texts), ([], []))
        self.h.router.path_changed(True, 3)
        self.h.router.path_changed(False, 4)
        self.assertEqual(len(peer(remote).texts), 2)

    def test_dead_relay_is_noticed_for_an_idle_client(self) -> None:
        """A client that never sent anything learns nothing, but the liveness check tells it when its daemon's relay died."""
        idle = self.h.client()
        self.assertEqual(self.h.registry.get(WS, RT).remote_daemon_relay, "relay-b")  # type: ignore[union-attr]
        self.h.router.check_remote_relays(1000)
        self.assertEqual(peer(idle).texts, [])
        self.h.backplane.dead.add("relay-b")
        self.h.router.check_remote_relays(2000)
        self.assertEqual(peer(idle).texts, [frames.daemon_unavailable(WS, RT)])
        self.h.router.check_remote_relays(3000)
        self.assertEqual(len(peer(idle).texts), 1)
        self.assertEqual((self.h.count("relay_remote_relay_dead"), self.h.backplane.presence), (1, {}))

    def test_a_daemon_moving_here_tells_clients_their_sessions_are_gone(self) -> None:
        """When the daemon of a scope whose clients used it on another relay connects here, those clients are told to re-key."""
        client = self.h.client()
        self.h.daemon()
        self.assertEqual(peer(client).texts, [frames.daemon_unavailable(WS, RT)])
        self.assertIsNone(self.h.registry.get(WS, RT).remote_daemon_relay)  # type: ignore[union-attr]

    def test_lost_daemon_frames_owe_the_remote_clients_a_notice(self) -> None:
        """A daemon frame for a session owned on relay-b that cannot be published is counted; relay-b's clients are told once it can."""
        del self.h.backplane.presence[(WS, RT)]
        daemon = self.h.daemon()
        self.h.bus(kex_init("k1"), source="relay-b")
        self.h.router.daemon_frame(daemon, kex_response("k1", "s1"), 1)
        self.h.backplane.publish_result = False
        self.h.router.daemon_frame(daemon, e2ee("s1"), 2)
        self.h.router.check_remote_relays(1000)
        self.assertEqual(self.h.count("relay_bus_daemon_frames_lost"), 1)
        self.h.backplane.publish_result = True
        self.h.backplane.published.clear()
        self.h.router.path_changed(False, 1500)
        self.h.router.path_changed(True, 2000)
        self.assertEqual(self.h.backplane.published, [
            BusFrame(WS, RT, "relay-a", "relay-b", "daemon_to_clients", frames.daemon_unavailable(WS, RT))])
        self.h.router.check_remote_relays(3000)
        self.assertEqual(len(self.h.backplane.published), 1)
        self.assertEqual(self.h.count("relay_bus_loss_notices_sent"), 1)

    def test_missed_daemon_frames_tell_the_local_clients_once_a_second(self) -> None:
        """Daemon frames from relay-b lost or reordered on the way: this relay's clients of the scope are told, at most once a second."""
        client = self.h.client()
        missed = BusFrame(WS, RT, "relay-b", "relay-a", "daemon_to_clients", e2ee("s1").decode("utf-8"))
        self.h.router.frames_missed(missed, 1000)
        self.h.router.frames_missed(missed, 1500)
        self.assertEqual(peer(client).texts, [frames.daemon_unavailable(WS, RT)])
        self.h.router.frames_missed(missed, 2100)
        self.assertEqual(len(peer(client).texts), 2)
        self.assertEqual(self.h.backplane.published, [])

    def test_missed_client_frames_owe_the_sending_relay_a_notice(self) -> None:
        """Client frames from relay-b lost or reordered on the way to our daemon: relay-b's clients are sent DAEMON_UNAVAILABLE."""
        del self.h.backplane.presence[(WS, RT)]
        daemon = self.h.daemon()
        missed = BusFrame(WS, RT, "relay-b", "relay-a", "client_to_daemon", e2ee("s1").decode("utf-8"))
        self.h.router.frames_missed(missed, 1000)
        self.h.router.frames_missed(missed, 1200)
        self.assertEqual(self.h.backplane.published, [
            BusFrame(WS, RT, "relay-a", "relay-b", "daemon_to_clients", frames.daemon_unavailable(WS, RT))])
        self.assertEqual(peer(daemon).texts, [])
        self.assertEqual(self.h.count("relay_bus_loss_notices_sent"), 1)
