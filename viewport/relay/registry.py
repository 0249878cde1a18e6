"""Per-scope state: which daemon and clients a relay holds, and who owns which request or session."""

from __future__ import annotations

from collections import OrderedDict
from typing import Deque, Dict, Generic, Iterator, List, Optional, Set, Tuple, TypeVar

from viewport.relay.interfaces import IPeer
from viewport.tokens import Claims

ScopeKey = Tuple[str, Optional[str]]

REQUEST_TTL_MS = 2 * 60 * 1000
SESSION_IDLE_TTL_MS = 30 * 60 * 1000


class Connection:
    """One accepted WebSocket: who it is (role, scope, claims) and its heartbeat bookkeeping."""

    __slots__ = (
        "peer",
        "role",
        "workspace_id",
        "runtime_target_id",
        "claims",
        "client_id",
        "client_scope",
        "machine_id",
        "ip",
        "scope",
        "registered",
        "last_activity_ms",
        "ping_sent_ms",
        "awaiting_pong",
        "allowed_channels",
        "redirect_sent",
        "bus_queue",
    )

    def __init__(
        self,
        peer: IPeer,
        role: str,
        workspace_id: str,
        ip: str,
        claims: Claims,
        now_ms: float,
    ) -> None:
        self.peer = peer
        self.role = role
        self.workspace_id = workspace_id
        self.ip = ip
        self.claims = claims
        self.runtime_target_id: Optional[str] = None
        self.client_id = claims.client_id or "client_unknown"
        self.client_scope: Optional[str] = None
        self.machine_id: Optional[str] = claims.machine_id
        self.scope: Optional[ScopeState] = None
        self.registered = False
        self.last_activity_ms = now_ms
        self.ping_sent_ms = 0.0
        self.awaiting_pong = False
        self.allowed_channels: frozenset[str] = frozenset()
        self.redirect_sent = False
        self.bus_queue: Optional[Deque[bytes]] = None


class Owner:
    """Who asked: a local connection, or another relay (by its id) when the request came over the bus."""

    __slots__ = ("connection", "source_relay_id", "stamp_ms")

    def __init__(
        self,
        connection: Optional[Connection],
        source_relay_id: Optional[str],
        stamp_ms: float,
    ) -> None:
        self.connection = connection
        self.source_relay_id = source_relay_id
        self.stamp_ms = stamp_ms

    def is_live(self) -> bool:
        """A local owner whose socket is still open, or an owner on another relay (live until it expires)."""
        connection = self.connection
        if connection is None:
            return True
        return connection.registered and connection.peer.can_send()

    def same_party(self, other: "Owner") -> bool:
        """The same local connection, or the same other relay."""
        if self.connection is not None or other.connection is not None:
            return self.connection is other.connection
        return self.source_relay_id == other.source_relay_id


K = TypeVar("K")


class TrackedOwners(Generic[K]):
    """
    A bounded map of id → owner whose entries expire ``ttl_ms`` after their stamp.

    The oldest-inserted entry is evicted when the map is full. ``refresh`` re-stamps an entry and
    makes it the newest, so session ownership can expire after a period *without traffic*.
    """

    def __init__(self, ttl_ms: int, cap: int) -> None:
        self._ttl_ms = ttl_ms
        self._cap = cap
        self._entries: "OrderedDict[K, Owner]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: K, owner: Owner) -> None:
        """Record an owner, evicting the oldest entries when at the cap."""
        entries = self._entries
        entries.pop(key, None)
        while len(entries) >= self._cap:
            entries.popitem(last=False)
        entries[key] = owner

    def claim(self, key: K, owner: Owner, now_ms: float) -> bool:
        """
        Record ``owner`` unless ``key`` belongs to another live owner; False (nothing changed) then.

        A request or session id is the address the daemon's answer goes to: a second connection
        reusing it would take that answer, and the session after it, away from its owner.
        """
        current = self.get(key, now_ms)
        if current is not None and not current.same_party(owner) and current.is_live():
            return False
        self.put(key, owner)
        return True

    def get(self, key: K, now_ms: float) -> Optional[Owner]:
        """The live owner of ``key``, or None (an expired entry is dropped)."""
        owner = self._entries.get(key)
        if owner is None:
            return None
        if now_ms - owner.stamp_ms >= self._ttl_ms:
            del self._entries[key]
            return None
        return owner

    def pop(self, key: K, now_ms: float) -> Optional[Owner]:
        """Remove and return the live owner of ``key``."""
        owner = self.get(key, now_ms)
        if owner is not None:
            del self._entries[key]
        return owner

    def refresh(self, key: K, owner: Owner, now_ms: float) -> None:
        """Mark traffic on an entry: restamp it and move it to the newest position."""
        owner.stamp_ms = now_ms
        self._entries.move_to_end(key)

    def prune(self, now_ms: float) -> None:
        """
        Drop every expired entry. Entries are kept in stamp order (``put`` and ``refresh`` move
        an entry to the end), so the scan stops at the first live one.
        """
        ttl = self._ttl_ms
        entries = self._entries
        while entries:
            key, owner = next(iter(entries.items()))
            if now_ms - owner.stamp_ms < ttl:
                return
            del entries[key]

    def drop_connection(self, connection: Connection) -> None:
        """Forget every entry owned by a connection that went away."""
        gone = [k for k, o in self._entries.items() if o.connection is connection]
        for k in gone:
            del self._entries[k]

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()


class ScopeState:
    """One runtime scope (workspace, runtime target): its daemon, clients and routing tables."""

    def __init__(
        self,
        workspace_id: str,
        runtime_target_id: Optional[str],
        now_ms: float,
        request_track_max: int,
        session_owner_track_max: int,
    ) -> None:
        self.workspace_id = workspace_id
        self.runtime_target_id = runtime_target_id
        self.daemon: Optional[Connection] = None
        #: The other relay holding this scope's daemon, as last resolved (None: unknown or none).
        self.remote_daemon_relay: Optional[str] = None
        self.daemon_issue_generation: Optional[int] = None
        self.clients: Dict[Connection, None] = {}
        self.subscribers: Dict[str, Set[Connection]] = {}
        self.kex_requests: TrackedOwners[str] = TrackedOwners(REQUEST_TTL_MS, request_track_max)
        self.pairing_requests: TrackedOwners[str] = TrackedOwners(REQUEST_TTL_MS, request_track_max)
        self.session_owners: TrackedOwners[str] = TrackedOwners(
            SESSION_IDLE_TTL_MS, session_owner_track_max
        )
        self.last_activity_ms = now_ms

    @property
    def key(self) -> ScopeKey:
        """The registry key: a tuple, so ids containing ``:`` never collide."""
        return (self.workspace_id, self.runtime_target_id)

    def touch(self, now_ms: float) -> None:
        """Record activity that keeps an empty scope from eviction."""
        self.last_activity_ms = now_ms

    def prune(self, now_ms: float) -> None:
        """Drop expired request and session owners."""
        self.kex_requests.prune(now_ms)
        self.pairing_requests.prune(now_ms)
        self.session_owners.prune(now_ms)

    def daemon_open(self) -> Optional[Connection]:
        """The scope's daemon if its socket is open."""
        daemon = self.daemon
        if daemon is not None and daemon.peer.can_send():
            return daemon
        return None

    def open_client_count(self) -> int:
        """How many registered clients have an open socket."""
        return sum(1 for c in self.clients if c.peer.can_send())

    def is_empty(self) -> bool:
        """True when the scope holds no daemon and no client."""
        return self.daemon is None and not self.clients

    def attach_daemon(self, daemon: Connection) -> None:
        """
        Make ``daemon`` the scope's daemon: record its generation, and start with no key-exchange
        or session owners (a daemon forgets every session when it connects). Pairing requests stay.
        """
        daemon.scope = self
        self.daemon = daemon
        self.remote_daemon_relay = None
        generation = daemon.claims.daemon_issue_generation
        if generation is not None:
            self.daemon_issue_generation = generation
        self.kex_requests.clear()
        self.session_owners.clear()

    def detach_daemon(self, daemon: Connection) -> bool:
        """
        ``daemon`` closed: when it is the current daemon, forget it and every table it answered
        for, and say True; a replaced or rejected daemon's close changes nothing (False).
        """
        if self.daemon is not daemon:
            return False
        self.daemon = None
        self.kex_requests.clear()
        self.session_owners.clear()
        self.pairing_requests.clear()
        return True

    def add_client(self, client: Connection) -> None:
        """Register a client in the scope."""
        client.scope = self
        self.clients[client] = None

    def remove_client(self, client: Connection) -> bool:
        """Forget a client and everything it owned or subscribed to; True when it was the last one."""
        self.clients.pop(client, None)
        self.kex_requests.drop_connection(client)
        self.pairing_requests.drop_connection(client)
        self.session_owners.drop_connection(client)
        self.unsubscribe_everywhere(client)
        return not self.clients

    def subscribe(self, client: Connection, channel: str) -> None:
        """Add ``client`` to a session-event channel."""
        self.subscribers.setdefault(channel, set()).add(client)

    def unsubscribe(self, client: Connection, channel: str) -> None:
        """Remove ``client`` from a channel, dropping the channel when it empties."""
        members = self.subscribers.get(channel)
        if members is not None:
            members.discard(client)
            if not members:
                del self.subscribers[channel]

    def unsubscribe_everywhere(self, connection: Connection) -> None:
        """Remove a connection from every channel, dropping empty channels."""
        empty = []
        for channel, members in self.subscribers.items():
            members.discard(connection)
            if not members:
                empty.append(channel)
        for channel in empty:
            del self.subscribers[channel]


class Registry:
    """All scopes of this relay, keyed by (workspaceId, runtimeTargetId), plus per-IP counts."""

    def __init__(self, request_track_max: int, session_owner_track_max: int) -> None:
        self._request_track_max = request_track_max
        self._session_owner_track_max = session_owner_track_max
        self.scopes: Dict[ScopeKey, ScopeState] = {}
        self.ip_counts: Dict[str, int] = {}
        self.registered_connections = 0

    def __iter__(self) -> Iterator[ScopeState]:
        return iter(list(self.scopes.values()))

    def get(self, workspace_id: str, runtime_target_id: Optional[str]) -> Optional[ScopeState]:
        """The scope if it exists; never creates one."""
        return self.scopes.get((workspace_id, runtime_target_id))

    def get_or_create(
        self, workspace_id: str, runtime_target_id: Optional[str], now_ms: float
    ) -> ScopeState:
        """The scope, created with immutable labels if new."""
        key = (workspace_id, runtime_target_id)
        scope = self.scopes.get(key)
        if scope is None:
            scope = ScopeState(
                workspace_id,
                runtime_target_id,
                now_ms,
                self._request_track_max,
                self._session_owner_track_max,
            )
            self.scopes[key] = scope
        return scope

    def accept(self, conn: Connection) -> None:
        """An upgraded socket passed its checks: it counts toward its IP (and, with a scope, the total)."""
        conn.registered = True
        self.add_ip(conn.ip)
        if conn.role != "worker":
            self.registered_connections += 1

    def release(self, conn: Connection) -> bool:
        """A registered socket closed: uncount it; False when it was not registered (nothing to do)."""
        if not conn.registered:
            return False
        conn.registered = False
        self.remove_ip(conn.ip)
        if conn.role != "worker":
            self.registered_connections -= 1
        return True

    def ip_count(self, ip: str) -> int:
        """Accepted connections from one IP."""
        return self.ip_counts.get(ip, 0)

    def add_ip(self, ip: str) -> None:
        """Count an accepted connection from ``ip``."""
        self.ip_counts[ip] = self.ip_counts.get(ip, 0) + 1

    def remove_ip(self, ip: str) -> None:
        """Uncount a closed connection; the entry goes at zero."""
        count = self.ip_counts.get(ip, 0) - 1
        if count > 0:
            self.ip_counts[ip] = count
        else:
            self.ip_counts.pop(ip, None)

    def evict_empty(self, now_ms: float, ttl_ms: int) -> List[ScopeState]:
        """Delete and return scopes with no daemon and no client, idle for at least ``ttl_ms``."""
        evicted = [
            s
            for s in self.scopes.values()
            if s.is_empty() and now_ms - s.last_activity_ms >= ttl_ms
        ]
        for scope in evicted:
            del self.scopes[scope.key]
        return evicted

