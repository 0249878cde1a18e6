"""Router: the claims checks of an upgraded socket, registration, daemon generations, eviction."""

from __future__ import annotations

from typing import Any, Optional

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.routing_support import (
    Harness,
    MACHINE,
    PUBLIC_URL,
    REDIS_ENV,
    RT,
    WS,
    e2ee,
    kex_init,
    pairing_offer,
    peer,
    subscribe,
)
from viewport.relay import frames
from viewport.relay.backplane.single import SingleBackplane
from viewport.relay.claims_check import check_connection_claims
from viewport.relay.interfaces import IBackplane, IPeer, Presence
from viewport.relay.registry import Connection
from viewport.relay.router import Router
from viewport.testing import FakePeer, RecordingBackplane
from viewport.tokens import Claims


class FakesTests(SynchronousTestCase):
    """The fakes used here provide the interfaces the router talks through."""

    def test_fake_peer_provides_ipeer(self) -> None:
        """FakePeer fully provides IPeer."""
        self.assertTrue(verifyObject(IPeer, FakePeer()))

    def test_recording_backplane_provides_ibackplane(self) -> None:
        """RecordingBackplane fully provides IBackplane."""
        self.assertTrue(verifyObject(IBackplane, RecordingBackplane()))

    def test_recording_backplane_resolves_announcements(self) -> None:
        """An announced daemon resolves until the same relay announces it gone."""
        bp = RecordingBackplane("r")
        up = Presence(WS, RT, "r", PUBLIC_URL, True, MACHINE)
        bp.announce_presence(up)
        self.assertIs(self.successResultOf(bp.resolve_presence(WS, RT)), up)
        bp.announce_presence(Presence(WS, RT, "r", PUBLIC_URL, False, MACHINE))
        self.assertIsNone(self.successResultOf(bp.resolve_presence(WS, RT)))

    def test_single_backplane_provides_ibackplane(self) -> None:
        """The single backplane fully provides IBackplane."""
        self.assertTrue(verifyObject(IBackplane, SingleBackplane("r")))


class CheckConnectionClaimsTests(SynchronousTestCase):
    """The claims-versus-query checks of docs/protocol.md §3.1, in order."""

    def check(self, role: str, query_rt: Optional[str], **claims: Any) -> tuple[Optional[str], Optional[str]]:
        """The effective target and the close reason (or None) for workspace ``ws1``."""
        target, rejection = check_connection_claims(role, WS, query_rt, Claims(**claims))
        return target, rejection.close_reason if rejection else None

    def test_missing_workspace(self) -> None:
        """Empty claims are refused for a missing workspace claim, before any other check."""
        self.assertEqual(self.check("client", RT), (None, "missing workspace claim"))

    def test_blank_workspace(self) -> None:
        """A workspace claim of spaces counts as missing."""
        self.assertEqual(self.check("workspace-daemon", RT, workspace_id="  "), (None, "missing workspace claim"))

    def test_workspace_trimmed(self) -> None:
        """The workspace claim is trimmed before the comparison."""
        self.assertEqual(self.check("workspace-daemon", RT, workspace_id=" ws1 ", runtime_target_id=RT), (RT, None))

    def test_workspace_mismatch_before_scope(self) -> None:
        """A different workspace is refused before the scope is looked at."""
        self.assertEqual(self.check("client", RT, workspace_id="other", scope="bogus"),
                         (None, "workspace claim mismatch"))

    def test_runtime_target_mismatch_before_scope(self) -> None:
        """A query target different from the claim is refused before the scope is looked at."""
        self.assertEqual(self.check("client", RT, workspace_id=WS, runtime_target_id="x", scope="bogus"),
                         (None, "runtime target claim mismatch"))

    def test_query_target_without_claim(self) -> None:
        """A query target with no target claim is a mismatch."""
        self.assertEqual(self.check("workspace-daemon", RT, workspace_id=WS), (None, "runtime target claim mismatch"))

    def test_runtime_target_trimmed(self) -> None:
        """The target claim is trimmed before the comparison and the trimmed value is effective."""
        self.assertEqual(self.check("workspace-daemon", RT, workspace_id=WS, runtime_target_id=" rt1 "), (RT, None))

    def test_invalid_scope_before_missing_target(self) -> None:
        """A client with an unknown scope is refused before the runtime target is required."""
        self.assertEqual(self.check("client", None, workspace_id=WS, scope="bogus"), (None, "invalid scope claim"))

    def test_client_without_scope(self) -> None:
        """A client without a scope claim is refused."""
        self.assertEqual(self.check("client", RT, workspace_id=WS, runtime_target_id=RT), (None, "invalid scope claim"))

    def test_missing_target_daemon(self) -> None:
        """A daemon without a runtime target is refused and told RUNTIME_TARGET_REQUIRED first."""
        target, rejection = check_connection_claims("workspace-daemon", WS, None, Claims(workspace_id=WS))
        assert rejection is not None
        self.assertEqual((target, rejection.close_reason, rejection.send_runtime_target_required),
                         (None, "missing runtime target claim", True))

    def test_missing_target_runtime_client(self) -> None:
        """A runtime client needs a runtime target."""
        self.assertEqual(self.check("client", None, workspace_id=WS, scope="runtime"),
                         (None, "missing runtime target claim"))

    def test_missing_target_session_events_client(self) -> None:
        """A session-events client needs a runtime target."""
        self.assertEqual(self.check("client", None, workspace_id=WS, scope="session-events"),
                         (None, "missing runtime target claim"))

    def test_pairing_client_without_target(self) -> None:
        """A pairing client may have no runtime target."""
        self.assertEqual(self.check("client", None, workspace_id=WS, scope="pairing"), (None, None))

    def test_worker_ignores_scope_and_target(self) -> None:
        """A worker needs neither a valid scope nor a runtime target."""
        self.assertEqual(self.check("worker", None, workspace_id=WS, scope="bogus"), (None, None))

    def test_target_from_claim(self) -> None:
        """Without a query target the claim supplies the effective runtime target."""
        self.assertEqual(self.check("client", None, workspace_id=WS, runtime_target_id=RT, scope="runtime"), (RT, None))


class AdmissionCloseTests(SynchronousTestCase):
    """Each docs/protocol.md §3.1 refusal closes 4008 with its reason, registers nothing and counts a rejection."""

    def setUp(self) -> None:
        self.h = Harness()

    def assertRefused(self, conn: Connection, reason: str) -> None:
        """Assert a 4008 close with ``reason`` and no registration side effect."""
        self.assertEqual(peer(conn).closes, [(4008, reason)])
        self.assertEqual((conn.registered, self.h.registry.ip_counts, self.h.registry.registered_connections),
                         (False, {}, 0))
        self.assertEqual(self.h.count("relay_ws_connections_rejected"), 1)
        self.assertEqual(self.h.backplane.announcements, [])

    def test_missing_workspace_claim(self) -> None:
        """No workspace claim closes 4008 ``missing workspace claim``."""
        conn = Connection(FakePeer(), "client", WS, "ip", Claims(scope="runtime"), 0)
        self.h.router.open_connection(conn, None, 0)
        self.assertRefused(conn, "missing workspace claim")

    def test_workspace_claim_mismatch(self) -> None:
        """A different workspace claim closes 4008 ``workspace claim mismatch``."""
        conn = Connection(FakePeer(), "client", WS, "ip", Claims(workspace_id="x", scope="runtime"), 0)
        self.h.router.open_connection(conn, None, 0)
        self.assertRefused(conn, "workspace claim mismatch")

    def test_runtime_target_claim_mismatch(self) -> None:
        """A different runtime target closes 4008 ``runtime target claim mismatch``."""
        self.assertRefused(self.h.daemon(query_rt="other"), "runtime target claim mismatch")

    def test_invalid_scope_claim(self) -> None:
        """A client with an unknown scope closes 4008 ``invalid scope claim``."""
        self.assertRefused(self.h.client(scope="admin"), "invalid scope claim")

    def test_missing_runtime_target_claim(self) -> None:
        """A daemon without a target gets RUNTIME_TARGET_REQUIRED, then 4008 ``missing runtime target claim``."""
        conn = self.h.daemon(rt=None)
        self.assertRefused(conn, "missing runtime target claim")
        self.assertEqual(peer(conn).history, ["text", "close"])
        self.assertEqual(peer(conn).texts, [frames.runtime_target_required(WS)])


class DaemonGenerationTests(SynchronousTestCase):
    """Daemon fencing by issue generation and the one-daemon-per-scope rule (docs/protocol.md §3.2)."""

    def setUp(self) -> None:
        self.h = Harness()

    def test_stale_generation_rejected(self) -> None:
        """A daemon with a lower generation than recorded closes 4008 ``stale daemon generation``."""
        self.h.close(self.h.daemon(daemon_issue_generation=5))
        stale = self.h.daemon(daemon_issue_generation=4)
        self.assertEqual(peer(stale).closes, [(4008, "stale daemon generation")])
        self.assertEqual((stale.registered, self.h.registry.ip_counts), (False, {}))
        self.assertEqual(self.h.count("relay_ws_connections_rejected"), 1)

    def test_equal_generation_allowed(self) -> None:
        """A daemon with the recorded generation is accepted."""
        self.h.close(self.h.daemon(daemon_issue_generation=5))
        again = self.h.daemon(daemon_issue_generation=5)
        self.assertEqual((again.registered, peer(again).closes), (True, []))

    def test_no_generation_keeps_record(self) -> None:
        """A daemon without a generation is accepted and leaves the recorded generation unchanged."""
        self.h.close(self.h.daemon(daemon_issue_generation=5))
        self.h.close(self.h.daemon())
        self.assertEqual(peer(self.h.daemon(daemon_issue_generation=4)).closes, [(4008, "stale daemon generation")])

    def test_higher_generation_recorded(self) -> None:
        """A newer generation replaces the record."""
        self.h.close(self.h.daemon(daemon_issue_generation=5))
        self.h.close(self.h.daemon(daemon_issue_generation=9))
        self.assertEqual(self.h.registry.get(WS, RT).daemon_issue_generation, 9)  # type: ignore[union-attr]

    def test_duplicate_open_daemon_rejected(self) -> None:
        """A second daemon while the first is open closes 4008 ``daemon already connected``, even if newer."""
        first = self.h.daemon(daemon_issue_generation=1)
        second = self.h.daemon(daemon_issue_generation=2, ip="10.0.0.2")
        self.assertEqual(peer(second).closes, [(4008, "daemon already connected")])
        scope = self.h.registry.get(WS, RT)
        assert scope is not None
        self.assertEqual((scope.daemon, scope.daemon_issue_generation), (first, 1))
        self.assertEqual(self.h.registry.ip_counts, {"10.0.0.1": 1})
        self.assertEqual(len(self.h.backplane.announcements), 1)

    def test_replaces_non_open_leftover(self) -> None:
        """A daemon whose predecessor's socket is no longer open replaces it."""
        old = self.h.daemon()
        peer(old).lose()
        new = self.h.daemon()
        self.assertIs(self.h.registry.get(WS, RT).daemon, new)  # type: ignore[union-attr]

    def test_stale_socket_close_changes_nothing(self) -> None:
        """The replaced socket closing later keeps the new daemon, its routes, and announces nothing."""
        old = self.h.daemon()
        peer(old).lose()
        new = self.h.daemon()
        client = self.h.client()
        self.h.key_exchange(client, new)
        announced = list(self.h.backplane.announcements)
        self.h.router.close_connection(old, 10)
        scope = self.h.registry.get(WS, RT)
        assert scope is not None
        self.assertEqual((scope.daemon, len(scope.session_owners)), (new, 1))
        self.assertEqual(self.h.backplane.announcements, announced)
        self.assertEqual(self.h.backplane.unwatch_calls, [])
        self.assertEqual(peer(client).texts, [])
        self.assertEqual(self.h.registry.ip_counts, {"10.0.0.1": 2})

    def test_connect_clears_kex_and_sessions_not_pairing(self) -> None:
        """A daemon (re)connecting forgets key exchange requests and session owners but keeps pairing requests."""
        scope = self.h.registry.get_or_create(WS, RT, 0)
        client = self.h.client()
        self.h.router.client_frame(client, kex_init("k1"), 0)
        pairing = self.h.client(scope="pairing", client_id="p")
        self.h.router.client_frame(pairing, pairing_offer("p1"), 0)
        self.h.daemon()
        self.assertEqual((len(scope.kex_requests), len(scope.pairing_requests)), (0, 1))


class RegistrationTests(SynchronousTestCase):
    """Side effects of registering and closing connections (docs/protocol.md §3)."""

    def setUp(self) -> None:
        self.h = Harness()

    def test_counts(self) -> None:
        """Daemons, clients and workers count per IP; only daemons and clients count as registered."""
        daemon, client = self.h.daemon(), self.h.client()
        worker = self.h.connect("worker", rt=None, managed_executor_id="e1")
        self.assertEqual((self.h.registry.ip_counts, self.h.registry.registered_connections), ({"10.0.0.1": 3}, 2))
        self.assertEqual(self.h.count("relay_ws_connections_opened"), 3)
        for conn in (daemon, client, worker):
            self.h.close(conn)
        self.assertEqual((self.h.registry.ip_counts, self.h.registry.registered_connections), ({}, 0))
        self.assertEqual(self.h.count("relay_ws_connections_closed"), 3)

    def test_gauges(self) -> None:
        """The connection and scope gauges follow registrations."""
        self.h.daemon()
        self.h.client()
        self.assertEqual((self.h.metrics.relay_connections_total._value.get(),
                          self.h.metrics.relay_workspaces_total._value.get()), (2, 1))

    def test_presence_on_connect(self) -> None:
        """A daemon's connection is announced with its workspace, target, machine and this relay."""
        self.h.daemon()
        self.assertEqual(self.h.backplane.announcements, [Presence(WS, RT, "relay-a", PUBLIC_URL, True, MACHINE)])

    def test_presence_sync_off_announces_nothing(self) -> None:
        """With RELAY_PRESENCE_SYNC_ENABLED=0 daemons come and go without a word to other relays."""
        h = Harness({**REDIS_ENV, "RELAY_PRESENCE_SYNC_ENABLED": "0"})
        h.close(h.daemon())
        self.assertEqual(h.backplane.announcements, [])

    def test_presence_on_disconnect(self) -> None:
        """The current daemon's disconnection is announced with the same machine."""
        self.h.close(self.h.daemon())
        self.assertEqual(self.h.backplane.announcements[1:], [Presence(WS, RT, "relay-a", PUBLIC_URL, False, MACHINE)])

    def test_withdraw_presence(self) -> None:
        """Withdrawing presence announces every local daemon as disconnected, with its machine."""
        self.h.daemon()
        self.h.daemon(rt="rt2", machine_id="m2")
        self.h.client(rt="rt3")
        self.h.backplane.announcements.clear()
        self.successResultOf(self.h.router.withdraw_presence())
        self.assertEqual(sorted(self.h.backplane.announcements, key=lambda p: str(p.runtime_target_id)), [
            Presence(WS, RT, "relay-a", PUBLIC_URL, False, MACHINE),
            Presence(WS, "rt2", "relay-a", PUBLIC_URL, False, "m2")])

    def test_client_announces_nothing(self) -> None:
        """Clients do not touch presence."""
        self.h.close(self.h.client())
        self.assertEqual(self.h.backplane.announcements, [])

    def test_watch_on_registration(self) -> None:
        """Registering a daemon watches the scope's daemon side, a client its clients side."""
        self.h.daemon()
        self.h.client()
        self.assertEqual(self.h.backplane.watch_calls, [(WS, RT, "daemon"), (WS, RT, "clients")])

    def test_unwatch_daemon_side(self) -> None:
        """The daemon side is unwatched when the current daemon leaves."""
        self.h.client()
        self.h.close(self.h.daemon())
        self.assertEqual(self.h.backplane.unwatch_calls, [(WS, RT, "daemon")])

    def test_unwatch_clients_side_after_last_client(self) -> None:
        """The clients side is unwatched only when the scope's last client leaves."""
        a, b = self.h.client(client_id="a"), self.h.client(client_id="b")
        self.h.close(a)
        self.assertEqual(self.h.backplane.unwatch_calls, [])
        self.h.close(b)
        self.assertEqual(self.h.backplane.unwatch_calls, [(WS, RT, "clients")])

    def test_worker_has_no_scope(self) -> None:
        """A worker is counted but joins no scope and watches nothing."""
        worker = self.h.connect("worker", rt=None, managed_executor_id="e1")
        self.assertEqual((worker.registered, worker.scope, self.h.backplane.watch_calls), (True, None, []))

    def test_client_cap(self) -> None:
        """The client cap counts only open clients of the scope and creates nothing."""
        h = Harness({"RELAY_MAX_CLIENTS_PER_WORKSPACE": "1"})
        self.assertFalse(h.router.client_cap_reached(WS, RT))
        self.assertEqual(h.registry.scopes, {})
        client = h.client()
        self.assertTrue(h.router.client_cap_reached(WS, RT))
        peer(client).lose()
        self.assertFalse(h.router.client_cap_reached(WS, RT))

    def test_frames_mark_activity(self) -> None:
        """Every inbound client, daemon or worker frame records the connection's activity time."""
        daemon, client = self.h.daemon(), self.h.client()
        worker = self.h.connect("worker", rt=None, managed_executor_id="e1")
        self.h.router.client_frame(client, b"junk", 11)
        self.h.router.daemon_frame(daemon, b"junk", 12)
        self.h.router.worker_frame(worker, b"junk", 13)
        self.assertEqual([c.last_activity_ms for c in (client, daemon, worker)], [11, 12, 13])

    def test_close_unregistered_is_noop(self) -> None:
        """Closing a refused connection changes no count."""
        refused = self.h.client(scope="bogus")
        self.h.router.close_connection(refused, 0)
        self.assertEqual(self.h.count("relay_ws_connections_closed"), 0)

    def test_client_close_forgets_its_state(self) -> None:
        """A closing client loses its requests, sessions and subscriptions; others keep theirs."""
        daemon = self.h.daemon()
        gone, stays = self.h.client(client_id="a"), self.h.client(client_id="b")
        viewer = self.h.client("session-events", client_id="v")
        self.h.key_exchange(gone, daemon, "k1", "s1")
        self.h.key_exchange(stays, daemon, "k2", "s2")
        self.h.router.client_frame(gone, kex_init("k3"), 0)
        self.h.router.client_frame(viewer, subscribe(), 0)
        scope = self.h.registry.get(WS, RT)
        assert scope is not None
        self.h.close(gone)
        self.h.close(viewer)
        self.assertEqual((len(scope.session_owners), len(scope.kex_requests), scope.subscribers), (1, 0, {}))
        self.assertEqual(list(scope.clients), [stays])


class EvictionTests(SynchronousTestCase):
    """Empty scope eviction (docs/protocol.md §7.5)."""

    def setUp(self) -> None:
        self.h = Harness({"RELAY_EMPTY_WORKSPACE_TTL_MS": "1000"})

    def test_evicted_after_ttl(self) -> None:
        """A scope empty since its last client left is evicted once the TTL has passed, not before."""
        self.h.close(self.h.client(), 500)
        self.h.router.evict_empty_scopes(1499)
        self.assertIsNotNone(self.h.registry.get(WS, RT))
        self.h.router.evict_empty_scopes(1500)
        self.assertIsNone(self.h.registry.get(WS, RT))
        self.assertEqual(self.h.count("relay_workspace_evictions"), 1)
        self.assertEqual(self.h.metrics.relay_workspaces_total._value.get(), 0)

    def test_daemon_scope_not_evicted(self) -> None:
        """A scope holding a daemon is never evicted."""
        self.h.daemon()
        self.h.router.evict_empty_scopes(10**9)
        self.assertIsNotNone(self.h.registry.get(WS, RT))

    def test_bus_frame_touches_scope(self) -> None:
        """A bus frame for an empty scope postpones its eviction."""
        self.h.close(self.h.client(), 0)
        self.h.bus(e2ee(), now=900)
        self.h.router.evict_empty_scopes(1000)
        self.assertIsNotNone(self.h.registry.get(WS, RT))

    def test_eviction_forgets_generation(self) -> None:
        """After eviction, a daemon with a lower generation than before is accepted."""
        self.h.close(self.h.daemon(daemon_issue_generation=5), 0)
        self.h.router.evict_empty_scopes(1000)
        self.assertTrue(self.h.daemon(daemon_issue_generation=1).registered)


class ScopeCollisionTests(SynchronousTestCase):
    """IDs containing ``:`` never make two scopes share state (docs/protocol.md §9, item 2)."""

    def test_pairing_client_does_not_reach_other_scope(self) -> None:
        """A pairing client of workspace ``a:b`` without target does not reach the daemon of ``a``/``b``."""
        h = Harness()
        daemon = h.daemon(ws="a", rt="b")
        pairing = h.client("pairing", ws="a:b", rt=None)
        h.router.client_frame(pairing, pairing_offer(), 0)
        self.assertEqual(peer(daemon).frames, [])
        self.assertEqual(peer(pairing).texts, [frames.runtime_target_required("a:b")])
        self.assertEqual(set(h.registry.scopes), {("a", "b"), ("a:b", None)})

    def test_two_daemons_with_colon_ids(self) -> None:
        """Daemons of ``a:b``/``c`` and ``a``/``b:c`` both register."""
        h = Harness()
        first, second = h.daemon(ws="a:b", rt="c"), h.daemon(ws="a", rt="b:c")
        self.assertEqual((first.registered, second.registered), (True, True))
