"""Frames from browser clients (docs/protocol.md §4.4, §4.7)."""

from __future__ import annotations

from viewport.relay import frames
from viewport.relay.config import RelayConfig
from viewport.relay.frames import ClientKind
from viewport.relay.interfaces import IBackplane
from viewport.relay.limits import Limiters
from viewport.relay.metrics import RelayMetrics
from viewport.relay.registry import Connection, Owner, ScopeState
from viewport.relay.routing.delivery import Delivery
from viewport.relay.routing.events import Refusals
from viewport.relay.routing.remote_forwarding import RemoteForwarding


class ClientPipeline:
    """Validates a client's frame, applies its scope, limits and ownership rules, and forwards it."""

    def __init__(
        self,
        *,
        config: RelayConfig,
        backplane: IBackplane,
        metrics: RelayMetrics,
        limiters: Limiters,
        refusals: Refusals,
        delivery: Delivery,
        remote: RemoteForwarding,
    ) -> None:
        self._config = config
        self._backplane = backplane
        self._m = metrics
        self._limiters = limiters
        self._refusals = refusals
        self._delivery = delivery
        self._remote = remote

    def frame(self, conn: Connection, payload: bytes, now_ms: float) -> None:
        """Handle one frame from a client."""
        conn.last_activity_ms = now_ms
        m = self._m
        refuse = self._refusals.refuse
        if self._refusals.too_large(conn, payload, self._config.limits.max_frame_bytes, m.relay_ws_frame_too_large):
            return
        frame = frames.parse_frame(payload)
        kind = frames.classify_client_frame(frame) if frame is not None else None
        if kind is None or frame is None:
            refuse(conn, m.relay_frames_client_rejected, event="client_frame_rejected",
                   reply=frames.invalid_frame(conn.workspace_id), workspaceId=conn.workspace_id,
                   clientId=conn.client_id, reason="invalid_client_frame")
            return
        scope = conn.scope
        assert scope is not None
        decision = frames.client_scope_decision(conn.client_scope or "runtime", kind)
        if not decision.allowed:
            refuse(conn, m.relay_frames_client_rejected_scope, event="client_frame_rejected",
                   reply=None if decision.close_reason is not None else frames.session_events_scope_only(conn.workspace_id),
                   close=decision.close_reason, workspaceId=conn.workspace_id, clientId=conn.client_id,
                   reason=decision.log_reason)
            return
        if conn.client_scope == "session-events":
            self._session_events_frame(conn, scope, kind, frame, payload, now_ms)
            return
        scope.prune(now_ms)
        required = conn.claims.e2ee_profile
        profile = frame.get("profile")
        if required is not None and profile in frames.PROFILE_STRENGTH and profile != required:
            refuse(conn, m.relay_frames_client_rejected_profile_mismatch, close="client frame profile mismatch")
            return
        if not self._admit_by_kind(conn, scope, kind, frame, now_ms):
            return
        daemon = scope.daemon_open()
        if daemon is None:
            self._remote.no_local_daemon(conn, payload)
        elif conn.bus_queue is not None:
            # Earlier frames are still on their way elsewhere: this one must not overtake them.
            self._remote.queue_behind_remote(conn, payload)
        else:
            self._delivery.to_daemon(daemon, payload)

    def _admit_by_kind(self, conn: Connection, scope: ScopeState, kind: ClientKind, frame: dict, now_ms: float) -> bool:
        """The per-kind rate limits and ownership rules; False when the frame was refused."""
        m = self._m
        refuse = self._refusals.refuse
        if kind is ClientKind.E2EE:
            if not self._runtime_allowed(conn, now_ms):
                refuse(conn, m.relay_frames_client_runtime_rate_limited, close="runtime rate limit exceeded")
                return False
            session_id = frame["sessionId"]
            owner = scope.session_owners.get(session_id, now_ms)
            if owner is not None and owner.connection is conn:
                scope.session_owners.refresh(session_id, owner, now_ms)
            elif self._session_owned_elsewhere(scope, conn, session_id, now_ms):
                self._owned_elsewhere(conn, "session_owned_by_another_connection")
                return False
            return True
        limit_key = f"{conn.workspace_id}:{conn.client_id}:{conn.ip}"
        request_id = str(frame.get("requestId", "")).strip()
        if kind is ClientKind.KEX_INIT:
            if not self._limiters.kex.allow(limit_key, now_ms):
                refuse(conn, m.relay_frames_client_kex_rate_limited, event="client_frame_rate_limited",
                       close="key exchange rate limit exceeded", workspaceId=conn.workspace_id,
                       clientId=conn.client_id, reason="kex_rate_limit")
                return False
            if request_id and not scope.kex_requests.claim(request_id, Owner(conn, None, now_ms), now_ms):
                self._owned_elsewhere(conn, "request_id_owned_by_another_connection")
                return False
            return True
        if not self._limiters.pairing.allow(limit_key, now_ms):
            refuse(conn, m.relay_frames_client_pairing_rate_limited, close="pairing rate limit exceeded")
            return False
        if not scope.pairing_requests.claim(request_id, Owner(conn, None, now_ms), now_ms):
            self._owned_elsewhere(conn, "request_id_owned_by_another_connection")
            return False
        return True

    @staticmethod
    def _session_owned_elsewhere(scope: ScopeState, conn: Connection, session_id: object, now_ms: float) -> bool:
        """
        Another live owner holds this session id, as sent or trimmed (session ids are recorded
        trimmed from the daemon's response; a daemon may trim what it receives as well).
        """
        if not isinstance(session_id, str):
            return False
        for candidate in {session_id, session_id.strip()}:
            owner = scope.session_owners.get(candidate, now_ms)
            if owner is not None and owner.connection is not conn and owner.is_live():
                return True
        return False

    def _owned_elsewhere(self, conn: Connection, reason: str) -> None:
        """A client reused a request or session id that another live connection owns: refuse the frame."""
        self._refusals.refuse(conn, self._m.relay_frames_client_rejected, event="client_frame_rejected",
                              reply=frames.invalid_frame(conn.workspace_id), workspaceId=conn.workspace_id,
                              clientId=conn.client_id, reason=reason)

    def _runtime_allowed(self, conn: Connection, now_ms: float) -> bool:
        limiters = self._limiters
        return limiters.runtime_client.allow(conn.client_id, now_ms) and limiters.runtime_workspace.allow(
            conn.workspace_id, now_ms
        )

    def _session_events_frame(
        self, conn: Connection, scope: ScopeState, kind: ClientKind, frame: dict, payload: bytes, now_ms: float
    ) -> None:
        m = self._m
        channel = str(frame["channel"]).strip()
        if kind is ClientKind.VIEWER_PRESENCE:
            if channel not in conn.allowed_channels:
                self._refusals.refuse(conn, m.relay_session_viewer_presence_rejected,
                                      reply=frames.viewer_presence_denied(channel, conn.workspace_id))
                return
            if not self._runtime_allowed(conn, now_ms):
                self._refusals.refuse(conn, m.relay_session_viewer_presence_rate_limited,
                                      close="presence rate limit exceeded")
                return
            self.fan_out_viewer_presence(scope, channel, payload, exclude=conn)
            if self._backplane.cross_relay and scope.runtime_target_id is not None:
                self._delivery.publish_to_clients(scope, None, payload)
            return
        subscribe = kind is ClientKind.SESSION_SUBSCRIBE
        if channel not in conn.allowed_channels:
            denied = frames.subscribe_denied if subscribe else frames.unsubscribe_denied
            self._refusals.refuse(conn, m.relay_session_event_subscribe_rejected,
                                  reply=denied(channel, conn.workspace_id))
            return
        if subscribe:
            scope.subscribe(conn, channel)
            m.relay_session_event_subscribed.inc()
            after = frame.get("afterSequence")
            conn.peer.send_text(frames.subscribed(channel, int(after) if isinstance(after, (int, float)) else 0))
        else:
            scope.unsubscribe(conn, channel)
            m.relay_session_event_unsubscribed.inc()
            conn.peer.send_text(frames.unsubscribed(channel))

    def fan_out_viewer_presence(self, scope: ScopeState, channel: str, payload: bytes, exclude: "Connection | None") -> None:
        """Viewer presence goes to every subscriber of its channel except the sender."""
        delivered = self._delivery.to_subscribers(scope, channel, payload, exclude)
        if delivered:
            self._m.relay_session_viewer_presence_fanned.inc(delivered)
        else:
            self._m.relay_session_viewer_presence_no_peers.inc()
