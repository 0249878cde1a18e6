"""The open sockets of one relay: pinged in slices, dropped when idle or silent, closed at shutdown."""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Protocol, Set

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from viewport.relay.config import HeartbeatConfig
from viewport.relay.metrics import RelayMetrics
from viewport.relay.registry import Connection

#: Every socket is pinged once per ping interval, one slice per tenth of it.
HEARTBEAT_SLICES = 10
SHUTDOWN_CODE = 1001
SHUTDOWN_REASON = "relay shutting down"


class Socket(Protocol):
    """What the heartbeat and shutdown need of a relay WebSocket."""

    conn: Optional[Connection]
    heartbeat_slot: int
    on_closed: Optional["Deferred[None]"]

    def send_ping(self) -> None:
        """Send a WebSocket ping."""

    def terminate(self) -> None:
        """Drop the TCP connection without a closing handshake."""

    def close(self, code: int, reason: str) -> None:
        """Close the WebSocket with a code and reason."""


class OpenSockets:
    """
    Every open relay WebSocket, spread over ``HEARTBEAT_SLICES`` slices.

    ``tick`` pings one slice, so every socket is pinged once per interval but thousands are never
    pinged (and answer) in one burst; a ping's pong deadline is checked ``pong_timeout_ms`` after
    that ping, so a dead peer is noticed within the configured timeout.
    """

    _log = Logger(namespace="viewport.relay.core")

    def __init__(self, *, heartbeat: HeartbeatConfig, clock: IReactorTime, metrics: RelayMetrics) -> None:
        self._timing = heartbeat
        self._clock = clock
        self._m = metrics
        self._all: Set[Socket] = set()
        self._slots: List[Set[Socket]] = [set() for _ in range(HEARTBEAT_SLICES)]
        self._next_slot = 0
        self._tick = 0
        #: Pong deadlines still to check, by tick; cancelled when every socket is closed for shutdown.
        self._pong_checks: Dict[int, IDelayedCall] = {}

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[Socket]:
        return iter(list(self._all))

    def add(self, socket: Socket) -> None:
        """Track an open socket, in one of the slices (round robin)."""
        slot = self._next_slot
        self._next_slot = (slot + 1) % HEARTBEAT_SLICES
        socket.heartbeat_slot = slot
        self._all.add(socket)
        self._slots[slot].add(socket)

    def remove(self, socket: Socket) -> None:
        """Forget a closed socket."""
        self._all.discard(socket)
        self._slots[getattr(socket, "heartbeat_slot", 0)].discard(socket)

    def tick(self, now_ms: float) -> int:
        """Ping the next slice, drop idle sockets; returns which slice this was (0 starts an interval)."""
        timing = self._timing
        slot = self._tick % HEARTBEAT_SLICES
        self._tick += 1
        pinged: List[Socket] = []
        for socket in list(self._slots[slot]):
            conn = socket.conn
            if conn is None or not conn.registered:
                continue
            if now_ms - conn.last_activity_ms > timing.idle_timeout_ms:
                self._terminate(socket, "idle timeout")
                continue
            if conn.awaiting_pong:
                # Re-pinging would restart the outstanding ping's clock, so a pong timeout
                # longer than the ping interval would never expire; its own check decides.
                continue
            conn.awaiting_pong = True
            conn.ping_sent_ms = now_ms
            try:
                socket.send_ping()
            except Exception:
                self._terminate(socket, "ping failed")
                continue
            pinged.append(socket)
        if pinged:
            self._pong_checks[self._tick] = self._clock.callLater(
                timing.pong_timeout_ms / 1000.0, self._check_pongs, pinged, now_ms, self._tick
            )
        return slot

    def _check_pongs(self, pinged: List[Socket], sent_ms: float, tick: int) -> None:
        self._pong_checks.pop(tick, None)
        try:
            for socket in pinged:
                conn = socket.conn
                if conn is None or not conn.registered:
                    continue
                if conn.awaiting_pong and conn.ping_sent_ms == sent_ms:
                    self._terminate(socket, "heartbeat timeout")
        except Exception:
            self._log.failure("heartbeat tick failed", relay_event="heartbeat_error")

    def _terminate(self, socket: Socket, reason: str) -> None:
        if reason == "idle timeout":
            self._m.relay_ws_idle_terminated.inc()
        elif reason == "heartbeat timeout":
            self._m.relay_ws_stale_terminated.inc()
        self._log.warn("socket terminated: {reason}", relay_event="ws_terminated", reason=reason)
        socket.terminate()

    def close_all(self, grace_seconds: float) -> "Deferred[None]":
        """Close every socket with 1001; fire when all are gone, or drop the rest after ``grace_seconds``."""
        for check in self._pong_checks.values():
            check.cancel()
        self._pong_checks.clear()
        waiting = []
        for socket in list(self._all):
            closed: Deferred[None] = Deferred()
            socket.on_closed = closed
            waiting.append(closed)
            socket.close(SHUTDOWN_CODE, SHUTDOWN_REASON)
        if not waiting:
            return succeed(None)
        done: Deferred[None] = Deferred()
        timer = self._clock.callLater(grace_seconds, self._abort_remaining, done)

        def all_closed(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        DeferredList(waiting).addCallback(all_closed)
        return done

    def _abort_remaining(self, done: "Deferred[None]") -> None:
        for socket in list(self._all):
            socket.terminate()
        if not done.called:
            done.callback(None)
