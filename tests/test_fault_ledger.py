"""The fault bench's counting rules (tests.fault_ledger) on hand-made ledgers."""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

from twisted.trial.unittest import SynchronousTestCase

from tests.fault_ledger import (
    Ledger,
    back_after,
    classify_client_to_daemon,
    classify_daemon_to_client,
    wrong_ready_seconds,
)


def ledger(sent: Iterable[Tuple[int, float]], arrived: Iterable[Tuple[int, float]], session: str = "s1") -> Ledger:
    """Envelopes ``(number, sent at)`` and arrivals ``(number, at)``, in the given order."""
    book = Ledger()
    for number, at in sent:
        book.record_sent(f"e{number}", "envelope", at, session, 1)
    for number, at in arrived:
        book.record_arrival(f"e{number}", at)
    return book


def steady(count: int, lost: Iterable[int] = (), latency: float = 0.001, gap_from: Optional[float] = None,
           gap_until: float = 0.0) -> Ledger:
    """``count`` envelopes 10 ms apart from t=0, ``lost`` never arriving; arrivals inside the gap wait until its end."""
    missing = set(lost)
    arrived = []
    for number in range(1, count + 1):
        if number in missing:
            continue
        at = number * 0.01 + latency
        if gap_from is not None and gap_from <= at < gap_until:
            at = gap_until
        arrived.append((number, at))
    return ledger([(number, number * 0.01) for number in range(1, count + 1)], arrived)


class DeliveryShapeTests(SynchronousTestCase):
    """Delivered, duplicated, reordered and latency."""

    def test_everything_delivered_once_in_order(self) -> None:
        """A clean run has nothing lost, duplicated or reordered."""
        counts = classify_daemon_to_client(steady(100), [], {}, None, 2.0)
        self.assertEqual((counts.sent, counts.delivered, counts.signalled, counts.silent), (100, 100, 0, 0))
        self.assertEqual((counts.duplicated, counts.reordered), (0, 0))
        self.assertAlmostEqual(counts.latency_max, 0.001)

    def test_duplicates_and_reordering_are_counted(self) -> None:
        """A second arrival is a duplicate; an arrival below the highest number seen is reordered."""
        book = ledger([(1, 0.0), (2, 0.1), (3, 0.2)], [(1, 0.1), (3, 0.3), (2, 0.4), (3, 0.5)])
        counts = classify_daemon_to_client(book, [], {}, None, 1.0)
        self.assertEqual((counts.delivered, counts.duplicated, counts.reordered), (3, 1, 1))


class SignalTests(SynchronousTestCase):
    """What counts as told, each way."""

    def test_client_window_rule_covers_frames_since_the_last_delivered(self) -> None:
        """A refusal covers the undelivered envelopes after the last delivered one; a later loss stays silent."""
        book = ledger([(1, 0.0), (2, 0.1), (3, 0.2), (4, 0.5)], [(1, 0.05)])
        counts = classify_client_to_daemon(book, [0.3], [], None, 1.0)
        self.assertEqual((counts.signalled, counts.silent, counts.silent_keys), (2, 1, ["e4"]))
        self.assertEqual(counts.silent_strict, 2)

    def test_client_refusal_before_a_frame_does_not_cover_it(self) -> None:
        """A status that arrived before the frame was sent tells nothing about it."""
        book = ledger([(1, 0.5)], [])
        self.assertEqual(classify_client_to_daemon(book, [0.3], [], None, 1.0).silent, 1)

    def test_client_close_covers_frames_sent_on_that_connection(self) -> None:
        """A close of the client's connection signals every undelivered frame sent on it."""
        book = ledger([(1, 0.0), (2, 0.1)], [(2, 0.15)])
        self.assertEqual(classify_client_to_daemon(book, [], [(0.9, 1)], None, 1.0).signalled, 1)

    def test_strict_rule_gives_each_refusal_one_frame_key_exchanges_included(self) -> None:
        """Under the strict rule a refusal covers the oldest undelivered frame, a key exchange init included."""
        book = ledger([(1, 0.0), (2, 0.2)], [])
        book.record_sent("kr1", "kex", 0.1, "", 1)
        book.sent.sort(key=lambda frame: frame.sent_at)
        counts = classify_client_to_daemon(book, [0.15, 0.25], [], None, 1.0)
        self.assertEqual((counts.signalled, counts.silent, counts.silent_strict), (2, 0, 1))

    def test_daemon_window_rule_and_abandoned_session(self) -> None:
        """Envelopes before a status are signalled; those to a session the client gave up are too, others silent."""
        book = ledger([(1, 0.0), (2, 0.1), (3, 0.3)], [(1, 0.05)])
        book.record_sent("e4", "envelope", 0.4, "s2", 1)
        counts = classify_daemon_to_client(book, [0.2], {"s1": 0.2}, None, 1.0)
        self.assertEqual((counts.signalled, counts.abandoned, counts.silent, counts.silent_keys), (2, 1, 1, ["e4"]))

    def test_frames_still_arriving_when_the_drain_gave_up_are_late(self) -> None:
        """An unsettled drain counts the undelivered envelopes above the highest delivered as late, not silent."""
        book = steady(10, lost=[3, 9, 10])
        counts = classify_daemon_to_client(book, [], {}, None, 1.0, settled=False)
        self.assertEqual((counts.late, counts.silent, counts.silent_keys), (2, 1, ["e3"]))


class RecoveryTests(SynchronousTestCase):
    """Time until traffic flows again, and /ready wrongness."""

    def test_no_interruption_is_zero(self) -> None:
        """Traffic that never stalls after the fault is back after 0 s."""
        self.assertEqual(back_after(steady(100), 0.3, 1.0), 0.0)

    def test_the_end_of_the_last_stall_after_the_fault(self) -> None:
        """Traffic is back when the last gap longer than the stall threshold ends."""
        book = steady(200, lost=range(30, 80))
        self.assertAlmostEqual(back_after(book, 0.3, 2.0) or 0.0, 0.501, places=6)

    def test_a_late_backlog_is_not_traffic_flowing(self) -> None:
        """Envelopes sent before the fault and arriving late do not count as traffic back."""
        book = steady(200, gap_from=0.3, gap_until=1.5)
        self.assertAlmostEqual(back_after(book, 0.6, 2.0) or 0.0, 0.9, places=6)

    def test_traffic_that_never_returns(self) -> None:
        """No envelope sent after the fault arriving before the end: never back."""
        book = steady(200, lost=range(30, 201))
        self.assertIsNone(back_after(book, 0.3, 2.0))

    def test_ready_wrong_inside_and_after_an_outage(self) -> None:
        """200 during the outage and 503 after it count as wrong; after the relay stopped only a 200 does."""
        samples = [(0.0, 200), (1.0, 200), (1.5, 503), (3.0, 503), (3.5, 200), (4.0, None)]
        false_ready, false_unready = wrong_ready_seconds(samples, (1.2, 3.2), None, 5.0)
        self.assertAlmostEqual(false_ready, 0.3)
        self.assertAlmostEqual(false_unready, 0.3)
        false_ready, false_unready = wrong_ready_seconds(samples, None, 3.2, 5.0)
        self.assertAlmostEqual(false_ready, 0.5)
        self.assertAlmostEqual(false_unready, 1.5 + 0.2)

    def test_a_200_answered_before_the_relay_was_stopped_is_not_wrong(self) -> None:
        """After the relay was killed, only a 200 it answered afterwards counts."""
        self.assertEqual(wrong_ready_seconds([(0.0, 200), (1.0, None)], None, 0.98, 2.0), (0.0, 0.0))


def test_a_signal_soon_after_covers_frames_a_later_delivery_overtook() -> None:
    """Frames lost before a notice stay signalled even if a later frame reached a new daemon before the notice arrived."""
    from tests.fault_ledger import Ledger, classify_client_to_daemon

    ledger = Ledger()
    for n in range(1, 6):
        ledger.record_sent(f"e{n}", "envelope", 1.0 + 0.5 * n, "s1", 1)
    ledger.record_arrival("e1", 1.6)
    ledger.record_arrival("e5", 3.6)  # sent after e2..e4, delivered to the daemon's new connection
    counts = classify_client_to_daemon(ledger, [3.7], [], fault_at=1.7, stopped_at=10.0)
    assert (counts.signalled, counts.silent) == (3, 0)
    late = classify_client_to_daemon(ledger, [9.5], [], fault_at=1.5, stopped_at=10.0)
    assert late.silent == 3
