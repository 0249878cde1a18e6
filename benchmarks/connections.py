"""
Scale benchmark: thousands of concurrent sockets on one relay process.

``--workspaces`` workspaces (default 2000), each with a daemon and a client socket (4000 sockets),
key exchange done; then the relay is left idle with its default heartbeat; then every client sends
one small e2ee frame per second to its daemon, which answers with one frame back (round trip
client → relay → daemon → relay → client).

Printed: connect time, relay CPU per connection (and per key exchange), relay memory per connection
(VmRSS after minus before, divided by sockets), relay idle CPU, and round-trip p50/p99 under load.
Three processes: this one measures (``/proc/<pid>``), the relay, and one load generator (Twisted and a
lean raw WebSocket client). The open-file limit is raised for the generator and, through
``preexec_fn``, for the relay child: never in the relay's defaults. Prints numbers; asserts nothing.

    /work/venv/bin/python benchmarks/connections.py [--workspaces 2000] [--idle 30] [--load 20]

``--against-original [--rounds 3] [--impls ours,ours-platform,original]`` instead runs connect, key exchange
and 30 s of load on each relay in turn per round (a fresh relay and generator each) and prints round-trip
p50/p99, relay CPU and memory per connection for every relay with the ratios to the original
(``side_by_side.report``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import GeneratorChild, Meter, RelayChild, table  # noqa: E402

FD_HEADROOM = 2048
DEFAULT_PING_INTERVAL_SECONDS = 30.0
TICK_GAP_SECONDS = 2.0
TICK_SHADOW_SECONDS = 1.0


# -- generator process ---------------------------------------------------------------------------


class ConnectionsGenerator:
    """The generator's commands: mint tokens, connect, key exchange, one frame/s/client load, status."""

    def __init__(self, reactor: Any) -> None:
        from benchmarks.rawws import RawWebSocket

        self.reactor = reactor
        self.url = ""
        self.pairs: List[Any] = []
        self.ticks: List[float] = []
        RawWebSocket.on_ping = self._pinged

    def _pinged(self, ws: Any) -> None:
        """Note the start of each heartbeat tick (a burst of pings to every socket)."""
        now = time.perf_counter()
        if not self.ticks or now - self.ticks[-1] > TICK_GAP_SECONDS:
            self.ticks.append(now)

    def cmd_prepare(self, url: str, workspaces: int) -> Dict[str, Any]:
        """Mint every token up front, so the connect phase times the relay, not the signing."""
        from benchmarks.rawws import Pair

        self.url = url
        self.pairs = [Pair(i, "scale") for i in range(workspaces)]
        return {"pairs": len(self.pairs)}

    def cmd_connect(self, concurrency: int) -> Any:
        """Open every daemon, then every client, at most ``concurrency`` handshakes at a time."""
        from twisted.internet import defer

        from benchmarks.rawws import bounded, summary_ms

        @defer.inlineCallbacks
        def run() -> Any:
            start = time.perf_counter()
            daemons = yield bounded(self.pairs, concurrency, lambda p: p.open_daemon(self.reactor, self.url))
            clients = yield bounded(self.pairs, concurrency, lambda p: p.open_client(self.reactor, self.url))
            wall = time.perf_counter() - start
            handshakes = [ws.handshake_seconds for ws in daemons + clients]
            return {"wall": wall, "sockets": len(handshakes), "handshake": summary_ms(handshakes)}

        return run()

    def cmd_kex(self, concurrency: int) -> Any:
        """Every client does its key exchange (through the relay, answered by its daemon)."""
        from twisted.internet import defer

        from benchmarks.rawws import bounded

        @defer.inlineCallbacks
        def run() -> Any:
            start = time.perf_counter()
            yield bounded(self.pairs, concurrency, lambda p: p.key_exchange())
            return {"wall": time.perf_counter() - start}

        return run()

    def cmd_load(self, seconds: float, size: int, rate: float = 1.0, tick: float = 0.005) -> Any:
        """Each client sends ``rate`` frames/s (staggered evenly); its daemon answers each with one frame."""
        from twisted.internet.defer import Deferred
        from twisted.internet.task import LoopingCall

        from benchmarks.rawws import client_frame, e2ee_envelope, summary_ms

        pairs = self.pairs
        count = len(pairs)
        rtts: List[float] = []
        sent_at: List[float] = []
        unexpected: List[str] = []
        state = {"sent": 0, "received": 0}
        for pair in pairs:
            pair.up = client_frame(e2ee_envelope(pair.session_id, size))
            pair.down = client_frame(e2ee_envelope(pair.session_id, size))
            pair.pending = deque()

        def daemon_got(ws: Any, payload: bytes) -> None:
            if len(payload) == size:
                ws.write(ws.tag.down)
            elif len(unexpected) < 5:
                unexpected.append(payload[:300].decode("utf-8", "replace"))

        def client_got(ws: Any, payload: bytes) -> None:
            now = time.perf_counter()
            pending = ws.tag.pending
            if len(payload) == size and pending:
                then = pending.popleft()
                rtts.append(now - then)
                sent_at.append(then)
                state["received"] += 1
            elif len(unexpected) < 5:
                unexpected.append(payload[:300].decode("utf-8", "replace"))

        for pair in pairs:
            pair.daemon.on_message = daemon_got
            pair.client.on_message = client_got
        total = int(seconds * rate * count)
        start = time.perf_counter()

        def send_due() -> None:
            due = min(total, int((time.perf_counter() - start) * rate * count))
            for k in range(state["sent"], due):
                pair = pairs[k % count]
                if pair.client.is_open:
                    pair.pending.append(time.perf_counter())
                    pair.client.write(pair.up)
            state["sent"] = max(state["sent"], due)
            if due >= total and ticker.running:
                ticker.stop()
                self.reactor.callLater(0.05, wait_for_echoes, time.perf_counter() + 5.0)

        done: Deferred[Dict[str, Any]] = Deferred()

        def wait_for_echoes(deadline: float) -> None:
            outstanding = sum(len(p.pending) for p in pairs)
            if outstanding and time.perf_counter() < deadline:
                self.reactor.callLater(0.05, wait_for_echoes, deadline)
                return
            result: Dict[str, Any] = summary_ms(rtts)
            ticks = [t for t in self.ticks if t >= start]
            calm = [
                rtt for rtt, then in zip(rtts, sent_at)
                if not any(tick - TICK_SHADOW_SECONDS <= then < tick + TICK_SHADOW_SECONDS for tick in ticks)
            ]
            result.update(sent=state["sent"], received=state["received"], lost=outstanding,
                          unexpected=unexpected, wall=time.perf_counter() - start,
                          ticks=[round(t - start, 2) for t in ticks], calm=summary_ms(calm))
            done.callback(result)

        ticker = LoopingCall(send_due)
        ticker.clock = self.reactor
        ticker.start(tick, now=True)
        return done

    def cmd_status(self) -> Dict[str, Any]:
        """How many sockets are still open, and the close codes seen."""
        sockets = [ws for pair in self.pairs for ws in (pair.daemon, pair.client) if ws is not None]
        closes: Dict[str, int] = {}
        for ws in sockets:
            if ws.close_code is not None:
                key = f"{ws.close_code} {ws.close_reason}"
                closes[key] = closes.get(key, 0) + 1
        since_tick = time.perf_counter() - self.ticks[-1] if self.ticks else None
        return {"open": sum(1 for ws in sockets if ws.is_open), "total": len(sockets), "closes": closes,
                "since_tick": since_tick, "tick_count": len(self.ticks)}


# -- measuring process ---------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line (``--generator`` is how the measuring process starts the load generator)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspaces", type=int, default=2000, help="workspaces, each one daemon and one client socket")
    parser.add_argument("--concurrency", type=int, default=32, help="handshakes in flight while connecting")
    parser.add_argument("--idle", type=float, default=None,
                        help="seconds of idle measurement (30 s covers one tick of the default 30 s heartbeat; "
                             "default 30, with --against-original 0: no idle phase)")
    parser.add_argument("--load", type=float, default=None,
                        help="seconds of 1 frame/s/client load (default 20; with --against-original 30, so one "
                             "tick of a 30 s heartbeat falls in it on every relay)")
    parser.add_argument("--rate", type=float, default=1.0, help="frames per second per client in the load phase")
    parser.add_argument("--size", type=int, default=256, help="bytes per frame (whole JSON envelope)")
    parser.add_argument("--nofile", type=int, default=0, help=argparse.SUPPRESS)
    side = parser.add_argument_group(
        "--against-original",
        "ours and the original relay alternately (ours first in each round), the issue-11 figures, ratios",
    )
    side.add_argument("--against-original", action="store_true",
                      help="run connect / key exchange / load on ours and on the original relay, round by round")
    side.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    side.add_argument("--impls", default="ours,ours-platform,original",
                      help="relays per round, in order: ours, ours-platform (admission by the platform call), original")
    parser.add_argument("--generator", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.idle is None:
        args.idle = 0.0 if args.against_original else 30.0
    if args.load is None:
        args.load = 30.0 if args.against_original else 20.0
    return args


def measure(args: argparse.Namespace) -> int:
    """Start the relay and the generator, run connect / key exchange / idle / load, print the table."""
    sockets = 2 * args.workspaces
    nofile = sockets + FD_HEADROOM
    relay = RelayChild(
        env={
            "RELAY_MAX_TOTAL_CONNECTIONS": str(sockets + 1000),
            "RELAY_MAX_CONNECTIONS_PER_IP": str(sockets + 1000),
            "RELAY_MAX_CLIENTS_PER_WORKSPACE": "100",
        },
        nofile=nofile,
    )
    generator: Optional[GeneratorChild] = None
    try:
        url = relay.start()
        generator = GeneratorChild("benchmarks.connections", ["--nofile", str(nofile)])
        print(f"relay pid {relay.pid} at {url}; generator pid {generator.pid}", flush=True)
        print("reference targets: ≤ 40 KB relay memory per connection; round-trip p99 ≤ 16 ms", flush=True)
        generator.call("prepare", url=url, workspaces=args.workspaces)
        time.sleep(1.0)
        rss_before = relay.rss_kib()

        with Meter(relay.pid, generator.pid) as connect_meter:
            connected = generator.call("connect", concurrency=args.concurrency)
        rss_connected = relay.rss_kib()
        print(f"connected {connected['sockets']} sockets in {connected['wall']:.2f} s", flush=True)

        with Meter(relay.pid, generator.pid) as kex_meter:
            kex = generator.call("kex", concurrency=200)
        time.sleep(1.0)
        rss_rest = relay.rss_kib()
        print(f"key exchanges done in {kex['wall']:.2f} s", flush=True)

        ticks_before_idle = generator.call("status")["tick_count"]
        idle_cpu0, idle_wall0 = relay.cpu_seconds(), time.perf_counter()
        time.sleep(args.idle)
        idle_cpu = relay.cpu_seconds() - idle_cpu0
        idle_wall = time.perf_counter() - idle_wall0
        after_idle = generator.call("status")
        print(f"idle {idle_wall:.1f} s: relay CPU {idle_cpu:.2f} s; open sockets {after_idle['open']}", flush=True)
        if after_idle["since_tick"] is not None and args.load > 2 * TICK_SHADOW_SECONDS:
            # Start the load so the next heartbeat tick falls in its middle: the p99 then always
            # includes one tick, as a 20 s window does two times in three in production.
            pause = DEFAULT_PING_INTERVAL_SECONDS - after_idle["since_tick"] - args.load / 2
            if pause > 0:
                print(f"waiting {pause:.1f} s so the next heartbeat tick falls mid-load", flush=True)
                time.sleep(pause)

        with Meter(relay.pid, generator.pid) as load_meter:
            load = generator.call("load", seconds=args.load, size=args.size, rate=args.rate)
        rss_load = relay.rss_kib()
        status = generator.call("status")
        terminated = len(relay.events("ws_terminated"))
    finally:
        if generator is not None:
            generator.close()
        relay.stop()

    forwarded = 2 * load["received"]
    rows = [
        ["sockets (daemon + client per workspace)", f"{connected['sockets']}"],
        ["connect time total", f"{connected['wall']:.2f} s ({connected['sockets'] / connected['wall']:,.0f} sockets/s, "
                               f"{args.concurrency} handshakes in flight)"],
        ["handshake p50 / p99", f"{connected['handshake']['p50_ms']:.2f} / {connected['handshake']['p99_ms']:.2f} ms"],
        ["relay CPU per connection (connect phase)", f"{connect_meter.relay_cpu / connected['sockets'] * 1e3:.3f} ms "
                                                      f"(relay busy {connect_meter.relay_busy:.0f} %)"],
        ["relay CPU per key exchange (init + response)", f"{kex_meter.relay_cpu / args.workspaces * 1e3:.3f} ms "
                                                          f"({kex['wall']:.2f} s for {args.workspaces})"],
        ["relay RSS before / connected / at rest", f"{rss_before / 1024:.1f} / {rss_connected / 1024:.1f} / "
                                                   f"{rss_rest / 1024:.1f} MiB"],
        ["relay memory per connection (connected)", f"{(rss_connected - rss_before) / connected['sockets']:.1f} KiB"],
        ["relay memory per connection (at rest, after kex)", f"{(rss_rest - rss_before) / connected['sockets']:.1f} KiB"],
        ["relay idle CPU (default heartbeat)", f"{100 * idle_cpu / idle_wall:.2f} % of a core over {idle_wall:.0f} s "
                                               f"({after_idle['tick_count'] - ticks_before_idle} heartbeat tick(s) "
                                               f"of {connected['sockets']} pings)"],
        ["load", f"{args.rate:g} frame/s per client, {args.size} B, {args.load:g} s: "
                 f"{load['sent']} sent, {load['received']} echoed, {load['lost']} lost"],
        ["round trip p50 / p99 / max", f"{load['p50_ms']:.2f} / {load['p99_ms']:.2f} / {load['max_ms']:.2f} ms"
                                       f" (heartbeat ticks at {load['ticks']} s into the load)"],
        ["round trip p50 / p99 / max, ±1 s of a tick excluded",
         f"{load['calm']['p50_ms']:.2f} / {load['calm']['p99_ms']:.2f} / {load['calm']['max_ms']:.2f} ms "
         f"({load['calm']['count']} of {load['received']} round trips)"],
        ["relay CPU under load", f"{load_meter.relay_busy:.1f} % of a core; "
                                 + (f"{load_meter.relay_cpu / forwarded * 1e6:.1f} µs per forwarded frame" if forwarded else "-")],
        ["generator CPU under load", f"{load_meter.generator_busy:.1f} % of a core"],
        ["relay RSS after load", f"{rss_load / 1024:.1f} MiB"],
        ["sockets open at the end", f"{status['open']}/{status['total']}"
                                    + (f"; closes {status['closes']}" if status["closes"] else "")
                                    + (f"; relay terminated {terminated}" if terminated else "")],
    ]
    if load["unexpected"]:
        rows.append(["unexpected frames", load["unexpected"][0][:120]])
    print()
    print(table(["measure", "value"], rows))
    relay.cleanup()
    return 0


# -- ours against the original (--against-original) ------------------------------------------------


def side_figures(args: argparse.Namespace) -> List[Any]:
    """The issue-11 connection rows (and what explains them), in the order they are printed."""
    from benchmarks.side_by_side import Figure

    scale = f"{2 * args.workspaces} connections ({args.workspaces} workspaces)"
    return [
        Figure("sockets", f"{scale}: sockets connected", "{:.0f}", ratio=False),
        Figure("rtt_p50", f"  {args.rate:g} frame/s per client, {args.load:g} s: round trip p50 ms", "{:.2f}"),
        Figure("rtt_p99", "  same: round trip p99 ms", "{:.2f}"),
        Figure("calm_p99", "  same: round trip p99 ms, ±1 s of a heartbeat tick excluded", "{:.2f}"),
        Figure("ticks", "  same: heartbeat ticks seen during the load", "{:.0f}", ratio=False),
        Figure("lost", "  same: round trips lost", "{:.0f}", ratio=False),
        Figure("load_us", "  same: relay CPU µs per forwarded frame"),
        Figure("cpu_conn", "relay CPU per connection (upgrade, admission, key exchange) ms", "{:.3f}"),
        Figure("cpu_upgrade", "  of which connect phase (upgrade, admission) ms per socket", "{:.3f}"),
        Figure("cpu_kex", "  of which key exchange (init + response) ms per workspace", "{:.3f}"),
        Figure("platform_conn", "  fake platform CPU per connection (its validate answers) ms", "{:.3f}"),
        Figure("handshake_p99", "  handshake p99 ms (connect phase)", "{:.2f}"),
        Figure("mem_conn", "relay memory per connection over an empty relay (at rest, after kex) KiB"),
        Figure("mem_connected", "  same, right after connecting KiB"),
        Figure("rss_empty", "  relay RSS of the empty relay MiB"),
        Figure("idle_pct", "relay idle CPU % of a core (heartbeat), when --idle > 0", "{:.2f}"),
    ]


def side_round(impl: str, number: int, args: argparse.Namespace) -> Any:
    """One relay, one round: connect, key exchange, (idle,) load on a fresh relay and generator."""
    from benchmarks.side_by_side import Run, SideRelay

    sockets = 2 * args.workspaces
    nofile = sockets + FD_HEADROOM
    side = SideRelay(impl, nofile=nofile)
    generator: Optional[GeneratorChild] = None
    values: Dict[str, float] = {}
    notes: List[str] = []
    try:
        url = side.start()
        generator = GeneratorChild("benchmarks.connections", ["--nofile", str(nofile)])
        print(f"[round {number}] {impl}: relay pid {side.pid} at {url}; generator pid {generator.pid}", flush=True)
        generator.call("prepare", url=url, workspaces=args.workspaces)
        time.sleep(1.0)
        rss_before = side.rss_kib()
        values["rss_empty"] = rss_before / 1024
        platform0 = side.platform_cpu_seconds()
        with Meter(side.pid, generator.pid) as connect_meter:
            connected = generator.call("connect", concurrency=args.concurrency)
        rss_connected = side.rss_kib()
        with Meter(side.pid, generator.pid) as kex_meter:
            generator.call("kex", concurrency=200)
        platform_cpu = side.platform_cpu_seconds() - platform0
        time.sleep(1.0)
        rss_rest = side.rss_kib()
        count = connected["sockets"]
        values["sockets"] = count
        if count:
            values["cpu_conn"] = (connect_meter.relay_cpu + kex_meter.relay_cpu) / count * 1e3
            values["cpu_upgrade"] = connect_meter.relay_cpu / count * 1e3
            values["cpu_kex"] = kex_meter.relay_cpu / args.workspaces * 1e3
            if side.platform_pid is not None:
                values["platform_conn"] = platform_cpu / count * 1e3
            values["mem_conn"] = (rss_rest - rss_before) / count
            values["mem_connected"] = (rss_connected - rss_before) / count
        values["handshake_p99"] = connected["handshake"]["p99_ms"]
        if args.idle > 0:
            idle_cpu0, idle_wall0 = side.cpu_seconds(), time.perf_counter()
            time.sleep(args.idle)
            values["idle_pct"] = 100 * (side.cpu_seconds() - idle_cpu0) / (time.perf_counter() - idle_wall0)
        with Meter(side.pid, generator.pid) as load_meter:
            load = generator.call("load", seconds=args.load, size=args.size, rate=args.rate)
        values["rtt_p50"] = load["p50_ms"]
        values["rtt_p99"] = load["p99_ms"]
        values["calm_p99"] = load["calm"]["p99_ms"]
        values["ticks"] = len(load["ticks"])
        values["lost"] = load["lost"]
        if load["received"]:
            values["load_us"] = load_meter.relay_cpu / (2 * load["received"]) * 1e6
        if load["unexpected"]:
            notes.append(f"unexpected frame {load['unexpected'][0][:120]}")
        if load["ticks"]:
            notes.append(f"heartbeat ticks at {load['ticks']} s into the load")
        status = generator.call("status")
        if status["open"] != status["total"]:
            notes.append(f"sockets open at the end {status['open']}/{status['total']}; closes {status['closes']}")
    except Exception as error:  # a failed run keeps the figures it has; the report shows the rest as "-"
        notes.append(f"FAILED: {error}; relay log: {side.tail()[-400:]}")
    finally:
        if generator is not None:
            generator.close()
        side.stop()
        terminated = side.terminated()
        if terminated:
            notes.append(f"our relay terminated {terminated} connections")
        side.cleanup()
    return Run(number, impl, values, notes, 0.0)


def measure_against_original(args: argparse.Namespace) -> int:
    """``--against-original``: ``--rounds`` rounds of every relay in ``--impls``, same load, then the comparison."""
    from benchmarks.side_by_side import IMPLEMENTATIONS, report, run_rounds, utc_now

    impls = [impl.strip() for impl in args.impls.split(",") if impl.strip()]
    for impl in impls:
        if impl not in IMPLEMENTATIONS:
            raise SystemExit(f"unknown relay {impl!r}: use {', '.join(IMPLEMENTATIONS)}")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    began = utc_now()
    print(f"started {began}; {args.rounds} round(s) of {', '.join(impls)}; {2 * args.workspaces} sockets; "
          f"open-file limit wanted {2 * args.workspaces + FD_HEADROOM}", flush=True)
    runs = run_rounds(args.rounds, impls, lambda impl, number: side_round(impl, number, args))
    report(
        side_figures(args),
        runs,
        legend=[
            "",
            f"relay CPU per connection: relay utime+stime over the connect phase ({args.concurrency} handshakes in "
            "flight; daemons, then clients) plus the key-exchange phase, divided by the sockets connected.",
            "memory per connection: relay VmRSS 1 s after the key exchanges minus VmRSS of the empty relay, "
            "divided by the sockets.",
            f"round trip: client → daemon → the daemon's answer → client, {args.size} B e2ee frames, every client "
            f"{args.rate:g} frame/s (staggered), {args.load:g} s, generator clock; the relays' heartbeats run "
            "with their defaults.",
            "heartbeat ticks: bursts of pings more than 2 s apart as the generator sees them; a relay that pings its "
            "sockets in slices shows a tick per slice, so the ±1 s-excluded p99 then drops most of its samples: "
            "compare the all-samples p99.",
            "The machine is shared: absolute figures move by ±30 % between runs; read the same-round ratios.",
        ],
    )
    print(f"started {began}, ended {utc_now()}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Measure, or be the load generator."""
    args = parse_args(argv)
    if args.generator:
        from benchmarks.rawws import run_generator

        run_generator(ConnectionsGenerator, nofile=args.nofile or None)
        return 0
    if args.against_original:
        return measure_against_original(args)
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
