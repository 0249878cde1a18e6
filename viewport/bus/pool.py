"""The asyncio PostgreSQL connection pool of viewport-bus (psycopg 3): fail fast, never back off."""

from __future__ import annotations

import asyncio
import select
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional

import psycopg
from psycopg.pq import TransactionStatus
from twisted.logger import Logger

__all__ = ["ConnectionPool", "DatabaseUnavailable", "discard", "retrieve"]


class DatabaseUnavailable(Exception):
    """PostgreSQL could not be reached, or did not answer in time."""


def _socket_has_data(conn: psycopg.AsyncConnection[Any]) -> bool:
    """An idle pooled connection with pending input was (almost surely) closed by the server."""
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


class ConnectionPool:
    """
    A small asyncio connection pool that never waits long and never backs off.

    A connection is opened on demand (with a connect timeout), reused LIFO while it stays healthy,
    and discarded after any error. After a PostgreSQL restart every idle connection has unread
    input (the server's goodbye), so it is dropped before use instead of failing a request; when
    PostgreSQL is down each request fails fast, and the first one after it returns reconnects.
    """

    _log = Logger()

    def __init__(self, database_url: str, *, max_size: int, connect_timeout_s: int, statement_timeout_ms: int) -> None:
        self._database_url = database_url
        self._connect_timeout_s = connect_timeout_s
        self._statement_timeout_ms = statement_timeout_ms
        self._max_size = max_size
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._slots: Optional[asyncio.Semaphore] = None
        self._closed = False

    async def open_connection(self, *, autocommit: bool = True) -> psycopg.AsyncConnection[Any]:
        """A new connection with the statement timeout set (also used for LISTEN)."""
        conn = await psycopg.AsyncConnection.connect(
            self._database_url,
            autocommit=autocommit,
            connect_timeout=self._connect_timeout_s,
            application_name="viewport-bus",
        )
        try:
            await conn.execute(f"SET statement_timeout = {int(self._statement_timeout_ms)}")
            # The bus is transient (minutes of retention): a crash may lose the newest frames,
            # and in exchange no commit (nor the publish lock) waits for a disk flush.
            await conn.execute("SET synchronous_commit = off")
        except BaseException:
            await conn.close()
            raise
        return conn

    def _take_idle(self) -> Optional[psycopg.AsyncConnection[Any]]:
        while self._idle:
            conn = self._idle.pop()
            if conn.closed or _socket_has_data(conn):
                conn.pgconn.finish()
                continue
            return conn
        return None

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """Borrow a connection (autocommit); it returns to the pool only when left clean."""
        if self._closed:
            raise DatabaseUnavailable("the store is stopped")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max_size)
        slots = self._slots
        await slots.acquire()
        try:
            conn = self._take_idle() or await self.open_connection()
            try:
                yield conn
            except BaseException:
                await discard(conn)
                raise
            if self._closed or conn.closed or conn.info.transaction_status != TransactionStatus.IDLE:
                await discard(conn)
            else:
                self._idle.append(conn)
        finally:
            slots.release()

    async def close(self) -> None:
        """Close idle connections; borrowed ones are closed when returned."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await discard(conn)


def retrieve(task: "asyncio.Task[Any]") -> None:
    """Consume an abandoned task's outcome (asyncio would report it as never retrieved)."""
    if not task.cancelled():
        task.exception()


async def discard(conn: psycopg.AsyncConnection[Any]) -> None:
    """Close a connection politely within a second, else drop its socket."""
    try:
        await asyncio.wait_for(conn.close(), 1.0)
    except BaseException:
        conn.pgconn.finish()
