"""The LISTEN connection of viewport-bus: one per process, waking the long-polling pulls each NOTIFY is for."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

import psycopg
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from viewport.bus.pool import ConnectionPool, discard

__all__ = ["NOTIFY_CHANNEL", "Notification", "NotificationListener", "parse_notification"]

#: The NOTIFY channel; its payload names the newest frame's id and who may want the frames, never
#: the frames themselves (payloads are capped at 8000 bytes).
NOTIFY_CHANNEL = "relay_bus"


@dataclass(frozen=True)
class Notification:
    """
    Frames were stored, up to ``frame_id``: for ``targets`` (None: every relay), never for
    ``source`` (None: any relay may have sent some of them), by the bus process ``origin``.
    """

    frame_id: int
    source: Optional[str] = None
    targets: Optional[frozenset[str]] = None
    origin: Optional[str] = None


#: What an unreadable payload means: frames for everyone (waking a pull too many is harmless).
_EVERYONE = Notification(0)


def parse_notification(payload: str) -> Notification:
    """
    A NOTIFY payload: ``{"id": 12, "source": "relay-b", "targets": ["relay-a"], "origin": "…"}``
    (``source``, ``targets`` and ``origin`` may be null or missing), or a bare id (an older bus: for
    everyone).
    """
    if payload.isascii() and payload.isdigit():
        return Notification(int(payload))
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):
        return _EVERYONE
    if not isinstance(document, dict):
        return _EVERYONE
    frame_id = document.get("id")
    source = document.get("source")
    targets = document.get("targets")
    origin = document.get("origin")
    if not isinstance(frame_id, int) or isinstance(frame_id, bool):
        return _EVERYONE
    if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        return _EVERYONE
    return Notification(
        frame_id,
        source if isinstance(source, str) else None,
        None if targets is None else frozenset(targets),
        origin if isinstance(origin, str) else None,
    )


class NotificationListener:
    """
    One LISTEN connection for the whole process; each NOTIFY is handed to ``on_notify``.

    The connection is reopened after any failure (after ``retry_delay_s``, doubling up to
    ``max_retry_delay_s``); ``on_connected`` runs after every (re)connect, since notifications
    sent while it was away are lost and waiting pulls should look again. It pings the server
    every ``keepalive_s`` of silence so a dead connection is noticed.
    """

    _log = Logger()

    def __init__(
        self,
        pool: ConnectionPool,
        loop: asyncio.AbstractEventLoop,
        on_notify: Callable[[Notification], None],
        on_connected: Callable[[], None],
        *,
        retry_delay_s: float = 0.1,
        max_retry_delay_s: float = 2.0,
        keepalive_s: float = 15.0,
    ) -> None:
        self._pool = pool
        self._loop = loop
        self._on_notify = on_notify
        self._on_connected = on_connected
        self._retry_delay_s = retry_delay_s
        self._max_retry_delay_s = max_retry_delay_s
        self._keepalive_s = keepalive_s
        self._task: Optional[asyncio.Task[None]] = None
        self.connected = False

    def start(self) -> None:
        """Begin listening in the background."""
        if self._task is None:
            self._task = self._loop.create_task(self._run())

    def stop(self) -> "Deferred[None]":
        """Stop listening and close the connection."""
        task, self._task = self._task, None
        if task is None:
            return succeed(None)
        task.cancel()

        async def wait() -> None:
            try:
                await task
            except BaseException:
                pass

        return Deferred.fromFuture(self._loop.create_task(wait()))

    async def _run(self) -> None:
        delay = self._retry_delay_s
        failing = False
        while True:
            conn: Optional[psycopg.AsyncConnection[Any]] = None
            try:
                conn = await asyncio.wait_for(self._pool.open_connection(), 10.0)
                await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                self.connected = True
                delay = self._retry_delay_s
                if failing:
                    self._log.info("bus LISTEN connection recovered", relay_event="bus_listen_recovered")
                    failing = False
                self._safely(self._on_connected)
                while True:
                    async for notify in conn.notifies(timeout=self._keepalive_s):
                        self._dispatch(notify.payload)
                    await asyncio.wait_for(conn.execute("SELECT 1"), 5.0)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if not failing:
                    self._log.warn(
                        "bus LISTEN connection failed: {error}", relay_event="bus_listen_error", error=type(error).__name__
                    )
                    failing = True
            finally:
                self.connected = False
                if conn is not None:
                    await discard(conn)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_retry_delay_s)

    def _dispatch(self, payload: str) -> None:
        notification = parse_notification(payload)
        self._safely(lambda: self._on_notify(notification))

    def _safely(self, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception:
            self._log.failure("bus notification handling failed", relay_event="bus_notify_handler_error")
