"""
The issue-8 cross-relay throughput figure: several workspaces, many frames in flight, one direction at a time.

Daemons on relay A, their clients on relay B (one client per workspace, each holding one session); after the
key exchanges, every workspace keeps ``window`` numbered ~256 B e2ee envelopes in flight in one direction
(client→daemon, then daemon→clients) for ``duration`` seconds, then the senders stop and the receivers drain.
Per direction it gives frames/s delivered during the sending period, the one-way latency of every frame
(send to receipt in the generator, one clock), the CPU per frame of each relay and of the backplane over the
sending period, and frames LOST: sent − received once the drain ended (everything arrived, or nothing more
for a second, or 10 s).

"In flight" is counted from the highest frame received, like a cumulative acknowledgement: a relay that
drops frames does not shrink the window (each lost frame would otherwise hold a slot for ever), and a
stream that receives nothing for half a second while frames are outstanding writes them off (a "stall")
so it keeps going. Loss is still counted at the end, frame by frame.

The same load runs on a single relay (daemons and clients on one, no backplane) to give the baseline the
added latency is measured against. The processes are ours (``RelayChild``, ``BusChild``) or the original
relay's (``benchmarks.original``); ``cross_relay.py --issue8`` / ``--against-original`` drives this
module and ``flow_report.py`` prints the tables.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from benchmarks.cross_relay import CrossRelayGenerator, _Envelopes, _relay_env, seq_of
from benchmarks.harness import BusChild, CpuMeter, GeneratorChild, PySpyRecorder, RelayChild, ScratchDatabase, redis_server_pid
from benchmarks.original import CONNECTION_LIMITS, FakePlatformChild, OriginalRelay

DIRECTIONS = ("client_to_daemon", "daemon_to_clients")
IMPLEMENTATIONS = ("ours", "original")
#: A stream that received nothing for this long while frames are outstanding writes them off.
STALL_SECONDS = 0.5
#: Drain: stop once nothing arrived for QUIET_SECONDS, or after DRAIN_SECONDS in all.
QUIET_SECONDS = 1.0
DRAIN_SECONDS = 10.0
TICK_SECONDS = 0.05

Relay = Union[RelayChild, OriginalRelay]


# -- generator process ---------------------------------------------------------------------------


class _Stream:
    """One workspace, one direction: numbered envelopes from ``sender`` to ``receiver``, ``window`` in flight."""

    def __init__(self, sender: Any, receiver: Any, envelopes: _Envelopes, window: int, first_seq: int) -> None:
        self.sender = sender
        self.envelopes = envelopes
        self.window = window
        self.first_seq = first_seq
        self.sent_at: List[float] = []
        self.got = bytearray()
        self.frontier = 0  # index after the highest frame received
        self.received = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.stalls = 0
        self.written_off = 0
        self.latencies: List[float] = []
        self.unexpected: List[str] = []
        self.sending = False
        self.last_receipt = 0.0
        receiver.on_message = self._received
        receiver.after_read = self._refill
        sender.on_message = self._unexpected
        sender.after_read = None

    @property
    def sent(self) -> int:
        """Frames written so far."""
        return len(self.sent_at)

    @property
    def next_seq(self) -> int:
        """The first sequence number a later stream on the same path may use."""
        return self.first_seq + self.sent + 1

    def start(self) -> None:
        """Fill the window."""
        self.sending = True
        self.last_receipt = time.perf_counter()
        self._send(self.window)

    def _send(self, count: int) -> None:
        first = self.first_seq + self.sent + 1
        frame = self.envelopes.frame
        data = b"".join(frame(seq) for seq in range(first, first + count))
        now = time.perf_counter()
        self.sent_at.extend([now] * count)
        self.got.extend(bytes(count))
        self.sender.write(data)

    def _received(self, ws: Any, payload: bytes) -> None:
        seq = seq_of(payload)
        index = -1 if seq is None else seq - self.first_seq - 1
        if index < 0 or index >= len(self.sent_at):
            self._unexpected(ws, payload)
            return
        now = time.perf_counter()
        self.last_receipt = now
        if self.got[index]:
            self.duplicates += 1
            return
        self.got[index] = 1
        self.received += 1
        self.latencies.append(now - self.sent_at[index])
        if index < self.frontier:
            self.out_of_order += 1
        else:
            self.frontier = index + 1

    def _unexpected(self, ws: Any, payload: bytes) -> None:
        if len(self.unexpected) < 5:
            self.unexpected.append(payload[:200].decode("utf-8", "replace"))

    def _refill(self, ws: Any) -> None:
        if self.sending:
            room = self.frontier + self.window - self.sent
            if room > 0:
                self._send(room)

    def tick(self, now: float) -> None:
        """Write off a window that stopped moving, so a lossy relay cannot stall the stream."""
        if self.sending and self.sent > self.frontier and now - self.last_receipt > STALL_SECONDS:
            self.stalls += 1
            self.written_off += self.sent - self.frontier
            self.frontier = self.sent
            self.last_receipt = now
            self._refill(None)


class FlowGenerator(CrossRelayGenerator):
    """The generator's commands for the figure: set up N workspaces, run one direction, drain."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self.pairs: List[Any] = []
        self.envelopes_of: List[_Envelopes] = []
        self.next_seq: Dict[Tuple[int, str], int] = {}
        self.streams: List[_Stream] = []
        self.started = 0.0
        self.stopped = 0.0

    def cmd_setup_flow(
        self, daemon_url: str, client_url: str, prefix: str, size: int, workspaces: int, deadline: float = 30.0
    ) -> Any:
        """Daemons on ``daemon_url``, clients on ``client_url``; each key exchange retried until it completes."""
        from twisted.internet import defer
        from twisted.internet.task import deferLater

        from benchmarks.rawws import Pair

        @defer.inlineCallbacks
        def run() -> Any:
            started = time.perf_counter()
            attempts = 0
            refusals: List[str] = []
            for index in range(workspaces):
                pair = Pair(index, prefix)
                yield pair.open_daemon(self.reactor, daemon_url)
                yield pair.open_client(self.reactor, client_url)
                tries = 0
                while True:
                    tries += 1
                    outcome = yield self._key_exchange(pair, f"kx-{index}-{tries}")
                    if outcome == "ok":
                        break
                    refusals.append(outcome[:160])
                    if time.perf_counter() - started > deadline:
                        raise RuntimeError(f"workspace {index}: no key exchange after {tries} attempts: {refusals[-3:]}")
                    yield deferLater(self.reactor, 0.2, lambda: None)
                attempts += tries
                self.pairs.append(pair)
                self.envelopes_of.append(_Envelopes(pair.session_id, size))
            return {"attempts": attempts, "seconds": time.perf_counter() - started, "refusals": refusals[:3]}

        return run()

    def cmd_flow(self, direction: str, duration: float, window: int) -> Any:
        """Run ``direction`` with ``window`` frames in flight per workspace for ``duration`` s; counts at the stop."""
        from twisted.internet.defer import Deferred
        from twisted.internet.task import LoopingCall

        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}")
        self.streams = []
        for index, pair in enumerate(self.pairs):
            sender, receiver = (pair.client, pair.daemon) if direction == DIRECTIONS[0] else (pair.daemon, pair.client)
            first = self.next_seq.get((index, direction), 0)
            self.streams.append(_Stream(sender, receiver, self.envelopes_of[index], window, first))
        done: Deferred[Dict[str, Any]] = Deferred()
        def tick() -> None:
            now = time.perf_counter()
            for stream in self.streams:
                stream.tick(now)

        ticker = LoopingCall(tick)
        ticker.clock = self.reactor

        def stop() -> None:
            self.stopped = time.perf_counter()
            for stream in self.streams:
                stream.sending = False
            if ticker.running:
                ticker.stop()
            for index, stream in enumerate(self.streams):
                self.next_seq[(index, direction)] = stream.next_seq
            done.callback(
                {
                    "elapsed": self.stopped - self.started,
                    "sent": sum(s.sent for s in self.streams),
                    "received": sum(s.received for s in self.streams),
                }
            )

        self.started = time.perf_counter()
        for stream in self.streams:
            stream.start()
        ticker.start(TICK_SECONDS, now=False)
        self.reactor.callLater(duration, stop)
        return done

    def cmd_drain(self) -> Any:
        """Wait for the frames still in flight (or give up on them); the whole phase's numbers."""
        from twisted.internet.defer import Deferred
        from twisted.internet.task import LoopingCall

        from benchmarks.rawws import summary_ms

        done: Deferred[Dict[str, Any]] = Deferred()
        streams = self.streams
        begun = time.perf_counter()

        def check() -> None:
            now = time.perf_counter()
            complete = all(s.received >= s.sent for s in streams)
            quiet = all(now - max(s.last_receipt, begun) > QUIET_SECONDS for s in streams)
            if not (complete or quiet or now - begun > DRAIN_SECONDS):
                return
            poll.stop()
            latencies = [value for s in streams for value in s.latencies]
            result: Dict[str, Any] = summary_ms(latencies)
            result.update(
                sent=sum(s.sent for s in streams),
                received=sum(s.received for s in streams),
                duplicates=sum(s.duplicates for s in streams),
                out_of_order=sum(s.out_of_order for s in streams),
                stalls=sum(s.stalls for s in streams),
                written_off=sum(s.written_off for s in streams),
                lost_per_stream=[s.sent - s.received for s in streams],
                unexpected=[text for s in streams for text in s.unexpected][:5],
                drain_seconds=now - begun,
                drained=complete,
            )
            done.callback(result)

        poll = LoopingCall(check)
        poll.clock = self.reactor
        poll.start(TICK_SECONDS, now=True)
        return done

    def cmd_flow_status(self) -> Dict[str, Any]:
        """How many of the sockets are still open, and any close codes."""
        sockets = [ws for pair in self.pairs for ws in (pair.daemon, pair.client) if ws is not None]
        closes = sorted({f"{ws.close_code} {ws.close_reason}" for ws in sockets if ws.close_code is not None})
        return {"open": sum(1 for ws in sockets if ws.is_open), "total": len(sockets), "closes": closes}


# -- measuring process: one implementation in one mode -------------------------------------------


class _Processes:
    """Everything one run starts (relays, bus, database, fake platform), stopped together."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.relays: List[Relay] = []
        self.bus: Optional[BusChild] = None
        self.database: Optional[ScratchDatabase] = None
        self.platform: Optional[FakePlatformChild] = None

    def stop(self) -> List[str]:
        """Stop in reverse order of dependence; the kept log paths."""
        logs = []
        for relay in self.relays:
            relay.stop()
            logs.append(relay.log_path)
            if not self.keep:
                relay.cleanup()
        if self.bus is not None:
            self.bus.stop()
            logs.append(self.bus.log_path)
            if not self.keep:
                self.bus.cleanup()
        if self.database is not None:
            self.database.drop()
        if self.platform is not None:
            self.platform.stop()
        return logs if self.keep else []


def _start(impl: str, mode: str, args: argparse.Namespace, processes: _Processes, run_id: str) -> Tuple[Relay, Relay]:
    """Start relay A (daemons) and relay B (clients; the same relay in single mode)."""
    keys = {"hmac": secrets.token_urlsafe(24), "internal": secrets.token_urlsafe(24)}
    prefix = f"bench-flow-{run_id}"
    bus_url = ""
    if mode == "server":
        processes.database = ScratchDatabase(args.pg_url)
        processes.bus = BusChild(env={"BUS_DATABASE_URL": processes.database.url, "RELAY_INTERNAL_KEY": keys["internal"]})
        bus_url = processes.bus.start()
    elif impl == "original":
        processes.platform = FakePlatformChild()
        processes.platform.start()
    for name in ("a",) if mode == "single" else ("a", "b"):
        relay_id = f"{impl}-{name}-{run_id}"
        relay: Relay
        if impl == "ours":
            env = {**CONNECTION_LIMITS, **_relay_env(mode, relay_id, args, prefix, bus_url, keys)}
            relay = RelayChild(env=env)
        else:
            server_url = bus_url if mode == "server" else processes.platform.url  # type: ignore[union-attr]
            relay = OriginalRelay(
                mode, server_url=server_url, relay_id=relay_id, internal_key=keys["internal"], hmac_key=keys["hmac"],
                redis_url=args.redis_url, redis_prefix=prefix,
            )
        processes.relays.append(relay)
        relay.start()
    return processes.relays[0], processes.relays[-1]


def run_flow(impl: str, mode: str, args: argparse.Namespace, label: str,
             node_pids: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """
    Start ``impl`` in ``mode``, run both directions (after a short warm-up), stop; the numbers per direction.
    ``node_pids`` (name → pid: a Redis Cluster's nodes) are metered each, and together as the backplane.
    """
    run_id = uuid.uuid4().hex[:8]
    processes = _Processes(args.keep)
    generator: Optional[GeneratorChild] = None
    #: The generator's workspaces are named after this prefix (``rawws.Pair``).
    result: Dict[str, Any] = {"impl": impl, "mode": mode, "label": label, "directions": {}, "prefix": f"f{run_id}"}
    try:
        relay_a, relay_b = _start(impl, mode, args, processes, run_id)
        generator = GeneratorChild("benchmarks.cross_flow")
        pids = {"A": relay_a.pid, "gen": generator.pid}
        profiled = {"A": relay_a.pid}
        extra: Optional[Tuple[str, Callable[[], List[int]]]] = None
        if mode != "single":
            pids["B"] = relay_b.pid
            profiled["B"] = relay_b.pid
        if node_pids:
            pids.update(node_pids)
        elif mode == "redis":
            redis_pid = redis_server_pid(args.redis_url)
            if redis_pid is not None:
                pids["backplane"] = redis_pid
        elif mode == "server":
            assert processes.bus is not None and processes.database is not None
            pids["backplane"] = processes.bus.pid
            profiled["bus"] = processes.bus.pid
            extra = ("postgres", processes.database.backend_pids)
        print(
            f"[{label}] {impl} {mode}: A pid {relay_a.pid}"
            + (f", B pid {relay_b.pid}" if mode != "single" else "")
            + (f", bus pid {processes.bus.pid}" if processes.bus else "")
            + f", generator pid {generator.pid}",
            flush=True,
        )
        result["setup"] = generator.call(
            "setup_flow", daemon_url=relay_a.url, client_url=relay_b.url, prefix=result["prefix"],
            size=args.size, workspaces=args.flow_workspaces,
        )
        for direction in DIRECTIONS:
            if args.flow_warmup > 0:
                generator.call("flow", direction=direction, duration=args.flow_warmup, window=args.flow_window)
                generator.call("drain")
            database = processes.database
            mark = database.publish_stats(0)[2] if database is not None else 0
            spy = PySpyRecorder(args.profile, f"{impl}-{mode}-{direction}-{label.replace(' ', '')}", profiled if impl == "ours" else {})
            with spy, CpuMeter(pids, extra) as meter:
                sending = generator.call("flow", direction=direction, duration=args.flow_duration, window=args.flow_window)
            drained = generator.call("drain")
            names = ("A", "B", "backplane", "postgres", "gen", *(node_pids or {}))
            cpu = {name: meter.cpu.get(name, float("nan")) for name in names}
            if node_pids:
                cpu["backplane"] = sum(cpu[name] for name in node_pids)
            phase: Dict[str, Any] = {"sending": sending, "drained": drained, "cpu": cpu, "wall": meter.wall}
            if database is not None:
                # Frames stored per publish request over the phase (drain included): the bus's batching.
                stored, publishes, _ = database.publish_stats(mark)
                phase["stored"], phase["publishes"] = stored, publishes
            result["directions"][direction] = phase
        result["status"] = generator.call("flow_status")
    finally:
        if generator is not None:
            generator.close()
        result["logs"] = processes.stop()
    return result


def figures(run: Dict[str, Any], direction: str, baseline: Optional[Dict[str, Any]]) -> Dict[str, float]:
    """The figures of one run and direction (added latency against ``baseline``, the same impl's single run)."""
    phase = run["directions"][direction]
    sending, drained, cpu = phase["sending"], phase["drained"], phase["cpu"]
    delivered = sending["received"]
    nan = float("nan")

    def per_frame(value: float) -> float:
        return value / delivered * 1e6 if delivered and value == value else nan

    out = {
        "frames_s": delivered / sending["elapsed"] if sending["elapsed"] else nan,
        "p50_ms": drained["p50_ms"],
        "p99_ms": drained["p99_ms"],
        "sent": float(drained["sent"]),
        "lost": float(drained["sent"] - drained["received"]),
        "lost_pct": 100.0 * (drained["sent"] - drained["received"]) / drained["sent"] if drained["sent"] else nan,
        "A_us": per_frame(cpu["A"]),
        "B_us": per_frame(cpu["B"]) if run["mode"] != "single" else nan,
        "backplane_us": per_frame(cpu["backplane"] + (cpu["postgres"] if run["mode"] == "server" else 0.0)),
        "gen_pct": 100.0 * cpu["gen"] / phase["wall"] if phase["wall"] else nan,
        "per_publish": phase["stored"] / phase["publishes"] if phase.get("publishes") else nan,
    }
    if run["mode"] == "single":
        out["backplane_us"] = nan
    base = baseline["directions"][direction]["drained"] if baseline else None
    out["added_p50_ms"] = out["p50_ms"] - base["p50_ms"] if base else nan
    out["added_p99_ms"] = out["p99_ms"] - base["p99_ms"] if base else nan
    return out


def run_rounds(args: argparse.Namespace, modes: Sequence[str], impls: Sequence[str]) -> List[Dict[str, Any]]:
    """Alternate the implementations round by round; each gets a single-relay baseline, then every mode."""
    runs = []
    for number in range(1, args.rounds + 1):
        for impl in impls:
            for mode in ["single", *[m for m in modes if m != "single"]]:
                run = run_flow(impl, mode, args, f"round {number}")
                run["round"] = number
                runs.append(run)
                for direction in DIRECTIONS:
                    phase = run["directions"][direction]
                    print(
                        f"[round {number}] {impl} {mode} {direction}: "
                        f"{phase['sending']['received'] / phase['sending']['elapsed']:,.0f} frames/s, "
                        f"p50 {phase['drained']['p50_ms']:.2f} ms, lost {phase['drained']['sent'] - phase['drained']['received']}",
                        flush=True,
                    )
    return runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The figure's options on ``cross_relay.py``'s command line."""
    group = parser.add_argument_group("issue-8 figure (--issue8, --against-original)")
    group.add_argument("--issue8", action="store_true",
                       help="run the issue-8 figure (N workspaces × window in flight, one direction at a time) for ours")
    group.add_argument("--against-original", action="store_true",
                       help="the issue-8 figure for ours and the original relay alternately, with ratios")
    group.add_argument("--rounds", type=int, default=None,
                       help="rounds (default 3 with --against-original: ours, original, ours, ...; else 1)")
    group.add_argument("--flow-workspaces", type=int, default=4, help="workspaces (daemon on A, client on B)")
    group.add_argument("--flow-window", type=int, default=50, help="frames in flight per workspace")
    group.add_argument("--flow-duration", type=float, default=5.0, help="seconds of sending per direction")
    group.add_argument("--flow-warmup", type=float, default=1.0, help="unreported seconds per direction first")


def main(argv: Optional[List[str]] = None) -> int:
    """Only the generator runs from here (``python -m benchmarks.cross_flow --generator``)."""
    arguments = sys.argv[1:] if argv is None else argv
    if arguments != ["--generator"]:
        print("run benchmarks/cross_relay.py --issue8 or --against-original", file=sys.stderr)
        return 2
    from benchmarks.rawws import run_generator

    run_generator(FlowGenerator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
