"""PostgreSQL storage of viewport-bus: frames, presence, retention and the LISTEN connection (psycopg 3 async)."""

from __future__ import annotations

import asyncio
import dataclasses
import select
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, TypeVar

import psycopg
from psycopg.pq import TransactionStatus
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

__all__ = [
    "BusStore",
    "DatabaseUnavailable",
    "NewFrame",
    "NotificationListener",
    "PresenceRow",
    "StoredFrame",
]

#: The NOTIFY channel; its payload is the new frame's id (payloads are capped at 8000 bytes).
NOTIFY_CHANNEL = "relay_bus"

# Advisory lock keys ("vbus" and "vbum"): publishes take the first for the length of their
# transaction so that ids become visible in increasing order (a cursor never skips a frame
# whose transaction commits late); the migration takes the second.
_PUBLISH_LOCK = 0x76627573
_MIGRATION_LOCK = 0x7662756D

#: Rows one retention statement deletes; a tick repeats it up to ``_RETENTION_MAX_BATCHES`` times.
RETENTION_BATCH = 5000
_RETENTION_MAX_BATCHES = 20

_MIGRATION = (
    """
    CREATE TABLE IF NOT EXISTS relay_bus_frames (
        id bigserial PRIMARY KEY,
        workspace_id text NOT NULL,
        runtime_target_id text NOT NULL,
        machine_id text,
        source_relay_id text NOT NULL,
        target_relay_id text,
        direction text NOT NULL CHECK (direction IN ('client_to_daemon', 'daemon_to_clients')),
        payload text NOT NULL,
        issued_at_ms bigint,
        signature text,
        created_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    "CREATE INDEX IF NOT EXISTS relay_bus_frames_pull_idx"
    " ON relay_bus_frames ((COALESCE(target_relay_id, '')), id)",
    "CREATE INDEX IF NOT EXISTS relay_bus_frames_created_at_idx ON relay_bus_frames (created_at)",
    """
    CREATE TABLE IF NOT EXISTS relay_presence (
        workspace_id text NOT NULL,
        runtime_target_id text NOT NULL DEFAULT '',
        relay_id text NOT NULL,
        relay_ws_base_url text NOT NULL,
        daemon_connected boolean NOT NULL,
        machine_id text,
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (workspace_id, runtime_target_id)
    )
    """,
)

# One statement (its own transaction): the lock CTE runs before the row (and its id) is made,
# and NOTIFY is delivered at commit, which also releases the lock.
_INSERT_FRAME = """
    WITH locked AS (SELECT pg_advisory_xact_lock(%(lock)s)),
    inserted AS (
        INSERT INTO relay_bus_frames (workspace_id, runtime_target_id, machine_id, source_relay_id,
                                      target_relay_id, direction, payload, issued_at_ms, signature)
        SELECT %(workspace_id)s::text, %(runtime_target_id)s::text, %(machine_id)s::text,
               %(source_relay_id)s::text, %(target_relay_id)s::text, %(direction)s::text,
               %(payload)s::text, %(issued_at_ms)s::bigint, %(signature)s::text
        FROM locked
        RETURNING id
    )
    SELECT id, pg_notify('relay_bus', id::text) FROM inserted
"""

# One statement, one snapshot: the head and the frames agree. ``limit + 1`` rows are read to
# learn whether more remain; ``before_bytes`` cuts the answer at a payload byte budget (the
# first frame is always included).
_PULL = """
    WITH head AS (SELECT COALESCE(max(id), 0) AS head_id FROM relay_bus_frames),
    page AS (
        SELECT id, workspace_id, runtime_target_id, machine_id, source_relay_id, target_relay_id,
               direction, payload, issued_at_ms, signature,
               sum(octet_length(payload)) OVER (ORDER BY id) - octet_length(payload) AS before_bytes
        FROM (
            SELECT * FROM relay_bus_frames
            WHERE id > %(since_id)s
              AND COALESCE(target_relay_id, '') IN ('', %(relay_id)s)
              AND source_relay_id <> %(relay_id)s
            ORDER BY id
            LIMIT %(fetch)s
        ) candidates
    )
    SELECT head.head_id, page.id, page.workspace_id, page.runtime_target_id, page.machine_id,
           page.source_relay_id, page.target_relay_id, page.direction, page.payload,
           page.issued_at_ms, page.signature, page.before_bytes
    FROM head LEFT JOIN page ON true
    ORDER BY page.id
"""

_UPSERT_PRESENCE = """
    INSERT INTO relay_presence (workspace_id, runtime_target_id, relay_id, relay_ws_base_url,
                                daemon_connected, machine_id, updated_at)
    VALUES (%(workspace_id)s, %(runtime_target_id)s, %(relay_id)s, %(relay_ws_base_url)s, true,
            %(machine_id)s, now())
    ON CONFLICT (workspace_id, runtime_target_id) DO UPDATE SET
        relay_id = EXCLUDED.relay_id,
        relay_ws_base_url = EXCLUDED.relay_ws_base_url,
        daemon_connected = true,
        machine_id = CASE
            WHEN EXCLUDED.machine_id IS NOT NULL THEN EXCLUDED.machine_id
            WHEN relay_presence.relay_id = EXCLUDED.relay_id THEN relay_presence.machine_id
        END,
        updated_at = now()
"""

_CLEAR_PRESENCE = """
    DELETE FROM relay_presence
    WHERE workspace_id = %s AND runtime_target_id = %s AND relay_id = %s
"""

_PRESENCE_COLUMNS = "workspace_id, runtime_target_id, relay_id, relay_ws_base_url, daemon_connected, machine_id"

_RESOLVE_EXACT = f"""
    SELECT {_PRESENCE_COLUMNS} FROM relay_presence
    WHERE workspace_id = %s AND runtime_target_id = %s AND daemon_connected
      AND updated_at > now() - make_interval(secs => %s)
"""

_RESOLVE_WORKSPACE = f"""
    SELECT {_PRESENCE_COLUMNS} FROM relay_presence
    WHERE workspace_id = %s AND daemon_connected AND updated_at > now() - make_interval(secs => %s)
    ORDER BY (runtime_target_id = '') DESC, updated_at DESC
    LIMIT 1
"""

_EXPIRE_FRAMES = """
    DELETE FROM relay_bus_frames WHERE id IN (
        SELECT id FROM relay_bus_frames
        WHERE created_at < now() - make_interval(secs => %s)
        ORDER BY created_at
        LIMIT %s
    )
"""

_EXPIRE_PRESENCE = "DELETE FROM relay_presence WHERE updated_at < now() - make_interval(secs => %s)"

_T = TypeVar("_T")


class DatabaseUnavailable(Exception):
    """PostgreSQL could not be reached, or did not answer in time."""


@dataclass(frozen=True)
class NewFrame:
    """A frame to store, exactly as published (``None`` = the field was absent or null)."""

    workspace_id: str
    runtime_target_id: str
    machine_id: Optional[str]
    source_relay_id: str
    target_relay_id: Optional[str]
    direction: str
    payload: str
    issued_at_ms: Optional[int]
    signature: Optional[str]


@dataclass(frozen=True)
class StoredFrame:
    """A stored frame with its bus id."""

    id: int
    frame: NewFrame


@dataclass(frozen=True)
class PullPage:
    """One pull's frames (ascending ids), the head id of the same snapshot, and whether more remain."""

    frames: tuple[StoredFrame, ...]
    head_id: int
    more: bool


@dataclass(frozen=True)
class PresenceRow:
    """A live presence entry."""

    workspace_id: str
    runtime_target_id: str
    relay_id: str
    relay_ws_base_url: str
    daemon_connected: bool
    machine_id: Optional[str]


def _socket_has_data(conn: psycopg.AsyncConnection[Any]) -> bool:
    """An idle pooled connection with pending input was (almost surely) closed by the server."""
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


class _Pool:
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
                await _discard(conn)
                raise
            if self._closed or conn.closed or conn.info.transaction_status != TransactionStatus.IDLE:
                await _discard(conn)
            else:
                self._idle.append(conn)
        finally:
            slots.release()

    async def close(self) -> None:
        """Close idle connections; borrowed ones are closed when returned."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await _discard(conn)


def _retrieve(task: "asyncio.Task[Any]") -> None:
    """Consume an abandoned task's outcome (asyncio would report it as never retrieved)."""
    if not task.cancelled():
        task.exception()


async def _discard(conn: psycopg.AsyncConnection[Any]) -> None:
    try:
        await asyncio.wait_for(conn.close(), 1.0)
    except BaseException:
        conn.pgconn.finish()


def _presence(row: Any) -> PresenceRow:
    return PresenceRow(
        workspace_id=row[0],
        runtime_target_id=row[1],
        relay_id=row[2],
        relay_ws_base_url=row[3],
        daemon_connected=bool(row[4]),
        machine_id=row[5],
    )


class BusStore:
    """
    The bus tables behind a Deferred API; every operation runs as an asyncio task on ``loop``.

    Each operation is bounded by ``operation_timeout_s`` (connect, queries and commit together)
    and fails with L{DatabaseUnavailable} when PostgreSQL cannot answer; other database errors
    are bugs and propagate unchanged.
    """

    _log = Logger()

    def __init__(
        self,
        database_url: str,
        loop: asyncio.AbstractEventLoop,
        *,
        max_connections: int = 10,
        connect_timeout_s: int = 3,
        statement_timeout_ms: int = 5000,
        operation_timeout_s: float = 6.0,
    ) -> None:
        self._loop = loop
        self._pool = _Pool(
            database_url,
            max_size=max_connections,
            connect_timeout_s=connect_timeout_s,
            statement_timeout_ms=statement_timeout_ms,
        )
        self._operation_timeout_s = operation_timeout_s
        self._migrated = False
        self._migrating: Optional[asyncio.Future[None]] = None

    @property
    def pool(self) -> _Pool:
        """The connection pool (the listener opens its own connection through it)."""
        return self._pool

    def _run(self, work: Callable[[], Awaitable[_T]], *, migrate: bool = True) -> "Deferred[_T]":
        async def step() -> _T:
            if migrate and not self._migrated:
                await self._ensure_migrated()
            return await work()

        async def bounded() -> _T:
            # Not asyncio.wait_for: it waits for the cancelled work to finish, and psycopg then
            # tries to cancel the query on the server (up to 10 s more against a stuck server).
            task = self._loop.create_task(step())
            try:
                done, _ = await asyncio.wait({task}, timeout=self._operation_timeout_s)
            except asyncio.CancelledError:
                task.cancel()
                task.add_done_callback(_retrieve)
                raise
            if not done:
                task.cancel()
                task.add_done_callback(_retrieve)
                raise DatabaseUnavailable("database operation timed out")
            try:
                return task.result()
            except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as error:
                raise DatabaseUnavailable(type(error).__name__) from None

        return Deferred.fromFuture(self._loop.create_task(bounded()))

    async def _ensure_migrated(self) -> None:
        # Concurrent first requests share one migration attempt.
        if self._migrating is None or self._migrating.done():
            self._migrating = self._loop.create_task(self._migrate())
        await asyncio.shield(self._migrating)

    async def _migrate(self) -> None:
        async with self._pool.connection() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                for statement in _MIGRATION:
                    await conn.execute(statement)
        self._migrated = True
        self._log.info("{relay_event}", relay_event="bus_database_ready")

    def migrate(self) -> "Deferred[None]":
        """Create the tables and indexes if missing (idempotent, safe with several bus processes)."""
        return self._run(self._ensure_migrated, migrate=False)

    def publish(self, frame: NewFrame) -> "Deferred[int]":
        """Store a frame and NOTIFY its id in the same transaction; fires with the id."""

        async def work() -> int:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(_INSERT_FRAME, {"lock": _PUBLISH_LOCK, **dataclasses.asdict(frame)})
                row = await cursor.fetchone()
            assert row is not None
            return int(row[0])

        return self._run(work)

    def pull(self, relay_id: str, since_id: int, limit: int, budget_bytes: int) -> "Deferred[PullPage]":
        """Frames after ``since_id`` for ``relay_id`` (targeted at it or at everyone, not its own)."""

        async def work() -> PullPage:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(
                    _PULL, {"since_id": since_id, "relay_id": relay_id, "fetch": limit + 1}
                )
                rows = await cursor.fetchall()
            head_id = int(rows[0][0]) if rows else 0
            frames: list[StoredFrame] = []
            more = False
            for row in rows:
                if row[1] is None:
                    continue
                if len(frames) >= limit or (frames and int(row[11]) >= budget_bytes):
                    more = True
                    break
                frames.append(
                    StoredFrame(
                        id=int(row[1]),
                        frame=NewFrame(
                            workspace_id=row[2],
                            runtime_target_id=row[3],
                            machine_id=row[4],
                            source_relay_id=row[5],
                            target_relay_id=row[6],
                            direction=row[7],
                            payload=row[8],
                            issued_at_ms=None if row[9] is None else int(row[9]),
                            signature=row[10],
                        ),
                    )
                )
            return PullPage(tuple(frames), head_id, more)

        return self._run(work)

    def upsert_presence(
        self,
        workspace_id: str,
        runtime_target_id: str,
        relay_id: str,
        relay_ws_base_url: str,
        machine_id: Optional[str],
    ) -> "Deferred[None]":
        """Record that ``relay_id`` holds the daemon now (a missing machine id keeps the stored one)."""

        async def work() -> None:
            async with self._pool.connection() as conn:
                await conn.execute(
                    _UPSERT_PRESENCE,
                    {
                        "workspace_id": workspace_id,
                        "runtime_target_id": runtime_target_id,
                        "relay_id": relay_id,
                        "relay_ws_base_url": relay_ws_base_url,
                        "machine_id": machine_id,
                    },
                )

        return self._run(work)

    def clear_presence(self, workspace_id: str, runtime_target_id: str, relay_id: str) -> "Deferred[bool]":
        """Delete the entry only if ``relay_id`` still owns it; fires with whether it did."""

        async def work() -> bool:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(_CLEAR_PRESENCE, (workspace_id, runtime_target_id, relay_id))
                return cursor.rowcount > 0

        return self._run(work)

    def resolve_presence(
        self, workspace_id: str, runtime_target_id: Optional[str], ttl_seconds: float
    ) -> "Deferred[Optional[PresenceRow]]":
        """
        The live entry for the runtime target, or None; entries older than ``ttl_seconds`` are not
        live. Without a runtime target, the workspace's freshest live entry.
        """

        async def work() -> Optional[PresenceRow]:
            async with self._pool.connection() as conn:
                if runtime_target_id:
                    cursor = await conn.execute(_RESOLVE_EXACT, (workspace_id, runtime_target_id, ttl_seconds))
                else:
                    cursor = await conn.execute(_RESOLVE_WORKSPACE, (workspace_id, ttl_seconds))
                row = await cursor.fetchone()
            return None if row is None else _presence(row)

        return self._run(work)

    def expire(self, retention_seconds: float, presence_ttl_seconds: float) -> "Deferred[int]":
        """Delete frames older than the retention age (in batches) and dead presence; fires with frames deleted."""

        async def work() -> int:
            deleted = 0
            async with self._pool.connection() as conn:
                for _ in range(_RETENTION_MAX_BATCHES):
                    cursor = await conn.execute(_EXPIRE_FRAMES, (retention_seconds, RETENTION_BATCH))
                    deleted += max(cursor.rowcount, 0)
                    if cursor.rowcount < RETENTION_BATCH:
                        break
                await conn.execute(_EXPIRE_PRESENCE, (presence_ttl_seconds,))
            return deleted

        return self._run(work)

    def ping(self) -> "Deferred[None]":
        """Fires when PostgreSQL answers a trivial query (and the tables exist)."""

        async def work() -> None:
            async with self._pool.connection() as conn:
                await conn.execute("SELECT 1")

        return self._run(work)

    def close(self) -> "Deferred[None]":
        """Close the pooled connections."""
        return Deferred.fromFuture(self._loop.create_task(self._pool.close()))


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
        pool: _Pool,
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
                    await _discard(conn)
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
