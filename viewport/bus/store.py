"""PostgreSQL storage of viewport-bus: frames, presence, relay liveness and retention (psycopg 3 async)."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Sequence, TypeVar

import psycopg
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from viewport.bus.listener import NOTIFY_CHANNEL
from viewport.bus.pool import ConnectionPool, DatabaseUnavailable, retrieve

__all__ = [
    "BusStore",
    "DatabaseUnavailable",
    "NewFrame",
    "PresenceRow",
    "PullPage",
    "StoredFrame",
]

# Advisory lock keys ("vbus" and "vbum"): publishes take the first for the length of their
# transaction so that ids become visible in increasing order (a cursor never skips a frame
# whose transaction commits late); the migration takes the second.
_PUBLISH_LOCK = 0x76627573
_MIGRATION_LOCK = 0x7662756D

#: Rows one retention statement deletes; a tick repeats it up to ``_RETENTION_MAX_BATCHES`` times.
RETENTION_BATCH = 5000
_RETENTION_MAX_BATCHES = 20
#: Relay rows (live or tombstones) are kept this long after they expire, at least.
RELAY_ROW_RETENTION_SECONDS = 3600.0
#: How long BusStore.close waits for operations abandoned by a timeout or a cancel.
_CLOSE_WAIT_SECONDS = 2.0

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
    """
    CREATE TABLE IF NOT EXISTS relay_bus_relays (
        relay_id text PRIMARY KEY,
        expires_at timestamptz NOT NULL
    )
    """,
)

# One statement (its own transaction): the lock CTE runs before the row (and its id) is made,
# and NOTIFY is delivered at commit, which also releases the lock.
_INSERT_FRAME = f"""
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
    SELECT id, pg_notify('{NOTIFY_CHANNEL}', id::text) FROM inserted
"""

_FRAME_COLUMNS = (
    "workspace_id", "runtime_target_id", "machine_id", "source_relay_id", "target_relay_id",
    "direction", "payload", "issued_at_ms", "signature",
)

# A batch in one statement: under the publish lock it draws one id per frame, numbers them in
# ascending order and gives the n-th smallest to the n-th frame, so ids follow the given order
# whatever order PostgreSQL evaluates rows in. One NOTIFY (the last id) for the whole batch.
_INSERT_BATCH = f"""
    WITH locked AS (SELECT pg_advisory_xact_lock(%(lock)s)),
    drawn AS (
        SELECT nextval(pg_get_serial_sequence('relay_bus_frames', 'id')) AS id
        FROM locked, generate_series(1, %(count)s)
    ),
    numbered AS (SELECT id, row_number() OVER (ORDER BY id) AS ord FROM drawn),
    inserted AS (
        INSERT INTO relay_bus_frames (id, {", ".join(_FRAME_COLUMNS)})
        SELECT numbered.id, {", ".join("given." + column for column in _FRAME_COLUMNS)}
        FROM numbered JOIN unnest(
            %(workspace_id)s::text[], %(runtime_target_id)s::text[], %(machine_id)s::text[],
            %(source_relay_id)s::text[], %(target_relay_id)s::text[], %(direction)s::text[],
            %(payload)s::text[], %(issued_at_ms)s::bigint[], %(signature)s::text[]
        ) WITH ORDINALITY AS given({", ".join(_FRAME_COLUMNS)}, ord) ON given.ord = numbered.ord
        RETURNING id
    )
    SELECT array_agg(id ORDER BY id), pg_notify('{NOTIFY_CHANNEL}', max(id)::text) FROM inserted
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

_PRESENCE_COLUMNS = ", ".join(
    "p." + column
    for column in ("workspace_id", "runtime_target_id", "relay_id", "relay_ws_base_url", "daemon_connected", "machine_id")
)

# A presence is live while it is fresh and its relay is not known dead: a relay without a
# liveness row (one that never sent a heartbeat) counts as alive, an expired row (a missed
# heartbeat, or a goodbye's tombstone) as dead.
_LIVE_PRESENCE = f"""
    SELECT {_PRESENCE_COLUMNS} FROM relay_presence p
    LEFT JOIN relay_bus_relays r ON r.relay_id = p.relay_id
    WHERE p.daemon_connected AND p.updated_at > now() - make_interval(secs => %(ttl)s)
      AND (r.expires_at IS NULL OR r.expires_at > now())
      AND p.workspace_id = %(workspace_id)s
"""

_RESOLVE_EXACT = _LIVE_PRESENCE + " AND p.runtime_target_id = %(runtime_target_id)s"

_RESOLVE_WORKSPACE = _LIVE_PRESENCE + """
    ORDER BY (p.runtime_target_id = '') DESC, p.updated_at DESC
    LIMIT 1
"""

_RELAY_HEARTBEAT = """
    INSERT INTO relay_bus_relays (relay_id, expires_at)
    VALUES (%(relay_id)s, now() + make_interval(secs => %(ttl)s))
    ON CONFLICT (relay_id) DO UPDATE SET expires_at = EXCLUDED.expires_at
"""

# A goodbye keeps the row as a tombstone (expired now), so the relay reads as dead, not unknown.
_RELAY_GONE = """
    INSERT INTO relay_bus_relays (relay_id, expires_at) VALUES (%(relay_id)s, now())
    ON CONFLICT (relay_id) DO UPDATE SET expires_at = EXCLUDED.expires_at
"""

_RELAY_LIVENESS = "SELECT relay_id, expires_at > now() FROM relay_bus_relays WHERE relay_id = ANY(%s::text[])"

_EXPIRE_FRAMES = """
    DELETE FROM relay_bus_frames WHERE id IN (
        SELECT id FROM relay_bus_frames
        WHERE created_at < now() - make_interval(secs => %s)
        ORDER BY created_at
        LIMIT %s
    )
"""

_EXPIRE_PRESENCE = "DELETE FROM relay_presence WHERE updated_at < now() - make_interval(secs => %s)"

_EXPIRE_RELAYS = "DELETE FROM relay_bus_relays WHERE expires_at < now() - make_interval(secs => %s)"

_T = TypeVar("_T")


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


def _twisted_cancel(failure: Failure) -> Failure:
    if failure.check(asyncio.CancelledError):
        return Failure(CancelledError())
    return failure


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
    are bugs and propagate unchanged. Cancelling an operation's Deferred abandons the work (its
    connection is discarded) and fails the Deferred with Twisted's L{CancelledError}.
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
        self._pool = ConnectionPool(
            database_url,
            max_size=max_connections,
            connect_timeout_s=connect_timeout_s,
            statement_timeout_ms=statement_timeout_ms,
        )
        self._operation_timeout_s = operation_timeout_s
        self._migrated = False
        self._migrating: Optional[asyncio.Future[None]] = None
        self._abandoned: set[asyncio.Task[Any]] = set()

    @property
    def pool(self) -> ConnectionPool:
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
                self._abandon(task)
                raise
            if not done:
                self._abandon(task)
                raise DatabaseUnavailable("database operation timed out")
            try:
                return task.result()
            except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as error:
                raise DatabaseUnavailable(type(error).__name__) from None

        # A cancelled Deferred.fromFuture fails with asyncio's CancelledError, which callers that
        # check for Twisted's (a request whose client went away) would report as a bug.
        return Deferred.fromFuture(self._loop.create_task(bounded())).addErrback(_twisted_cancel)

    def _abandon(self, task: "asyncio.Task[Any]") -> None:
        task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)
        task.add_done_callback(retrieve)

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

    def publish_batch(self, frames: Sequence[NewFrame]) -> "Deferred[list[int]]":
        """Store frames in one transaction, ids ascending in the given order, with one NOTIFY; fires with the ids."""
        columns: dict[str, Any] = {column: [getattr(frame, column) for frame in frames] for column in _FRAME_COLUMNS}

        async def work() -> list[int]:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(_INSERT_BATCH, {"lock": _PUBLISH_LOCK, "count": len(frames), **columns})
                row = await cursor.fetchone()
            assert row is not None and len(row[0]) == len(frames)
            return [int(frame_id) for frame_id in row[0]]

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
            parameters = {"workspace_id": workspace_id, "runtime_target_id": runtime_target_id, "ttl": ttl_seconds}
            async with self._pool.connection() as conn:
                cursor = await conn.execute(_RESOLVE_EXACT if runtime_target_id else _RESOLVE_WORKSPACE, parameters)
                row = await cursor.fetchone()
            return None if row is None else _presence(row)

        return self._run(work)

    def relay_heartbeat(self, relay_id: str, ttl_seconds: float) -> "Deferred[None]":
        """Mark ``relay_id`` alive until ``ttl_seconds`` from now (by the database's clock)."""

        async def work() -> None:
            async with self._pool.connection() as conn:
                await conn.execute(_RELAY_HEARTBEAT, {"relay_id": relay_id, "ttl": ttl_seconds})

        return self._run(work)

    def relay_gone(self, relay_id: str) -> "Deferred[None]":
        """Mark ``relay_id`` dead now (a tombstone: its presence stops resolving at once)."""

        async def work() -> None:
            async with self._pool.connection() as conn:
                await conn.execute(_RELAY_GONE, {"relay_id": relay_id})

        return self._run(work)

    def relay_liveness(self, relay_ids: Sequence[str]) -> "Deferred[dict[str, bool]]":
        """Whether each known relay is alive (its row unexpired); ids without a row are left out."""

        async def work() -> dict[str, bool]:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(_RELAY_LIVENESS, (list(relay_ids),))
                rows = await cursor.fetchall()
            return {row[0]: bool(row[1]) for row in rows}

        return self._run(work)

    def expire(self, retention_seconds: float, presence_ttl_seconds: float) -> "Deferred[int]":
        """
        Delete frames older than the retention age (in batches), dead presence, and relay rows expired
        for an hour (longer if presence lives longer, so a dead relay's presence never resolves
        again); fires with the number of frames deleted.
        """

        async def work() -> int:
            deleted = 0
            async with self._pool.connection() as conn:
                for _ in range(_RETENTION_MAX_BATCHES):
                    cursor = await conn.execute(_EXPIRE_FRAMES, (retention_seconds, RETENTION_BATCH))
                    deleted += max(cursor.rowcount, 0)
                    if cursor.rowcount < RETENTION_BATCH:
                        break
                await conn.execute(_EXPIRE_PRESENCE, (presence_ttl_seconds,))
                await conn.execute(_EXPIRE_RELAYS, (max(RELAY_ROW_RETENTION_SECONDS, presence_ttl_seconds),))
            return deleted

        return self._run(work)

    def ping(self) -> "Deferred[None]":
        """Fires when PostgreSQL answers a trivial query (and the tables exist)."""

        async def work() -> None:
            async with self._pool.connection() as conn:
                await conn.execute("SELECT 1")

        return self._run(work)

    def close(self) -> "Deferred[None]":
        """Close the pooled connections, after abandoned operations wind down (two seconds at most)."""

        async def close() -> None:
            if self._abandoned:
                await asyncio.wait(set(self._abandoned), timeout=_CLOSE_WAIT_SECONDS)
            await self._pool.close()

        return Deferred.fromFuture(self._loop.create_task(close()))
