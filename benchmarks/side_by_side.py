"""
Ours against the original relay in one run: start either relay the same way, run the same load on both
alternately (round by round, ours first), and print every figure for both plus ours/original.

A shared machine moves absolute figures by ±30 % between runs, so only ratios measured within one run
mean anything: each round runs the same load against our relay (``RelayChild``) and then against the
original (``original.OriginalRelay`` in single mode, admitted by ``original.FakePlatformChild``), both
measured identically (CPU and RSS from ``/proc/<pid>``, the same generator). Per figure the report gives
each relay's median [min–max] over the rounds and the ratio ours/original, computed within each round,
as median [min–max].

Used by ``forwarding.py --against-original`` and ``connections.py --against-original``. Like ``harness``,
this module imports no Twisted (the fake platform runs in a process of its own).

Relays under test (``IMPLEMENTATIONS``):

* ``ours``: ``twistd -n viewport-relay`` with local HS256 token admission (``RELAY_TOKEN_SECRET``, as every
  other benchmark runs it);
* ``ours-platform``: ours admitting through the platform call, like the original: no token secret,
  ``SERVER_URL`` = the fake platform (only ``connections.py`` runs it: admission is on no frame path);
* ``original``: ``node dist-patched/index.js`` (a black box) admitting through the same fake platform.
"""

from __future__ import annotations

import datetime
import statistics
import time
import uuid
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

from benchmarks.harness import RelayChild, proc_cpu_seconds, proc_rss_kib, raise_nofile, table
from benchmarks.original import CONNECTION_LIMITS, FakePlatformChild, OriginalRelay

OURS = "ours"
OURS_PLATFORM = "ours-platform"
ORIGINAL = "original"
IMPLEMENTATIONS = (OURS, OURS_PLATFORM, ORIGINAL)
DESCRIPTIONS: Dict[str, str] = {
    OURS: "ours (viewport-relay, local HS256 token admission)",
    OURS_PLATFORM: "ours-platform (viewport-relay, admission by the platform call to the fake platform)",
    ORIGINAL: "original (reference relay dist-patched, single mode, admission by the platform call to the fake platform)",
}


class Figure(NamedTuple):
    """One reported figure: ``values[key]`` of every run, shown with ``template``."""

    key: str
    title: str
    template: str = "{:.1f}"
    #: Whether ours/original means anything for it (not for counts such as frames lost).
    ratio: bool = True


def utc_now() -> str:
    """The date and time now, UTC, to the second (printed at the start and end of a run)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt(template: str, value: Optional[float]) -> str:
    """``template.format(value)``; ``-`` for a missing value or NaN."""
    if value is None or value != value:
        return "-"
    return template.format(value)


def spread(values: Sequence[Optional[float]], template: str) -> str:
    """``median [min–max]`` of the finite values (just the value when there is one; ``-`` for none)."""
    finite = [v for v in values if v is not None and v == v]
    if not finite:
        return "-"
    median = statistics.median(finite)
    if len(finite) == 1:
        return fmt(template, median)
    return f"{fmt(template, median)} [{fmt(template, min(finite))}–{fmt(template, max(finite))}]"


def ratios(ours: Sequence[Optional[float]], original: Sequence[Optional[float]]) -> List[float]:
    """Round-by-round ``ours / original`` where both are finite (and the original's is positive)."""
    out = []
    for mine, theirs in zip(ours, original):
        if mine is None or theirs is None or mine != mine or theirs != theirs or theirs <= 0 or mine < 0:
            continue
        out.append(mine / theirs)
    return out


class Run(NamedTuple):
    """One relay's figures in one round."""

    round: int
    impl: str
    values: Dict[str, float]
    notes: List[str]
    seconds: float


class SideRelay:
    """
    One relay under test and what it needs: ours (``RelayChild``) or the original (``OriginalRelay``
    in single mode), the fake platform for the original and ``ours-platform``. ``env`` goes to either
    relay (both read the same variable names); both also get ``original.CONNECTION_LIMITS`` (ours gets
    the raised rate limits from ``RelayChild`` itself, the original from ``SHARED_LIMITS``).
    """

    def __init__(self, impl: str, env: Optional[Mapping[str, str]] = None, nofile: Optional[int] = None) -> None:
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"unknown relay {impl!r}: use {', '.join(IMPLEMENTATIONS)}")
        self.impl = impl
        self.env = {**CONNECTION_LIMITS, **(env or {})}
        self.nofile = nofile
        self.platform: Optional[FakePlatformChild] = None
        self.relay: Optional[Union[RelayChild, OriginalRelay]] = None
        self.url = ""

    @property
    def pid(self) -> int:
        """The relay's process id (the node process for the original)."""
        assert self.relay is not None
        return self.relay.pid

    @property
    def platform_pid(self) -> Optional[int]:
        """The fake platform's process id, None when this relay admits locally."""
        return self.platform.pid if self.platform is not None else None

    def start(self) -> str:
        """Start the fake platform (when needed) and the relay; the relay's ws URL."""
        if self.impl in (ORIGINAL, OURS_PLATFORM):
            self.platform = FakePlatformChild()
            self.platform.start()
        if self.impl == ORIGINAL:
            if self.nofile:
                raise_nofile(self.nofile)  # node inherits this process's limit
            assert self.platform is not None
            self.relay = OriginalRelay(
                "single", server_url=self.platform.url, relay_id=f"original-{uuid.uuid4().hex[:8]}", env=self.env
            )
        else:
            env = dict(self.env)
            if self.impl == OURS_PLATFORM:
                assert self.platform is not None
                env["SERVER_URL"] = self.platform.url
            relay = RelayChild(env=env, nofile=self.nofile)
            if self.impl == OURS_PLATFORM:
                del relay.env["RELAY_TOKEN_SECRET"]  # no local secret: ours admits through SERVER_URL
            self.relay = relay
        self.url = self.relay.start()
        return self.url

    def cpu_seconds(self) -> float:
        """The relay's CPU time so far (utime + stime, all threads)."""
        return proc_cpu_seconds(self.pid)

    def platform_cpu_seconds(self) -> float:
        """The fake platform's CPU time so far (0 without one)."""
        pid = self.platform_pid
        return proc_cpu_seconds(pid) if pid is not None else 0.0

    def rss_kib(self) -> int:
        """The relay's resident memory now."""
        return proc_rss_kib(self.pid)

    def terminated(self) -> Optional[int]:
        """Connections our relay dropped without a close (``ws_terminated`` log lines); None for the original."""
        if isinstance(self.relay, RelayChild):
            return len(self.relay.events("ws_terminated"))
        return None

    def tail(self) -> str:
        """The end of the relay's log."""
        return self.relay.tail() if self.relay is not None else ""

    def stop(self) -> Optional[int]:
        """Stop the relay, then the fake platform; the relay's exit code."""
        code = self.relay.stop() if self.relay is not None else None
        if self.platform is not None:
            self.platform.stop()
        return code

    def cleanup(self) -> None:
        """Remove the relay's working directory."""
        if self.relay is not None:
            self.relay.cleanup()


def run_rounds(rounds: int, impls: Sequence[str], run_one: Callable[[str, int], Run]) -> List[Run]:
    """``run_one(impl, round)`` for every round and implementation, in order (ours first in each round)."""
    runs = []
    for number in range(1, rounds + 1):
        for impl in impls:
            started = time.perf_counter()
            run = run_one(impl, number)
            runs.append(run._replace(seconds=time.perf_counter() - started))
            print(f"[round {number}] {impl} done in {runs[-1].seconds:.0f} s"
                  + (f"; notes: {'; '.join(run.notes)}" if run.notes else ""), flush=True)
    return runs


def runs_table(figures: Sequence[Figure], runs: Sequence[Run]) -> str:
    """Every figure of every run: one row per figure, one column per run in the order they ran."""
    headers = ["figure"] + [f"r{run.round} {run.impl}" for run in runs]
    rows = [[figure.title] + [fmt(figure.template, run.values.get(figure.key)) for run in runs] for figure in figures]
    rows.append(["seconds"] + [f"{run.seconds:.0f}" for run in runs])
    return table(headers, rows)


def comparison_table(figures: Sequence[Figure], runs: Sequence[Run], baseline: str = ORIGINAL) -> str:
    """
    Per figure: each relay's median [min–max] over the rounds, and every other relay / ``baseline``
    computed round by round, as median [min–max].
    """
    impls = [impl for impl in IMPLEMENTATIONS if any(run.impl == impl for run in runs)]
    others = [impl for impl in impls if impl != baseline]
    rounds = sorted({run.round for run in runs})
    by_key = {(run.impl, run.round): run for run in runs}

    def series(impl: str, key: str) -> List[Optional[float]]:
        return [by_key[(impl, n)].values.get(key) if (impl, n) in by_key else None for n in rounds]

    headers = ["figure"] + [f"{impl} median [min–max]" for impl in others + [baseline]]
    headers += [f"{impl}/{baseline} median [min–max]" for impl in others]
    rows = []
    for figure in figures:
        row = [figure.title] + [spread(series(impl, figure.key), figure.template) for impl in others + [baseline]]
        for impl in others:
            if figure.ratio and baseline in impls:
                row.append(spread(ratios(series(impl, figure.key), series(baseline, figure.key)), "{:.2f}"))
            else:
                row.append("-")
        rows.append(row)
    return table(headers, rows)


def report(figures: Sequence[Figure], runs: Sequence[Run], legend: Sequence[str] = ()) -> None:
    """Print the per-run table, the comparison and the legend."""
    print()
    print("Every run (in the order they ran):")
    print(runs_table(figures, runs))
    print()
    rounds = len({run.round for run in runs})
    print(f"Ours against the original over {rounds} round(s) (ratios computed within each round):")
    print(comparison_table(figures, runs))
    print()
    for impl in IMPLEMENTATIONS:
        if any(run.impl == impl for run in runs):
            print(f"  {DESCRIPTIONS[impl]}")
    for line in legend:
        print(line)
    notes = [(run, note) for run in runs for note in run.notes]
    if notes:
        print("notes:")
        for run, note in notes:
            print(f"  round {run.round} {run.impl}: {note}")


__all__ = [
    "DESCRIPTIONS", "Figure", "IMPLEMENTATIONS", "ORIGINAL", "OURS", "OURS_PLATFORM", "Run", "SideRelay",
    "comparison_table", "fmt", "ratios", "report", "run_rounds", "runs_table", "spread", "utc_now",
]
