"""
The fault bench for issue 8: numbered e2ee envelopes flow both ways between a daemon on relay A and a
client on relay B (``tests.fault_peers``), at a steady rate, while a fault strikes the backplane or a relay;
then every frame is accounted for (delivered, lost with a signal, lost silently; duplicated, reordered) by
``tests.fault_ledger``, with the time until traffic flows again and how long ``/ready`` answered wrongly.
"""

from __future__ import annotations

import atexit
import os
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThread

from tests.fault_ledger import Ledger, Report, classify_client_to_daemon, classify_daemon_to_client, wrong_ready_seconds
from tests.fault_peers import RATE, RUNTIME_TARGET, TrafficClient, TrafficDaemon, now
from tests.pg_server import PrivateCluster, ScratchDatabase
from tests.redis_cluster import RedisCluster, start_cluster
from tests.redis_server import RedisServer, free_port
from tests.relay_cluster import Backplane, BusOnScratchDatabase, all_ready, ready_status, relay_id_of
from tests.support import RelayProcess, fetch_metrics, poll_until, start_relays
from viewport.relay.backplane.cluster_slots import key_slot

#: After the senders stop: wait until everything arrived, or nothing arrived for QUIET_SECONDS, at most DRAIN_SECONDS.
QUIET_SECONDS = 1.0
DRAIN_SECONDS = 10.0
READY_PERIOD = 0.05
PRESENCE_PERIOD = 0.1
#: Limits high enough that the rate limiters never drop or refuse the generated traffic.
UNLIMITED: Dict[str, Any] = {
    "RELAY_RUNTIME_RATE_PER_MINUTE": "100000000",
    "RELAY_RUNTIME_RATE_PER_MINUTE_WORKSPACE": "100000000",
    "RELAY_DAEMON_RUNTIME_RATE_PER_MINUTE": "100000000",
    "RELAY_KEX_INIT_RATE_PER_MINUTE": "10000000",
}
METRICS = ("relay_bus_publish_failed_total", "relay_bus_frames_dropped_total", "relay_session_frame_dropped_total",
           "relay_key_exchange_response_dropped_total", "relay_client_messages_dropped_total",
           "relay_bus_frames_out_of_order_total", "relay_bus_frames_missing_total")


class Sampler:
    """Calls ``probe`` every ``period`` seconds (each call awaited) and keeps (answer time, value)."""

    def __init__(self, probe: Callable[[], "Deferred[Any]"], period: float) -> None:
        self.samples: List[Tuple[float, Any]] = []
        self._probe = probe
        self._loop = LoopingCall(self._sample)
        self._period = period
        self._done: Optional[Deferred[Any]] = None

    def start(self) -> None:
        """Start sampling now."""
        self._done = self._loop.start(self._period, now=True)

    @inlineCallbacks
    def stop(self) -> Any:
        """Stop, once the sample in progress has its answer."""
        if self._loop.running:
            self._loop.stop()
        if self._done is not None:
            yield self._done

    @inlineCallbacks
    def _sample(self) -> Any:
        try:
            value = yield self._probe()
        except Exception:
            value = None
        self.samples.append((now(), value))


@dataclass
class Fault:
    """A fault: ``inject(bench)`` strikes at once and fires when the fault is over (the path is back)."""

    name: str
    inject: Callable[["Bench"], "Deferred[Any]"]
    mode: str
    breaks_backplane: bool = False
    stops_relay_a: bool = False
    at: float = 2.0
    duration: float = 10.0


class Bench:
    """
    Two relays A and B on one backplane: a private redis-server, a private Redis Cluster (mode
    ``redis-cluster``, 3 masters and 3 replicas; ``redis-cluster-tls`` on TLS ports only), or viewport-bus on a
    private PostgreSQL.
    """

    def __init__(self, mode: str, rate: float = RATE) -> None:
        self.mode = mode
        self.rate = rate
        self.workspace = f"faults-{uuid.uuid4().hex[:8]}"
        self.to_daemon = Ledger()
        self.to_client = Ledger()
        self.redis: Optional[RedisServer] = None
        self.redis_cluster: Optional[RedisCluster] = None
        self.cluster: Optional[PrivateCluster] = None
        self.bus: Optional[BusOnScratchDatabase] = None
        self.backplane: Optional[Backplane] = None
        self.relays: Dict[str, RelayProcess] = {}
        self.daemon: Optional[TrafficDaemon] = None
        self.client: Optional[TrafficClient] = None
        self.idle: Optional[TrafficClient] = None
        self.ready: Dict[str, Sampler] = {}
        self.presence: Optional[Sampler] = None
        self.a_exited: Optional[float] = None

    @property
    def a(self) -> RelayProcess:
        """Relay A (the daemon's)."""
        return self.relays["A"]

    @property
    def b(self) -> RelayProcess:
        """Relay B (the clients')."""
        return self.relays["B"]

    @inlineCallbacks
    def setup(self) -> Any:
        """Start the backplane, both relays, the daemon on A and both clients on B, keyed."""
        atexit.register(self._last_resort)
        if self.mode == "redis":
            self.redis = RedisServer().start()
            self.backplane = Backplane("redis", redis_port=self.redis.port)
        elif self.mode in ("redis-cluster", "redis-cluster-tls"):
            self.redis_cluster = yield deferToThread(start_cluster, tls=self.mode == "redis-cluster-tls")
            self.backplane = Backplane("redis-cluster", redis_cluster=self.redis_cluster)
        else:
            self.cluster = PrivateCluster()
            self.cluster.start()
            database = ScratchDatabase(self.cluster.url)
            self.bus = BusOnScratchDatabase(database.url, port=free_port())
            yield self.bus.start()
            self.backplane = Backplane("server", bus_url=self.bus.url)
        self.relays = {"A": self.backplane.relay("a", **UNLIMITED), "B": self.backplane.relay("b", **UNLIMITED)}
        yield start_relays(*self.relays.values())
        self.a.output.ended.addBoth(self._a_exited)
        yield all_ready(self.relays.values())
        self.daemon = TrafficDaemon(self.a.url, self.workspace, self.rate, self.to_daemon, self.to_client)
        yield self.daemon.connect()
        yield self.backplane.presence_at(self.workspace, RUNTIME_TARGET, self.a)
        self.client = TrafficClient(self.b.url, self.workspace, self.rate, self.to_daemon, self.to_client)
        self.idle = TrafficClient(self.b.url, self.workspace, 0, Ledger(), Ledger(), name="idle", rekey=False)
        yield self.client.connect()
        yield self.idle.connect()
        yield self.client.keyed(15)
        yield self.idle.keyed(15)

    @inlineCallbacks
    def run(self, fault: Optional[Fault], duration: float = 10.0, fault_at: float = 2.0) -> Any:
        """Traffic for ``duration`` seconds, the fault at ``fault_at``; then drain and count."""
        assert self.daemon is not None and self.client is not None and self.idle is not None
        assert self.backplane is not None
        backplane = self.backplane
        self.ready = {name: Sampler(partial(ready_status, relay), READY_PERIOD) for name, relay in self.relays.items()}
        if fault is not None and fault.stops_relay_a:
            self.presence = Sampler(partial(backplane.presence, self.workspace, RUNTIME_TARGET), PRESENCE_PERIOD)
        for sampler in self._samplers():
            sampler.start()
        self.daemon.start_sending()
        self.client.start_sending()
        started = now()
        fault_start: Optional[float] = None
        fault_end: Optional[float] = None
        if fault is not None:
            yield deferLater(reactor, fault_at, lambda: None)
            fault_start = now()
            try:
                yield fault.inject(self).addTimeout(duration + 10, reactor)
                fault_end = now()
            except Exception as error:  # the fault never ended: report it, count anyway
                print(f"fault {fault.name} did not end: {error!r}")
        remaining = duration - (now() - started)
        if remaining > 0:
            yield deferLater(reactor, remaining, lambda: None)
        self.client.stop_sending()
        self.daemon.stop_sending()
        stopped = now()
        in_flight = (self.to_daemon.in_flight(), self.to_client.in_flight())
        yield poll_until(lambda: self._drained(stopped) is not None, DRAIN_SECONDS + 5, "drained")
        drained = now() - stopped
        settled = bool(self._drained(stopped))
        for sampler in self._samplers():
            yield sampler.stop()
        report = Report(
            fault=fault.name if fault is not None else "no fault, steady load",
            mode=self.mode,
            client_to_daemon=classify_client_to_daemon(self.to_daemon, self.client.refusals, self.client.closes,
                                                       fault_start, stopped, settled),
            daemon_to_client=classify_daemon_to_client(self.to_client, self.client.signals, self.client.abandoned,
                                                       fault_start, stopped, settled),
            fault_lasted=None if fault_start is None or fault_end is None else fault_end - fault_start,
            in_flight_at_stop=in_flight,
            delivered_after_stop=(sum(1 for at, _ in self.to_daemon.first_arrivals if at > stopped),
                                  sum(1 for at, _ in self.to_client.first_arrivals if at > stopped)),
            drained_after=drained,
            kex=(self.client.kex_sent, self.client.kex_answered, self.client.stale_kex),
            statuses=dict(self.client.statuses),
            load=os.getloadavg(),
        )
        self._timings(report, fault, fault_start, fault_end, stopped)
        self._notes(report)
        yield self._metrics(report)
        return report

    def _a_exited(self, result: Any) -> Any:
        self.a_exited = now()
        return result

    def _samplers(self) -> List[Sampler]:
        return list(self.ready.values()) + ([self.presence] if self.presence is not None else [])

    def _drained(self, stopped: float) -> Optional[bool]:
        """True once everything arrived or nothing did for QUIET_SECONDS; False after DRAIN_SECONDS; else None."""
        if not self.to_daemon.in_flight() and not self.to_client.in_flight():
            return True
        arrivals = [at for at, _ in self.to_daemon.first_arrivals[-1:] + self.to_client.first_arrivals[-1:]]
        if now() - max(arrivals + [stopped]) > QUIET_SECONDS:
            return True
        return False if now() > stopped + DRAIN_SECONDS else None

    def _timings(self, report: Report, fault: Optional[Fault], start: Optional[float], end: Optional[float],
                 stopped: float) -> None:
        assert self.idle is not None and self.daemon is not None
        broken = (start, end if end is not None else stopped) if fault and fault.breaks_backplane and start else None
        for name, sampler in self.ready.items():
            dead_after = start if fault is not None and fault.stops_relay_a and name == "A" else None
            report.ready_wrong[name] = wrong_ready_seconds(sampler.samples, broken, dead_after, stopped)
        if start is None:
            return
        report.idle_told_after = self.idle.signal_after(start)
        if self.presence is not None:
            moved = [at for at, relay_id in self.presence.samples if at >= start and relay_id == relay_id_of(self.b)]
            report.presence_moved_after = min(moved) - start if moved else None
            back = [at for at, url in self.daemon.opened_at if at >= start and url == self.b.url]
            report.daemon_back_after = min(back) - start if back else None
            if self.a_exited is not None:
                report.a_exited_after = self.a_exited - start

    def _notes(self, report: Report) -> None:
        """Which key exchanges reached the daemon, and which sessions the silently lost daemon frames were for."""
        answered = [key[1:] for _, key in self.to_daemon.first_arrivals if key.startswith("ktraffic-")]
        report.notes.append(f"key exchanges that reached the daemon: {answered[:5]}{' …' if len(answered) > 5 else ''}"
                            f" ({len(answered)} of {self.client.kex_sent if self.client else 0})")
        silent = set(report.daemon_to_client.silent_keys)
        sessions: Dict[str, int] = {}
        for frame in self.to_client.envelopes():
            if frame.key in silent:
                sessions[frame.session] = sessions.get(frame.session, 0) + 1
        if sessions:
            report.notes.append(f"silent d→c envelopes by session: {sessions}")

    @inlineCallbacks
    def _metrics(self, report: Report) -> Any:
        for name, relay in self.relays.items():
            if relay.output.ended.called:
                continue
            try:
                values = yield fetch_metrics(relay)
            except Exception:
                continue
            report.metrics[name] = {metric.replace("relay_", "").replace("_total", ""): values.get(metric, 0.0)
                                    for metric in METRICS}

    @inlineCallbacks
    def close(self) -> Any:
        """Stop every peer, probe and process this bench started, whatever state they are in."""
        steps: List[Callable[[], Any]] = [sampler.stop for sampler in self._samplers()]
        steps += [peer.stop for peer in (self.daemon, self.client, self.idle) if peer is not None]
        steps += [partial(stop_process, relay) for relay in self.relays.values()]
        if self.redis is not None:
            steps.append(self.redis.stop)
        if self.redis_cluster is not None:
            steps.append(self.redis_cluster.stop)
        if self.bus is not None:
            steps.append(partial(stop_bus, self.bus))
        if self.cluster is not None:
            steps.append(self.cluster.destroy)
        for step in steps:
            try:
                yield maybeDeferred(step)
            except Exception as error:
                print(f"fault bench cleanup: {step!r} failed: {error!r}")
        atexit.unregister(self._last_resort)

    def _last_resort(self) -> None:
        """At interpreter exit, if ``close`` never ran: stop the servers a dead test would leave behind."""
        if self.redis is not None:
            self.redis.stop()
        if self.redis_cluster is not None:
            self.redis_cluster.stop()
        if self.cluster is not None:
            self.cluster.destroy()


@inlineCallbacks
def stop_process(relay: RelayProcess, timeout: float = 15.0) -> Any:
    """SIGTERM a relay and wait for it to exit; SIGKILL it if it is still there after ``timeout`` seconds."""
    if relay.transport is None or relay.output.ended.called:
        return
    relay.signal("TERM")
    try:
        yield poll_until(lambda: relay.output.ended.called, timeout, "relay exited")
    except AssertionError:
        relay.kill()
        yield poll_until(lambda: relay.output.ended.called, 10, "relay killed")


@inlineCallbacks
def stop_bus(bus: BusOnScratchDatabase, timeout: float = 10.0) -> Any:
    """SIGTERM the bus and wait for it to exit; SIGKILL it if it is still there after ``timeout`` seconds."""
    process = bus.process
    if process.transport is None or process.output.ended.called:
        return
    process.stop()
    try:
        yield poll_until(lambda: process.output.ended.called, timeout, "bus exited")
    except AssertionError:
        process.kill()
        yield poll_until(lambda: process.output.ended.called, 10, "bus killed")


@inlineCallbacks
def measure(mode: str, fault: Optional[Fault], duration: float = 10.0, fault_at: float = 2.0,
            rate: float = RATE) -> Any:
    """Set up a bench, run the traffic through the fault, clean up; the Report."""
    bench = Bench(mode, rate)
    try:
        yield bench.setup()
        return (yield bench.run(fault, duration, fault_at))
    finally:
        yield bench.close()


# --- the faults ------------------------------------------------------------------------------------


def redis_killed(down_for: float = 2.0) -> Fault:
    """Redis kill -9, started again on the same port ``down_for`` seconds later (with no data)."""

    @inlineCallbacks
    def inject(bench: Bench) -> Any:
        assert bench.redis is not None
        bench.redis.kill()
        yield deferLater(reactor, down_for, lambda: None)
        yield deferToThread(bench.redis.start)

    return Fault(f"Redis kill -9, restart after {down_for:g} s", inject, "redis", breaks_backplane=True)


def redis_paused(paused_for: float = 5.0) -> Fault:
    """Redis SIGSTOP for ``paused_for`` seconds, then SIGCONT (a hung server: sockets stay open)."""

    @inlineCallbacks
    def inject(bench: Bench) -> Any:
        assert bench.redis is not None
        bench.redis.pause()
        yield deferLater(reactor, paused_for, lambda: None)
        bench.redis.resume()

    return Fault(f"Redis SIGSTOP {paused_for:g} s", inject, "redis", breaks_backplane=True, duration=12.0)


def cluster_failover_then_master_killed(pause: float = 2.0, tls: bool = False) -> Fault:
    """
    On the shard holding the scope: ``CLUSTER FAILOVER`` on its replica, ``pause`` seconds of traffic, then
    that shard's (new) master SIGKILLed. Over once every node agrees the former master is master again.
    With ``tls`` the cluster listens on TLS ports only and the relays use ``rediss+cluster://``.
    """

    @inlineCallbacks
    def inject(bench: Bench) -> Any:
        cluster, backplane = bench.redis_cluster, bench.backplane
        assert cluster is not None and backplane is not None
        slot = key_slot(backplane.presence_key(bench.workspace, RUNTIME_TARGET))
        master = cluster.master_of(slot)
        replica = cluster.replicas_of(slot)[0]
        yield deferToThread(cluster.failover, replica)
        yield deferLater(reactor, pause, lambda: None)
        cluster.kill(replica)
        yield deferToThread(cluster.wait_for_promotion, master)

    over = " over TLS" if tls else ""
    return Fault(f"Redis Cluster{over}: CLUSTER FAILOVER on the scope's replica, {pause:g} s later its master SIGKILLed",
                 inject, "redis-cluster-tls" if tls else "redis-cluster", breaks_backplane=True, duration=14.0)


def relay_a_killed(mode: str) -> Fault:
    """Relay A SIGKILL; the daemon reconnects to B a second later. Over when the daemon is connected to B."""

    @inlineCallbacks
    def inject(bench: Bench) -> Any:
        assert bench.daemon is not None
        bench.daemon.failover_url = bench.b.url
        bench.a.signal("KILL")
        yield _daemon_on_b(bench, 15.0)

    return Fault("relay A SIGKILL", inject, mode, stops_relay_a=True)


def relay_a_terminated_with_stuck_daemon(mode: str) -> Fault:
    """
    Relay A SIGTERM while its daemon has stopped reading (it never answers the close handshake); the
    daemon reconnects to B a second after it notices its connection is gone.
    """

    @inlineCallbacks
    def inject(bench: Bench) -> Any:
        daemon = bench.daemon
        assert daemon is not None and daemon.conn is not None
        daemon.failover_url = bench.b.url
        daemon.conn.pause_reading()
        bench.a.signal("TERM")
        yield _daemon_on_b(bench, 20.0)

    return Fault("relay A SIGTERM, daemon not reading", inject, mode, stops_relay_a=True, duration=15.0)


def _daemon_on_b(bench: Bench, timeout: float) -> "Deferred[Any]":
    daemon = bench.daemon
    assert daemon is not None
    return poll_until(lambda: daemon.conn is not None and daemon.conn.is_open and daemon.url == bench.b.url,
                      timeout, "daemon connected to B")


def bus_restarted() -> Fault:
    """viewport-bus SIGTERM, then started again on the same port at once."""

    @inlineCallbacks
    def inject(bench: Bench) -> Any:
        assert bench.bus is not None
        yield bench.bus.stop()
        yield bench.bus.start()

    return Fault("viewport-bus restart", inject, "server", breaks_backplane=True)


def postgres_restarted() -> Fault:
    """The bus's PostgreSQL stopped (fast shutdown) and started again at once."""

    @inlineCallbacks
    def inject(bench: Bench) -> Any:
        assert bench.cluster is not None
        yield deferToThread(bench.cluster.stop)
        yield deferToThread(bench.cluster.start)

    return Fault("PostgreSQL restart", inject, "server", breaks_backplane=True)


__all__ = [
    "RATE",
    "Bench",
    "Fault",
    "Report",
    "bus_restarted",
    "cluster_failover_then_master_killed",
    "measure",
    "postgres_restarted",
    "redis_killed",
    "redis_paused",
    "relay_a_killed",
    "relay_a_terminated_with_stuck_daemon",
]
