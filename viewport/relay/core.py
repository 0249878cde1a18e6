"""One relay's domain objects wired together, and the periodic work they share (no socket, no site)."""

from __future__ import annotations

from typing import Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from viewport.relay.config import RelayConfig
from viewport.relay.heartbeat import HEARTBEAT_SLICES, OpenSockets
from viewport.relay.interfaces import BusFrame, IAdmission, IBackplane
from viewport.relay.limits import Limiters
from viewport.logs import JsonLineObserver
from viewport.relay.metrics import RelayMetrics
from viewport.relay.registry import Registry
from viewport.relay.router import Router, WorkerForward
from viewport.relay.upgrade_gate import UpgradeGate

__all__ = ["HEARTBEAT_SLICES", "Relay"]


class Relay:
    """
    The composition root of one relay: configuration, clock, backplane and admission come in; the
    registry, limiters, upgrade gate, router and open-socket set are built here. The service drives
    ``heartbeat``, ``cleanup`` and ``check_remote_relays``, and hands the backplane's frames and path
    changes in; the sockets get the parts they use (``protocol.RelayPortFactory``).
    """

    _log = Logger()

    def __init__(
        self,
        *,
        config: RelayConfig,
        clock: IReactorTime,
        backplane: IBackplane,
        admission: IAdmission,
        metrics: Optional[RelayMetrics] = None,
        log_observer: Optional[JsonLineObserver] = None,
        worker_forward: Optional[WorkerForward] = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.backplane = backplane
        self.admission = admission
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self.log_observer = log_observer
        self.started_at_ms = self.now_ms()
        self.registry = Registry(config.limits.pairing_request_track_max, config.limits.session_owner_track_max)
        self.limiters = Limiters(config.limits)
        self.gate = UpgradeGate(config=config, registry=self.registry, metrics=self.metrics)
        self.router = Router(
            config=config,
            registry=self.registry,
            backplane=backplane,
            metrics=self.metrics,
            limiters=self.limiters,
            worker_forward=worker_forward,
        )
        self.sockets = OpenSockets(heartbeat=config.heartbeat, clock=clock, metrics=self.metrics)
        self.metrics.relay_ready.set_function(lambda: float(self.accepting and bool(self.backplane.healthy)))
        self.metrics.relay_backplane_healthy.set_function(lambda: float(bool(self.backplane.healthy)))

    @property
    def accepting(self) -> bool:
        """False once the relay drains: upgrades are refused and /ready answers 503."""
        return self.gate.accepting

    def now_ms(self) -> float:
        """The injected clock, in milliseconds."""
        return self.clock.seconds() * 1000.0

    def deliver_bus_frame(self, frame: BusFrame) -> None:
        """Entry point for frames the backplane received from other relays."""
        try:
            self.router.bus_frame(frame, self.now_ms())
        except Exception:
            self._log.failure("handling a bus frame failed", relay_event="bus_frame_error")

    def path_changed(self, working: bool) -> None:
        """Entry point for the backplane losing (False) or regaining (True) its inbound path."""
        try:
            self.router.path_changed(working, self.now_ms())
        except Exception:
            self._log.failure("handling a bus path change failed", relay_event="path_change_error")

    def frames_missed(self, frame: BusFrame) -> None:
        """Entry point for the backplane noticing frames of ``frame``'s stream lost or out of order."""
        try:
            self.router.frames_missed(frame, self.now_ms())
        except Exception:
            self._log.failure("handling missed bus frames failed", relay_event="bus_frame_error")

    def check_remote_relays(self) -> None:
        """Periodic (every second): notice relays that died without a goodbye; retry owed notices."""
        try:
            d = self.router.check_remote_relays(self.now_ms())
            if d is not None:
                d.addErrback(lambda f: self._log.failure("checking remote relays' liveness failed", f, relay_event="liveness_check_error"))
        except Exception:
            self._log.failure("checking remote relays' liveness failed", relay_event="liveness_check_error")

    def heartbeat(self) -> None:
        """One heartbeat tick: a slice of the sockets pinged; once per interval the limiters swept."""
        try:
            now = self.now_ms()
            if self.sockets.tick(now) == 0:
                self.limiters.sweep(now)
                self.gate.sweep(now)
            self.router.reset_log_budget()
        except Exception:
            self._log.failure("heartbeat tick failed", relay_event="heartbeat_error")

    def cleanup(self) -> None:
        """Evict empty scopes and refresh the gauges."""
        try:
            self.router.evict_empty_scopes(self.now_ms())
        except Exception:
            self._log.failure("scope cleanup failed", relay_event="cleanup_error")

    def shutdown(self, grace_seconds: float) -> "Deferred[None]":
        """Refuse new upgrades, close every socket with 1001, fire when all are gone (or grace ends)."""
        self.gate.accepting = False
        return self.sockets.close_all(grace_seconds)
