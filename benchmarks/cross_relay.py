"""
Cross-relay benchmark: what a backplane adds to a client→daemon→client round trip, and how many
frames per second it carries.

For each mode it starts fresh processes and measures one workspace (a daemon and a client):

* ``single``: one relay (no backplane); the daemon and the client on it;
* ``redis``: relay A holds the daemon, relay B the client, joined by the machine's Redis
  (``--redis-url``, a key prefix of this run's own);
* ``server``: the same two relays joined by viewport-bus (``twistd -r asyncio -n viewport-bus``)
  on a scratch database of the machine's PostgreSQL (``--pg-url``), dropped afterwards.

After the key exchange (retried until the backplane knows the daemon), two phases:

* closed loop: the client sends an e2ee envelope, the daemon echoes it, the client receives it;
  ``--samples`` round trips after ``--warmup`` unreported ones give p50/p99, and relay CPU per
  round trip;
* pipelined: the client keeps ``--window`` envelopes in flight towards the daemon for
  ``--duration`` seconds, giving frames/s through the backplane and relay CPU µs per frame
  (envelopes carry a sequence number, so loss and reordering are counted).

Processes: this one measures (CPU from ``/proc/<pid>/stat``: the relays, viewport-bus and its
PostgreSQL backends, or redis-server), the relays, the bus, and one load generator
(``--generator``: Twisted plus the raw WebSocket client of ``rawws.py``). Rate limits are raised;
client redirect stays off, so every cross-relay frame is bus-forwarded. Prints numbers; asserts
nothing about speed.

    /work/venv/bin/python benchmarks/cross_relay.py                       # ~35 s, all three modes
    /work/venv/bin/python benchmarks/cross_relay.py --modes redis --samples 500 --duration 3
    /work/venv/bin/python benchmarks/cross_relay.py --profile /tmp/xrelay  # py-spy raw stacks per phase (slower)

``--issue8`` runs the issue-8 figure instead (``cross_flow.py``: 4 workspaces × 50 frames in flight, one
direction at a time, frames lost counted); ``--against-original`` runs it for ours and the original relay
alternately (``original.py``) and prints the ratios (``flow_report.py``):

    .venv/bin/python benchmarks/cross_relay.py --against-original --modes server --rounds 3

``--cluster`` runs the same figure on private Redis Clusters of 1 and 3 shards (``cluster_flow.py``: many
workspaces spread over the shards, CPU per node and each node's share of the commands from ``INFO stats``):

    .venv/bin/python benchmarks/cross_relay.py --cluster --flow-workspaces 24
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (  # noqa: E402
    BusChild,
    CpuMeter,
    GeneratorChild,
    PySpyRecorder,
    RelayChild,
    ScratchDatabase,
    redis_server_pid,
    table,
)

MODES = ("single", "redis", "server")
#: Targets for the added round-trip p50 (ms); the product docs quote 50-200 ms for server mode.
TARGET_ADDED_P50_MS = {"redis": 1.0, "server": 10.0}
#: Sequence numbers start here so they always have ten digits (the envelope keeps its size).
SEQ_BASE = 1_000_000_000
ZERO_MASK = b"\x00\x00\x00\x00"
ROUND_TRIP_TIMEOUT_SECONDS = 5.0
DRAIN_TIMEOUT_SECONDS = 10.0


# -- generator process ---------------------------------------------------------------------------


def _frame_header(size: int) -> bytes:
    """Head of a masked client text frame of ``size`` bytes, with an all-zero masking key."""
    if size < 126:
        head = bytes((0x81, 0x80 | size))
    elif size < 65536:
        head = bytes((0x81, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x81, 0x80 | 127)) + size.to_bytes(8, "big")
    # XOR with a zero key leaves the payload as it is: frames are built by concatenation.
    return head + ZERO_MASK


class _Envelopes:
    """Client frames carrying one session's e2ee envelope of a fixed size, numbered by ``seq``."""

    def __init__(self, session_id: str, size: int) -> None:
        from benchmarks.rawws import e2ee_envelope

        text = e2ee_envelope(session_id, size, seq=SEQ_BASE)
        marker = b'"seq":%d' % SEQ_BASE
        at = text.index(marker) + len(b'"seq":')
        self.size = size
        self._prefix = _frame_header(size) + text[:at]
        self._suffix = text[at + 10 :]

    def frame(self, seq: int) -> bytes:
        """The whole masked frame for sequence number ``seq``."""
        return self._prefix + b"%d" % (SEQ_BASE + seq) + self._suffix

    def echo(self, payload: bytes) -> bytes:
        """A masked frame carrying ``payload`` unchanged (what the daemon sends back)."""
        return _frame_header(len(payload)) + payload


def seq_of(payload: bytes) -> Optional[int]:
    """The sequence number of a benchmark envelope, None for any other frame."""
    at = payload.find(b'"seq":')
    if at < 0 or not payload.startswith(b'{"type":"e2ee"'):
        return None
    try:
        return int(payload[at + 6 : at + 16]) - SEQ_BASE
    except ValueError:
        return None


class _RoundTrips:
    """Closed loop: client sends envelope n, the daemon echoes it, the client's receipt ends the sample."""

    def __init__(self, reactor: Any, pair: Any, envelopes: _Envelopes, samples: int, first_seq: int) -> None:
        self.reactor = reactor
        self.client = pair.client
        self.daemon = pair.daemon
        self.envelopes = envelopes
        self.samples = samples
        self.seq = first_seq
        self.times: List[float] = []
        self.lost = 0
        self.unexpected: List[str] = []
        self.on_done: Any = None
        self._t0 = 0.0
        self.client.on_message = self._client_got
        self.client.after_read = None
        self.daemon.on_message = self._daemon_got
        self.daemon.after_read = None
        self._watchdog: Any = None

    def start(self) -> None:
        """Send the first envelope; a watchdog replaces a round trip lost for 5 s."""
        from twisted.internet.task import LoopingCall

        self._watchdog = LoopingCall(self._check_stalled)
        self._watchdog.clock = self.reactor
        self._watchdog.start(1.0, now=False)
        self._send()

    def _send(self) -> None:
        self.seq += 1
        self._t0 = time.perf_counter()
        self.client.write(self.envelopes.frame(self.seq))

    def _daemon_got(self, ws: Any, payload: bytes) -> None:
        ws.write(self.envelopes.echo(payload))

    def _client_got(self, ws: Any, payload: bytes) -> None:
        now = time.perf_counter()
        if seq_of(payload) != self.seq:
            if len(self.unexpected) < 5:
                self.unexpected.append(payload[:200].decode("utf-8", "replace"))
            return
        self.times.append(now - self._t0)
        if len(self.times) >= self.samples:
            self._finish()
            return
        self._send()

    def _check_stalled(self) -> None:
        if time.perf_counter() - self._t0 > ROUND_TRIP_TIMEOUT_SECONDS:
            self.lost += 1
            if self.lost >= 3:
                self._finish()
            else:
                self._send()

    def _finish(self) -> None:
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        if self.on_done is not None:
            callback, self.on_done = self.on_done, None
            callback(self)


class _Flow:
    """Pipelined client→daemon envelopes: up to ``window`` in flight; counts loss and reordering."""

    def __init__(self, pair: Any, envelopes: _Envelopes, window: int, first_seq: int) -> None:
        self.sender = pair.client
        self.receiver = pair.daemon
        self.envelopes = envelopes
        self.window = window
        self.seq = first_seq
        self.first_seq = first_seq
        self.sent = 0
        self.received = 0
        self.out_of_order = 0
        self.duplicates = 0
        self._highest = first_seq
        self._credit = 0
        self.stopping = False
        self.unexpected: List[str] = []
        self.on_drained: Any = None
        self.receiver.on_message = self._received
        self.receiver.after_read = self._refill
        self.sender.on_message = self._sender_got
        self.sender.after_read = None

    def start(self) -> None:
        """Fill the window."""
        self._send(self.window)

    def stop(self) -> None:
        """Send nothing more; report drained once every frame sent arrived."""
        self.stopping = True
        self._check_drained()

    def _send(self, count: int) -> None:
        frame = self.envelopes.frame
        first = self.seq + 1
        self.seq += count
        self.sender.write(b"".join(frame(n) for n in range(first, self.seq + 1)))
        self.sent += count

    def _received(self, ws: Any, payload: bytes) -> None:
        seq = seq_of(payload)
        if seq is None:
            self._sender_got(ws, payload)
            return
        self.received += 1
        self._credit += 1
        if seq < self._highest:
            self.out_of_order += 1
        elif seq == self._highest:
            self.duplicates += 1
        else:
            self._highest = seq

    def _sender_got(self, ws: Any, payload: bytes) -> None:
        if len(self.unexpected) < 5:
            self.unexpected.append(payload[:200].decode("utf-8", "replace"))

    def _refill(self, ws: Any) -> None:
        if self._credit:
            if not self.stopping:
                self._send(self._credit)
            self._credit = 0
        self._check_drained()

    def _check_drained(self) -> None:
        if self.stopping and self.received >= self.sent and self.on_drained is not None:
            callback, self.on_drained = self.on_drained, None
            callback(self)


class CrossRelayGenerator:
    """The generator's commands: connect and key-exchange, round trips, pipelined flow, status."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.pair: Any = None
        self.envelopes: Optional[_Envelopes] = None
        self.seq = 0

    def cmd_setup(self, daemon_url: str, client_url: str, prefix: str, size: int, deadline: float = 30.0) -> Any:
        """Daemon on ``daemon_url``, client on ``client_url``; key exchange retried until it completes."""
        from twisted.internet import defer
        from twisted.internet.task import deferLater

        from benchmarks.rawws import Pair

        @defer.inlineCallbacks
        def run() -> Any:
            started = time.perf_counter()
            pair = Pair(0, prefix)
            yield pair.open_daemon(self.reactor, daemon_url)
            yield pair.open_client(self.reactor, client_url)
            attempts = 0
            refusals: List[str] = []
            while True:
                attempts += 1
                outcome = yield self._key_exchange(pair, f"kx-{attempts}")
                if outcome == "ok":
                    break
                refusals.append(outcome[:160])
                if time.perf_counter() - started > deadline:
                    raise RuntimeError(f"no key exchange after {attempts} attempts: {refusals[-3:]}")
                yield deferLater(self.reactor, 0.2, lambda: None)
            self.pair = pair
            self.envelopes = _Envelopes(pair.session_id, size)
            return {"attempts": attempts, "seconds": time.perf_counter() - started, "refusals": refusals[:3]}

        return run()

    def _key_exchange(self, pair: Any, request_id: str) -> Any:
        """Fires "ok" once the daemon's response reached the client, else a refusal (status frame or timeout)."""
        from twisted.internet.defer import Deferred

        from benchmarks.rawws import kex_init, kex_response

        done: Deferred[str] = Deferred()

        def finish(outcome: str) -> None:
            if not done.called:
                if timer.active():
                    timer.cancel()
                done.callback(outcome)

        def daemon_got(ws: Any, payload: bytes) -> None:
            frame = json.loads(payload)
            if frame.get("type") == "relay_key_exchange_init":
                ws.send(kex_response(frame["requestId"], pair.session_id))

        def client_got(ws: Any, payload: bytes) -> None:
            frame = json.loads(payload)
            if frame.get("type") == "relay_key_exchange_response":
                if frame.get("requestId") == request_id:
                    finish("ok")
            else:
                finish(payload.decode("utf-8", "replace"))

        pair.daemon.on_message = daemon_got
        pair.client.on_message = client_got
        timer = self.reactor.callLater(2.0, finish, "timeout")
        pair.client.send(kex_init(request_id))
        return done

    def cmd_roundtrips(self, samples: int) -> Any:
        """Closed-loop round trips; their summary in ms and the frames lost."""
        from twisted.internet.defer import Deferred

        from benchmarks.rawws import summary_ms

        assert self.envelopes is not None
        loop = _RoundTrips(self.reactor, self.pair, self.envelopes, samples, self.seq)
        done: Deferred[Dict[str, Any]] = Deferred()
        started = time.perf_counter()

        def finished(loop: _RoundTrips) -> None:
            self.seq = loop.seq
            ordered = sorted(loop.times)
            result: Dict[str, Any] = summary_ms(loop.times)
            result.update(
                elapsed=time.perf_counter() - started,
                lost=loop.lost,
                unexpected=loop.unexpected,
                p90_ms=ordered[int(0.9 * (len(ordered) - 1))] * 1000 if ordered else float("nan"),
                p999_ms=ordered[int(0.999 * (len(ordered) - 1))] * 1000 if ordered else float("nan"),
                min_ms=ordered[0] * 1000 if ordered else float("nan"),
            )
            done.callback(result)

        loop.on_done = finished
        loop.start()
        return done

    def cmd_throughput(self, duration: float, window: int) -> Any:
        """Client→daemon with ``window`` frames in flight for ``duration`` s, then drain."""
        from twisted.internet.defer import Deferred

        assert self.envelopes is not None
        flow = _Flow(self.pair, self.envelopes, window, self.seq)
        done: Deferred[Dict[str, Any]] = Deferred()
        start = time.perf_counter()
        timers: List[Any] = []

        def finish(timed_out: bool) -> None:
            if done.called:
                return
            for timer in timers:
                if timer.active():
                    timer.cancel()
            self.seq = flow.seq
            done.callback(
                {
                    "sent": flow.sent,
                    "received": flow.received,
                    "out_of_order": flow.out_of_order,
                    "duplicates": flow.duplicates,
                    "elapsed": time.perf_counter() - start,
                    "timed_out": timed_out,
                    "unexpected": flow.unexpected,
                }
            )

        def stop() -> None:
            flow.stop()
            timers.append(self.reactor.callLater(DRAIN_TIMEOUT_SECONDS, finish, True))

        flow.on_drained = lambda _: finish(False)
        timers.append(self.reactor.callLater(duration, stop))
        flow.start()
        return done

    def cmd_status(self) -> Dict[str, Any]:
        """Whether both sockets are still open, and any close codes."""
        sockets = [ws for ws in (self.pair.daemon, self.pair.client) if ws is not None] if self.pair else []
        closes = sorted({f"{ws.close_code} {ws.close_reason}" for ws in sockets if ws.close_code is not None})
        return {"open": sum(1 for ws in sockets if ws.is_open), "total": len(sockets), "closes": closes}


# -- measuring process: one mode -----------------------------------------------------------------


def _relay_env(mode: str, relay_id: str, args: argparse.Namespace, prefix: str, bus_url: str, keys: Dict[str, str]) -> Dict[str, str]:
    env = {"RELAY_ID": relay_id, "RELAY_PUBLIC_WS_BASE_URL": f"ws://{relay_id}.test:7781/ws"}
    if mode == "redis":
        env.update(
            RELAY_BACKPLANE_MODE="redis",
            RELAY_BACKPLANE_URL=args.redis_url,
            RELAY_REDIS_KEY_PREFIX=prefix,
            RELAY_BUS_HMAC_KEY=keys["hmac"],
        )
    elif mode == "server":
        env.update(
            RELAY_BACKPLANE_MODE="server",
            RELAY_BACKPLANE_URL=bus_url,
            RELAY_INTERNAL_KEY=keys["internal"],
            RELAY_BUS_HMAC_KEY=keys["hmac"],
        )
    return env


def run_mode(mode: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Start the mode's processes, run both phases, stop everything; the numbers."""
    keys = {"hmac": secrets.token_urlsafe(24), "internal": secrets.token_urlsafe(24)}
    run_id = uuid.uuid4().hex[:10]
    prefix = f"bench-xrelay-{run_id}"
    database: Optional[ScratchDatabase] = None
    bus: Optional[BusChild] = None
    relays: List[RelayChild] = []
    generator: Optional[GeneratorChild] = None
    result: Dict[str, Any] = {"mode": mode}
    try:
        bus_url = ""
        if mode == "server":
            database = ScratchDatabase(args.pg_url)
            bus = BusChild(env={"BUS_DATABASE_URL": database.url, "RELAY_INTERNAL_KEY": keys["internal"]})
            bus_url = bus.start()
        names = ["a"] if mode == "single" else ["a", "b"]
        for name in names:
            relay = RelayChild(env=_relay_env(mode, f"relay-{name}-{run_id}", args, prefix, bus_url, keys))
            relay.start()
            relays.append(relay)
        relay_a, relay_b = relays[0], relays[-1]
        generator = GeneratorChild("benchmarks.cross_relay")
        pids = {"A": relay_a.pid, "gen": generator.pid}
        if mode != "single":
            pids["B"] = relay_b.pid
        extra: Optional[Tuple[str, Callable[[], List[int]]]] = None
        profiled = {"A": relay_a.pid, "B": relay_b.pid} if mode != "single" else {"A": relay_a.pid}
        if mode == "redis":
            redis_pid = redis_server_pid(args.redis_url)
            if redis_pid is not None:
                pids["backplane"] = redis_pid
        elif mode == "server":
            assert bus is not None and database is not None
            pids["bus"] = bus.pid
            profiled["bus"] = bus.pid
            extra = ("postgres", database.backend_pids)
        print(
            f"[{mode}] relays {', '.join(f'{n.upper()} pid {r.pid} {r.url}' for n, r in zip(names, relays))}"
            + (f"; bus pid {bus.pid} {bus_url} on {database.name}" if bus and database else "")
            + f"; generator pid {generator.pid}",
            flush=True,
        )
        setup = generator.call("setup", daemon_url=relay_a.url, client_url=relay_b.url, prefix=f"x{mode}", size=args.size)
        result["setup"] = setup
        if args.warmup:
            generator.call("roundtrips", samples=args.warmup)
            generator.call("throughput", duration=min(1.0, args.duration), window=args.window)
            generator.call("roundtrips", samples=max(1, args.warmup // 2))
        with PySpyRecorder(args.profile, f"{mode}-latency", profiled), CpuMeter(pids, extra) as loop_meter:
            latency = generator.call("roundtrips", samples=args.samples)
        with PySpyRecorder(args.profile, f"{mode}-throughput", profiled), CpuMeter(pids, extra) as flow_meter:
            flow = generator.call("throughput", duration=args.duration, window=args.window)
        result.update(latency=latency, flow=flow, loop_meter=loop_meter, flow_meter=flow_meter)
        result["status"] = generator.call("status")
        if database is not None:
            result["stored_frames"] = database.frame_count()
    finally:
        if generator is not None:
            generator.close()
        for relay in relays:
            relay.stop()
            if not args.keep:
                relay.cleanup()
        if bus is not None:
            bus.stop()
            if not args.keep:
                bus.cleanup()
        if database is not None:
            database.drop()
    if args.keep:
        result["logs"] = [r.log_path for r in relays] + ([bus.log_path] if bus else [])
    return result


# -- measuring process: report -------------------------------------------------------------------


def _ms(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"


def report(results: Sequence[Dict[str, Any]], args: argparse.Namespace) -> None:
    """The summary table, the detail table and how to read them."""
    baseline = next((r for r in results if r["mode"] == "single"), None)
    rows = []
    details = []
    verdicts = []
    for r in results:
        lat, flow, loop_meter, flow_meter = r["latency"], r["flow"], r["loop_meter"], r["flow_meter"]
        added50 = lat["p50_ms"] - baseline["latency"]["p50_ms"] if baseline else float("nan")
        added99 = lat["p99_ms"] - baseline["latency"]["p99_ms"] if baseline else float("nan")
        received = flow["received"]
        backplane_name = "backplane" if r["mode"] == "redis" else "bus" if r["mode"] == "server" else ""
        backplane = flow_meter.per(backplane_name, received) if backplane_name else "-"
        if r["mode"] == "server":
            postgres = flow_meter.per("postgres", received)
            backplane = f"{backplane}+{postgres} pg"
        notes = []
        if flow["timed_out"]:
            notes.append(f"LOST {flow['sent'] - received}")
        if flow["out_of_order"]:
            notes.append(f"{flow['out_of_order']} out of order")
        if flow["duplicates"]:
            notes.append(f"{flow['duplicates']} duplicated")
        if lat["lost"]:
            notes.append(f"{lat['lost']} round trips lost")
        unexpected = lat["unexpected"] + flow["unexpected"]
        if unexpected:
            notes.append(f"unexpected: {unexpected[0][:100]}")
        rows.append(
            [
                r["mode"],
                _ms(lat["p50_ms"]),
                _ms(lat["p99_ms"]),
                "-" if r["mode"] == "single" else f"{added50:+.3f}",
                "-" if r["mode"] == "single" else f"{added99:+.3f}",
                f"{received / flow['elapsed']:,.0f}" if flow["elapsed"] else "-",
                flow_meter.per("A", received),
                flow_meter.per("B", received),
                backplane,
                "; ".join(notes),
            ]
        )
        rt = lat["count"]
        loop_backplane = loop_meter.per(backplane_name, rt) if backplane_name else "-"
        if r["mode"] == "server":
            loop_backplane = f"{loop_backplane}+{loop_meter.per('postgres', rt)} pg"
        details.append(
            [
                r["mode"],
                rt,
                _ms(lat["min_ms"]),
                _ms(lat["p90_ms"]),
                _ms(lat["p999_ms"]),
                _ms(lat["max_ms"]),
                loop_meter.per("A", rt),
                loop_meter.per("B", rt),
                loop_backplane,
                loop_meter.busy("gen"),
                flow_meter.busy("A"),
                flow_meter.busy("B"),
                flow_meter.busy("gen"),
                r["setup"]["attempts"],
            ]
        )
        target = TARGET_ADDED_P50_MS.get(r["mode"])
        if target is not None and baseline is not None:
            verdicts.append(
                f"{r['mode']}: adds {added50:.3f} ms at p50 (target <= {target:g} ms: "
                f"{'met' if added50 <= target else 'MISSED'})"
            )
    print()
    print(
        table(
            ["mode", "p50 ms", "p99 ms", "added p50", "added p99", "frames/s", "A µs/frame", "B µs/frame",
             "backplane µs/frame", "notes"],
            rows,
        )
    )
    print()
    print(
        table(
            ["mode", "round trips", "min ms", "p90 ms", "p99.9 ms", "max ms", "A µs/rt", "B µs/rt",
             "backplane µs/rt", "gen % (rt)", "A % (flow)", "B % (flow)", "gen % (flow)", "kex tries"],
            details,
        )
    )
    print()
    print(
        f"p50/p99: closed-loop round trip client → relay B → backplane → relay A → daemon → back, one "
        f"{args.size} B e2ee envelope in flight ({args.samples} samples after {args.warmup} warm-up); "
        "single mode: one relay, no backplane."
    )
    print(
        f"frames/s: client→daemon with {args.window} envelopes in flight for {args.duration:g} s (drain included); "
        "µs/frame: CPU (utime+stime) of the process over that phase / frames delivered to the daemon."
    )
    print(
        "backplane: redis-server's CPU (the machine's shared server) in redis mode; viewport-bus + its "
        "PostgreSQL backends ('pg') in server mode."
    )
    for verdict in verdicts:
        print(verdict)
    for r in results:
        if r.get("stored_frames") is not None:
            print(f"{r['mode']}: relay_bus_frames rows at the end: {r['stored_frames']}")
        status = r["status"]
        if status["open"] != status["total"] or status["closes"]:
            print(f"{r['mode']}: sockets open {status['open']}/{status['total']}; closes {status['closes']}")
        if r.get("logs"):
            print(f"{r['mode']}: logs kept: {' '.join(r['logs'])}")
    if args.profile:
        print(f"py-spy raw stacks in {args.profile} (<mode>-<phase>-<process>.raw; --idle included)")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line (``--generator`` is how the measuring process starts the load generator)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: single, redis, server")
    parser.add_argument("--samples", type=int, default=2000, help="closed-loop round trips measured per mode")
    parser.add_argument("--warmup", type=int, default=200, help="unreported round trips first (plus 1 s of flow)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of the pipelined phase")
    parser.add_argument("--window", type=int, default=100, help="client→daemon envelopes in flight")
    parser.add_argument("--size", type=int, default=256, help="envelope size in bytes (whole JSON text)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis for the redis mode")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432",
                        help="PostgreSQL server (no database) for the server mode's scratch database")
    parser.add_argument("--profile", metavar="DIR", help="py-spy record the relays (and the bus) during each phase")
    parser.add_argument("--keep", action="store_true", help="keep the relays' and the bus's log directories")
    parser.add_argument("--generator", action="store_true", help=argparse.SUPPRESS)
    from benchmarks.cluster_flow import add_cluster_arguments
    from benchmarks.cross_flow import add_arguments

    add_arguments(parser)
    add_cluster_arguments(parser)
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> int:
    """Run every requested mode in turn and print the tables."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}: use {', '.join(MODES)}")
    if args.size < 200:
        raise SystemExit("--size must be at least 200 bytes (the envelope's fixed fields)")
    if args.profile:
        args.profile = os.path.abspath(args.profile)
    if args.cluster:
        from benchmarks.cluster_flow import measure_cluster

        return measure_cluster(args)
    if args.issue8 or args.against_original:
        from benchmarks.flow_report import measure as measure_flow

        return measure_flow(args, [m for m in modes if m != "single"] or ["server"])
    started = time.perf_counter()
    results = []
    for mode in modes:
        result = run_mode(mode, args)
        lat, flow = result["latency"], result["flow"]
        print(
            f"[{mode}] p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms; "
            f"{flow['received'] / flow['elapsed']:,.0f} frames/s",
            flush=True,
        )
        results.append(result)
    report(results, args)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Measure, or be the load generator."""
    args = parse_args(argv)
    if args.generator:
        from benchmarks.rawws import run_generator

        run_generator(CrossRelayGenerator)
        return 0
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
