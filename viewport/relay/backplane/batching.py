"""Ordered, batched, bounded publishing: one request in flight per stream, what queued meanwhile goes next."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Generic, Hashable, List, Optional, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

Item = TypeVar("Item")


@dataclass
class _Queued(Generic[Item]):
    item: Item
    size: int
    queued_at_ms: float
    result: "Deferred[bool]" = field(default_factory=Deferred)


@dataclass
class _Stream(Generic[Item]):
    waiting: Deque[_Queued[Item]] = field(default_factory=deque)
    waiting_bytes: int = 0
    in_flight: bool = False


class OrderedBatcher(Generic[Item]):
    """
    Sends items per stream (a scope and direction) in order, never more than one request at a
    time per stream: items submitted while a request is in flight wait, and all of them (up to
    ``max_batch``) go in the next request; the first request of a burst leaves at the end of the
    reactor turn that queued it, so it carries what arrived in the same read. So a stream is not
    capped at one HTTP round trip per item, and the bus still stores a stream's items in
    submission order.

    The wait is bounded: an item that would take a stream's queue past ``max_queue_bytes`` is
    refused at once, and one that waited longer than ``max_age_ms`` is refused instead of sent.
    Either way its Deferred fires False, which is what a failed send gives too, so the caller
    signals its peer exactly as for any undeliverable frame.
    """

    def __init__(
        self,
        clock: IReactorTime,
        send: Callable[[List[Item]], "Deferred[bool]"],
        *,
        max_batch: Callable[[], int],
        max_queue_bytes: int,
        max_age_ms: int,
        refused: Optional[Callable[[str, int], None]] = None,
    ) -> None:
        """
        ``send(items)`` posts one request and fires True when the bus took all of them;
        ``max_batch()`` says how many items one request may carry now (1 for a platform that takes
        one frame per call); ``refused(reason, count)`` hears about items refused by the bounds.
        """
        if max_queue_bytes <= 0 or max_age_ms <= 0:
            raise ValueError("max_queue_bytes and max_age_ms must be positive")
        self._clock = clock
        self._send = send
        self._max_batch = max_batch
        self._max_queue_bytes = max_queue_bytes
        self._max_age_ms = max_age_ms
        self._refused = refused
        self._streams: Dict[Hashable, _Stream[Item]] = {}
        self._idle_waiters: "List[Deferred[None]]" = []

    def __len__(self) -> int:
        """Items waiting (not yet sent) across all streams."""
        return sum(len(stream.waiting) for stream in self._streams.values())

    def submit(self, stream_key: Hashable, item: Item, size: int) -> "Deferred[bool]":
        """Queue ``item`` on its stream; the Deferred fires True once the bus accepted it, else False."""
        stream = self._streams.get(stream_key)
        if stream is None:
            stream = self._streams[stream_key] = _Stream()
        if stream.waiting and stream.waiting_bytes + size > self._max_queue_bytes:
            self._report("queue_full", 1)
            return succeed(False)
        queued: _Queued[Item] = _Queued(item, size, self._now_ms())
        stream.waiting.append(queued)
        stream.waiting_bytes += size
        if not stream.in_flight:
            # Not at once: the frames that arrive in the same reactor turn (one socket read often
            # holds dozens) then go in the first request too, instead of the first one alone.
            stream.in_flight = True
            self._clock.callLater(0, self._next, stream_key, stream)
        return queued.result

    def drain(self) -> "Deferred[None]":
        """Fires once everything queued has been sent and answered (or refused for its age)."""
        if not self._streams:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def fail_all(self) -> None:
        """Refuse everything still waiting (shutdown)."""
        for stream in self._streams.values():
            while stream.waiting:
                stream.waiting.popleft().result.callback(False)
            stream.waiting_bytes = 0

    def _next(self, stream_key: Hashable, stream: _Stream[Item]) -> None:
        """Send what waits on ``stream`` (one request); called when nothing of it is in flight."""
        now = self._now_ms()
        expired = 0
        while stream.waiting and now - stream.waiting[0].queued_at_ms > self._max_age_ms:
            stale = stream.waiting.popleft()
            stream.waiting_bytes -= stale.size
            stale.result.callback(False)
            expired += 1
        if expired:
            self._report("queued_too_long", expired)
        if not stream.waiting:
            del self._streams[stream_key]
            if not self._streams:
                waiters, self._idle_waiters = self._idle_waiters, []
                for waiter in waiters:
                    waiter.callback(None)
            return
        batch: List[_Queued[Item]] = []
        limit = max(1, self._max_batch())
        while stream.waiting and len(batch) < limit:
            queued = stream.waiting.popleft()
            stream.waiting_bytes -= queued.size
            batch.append(queued)
        stream.in_flight = True
        request = self._send([queued.item for queued in batch])

        def answered(ok: object) -> None:
            stream.in_flight = False
            delivered = ok is True
            for queued in batch:
                queued.result.callback(delivered)
            if self._streams.get(stream_key) is stream:
                self._next(stream_key, stream)

        def broken(failure: Any) -> None:
            answered(False)

        request.addCallbacks(answered, broken)

    def _report(self, reason: str, count: int) -> None:
        if self._refused is not None:
            self._refused(reason, count)

    def _now_ms(self) -> float:
        return self._clock.seconds() * 1000.0
