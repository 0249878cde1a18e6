"""Router: request and session ownership, responses to their owner only, rate limits."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from tests.routing_support import (
    Harness,
    MINUTE,
    RT,
    WS,
    e2ee,
    kex_init,
    kex_response,
    key_update,
    pairing_offer,
    pairing_response,
    peer,
    viewer_presence,
    worker_request,
)
from viewport.relay import frames
from viewport.relay.router import Router


class RoutingTests(SynchronousTestCase):
    """Request/response ownership and session-owned frames (docs/protocol.md §4.6)."""

    def setUp(self) -> None:
        self.h = Harness()
        self.daemon = self.h.daemon()
        self.a = self.h.client(client_id="a")
        self.b = self.h.client(client_id="b")

    def test_client_frame_forwarded_verbatim(self) -> None:
        """A client frame reaches the daemon byte for byte, extra fields and spacing included."""
        payload = b'{ "type":"e2ee","version":2,"profile":"noise-ik","sessionId":"x","epoch":1,"seq":1,' \
                  b'"iv":"i","tag":"t","ciphertext":"c","extra":[1, 2] }'
        self.h.router.client_frame(self.a, payload, 0)
        self.assertEqual(peer(self.daemon).payloads, [payload])
        self.assertEqual((self.h.count("relay_frames_client_to_daemon"),
                          self.h.count("relay_bytes_client_to_daemon")), (1, len(payload)))

    def test_kex_response_to_owner_only(self) -> None:
        """A key exchange response goes only to the client that asked, which then owns the session."""
        response = kex_response("k1", "s1")
        self.h.router.client_frame(self.a, kex_init("k1"), 0)
        self.h.router.daemon_frame(self.daemon, response, 1)
        self.assertEqual((peer(self.a).payloads, peer(self.b).frames), ([response], []))
        owner = self.h.registry.get(WS, RT).session_owners.get("s1", 2)  # type: ignore[union-attr]
        self.assertIs(owner.connection, self.a)  # type: ignore[union-attr]
        self.assertEqual(self.h.count("relay_key_exchange_response_routed_local"), 1)

    def test_reused_request_id_cannot_steal_a_key_exchange(self) -> None:
        """A second client reusing a live request id (even padded) gets INVALID_FRAME; the owner keeps the answer."""
        self.h.router.client_frame(self.a, kex_init("r1"), 0)
        self.h.router.client_frame(self.b, kex_init("r1"), 1)
        self.h.router.client_frame(self.b, kex_init(" r1 "), 2)
        self.assertEqual(len(peer(self.daemon).payloads), 1)
        self.assertEqual([json.loads(t)["code"] for t in peer(self.b).texts], ["INVALID_FRAME", "INVALID_FRAME"])
        response = kex_response("r1", "s1")
        self.h.router.daemon_frame(self.daemon, response, 3)
        self.assertEqual(peer(self.a).payloads, [response])
        self.h.router.daemon_frame(self.daemon, e2ee("s1"), 4)
        self.assertEqual(len(peer(self.a).payloads), 2)
        self.assertEqual(len(peer(self.b).payloads), 0)

    def test_request_id_is_free_again_once_its_owner_left(self) -> None:
        """After the owning connection closed, another client may use the same request id."""
        self.h.router.client_frame(self.a, kex_init("r1"), 0)
        self.h.close(self.a)
        self.h.router.client_frame(self.b, kex_init("r1"), 1)
        self.h.router.daemon_frame(self.daemon, kex_response("r1", "s1"), 2)
        self.assertEqual(len(peer(self.b).payloads), 1)

    def test_reused_session_id_is_refused(self) -> None:
        """Envelopes naming a session another live client owns are refused with INVALID_FRAME, not forwarded."""
        self.h.key_exchange(self.a, self.daemon, "r1", "s1")
        forwarded = len(peer(self.daemon).payloads)
        for padded in ("s1", " s1", "\ts1", "\u00a0s1"):
            self.h.router.client_frame(self.b, e2ee(padded), 1)
            self.assertEqual(len(peer(self.daemon).payloads), forwarded, padded)
            self.assertEqual(json.loads(peer(self.b).texts[-1])["code"], "INVALID_FRAME")
        self.h.router.client_frame(self.a, e2ee("s1"), 2)
        self.assertEqual(len(peer(self.daemon).payloads), forwarded + 1)

    def test_reused_pairing_request_id_is_refused(self) -> None:
        """A pairing request id owned by a live client cannot be taken over by another."""
        pa = self.h.client("pairing", client_id="pa")
        pb = self.h.client("pairing", client_id="pb")
        self.h.router.client_frame(pa, pairing_offer("p1"), 0)
        self.h.router.client_frame(pb, pairing_offer("p1"), 1)
        self.h.router.daemon_frame(self.daemon, pairing_response("p1"), 2)
        self.assertEqual((len(peer(pa).payloads), json.loads(peer(pb).texts[-1])["code"]), (1, "INVALID_FRAME"))

    def test_bus_frames_cannot_take_over_a_local_request(self) -> None:
        """A key exchange from another relay reusing a local client's live request id is rejected."""
        self.h.router.client_frame(self.a, kex_init("r1"), 0)
        self.h.bus(kex_init("r1"), source="relay-b", now=1)
        self.h.router.daemon_frame(self.daemon, kex_response("r1", "s1"), 2)
        self.assertEqual(len(peer(self.a).payloads), 1)
        self.assertEqual(self.h.count("relay_bus_frames_rejected"), 1)

    def test_kex_response_answered_once(self) -> None:
        """A second response to the same request finds no owner and is dropped."""
        self.h.router.client_frame(self.a, kex_init("k1"), 0)
        self.h.router.daemon_frame(self.daemon, kex_response("k1", "s1"), 1)
        self.h.router.daemon_frame(self.daemon, kex_response("k1", "s2"), 2)
        self.assertEqual(len(peer(self.a).payloads), 1)
        self.assertEqual(self.h.count("relay_key_exchange_response_dropped"), 1)

    def test_kex_response_unknown_request(self) -> None:
        """A response to an unknown request is dropped and creates no session."""
        self.h.router.daemon_frame(self.daemon, kex_response("nope", "s1"), 0)
        self.assertEqual((peer(self.a).frames, peer(self.b).frames), ([], []))
        self.assertEqual(len(self.h.registry.get(WS, RT).session_owners), 0)  # type: ignore[union-attr]

    def test_kex_request_expires(self) -> None:
        """A key exchange request is forgotten two minutes after it was made."""
        self.h.router.client_frame(self.a, kex_init("k1"), 0)
        self.h.router.daemon_frame(self.daemon, kex_response("k1", "s1"), 2 * MINUTE)
        self.assertEqual(peer(self.a).frames, [])

    def test_kex_init_with_empty_request_id_not_tracked(self) -> None:
        """A key exchange init with a blank requestId is forwarded without recording an owner."""
        self.h.router.client_frame(self.a, kex_init("  "), 0)
        self.assertEqual(len(peer(self.daemon).payloads), 1)
        self.assertEqual(len(self.h.registry.get(WS, RT).kex_requests), 0)  # type: ignore[union-attr]

    def test_session_frames_to_owner_only(self) -> None:
        """Daemon E2EE envelopes and key updates of a session go only to its owner."""
        self.h.key_exchange(self.a, self.daemon)
        envelope, update = e2ee("s1"), key_update("s1")
        self.h.router.daemon_frame(self.daemon, envelope, 1)
        self.h.router.daemon_frame(self.daemon, update, 2)
        self.assertEqual((peer(self.a).payloads[1:], peer(self.b).frames), ([envelope, update], []))
        self.assertEqual(self.h.count("relay_session_frame_routed_local"), 2)

    def test_unknown_session_dropped(self) -> None:
        """A daemon frame for an unknown session reaches nobody."""
        self.h.router.daemon_frame(self.daemon, e2ee("ghost"), 0)
        self.assertEqual((peer(self.a).frames, peer(self.b).frames), ([], []))
        self.assertEqual(self.h.count("relay_session_frame_dropped"), 1)

    def test_closed_owner_session_dropped(self) -> None:
        """After the owner leaves, its session's frames are dropped."""
        self.h.key_exchange(self.a, self.daemon)
        self.h.close(self.a)
        self.h.router.daemon_frame(self.daemon, e2ee("s1"), 1)
        self.assertEqual(peer(self.b).frames, [])
        self.assertEqual(self.h.count("relay_session_frame_dropped"), 1)

    def test_daemon_reconnect_forgets_sessions(self) -> None:
        """A reconnected daemon cannot reach sessions of its predecessor."""
        self.h.key_exchange(self.a, self.daemon)
        self.h.close(self.daemon)
        daemon = self.h.daemon()
        self.h.router.daemon_frame(daemon, e2ee("s1"), 1)
        self.assertEqual(len(peer(self.a).payloads), 1)

    def test_pairing_response_to_requester_only(self) -> None:
        """A pairing response goes only to the pairing client that asked."""
        p1, p2 = self.h.client("pairing", client_id="p1"), self.h.client("pairing", client_id="p2")
        self.h.router.client_frame(p1, pairing_offer("r1"), 0)
        self.h.router.client_frame(p2, pairing_offer("r2"), 0)
        response = pairing_response("r1")
        self.h.router.daemon_frame(self.daemon, response, 1)
        self.assertEqual((peer(p1).payloads, peer(p2).frames, peer(self.a).frames), ([response], [], []))
        self.assertEqual(self.h.count("relay_pairing_response_routed_local"), 1)

    def test_pairing_tracking_cap_evicts_oldest(self) -> None:
        """At the request tracking cap the oldest pairing request is forgotten first."""
        h = Harness({"RELAY_PAIRING_REQUEST_TRACK_MAX": "2"})
        daemon = h.daemon()
        clients = [h.client("pairing", client_id=f"p{n}") for n in range(3)]
        for n, conn in enumerate(clients):
            h.router.client_frame(conn, pairing_offer(f"r{n}"), n)
        for n in range(3):
            h.router.daemon_frame(daemon, pairing_response(f"r{n}"), 10)
        self.assertEqual([len(peer(c).payloads) for c in clients], [0, 1, 1])
        self.assertEqual(h.count("relay_pairing_response_dropped"), 1)

    def test_session_owner_cap(self) -> None:
        """At the session owner cap the oldest session is forgotten first."""
        h = Harness({"RELAY_SESSION_OWNER_TRACK_MAX": "2"})
        daemon, conn = h.daemon(), h.client()
        for n in range(3):
            h.key_exchange(conn, daemon, f"k{n}", f"s{n}", now=n)
        for n in range(3):
            h.router.daemon_frame(daemon, e2ee(f"s{n}"), 10)
        self.assertEqual([json.loads(p)["sessionId"] for p in peer(conn).payloads[3:]], ["s1", "s2"])

    def test_session_owner_expires_without_traffic(self) -> None:
        """A session with no traffic for 30 minutes is forgotten."""
        self.h.key_exchange(self.a, self.daemon, now=0)
        self.h.router.daemon_frame(self.daemon, e2ee("s1"), 30 * MINUTE)
        self.assertEqual(len(peer(self.a).payloads), 1)

    def test_session_owner_alive_just_before_expiry(self) -> None:
        """A session is still routed just under 30 minutes after its last traffic."""
        self.h.key_exchange(self.a, self.daemon, now=0)
        self.h.router.daemon_frame(self.daemon, e2ee("s1"), 30 * MINUTE - 1)
        self.assertEqual(len(peer(self.a).payloads), 2)

    def test_daemon_traffic_keeps_session(self) -> None:
        """Daemon traffic every 20 minutes keeps a session routed well past 30 minutes."""
        self.h.key_exchange(self.a, self.daemon, now=0)
        for minutes in (20, 40, 60):
            self.h.router.daemon_frame(self.daemon, e2ee("s1"), minutes * MINUTE)
        self.assertEqual(len(peer(self.a).payloads), 4)

    def test_client_traffic_keeps_session(self) -> None:
        """Client traffic alone keeps its session: a daemon frame 45 minutes in still arrives."""
        self.h.key_exchange(self.a, self.daemon, now=0)
        self.h.router.client_frame(self.a, e2ee("s1"), 20 * MINUTE)
        self.h.router.client_frame(self.a, e2ee("s1", seq=2), 40 * MINUTE)
        self.h.router.daemon_frame(self.daemon, e2ee("s1"), 45 * MINUTE)
        self.assertEqual(len(peer(self.a).payloads), 2)

    def test_other_client_traffic_does_not_keep_session(self) -> None:
        """Frames naming a session from a client that does not own it do not keep it alive."""
        self.h.key_exchange(self.a, self.daemon, now=0)
        self.h.router.client_frame(self.b, e2ee("s1"), 20 * MINUTE)
        self.h.router.daemon_frame(self.daemon, e2ee("s1"), 31 * MINUTE)
        self.assertEqual(len(peer(self.a).payloads), 1)

    def test_invalid_daemon_frame_dropped_silently(self) -> None:
        """An invalid daemon frame is counted and dropped, with no reply and no close."""
        for junk in (b"[]", b'{"type":"context-candidate-preview"}', kex_init()):
            self.h.router.daemon_frame(self.daemon, junk, 0)
        self.assertEqual((peer(self.daemon).history, peer(self.a).frames), ([], []))
        self.assertEqual(self.h.count("relay_frames_daemon_rejected"), 3)

    def test_daemon_frame_counters(self) -> None:
        """Valid daemon frames count toward daemon→clients frames and bytes, routed or not."""
        payload = e2ee("ghost")
        self.h.router.daemon_frame(self.daemon, payload, 0)
        self.assertEqual((self.h.count("relay_frames_daemon_to_clients"),
                          self.h.count("relay_bytes_daemon_to_clients")), (1, len(payload)))


class RateLimitTests(SynchronousTestCase):
    """The process-wide limiters (docs/protocol.md §7.1)."""

    def test_kex_fixed_window(self) -> None:
        """The key exchange window allows N inits until 60 s after the first, then refuses."""
        h = Harness({"RELAY_KEX_INIT_RATE_PER_MINUTE": "2"})
        conn = h.client()
        h.router.client_frame(conn, kex_init("k1"), 0)
        h.router.client_frame(conn, kex_init("k2"), 1000)
        h.router.client_frame(conn, kex_init("k3"), MINUTE - 1)
        self.assertEqual(peer(conn).closes, [(4008, "key exchange rate limit exceeded")])

    def test_kex_window_restarts(self) -> None:
        """60 s after the window started a new window begins."""
        h = Harness({"RELAY_KEX_INIT_RATE_PER_MINUTE": "2"})
        conn = h.client()
        for n, now in enumerate((0, 1000, MINUTE, MINUTE + 1)):
            h.router.client_frame(conn, kex_init(f"k{n}"), now)
        self.assertEqual(peer(conn).closes, [])

    def test_kex_limit_survives_reconnect(self) -> None:
        """A client reconnecting with the same identity and IP finds its window still used."""
        h = Harness({"RELAY_KEX_INIT_RATE_PER_MINUTE": "1"})
        first = h.client()
        h.router.client_frame(first, kex_init("k1"), 0)
        h.close(first, 1)
        second = h.client()
        h.router.client_frame(second, kex_init("k2"), 2)
        self.assertEqual(peer(second).closes, [(4008, "key exchange rate limit exceeded")])

    def test_kex_limit_keyed_by_ip(self) -> None:
        """The same client from another IP has its own window."""
        h = Harness({"RELAY_KEX_INIT_RATE_PER_MINUTE": "1"})
        h.router.client_frame(h.client(), kex_init("k1"), 0)
        other = h.client(ip="10.0.0.9")
        h.router.client_frame(other, kex_init("k2"), 1)
        self.assertEqual(peer(other).closes, [])

    def test_runtime_bucket_refills(self) -> None:
        """The per-client bucket refills continuously: one token after 30 s at 2 per minute."""
        h = Harness({"RELAY_RUNTIME_RATE_PER_MINUTE": "2"})
        first = h.client()
        h.router.client_frame(first, e2ee(), 0)
        h.router.client_frame(first, e2ee(), 0)
        h.close(first, 0)
        second = h.client()
        h.router.client_frame(second, e2ee(), MINUTE // 2 - 1)
        self.assertEqual(peer(second).closes, [(4008, "runtime rate limit exceeded")])
        third = h.client()
        h.router.client_frame(third, e2ee(), MINUTE // 2 + 10)
        self.assertEqual(peer(third).closes, [])

    def test_runtime_bucket_per_client(self) -> None:
        """Another clientId has its own per-client bucket."""
        h = Harness({"RELAY_RUNTIME_RATE_PER_MINUTE": "1"})
        h.router.client_frame(h.client(client_id="a"), e2ee(), 0)
        b = h.client(client_id="b")
        h.router.client_frame(b, e2ee(), 0)
        self.assertEqual(peer(b).closes, [])

    def test_runtime_workspace_bucket_aggregates(self) -> None:
        """The per-workspace bucket is shared by all clients of the workspace."""
        h = Harness({"RELAY_RUNTIME_RATE_PER_MINUTE_WORKSPACE": "3"})
        a, b = h.client(client_id="a"), h.client(client_id="b")
        for conn in (a, a, b):
            h.router.client_frame(conn, e2ee(), 0)
        h.router.client_frame(b, e2ee(), 0)
        self.assertEqual((peer(a).closes, peer(b).closes), ([], [(4008, "runtime rate limit exceeded")]))

    def test_refused_client_token_spares_workspace(self) -> None:
        """A frame refused by the per-client bucket does not use a workspace token."""
        h = Harness({"RELAY_RUNTIME_RATE_PER_MINUTE": "1", "RELAY_RUNTIME_RATE_PER_MINUTE_WORKSPACE": "2"})
        a = h.client(client_id="a")
        h.router.client_frame(a, e2ee(), 0)
        h.router.client_frame(a, e2ee(), 0)
        b = h.client(client_id="b")
        h.router.client_frame(b, e2ee(), 0)
        self.assertEqual(peer(b).closes, [])

    def test_presence_uses_runtime_buckets(self) -> None:
        """Viewer presence draws from the same per-client bucket as E2EE frames."""
        h = Harness({"RELAY_RUNTIME_RATE_PER_MINUTE": "1"})
        h.router.client_frame(h.client(client_id="same"), e2ee(), 0)
        viewer = h.client("session-events", client_id="same")
        h.router.client_frame(viewer, viewer_presence(), 1)
        self.assertEqual(peer(viewer).closes, [(4008, "presence rate limit exceeded")])

    def test_pairing_window(self) -> None:
        """Pairing requests share a fixed window per workspace, client and IP, across reconnects."""
        h = Harness({"RELAY_PAIRING_RATE_PER_MINUTE": "1"})
        first = h.client("pairing")
        h.router.client_frame(first, pairing_offer("r1"), 0)
        h.close(first)
        second = h.client("pairing")
        h.router.client_frame(second, pairing_offer("r2"), 1)
        self.assertEqual(peer(second).closes, [(4008, "pairing rate limit exceeded")])

    def test_daemon_bucket_shared_with_worker(self) -> None:
        """Daemon and worker frames of one workspace share the daemon bucket."""
        h = Harness({"RELAY_DAEMON_RUNTIME_RATE_PER_MINUTE": "2"})
        daemon, client = h.daemon(), h.client()
        h.key_exchange(client, daemon)
        h.router.daemon_frame(daemon, e2ee(), 0)
        worker = h.connect("worker", rt=None, managed_executor_id="e1")
        h.router.worker_frame(worker, worker_request("/api/runtime/workspaces/ws1/managed-executors/e1"), 0)
        self.assertEqual((peer(daemon).closes, peer(worker).closes), ([], [(4008, "worker rate limit exceeded")]))

    def test_daemon_bucket_survives_reconnect(self) -> None:
        """A reconnecting daemon finds the workspace bucket as its predecessor left it."""
        h = Harness({"RELAY_DAEMON_RUNTIME_RATE_PER_MINUTE": "1"})
        first, client = h.daemon(), h.client()
        h.key_exchange(client, first)
        h.close(first)
        second = h.daemon()
        h.key_exchange(client, second, "k2", "s2", now=1)
        self.assertEqual(h.count("relay_frames_daemon_rate_limited"), 1)
        self.assertEqual(len(peer(client).frames), 2)  # the first response and the first daemon's notice
