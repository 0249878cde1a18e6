"""The counting half of the fault bench: what was sent and received, classified delivered, signalled or lost."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

#: A delivery gap longer than this after the fault is an interruption (at 200 frames/s frames come every 5 ms).
STALL_SECONDS = 0.25


@dataclass
class SentFrame:
    """One numbered frame as its sender wrote it."""

    key: str
    kind: str
    sent_at: float
    session: str
    connection: int


@dataclass
class Ledger:
    """
    The frames of one direction, in sending order: when each was written, and every time it arrived.

    Envelopes are keyed ``e<number>``; other counted frames (key exchange inits) carry their own keys
    and kinds, so that relay answers can be attributed to them too, but only envelopes are counted.
    """

    sent: List[SentFrame] = field(default_factory=list)
    arrivals: Dict[str, List[float]] = field(default_factory=dict)
    first_arrivals: List[Tuple[float, str]] = field(default_factory=list)

    def record_sent(self, key: str, kind: str, at: float, session: str, connection: int) -> None:
        """The sender wrote a frame."""
        self.sent.append(SentFrame(key, kind, at, session, connection))

    def record_arrival(self, key: str, at: float) -> None:
        """The receiver got a frame (a second arrival of the same key is a duplicate)."""
        times = self.arrivals.setdefault(key, [])
        if not times:
            self.first_arrivals.append((at, key))
        times.append(at)

    def envelopes(self) -> List[SentFrame]:
        """The numbered envelopes sent, in order."""
        return [frame for frame in self.sent if frame.kind == "envelope"]

    def in_flight(self) -> int:
        """Envelopes sent and not (yet) received."""
        return sum(1 for frame in self.envelopes() if frame.key not in self.arrivals)


@dataclass
class Counts:
    """What became of one direction's envelopes."""

    sent: int = 0
    delivered: int = 0
    signalled: int = 0
    silent: int = 0
    duplicated: int = 0
    reordered: int = 0
    abandoned: int = 0
    late: int = 0
    silent_strict: int = 0
    back_after: Optional[float] = None
    latency_p50: float = 0.0
    latency_p99: float = 0.0
    latency_max: float = 0.0
    silent_keys: List[str] = field(default_factory=list)

    def cell(self) -> str:
        """``sent/delivered/signalled/silent/dup/reordered, back after X s`` for the summary table."""
        back = "never" if self.back_after is None else f"{self.back_after:.2f} s"
        late = f" (+{self.late} still in flight)" if self.late else ""
        strict = f" (strict rule: {self.silent_strict} silent)" if self.silent_strict != self.silent else ""
        return (f"{self.sent}/{self.delivered}/{self.signalled}/{self.silent}/{self.duplicated}/{self.reordered}{late}"
                f"{strict},"
                f" back {back}, max {self.latency_max * 1000:.0f} ms")


def number_of(key: str) -> int:
    """The envelope number in an ``e<number>`` key."""
    return int(key[1:])


def _still_in_flight(ledger: Ledger, settled: bool) -> List[SentFrame]:
    """
    Envelopes that may still arrive: when the drain ended with frames still arriving (``settled`` false),
    the undelivered envelopes numbered above the highest one delivered. Counted apart (``late``).
    """
    if settled:
        return []
    highest = max((number_of(key) for _, key in ledger.first_arrivals if key.startswith("e")), default=0)
    return [frame for frame in ledger.envelopes() if frame.key not in ledger.arrivals and number_of(frame.key) > highest]


def _delivery_shape(ledger: Ledger, counts: Counts) -> None:
    """Delivered, duplicated and reordered envelopes, and latency percentiles."""
    sent_at = {frame.key: frame.sent_at for frame in ledger.envelopes()}
    latencies = []
    highest = 0
    for at, key in ledger.first_arrivals:
        if key not in sent_at:
            continue
        counts.delivered += 1
        counts.duplicated += len(ledger.arrivals[key]) - 1
        latencies.append(at - sent_at[key])
        number = number_of(key)
        if number < highest:
            counts.reordered += 1
        highest = max(highest, number)
    if latencies:
        latencies.sort()
        counts.latency_p50 = latencies[len(latencies) // 2]
        counts.latency_p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        counts.latency_max = latencies[-1]


def back_after(ledger: Ledger, fault_at: Optional[float], stopped_at: float,
               stall: float = STALL_SECONDS) -> Optional[float]:
    """
    Seconds from the fault until traffic flows again, judged by the envelopes *sent after the fault*
    (a backlog of older ones arriving late is not traffic flowing): the end of the last gap longer than
    ``stall`` between their arrivals (the gap from the fault to the first one included); 0.0 when there is
    no such gap, None when they stop arriving for good (the last gap reaches the moment the senders stopped).
    """
    if fault_at is None:
        return 0.0
    sent_at = {frame.key: frame.sent_at for frame in ledger.envelopes()}
    arrivals = sorted(at for at, key in ledger.first_arrivals
                      if key in sent_at and sent_at[key] >= fault_at and at <= stopped_at)
    points = [fault_at] + arrivals + [stopped_at]
    resumed: Optional[float] = 0.0
    for index, (before, after) in enumerate(zip(points, points[1:])):
        if after - before > stall:
            resumed = None if index == len(points) - 2 else after - fault_at
    return resumed


#: An undelivered frame is also signalled when a signal reached its sender within this long after it was
#: sent: the relays promise to notice a broken path (a dead relay, a lost subscription) within 3 s.
TOLD_WITHIN_SECONDS = 3.0


def _window_signalled(ledger: Ledger, signals: Sequence[float]) -> Set[str]:
    """
    The window rule: for a signal at time T, with N the highest envelope number received by T (0 if
    none), every undelivered envelope numbered above N and sent at or before T; and every undelivered
    envelope sent at most ``TOLD_WITHIN_SECONDS`` before a signal (frames sent after the lost ones can
    be delivered before the signal arrives, e.g. to a daemon that reconnected elsewhere, which would
    otherwise push N past them). Their keys.
    """
    envelopes = ledger.envelopes()
    sent_times = [frame.sent_at for frame in envelopes]
    arrivals = sorted((at, number_of(key)) for at, key in ledger.first_arrivals if key.startswith("e"))
    windows: List[Tuple[int, int]] = []
    position = 0
    highest = 0
    for at in sorted(signals):
        while position < len(arrivals) and arrivals[position][0] <= at:
            highest = max(highest, arrivals[position][1])
            position += 1
        count = bisect.bisect_right(sent_times, at)
        if count:
            windows.append((highest, number_of(envelopes[count - 1].key)))
    ordered = sorted(signals)

    def told_soon(sent_at: float) -> bool:
        index = bisect.bisect_left(ordered, sent_at)
        return index < len(ordered) and ordered[index] - sent_at <= TOLD_WITHIN_SECONDS

    return {frame.key for frame in envelopes if frame.key not in ledger.arrivals
            and (any(low < number_of(frame.key) <= high for low, high in windows) or told_soon(frame.sent_at))}


def _one_per_frame(ledger: Ledger, refusals: Sequence[float], excluded: Set[str]) -> Set[str]:
    """
    The strict rule: each refusal, in arrival order, covers exactly one frame, the oldest undelivered
    frame (envelope or key exchange init) sent before it and not covered yet. Their keys.
    """
    pending = [frame for frame in ledger.sent if frame.key not in ledger.arrivals and frame.key not in excluded]
    covered: Set[str] = set()
    index = 0
    for at in sorted(refusals):
        if index < len(pending) and pending[index].sent_at < at:
            covered.add(pending[index].key)
            index += 1
    return covered


def classify_client_to_daemon(ledger: Ledger, refusals: Sequence[float], closes: Sequence[Tuple[float, int]],
                              fault_at: Optional[float], stopped_at: float, settled: bool = True) -> Counts:
    """
    Client→daemon: an envelope that did not reach the daemon was *signalled* when the client was told.

    Status frames do not carry the number of the frame they answer, so a ``DAEMON_UNAVAILABLE`` the client
    received at time T (the answer to a refused frame or to a failed publish, or the notice that the daemon
    left) is attributed to the oldest sent-but-undelivered envelopes sent before it: those numbered above
    the last envelope the daemon had received by T, and sent at or before T, or sent at most
    ``TOLD_WITHIN_SECONDS`` before T (the window rule, as for daemon→client). A close of the client's connection is such a signal too, and also covers every
    undelivered frame sent on that connection. Every other undelivered envelope is lost silently, except
    those still in flight when the drain gave up (``late``).

    ``silent_strict`` applies a stricter rule: each ``DAEMON_UNAVAILABLE`` covers exactly one frame (the
    oldest undelivered envelope or key exchange init sent before it that no earlier one covered), as if
    every status answered one refused frame; a crash notice then covers one frame, not the whole window.
    """
    counts = Counts(sent=len(ledger.envelopes()))
    _delivery_shape(ledger, counts)
    late = {frame.key for frame in _still_in_flight(ledger, settled)}
    counts.late = len(late)
    closed = {connection for _, connection in closes}
    on_closed = {frame.key for frame in ledger.sent if frame.connection in closed and frame.key not in ledger.arrivals}
    window = _window_signalled(ledger, list(refusals) + [at for at, _ in closes]) | on_closed
    strict = _one_per_frame(ledger, refusals, on_closed | late) | on_closed
    for frame in ledger.envelopes():
        if frame.key in ledger.arrivals or frame.key in late:
            continue
        if frame.key in window:
            counts.signalled += 1
        else:
            counts.silent += 1
            counts.silent_keys.append(frame.key)
        if frame.key not in strict:
            counts.silent_strict += 1
    counts.back_after = back_after(ledger, fault_at, stopped_at)
    return counts


def classify_daemon_to_client(ledger: Ledger, signals: Sequence[float], abandoned: Dict[str, float],
                              fault_at: Optional[float], stopped_at: float, settled: bool = True) -> Counts:
    """
    Daemon→client: an envelope that did not reach the client was *signalled* in two cases.

    1. Window rule. For every signal reaching the client at time T (a ``DAEMON_UNAVAILABLE`` or
       ``RELAY_REDIRECT`` status, or its connection closing), let N be the highest envelope number the
       client had received by T (0 if none): every undelivered envelope numbered above N and sent by the
       daemon at or before T is signalled. That is, the frames sent between the last delivered frame and
       the status, which the status told the client are gone; and every undelivered envelope sent at
       most ``TOLD_WITHIN_SECONDS`` before a signal.
    2. Abandoned sessions. Once a signal made the client give a session up and start a new key
       exchange (at time A for session S: the session it held, or the one of the key exchange it was
       still waiting for), an undelivered envelope for S sent at or after A is signalled too (counted in
       ``abandoned``): the client knows S is gone; the daemon keeps writing to S only until the new key
       exchange reaches it, and then writes to the newest session. (A key exchange the client gives up
       on its own, after a timeout, abandons nothing: nobody told it.)

    Every other undelivered envelope is lost silently, except those still in flight when the drain gave
    up (``late``).
    """
    counts = Counts(sent=len(ledger.envelopes()))
    _delivery_shape(ledger, counts)
    late = {frame.key for frame in _still_in_flight(ledger, settled)}
    counts.late = len(late)
    window = _window_signalled(ledger, signals)
    for frame in ledger.envelopes():
        if frame.key in ledger.arrivals or frame.key in late:
            continue
        if frame.key in window:
            counts.signalled += 1
        elif frame.session in abandoned and frame.sent_at >= abandoned[frame.session]:
            counts.signalled += 1
            counts.abandoned += 1
        else:
            counts.silent += 1
            counts.silent_keys.append(frame.key)
    counts.silent_strict = counts.silent
    counts.back_after = back_after(ledger, fault_at, stopped_at)
    return counts


def wrong_ready_seconds(samples: Sequence[Tuple[float, Optional[int]]], broken: Optional[Tuple[float, float]],
                        dead_after: Optional[float], end: float) -> Tuple[float, float]:
    """
    How long one relay's ``/ready`` answered wrongly: (seconds it said 200 when it should not, seconds it
    said 503 when it should have said 200), from its samples (answer time, status; None when it did not
    answer), each status holding until the next sample.

    Expected: 503 inside ``broken`` (the backplane outage, from the fault to the backplane's recovery),
    200 elsewhere. After ``dead_after`` (the relay was killed or told to stop) only a 200 answered after
    that moment is wrong. No answer is never wrong.
    """
    cuts = [t for t in (*(broken or ()), dead_after) if t is not None]
    false_ready = false_unready = 0.0
    for (at, status), (until, _) in zip(samples, list(samples[1:]) + [(end, None)]):
        if status is None:
            continue
        says_ready = status == 200
        edges = [at] + sorted(cut for cut in cuts if at < cut < until) + [until]
        for start, stop in zip(edges, edges[1:]):
            middle = (start + stop) / 2
            if dead_after is not None and middle >= dead_after:
                if says_ready and at >= dead_after:
                    false_ready += stop - start
                continue
            should_be_ready = broken is None or not broken[0] <= middle < broken[1]
            if says_ready and not should_be_ready:
                false_ready += stop - start
            elif should_be_ready and not says_ready:
                false_unready += stop - start
    return false_ready, false_unready


@dataclass
class Report:
    """What one run measured."""

    fault: str
    mode: str
    client_to_daemon: Counts
    daemon_to_client: Counts
    fault_lasted: Optional[float] = None
    ready_wrong: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    idle_told_after: Optional[float] = None
    presence_moved_after: Optional[float] = None
    daemon_back_after: Optional[float] = None
    a_exited_after: Optional[float] = None
    in_flight_at_stop: Tuple[int, int] = (0, 0)
    delivered_after_stop: Tuple[int, int] = (0, 0)
    drained_after: float = 0.0
    kex: Tuple[int, int, int] = (0, 0, 0)
    statuses: Dict[str, int] = field(default_factory=dict)
    metrics: Dict[str, Dict[str, float]] = field(default_factory=dict)
    load: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    notes: List[str] = field(default_factory=list)

    def other(self) -> str:
        """The "Other" column: fault duration, /ready wrongness, idle client, presence, key exchanges."""
        def seconds(value: Optional[float]) -> str:
            return "never" if value is None else f"{value:.2f} s"

        parts = [f"fault lasted {seconds(self.fault_lasted)}",
                 "/ready wrong (200 while broken + 503 while fine) " + ", ".join(
                     f"{name} {ready:.2f}+{unready:.2f} s" for name, (ready, unready) in self.ready_wrong.items())]
        if self.presence_moved_after is not None or self.daemon_back_after is not None:
            parts.append(f"A exited after {seconds(self.a_exited_after)}, daemon on B after "
                         f"{seconds(self.daemon_back_after)}, presence at B after {seconds(self.presence_moved_after)}")
        parts.append(f"idle client told after {seconds(self.idle_told_after)}")
        parts.append(f"kex {self.kex[1]}/{self.kex[0]} answered ({self.kex[2]} answers too late)")
        parts.append(f"backlog at stop c→d {self.in_flight_at_stop[0]}, d→c {self.in_flight_at_stop[1]}"
                     f" (delivered after stop {self.delivered_after_stop[0]}, {self.delivered_after_stop[1]})")
        abandoned = self.daemon_to_client.abandoned
        if abandoned:
            parts.append(f"{abandoned} of d→c signalled were to an abandoned session")
        return "; ".join(parts)

    def row(self) -> str:
        """One row of ``| Fault | Client→daemon | Daemon→client | Other |``."""
        return (f"| {self.fault} ({self.mode}) | {self.client_to_daemon.cell()} | {self.daemon_to_client.cell()} "
                f"| {self.other()} |")

    def table(self) -> str:
        """The counters, printable (pytest -s shows it)."""
        header = "| Fault | Client→daemon | Daemon→client | Other |\n|---|---|---|---|"
        lines = [header, self.row(), "(each way: sent/delivered/signalled/silent/dup/reordered)"]
        for name, counts in (("client→daemon", self.client_to_daemon), ("daemon→client", self.daemon_to_client)):
            lines.append(f"{name}: latency p50 {counts.latency_p50 * 1000:.1f} ms, p99 {counts.latency_p99 * 1000:.1f} ms,"
                         f" max {counts.latency_max * 1000:.1f} ms; silent {counts.silent_keys[:8]}"
                         f"{' …' if len(counts.silent_keys) > 8 else ''}")
        lines.append(f"statuses at the client: {self.statuses}; drained {self.drained_after:.2f} s after stop")
        lines.extend(f"metrics {relay}: {values}" for relay, values in self.metrics.items())
        lines.append("machine load average (1, 5, 15 min): " + ", ".join(f"{value:.2f}" for value in self.load))
        lines.extend(self.notes)
        return "\n".join(lines)


__all__ = [
    "STALL_SECONDS",
    "Counts",
    "Report",
    "Ledger",
    "SentFrame",
    "back_after",
    "classify_client_to_daemon",
    "classify_daemon_to_client",
    "number_of",
    "wrong_ready_seconds",
]
