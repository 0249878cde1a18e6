"""Routing's log (warnings budgeted per tick) and the one way a frame or a socket is refused."""

from __future__ import annotations

from typing import Any, Optional

from twisted.logger import Logger, LogLevel

from viewport.logs import in_words
from viewport.relay.metrics import EventCount
from viewport.relay.registry import Connection

#: The one application close code of the contract: every post-upgrade policy failure.
CLOSE_POLICY = 4008
#: Warnings logged per event name per heartbeat tick; the rest are counted (``log_events_suppressed``).
WARNINGS_PER_TICK = 50


class RoutingLog:
    """
    Routing events as twisted.logger events named by ``relay_event``. Warnings are budgeted per
    event name between heartbeat ticks, so a peer sending garbage cannot flood the log;
    ``reset_budget`` reports what was held back.
    """

    _log = Logger(namespace="viewport.relay.router")

    def __init__(self) -> None:
        self._budget: dict[str, int] = {}

    def info(self, name: str, **details: object) -> None:
        """An informational event (connections coming and going)."""
        self._log.emit(LogLevel.info, in_words(name), relay_event=name, **details)

    def warn(self, name: str, **details: object) -> None:
        """A warning, unless this name used up its budget for the tick."""
        used = self._budget.get(name, 0)
        self._budget[name] = used + 1
        if used < WARNINGS_PER_TICK:
            self._log.emit(LogLevel.warn, in_words(name), relay_event=name, **details)

    def failure(self, failure: Any, name: str) -> None:
        """An unexpected error with its traceback (a bug, or a backplane that broke its promise)."""
        self._log.failure(in_words(name), failure, relay_event=name)

    def reset_budget(self) -> None:
        """Start a new warning budget; log how many warnings of each kind were held back."""
        held = sorted((name, used - WARNINGS_PER_TICK) for name, used in self._budget.items() if used > WARNINGS_PER_TICK)
        self._budget.clear()
        if held:
            # Pairs, not an object: key names such as client_frame_rejected would be redacted.
            self._log.warn("warnings held back this tick: {counts}", relay_event="log_events_suppressed", counts=held)


class Refusals:
    """Count, warn within the budget, answer with a status frame or close ``4008``: every refusal goes here."""

    def __init__(self, events: RoutingLog) -> None:
        self._events = events

    def refuse(
        self,
        conn: Connection,
        counter: EventCount,
        *,
        event: Optional[str] = None,
        reply: Optional[str] = None,
        close: Optional[str] = None,
        **details: object,
    ) -> None:
        """
        Refuse one frame or socket of ``conn``: ``counter`` counts it, ``event`` (with ``details``)
        is logged as a warning, ``reply`` is a status frame sent back, ``close`` a 4008 reason.
        """
        counter.inc()
        if event is not None:
            self._events.warn(event, **details)
        if reply is not None:
            conn.peer.send_text(reply)
        if close is not None:
            conn.peer.close(CLOSE_POLICY, close)

    def too_large(self, conn: Connection, payload: bytes, limit: int, counter: EventCount) -> bool:
        """The relay's own size check (Autobahn already closes 1009 on oversize messages)."""
        if len(payload) <= limit:
            return False
        counter.inc()
        conn.peer.close(1009, "frame too large")
        return True
