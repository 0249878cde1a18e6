"""
Forwarding benchmark: e2ee frames client→daemon and daemon→client through one relay process.

Three processes: this one measures (reads the relay's CPU time from ``/proc/<pid>/stat``), the relay
(``twistd -n viewport-relay``), and a load generator (``--generator``, Twisted plus a lean raw
WebSocket client). For each number of pairs, frame size and direction it runs

* a pipelined phase: every sender keeps a window of frames in flight (``--window`` in total,
  shared by the pairs) for ``--duration`` seconds, giving frames/s and relay CPU µs per forwarded
  frame;
* a closed-loop phase: each pair sends one frame and waits for the other side to receive it,
  giving one-way latency p50/p99 (sender and receiver share the generator's clock).

Frame sizes are the whole JSON text of the envelope (the ciphertext is padded). Rate limits are
raised so no limiter closes a socket. Prints numbers; asserts nothing about speed.

    /work/venv/bin/python benchmarks/forwarding.py [--pairs 1,10] [--sizes 256,16384] [--duration 5]

``--against-original [--rounds 3]`` instead runs the issue-11 workloads (256 B both ways with 500 in flight,
strict ping-pong, 200 clients over 50 workspaces at 8000 frames/s offered, 16 KiB and 256 KiB frames) on ours
and on the original relay alternately, ours first in each round, and prints each figure for both with the
ratio ours/original (``side_by_side.report``).

    .venv/bin/python benchmarks/forwarding.py --against-original [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import GeneratorChild, Meter, RelayChild, table  # noqa: E402

DIRECTIONS = {"c2d": "client→daemon", "d2c": "daemon→client"}
DRAIN_TIMEOUT_SECONDS = 10.0


# -- generator process ---------------------------------------------------------------------------


class _WindowFlow:
    """One sender keeping up to ``window`` frames in flight towards one receiver."""

    def __init__(self, sender: Any, receiver: Any, frame: bytes, size: int, window: int, limit: Optional[int]) -> None:
        self.sender = sender
        self.frame = frame
        self.size = size
        self.window = window
        self.limit = limit
        self.sent = 0
        self.received = 0
        self.credit = 0
        self.stopping = False
        self.unexpected: List[str] = []
        self.on_drained: Any = None
        receiver.on_message = self._received
        receiver.after_read = self._refill
        sender.on_message = self._unexpected

    def start(self) -> None:
        """Fill the window."""
        self._send(self.window)

    def stop(self) -> None:
        """Send nothing more; report drained once every sent frame arrived."""
        self.stopping = True
        self._check_drained()

    def _send(self, count: int) -> None:
        if self.limit is not None:
            count = min(count, self.limit - self.sent)
        if count > 0:
            self.sender.write(self.frame * count)
            self.sent += count

    def _received(self, ws: Any, payload: bytes) -> None:
        if len(payload) != self.size:
            self._unexpected(ws, payload)
            return
        self.received += 1
        self.credit += 1

    def _unexpected(self, ws: Any, payload: bytes) -> None:
        if len(self.unexpected) < 5:
            self.unexpected.append(payload[:300].decode("utf-8", "replace"))

    def _refill(self, ws: Any) -> None:
        if self.credit:
            if not self.stopping:
                self._send(self.credit)
            self.credit = 0
        if self.limit is not None and self.sent >= self.limit:
            self.stopping = True
        self._check_drained()

    def _check_drained(self) -> None:
        if self.stopping and self.received >= self.sent and self.on_drained is not None:
            callback, self.on_drained = self.on_drained, None
            callback(self)


class _ClosedLoop:
    """One sender with a single frame in flight: send, wait until the receiver has it, repeat."""

    def __init__(self, sender: Any, receiver: Any, frame: bytes, size: int, samples: int) -> None:
        self.sender = sender
        self.frame = frame
        self.size = size
        self.samples = samples
        self.times: List[float] = []
        self.unexpected: List[str] = []
        self.on_done: Any = None
        self._t0 = 0.0
        receiver.on_message = self._received
        receiver.after_read = None
        sender.on_message = self._unexpected

    def start(self) -> None:
        """Send the first frame."""
        self._t0 = time.perf_counter()
        self.sender.write(self.frame)

    def _received(self, ws: Any, payload: bytes) -> None:
        now = time.perf_counter()
        if len(payload) != self.size:
            self._unexpected(ws, payload)
            return
        self.times.append(now - self._t0)
        if len(self.times) >= self.samples:
            if self.on_done is not None:
                callback, self.on_done = self.on_done, None
                callback(self)
            return
        self._t0 = time.perf_counter()
        self.sender.write(self.frame)

    def _unexpected(self, ws: Any, payload: bytes) -> None:
        if len(self.unexpected) < 5:
            self.unexpected.append(payload[:300].decode("utf-8", "replace"))


class _PingPong:
    """Strict ping-pong (window 1): the client sends, the daemon echoes one frame back, the client waits for it."""

    def __init__(self, pair: Any, up: bytes, down: bytes, size: int, samples: int) -> None:
        self.client = pair.client
        self.daemon = pair.daemon
        self.up = up
        self.down = down
        self.size = size
        self.samples = samples
        self.times: List[float] = []
        self.unexpected: List[str] = []
        self.on_done: Any = None
        self._t0 = 0.0
        self.client.on_message = self._client_got
        self.client.after_read = None
        self.daemon.on_message = self._daemon_got
        self.daemon.after_read = None

    def start(self) -> None:
        """Send the first frame."""
        self._t0 = time.perf_counter()
        self.client.write(self.up)

    def _daemon_got(self, ws: Any, payload: bytes) -> None:
        if len(payload) == self.size:
            ws.write(self.down)
        else:
            self._unexpected(ws, payload)

    def _client_got(self, ws: Any, payload: bytes) -> None:
        now = time.perf_counter()
        if len(payload) != self.size:
            self._unexpected(ws, payload)
            return
        self.times.append(now - self._t0)
        if len(self.times) >= self.samples:
            if self.on_done is not None:
                callback, self.on_done = self.on_done, None
                callback(self)
            return
        self._t0 = time.perf_counter()
        self.client.write(self.up)

    def _unexpected(self, ws: Any, payload: bytes) -> None:
        if len(self.unexpected) < 5:
            self.unexpected.append(payload[:300].decode("utf-8", "replace"))


class _FanClient:
    """One client of the fan-out load: its socket, its session and its numbered envelopes."""

    def __init__(self, index: int, workspace: int, prefix: str) -> None:
        from benchmarks.rawws import token

        self.index = index
        self.workspace = workspace
        self.workspace_id = f"{prefix}-w{workspace}"
        self.runtime_target_id = f"{prefix}-rt{workspace}"
        self.session_id = f"{prefix}-s{index}"
        self.request_id = f"{prefix}-kx{index}"
        self.token = token("client", self.workspace_id, self.runtime_target_id, f"{prefix}-c{index}")
        self.ws: Any = None
        self.envelopes: Any = None


class ForwardingGenerator:
    """The generator's commands: open pairs, pipelined phase, closed-loop phase, status."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.pairs: List[Any] = []
        self._frames: Dict[Tuple[int, str, int], bytes] = {}
        self.fan_clients: List[_FanClient] = []
        self.fan_daemons: List[Any] = []
        self.fan_seq = 0

    def cmd_setup(self, url: str, pairs: int, concurrency: int = 20) -> Any:
        """Connect ``pairs`` daemons, then their clients, then run every key exchange."""
        from twisted.internet import defer

        from benchmarks.rawws import Pair, bounded

        @defer.inlineCallbacks
        def run() -> Any:
            self.pairs = [Pair(i, "fwd") for i in range(pairs)]
            yield bounded(self.pairs, concurrency, lambda p: p.open_daemon(self.reactor, url))
            yield bounded(self.pairs, concurrency, lambda p: p.open_client(self.reactor, url))
            yield bounded(self.pairs, concurrency, lambda p: p.key_exchange())
            return {"pairs": len(self.pairs)}

        return run()

    def _frame(self, pair: Any, direction: str, size: int) -> bytes:
        from benchmarks.rawws import client_frame, e2ee_envelope

        key = (pair.index, direction, size)
        if key not in self._frames:
            self._frames[key] = client_frame(e2ee_envelope(pair.session_id, size))
        return self._frames[key]

    def _ends(self, pair: Any, direction: str) -> Tuple[Any, Any]:
        return (pair.client, pair.daemon) if direction == "c2d" else (pair.daemon, pair.client)

    def cmd_throughput(
        self, pairs: int, direction: str, size: int, duration: float, window: int, frames: int = 0
    ) -> Any:
        """Pipelined phase: windows of frames in flight for ``duration`` s, then drain."""
        from twisted.internet.defer import Deferred

        active = self.pairs[:pairs]
        per_window = max(1, window // len(active))
        limit = max(1, frames // len(active)) if frames else None
        flows = []
        for pair in active:
            sender, receiver = self._ends(pair, direction)
            flows.append(_WindowFlow(sender, receiver, self._frame(pair, direction, size), size, per_window, limit))
        done: Deferred[Dict[str, Any]] = Deferred()
        waiting = set(flows)
        start = time.perf_counter()
        timers: List[Any] = []

        def finish(timed_out: bool) -> None:
            if done.called:
                return
            for timer in timers:
                if timer.active():
                    timer.cancel()
            elapsed = time.perf_counter() - start
            done.callback(
                {
                    "sent": sum(f.sent for f in flows),
                    "received": sum(f.received for f in flows),
                    "elapsed": elapsed,
                    "timed_out": timed_out,
                    "unexpected": [u for f in flows for u in f.unexpected],
                }
            )

        def drained(flow: _WindowFlow) -> None:
            waiting.discard(flow)
            if not waiting:
                finish(False)

        def stop_all() -> None:
            for flow in flows:
                flow.stop()
            timers.append(self.reactor.callLater(DRAIN_TIMEOUT_SECONDS, finish, True))

        for flow in flows:
            flow.on_drained = drained
        timers.append(self.reactor.callLater(duration, stop_all))
        for flow in flows:
            flow.start()
        return done

    def cmd_latency(self, pairs: int, direction: str, size: int, samples: int) -> Any:
        """Closed-loop phase: one frame in flight per pair, one-way times summarised."""
        from twisted.internet.defer import Deferred

        from benchmarks.rawws import summary_ms

        active = self.pairs[:pairs]
        per_pair = max(1, samples // len(active))
        loops = []
        for pair in active:
            sender, receiver = self._ends(pair, direction)
            loops.append(_ClosedLoop(sender, receiver, self._frame(pair, direction, size), size, per_pair))
        done: Deferred[Dict[str, Any]] = Deferred()
        waiting = set(loops)
        start = time.perf_counter()

        def finish(timed_out: bool) -> None:
            if done.called:
                return
            if timer.active():
                timer.cancel()
            times = [t for loop in loops for t in loop.times]
            result: Dict[str, Any] = summary_ms(times)
            result.update(
                elapsed=time.perf_counter() - start,
                timed_out=timed_out,
                unexpected=[u for loop in loops for u in loop.unexpected],
            )
            done.callback(result)

        def finished(loop: _ClosedLoop) -> None:
            waiting.discard(loop)
            if not waiting:
                finish(False)

        for loop in loops:
            loop.on_done = finished
        timer = self.reactor.callLater(120, finish, True)
        for loop in loops:
            loop.start()
        return done

    def cmd_pingpong(self, size: int, samples: int) -> Any:
        """Pair 0, window 1: client → daemon → the daemon's answer → client, round trips summarised."""
        from twisted.internet.defer import Deferred

        from benchmarks.rawws import summary_ms

        pair = self.pairs[0]
        loop = _PingPong(pair, self._frame(pair, "c2d", size), self._frame(pair, "d2c", size), size, samples)
        done: Deferred[Dict[str, Any]] = Deferred()
        start = time.perf_counter()

        def finish(timed_out: bool) -> None:
            if done.called:
                return
            if timer.active():
                timer.cancel()
            result: Dict[str, Any] = summary_ms(loop.times)
            result.update(elapsed=time.perf_counter() - start, timed_out=timed_out, unexpected=loop.unexpected)
            done.callback(result)

        loop.on_done = lambda _: finish(False)
        timer = self.reactor.callLater(120, finish, True)
        loop.start()
        return done

    def cmd_setup_fanout(self, url: str, workspaces: int, clients: int, size: int, concurrency: int = 20) -> Any:
        """``workspaces`` daemons, then ``clients`` clients spread over them, each with its own key exchange."""
        from twisted.internet import defer
        from twisted.internet.defer import Deferred

        from benchmarks.cross_relay import _Envelopes
        from benchmarks.rawws import bounded, kex_init, kex_response, open_websocket, token

        prefix = "fan"
        fan = [_FanClient(i, i % workspaces, prefix) for i in range(clients)]
        by_request = {c.request_id: c for c in fan}
        daemons: List[Any] = []

        def daemon_got(ws: Any, payload: bytes) -> None:
            import json

            frame = json.loads(payload)
            client = by_request.get(frame.get("requestId", ""))
            if frame.get("type") == "relay_key_exchange_init" and client is not None:
                ws.send(kex_response(client.request_id, client.session_id))

        def open_daemon(w: int) -> Any:
            workspace_id, runtime_target_id = f"{prefix}-w{w}", f"{prefix}-rt{w}"
            d = open_websocket(
                self.reactor, url, token_text=token("workspace-daemon", workspace_id, runtime_target_id),
                role="workspace-daemon", workspace_id=workspace_id, runtime_target_id=runtime_target_id,
            )

            def opened(ws: Any) -> None:
                ws.on_message = daemon_got
                daemons.append(ws)

            return d.addCallback(opened)

        def open_client(client: _FanClient) -> Any:
            d = open_websocket(
                self.reactor, url, token_text=client.token, role="client",
                workspace_id=client.workspace_id, runtime_target_id=client.runtime_target_id,
            )

            def opened(ws: Any) -> None:
                ws.tag = client
                client.ws = ws
                client.envelopes = _Envelopes(client.session_id, size)

            return d.addCallback(opened)

        def key_exchange(client: _FanClient) -> Any:
            done: Deferred[None] = Deferred()

            def client_got(ws: Any, payload: bytes) -> None:
                import json

                frame = json.loads(payload)
                if done.called:
                    return
                if frame.get("type") == "relay_key_exchange_response" and frame.get("sessionId") == client.session_id:
                    done.callback(None)
                else:
                    done.errback(RuntimeError(f"unexpected frame during key exchange: {payload[:200]!r}"))

            client.ws.on_message = client_got
            client.ws.send(kex_init(client.request_id))
            return done

        @defer.inlineCallbacks
        def run() -> Any:
            started = time.perf_counter()
            yield bounded(list(range(workspaces)), concurrency, open_daemon)
            yield bounded(fan, concurrency, open_client)
            yield bounded(fan, concurrency, key_exchange)
            self.fan_clients = fan
            self.fan_daemons = daemons
            return {"daemons": len(daemons), "clients": len(fan), "seconds": time.perf_counter() - started}

        return run()

    def cmd_fanout_load(self, rate: float, duration: float, tick: float = 0.001, drain: float = 5.0) -> Any:
        """
        Open loop, paced: ``rate`` frames/s in total, client ``k % clients`` sending frame ``k`` at
        ``start + k / rate`` whatever came back; every daemon echoes each envelope at once. Per frame the
        one-way time (client → daemon) and the round trip (client → daemon → client), generator clock.
        """
        from twisted.internet.defer import Deferred
        from twisted.internet.task import LoopingCall

        from benchmarks.cross_relay import seq_of
        from benchmarks.rawws import summary_ms

        clients = self.fan_clients
        count = len(clients)
        total = int(rate * duration)
        base = self.fan_seq
        self.fan_seq += total
        sent_at = [0.0] * total
        oneway: List[float] = []
        rtts: List[float] = []
        unexpected: List[str] = []
        state = {"sent": 0, "received": 0, "echoed": 0, "late": 0}

        def daemon_got(ws: Any, payload: bytes) -> None:
            now = time.perf_counter()
            seq = seq_of(payload)
            if seq is None or not base <= seq < base + total:
                if len(unexpected) < 5:
                    unexpected.append(payload[:300].decode("utf-8", "replace"))
                return
            oneway.append(now - sent_at[seq - base])
            state["echoed"] += 1
            ws.write(echo(payload))

        def client_got(ws: Any, payload: bytes) -> None:
            now = time.perf_counter()
            seq = seq_of(payload)
            if seq is None or not base <= seq < base + total:
                if len(unexpected) < 5:
                    unexpected.append(payload[:300].decode("utf-8", "replace"))
                return
            rtts.append(now - sent_at[seq - base])
            state["received"] += 1

        echo = clients[0].envelopes.echo
        for ws in self.fan_daemons:
            ws.on_message = daemon_got
            ws.after_read = None
        for client in clients:
            client.ws.on_message = client_got
            client.ws.after_read = None
        done: Deferred[Dict[str, Any]] = Deferred()
        start = time.perf_counter()
        timing: Dict[str, float] = {}

        def send_due() -> None:
            now = time.perf_counter()
            due = min(total, int((now - start) * rate))
            behind = due - state["sent"]
            if behind > rate * 0.05:
                state["late"] += 1  # more than 50 ms of frames due at once: the generator fell behind
            for k in range(state["sent"], due):
                client = clients[k % count]
                sent_at[k] = time.perf_counter()
                client.ws.write(client.envelopes.frame(base + k))
            state["sent"] = due
            if due >= total and ticker.running:
                ticker.stop()
                timing["sending"] = time.perf_counter() - start
                self.reactor.callLater(0.01, wait, time.perf_counter() + drain)

        def wait(deadline: float) -> None:
            if state["received"] < state["sent"] and time.perf_counter() < deadline:
                self.reactor.callLater(0.01, wait, deadline)
                return
            result: Dict[str, Any] = {
                "sent": state["sent"], "echoed": state["echoed"], "received": state["received"],
                "lost": state["sent"] - state["received"], "late_ticks": state["late"],
                "sending": timing["sending"], "elapsed": time.perf_counter() - start,
                "rtt": summary_ms(rtts), "oneway": summary_ms(oneway), "unexpected": unexpected,
            }
            done.callback(result)

        ticker = LoopingCall(send_due)
        ticker.clock = self.reactor
        ticker.start(tick, now=True)
        return done

    def cmd_status(self) -> Dict[str, Any]:
        """How many sockets are still open, and the close codes seen."""
        sockets = [ws for pair in self.pairs for ws in (pair.daemon, pair.client) if ws is not None]
        sockets += self.fan_daemons + [client.ws for client in self.fan_clients if client.ws is not None]
        closes = sorted({f"{ws.close_code} {ws.close_reason}" for ws in sockets if ws.close_code is not None})
        return {"open": sum(1 for ws in sockets if ws.is_open), "total": len(sockets), "closes": closes}


# -- measuring process ---------------------------------------------------------------------------


def _ints(text: str) -> List[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line (``--generator`` is how the measuring process starts the load generator)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="1,10", help="comma-separated numbers of client/daemon pairs")
    parser.add_argument("--sizes", default="256,16384", help="comma-separated frame sizes in bytes (whole JSON)")
    parser.add_argument("--directions", default="c2d,d2c", help="c2d (client→daemon), d2c (daemon→client)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per pipelined phase")
    parser.add_argument("--frames", type=int, default=0, help="stop a pipelined phase after this many frames (0: by duration)")
    parser.add_argument("--window", type=int, default=None,
                        help="frames in flight, shared by all pairs (default 200; 500 with --against-original)")
    parser.add_argument("--latency-samples", type=int, default=5000, help="closed-loop samples per phase (shared by pairs)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unreported load first")
    parser.add_argument("--twistd-profile", metavar="FILE", help="run the relay under cProfile, stats saved to FILE (numbers get slower)")
    side = parser.add_argument_group(
        "--against-original",
        "ours and the original relay alternately (ours first in each round), the issue-11 figures, ratios",
    )
    side.add_argument("--against-original", action="store_true",
                      help="run the issue-11 workloads on ours and on the original relay, round by round")
    side.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each: ours, then the original)")
    side.add_argument("--large-window", type=int, default=32, help="frames in flight for the 16 KiB and 256 KiB phases")
    side.add_argument("--fan-clients", type=int, default=200, help="clients of the fan-out load")
    side.add_argument("--fan-workspaces", type=int, default=50, help="workspaces (one daemon each) of the fan-out load")
    side.add_argument("--fan-rate", type=float, default=8000.0, help="frames/s offered in total by the fan-out clients")
    side.add_argument("--fan-duration", type=float, default=5.0, help="seconds of fan-out load")
    parser.add_argument("--generator", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.window is None:
        args.window = 500 if args.against_original else 200
    return args


def measure(args: argparse.Namespace) -> int:
    """Start the relay and the generator, run every phase, print the table."""
    pair_counts = _ints(args.pairs)
    sizes = _ints(args.sizes)
    directions = [d for d in args.directions.split(",") if d]
    for direction in directions:
        if direction not in DIRECTIONS:
            raise SystemExit(f"unknown direction {direction!r}: use c2d, d2c")
    profile_args = (
        [f"--profile={os.path.abspath(args.twistd_profile)}", "--profiler=cprofile", "--savestats"]
        if args.twistd_profile
        else []
    )
    relay = RelayChild(args=profile_args)
    generator: Optional[GeneratorChild] = None
    rows = []
    try:
        url = relay.start()
        generator = GeneratorChild("benchmarks.forwarding")
        print(f"relay pid {relay.pid} at {url}; generator pid {generator.pid}", flush=True)
        generator.call("setup", url=url, pairs=max(pair_counts))
        if args.warmup > 0:
            generator.call("throughput", pairs=max(pair_counts), direction="c2d", size=sizes[0],
                           duration=args.warmup, window=args.window)
            generator.call("throughput", pairs=max(pair_counts), direction="d2c", size=sizes[0],
                           duration=args.warmup, window=args.window)
        for pairs in pair_counts:
            for size in sizes:
                for direction in directions:
                    with Meter(relay.pid, generator.pid) as flood:
                        result = generator.call(
                            "throughput", pairs=pairs, direction=direction, size=size,
                            duration=args.duration, window=args.window, frames=args.frames,
                        )
                    with Meter(relay.pid, generator.pid) as loop:
                        latency = generator.call(
                            "latency", pairs=pairs, direction=direction, size=size, samples=args.latency_samples
                        )
                    forwarded = result["received"]
                    notes = []
                    if result["timed_out"] or latency["timed_out"]:
                        notes.append(f"LOST {result['sent'] - forwarded} frames")
                    if result["unexpected"] or latency["unexpected"]:
                        notes.append(f"unexpected: {(result['unexpected'] + latency['unexpected'])[0][:120]}")
                    row = [
                        pairs,
                        DIRECTIONS[direction],
                        size,
                        forwarded,
                        f"{forwarded / result['elapsed']:,.0f}",
                        f"{flood.relay_cpu / forwarded * 1e6:.1f}" if forwarded else "-",
                        f"{flood.relay_busy:.0f}",
                        f"{flood.generator_busy:.0f}",
                        f"{latency['p50_ms']:.3f}",
                        f"{latency['p99_ms']:.3f}",
                        f"{loop.relay_cpu / latency['count'] * 1e6:.1f}" if latency["count"] else "-",
                        "; ".join(notes),
                    ]
                    rows.append(row)
                    print("  ".join(str(c) for c in row), flush=True)
        status = generator.call("status")
    finally:
        if generator is not None:
            generator.close()
        code = relay.stop()
    print()
    print(
        table(
            [
                "pairs", "direction", "bytes", "frames", "frames/s", "relay µs/frame", "relay %",
                "gen %", "p50 ms", "p99 ms", "closed-loop µs/frame", "notes",
            ],
            rows,
        )
    )
    print()
    print(
        f"relay µs/frame: relay CPU (utime+stime) over the pipelined phase / frames forwarded "
        f"(window {args.window} frames shared by the pairs, {args.duration:g} s per phase)."
    )
    print("p50/p99: closed-loop one-way latency, sender → relay → receiver, one frame in flight per pair.")
    print(f"sockets still open at the end: {status['open']}/{status['total']}"
          + (f"; closes seen: {status['closes']}" if status["closes"] else ""))
    print("reference: the relay target is ≤ 40 µs of relay CPU per forwarded 256 B frame.")
    ended = "SIGTERM, clean twistd shutdown" if code == -15 else f"exit code {code}"
    print(f"relay stopped ({ended})" + (f"; cProfile stats in {args.twistd_profile}" if args.twistd_profile else ""))
    relay.cleanup()
    return 0


# -- ours against the original (--against-original) ------------------------------------------------

SMALL = 256
MEDIUM = 16 * 1024
LARGE = 256 * 1024


def side_figures(args: argparse.Namespace) -> List[Any]:
    """The issue-11 rows this benchmark measures, in the order they are printed."""
    from benchmarks.side_by_side import Figure

    fan = f"{args.fan_clients} clients / {args.fan_workspaces} workspaces, {args.fan_rate:g} frames/s offered"
    return [
        Figure("c2d_us", f"1 client→1 daemon, {SMALL} B e2ee, {args.window} in flight: relay CPU µs/frame"),
        Figure("c2d_rate", "  same: frames/s", "{:,.0f}"),
        Figure("c2d_gen", "  same: generator % of a core", "{:.0f}", ratio=False),
        Figure("d2c_us", f"1 daemon→1 client, {SMALL} B e2ee, {args.window} in flight: relay CPU µs/frame"),
        Figure("d2c_rate", "  same: frames/s", "{:,.0f}"),
        Figure("d2c_gen", "  same: generator % of a core", "{:.0f}", ratio=False),
        Figure("pp_p50", f"strict ping-pong (window 1), {SMALL} B: round trip p50 µs", "{:.0f}"),
        Figure("pp_p99", "  same: round trip p99 µs", "{:.0f}"),
        Figure("fan_p50", f"{fan}: delivery (client→daemon) p50 ms", "{:.2f}"),
        Figure("fan_p99", "  same: delivery p99 ms", "{:.2f}"),
        Figure("fan_rtt_p99", "  same: round trip (daemon echoes) p99 ms", "{:.2f}"),
        Figure("fan_lost", "  same: frames lost (sent − echoes received)", "{:.0f}", ratio=False),
        Figure("fan_us", "  same: relay CPU µs per forwarded frame (both ways)"),
        Figure("fan_late", "  same: generator ticks > 50 ms behind", "{:.0f}", ratio=False),
        Figure("fan_gen", "  same: generator % of a core", "{:.0f}", ratio=False),
        Figure("k16_us", f"16 KiB frames client→daemon, {args.large_window} in flight: relay CPU µs/frame"),
        Figure("k256_ms_mb", f"256 KiB frames client→daemon, {args.large_window} in flight: relay CPU ms per MB", "{:.2f}"),
    ]


def _phase_notes(label: str, result: Dict[str, Any], notes: List[str]) -> None:
    if result.get("timed_out"):
        notes.append(f"{label}: timed out, {result.get('sent', 0) - result.get('received', 0)} frames missing")
    if result.get("unexpected"):
        notes.append(f"{label}: unexpected frame {result['unexpected'][0][:120]}")


def side_round(impl: str, number: int, args: argparse.Namespace) -> Any:
    """One relay, one round: every issue-11 workload of this benchmark on a fresh relay and generator."""
    from benchmarks.side_by_side import Run, SideRelay

    side = SideRelay(impl)
    generator: Optional[GeneratorChild] = None
    values: Dict[str, float] = {}
    notes: List[str] = []
    try:
        url = side.start()
        generator = GeneratorChild("benchmarks.forwarding")
        print(f"[round {number}] {impl}: relay pid {side.pid} at {url}; generator pid {generator.pid}", flush=True)
        generator.call("setup", url=url, pairs=1)
        if args.warmup > 0:
            for direction in ("c2d", "d2c"):
                generator.call("throughput", pairs=1, direction=direction, size=SMALL,
                               duration=args.warmup, window=args.window)

        def pipelined(direction: str, size: int, window: int) -> Tuple[Meter, Dict[str, Any]]:
            assert generator is not None
            with Meter(side.pid, generator.pid) as meter:
                result = generator.call("throughput", pairs=1, direction=direction, size=size,
                                        duration=args.duration, window=window, frames=args.frames)
            _phase_notes(f"{direction} {size} B", result, notes)
            return meter, result

        for direction in ("c2d", "d2c"):
            meter, result = pipelined(direction, SMALL, args.window)
            if result["received"]:
                values[f"{direction}_us"] = meter.relay_cpu / result["received"] * 1e6
                values[f"{direction}_rate"] = result["received"] / result["elapsed"]
            values[f"{direction}_gen"] = meter.generator_busy

        pong = generator.call("pingpong", size=SMALL, samples=args.latency_samples)
        _phase_notes("ping-pong", pong, notes)
        if pong["count"]:
            values["pp_p50"] = pong["p50_ms"] * 1e3
            values["pp_p99"] = pong["p99_ms"] * 1e3

        setup = generator.call("setup_fanout", url=url, workspaces=args.fan_workspaces,
                               clients=args.fan_clients, size=SMALL)
        if setup["clients"] != args.fan_clients or setup["daemons"] != args.fan_workspaces:
            notes.append(f"fan-out: only {setup['daemons']} daemons / {setup['clients']} clients connected")
        with Meter(side.pid, generator.pid) as fan_meter:
            fan = generator.call("fanout_load", rate=args.fan_rate, duration=args.fan_duration)
        if fan["unexpected"]:
            notes.append(f"fan-out: unexpected frame {fan['unexpected'][0][:120]}")
        values["fan_p50"] = fan["oneway"]["p50_ms"]
        values["fan_p99"] = fan["oneway"]["p99_ms"]
        values["fan_rtt_p99"] = fan["rtt"]["p99_ms"]
        values["fan_lost"] = fan["lost"]
        values["fan_late"] = fan["late_ticks"]
        values["fan_gen"] = fan_meter.generator_busy
        forwarded = fan["echoed"] + fan["received"]
        if forwarded:
            values["fan_us"] = fan_meter.relay_cpu / forwarded * 1e6
        if fan["sending"] > args.fan_duration * 1.1:
            notes.append(f"fan-out: the generator needed {fan['sending']:.1f} s to offer {args.fan_duration:g} s of frames")

        meter, result = pipelined("c2d", MEDIUM, args.large_window)
        if result["received"]:
            values["k16_us"] = meter.relay_cpu / result["received"] * 1e6
        meter, result = pipelined("c2d", LARGE, args.large_window)
        if result["received"]:
            values["k256_ms_mb"] = meter.relay_cpu * 1e3 / (result["received"] * LARGE / 1e6)

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
    """``--against-original``: ``--rounds`` rounds of ours then the original, same load, then the comparison."""
    from benchmarks.side_by_side import ORIGINAL, OURS, report, run_rounds, utc_now

    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    began = utc_now()
    print(f"started {began}; {args.rounds} round(s), each ours then the original; "
          f"{args.duration:g} s per pipelined phase", flush=True)
    runs = run_rounds(args.rounds, [OURS, ORIGINAL], lambda impl, number: side_round(impl, number, args))
    report(
        side_figures(args),
        runs,
        legend=[
            "",
            f"relay CPU µs/frame: relay utime+stime over a {args.duration:g} s pipelined phase / frames delivered "
            "(one pair; a fresh relay and generator per run).",
            f"ping-pong: client → daemon → the daemon's reply → client, one frame in flight, "
            f"{args.latency_samples} round trips, generator clock.",
            f"fan-out: open loop, paced; each daemon echoes every envelope at once; delivery = client → daemon one way; "
            f"{args.fan_duration:g} s; lost = sent − echoes back at the client after a 5 s drain.",
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

        run_generator(ForwardingGenerator)
        return 0
    if args.against_original:
        return measure_against_original(args)
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
