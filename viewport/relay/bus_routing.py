"""Frames other relays published to this one (contract §6.8, with replies and broadcasts fixed)."""

from __future__ import annotations

from typing import Any, Callable

from twisted.logger import LogLevel

from viewport.relay import frames
from viewport.relay.frames import ClientKind, DaemonKind
from viewport.relay.interfaces import BusFrame
from viewport.relay.limits import Limiters
from viewport.relay.registry import Owner, Registry, ScopeState


class BusRouting:
    """
    The part of the router that routes frames received over the backplane.

    A mixin of ``Router``: it shares the router's registry, limiters, metrics and daemon-frame routing.
    """

    _registry: Registry
    _limiters: Limiters
    _m: Any
    _event: Callable[..., None]
    _route_daemon_frame: Callable[..., bool]
    _has_destination: Callable[..., bool]
    _fan_out_viewer_presence: Callable[..., None]
    _publish_to_clients: Callable[..., None]

    def bus_frame(self, bus: BusFrame, now_ms: float) -> None:
        """Route a frame another relay published to us (contract §6.8, reply path fixed)."""
        m = self._m
        if not bus.runtime_target_id:
            self._reject_bus(bus, "missing_runtime_target")
            return
        payload = bus.payload.encode("utf-8")
        frame = frames.parse_frame(payload)
        scope = self._registry.get_or_create(bus.workspace_id, bus.runtime_target_id, now_ms)
        scope.touch(now_ms)
        scope.prune(now_ms)
        if bus.direction == "client_to_daemon":
            ckind = frames.classify_client_frame(frame) if frame is not None else None
            if ckind is None or frame is None:
                self._reject_bus(bus, "invalid_client_frame")
                return
            request_id = str(frame.get("requestId", "")).strip()
            owner = Owner(None, bus.source_relay_id, now_ms)
            if ckind is ClientKind.E2EE:
                session_id = frame.get("sessionId")
                current = scope.session_owners.get(session_id, now_ms)  # type: ignore[arg-type]
                if current is not None:
                    if current.same_party(owner):
                        scope.session_owners.refresh(session_id, current, now_ms)  # type: ignore[arg-type]
                    elif current.is_live():
                        self._reject_bus(bus, "session_owned_elsewhere")
                        return
            elif ckind is ClientKind.KEX_INIT and request_id:
                if not scope.kex_requests.claim(request_id, owner, now_ms):
                    self._reject_bus(bus, "request_id_owned_elsewhere")
                    return
            elif ckind in (ClientKind.PAIRING_OFFER_REQUEST, ClientKind.PAIRING_REDEEM_REQUEST):
                if not scope.pairing_requests.claim(request_id, owner, now_ms):
                    self._reject_bus(bus, "request_id_owned_elsewhere")
                    return
            daemon = scope.daemon_open()
            if daemon is None:
                m.relay_bus_frames_dropped.inc()
                # The sender's relay still believed the daemon was here (its presence answer was
                # cached): tell that relay's clients of the scope instead of dropping in silence.
                notice = frames.daemon_unavailable(scope.workspace_id, scope.runtime_target_id, bus.machine_id)
                self._publish_to_clients(scope, bus.source_relay_id, notice.encode("utf-8"), now_ms)
                return
            daemon.peer.send_payload(payload)
            m.relay_bus_frames_to_daemon.inc()
            return
        dkind = frames.classify_daemon_frame(frame) if frame is not None else None
        if dkind is None or frame is None:
            if frame is not None and self._relay_broadcast(scope, frame, payload):
                return
            self._reject_bus(bus, "invalid_daemon_frame")
            return
        if self._has_destination(scope, dkind, frame, now_ms, from_bus=True) and not self._limiters.daemon.allow(
            bus.workspace_id, now_ms
        ):
            m.relay_bus_frames_daemon_rate_limited.inc()
            self._reject_bus(bus, "daemon_rate_limit")
            return
        routed = self._route_daemon_frame(scope, dkind, frame, payload, now_ms, from_bus=True)
        if routed or dkind in (
            DaemonKind.KEX_RESPONSE,
            DaemonKind.PAIRING_OFFER_RESPONSE,
            DaemonKind.PAIRING_REDEEM_RESPONSE,
        ):
            m.relay_bus_frames_to_clients.inc()

    def _relay_broadcast(self, scope: ScopeState, frame: dict, payload: bytes) -> bool:
        """
        Frames relays share beyond the daemon's own: a client's viewer presence (fanned out to
        this relay's subscribers) and the notice that the scope's daemon disconnected (sent to
        this relay's clients of the scope). True when the frame was one of them.
        """
        if frames.classify_client_frame(frame) is ClientKind.VIEWER_PRESENCE:
            self._fan_out_viewer_presence(scope, str(frame["channel"]).strip(), payload, exclude=None)
            return True
        if frame.get("type") == "relay_status" and frame.get("code") == "DAEMON_UNAVAILABLE":
            if scope.daemon_open() is None:
                scope.remote_daemon_relay = None
                for client in scope.clients:
                    client.peer.send_payload(payload)
            return True
        return False

    def _reject_bus(self, bus: BusFrame, reason: str) -> None:
        self._m.relay_bus_frames_rejected.inc()
        self._event(
            LogLevel.warn,
            "bus_frame_rejected",
            workspaceId=bus.workspace_id,
            direction=bus.direction,
            reason=reason,
        )
