"""
Tables for the issue-8 figure (``cross_flow``): every run, then ours against the original round by round.

A shared machine moves absolute figures by ±30 % between runs, so the comparison pairs the two relays
within a round (ours then the original, same load, minutes apart at most) and reports, per figure, the
median and the spread (min–max) over the rounds of each relay's value and of the ratio ours/original.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Dict, List, Sequence, Tuple

from benchmarks.cross_flow import DIRECTIONS, figures
from benchmarks.harness import table

#: Issue 8, server mode: ours at least this many times the original's frames/s ...
TARGET_SPEEDUP = 5.0
#: ... with at most this much added p50 latency over the single-relay baseline ...
TARGET_ADDED_P50_MS = 20.0
#: ... and no frame lost.
TARGET_LOST = 0

#: (key, column title, format, whether a ratio ours/original means anything)
FIGURES: Tuple[Tuple[str, str, str, bool], ...] = (
    ("frames_s", "frames/s", "{:,.0f}", True),
    ("p50_ms", "p50 ms", "{:.2f}", True),
    ("p99_ms", "p99 ms", "{:.2f}", True),
    ("added_p50_ms", "added p50 ms", "{:+.2f}", True),
    ("added_p99_ms", "added p99 ms", "{:+.2f}", True),
    ("lost", "lost", "{:,.0f}", False),
    ("lost_pct", "lost %", "{:.2f}", False),
    ("A_us", "A µs/frame", "{:.1f}", True),
    ("B_us", "B µs/frame", "{:.1f}", True),
    ("backplane_us", "backplane µs/frame", "{:.1f}", True),
    ("per_publish", "frames/publish", "{:.1f}", True),
)


def _fmt(template: str, value: float) -> str:
    return "-" if value != value else template.format(value)


def _baselines(runs: Sequence[Dict[str, Any]]) -> Dict[Tuple[int, str], Dict[str, Any]]:
    return {(run["round"], run["impl"]): run for run in runs if run["mode"] == "single"}


def all_figures(runs: Sequence[Dict[str, Any]]) -> List[Tuple[Dict[str, Any], str, Dict[str, float]]]:
    """(run, direction, figures) for every run and direction, added latency against its round's baseline."""
    baselines = _baselines(runs)
    out = []
    for run in runs:
        baseline = None if run["mode"] == "single" else baselines.get((run["round"], run["impl"]))
        for direction in DIRECTIONS:
            out.append((run, direction, figures(run, direction, baseline)))
    return out


def runs_table(runs: Sequence[Dict[str, Any]]) -> str:
    """One row per run and direction, in the order they ran."""
    rows = []
    for run, direction, values in all_figures(runs):
        drained = run["directions"][direction]["drained"]
        notes = []
        if drained["out_of_order"]:
            notes.append(f"{drained['out_of_order']} out of order")
        if drained["duplicates"]:
            notes.append(f"{drained['duplicates']} duplicated")
        if drained["stalls"]:
            notes.append(f"{drained['stalls']} stalls ({drained['written_off']} written off)")
        if drained["unexpected"]:
            notes.append(f"unexpected: {drained['unexpected'][0][:80]}")
        status = run.get("status", {})
        if status and status.get("open") != status.get("total"):
            notes.append(f"open {status.get('open')}/{status.get('total')} {status.get('closes')}")
        rows.append(
            [run["round"], run["impl"], run["mode"], direction, f"{values['sent']:,.0f}"]
            + [_fmt(template, values[key]) for key, _, template, _ in FIGURES]
            + [_fmt("{:.0f}", values["gen_pct"]), "; ".join(notes)]
        )
    headers = ["round", "relay", "mode", "direction", "sent"] + [title for _, title, _, _ in FIGURES] + ["gen %", "notes"]
    return table(headers, rows)


def _spread(values: Sequence[float], template: str) -> str:
    finite = [v for v in values if v == v]
    if not finite:
        return "-"
    median = statistics.median(finite)
    if len(finite) == 1:
        return _fmt(template, median)
    return f"{_fmt(template, median)} [{_fmt(template, min(finite))}–{_fmt(template, max(finite))}]"


def comparison(runs: Sequence[Dict[str, Any]]) -> Tuple[str, List[str]]:
    """Ours vs original per mode, direction and figure (median [min–max] over rounds), and the verdicts."""
    by_key: Dict[Tuple[str, str, str, int], Dict[str, float]] = {}
    for run, direction, values in all_figures(runs):
        by_key[(run["impl"], run["mode"], direction, run["round"])] = values
    rounds = sorted({run["round"] for run in runs})
    modes = [m for m in ("redis", "server", "single") if any(r["mode"] == m for r in runs)]
    rows = []
    verdicts = []
    for mode in modes:
        for direction in DIRECTIONS:
            paired = [
                (by_key[("ours", mode, direction, n)], by_key[("original", mode, direction, n)])
                for n in rounds
                if ("ours", mode, direction, n) in by_key and ("original", mode, direction, n) in by_key
            ]
            if not paired:
                continue
            for key, title, template, ratio_ok in FIGURES:
                if mode != "server" and key == "per_publish":
                    continue
                if mode == "single" and key in ("added_p50_ms", "added_p99_ms", "B_us", "backplane_us"):
                    continue
                ours = [o[key] for o, _ in paired]
                original = [p[key] for _, p in paired]
                ratios = [o / p for o, p in zip(ours, original) if ratio_ok and p == p and o == o and p > 0 and o >= 0]
                rows.append(
                    [mode, direction, title, _spread(ours, template), _spread(original, template),
                     _spread(ratios, "{:.2f}") if ratios else "-"]
                )
            if mode == "server":
                verdicts.append(_verdict(direction, paired))
    text = table(["mode", "direction", "figure", "ours median [min–max]", "original median [min–max]",
                  "ours/original median [min–max]"], rows)
    return text, verdicts


def _verdict(direction: str, paired: Sequence[Tuple[Dict[str, float], Dict[str, float]]]) -> str:
    speedup = statistics.median(o["frames_s"] / p["frames_s"] for o, p in paired if p["frames_s"] > 0)
    added = statistics.median(o["added_p50_ms"] for o, _ in paired)
    lost = sum(o["lost"] for o, _ in paired)
    checks = [
        f"frames/s {speedup:.2f}× the original (target ≥ {TARGET_SPEEDUP:g}×: {'met' if speedup >= TARGET_SPEEDUP else 'MISSED'})",
        f"added p50 {added:.2f} ms (target ≤ {TARGET_ADDED_P50_MS:g} ms: {'met' if added <= TARGET_ADDED_P50_MS else 'MISSED'})",
        f"lost {lost:.0f} (target {TARGET_LOST}: {'met' if lost <= TARGET_LOST else 'MISSED'})",
    ]
    return f"server {direction}: " + "; ".join(checks)


def ours_verdicts(runs: Sequence[Dict[str, Any]]) -> List[str]:
    """Without the original: the latency and loss targets for ours in server mode."""
    lines = []
    for run, direction, values in all_figures(runs):
        if run["impl"] == "ours" and run["mode"] == "server":
            lines.append(
                f"round {run['round']} server {direction}: added p50 {values['added_p50_ms']:.2f} ms "
                f"(target ≤ {TARGET_ADDED_P50_MS:g} ms: {'met' if values['added_p50_ms'] <= TARGET_ADDED_P50_MS else 'MISSED'}); "
                f"lost {values['lost']:.0f} ({'met' if values['lost'] <= TARGET_LOST else 'MISSED'})"
            )
    return lines


def report(runs: Sequence[Dict[str, Any]], args: argparse.Namespace, against_original: bool) -> None:
    """Print the run table, the comparison (when both relays ran), the legend and the verdicts."""
    print()
    print(runs_table(runs))
    verdicts: List[str]
    if against_original:
        text, verdicts = comparison(runs)
        print()
        print(text)
    else:
        verdicts = ours_verdicts(runs)
    print()
    print(
        f"Load: {args.flow_workspaces} workspaces (daemon on relay A, client on relay B; single: both on one relay) × "
        f"{args.flow_window} frames of {args.size} B in flight per workspace, one direction at a time, "
        f"{args.flow_duration:g} s each after {args.flow_warmup:g} s of warm-up."
    )
    print(
        "frames/s: delivered while sending / sending time. p50/p99: one-way latency of every delivered frame "
        "(generator clock, send → receipt, drain included); added: minus the same relay's single-mode run of the round."
    )
    print(
        "lost: sent − received after the drain (all in, or 1 s without a frame, or 10 s). µs/frame: CPU (utime+stime) "
        "over the sending time / frames delivered; backplane: viewport-bus + its PostgreSQL backends (server), "
        "redis-server (redis, the machine's shared server). frames/publish: bus rows per publish transaction "
        "(server mode, drain included)."
    )
    for line in verdicts:
        print(line)
    kept = [path for run in runs for path in run.get("logs", [])]
    if kept:
        print("logs kept: " + " ".join(kept))
    if args.profile:
        print(f"py-spy raw stacks of our processes in {args.profile} (<relay>-<mode>-<direction>-<round>-<process>.raw)")


def measure(args: argparse.Namespace, modes: Sequence[str]) -> int:
    """Run the figure (both relays alternately with ``--against-original``) and print it."""
    import time

    from benchmarks.cross_flow import run_rounds

    against = bool(args.against_original)
    if args.rounds is None:
        args.rounds = 3 if against else 1
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    started = time.perf_counter()
    runs = run_rounds(args, modes, ("ours", "original") if against else ("ours",))
    report(runs, args, against)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0
