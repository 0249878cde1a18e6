"""Routing decisions: registration of an admitted socket and the client, daemon and worker pipelines."""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger, LogLevel

from viewport.relay import frames
from viewport.relay.frames import ClientKind, DaemonKind
from viewport.relay.interfaces import BusFrame, IBackplane, Presence
from viewport.relay.bus_routing import BusRouting
from viewport.relay.claims_check import check_connection_claims
from viewport.relay.limits import Limiters
from viewport.relay.registry import Connection, Owner, Registry, ScopeState
from viewport.relay.remote_path import RemotePath
from viewport.relay.remote_routing import RemoteRouting

CLOSE_POLICY = 4008
WARNINGS_PER_TICK = 50


WorkerForward = Callable[[Connection, dict, str], None]


class Router(RemoteRouting, BusRouting):
    """
    Everything a relay decides about frames, independent of sockets and timers.

    The protocol hands over each inbound payload with ``now_ms``; the router answers through the
    connections' ``IPeer`` and reaches other relays only through ``IBackplane``.
    """

    _log = Logger()

    def __init__(
        self,
        *,
        config: Any,
        registry: Registry,
        backplane: IBackplane,
        metrics: Any,
        limiters: Limiters,
        worker_forward: Optional[WorkerForward] = None,
    ) -> None:
        self._config = config
        self._registry = registry
        self._backplane = backplane
        self._m = metrics
        self._limiters = limiters
        self._worker_forward = worker_forward
        self._relay_id: str = backplane.relay_id
        self._log_budget: dict[str, int] = {}
        #: Set by ``withdraw_presence``: presences and notices went out, closing sockets repeats neither.
        self._withdrawn = False
        self._remote_path = RemotePath(
            registry=registry, backplane=backplane, metrics=metrics, event=self._event, relay_id=self._relay_id
        )

    def _event(self, level: LogLevel, name: str, **details: object) -> None:
        """
        Log one routing event. Warnings are budgeted per event name between heartbeat ticks, so a
        peer sending garbage cannot flood the log; ``reset_log_budget`` reports what was held back.
        """
        if level is LogLevel.warn:
            used = self._log_budget.get(name, 0)
            self._log_budget[name] = used + 1
            if used >= WARNINGS_PER_TICK:
                return
        self._log.emit(level, "{relay_event}", relay_event=name, **details)

    def path_changed(self, working: bool, now_ms: float) -> None:
        """The backplane lost (False) or regained (True) the path bringing other relays' frames here."""
        self._remote_path.path_changed(working, now_ms)

    def check_remote_relays(self, now_ms: float) -> "Optional[Deferred[Any]]":
        """Periodic: tell clients whose daemon's relay died, and retry notices owed to other relays."""
        return self._remote_path.check_remote_relays(now_ms)

    def reset_log_budget(self) -> None:
        """Start a new warning budget; log how many warnings of each kind were held back."""
        held = sorted((name, used - WARNINGS_PER_TICK) for name, used in self._log_budget.items()
                      if used > WARNINGS_PER_TICK)
        self._log_budget.clear()
        if held:
            # Pairs, not an object: key names such as client_frame_rejected would be redacted.
            self._log.warn("{relay_event}", relay_event="log_events_suppressed", counts=held)

    def _too_large(self, conn: Connection, payload: bytes) -> bool:
        """The relay's own size check (Autobahn already closes 1009 on oversize messages)."""
        if len(payload) <= self._config.max_frame_bytes:
            return False
        self._m.relay_ws_frame_too_large.inc()
        conn.peer.close(1009, "frame too large")
        return True

    # -- connection lifecycle -------------------------------------------------------------------

    def client_cap_reached(self, workspace_id: str, runtime_target_id: Optional[str]) -> bool:
        """True when the scope already holds the maximum number of open clients (no side effect)."""
        scope = self._registry.get(workspace_id, runtime_target_id)
        if scope is None:
            return False
        return scope.open_client_count() >= self._config.max_clients_per_workspace

    def open_connection(
        self, conn: Connection, query_runtime_target_id: Optional[str], now_ms: float
    ) -> bool:
        """Check an upgraded socket's claims and register it; False when it was closed instead."""
        runtime_target, rejection = check_connection_claims(
            conn.role, conn.workspace_id, query_runtime_target_id, conn.claims
        )
        if rejection is not None:
            if rejection.send_runtime_target_required:
                conn.peer.send_text(frames.runtime_target_required(conn.workspace_id))
            self._m.relay_ws_connections_rejected.inc()
            self._event(
                LogLevel.warn,
                rejection.log_event,
                workspaceId=conn.workspace_id,
                role=conn.role,
                ip=conn.ip,
                reason=rejection.log_reason,
            )
            conn.peer.close(CLOSE_POLICY, rejection.close_reason)
            return False
        conn.runtime_target_id = runtime_target
        if conn.role == "worker":
            return self._register_worker(conn)
        scope = self._registry.get_or_create(conn.workspace_id, runtime_target, now_ms)
        scope.touch(now_ms)
        scope.prune(now_ms)
        if conn.role == "workspace-daemon":
            return self._register_daemon(conn, scope)
        return self._register_client(conn, scope)

    def _accept(self, conn: Connection) -> None:
        conn.registered = True
        self._registry.add_ip(conn.ip)
        self._m.relay_ws_connections_opened.inc()

    def _register_worker(self, conn: Connection) -> bool:
        self._accept(conn)
        self._event(
            LogLevel.info,
            "worker_connected",
            workspaceId=conn.workspace_id,
            managedExecutorId=conn.claims.managed_executor_id,
            ip=conn.ip,
        )
        return True

    def _register_daemon(self, conn: Connection, scope: ScopeState) -> bool:
        generation = conn.claims.daemon_issue_generation
        recorded = scope.daemon_issue_generation
        if generation is not None and recorded is not None and generation < recorded:
            self._m.relay_ws_connections_rejected.inc()
            self._event(
                LogLevel.warn,
                "daemon_connection_rejected",
                workspaceId=conn.workspace_id,
                ip=conn.ip,
                reason="stale_daemon_issue_generation",
                claimGeneration=generation,
                latestGeneration=recorded,
            )
            conn.peer.close(CLOSE_POLICY, "stale daemon generation")
            return False
        if scope.daemon_open() is not None:
            self._m.relay_ws_connections_rejected.inc()
            self._event(
                LogLevel.warn,
                "daemon_connection_rejected",
                workspaceId=conn.workspace_id,
                ip=conn.ip,
                reason="daemon_already_connected",
            )
            conn.peer.close(CLOSE_POLICY, "daemon already connected")
            return False
        self._accept(conn)
        conn.scope = scope
        scope.daemon = conn
        self._registry.registered_connections += 1
        if generation is not None:
            scope.daemon_issue_generation = generation
        if scope.remote_daemon_relay is not None:
            # The daemon was on another relay and has moved here (that relay may have died without
            # a word): the sessions our clients had with it are gone with its old connection.
            scope.remote_daemon_relay = None
            notice = frames.daemon_unavailable(scope.workspace_id, scope.runtime_target_id)
            for client in scope.clients:
                client.peer.send_text(notice)
        scope.kex_requests.clear()
        scope.session_owners.clear()
        self._backplane.watch_scope(scope.workspace_id, scope.runtime_target_id, "daemon")
        self._backplane.announce_presence(self._presence(scope, conn, True))
        self._event(
            LogLevel.info,
            "daemon_connected",
            workspaceId=conn.workspace_id,
            runtimeTargetId=conn.runtime_target_id,
            machineId=conn.machine_id,
            ip=conn.ip,
        )
        self._refresh_gauges()
        return True

    def _register_client(self, conn: Connection, scope: ScopeState) -> bool:
        conn.client_scope = conn.claims.scope or "runtime"
        conn.allowed_channels = frames.allowed_channels(conn.claims.session_channels)
        self._accept(conn)
        conn.scope = scope
        scope.clients[conn] = None
        self._registry.registered_connections += 1
        self._backplane.watch_scope(scope.workspace_id, scope.runtime_target_id, "clients")
        if self._backplane.cross_relay and scope.runtime_target_id is not None and scope.daemon_open() is None:
            self._learn_remote_daemon(scope)
        self._event(
            LogLevel.info,
            "client_connected",
            workspaceId=conn.workspace_id,
            clientId=conn.client_id,
            ip=conn.ip,
        )
        self._refresh_gauges()
        return True

    def _learn_remote_daemon(self, scope: ScopeState) -> None:
        """
        Find which relay holds the scope's daemon, so that its death is noticed even for a client
        that has not sent anything yet (the liveness check watches the relays scopes name).
        """
        d: Deferred = self._backplane.resolve_presence(scope.workspace_id, scope.runtime_target_id)  # type: ignore[assignment]

        def learned(presence: Optional[Presence]) -> None:
            if presence is not None and presence.relay_id != self._relay_id and scope.daemon_open() is None:
                scope.remote_daemon_relay = presence.relay_id

        d.addCallbacks(learned, self._log_failure, errbackArgs=("relay_presence_resolve_error",))

    def _presence(self, scope: ScopeState, conn: Connection, connected: bool) -> Presence:
        return Presence(
            workspace_id=scope.workspace_id,
            runtime_target_id=scope.runtime_target_id,
            relay_id=self._relay_id,
            relay_ws_base_url=self._config.public_ws_base_url,
            daemon_connected=connected,
            machine_id=conn.machine_id,
        )

    def close_connection(self, conn: Connection, now_ms: float) -> None:
        """Forget a registered socket that closed; tell a scope's clients when its daemon left."""
        if not conn.registered:
            return
        conn.registered = False
        self._registry.remove_ip(conn.ip)
        self._m.relay_ws_connections_closed.inc()
        scope = conn.scope
        if conn.role == "worker" or scope is None:
            self._event(
                LogLevel.info,
                "worker_disconnected",
                workspaceId=conn.workspace_id,
                managedExecutorId=conn.claims.managed_executor_id,
                ip=conn.ip,
            )
            return
        scope.touch(now_ms)
        self._registry.registered_connections -= 1
        if conn.role == "workspace-daemon":
            current = scope.daemon is conn
            if current:
                scope.daemon = None
                scope.kex_requests.clear()
                scope.session_owners.clear()
                scope.pairing_requests.clear()
                self._backplane.unwatch_scope(scope.workspace_id, scope.runtime_target_id, "daemon")
                if not self._withdrawn:
                    self._backplane.announce_presence(self._presence(scope, conn, False))
                notice = frames.daemon_unavailable(
                    scope.workspace_id, scope.runtime_target_id, conn.machine_id
                )
                for client in scope.clients:
                    client.peer.send_text(notice)
                if self._backplane.cross_relay and scope.runtime_target_id is not None and not self._withdrawn:
                    self._publish_to_clients(scope, None, notice.encode("utf-8"), now_ms)
            self._event(
                LogLevel.info,
                "daemon_disconnected",
                workspaceId=conn.workspace_id,
                runtimeTargetId=conn.runtime_target_id,
                machineId=conn.machine_id,
                ip=conn.ip,
                clearedCurrentDaemon=current,
            )
        else:
            scope.clients.pop(conn, None)
            scope.kex_requests.drop_connection(conn)
            scope.pairing_requests.drop_connection(conn)
            scope.session_owners.drop_connection(conn)
            scope.unsubscribe_everywhere(conn)
            if not scope.clients:
                self._backplane.unwatch_scope(scope.workspace_id, scope.runtime_target_id, "clients")
            self._event(
                LogLevel.info,
                "client_disconnected",
                workspaceId=conn.workspace_id,
                clientId=conn.client_id,
                ip=conn.ip,
            )
        self._refresh_gauges()

    def withdraw_presence(self) -> "Deferred[Any]":
        """
        Before shutdown, tell other relays that none of this relay's daemons is reachable any more:
        withdraw each presence and publish the daemon-gone notice to the scope's clients on every
        relay now, whatever the daemons' sockets do later (a daemon that never answers the closing
        handshake would otherwise be reported only when its socket is dropped, with the backplane
        already going down). Fires when all were answered.
        """
        self._withdrawn = True
        sent = []
        for scope in list(self._registry.scopes.values()):
            daemon = scope.daemon
            if daemon is None:
                continue
            sent.append(self._backplane.announce_presence(self._presence(scope, daemon, False)))
            if self._backplane.cross_relay and scope.runtime_target_id is not None:
                notice = frames.daemon_unavailable(scope.workspace_id, scope.runtime_target_id, daemon.machine_id)
                sent.append(self._backplane.publish(BusFrame(
                    scope.workspace_id, scope.runtime_target_id, self._relay_id, None, "daemon_to_clients", notice
                )))
        return DeferredList(sent, consumeErrors=True)  # type: ignore[arg-type]

    def _refresh_gauges(self) -> None:
        self._m.relay_connections_total.set(self._registry.registered_connections)
        self._m.relay_workspaces_total.set(len(self._registry.scopes))

    def evict_empty_scopes(self, now_ms: float) -> None:
        """Delete scopes that stayed empty for the configured TTL, then refresh the gauges."""
        for scope in self._registry.evict_empty(now_ms, self._config.empty_workspace_ttl_ms):
            self._m.relay_workspace_evictions.inc()
            self._event(
                LogLevel.info,
                "workspace_evicted",
                workspaceId=scope.workspace_id,
                runtimeTargetId=scope.runtime_target_id,
            )
        self._refresh_gauges()

    # -- client pipeline --------------------------------------------------------------------------

    def client_frame(self, conn: Connection, payload: bytes, now_ms: float) -> None:
        """Handle one frame from a browser client (contract §5.4)."""
        conn.last_activity_ms = now_ms
        m = self._m
        if self._too_large(conn, payload):
            return
        frame = frames.parse_frame(payload)
        kind = frames.classify_client_frame(frame) if frame is not None else None
        if kind is None or frame is None:
            m.relay_frames_client_rejected.inc()
            self._event(
                LogLevel.warn,
                "client_frame_rejected",
                workspaceId=conn.workspace_id,
                clientId=conn.client_id,
                reason="invalid_client_frame",
            )
            conn.peer.send_text(frames.invalid_frame(conn.workspace_id))
            return
        scope = conn.scope
        assert scope is not None
        decision = frames.client_scope_decision(conn.client_scope or "runtime", kind)
        if not decision.allowed:
            m.relay_frames_client_rejected_scope.inc()
            self._event(
                LogLevel.warn,
                "client_frame_rejected",
                workspaceId=conn.workspace_id,
                clientId=conn.client_id,
                reason=decision.log_reason,
            )
            if decision.close_reason is not None:
                conn.peer.close(CLOSE_POLICY, decision.close_reason)
            else:
                conn.peer.send_text(frames.session_events_scope_only(conn.workspace_id))
            return
        if conn.client_scope == "session-events":
            self._session_events_frame(conn, scope, kind, frame, payload, now_ms)
            return
        scope.prune(now_ms)
        required = conn.claims.e2ee_profile
        profile = frame.get("profile")
        if required is not None and profile in frames.PROFILE_STRENGTH and profile != required:
            m.relay_frames_client_rejected_profile_mismatch.inc()
            conn.peer.close(CLOSE_POLICY, "client frame profile mismatch")
            return
        if kind is ClientKind.E2EE:
            if not self._runtime_allowed(conn, now_ms):
                m.relay_frames_client_runtime_rate_limited.inc()
                conn.peer.close(CLOSE_POLICY, "runtime rate limit exceeded")
                return
            session_id = frame["sessionId"]
            owner = scope.session_owners.get(session_id, now_ms)  # type: ignore[arg-type]
            if owner is not None and owner.connection is conn:
                scope.session_owners.refresh(session_id, owner, now_ms)  # type: ignore[arg-type]
            elif self._session_owned_elsewhere(scope, conn, session_id, now_ms):  # type: ignore[arg-type]
                self._owned_elsewhere(conn, "session_owned_by_another_connection")
                return
        elif kind is ClientKind.KEX_INIT:
            limit_key = f"{conn.workspace_id}:{conn.client_id}:{conn.ip}"
            if not self._limiters.kex.allow(limit_key, now_ms):
                m.relay_frames_client_kex_rate_limited.inc()
                self._event(
                    LogLevel.warn,
                    "client_frame_rate_limited",
                    workspaceId=conn.workspace_id,
                    clientId=conn.client_id,
                    reason="kex_rate_limit",
                )
                conn.peer.close(CLOSE_POLICY, "key exchange rate limit exceeded")
                return
            request_id = str(frame.get("requestId", "")).strip()
            if request_id and not scope.kex_requests.claim(request_id, Owner(conn, None, now_ms), now_ms):
                self._owned_elsewhere(conn, "request_id_owned_by_another_connection")
                return
        else:
            limit_key = f"{conn.workspace_id}:{conn.client_id}:{conn.ip}"
            if not self._limiters.pairing.allow(limit_key, now_ms):
                m.relay_frames_client_pairing_rate_limited.inc()
                conn.peer.close(CLOSE_POLICY, "pairing rate limit exceeded")
                return
            request_id = str(frame.get("requestId", "")).strip()
            if not scope.pairing_requests.claim(request_id, Owner(conn, None, now_ms), now_ms):
                self._owned_elsewhere(conn, "request_id_owned_by_another_connection")
                return
        daemon = scope.daemon
        if daemon is None or not daemon.peer.can_send():
            self._no_local_daemon(conn, payload)
            return
        if conn.bus_queue is not None:
            # Earlier frames are still on their way elsewhere: this one must not overtake them.
            self.queue_behind_remote(conn, payload)
            return
        daemon.peer.send_payload(payload)
        m.relay_frames_client_to_daemon.inc()
        m.relay_bytes_client_to_daemon.inc(len(payload))

    @staticmethod
    def _session_owned_elsewhere(scope: ScopeState, conn: Connection, session_id: str, now_ms: float) -> bool:
        """
        Another live owner holds this session id, as sent or trimmed (session ids are recorded
        trimmed from the daemon's response; a daemon may trim what it receives as well).
        """
        for candidate in {session_id, session_id.strip()} if isinstance(session_id, str) else ():
            owner = scope.session_owners.get(candidate, now_ms)
            if owner is not None and owner.connection is not conn and owner.is_live():
                return True
        return False

    def _owned_elsewhere(self, conn: Connection, reason: str) -> None:
        """A client reused a request or session id that another live connection owns: refuse the frame."""
        self._m.relay_frames_client_rejected.inc()
        self._event(
            LogLevel.warn, "client_frame_rejected", workspaceId=conn.workspace_id, clientId=conn.client_id, reason=reason
        )
        conn.peer.send_text(frames.invalid_frame(conn.workspace_id))

    def _runtime_allowed(self, conn: Connection, now_ms: float) -> bool:
        limiters = self._limiters
        return limiters.runtime_client.allow(
            conn.client_id, now_ms
        ) and limiters.runtime_workspace.allow(conn.workspace_id, now_ms)

    def _session_events_frame(
        self,
        conn: Connection,
        scope: ScopeState,
        kind: ClientKind,
        frame: dict,
        payload: bytes,
        now_ms: float,
    ) -> None:
        m = self._m
        channel = str(frame["channel"]).strip()
        if kind is ClientKind.VIEWER_PRESENCE:
            if channel not in conn.allowed_channels:
                m.relay_session_viewer_presence_rejected.inc()
                conn.peer.send_text(frames.viewer_presence_denied(channel, conn.workspace_id))
                return
            if not self._runtime_allowed(conn, now_ms):
                m.relay_session_viewer_presence_rate_limited.inc()
                conn.peer.close(CLOSE_POLICY, "presence rate limit exceeded")
                return
            self._fan_out_viewer_presence(scope, channel, payload, exclude=conn)
            if self._backplane.cross_relay and scope.runtime_target_id is not None:
                self._publish_to_clients(scope, None, payload)
            return
        subscribe = kind is ClientKind.SESSION_SUBSCRIBE
        if channel not in conn.allowed_channels:
            m.relay_session_event_subscribe_rejected.inc()
            denied = frames.subscribe_denied if subscribe else frames.unsubscribe_denied
            conn.peer.send_text(denied(channel, conn.workspace_id))
            return
        if subscribe:
            scope.subscribers.setdefault(channel, set()).add(conn)
            m.relay_session_event_subscribed.inc()
            after = frame.get("afterSequence")
            conn.peer.send_text(frames.subscribed(channel, int(after) if after is not None else 0))  # type: ignore[call-overload]
        else:
            members = scope.subscribers.get(channel)
            if members is not None:
                members.discard(conn)
                if not members:
                    del scope.subscribers[channel]
            m.relay_session_event_unsubscribed.inc()
            conn.peer.send_text(frames.unsubscribed(channel))

    def _fan_out_viewer_presence(
        self, scope: ScopeState, channel: str, payload: bytes, exclude: Optional[Connection]
    ) -> None:
        """Viewer presence goes to every subscriber of its channel except the sender."""
        m = self._m
        delivered = 0
        for member in scope.subscribers.get(channel, ()):
            if member is not exclude and member.peer.can_send():
                member.peer.send_payload(payload)
                delivered += 1
        if delivered:
            m.relay_session_viewer_presence_fanned.inc(delivered)
        else:
            m.relay_session_viewer_presence_no_peers.inc()

    def _daemon_unavailable(self, conn: Connection) -> None:
        self._m.relay_client_messages_dropped.inc()
        self._event(
            LogLevel.warn,
            "client_message_dropped",
            workspaceId=conn.workspace_id,
            clientId=conn.client_id,
            reason="daemon_unavailable",
        )
        conn.peer.send_text(
            frames.daemon_unavailable(conn.workspace_id, conn.runtime_target_id, conn.machine_id)
        )

    def _log_failure(self, failure: Any, name: str) -> None:
        self._log.failure("{relay_event}", failure, relay_event=name)

    # -- daemon pipeline --------------------------------------------------------------------------

    def daemon_frame(self, conn: Connection, payload: bytes, now_ms: float) -> None:
        """
        Handle one frame from a daemon (docs/protocol.md §4.5).

        Only frames that have somewhere to go are charged to the workspace's daemon bucket: a
        daemon encrypts every event to every session it still keeps, including sessions whose
        client left, and those frames are dropped here anyway. Over the limit the frame is
        dropped and counted; the daemon, which the whole workspace depends on, stays connected.
        """
        conn.last_activity_ms = now_ms
        m = self._m
        if self._too_large(conn, payload):
            return
        frame = frames.parse_frame(payload)
        kind = frames.classify_daemon_frame(frame) if frame is not None else None
        if kind is None or frame is None:
            m.relay_frames_daemon_rejected.inc()
            self._event(
                LogLevel.warn,
                "daemon_frame_rejected",
                workspaceId=conn.workspace_id,
                reason="invalid_daemon_frame",
            )
            return
        required = conn.claims.e2ee_profile
        if required is not None:
            profile = frame.get("profile")
            strength = frames.PROFILE_STRENGTH.get(profile) if isinstance(profile, str) else None
            if strength is not None and strength < frames.PROFILE_STRENGTH[required]:
                m.relay_frames_daemon_rejected_profile_mismatch.inc()
                conn.peer.close(CLOSE_POLICY, "daemon frame profile mismatch")
                return
        scope = conn.scope
        assert scope is not None
        if self._has_destination(scope, kind, frame, now_ms, from_bus=False) and not self._limiters.daemon.allow(
            conn.workspace_id, now_ms
        ):
            m.relay_frames_daemon_rate_limited.inc()
            self._event(LogLevel.warn, "daemon_frame_rate_limited", workspaceId=conn.workspace_id, ip=conn.ip)
            return
        m.relay_frames_daemon_to_clients.inc()
        m.relay_bytes_daemon_to_clients.inc(len(payload))
        self._route_daemon_frame(scope, kind, frame, payload, now_ms, from_bus=False)

    def _has_destination(
        self, scope: ScopeState, kind: DaemonKind, frame: dict, now_ms: float, from_bus: bool
    ) -> bool:
        """
        Whether a daemon frame has a live owner to go to (an open local client or another relay),
        without changing any table: only such frames count against the daemon rate limit.
        """
        if kind is DaemonKind.E2EE or kind is DaemonKind.KEY_UPDATE_REQUIRED:
            owner = scope.session_owners.get(frame.get("sessionId"), now_ms)  # type: ignore[arg-type]
        elif kind is DaemonKind.KEX_RESPONSE:
            owner = scope.kex_requests.get(str(frame.get("requestId", "")).strip(), now_ms)
        elif kind is DaemonKind.PAIRING_OFFER_RESPONSE or kind is DaemonKind.PAIRING_REDEEM_RESPONSE:
            owner = scope.pairing_requests.get(str(frame.get("requestId", "")).strip(), now_ms)
        else:
            channel = str(frame.get("channel", "")).strip()
            if any(member.peer.can_send() for member in scope.subscribers.get(channel, ())):
                return True
            return self._backplane.cross_relay and scope.runtime_target_id is not None
        if owner is None:
            return False
        if owner.connection is not None:
            return owner.connection.peer.can_send()
        return owner.source_relay_id is not None and scope.runtime_target_id is not None

    def _route_daemon_frame(
        self,
        scope: ScopeState,
        kind: DaemonKind,
        frame: dict,
        payload: bytes,
        now_ms: float,
        from_bus: bool,
    ) -> bool:
        """Deliver a daemon→clients frame to its owner(s); True when it went somewhere."""
        if kind is DaemonKind.E2EE or kind is DaemonKind.KEY_UPDATE_REQUIRED:
            return self._route_session_frame(scope, frame, payload, now_ms)
        if kind is DaemonKind.KEX_RESPONSE:
            return self._route_response(scope, frame, payload, now_ms, kex=True)
        if kind is DaemonKind.PAIRING_OFFER_RESPONSE or kind is DaemonKind.PAIRING_REDEEM_RESPONSE:
            return self._route_response(scope, frame, payload, now_ms, kex=False)
        return self._deliver_session_event(scope, frame, payload, from_bus)

    def _route_session_frame(
        self, scope: ScopeState, frame: dict, payload: bytes, now_ms: float
    ) -> bool:
        m = self._m
        session_id = frame.get("sessionId")
        owner = scope.session_owners.get(session_id, now_ms)  # type: ignore[arg-type]
        if owner is None:
            m.relay_session_frame_dropped.inc()
            return False
        scope.session_owners.refresh(session_id, owner, now_ms)  # type: ignore[arg-type]
        target = owner.connection
        if target is not None:
            if target.peer.can_send():
                target.peer.send_payload(payload)
                m.relay_session_frame_routed_local.inc()
                return True
        elif owner.source_relay_id is not None and scope.runtime_target_id is not None:
            self._publish_to_clients(scope, owner.source_relay_id, payload, now_ms)
            m.relay_session_frame_routed_bus.inc()
            return True
        m.relay_session_frame_dropped.inc()
        return False

    def _route_response(
        self, scope: ScopeState, frame: dict, payload: bytes, now_ms: float, kex: bool
    ) -> bool:
        m = self._m
        if kex:
            routed_local = m.relay_key_exchange_response_routed_local
            routed_bus = m.relay_key_exchange_response_routed_bus
            dropped = m.relay_key_exchange_response_dropped
            table = scope.kex_requests
        else:
            routed_local = m.relay_pairing_response_routed_local
            routed_bus = m.relay_pairing_response_routed_bus
            dropped = m.relay_pairing_response_dropped
            table = scope.pairing_requests
        request_id = str(frame.get("requestId", "")).strip()
        session_id = str(frame.get("sessionId", "")).strip() if kex else ""
        if not request_id or (kex and not session_id):
            dropped.inc()
            return False
        owner = table.pop(request_id, now_ms)
        if owner is None:
            dropped.inc()
            self._event(
                LogLevel.warn,
                "key_exchange_response_owner_missing" if kex else "pairing_response_owner_missing",
                workspaceId=scope.workspace_id,
                requestId=request_id,
                sessionId=session_id or None,
            )
            return False
        if kex:
            scope.session_owners.put(
                session_id, Owner(owner.connection, owner.source_relay_id, now_ms)
            )
        target = owner.connection
        if target is not None:
            if target.peer.can_send():
                target.peer.send_payload(payload)
                routed_local.inc()
                return True
        elif owner.source_relay_id is not None and scope.runtime_target_id is not None:
            self._publish_to_clients(scope, owner.source_relay_id, payload, now_ms)
            routed_bus.inc()
            return True
        dropped.inc()
        return False

    def _deliver_session_event(
        self, scope: ScopeState, frame: dict, payload: bytes, from_bus: bool
    ) -> bool:
        """Send a session event frame to the channel's local subscribers (and other relays')."""
        m = self._m
        channel = str(frame.get("channel", "")).strip()
        delivered = 0
        for member in scope.subscribers.get(channel, ()):
            if member.peer.can_send():
                member.peer.send_payload(payload)
                delivered += 1
        if not from_bus and self._backplane.cross_relay and scope.runtime_target_id is not None:
            self._publish_to_clients(scope, None, payload)
        if delivered:
            m.relay_session_event_frame_delivered.inc(delivered)
            return True
        m.relay_session_event_frame_dropped.inc()
        return False

    def _publish_to_clients(
        self, scope: ScopeState, target_relay_id: Optional[str], payload: bytes, lost_at_ms: Optional[float] = None
    ) -> None:
        """
        Publish a daemon→clients frame; with ``lost_at_ms`` (frames owned by another relay's
        client, and the daemon-gone notice) a failed publish is counted as a lost frame and the
        clients it was for are owed a ``DAEMON_UNAVAILABLE`` once the path works again.
        """
        assert scope.runtime_target_id is not None
        frame = BusFrame(
            workspace_id=scope.workspace_id,
            runtime_target_id=scope.runtime_target_id,
            source_relay_id=self._relay_id,
            target_relay_id=target_relay_id,
            direction="daemon_to_clients",
            payload=payload.decode("utf-8"),
        )
        d: Deferred = self._backplane.publish(frame)  # type: ignore[assignment]
        if lost_at_ms is not None:

            def published(ok: bool) -> None:
                if not ok:
                    self._remote_path.publish_failed(scope, target_relay_id, lost_at_ms)

            d.addCallback(published)
        d.addErrback(self._log_failure, "relay_bus_publish_error")

    # -- worker pipeline --------------------------------------------------------------------------

    def worker_frame(self, conn: Connection, payload: bytes, now_ms: float) -> None:
        """Handle one worker transport request (contract §5.6.6, with the path check fixed)."""
        conn.last_activity_ms = now_ms
        m = self._m
        if not self._limiters.daemon.allow(conn.workspace_id, now_ms):
            m.relay_frames_daemon_rate_limited.inc()
            self._event(LogLevel.warn, "worker_frame_rate_limited", workspaceId=conn.workspace_id)
            conn.peer.close(CLOSE_POLICY, "worker rate limit exceeded")
            return
        if self._too_large(conn, payload):
            return
        frame = frames.parse_frame(payload)
        if frame is None or not frames.is_worker_request(frame):
            m.relay_frames_daemon_rejected.inc()
            self._event(
                LogLevel.warn,
                "worker_frame_rejected",
                workspaceId=conn.workspace_id,
                reason="invalid_worker_transport_frame",
            )
            return
        request_id = str(frame["requestId"])
        path = frames.worker_path_allowed(
            str(frame["path"]), conn.workspace_id, conn.claims.managed_executor_id
        )
        if path is None or self._worker_forward is None:
            m.relay_worker_transport_rejected.inc()
            conn.peer.send_text(
                frames.worker_response(
                    request_id,
                    403,
                    {"content-type": "application/json"},
                    '{"ok":false,"reason":"WORKER_TRANSPORT_PATH_DENIED"}',
                )
            )
            return
        self._worker_forward(conn, frame, path)

    # -- bus pipeline -----------------------------------------------------------------------------
