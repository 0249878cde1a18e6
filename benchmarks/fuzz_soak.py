"""
A long fuzz run against one relay process: rounds of upgrade heads and frames (tests/fuzz/),
each round followed by the liveness checks; prints per round what was sent, crashes and the relay's
RSS, and at the end the scan of everything the relay wrote for the tokens and payloads it was sent.

    /work/main/.venv/bin/python benchmarks/fuzz_soak.py --rounds 5 --frames-per-round 3000 --heads-per-round 600
    ... --seed 7 --findings 50            # another seed; print up to 50 findings
    ... --relay-path /tmp/relay-head      # run the relay from another source tree (e.g. `git archive HEAD`)

The run is deterministic per seed (and round sizes); asserting nothing, it exits 1 when the relay
crashed or stopped answering, so it can gate a nightly job.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.defer import ensureDeferred, inlineCallbacks  # noqa: E402
from twisted.internet.task import react  # noqa: E402

from tests.fuzz.driver import CRASHES_KINDS, FuzzDriver, Stats, fuzz_env, rss_kib, summary  # noqa: E402
from tests.support import RelayProcess, kill_on_exit_later, stop_relays  # noqa: E402


def parse_args(argv: List[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frames-per-round", type=int, default=3000)
    parser.add_argument("--heads-per-round", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--findings", type=int, default=30, help="findings to print in full (default 30)")
    parser.add_argument("--leaks", type=int, default=20, help="leaking lines to print in full (default 20)")
    parser.add_argument("--relay-path", default=None, help="PYTHONPATH of the relay process (default: this tree)")
    return parser.parse_args(argv)


@inlineCallbacks
def soak(options: argparse.Namespace) -> Any:
    """Start the relay, run the rounds, print, stop; the exit status says whether it survived."""
    env: Dict[str, str] = fuzz_env()
    if options.relay_path:
        env["PYTHONPATH"] = os.path.abspath(options.relay_path)
    relay = RelayProcess(env)
    kill_on_exit_later(relay)
    yield relay.start()
    driver = FuzzDriver(relay, options.seed)
    print(f"relay pid {driver.pid} from {relay.env['PYTHONPATH']}, seed {options.seed}; RSS before {rss_kib(driver.pid)} KiB",
          flush=True)
    print(f"{'round':>5} {'frames':>7} {'heads':>6} {'crashes':>7} {'exits':>5} {'findings':>8} {'RSS KiB':>8} "
          f"{'conns':>5} {'scopes':>6} {'secs':>6}")
    survived = True
    for number in range(1, options.rounds + 1):
        started = time.monotonic()
        before = len(driver.findings)
        heads = yield driver.heads(options.heads_per_round)
        health = yield driver.check()
        frames = Stats()
        if health.alive and health.health_ok:
            frames = yield driver.frames(options.frames_per_round)
            yield driver.settle_slow()
            health = yield driver.check()
        new = driver.findings[before:]
        crashes = sum(1 for f in new if f.kind in CRASHES_KINDS)
        exits = 0 if health.alive else 1
        print(f"{number:>5} {frames.frames:>7} {heads.heads:>6} {crashes:>7} {exits:>5} {len(new):>8} "
              f"{health.rss_kib:>8} {health.connections if health.connections is not None else '-':>5} "
              f"{health.workspaces if health.workspaces is not None else '-':>6} {time.monotonic() - started:>6.1f}",
              flush=True)
        if not health.alive or not health.health_ok:
            survived = False
            break
    leaks = driver.scan()
    print()
    print(summary(driver.total, driver.findings, leaks))
    print(f"relay RSS after {rss_kib(driver.pid)} KiB")
    for finding in driver.findings[: options.findings]:
        print(finding.line())
    if leaks:
        print(f"\nscan: {len(leaks)} occurrences of minted tokens / sent payloads in the relay's output")
        by_line: Dict[str, List[str]] = {}
        for leak in leaks:
            by_line.setdefault(f"{leak.source}: {leak.line}", []).append(f"{leak.kind} {leak.what}")
        for line, what in list(by_line.items())[: options.leaks]:
            print(f"  {', '.join(sorted(set(what)))}\n    {line[:700]}")
    else:
        print("\nscan: 0 minted tokens, 0 token signatures, 0 payload markers in the relay's output")
    if relay.output.ended.called:
        code = relay.output.ended.result  # type: ignore[attr-defined]
        print(f"relay had exited with {code}")
    else:
        yield stop_relays(relay)
    return 0 if survived else 1


def main(argv: List[str]) -> int:
    """Entry point."""
    options = parse_args(argv)
    status: List[int] = []

    def run(reactor: Any) -> Any:
        return ensureDeferred(_collect(soak(options), status))

    try:
        react(run)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return int(exit_.code)
    return status[0] if status else 1


async def _collect(d: Any, status: List[int]) -> None:
    status.append(await d)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
