"""The long-polling pulls of viewport-bus: woken only by frames that may be for them, or answered from a batch at once."""

from __future__ import annotations

from typing import Optional, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from viewport.bus.listener import Notification
from viewport.bus.store import NewFrame, PullPage, audience, page_of_batch

__all__ = ["PullWaiter", "PullWaiters"]


class PullWaiter:
    """
    One long-polling pull's interest in new frames for its relay. It is registered before the pull
    queries, so a frame stored while the query runs still wakes it (``woken``), and the pull looks
    again instead of sleeping through it. A sleeping pull may also be handed its answer (``page``).
    ``seen_through`` is the newest id up to which nothing is for this pull (its ``sinceId``, then
    the head of a query that found nothing, then past batches with nothing for it).
    """

    def __init__(self, waiters: "PullWaiters", relay_id: str, since_id: int, limit: int, budget_bytes: int) -> None:
        self.relay_id = relay_id
        self.seen_through = since_id
        self.limit = limit
        self.budget_bytes = budget_bytes
        self.woken = False
        self.page: Optional[PullPage] = None
        self._waiters = waiters
        self._sleeping: Optional[Deferred[None]] = None
        self._timer: Optional[IDelayedCall] = None

    @property
    def sleeping(self) -> bool:
        """Whether the pull waits for a frame now (and is not running a query)."""
        return self._sleeping is not None

    def wake(self) -> None:
        """A frame this relay may want was stored."""
        self.woken = True
        sleeping, self._sleeping = self._sleeping, None
        if sleeping is not None:
            self._stop_timer()
            sleeping.callback(None)

    def answer(self, page: PullPage) -> None:
        """Hand a sleeping pull the page it would read, and wake it."""
        if self.sleeping:
            self.page = page
            self.wake()

    def sleep(self, seconds: float) -> "Deferred[None]":
        """Fires at once if woken since the last sleep, else at the next wake-up or after ``seconds``."""
        if self.woken:
            self.woken = False
            return succeed(None)

        def cancelled(_: "Deferred[None]") -> None:
            self._sleeping = None
            self._stop_timer()

        sleeping: Deferred[None] = Deferred(cancelled)
        self._sleeping = sleeping
        self._timer = self._waiters.clock.callLater(seconds, self._timed_out)
        return sleeping

    def close(self) -> None:
        """The pull is answered (or gone): stop waiting."""
        self._waiters.remove(self)
        self._stop_timer()
        self._sleeping = None

    def _timed_out(self) -> None:
        self._timer = None
        sleeping, self._sleeping = self._sleeping, None
        if sleeping is not None:
            sleeping.callback(None)

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()


class PullWaiters:
    """
    The long-polling pulls, by relay id. A notification wakes only the pulls of the relays its frames
    may be for (its targets, or every relay but the source), since a pull of any other relay would
    query and find nothing. A batch this process stored answers, without a query, the sleeping pulls
    whose cursor sits right before it.
    """

    def __init__(self, clock: IReactorTime, origin: Optional[str] = None) -> None:
        """``origin`` names this bus process in its NOTIFYs (``BusStore.origin``): those are handled by ``stored``."""
        self.clock = clock
        self.origin = origin
        self._by_relay: dict[str, set[PullWaiter]] = {}

    def __len__(self) -> int:
        return sum(len(waiters) for waiters in self._by_relay.values())

    def watch(self, relay_id: str, since_id: int = 0, limit: int = 1, budget_bytes: int = 0) -> PullWaiter:
        """Register a pull of ``relay_id`` (reading after ``since_id``); ``close`` it once answered."""
        waiter = PullWaiter(self, relay_id, since_id, limit, budget_bytes)
        self._by_relay.setdefault(relay_id, set()).add(waiter)
        return waiter

    def remove(self, waiter: PullWaiter) -> None:
        """Forget a pull (what ``PullWaiter.close`` calls)."""
        waiters = self._by_relay.get(waiter.relay_id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._by_relay[waiter.relay_id]

    def notify(self, notification: Notification) -> None:
        """Frames were stored (by another bus process): wake the pulls of the relays they may be for."""
        if notification.origin is not None and notification.origin == self.origin:
            return  # ours: ``stored`` (or ``not_stored``) already saw to the pulls, when the insert returned
        self.wake(notification.source, notification.targets)

    def wake(self, source: Optional[str], targets: Optional[frozenset[str]]) -> None:
        """Wake the pulls of ``targets`` (None: of every relay), never those of ``source``."""
        if targets is None:
            relays = [relay_id for relay_id in self._by_relay if relay_id != source]
        else:
            relays = [relay_id for relay_id in targets if relay_id != source and relay_id in self._by_relay]
        for relay_id in relays:
            for waiter in list(self._by_relay.get(relay_id, ())):
                waiter.wake()

    def stored(self, frames: Sequence[NewFrame], ids: Sequence[int]) -> None:
        """
        This process committed ``frames`` under ``ids`` (consecutive, in order). For a pull that has
        seen everything up to the id right before them, these frames are exactly what it would read
        next: a sleeping one gets those for it at once instead of waking to query (when they fit its
        page), and one with nothing among them has seen everything up to their last id.
        """
        if ids:
            before = ids[0] - 1
            for relay_id, waiters in list(self._by_relay.items()):
                for waiter in list(waiters):
                    if waiter.seen_through != before:
                        continue  # ids in between that this process did not store: only a query knows
                    page = page_of_batch(frames, ids, relay_id, waiter.limit, waiter.budget_bytes)
                    if page is None:
                        continue
                    if not page.count:
                        waiter.seen_through = ids[-1]
                    elif waiter.sleeping:
                        waiter.answer(page)
        # The others that may want them query (this process skips its own notifications).
        self.wake(*audience(frames))

    def not_stored(self, frames: Sequence[NewFrame]) -> None:
        """An insert of these frames failed or was abandoned, and may have committed all the same: wake their pulls."""
        self.wake(*audience(frames))

    def wake_all(self) -> None:
        """Wake every pull (notifications may have been missed, or the bus is stopping)."""
        for waiters in list(self._by_relay.values()):
            for waiter in list(waiters):
                waiter.wake()
