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
    parser.add_argument("--idle", type=float, default=30.0,
                        help="seconds of idle measurement (30 s covers one tick of the default 30 s heartbeat)")
    parser.add_argument("--load", type=float, default=20.0, help="seconds of 1 frame/s/client load")
    parser.add_argument("--rate", type=float, default=1.0, help="frames per second per client in the load phase")
    parser.add_argument("--size", type=int, default=256, help="bytes per frame (whole JSON envelope)")
    parser.add_argument("--nofile", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--generator", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


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


def main(argv: Optional[List[str]] = None) -> int:
    """Measure, or be the load generator."""
    args = parse_args(argv)
    if args.generator:
        from benchmarks.rawws import run_generator

        run_generator(ConnectionsGenerator, nofile=args.nofile or None)
        return 0
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
