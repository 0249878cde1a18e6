"""PostgreSQL storage of viewport-bus: frames, presence, relay liveness and retention (psycopg 3 async)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
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
    "DatabaseUnsuitable",
    "NewFrame",
    "PresenceRow",
    "PullPage",
    "audience",
    "page_of_batch",
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
#: Longest target list a NOTIFY names (payloads are capped at 8000 bytes, a source id takes 255 characters
#: at most, escaped up to sixfold); a longer one wakes every pull instead.
_NOTIFY_TARGETS_MAX_CHARS = 6000
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

# The NOTIFY payload names the new frame's id and who may want it, so that only those pulls wake
# (listener.parse_notification reads it): ``source`` (its own pulls never answer its frames),
# ``targets`` (null: every relay), and ``origin``, the bus process that stored it (which wakes its
# own pulls when its insert returns, without waiting for the notification).
_NOTIFY = (
    f"pg_notify('{NOTIFY_CHANNEL}', json_build_object("
    "'id', {id}, 'source', %(source)s::text, 'targets', %(targets)s::jsonb, 'origin', %(origin)s::text)::text)"
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
    SELECT id, {_NOTIFY.format(id="id")} FROM inserted
"""

_FRAME_COLUMNS = (
    "workspace_id", "runtime_target_id", "machine_id", "source_relay_id", "target_relay_id",
    "direction", "payload", "issued_at_ms", "signature",
)

# A batch in one statement: under the publish lock it takes a run of ``count`` consecutive ids
# from the sequence (one nextval, then setval past the run: every inserter holds the lock, so
# nobody draws an id in between) and gives the n-th to the n-th frame, so ids follow the given
# order whatever order PostgreSQL evaluates rows in. One NOTIFY (the last id) for the whole batch.
# The frames travel as one JSON array of objects (one text parameter): psycopg escapes nine text
# arrays element by element in Python, several times the cost of the whole insert.
_INSERT_BATCH = f"""
    WITH locked AS (SELECT pg_advisory_xact_lock(%(lock)s)),
    reserved AS (
        SELECT setval(sequence, nextval(sequence) + %(count)s - 1) - %(count)s AS before_first
        FROM locked, pg_get_serial_sequence('relay_bus_frames', 'id') AS sequence
    ),
    inserted AS (
        INSERT INTO relay_bus_frames (id, {", ".join(_FRAME_COLUMNS)})
        SELECT reserved.before_first + given.ord, {", ".join("given." + column for column in _FRAME_COLUMNS)}
        FROM reserved, ROWS FROM (jsonb_to_recordset(%(frames)s::jsonb) AS (
            workspace_id text, runtime_target_id text, machine_id text, source_relay_id text,
            target_relay_id text, direction text, payload text, issued_at_ms bigint, signature text
        )) WITH ORDINALITY AS given({", ".join(_FRAME_COLUMNS)}, ord)
        RETURNING id
    )
    SELECT array_agg(id ORDER BY id), {_NOTIFY.format(id="max(id)")} FROM inserted
"""

# One statement, one snapshot: the head and the frames agree. ``limit + 1`` rows are read to
# learn whether more remain (``more``); ``kept`` cuts the page at ``limit`` and at a payload byte
# budget (the first frame is always kept). PostgreSQL writes the page's JSON itself (one text value,
# in C, on its own process) instead of the bus decoding a dozen columns per row and encoding them
# again: optional fields are left out when null, ``targetRelayId`` is kept (null = everyone).
_PULL = """
    SELECT (SELECT COALESCE(max(id), 0) FROM relay_bus_frames),
           count(*) FILTER (WHERE kept),
           COALESCE(bool_or(NOT kept), false),
           '[' || COALESCE(string_agg(
                '{"id":' || id
                || ',"workspaceId":' || to_json(workspace_id)
                || ',"runtimeTargetId":' || to_json(runtime_target_id)
                || ',"sourceRelayId":' || to_json(source_relay_id)
                || ',"targetRelayId":' || COALESCE(to_json(target_relay_id)::text, 'null')
                || ',"direction":' || to_json(direction)
                || ',"payload":' || to_json(payload)
                || COALESCE(',"machineId":' || to_json(machine_id), '')
                || COALESCE(',"issuedAtMs":' || issued_at_ms, '')
                || COALESCE(',"signature":' || to_json(signature), '')
                || '}', ',' ORDER BY id) FILTER (WHERE kept), '') || ']'
    FROM (
        SELECT *, row_number() OVER w <= %(limit)s
                  AND (row_number() OVER w = 1
                       OR sum(octet_length(payload)) OVER w - octet_length(payload) < %(budget)s) AS kept
        FROM (
            SELECT * FROM relay_bus_frames
            WHERE id > %(since_id)s
              AND COALESCE(target_relay_id, '') IN ('', %(relay_id)s)
              AND source_relay_id <> %(relay_id)s
            ORDER BY id
            LIMIT %(fetch)s
        ) unread
        WINDOW w AS (ORDER BY id)
    ) page
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
class PullPage:
    """
    One pull's frames as the JSON array of the answer (ascending ids), how many, the head id of the
    same snapshot, and whether more remain.
    """

    frames_json: str
    count: int
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


def page_of_batch(
    frames: Sequence[NewFrame], ids: Sequence[int], relay_id: str, limit: int, budget_bytes: int
) -> Optional[PullPage]:
    """
    What a pull of ``relay_id`` reads right after ``ids[0] - 1`` when these frames hold ids ``ids``
    (consecutive, nothing else in between): those for it (targeted at it or at everyone, not its
    own), as the pull query writes them, complete up to ``ids[-1]`` (an empty page when none is for
    it). None when they would not fit one page (``limit`` frames, ``budget_bytes`` of payload after
    the first): the pull then queries as usual.
    """
    entries: list[dict[str, Any]] = []
    payload_bytes = 0
    for frame_id, frame in zip(ids, frames):
        if frame.source_relay_id == relay_id or (frame.target_relay_id or relay_id) != relay_id:
            continue
        if len(entries) >= limit or (entries and payload_bytes >= budget_bytes):
            return None
        payload_bytes += len(frame.payload.encode("utf-8"))
        entry: dict[str, Any] = {
            "id": frame_id,
            "workspaceId": frame.workspace_id,
            "runtimeTargetId": frame.runtime_target_id,
            "sourceRelayId": frame.source_relay_id,
            "targetRelayId": frame.target_relay_id,
            "direction": frame.direction,
            "payload": frame.payload,
        }
        if frame.machine_id is not None:
            entry["machineId"] = frame.machine_id
        if frame.issued_at_ms is not None:
            entry["issuedAtMs"] = frame.issued_at_ms
        if frame.signature is not None:
            entry["signature"] = frame.signature
        entries.append(entry)
    return PullPage(json.dumps(entries, separators=(",", ":")), len(entries), ids[-1], False)


def _frame_row(frame: NewFrame) -> dict[str, Any]:
    """A frame as one object of the batch insert's JSON parameter (keys are the column names)."""
    return {
        "workspace_id": frame.workspace_id,
        "runtime_target_id": frame.runtime_target_id,
        "machine_id": frame.machine_id,
        "source_relay_id": frame.source_relay_id,
        "target_relay_id": frame.target_relay_id,
        "direction": frame.direction,
        "payload": frame.payload,
        "issued_at_ms": frame.issued_at_ms,
        "signature": frame.signature,
    }


def audience(frames: Sequence[NewFrame]) -> tuple[Optional[str], Optional[frozenset[str]]]:
    """
    Who may want these frames: the source relay when all share one (it never reads its own), and the
    target relays, or None (every relay) when any frame is for everyone.
    """
    sources = {frame.source_relay_id for frame in frames}
    targets = frozenset(frame.target_relay_id or "" for frame in frames)
    return (next(iter(sources)) if len(sources) == 1 else None), (None if "" in targets else targets)


def _notify_parameters(frames: Sequence[NewFrame], origin: str) -> dict[str, Optional[str]]:
    """The NOTIFY's parameters; a target list too long for a NOTIFY becomes None (every relay)."""
    source, targets = audience(frames)
    named: Optional[str] = None
    if targets is not None:
        named = json.dumps(sorted(targets), separators=(",", ":"))
        if len(named) > _NOTIFY_TARGETS_MAX_CHARS:
            named = None
    return {"source": source, "targets": named, "origin": origin}


def _presence(row: Any) -> PresenceRow:
    return PresenceRow(
        workspace_id=row[0],
        runtime_target_id=row[1],
        relay_id=row[2],
        relay_ws_base_url=row[3],
        daemon_connected=bool(row[4]),
        machine_id=row[5],
    )


class DatabaseUnsuitable(DatabaseUnavailable):
    """PostgreSQL answers, but the database cannot hold the frames faithfully (its encoding is not UTF8)."""


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
        #: Names this process in its NOTIFYs (see ``_NOTIFY``).
        self.origin = secrets.token_hex(8)
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

        # One task, watched by a timer and a done callback: every extra task or future in between
        # costs the operation another turn of a busy event loop. Not asyncio.wait_for: it waits for
        # the cancelled work to finish, and psycopg then tries to cancel the query on the server
        # (up to 10 s more against a stuck server).
        task = self._loop.create_task(step())
        result: Deferred[_T] = Deferred(lambda _: self._abandon(task))

        def timed_out() -> None:
            if not result.called:
                self._abandon(task)
                result.errback(Failure(DatabaseUnavailable("database operation timed out")))

        timer = self._loop.call_later(self._operation_timeout_s, timed_out)

        def finished(done: "asyncio.Task[_T]") -> None:
            timer.cancel()
            if result.called:
                return  # cancelled or timed out: abandoned, and answered already
            try:
                value = done.result()
            except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as error:
                result.errback(Failure(DatabaseUnavailable(type(error).__name__)))
            except asyncio.CancelledError:
                # Callers that check for Twisted's CancelledError (a request whose client went
                # away) would report asyncio's as a bug.
                result.errback(Failure(CancelledError()))
            except BaseException:
                result.errback(Failure())
            else:
                result.callback(value)

        task.add_done_callback(finished)
        return result

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
            cursor = await conn.execute(
                "SELECT current_database(), pg_encoding_to_char(encoding) FROM pg_database"
                " WHERE datname = current_database()"
            )
            row = await cursor.fetchone()
            # Over a SQL_ASCII connection psycopg hands text back as bytes.
            name, encoding = (value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
                              for value in (row or ("?", "UTF8")))
            if encoding != "UTF8":
                raise DatabaseUnsuitable(
                    f"database {name!r} has encoding {encoding}; viewport-bus keeps frames as UTF-8 text and needs a"
                    f" UTF8 database (CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0): point BUS_DATABASE_URL"
                    f" at one"
                )
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                for statement in _MIGRATION:
                    await conn.execute(statement)
        self._migrated = True
        self._log.info("bus database ready", relay_event="bus_database_ready")

    def migrate(self) -> "Deferred[None]":
        """Create the tables and indexes if missing (idempotent, safe with several bus processes)."""
        return self._run(self._ensure_migrated, migrate=False)

    def publish(self, frame: NewFrame) -> "Deferred[int]":
        """Store a frame and NOTIFY its id in the same transaction; fires with the id."""

        async def work() -> int:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(
                    _INSERT_FRAME,
                    {"lock": _PUBLISH_LOCK, **dataclasses.asdict(frame), **_notify_parameters((frame,), self.origin)},
                )
                row = await cursor.fetchone()
            assert row is not None
            return int(row[0])

        return self._run(work)

    def publish_batch(self, frames: Sequence[NewFrame]) -> "Deferred[list[int]]":
        """Store frames in one transaction, ids ascending in the given order, with one NOTIFY; fires with the ids."""
        parameters = {
            "lock": _PUBLISH_LOCK,
            "count": len(frames),
            "frames": json.dumps([_frame_row(frame) for frame in frames], separators=(",", ":")),
            **_notify_parameters(frames, self.origin),
        }

        async def work() -> list[int]:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(_INSERT_BATCH, parameters)
                row = await cursor.fetchone()
            assert row is not None and len(row[0]) == len(frames)
            return [int(frame_id) for frame_id in row[0]]

        return self._run(work)

    def pull(self, relay_id: str, since_id: int, limit: int, budget_bytes: int) -> "Deferred[PullPage]":
        """Frames after ``since_id`` for ``relay_id`` (targeted at it or at everyone, not its own)."""
        parameters = {
            "since_id": since_id, "relay_id": relay_id, "fetch": limit + 1, "limit": limit, "budget": budget_bytes,
        }

        async def work() -> PullPage:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(_PULL, parameters)
                row = await cursor.fetchone()
            assert row is not None
            return PullPage(frames_json=row[3], count=int(row[1]), head_id=int(row[0]), more=bool(row[2]))

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
