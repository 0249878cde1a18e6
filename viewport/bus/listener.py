"""The LISTEN connection of viewport-bus: one per process, waking long-polling pulls on every NOTIFY."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional

import psycopg
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from viewport.bus.pool import ConnectionPool, discard

__all__ = ["NOTIFY_CHANNEL", "NotificationListener"]

#: The NOTIFY channel; its payload is the new frame's id (payloads are capped at 8000 bytes).
NOTIFY_CHANNEL = "relay_bus"


class NotificationListener:
    """
    One LISTEN connection for the whole process; each NOTIFY id is handed to ``on_notify``.

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
        on_notify: Callable[[int], None],
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
                    self._log.info("{relay_event}", relay_event="bus_listen_recovered")
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
                    self._log.warn("{relay_event}", relay_event="bus_listen_error", error=type(error).__name__)
                    failing = True
            finally:
                self.connected = False
                if conn is not None:
                    await discard(conn)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_retry_delay_s)

    def _dispatch(self, payload: str) -> None:
        try:
            frame_id = int(payload)
        except ValueError:
            return
        self._safely(lambda: self._on_notify(frame_id))

    def _safely(self, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception:
            self._log.failure("{relay_event}", relay_event="bus_notify_handler_error")
