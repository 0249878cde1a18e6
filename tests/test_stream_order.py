"""Sequence numbers of Redis bus streams: what the publisher numbers and what the receiver makes of it."""

from __future__ import annotations

from itertools import count

from viewport.relay.backplane.stream_order import (
    GAP, IN_ORDER, LATE, StreamNumbers, StreamOrder, parse_stream_nonce,
)


def _numbers(max_streams: int = 8) -> StreamNumbers:
    epochs = count(1)
    return StreamNumbers(max_streams, new_epoch=lambda: f"epoch{next(epochs):04d}")


def test_each_stream_counts_from_one_under_its_own_epoch() -> None:
    numbers = _numbers()
    assert [numbers.next_nonce("c1", "relay-a") for _ in range(3)] == ["epoch0001.1", "epoch0001.2", "epoch0001.3"]
    assert numbers.next_nonce("c1", "relay-b") == "epoch0002.1"
    assert numbers.next_nonce("c2", "relay-a") == "epoch0003.1"
    assert numbers.next_nonce("c1", "relay-a") == "epoch0001.4"


def test_a_forgotten_stream_starts_again_under_a_new_epoch() -> None:
    numbers = _numbers(max_streams=2)
    numbers.next_nonce("c1", "")
    numbers.next_nonce("c2", "")
    numbers.next_nonce("c3", "")  # c1 is the least recently used
    assert numbers.next_nonce("c1", "") == "epoch0004.1"


def test_nonces_parse_back_and_others_are_not_numbered() -> None:
    assert parse_stream_nonce("epoch0001.17") == ("epoch0001", 17)
    for other in (None, "", "Zq3xv0H0uQ8aFqj5Yb2w1g", "epoch0001.0", "epoch0001.-1", "epoch0001.01",
                  "short.1", "epoch0001.1.2", "epoch 001.1", "epoch0001." + "9" * 19, "epoch0001.1\n"):
        assert parse_stream_nonce(other) is None, other


def test_receiver_delivers_in_order_reports_gaps_and_drops_late_frames() -> None:
    order = StreamOrder()
    check = lambda seq: order.check("c1", "relay-a", "relay-b", f"epochAAAA.{seq}")  # noqa: E731
    assert check(5) == (IN_ORDER, 0)  # the first one seen starts the stream
    assert check(6) == (IN_ORDER, 0)
    assert check(9) == (GAP, 2)
    assert check(7) == (LATE, 0)
    assert check(9) == (LATE, 0)
    assert check(10) == (IN_ORDER, 0)


def test_streams_are_apart_by_source_target_and_channel() -> None:
    order = StreamOrder()
    assert order.check("c1", "relay-a", "relay-b", "epochAAAA.5")[0] == IN_ORDER
    assert order.check("c1", "relay-c", "relay-b", "epochCCCC.1")[0] == IN_ORDER
    assert order.check("c1", "relay-a", "", "epochDDDD.1")[0] == IN_ORDER
    assert order.check("c2", "relay-a", "relay-b", "epochAAAA.1")[0] == IN_ORDER
    assert order.check("c1", "relay-a", "relay-b", "epochAAAA.6")[0] == IN_ORDER


def test_a_new_epoch_or_a_forgotten_channel_starts_afresh() -> None:
    order = StreamOrder()
    order.check("c1", "relay-a", "", "epochAAAA.50")
    assert order.check("c1", "relay-a", "", "epochBBBB.1") == (IN_ORDER, 0)  # the publisher restarted
    order.forget("c1")  # unsubscribed: what was published meanwhile is not missing
    assert order.check("c1", "relay-a", "", "epochBBBB.40") == (IN_ORDER, 0)
    assert order.check("c1", "relay-a", "", None) == (IN_ORDER, 0)
    assert order.check("c1", "relay-a", "", "random-nonce-of-an-older-relay") == (IN_ORDER, 0)


def test_receiver_memory_is_bounded() -> None:
    order = StreamOrder(max_channels=3)
    for index in range(10):
        order.check(f"c{index}", "relay-a", "", "epochAAAA.1")
    assert len(order) == 3
    assert order.check("c0", "relay-a", "", "epochAAAA.9") == (IN_ORDER, 0)  # forgotten: no false gap
