"""Connections coming and going: claims checks, registration, daemon presence, closing, eviction."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred, DeferredList, succeed

from viewport.relay import frames
from viewport.relay.claims_check import check_connection_claims
from viewport.relay.config import RelayConfig
from viewport.relay.interfaces import BusFrame, IBackplane, Presence
from viewport.relay.metrics import RelayMetrics
from viewport.relay.registry import Connection, Registry, ScopeState
from viewport.relay.routing.delivery import Delivery
from viewport.relay.routing.events import Refusals, RoutingLog


class ConnectionLifecycle:
    """Registers admitted sockets in their scope and forgets them when they close (docs/protocol.md §3)."""

    def __init__(
        self,
        *,
        config: RelayConfig,
        registry: Registry,
        backplane: IBackplane,
        metrics: RelayMetrics,
        events: RoutingLog,
        refusals: Refusals,
        delivery: Delivery,
        relay_id: str,
    ) -> None:
        self._config = config
        self._registry = registry
        self._backplane = backplane
        self._m = metrics
        self._events = events
        self._refusals = refusals
        self._delivery = delivery
        self._relay_id = relay_id
        #: Set by ``withdraw_presence``: presences and notices went out, closing sockets repeats neither.
        self._withdrawn = False

    def client_cap_reached(self, workspace_id: str, runtime_target_id: Optional[str]) -> bool:
        """True when the scope already holds the maximum number of open clients (no side effect)."""
        scope = self._registry.get(workspace_id, runtime_target_id)
        return scope is not None and scope.open_client_count() >= self._config.limits.max_clients_per_workspace

    def open_connection(self, conn: Connection, query_runtime_target_id: Optional[str], now_ms: float) -> bool:
        """Check an upgraded socket's claims and register it; False when it was closed instead."""
        runtime_target, rejection = check_connection_claims(
            conn.role, conn.workspace_id, query_runtime_target_id, conn.claims
        )
        if rejection is not None:
            self._refusals.refuse(
                conn,
                self._m.relay_ws_connections_rejected,
                event=rejection.log_event,
                reply=frames.runtime_target_required(conn.workspace_id) if rejection.send_runtime_target_required else None,
                close=rejection.close_reason,
                workspaceId=conn.workspace_id,
                role=conn.role,
                ip=conn.ip,
                reason=rejection.log_reason,
            )
            return False
        conn.runtime_target_id = runtime_target
        if conn.role == "worker":
            self._accept(conn)
            self._events.info("worker_connected", workspaceId=conn.workspace_id,
                           managedExecutorId=conn.claims.managed_executor_id, ip=conn.ip)
            return True
        scope = self._registry.get_or_create(conn.workspace_id, runtime_target, now_ms)
        scope.touch(now_ms)
        scope.prune(now_ms)
        if conn.role == "workspace-daemon":
            return self._register_daemon(conn, scope)
        return self._register_client(conn, scope)

    def _accept(self, conn: Connection) -> None:
        self._registry.accept(conn)
        self._m.relay_ws_connections_opened.inc()

    def _register_daemon(self, conn: Connection, scope: ScopeState) -> bool:
        generation = conn.claims.daemon_issue_generation
        recorded = scope.daemon_issue_generation
        if generation is not None and recorded is not None and generation < recorded:
            self._refusals.refuse(
                conn, self._m.relay_ws_connections_rejected, event="daemon_connection_rejected",
                close="stale daemon generation", workspaceId=conn.workspace_id, ip=conn.ip,
                reason="stale_daemon_issue_generation", claimGeneration=generation, latestGeneration=recorded,
            )
            return False
        if scope.daemon_open() is not None:
            self._refusals.refuse(
                conn, self._m.relay_ws_connections_rejected, event="daemon_connection_rejected",
                close="daemon already connected", workspaceId=conn.workspace_id, ip=conn.ip,
                reason="daemon_already_connected",
            )
            return False
        if scope.remote_daemon_relay is not None:
            # The daemon was on another relay and has moved here (that relay may have died without
            # a word): the sessions our clients had with it are gone with its old connection.
            self._delivery.to_clients(scope, frames.daemon_unavailable(scope.workspace_id, scope.runtime_target_id))
        self._accept(conn)
        scope.attach_daemon(conn)
        self._backplane.watch_scope(scope.workspace_id, scope.runtime_target_id, "daemon")
        self._announce(self._presence(scope, conn, True))
        self._events.info("daemon_connected", workspaceId=conn.workspace_id, runtimeTargetId=conn.runtime_target_id,
                       machineId=conn.machine_id, ip=conn.ip)
        self.refresh_gauges()
        return True

    def _register_client(self, conn: Connection, scope: ScopeState) -> bool:
        conn.client_scope = conn.claims.scope or "runtime"
        conn.allowed_channels = frames.allowed_channels(conn.claims.session_channels)
        self._accept(conn)
        scope.add_client(conn)
        self._backplane.watch_scope(scope.workspace_id, scope.runtime_target_id, "clients")
        if self._backplane.cross_relay and scope.runtime_target_id is not None and scope.daemon_open() is None:
            self._learn_remote_daemon(scope)
        self._events.info("client_connected", workspaceId=conn.workspace_id, clientId=conn.client_id, ip=conn.ip)
        self.refresh_gauges()
        return True

    def _learn_remote_daemon(self, scope: ScopeState) -> None:
        """
        Find which relay holds the scope's daemon, so that its death is noticed even for a client
        that has not sent anything yet (the liveness check watches the relays scopes name).
        """

        def learned(presence: Optional[Presence]) -> None:
            if presence is not None and presence.relay_id != self._relay_id and scope.daemon_open() is None:
                scope.remote_daemon_relay = presence.relay_id

        self._backplane.resolve_presence(scope.workspace_id, scope.runtime_target_id).addCallbacks(
            learned, self._events.failure, errbackArgs=("relay_presence_resolve_error",)
        )

    def _presence(self, scope: ScopeState, conn: Connection, connected: bool) -> Presence:
        return Presence(
            workspace_id=scope.workspace_id,
            runtime_target_id=scope.runtime_target_id,
            relay_id=self._relay_id,
            relay_ws_base_url=self._config.backplane.public_ws_base_url,
            daemon_connected=connected,
            machine_id=conn.machine_id,
        )

    def close_connection(self, conn: Connection, now_ms: float) -> None:
        """Forget a registered socket that closed; tell a scope's clients when its daemon left."""
        if not self._registry.release(conn):
            return
        self._m.relay_ws_connections_closed.inc()
        scope = conn.scope
        if conn.role == "worker" or scope is None:
            self._events.info("worker_disconnected", workspaceId=conn.workspace_id,
                           managedExecutorId=conn.claims.managed_executor_id, ip=conn.ip)
            return
        scope.touch(now_ms)
        if conn.role == "workspace-daemon":
            current = scope.detach_daemon(conn)
            if current:
                self._daemon_left(scope, conn, now_ms)
            self._events.info("daemon_disconnected", workspaceId=conn.workspace_id, runtimeTargetId=conn.runtime_target_id,
                           machineId=conn.machine_id, ip=conn.ip, clearedCurrentDaemon=current)
        else:
            if scope.remove_client(conn):
                self._backplane.unwatch_scope(scope.workspace_id, scope.runtime_target_id, "clients")
            self._events.info("client_disconnected", workspaceId=conn.workspace_id, clientId=conn.client_id, ip=conn.ip)
        self.refresh_gauges()

    def _daemon_left(self, scope: ScopeState, daemon: Connection, now_ms: float) -> None:
        """The scope's daemon closed: other relays stop routing here, every client on every relay is told."""
        self._backplane.unwatch_scope(scope.workspace_id, scope.runtime_target_id, "daemon")
        notice = frames.daemon_unavailable(scope.workspace_id, scope.runtime_target_id, daemon.machine_id)
        for client in scope.clients:
            client.peer.send_text(notice)
        if self._withdrawn:
            return  # presence and notice went out with the goodbyes
        self._announce(self._presence(scope, daemon, False))
        if self._backplane.cross_relay and scope.runtime_target_id is not None:
            self._delivery.publish_to_clients(scope, None, notice.encode("utf-8"), lost_at_ms=now_ms)

    def _announce(self, presence: Presence) -> "Deferred[Any]":
        """Tell other relays where a daemon is, unless presence sync is off (RELAY_PRESENCE_SYNC_ENABLED=0)."""
        if not self._config.backplane.presence_sync_enabled:
            return succeed(None)
        return self._backplane.announce_presence(presence)

    def withdraw_presence(self) -> "Deferred[Any]":
        """
        Before shutdown, tell other relays that none of this relay's daemons is reachable any more:
        withdraw each presence and publish the daemon-gone notice to the scope's clients on every
        relay now, whatever the daemons' sockets do later (a daemon that never answers the closing
        handshake would otherwise be reported only when its socket is dropped, with the backplane
        already going down). Fires when all were answered.
        """
        self._withdrawn = True
        sent: list[Deferred[Any]] = []
        for scope in list(self._registry.scopes.values()):
            daemon = scope.daemon
            if daemon is None:
                continue
            sent.append(self._announce(self._presence(scope, daemon, False)))
            if self._backplane.cross_relay and scope.runtime_target_id is not None:
                notice = frames.daemon_unavailable(scope.workspace_id, scope.runtime_target_id, daemon.machine_id)
                sent.append(self._backplane.publish(BusFrame(
                    scope.workspace_id, scope.runtime_target_id, self._relay_id, None, "daemon_to_clients", notice
                )))
        return DeferredList(sent, consumeErrors=True)

    def refresh_gauges(self) -> None:
        """The connection and scope gauges."""
        self._m.relay_connections_total.set(self._registry.registered_connections)
        self._m.relay_workspaces_total.set(len(self._registry.scopes))

    def evict_empty_scopes(self, now_ms: float) -> None:
        """Delete scopes that stayed empty for the configured TTL, then refresh the gauges."""
        for scope in self._registry.evict_empty(now_ms, self._config.heartbeat.empty_workspace_ttl_ms):
            self._m.relay_workspace_evictions.inc()
            self._events.info("workspace_evicted", workspaceId=scope.workspace_id, runtimeTargetId=scope.runtime_target_id)
        self.refresh_gauges()
