"""One relay's wired-up state: config, registry, router, admission, metrics, and its periodic work."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Set

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Site

from viewport.relay.config import RelayConfig
from viewport.relay.interfaces import BusFrame, IBackplane
from viewport.relay.limits import FixedWindowLimiter
from viewport.relay.logs import JsonLineObserver
from viewport.relay.metrics import RelayMetrics
from viewport.relay.registry import Registry
from viewport.relay.limits import Limiters
from viewport.relay.router import Router, WorkerForward
from viewport.relay.upgrade import OriginPolicy, TrustedProxies

HEARTBEAT_SLICES = 10
SHUTDOWN_CODE = 1001
SHUTDOWN_REASON = "relay shutting down"


class Relay:
    """
    Everything one relay process knows, without any listening socket.

    The protocols reach the router, admission and limits through it; the service drives its
    heartbeat and cleanup ticks and its shutdown.
    """

    _log = Logger()

    def __init__(
        self,
        *,
        config: RelayConfig,
        clock: IReactorTime,
        backplane: IBackplane,
        admission: Any,
        metrics: Optional[RelayMetrics] = None,
        log_observer: Optional[JsonLineObserver] = None,
        worker_forward: Optional[WorkerForward] = None,
        site_factory: Optional[Callable[["Relay"], Site]] = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.backplane = backplane
        self.admission = admission
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self.log_observer = log_observer
        self.started_at_ms = self.now_ms()
        self.registry = Registry(config.pairing_request_track_max, config.session_owner_track_max)
        self.limiters = Limiters(config)
        self.upgrade_limiter = FixedWindowLimiter(
            config.upgrade_rate_per_minute, 60_000, config.upgrade_bucket_max
        )
        self.trusted_proxies = TrustedProxies(config.trusted_proxies)
        self.origin_policy = OriginPolicy(config.allowed_origins)
        self.router = Router(
            config=config,
            registry=self.registry,
            backplane=backplane,
            metrics=self.metrics,
            limiters=self.limiters,
            worker_forward=worker_forward,
        )
        self.metrics.relay_ready.set_function(lambda: float(self.accepting and bool(self.backplane.healthy)))
        self.metrics.relay_backplane_healthy.set_function(lambda: float(bool(self.backplane.healthy)))
        self.connections: Set[Any] = set()
        self._heartbeat_slots: List[Set[Any]] = [set() for _ in range(HEARTBEAT_SLICES)]
        self._next_slot = 0
        self._tick = 0
        self.accepting = True
        if site_factory is None:
            from viewport.relay.web import make_site

            site_factory = make_site
        self.site = site_factory(self)

    def now_ms(self) -> float:
        """The injected clock, in milliseconds."""
        return self.clock.seconds() * 1000.0

    def deliver_bus_frame(self, frame: BusFrame) -> None:
        """Entry point for frames the backplane received from other relays."""
        try:
            self.router.bus_frame(frame, self.now_ms())
        except Exception:
            self._log.failure("{relay_event}", relay_event="bus_frame_error")

    def path_changed(self, working: bool) -> None:
        """Entry point for the backplane losing (False) or regaining (True) its inbound path."""
        try:
            self.router.path_changed(working, self.now_ms())
        except Exception:
            self._log.failure("{relay_event}", relay_event="path_change_error")

    def check_remote_relays(self) -> None:
        """Periodic (every second): notice relays that died without a goodbye; retry owed notices."""
        try:
            d = self.router.check_remote_relays(self.now_ms())
            if d is not None:
                d.addErrback(lambda f: self._log.failure("{relay_event}", f, relay_event="liveness_check_error"))
        except Exception:
            self._log.failure("{relay_event}", relay_event="liveness_check_error")

    def add_connection(self, protocol: Any) -> None:
        """Track an open socket, in one of the heartbeat's slices (round robin)."""
        slot = self._next_slot
        self._next_slot = (slot + 1) % HEARTBEAT_SLICES
        protocol.heartbeat_slot = slot
        self.connections.add(protocol)
        self._heartbeat_slots[slot].add(protocol)

    def remove_connection(self, protocol: Any) -> None:
        """Forget a closed socket."""
        self.connections.discard(protocol)
        self._heartbeat_slots[getattr(protocol, "heartbeat_slot", 0)].discard(protocol)

    def heartbeat(self) -> None:
        """
        One heartbeat tick: ping one slice of the registered sockets, drop idle ones and those
        that missed their last pong.

        The service ticks ``HEARTBEAT_SLICES`` times per ping interval, so every socket is pinged
        once per interval but thousands of sockets are never pinged (and answer) in one burst.
        A ping's pong deadline is checked ``pong_timeout_ms`` after it was sent (not at a later
        tick), so a dead peer is noticed within the configured timeout.
        """
        try:
            now = self.now_ms()
            config = self.config
            slot = self._tick % HEARTBEAT_SLICES
            self._tick += 1
            pinged: List[Any] = []
            for protocol in list(self._heartbeat_slots[slot]):
                conn = protocol.conn
                if conn is None or not conn.registered:
                    continue
                if now - conn.last_activity_ms > config.idle_timeout_ms:
                    self._terminate(protocol, "idle timeout")
                    continue
                if conn.awaiting_pong:
                    # Re-pinging would restart the outstanding ping's clock, so a pong timeout
                    # longer than the ping interval would never expire; its own check decides.
                    continue
                conn.awaiting_pong = True
                conn.ping_sent_ms = now
                try:
                    protocol.send_ping()
                except Exception:
                    self._terminate(protocol, "ping failed")
                    continue
                pinged.append(protocol)
            if pinged:
                self.clock.callLater(
                    config.pong_timeout_ms / 1000.0, self._check_pongs, pinged, now
                )
            if slot == 0:
                self.limiters.sweep(now)
                self.upgrade_limiter.sweep(now)
            self.router.reset_log_budget()
        except Exception:
            self._log.failure("{relay_event}", relay_event="heartbeat_error")

    def _check_pongs(self, pinged: List[Any], sent_ms: float) -> None:
        try:
            for protocol in pinged:
                conn = protocol.conn
                if conn is None or not conn.registered:
                    continue
                if conn.awaiting_pong and conn.ping_sent_ms == sent_ms:
                    self._terminate(protocol, "heartbeat timeout")
        except Exception:
            self._log.failure("{relay_event}", relay_event="heartbeat_error")

    def _terminate(self, protocol: Any, reason: str) -> None:
        if reason == "idle timeout":
            self.metrics.relay_ws_idle_terminated.inc()
        elif reason == "heartbeat timeout":
            self.metrics.relay_ws_stale_terminated.inc()
        self._log.warn("{relay_event}", relay_event="ws_terminated", reason=reason)
        protocol.terminate()

    def cleanup(self) -> None:
        """Evict empty scopes and refresh the gauges."""
        try:
            self.router.evict_empty_scopes(self.now_ms())
        except Exception:
            self._log.failure("{relay_event}", relay_event="cleanup_error")

    def shutdown(self, grace_seconds: float) -> "Deferred[None]":
        """Refuse new upgrades, close every socket with 1001, fire when all are gone (or grace ends)."""
        self.accepting = False
        waiting = []
        for protocol in list(self.connections):
            closed: Deferred[None] = Deferred()
            protocol.on_closed = closed
            waiting.append(closed)
            protocol.close(SHUTDOWN_CODE, SHUTDOWN_REASON)
        if not waiting:
            return succeed(None)
        done: Deferred[None] = Deferred()
        timer = self.clock.callLater(grace_seconds, self._abort_remaining, done)

        def all_closed(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        DeferredList(waiting).addCallback(all_closed)
        return done

    def _abort_remaining(self, done: "Deferred[None]") -> None:
        for protocol in list(self.connections):
            protocol.terminate()
        if not done.called:
            done.callback(None)
