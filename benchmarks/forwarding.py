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
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional

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


class ForwardingGenerator:
    """The generator's commands: open pairs, pipelined phase, closed-loop phase, status."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.pairs: List[Any] = []
        self._frames: Dict[tuple, bytes] = {}

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

    def _ends(self, pair: Any, direction: str) -> tuple:
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

    def cmd_status(self) -> Dict[str, Any]:
        """How many sockets are still open, and the close codes seen."""
        sockets = [ws for pair in self.pairs for ws in (pair.daemon, pair.client) if ws is not None]
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
    parser.add_argument("--window", type=int, default=200, help="frames in flight, shared by all pairs")
    parser.add_argument("--latency-samples", type=int, default=5000, help="closed-loop samples per phase (shared by pairs)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unreported load first")
    parser.add_argument("--twistd-profile", metavar="FILE", help="run the relay under cProfile, stats saved to FILE (numbers get slower)")
    parser.add_argument("--generator", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


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


def main(argv: Optional[List[str]] = None) -> int:
    """Measure, or be the load generator."""
    args = parse_args(argv)
    if args.generator:
        from benchmarks.rawws import run_generator

        run_generator(ForwardingGenerator)
        return 0
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
