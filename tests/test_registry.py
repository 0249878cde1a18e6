"""Tests for the relay's per-scope state: Registry, ScopeState, TrackedOwners, Connection and Owner."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from viewport.relay.interfaces import IPeer
from viewport.relay.registry import (
    REQUEST_TTL_MS,
    SESSION_IDLE_TTL_MS,
    Connection,
    Owner,
    Registry,
    ScopeState,
    TrackedOwners,
)
from viewport.testing import FakePeer
from viewport.tokens import Claims

MINUTE_MS = 60_000


def connection(role: str = "client", client_id: str | None = "c1", now_ms: float = 0) -> Connection:
    """A connection over a fresh ``FakePeer``."""
    claims = Claims(workspace_id="ws", runtime_target_id="rt", client_id=client_id, machine_id="m1")
    return Connection(FakePeer(), role, "ws", "10.0.0.1", claims, now_ms)


def scope(now_ms: float = 0, requests: int = 8, sessions: int = 8) -> ScopeState:
    """A scope for workspace ``ws`` and runtime target ``rt``."""
    return ScopeState("ws", "rt", now_ms, requests, sessions)


class FakePeerTests(SynchronousTestCase):
    """The peer fake the registry and router tests rely on."""

    def test_provides_ipeer(self) -> None:
        """FakePeer fully provides IPeer."""
        self.assertTrue(verifyObject(IPeer, FakePeer()))

    def test_records_and_stops_after_close(self) -> None:
        """A closed FakePeer records the first close only and drops later frames."""
        peer = FakePeer()
        peer.send_text("a")
        peer.send_payload(b"b")
        peer.close(4008, "x")
        peer.close(1000, "y")
        peer.send_text("c")
        self.assertEqual(
            (peer.texts, peer.payloads, peer.frames, peer.closes, peer.history, peer.can_send()),
            (["a"], [b"b"], ["a", "b"], [(4008, "x")], ["text", "payload", "close"], False),
        )


class ConnectionTests(SynchronousTestCase):
    """Per-connection bookkeeping."""

    def test_defaults(self) -> None:
        """A new connection is unregistered, has no scope and takes clientId and machineId from its claims."""
        conn = connection(now_ms=5)
        self.assertEqual(
            (conn.client_id, conn.machine_id, conn.registered, conn.scope, conn.last_activity_ms),
            ("c1", "m1", False, None, 5),
        )

    def test_client_unknown(self) -> None:
        """A connection without a clientId claim is ``client_unknown``."""
        self.assertEqual(connection(client_id=None).client_id, "client_unknown")


class TrackedOwnersTests(SynchronousTestCase):
    """The bounded, expiring id → owner maps."""

    def test_get_live(self) -> None:
        """An entry younger than the TTL is returned."""
        owners: TrackedOwners[str] = TrackedOwners(1000, 4)
        owner = Owner(None, "relay-a", 0)
        owners.put("r1", owner)
        self.assertIs(owners.get("r1", 999), owner)

    def test_get_expired(self) -> None:
        """An entry exactly TTL old is gone and removed."""
        owners: TrackedOwners[str] = TrackedOwners(1000, 4)
        owners.put("r1", Owner(None, "relay-a", 0))
        self.assertIsNone(owners.get("r1", 1000))
        self.assertEqual(len(owners), 0)

    def test_pop(self) -> None:
        """``pop`` returns the live owner once and removes it."""
        owners: TrackedOwners[str] = TrackedOwners(1000, 4)
        owner = Owner(None, "relay-a", 0)
        owners.put("r1", owner)
        self.assertEqual((owners.pop("r1", 1), owners.pop("r1", 2)), (owner, None))

    def test_cap_evicts_oldest(self) -> None:
        """Inserting at the cap evicts the oldest-inserted entry."""
        owners: TrackedOwners[str] = TrackedOwners(1000, 2)
        for key in ("a", "b", "c"):
            owners.put(key, Owner(None, key, 0))
        self.assertEqual(
            [owners.get(key, 1) is not None for key in ("a", "b", "c")], [False, True, True]
        )

    def test_reput_does_not_evict(self) -> None:
        """Re-recording an existing id at the cap replaces it without evicting another entry."""
        owners: TrackedOwners[str] = TrackedOwners(1000, 2)
        owners.put("a", Owner(None, "x", 0))
        owners.put("b", Owner(None, "x", 0))
        owners.put("a", Owner(None, "y", 0))
        self.assertEqual(len(owners), 2)
        self.assertIsNotNone(owners.get("b", 1))

    def test_refresh_extends_life(self) -> None:
        """A refreshed entry lives for a full TTL after the refresh."""
        owners: TrackedOwners[str] = TrackedOwners(1000, 4)
        owner = Owner(None, "x", 0)
        owners.put("s", owner)
        owners.refresh("s", owner, 900)
        self.assertIs(owners.get("s", 1899), owner)
        self.assertIsNone(owners.get("s", 1900))

    def test_refresh_makes_newest(self) -> None:
        """A refreshed entry is evicted after entries inserted later."""
        owners: TrackedOwners[str] = TrackedOwners(1000, 2)
        first = Owner(None, "x", 0)
        owners.put("a", first)
        owners.put("b", Owner(None, "x", 0))
        owners.refresh("a", first, 1)
        owners.put("c", Owner(None, "x", 1))
        self.assertEqual((owners.get("a", 2), owners.get("b", 2)), (first, None))

    def test_prune(self) -> None:
        """``prune`` drops every expired entry and keeps the rest."""
        owners: TrackedOwners[str] = TrackedOwners(1000, 4)
        owners.put("old", Owner(None, "x", 0))
        owners.put("new", Owner(None, "x", 500))
        owners.prune(1000)
        self.assertEqual((len(owners), owners.get("new", 1000) is not None), (1, True))

    def test_drop_connection(self) -> None:
        """``drop_connection`` forgets only the entries that connection owns."""
        mine, other = connection(), connection()
        owners: TrackedOwners[str] = TrackedOwners(1000, 4)
        owners.put("a", Owner(mine, None, 0))
        owners.put("b", Owner(other, None, 0))
        owners.put("c", Owner(None, "relay-a", 0))
        owners.drop_connection(mine)
        self.assertEqual(
            [owners.get(k, 1) is not None for k in ("a", "b", "c")], [False, True, True]
        )

    def test_clear(self) -> None:
        """``clear`` empties the map."""
        owners: TrackedOwners[str] = TrackedOwners(1000, 4)
        owners.put("a", Owner(None, "x", 0))
        owners.clear()
        self.assertEqual(len(owners), 0)


class ScopeStateTests(SynchronousTestCase):
    """One scope's state."""

    def test_key_is_tuple(self) -> None:
        """The scope key is the (workspaceId, runtimeTargetId) tuple."""
        self.assertEqual(ScopeState("a:b", None, 0, 1, 1).key, ("a:b", None))

    def test_ttls(self) -> None:
        """Request owners live 2 minutes and session owners 30 minutes."""
        self.assertEqual((REQUEST_TTL_MS, SESSION_IDLE_TTL_MS), (2 * MINUTE_MS, 30 * MINUTE_MS))

    def test_caps_from_constructor(self) -> None:
        """Request maps use the request cap and the session map the session-owner cap."""
        state = scope(requests=1, sessions=2)
        for key in ("a", "b"):
            state.kex_requests.put(key, Owner(None, "x", 0))
            state.pairing_requests.put(key, Owner(None, "x", 0))
            state.session_owners.put(key, Owner(None, "x", 0))
        self.assertEqual(
            (len(state.kex_requests), len(state.pairing_requests), len(state.session_owners)), (1, 1, 2)
        )

    def test_touch(self) -> None:
        """``touch`` records the last activity time."""
        state = scope(now_ms=1)
        state.touch(50)
        self.assertEqual(state.last_activity_ms, 50)

    def test_prune_all_maps(self) -> None:
        """``prune`` expires request owners after 2 minutes and session owners after 30."""
        state = scope()
        state.kex_requests.put("k", Owner(None, "x", 0))
        state.pairing_requests.put("p", Owner(None, "x", 0))
        state.session_owners.put("s", Owner(None, "x", 0))
        state.prune(REQUEST_TTL_MS)
        self.assertEqual(
            (len(state.kex_requests), len(state.pairing_requests), len(state.session_owners)), (0, 0, 1)
        )
        state.prune(SESSION_IDLE_TTL_MS)
        self.assertEqual(len(state.session_owners), 0)

    def test_daemon_open(self) -> None:
        """``daemon_open`` returns the daemon only while its socket is open."""
        state = scope()
        self.assertIsNone(state.daemon_open())
        daemon = connection("workspace-daemon")
        state.daemon = daemon
        self.assertIs(state.daemon_open(), daemon)
        daemon.peer.close(1000, "")
        self.assertIsNone(state.daemon_open())

    def test_open_client_count(self) -> None:
        """Only clients with an open socket are counted."""
        state = scope()
        a, b = connection(), connection()
        state.clients[a] = None
        state.clients[b] = None
        b.peer.close(1000, "")
        self.assertEqual(state.open_client_count(), 1)

    def test_is_empty(self) -> None:
        """A scope is empty with neither a daemon nor a client, whatever else it tracks."""
        state = scope()
        state.kex_requests.put("k", Owner(None, "x", 0))
        self.assertTrue(state.is_empty())
        client = connection()
        state.clients[client] = None
        self.assertFalse(state.is_empty())
        del state.clients[client]
        state.daemon = connection("workspace-daemon")
        self.assertFalse(state.is_empty())

    def test_unsubscribe_everywhere(self) -> None:
        """A connection leaves every channel and channels left empty are dropped."""
        state = scope()
        a, b = connection(), connection()
        state.subscribers["agent-session:1"] = {a}
        state.subscribers["agent-session:2"] = {a, b}
        state.unsubscribe_everywhere(a)
        self.assertEqual(state.subscribers, {"agent-session:2": {b}})


class RegistryTests(SynchronousTestCase):
    """All scopes of a relay and the per-IP counts."""

    def test_get_does_not_create(self) -> None:
        """``get`` of an unknown scope returns None and creates nothing."""
        registry = Registry(4, 4)
        self.assertIsNone(registry.get("ws", "rt"))
        self.assertEqual(registry.scopes, {})

    def test_get_or_create(self) -> None:
        """``get_or_create`` creates once, with the registry's caps, then returns the same scope."""
        registry = Registry(1, 4)
        first = registry.get_or_create("ws", "rt", 10)
        self.assertIs(registry.get_or_create("ws", "rt", 20), first)
        self.assertIs(registry.get("ws", "rt"), first)
        self.assertEqual(first.last_activity_ms, 10)
        first.kex_requests.put("a", Owner(None, "x", 0))
        first.kex_requests.put("b", Owner(None, "x", 0))
        self.assertEqual(len(first.kex_requests), 1)

    def test_colon_ids_do_not_collide(self) -> None:
        """Workspace ``a:b`` without a target and workspace ``a`` with target ``b`` are different scopes."""
        registry = Registry(4, 4)
        joined = registry.get_or_create("a:b", None, 0)
        split = registry.get_or_create("a", "b", 0)
        self.assertIsNot(joined, split)
        self.assertEqual(set(registry.scopes), {("a:b", None), ("a", "b")})

    def test_labels_immutable(self) -> None:
        """Looking a scope up again never rewrites its workspace or runtime target labels."""
        registry = Registry(4, 4)
        state = registry.get_or_create("ws", "rt", 0)
        registry.get_or_create("ws", None, 1)
        registry.get("ws", None)
        self.assertEqual((state.workspace_id, state.runtime_target_id), ("ws", "rt"))
        self.assertIs(registry.get("ws", "rt"), state)

    def test_iter_is_a_snapshot(self) -> None:
        """Iterating yields every scope and tolerates eviction during the loop."""
        registry = Registry(4, 4)
        registry.get_or_create("a", "1", 0)
        registry.get_or_create("b", "2", 0)
        seen = []
        for state in registry:
            seen.append(state.key)
            registry.scopes.pop(state.key)
        self.assertEqual(sorted(seen), [("a", "1"), ("b", "2")])

    def test_ip_counts(self) -> None:
        """IP counts go up and down, and an IP's entry disappears at zero."""
        registry = Registry(4, 4)
        registry.add_ip("1.1.1.1")
        registry.add_ip("1.1.1.1")
        registry.remove_ip("1.1.1.1")
        self.assertEqual(registry.ip_count("1.1.1.1"), 1)
        registry.remove_ip("1.1.1.1")
        self.assertEqual((registry.ip_count("1.1.1.1"), registry.ip_counts), (0, {}))

    def test_remove_unknown_ip(self) -> None:
        """Removing an IP that has no count leaves no negative entry."""
        registry = Registry(4, 4)
        registry.remove_ip("2.2.2.2")
        self.assertEqual(registry.ip_counts, {})

    def test_evict_empty_after_ttl(self) -> None:
        """An empty scope is evicted once it has been idle for at least the TTL, not before."""
        registry = Registry(4, 4)
        state = registry.get_or_create("ws", "rt", 0)
        state.touch(100)
        self.assertEqual(registry.evict_empty(1099, 1000), [])
        self.assertEqual(registry.evict_empty(1100, 1000), [state])
        self.assertIsNone(registry.get("ws", "rt"))

    def test_evict_keeps_occupied(self) -> None:
        """Scopes holding a daemon or a client are never evicted."""
        registry = Registry(4, 4)
        with_daemon = registry.get_or_create("ws", "d", 0)
        with_daemon.daemon = connection("workspace-daemon")
        with_client = registry.get_or_create("ws", "c", 0)
        with_client.clients[connection()] = None
        self.assertEqual(registry.evict_empty(10**9, 1000), [])
        self.assertEqual(len(registry.scopes), 2)

    def test_evicted_scope_restarts_fresh(self) -> None:
        """After eviction a scope is recreated without its recorded generation."""
        registry = Registry(4, 4)
        registry.get_or_create("ws", "rt", 0).daemon_issue_generation = 7
        registry.evict_empty(1000, 1000)
        self.assertIsNone(registry.get_or_create("ws", "rt", 1000).daemon_issue_generation)
