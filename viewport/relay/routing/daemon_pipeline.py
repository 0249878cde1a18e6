"""Frames from the daemon, and daemon frames other relays pass on (docs/protocol.md §4.5, §4.6)."""

from __future__ import annotations

from viewport.relay import frames
from viewport.relay.config import RelayConfig
from viewport.relay.frames import DaemonKind
from viewport.relay.interfaces import IBackplane
from viewport.relay.limits import Limiters
from viewport.relay.metrics import RelayMetrics
from viewport.relay.registry import Connection, Owner, ScopeState
from viewport.relay.routing.delivery import Delivery
from viewport.relay.routing.events import Refusals, RoutingLog

_SESSION_KINDS = (DaemonKind.E2EE, DaemonKind.KEY_UPDATE_REQUIRED)
_PAIRING_KINDS = (DaemonKind.PAIRING_OFFER_RESPONSE, DaemonKind.PAIRING_REDEEM_RESPONSE)


class DaemonPipeline:
    """Routes a daemon's frames to the owners of their requests and sessions, or to a channel's subscribers."""

    def __init__(
        self,
        *,
        config: RelayConfig,
        backplane: IBackplane,
        metrics: RelayMetrics,
        limiters: Limiters,
        events: RoutingLog,
        refusals: Refusals,
        delivery: Delivery,
    ) -> None:
        self._config = config
        self._backplane = backplane
        self._m = metrics
        self._limiters = limiters
        self._events = events
        self._refusals = refusals
        self._delivery = delivery

    def frame(self, conn: Connection, payload: bytes, now_ms: float) -> None:
        """
        Handle one frame from a daemon.

        Only frames that have somewhere to go are charged to the workspace's daemon bucket: a
        daemon encrypts every event to every session it still keeps, including sessions whose
        client left, and those frames are dropped here anyway. Over the limit the frame is
        dropped and counted; the daemon, which the whole workspace depends on, stays connected.
        """
        conn.last_activity_ms = now_ms
        m = self._m
        if self._refusals.too_large(conn, payload, self._config.limits.max_frame_bytes, m.relay_ws_frame_too_large):
            return
        frame = frames.parse_frame(payload)
        kind = frames.classify_daemon_frame(frame) if frame is not None else None
        if kind is None or frame is None:
            self._refusals.refuse(conn, m.relay_frames_daemon_rejected, event="daemon_frame_rejected",
                                  workspaceId=conn.workspace_id, reason="invalid_daemon_frame")
            return
        required = conn.claims.e2ee_profile
        if required is not None:
            profile = frame.get("profile")
            strength = frames.PROFILE_STRENGTH.get(profile) if isinstance(profile, str) else None
            if strength is not None and strength < frames.PROFILE_STRENGTH[required]:
                self._refusals.refuse(conn, m.relay_frames_daemon_rejected_profile_mismatch,
                                      close="daemon frame profile mismatch")
                return
        scope = conn.scope
        assert scope is not None
        if not self.within_budget(scope, kind, frame, now_ms, from_bus=False):
            self._refusals.refuse(conn, m.relay_frames_daemon_rate_limited, event="daemon_frame_rate_limited",
                                  workspaceId=conn.workspace_id, ip=conn.ip)
            return
        m.relay_frames_daemon_to_clients.inc()
        m.relay_bytes_daemon_to_clients.inc(len(payload))
        self.route(scope, kind, frame, payload, now_ms, from_bus=False)

    def within_budget(self, scope: ScopeState, kind: DaemonKind, frame: dict, now_ms: float, from_bus: bool) -> bool:
        """False when the frame has a live destination and the workspace's daemon bucket is empty."""
        return not self._has_destination(scope, kind, frame, now_ms, from_bus) or self._limiters.daemon.allow(
            scope.workspace_id, now_ms
        )

    def _has_destination(self, scope: ScopeState, kind: DaemonKind, frame: dict, now_ms: float, from_bus: bool) -> bool:
        """
        Whether a daemon frame has a live owner to go to (an open local client or another relay),
        without changing any table: only such frames count against the daemon rate limit.
        """
        if kind in _SESSION_KINDS:
            owner = scope.session_owners.get(frame.get("sessionId"), now_ms)  # type: ignore[arg-type]
        elif kind is DaemonKind.KEX_RESPONSE:
            owner = scope.kex_requests.get(str(frame.get("requestId", "")).strip(), now_ms)
        elif kind in _PAIRING_KINDS:
            owner = scope.pairing_requests.get(str(frame.get("requestId", "")).strip(), now_ms)
        else:
            channel = str(frame.get("channel", "")).strip()
            if any(member.peer.can_send() for member in scope.subscribers.get(channel, ())):
                return True
            return not from_bus and self._backplane.cross_relay and scope.runtime_target_id is not None
        if owner is None:
            return False
        if owner.connection is not None:
            return owner.connection.peer.can_send()
        return owner.source_relay_id is not None and scope.runtime_target_id is not None

    def route(self, scope: ScopeState, kind: DaemonKind, frame: dict, payload: bytes, now_ms: float, from_bus: bool) -> bool:
        """Deliver a daemon→clients frame to its owner(s); True when it went somewhere."""
        if kind in _SESSION_KINDS:
            return self._route_session_frame(scope, frame, payload, now_ms)
        if kind is DaemonKind.KEX_RESPONSE:
            return self._route_response(scope, frame, payload, now_ms, kex=True)
        if kind in _PAIRING_KINDS:
            return self._route_response(scope, frame, payload, now_ms, kex=False)
        return self._deliver_session_event(scope, frame, payload, from_bus)

    def _route_session_frame(self, scope: ScopeState, frame: dict, payload: bytes, now_ms: float) -> bool:
        m = self._m
        session_id = frame.get("sessionId")
        owner = scope.session_owners.get(session_id, now_ms)  # type: ignore[arg-type]
        if owner is None:
            m.relay_session_frame_dropped.inc()
            return False
        scope.session_owners.refresh(session_id, owner, now_ms)  # type: ignore[arg-type]
        if self._delivery.to_owner(scope, owner, payload, now_ms, m.relay_session_frame_routed_local,
                                   m.relay_session_frame_routed_bus):
            return True
        m.relay_session_frame_dropped.inc()
        return False

    def _route_response(self, scope: ScopeState, frame: dict, payload: bytes, now_ms: float, kex: bool) -> bool:
        m = self._m
        if kex:
            routed_local, routed_bus = m.relay_key_exchange_response_routed_local, m.relay_key_exchange_response_routed_bus
            dropped, table = m.relay_key_exchange_response_dropped, scope.kex_requests
        else:
            routed_local, routed_bus = m.relay_pairing_response_routed_local, m.relay_pairing_response_routed_bus
            dropped, table = m.relay_pairing_response_dropped, scope.pairing_requests
        request_id = str(frame.get("requestId", "")).strip()
        session_id = str(frame.get("sessionId", "")).strip() if kex else ""
        if not request_id or (kex and not session_id):
            dropped.inc()
            return False
        owner = table.pop(request_id, now_ms)
        if owner is None:
            dropped.inc()
            self._events.warn(
                "key_exchange_response_owner_missing" if kex else "pairing_response_owner_missing",
                workspaceId=scope.workspace_id, requestId=request_id, sessionId=session_id or None,
            )
            return False
        if kex:
            scope.session_owners.put(session_id, Owner(owner.connection, owner.source_relay_id, now_ms))
        if self._delivery.to_owner(scope, owner, payload, now_ms, routed_local, routed_bus):
            return True
        dropped.inc()
        return False

    def _deliver_session_event(self, scope: ScopeState, frame: dict, payload: bytes, from_bus: bool) -> bool:
        """Send a session event frame to the channel's local subscribers (and other relays')."""
        channel = str(frame.get("channel", "")).strip()
        delivered = self._delivery.to_subscribers(scope, channel, payload)
        if not from_bus and self._backplane.cross_relay and scope.runtime_target_id is not None:
            self._delivery.publish_to_clients(scope, None, payload)
        if delivered:
            self._m.relay_session_event_frame_delivered.inc(delivered)
            return True
        self._m.relay_session_event_frame_dropped.inc()
        return False
