"""Frames other relays published to this one (docs/protocol.md §10, with replies and broadcasts fixed)."""

from __future__ import annotations

from viewport.relay import frames
from viewport.relay.frames import ClientKind, DaemonKind
from viewport.relay.interfaces import BusFrame, IBackplane
from viewport.relay.metrics import RelayMetrics
from viewport.relay.registry import Owner, Registry, ScopeState
from viewport.relay.routing.client_pipeline import ClientPipeline
from viewport.relay.routing.daemon_pipeline import DaemonPipeline
from viewport.relay.routing.delivery import Delivery
from viewport.relay.routing.events import RoutingLog

_RESPONSES = (DaemonKind.KEX_RESPONSE, DaemonKind.PAIRING_OFFER_RESPONSE, DaemonKind.PAIRING_REDEEM_RESPONSE)


class BusInbound:
    """Hands a bus frame to the local daemon (recording which relay asked) or routes it to local clients."""

    def __init__(
        self,
        *,
        registry: Registry,
        backplane: IBackplane,
        metrics: RelayMetrics,
        events: RoutingLog,
        delivery: Delivery,
        daemon_pipeline: DaemonPipeline,
        client_pipeline: ClientPipeline,
    ) -> None:
        self._registry = registry
        self._backplane = backplane
        self._m = metrics
        self._events = events
        self._delivery = delivery
        self._daemons = daemon_pipeline
        self._clients = client_pipeline

    def frame(self, bus: BusFrame, now_ms: float) -> None:
        """Route a frame another relay published to us."""
        if not bus.runtime_target_id:
            self._reject(bus, "missing_runtime_target")
            return
        payload = bus.payload.encode("utf-8")
        frame = frames.parse_frame(payload)
        scope = self._registry.get_or_create(bus.workspace_id, bus.runtime_target_id, now_ms)
        scope.touch(now_ms)
        scope.prune(now_ms)
        if bus.direction == "client_to_daemon":
            self._to_daemon(bus, scope, frame, payload, now_ms)
        else:
            self._to_clients(bus, scope, frame, payload, now_ms)

    def _to_daemon(self, bus: BusFrame, scope: ScopeState, frame: "dict | None", payload: bytes, now_ms: float) -> None:
        kind = frames.classify_client_frame(frame) if frame is not None else None
        if kind is None or frame is None:
            self._reject(bus, "invalid_client_frame")
            return
        request_id = str(frame.get("requestId", "")).strip()
        owner = Owner(None, bus.source_relay_id, now_ms)
        if kind is ClientKind.E2EE:
            session_id = frame.get("sessionId")
            current = scope.session_owners.get(session_id, now_ms)  # type: ignore[arg-type]
            if current is not None:
                if current.same_party(owner):
                    scope.session_owners.refresh(session_id, current, now_ms)  # type: ignore[arg-type]
                elif current.is_live():
                    self._reject(bus, "session_owned_elsewhere")
                    return
        elif kind is ClientKind.KEX_INIT and request_id:
            if not scope.kex_requests.claim(request_id, owner, now_ms):
                self._reject(bus, "request_id_owned_elsewhere")
                return
        elif kind in (ClientKind.PAIRING_OFFER_REQUEST, ClientKind.PAIRING_REDEEM_REQUEST):
            if not scope.pairing_requests.claim(request_id, owner, now_ms):
                self._reject(bus, "request_id_owned_elsewhere")
                return
        daemon = scope.daemon_open()
        if daemon is None:
            self._m.relay_bus_frames_dropped.inc()
            # The sender's relay still believed the daemon was here (its presence answer was
            # cached): tell that relay's clients of the scope instead of dropping in silence.
            notice = frames.daemon_unavailable(scope.workspace_id, scope.runtime_target_id, bus.machine_id)
            self._delivery.publish_to_clients(scope, bus.source_relay_id, notice.encode("utf-8"), lost_at_ms=now_ms)
            return
        daemon.peer.send_payload(payload)
        self._m.relay_bus_frames_to_daemon.inc()

    def _to_clients(self, bus: BusFrame, scope: ScopeState, frame: "dict | None", payload: bytes, now_ms: float) -> None:
        kind = frames.classify_daemon_frame(frame) if frame is not None else None
        if kind is None or frame is None:
            if frame is not None and self._relay_broadcast(bus, scope, frame, payload):
                return
            self._reject(bus, "invalid_daemon_frame")
            return
        if not self._daemons.within_budget(scope, kind, frame, now_ms, from_bus=True):
            self._m.relay_bus_frames_daemon_rate_limited.inc()
            self._reject(bus, "daemon_rate_limit")
            return
        routed = self._daemons.route(scope, kind, frame, payload, now_ms, from_bus=True)
        if routed or kind in _RESPONSES:
            self._m.relay_bus_frames_to_clients.inc()

    def _relay_broadcast(self, bus: BusFrame, scope: ScopeState, frame: dict, payload: bytes) -> bool:
        """
        Frames relays share beyond the daemon's own: a client's viewer presence (fanned out to
        this relay's subscribers) and the notice that the scope's daemon disconnected (sent to
        this relay's clients of the scope, and the backplane told to forget a presence of the
        scope it keeps naming the sender). True when the frame was one of them.
        """
        if frames.classify_client_frame(frame) is ClientKind.VIEWER_PRESENCE:
            self._clients.fan_out_viewer_presence(scope, str(frame["channel"]).strip(), payload, exclude=None)
            return True
        if frame.get("type") == "relay_status" and frame.get("code") == "DAEMON_UNAVAILABLE":
            self._backplane.forget_presence(bus.workspace_id, bus.runtime_target_id, bus.source_relay_id)
            if scope.daemon_open() is None:
                scope.remote_daemon_relay = None
                for client in scope.clients:
                    client.peer.send_payload(payload)
            return True
        return False

    def _reject(self, bus: BusFrame, reason: str) -> None:
        self._m.relay_bus_frames_rejected.inc()
        self._events.warn("bus_frame_rejected", workspaceId=bus.workspace_id, direction=bus.direction, reason=reason)
