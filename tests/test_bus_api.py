"""viewport-bus over HTTP: a real ``twistd -r asyncio -n viewport-bus`` on a fresh PostgreSQL database."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError, inlineCallbacks
from twisted.internet.task import Clock
from twisted.web.client import ResponseNeverReceived

from tests.pg_server import INTERNAL_KEY, REPO_ROOT, TOKEN_SECRET, BusProcess, ScratchDatabase, http_client
from viewport.bus.api import PULL_BUDGET_BYTES, max_body_bytes_for
from viewport.bus.listener import Notification, parse_notification
from viewport.bus.store import NewFrame, PullPage, page_of_batch
from viewport.bus.waiters import PullWaiters
from viewport.bus.config import ConfigError, load_bus_config
from viewport.relay.admission import PlatformAdmission
from viewport.tokens import mint_token, validate_claims

API = "/api/runtime/internal/relay"
MAX_PAYLOAD = 4096
MAX_BATCH = 16384
CAPABILITIES = ["batch", "liveness"]


class Bus:
    """A running bus, its database, and an HTTP client for it."""

    def __init__(self, process: BusProcess, database: ScratchDatabase) -> None:
        self.process = process
        self.database = database
        self.client, self.pool = http_client()

    @inlineCallbacks
    def post(self, path: str, body: Any = None, *, key: Optional[str] = INTERNAL_KEY, raw: Optional[bytes] = None) -> Any:
        """POST JSON (or ``raw`` bytes); fires with ``(status, decoded body)``."""
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["x-relay-internal-key"] = key
        data = raw if raw is not None else json.dumps(body).encode("utf-8")
        response = yield self.client.post(self.process.url + path, data=data, headers=headers)
        content = yield response.content()
        return response.code, (json.loads(content) if content else None)

    @inlineCallbacks
    def get(self, path: str) -> Any:
        """GET; fires with ``(status, decoded body)``."""
        response = yield self.client.get(self.process.url + path)
        content = yield response.content()
        return response.code, json.loads(content)

    @inlineCallbacks
    def close(self) -> Any:
        """Stop the bus and drop its database."""
        try:
            yield self.pool.closeCachedConnections()
        finally:
            yield self.process.stop()
            self.database.drop()


@inlineCallbacks
def _start_bus(env: Optional[Dict[str, str]] = None) -> Any:
    database = ScratchDatabase()
    process = BusProcess(database.url, env)
    try:
        yield process.start()
    except Exception:
        process.kill()
        database.drop()
        raise
    return Bus(process, database)


@pytest.fixture(scope="module")
def bus() -> Any:
    """One bus for the module's tests (each test uses relay and workspace ids of its own)."""
    started = pytest_twisted.blockon(
        _start_bus({"BUS_MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD), "BUS_MAX_BATCH_BYTES": str(MAX_BATCH)})
    )
    yield started
    pytest_twisted.blockon(started.close())


@pytest.fixture
def short_lived_bus() -> Any:
    """A bus whose frames and presence expire after half a second."""
    started = pytest_twisted.blockon(
        _start_bus({"BUS_RETENTION_SECONDS": "0.5", "BUS_PRESENCE_TTL_SECONDS": "0.5"})
    )
    yield started
    pytest_twisted.blockon(started.close())


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _frame(source: str, target: Any, **fields: Any) -> Dict[str, Any]:
    body: Dict[str, Any] = {
        "workspaceId": "w:1",
        "runtimeTargetId": "rt:1",
        "sourceRelayId": source,
        "targetRelayId": target,
        "direction": "client_to_daemon",
        "payload": '{"type":"e2ee"}',
    }
    body.update(fields)
    return body


@inlineCallbacks
def _head(bus: Bus) -> Any:
    status, answer = yield bus.post(API + "/bus/pull", {"relayId": _unique("head"), "sinceId": 0, "waitMs": 0})
    assert status == 200
    return answer["headId"]


def _eventually(check: Any, timeout: float = 5.0, step: float = 0.05) -> Any:
    """Repeat ``check`` (returning a Deferred of bool) until true, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout

    @inlineCallbacks
    def attempt() -> Any:
        while True:
            done = yield check()
            if done:
                return
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            yield task.deferLater(reactor, step, lambda: None)

    return attempt()


# --- authentication, routing and request validation --------------------------------------------


@pytest_twisted.inlineCallbacks
def test_internal_key_is_required(bus: Bus) -> Any:
    """Every API endpoint answers 401 UNAUTHORIZED without the right x-relay-internal-key."""
    paths = ("/validate", "/presence/upsert", "/presence/resolve", "/bus/publish", "/bus/pull", "/relays/heartbeat",
             "/relays/alive")
    for path in paths:
        status, answer = yield bus.post(API + path, {}, key=None)
        assert (status, answer) == (401, {"ok": False, "reason": "UNAUTHORIZED"})
        status, answer = yield bus.post(API + path, {}, key=INTERNAL_KEY + "x")
        assert (status, answer) == (401, {"ok": False, "reason": "UNAUTHORIZED"})
    oversized = b" " * (max_body_bytes_for(MAX_PAYLOAD, MAX_BATCH) + 1) + b"{}"
    status, answer = yield bus.post(API + "/bus/publish", raw=oversized, key=None)
    assert (status, answer["reason"]) == (401, "UNAUTHORIZED"), "a body without the key is refused unread, not as 413"


@pytest_twisted.inlineCallbacks
def test_malformed_json_is_400(bus: Bus) -> Any:
    """Bodies that are not a JSON object (or use NaN) are refused with 400 INVALID_JSON."""
    for raw in (b"{", b"[1]", b'"text"', b'{"sinceId": NaN}', b"\xff\xfe"):
        status, answer = yield bus.post(API + "/bus/pull", raw=raw)
        assert (status, answer["reason"]) == (400, "INVALID_JSON"), raw


@pytest_twisted.inlineCallbacks
def test_invalid_fields_are_400(bus: Bus) -> Any:
    """Missing or mistyped fields are refused with 400 INVALID_REQUEST naming the field."""
    cases = [
        ("/bus/publish", _frame("r", None, workspaceId=None), "workspaceId"),
        ("/bus/publish", _frame("r", None, runtimeTargetId=""), "runtimeTargetId"),
        ("/bus/publish", _frame("r", None, direction="sideways"), "direction"),
        ("/bus/publish", _frame("r", None, payload=7), "payload"),
        ("/bus/publish", _frame("r", None, issuedAtMs="soon"), "issuedAtMs"),
        ("/bus/publish", _frame("r", None, issuedAtMs=True), "issuedAtMs"),
        ("/bus/publish", _frame("r", None, payload="a\u0000b"), "payload"),
        ("/bus/pull", {"sinceId": 0}, "relayId"),
        ("/bus/pull", {"relayId": "r", "sinceId": -1}, "sinceId"),
        ("/bus/pull", {"relayId": "r", "waitMs": 1.5}, "waitMs"),
        ("/presence/upsert", {"workspaceId": "w", "relayId": "r"}, "daemonConnected"),
        ("/presence/upsert", {"workspaceId": "w", "relayId": "r", "daemonConnected": True}, "relayWsBaseUrl"),
        ("/presence/resolve", {}, "workspaceId"),
        ("/validate", {"role": "client"}, "relayToken"),
        ("/bus/publish", {"frames": []}, "frames"),
        ("/bus/publish", {"frames": [_frame("r", None)] * 501}, "frames"),
        ("/bus/publish", {"frames": _frame("r", None)}, "frames"),
        ("/bus/publish", {"frames": [_frame("r", None), "frame"]}, "frames[1]"),
        ("/bus/publish", {"frames": [_frame("r", None)], "payload": "x"}, "frames"),
        ("/bus/publish", {"frames": [_frame("r", None), _frame("r", None, direction="up")]}, "frames[1]: direction"),
        ("/bus/publish", {"frames": [_frame("r", None, sourceRelayId=None)]}, "frames[0]: sourceRelayId"),
        ("/relays/heartbeat", {}, "relayId"),
        ("/relays/heartbeat", {"relayId": ""}, "relayId"),
        ("/relays/heartbeat", {"relayId": "r" * 256}, "relayId"),
        ("/relays/heartbeat", {"relayId": "a\u0000b"}, "relayId"),
        ("/relays/heartbeat", {"relayId": "r", "ttlMs": 499}, "ttlMs"),
        ("/relays/heartbeat", {"relayId": "r", "ttlMs": 60001}, "ttlMs"),
        ("/relays/heartbeat", {"relayId": "r", "ttlMs": "3s"}, "ttlMs"),
        ("/relays/heartbeat", {"relayId": "r", "gone": "yes"}, "gone"),
        ("/relays/alive", {}, "relayIds"),
        ("/relays/alive", {"relayIds": "r"}, "relayIds"),
        ("/relays/alive", {"relayIds": ["r"] * 1001}, "relayIds"),
        ("/relays/alive", {"relayIds": ["r", 7]}, "relayIds[1]"),
        ("/relays/alive", {"relayIds": [""]}, "relayIds[0]"),
        ("/relays/alive", {"relayIds": ["a\u0000b"]}, "relayIds[0]"),
    ]
    for path, body, field in cases:
        status, answer = yield bus.post(API + path, body)
        assert status == 400, (path, body, answer)
        assert answer["ok"] is False and answer["reason"] == "INVALID_REQUEST"
        assert field in answer["error"], (field, answer)


@pytest_twisted.inlineCallbacks
def test_size_limits_are_413(bus: Bus) -> Any:
    """A payload over BUS_MAX_PAYLOAD_BYTES and a body over the request cap are refused with 413."""
    status, answer = yield bus.post(API + "/bus/publish", _frame("r", None, payload="x" * (MAX_PAYLOAD + 1)))
    assert (status, answer["reason"]) == (413, "PAYLOAD_TOO_LARGE")
    status, answer = yield bus.post(API + "/bus/publish", _frame("r", None, payload="é" * (MAX_PAYLOAD // 2)))
    assert status == 200
    status, answer = yield bus.post(API + "/bus/pull", raw=b" " * (max_body_bytes_for(MAX_PAYLOAD, MAX_BATCH) + 1) + b"{}")
    assert (status, answer["reason"]) == (413, "REQUEST_TOO_LARGE")


@pytest_twisted.inlineCallbacks
def test_routing_and_health(bus: Bus) -> Any:
    """Unknown paths are 404, GET on an endpoint 405, and /health reports the database."""
    status, answer = yield bus.post("/api/runtime/internal/relay/nope", {})
    assert (status, answer["reason"]) == (404, "NOT_FOUND")
    status, answer = yield bus.get(API + "/bus/pull")
    assert (status, answer["reason"]) == (405, "METHOD_NOT_ALLOWED")
    status, answer = yield bus.get("/health")
    assert (status, answer) == (200, {"ok": True, "database": "up", "capabilities": CAPABILITIES})


# --- publish and pull ----------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_pull_filters_by_target_and_source_in_id_order(bus: Bus) -> Any:
    """A relay pulls frames for it or for everyone, never its own, ascending, with every field unchanged."""
    me, other, peer = _unique("me"), _unique("other"), _unique("peer")
    since = yield _head(bus)
    published = [
        _frame(peer, None, direction="daemon_to_clients", payload='{"n":1,"s":"é\\n"}'),
        _frame(peer, "", machineId="m1", issuedAtMs=1700000000000, signature="sig-2"),
        _frame(peer, me, payload='{"n":3}'),
        _frame(peer, other, payload='{"n":4}'),
        _frame(me, None, payload='{"n":5}'),
        _frame(peer, me, direction="daemon_to_clients", payload='{"n":6}\n'),
    ]
    ids = []
    for body in published:
        status, answer = yield bus.post(API + "/bus/publish", body)
        assert status == 200 and answer["ok"] is True
        ids.append(answer["id"])
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    status, answer = yield bus.post(API + "/bus/pull", {"relayId": me, "sinceId": since, "limit": 50})
    assert status == 200 and answer["ok"] is True
    frames = answer["frames"]
    assert [f["id"] for f in frames] == [ids[0], ids[1], ids[2], ids[5]]
    assert answer["headId"] == ids[-1] and answer["more"] is False
    first, second = frames[0], frames[1]
    assert first == {
        "id": ids[0], "workspaceId": "w:1", "runtimeTargetId": "rt:1", "sourceRelayId": peer,
        "targetRelayId": None, "direction": "daemon_to_clients", "payload": '{"n":1,"s":"é\\n"}',
    }
    assert (second["targetRelayId"], second["machineId"], second["issuedAtMs"], second["signature"]) == (
        "", "m1", 1700000000000, "sig-2"
    )
    assert frames[3]["payload"] == '{"n":6}\n'

    status, answer = yield bus.post(API + "/bus/pull", {"relayId": me, "sinceId": since, "limit": 2})
    assert [f["id"] for f in answer["frames"]] == ids[:2] and answer["more"] is True
    status, answer = yield bus.post(API + "/bus/pull", {"relayId": me, "sinceId": ids[2]})
    assert [f["id"] for f in answer["frames"]] == [ids[5]]


@pytest_twisted.inlineCallbacks
def test_head_id_is_the_newest_frame(bus: Bus) -> Any:
    """A pull with sinceId 0 and no wait reports the newest id as headId (relays start there)."""
    status, answer = yield bus.post(API + "/bus/publish", _frame(_unique("src"), None))
    newest = answer["id"]
    status, answer = yield bus.post(API + "/bus/pull", {"relayId": _unique("r"), "sinceId": 0, "waitMs": 0, "limit": 1})
    assert status == 200 and answer["headId"] == newest
    assert len(answer["frames"]) == 1 and answer["more"] is True


@pytest_twisted.inlineCallbacks
def test_long_poll_wakes_on_publish(bus: Bus) -> Any:
    """A waiting pull answers within milliseconds of a publish by another request, not at its deadline."""
    me = _unique("waiter")
    since = yield _head(bus)
    started = time.monotonic()
    pulling = bus.post(API + "/bus/pull", {"relayId": me, "sinceId": since, "waitMs": 2000})
    yield task.deferLater(reactor, 0.2, lambda: None)
    assert not pulling.called
    published_at = time.monotonic()
    status, answer = yield bus.post(API + "/bus/publish", _frame(_unique("src"), me))
    frame_id = answer["id"]
    status, answer = yield pulling
    woke_after = time.monotonic() - published_at
    assert status == 200 and [f["id"] for f in answer["frames"]] == [frame_id]
    print(f"long-poll woke {woke_after * 1000:.1f} ms after the publish was sent")
    assert woke_after < 1.0, woke_after
    assert time.monotonic() - started < 1.8


@pytest_twisted.inlineCallbacks
def test_long_poll_ignores_frames_for_others_and_times_out(bus: Bus) -> Any:
    """Frames for other relays do not end a wait; with nothing for it the pull answers empty at waitMs."""
    me = _unique("waiter")
    since = yield _head(bus)
    started = time.monotonic()
    pulling = bus.post(API + "/bus/pull", {"relayId": me, "sinceId": since, "waitMs": 600})
    yield bus.post(API + "/bus/publish", _frame(_unique("src"), _unique("someone-else")))
    yield bus.post(API + "/bus/publish", _frame(me, None))
    status, answer = yield pulling
    elapsed = time.monotonic() - started
    assert status == 200 and answer["frames"] == []
    assert 0.5 <= elapsed < 1.5, elapsed


@pytest_twisted.inlineCallbacks
def test_concurrent_publishes_get_distinct_increasing_ids(bus: Bus) -> Any:
    """Parallel publishes all succeed and a cursor walk sees every one exactly once, in order."""
    me = _unique("reader")
    since = yield _head(bus)
    from twisted.internet.defer import gatherResults

    answers = yield gatherResults(
        [bus.post(API + "/bus/publish", _frame(_unique("src"), me, payload=f'{{"n":{i}}}')) for i in range(40)]
    )
    ids = sorted(answer["id"] for status, answer in answers)
    seen: list[int] = []
    cursor = since
    while len(seen) < 40:
        status, answer = yield bus.post(API + "/bus/pull", {"relayId": me, "sinceId": cursor, "limit": 7})
        assert answer["frames"], "frames missing"
        seen.extend(f["id"] for f in answer["frames"])
        cursor = answer["frames"][-1]["id"]
    assert seen == ids


# --- batched publish and capabilities ------------------------------------------------------------


def _notifications(database: ScratchDatabase) -> Any:
    """A connection LISTENing on the bus channel of ``database`` (read it with ``_drain``)."""
    conn = psycopg.connect(database.url, autocommit=True, connect_timeout=5)
    conn.execute("LISTEN relay_bus")
    return conn


def _drain(conn: Any) -> List[str]:
    """The NOTIFY payloads received within 0.3 s."""
    return [notify.payload for notify in conn.notifies(timeout=0.3)]


@pytest_twisted.inlineCallbacks
def test_batch_is_stored_in_order_with_one_notify(bus: Bus) -> Any:
    """A batch answers its ids ascending in the given order, sends one NOTIFY, and pulls return it unchanged."""
    me, peer = _unique("me"), _unique("peer")
    since = yield _head(bus)
    listening = _notifications(bus.database)
    try:
        frames = [
            _frame(peer, None, payload='{"n":0}'),
            _frame(peer, me, machineId="m1", issuedAtMs=1700000000000, signature="sig-1", payload='{"n":1}'),
            _frame(peer, _unique("other"), payload='{"n":2}'),
            _frame(peer, "", direction="daemon_to_clients", payload='{"n":3,"s":"é\\n"}'),
            _frame(peer, me, machineId=None, issuedAtMs=None, signature=None, payload='{"n":4}'),
        ]
        status, answer = yield bus.post(API + "/bus/publish", {"frames": frames})
        assert status == 200 and answer["ok"] is True and set(answer) == {"ok", "ids"}
        ids = answer["ids"]
        assert len(ids) == 5 and ids == sorted(ids) and len(set(ids)) == 5 and ids[0] > since
        notifications = [json.loads(payload) for payload in _drain(listening)]
        # Frames 0 and 3 are for everyone, so the one NOTIFY names no targets.
        assert [{k: v for k, v in n.items() if k != "origin"} for n in notifications] == [
            {"id": ids[-1], "source": peer, "targets": None}
        ]
        assert isinstance(notifications[0]["origin"], str)
    finally:
        listening.close()
    status, answer = yield bus.post(API + "/bus/pull", {"relayId": me, "sinceId": since})
    pulled = answer["frames"]
    assert [f["id"] for f in pulled] == [ids[0], ids[1], ids[3], ids[4]]
    assert [f["payload"] for f in pulled] == ['{"n":0}', '{"n":1}', '{"n":3,"s":"é\\n"}', '{"n":4}']
    assert (pulled[1]["machineId"], pulled[1]["issuedAtMs"], pulled[1]["signature"]) == ("m1", 1700000000000, "sig-1")
    assert (pulled[2]["targetRelayId"], pulled[2]["direction"]) == ("", "daemon_to_clients")
    assert not {"machineId", "issuedAtMs", "signature"} & set(pulled[3])
    assert answer["headId"] == ids[-1] and answer["capabilities"] == CAPABILITIES


@pytest_twisted.inlineCallbacks
def test_notify_names_the_source_and_the_targets(bus: Bus) -> Any:
    """A publish's NOTIFY names its source and its target relays, so that only their pulls wake."""
    me, peer, other = _unique("me"), _unique("peer"), _unique("other")
    listening = _notifications(bus.database)
    try:
        status, answer = yield bus.post(API + "/bus/publish", _frame(peer, me))
        assert status == 200
        single = answer["id"]
        status, answer = yield bus.post(API + "/bus/publish", {"frames": [_frame(peer, other), _frame(peer, me)]})
        assert status == 200
        notifications = [json.loads(payload) for payload in _drain(listening)]
    finally:
        listening.close()
    origins = {n.pop("origin") for n in notifications}
    assert notifications == [
        {"id": single, "source": peer, "targets": [me]},
        {"id": answer["ids"][-1], "source": peer, "targets": sorted([me, other])},
    ]
    assert len(origins) == 1  # the bus process that stored them


@pytest_twisted.inlineCallbacks
def test_a_waiting_pull_answered_from_the_batch_reads_what_a_query_reads(bus: Bus) -> Any:
    """A pull waiting right before a batch gets, at once, exactly the frames (and fields) a pull query returns."""
    me = _unique("me")
    since = yield _head(bus)
    pulling = bus.post(API + "/bus/pull", {"relayId": me, "sinceId": since, "waitMs": 2000})
    yield task.deferLater(reactor, 0.1, lambda: None)
    batch = [
        _frame("src", me, machineId="m1", issuedAtMs=1700000000000, signature="sig", payload='{"n":0,"s":"é\\n\\"x"}'),
        _frame("src", _unique("other"), payload='{"n":1}'),
        _frame("src", None, direction="daemon_to_clients", payload='{"n":2}'),
        _frame("src", "", payload='{"n":3}'),
        _frame(me, None, payload='{"n":4}'),
    ]
    status, published = yield bus.post(API + "/bus/publish", {"frames": batch})
    assert status == 200
    status, woken = yield pulling
    status, queried = yield bus.post(API + "/bus/pull", {"relayId": me, "sinceId": since})
    assert status == 200 and woken["frames"] == queried["frames"]
    assert [f["id"] for f in woken["frames"]] == [published["ids"][i] for i in (0, 2, 3)]
    assert woken["more"] is False and woken["headId"] == published["ids"][-1] == queried["headId"]


@pytest_twisted.inlineCallbacks
def test_waiting_pull_gets_the_whole_batch(bus: Bus) -> Any:
    """A long-poll woken by a batch answers every frame of it at once, in order."""
    me = _unique("waiter")
    since = yield _head(bus)
    pulling = bus.post(API + "/bus/pull", {"relayId": me, "sinceId": since, "waitMs": 2000})
    yield task.deferLater(reactor, 0.1, lambda: None)
    batch = [_frame(_unique("src"), me, payload=f'{{"n":{i}}}') for i in range(20)]
    status, answer = yield bus.post(API + "/bus/publish", {"frames": batch})
    ids = answer["ids"]
    status, answer = yield pulling
    assert status == 200 and [f["id"] for f in answer["frames"]] == ids
    assert [f["payload"] for f in answer["frames"]] == [body["payload"] for body in batch]


@pytest_twisted.inlineCallbacks
def test_pull_limit_and_budget_hold_across_batches(bus: Bus) -> Any:
    """Pulls of batched frames still stop at ``limit`` and at the payload budget, and a cursor walk sees all in order."""
    me = _unique("reader")
    since = yield _head(bus)
    payload = "x" * 4000
    ids: List[int] = []
    for _ in range(20):
        status, answer = yield bus.post(API + "/bus/publish", {"frames": [_frame("src", me, payload=payload)] * 4})
        assert status == 200
        ids.extend(answer["ids"])
    assert ids == sorted(ids)
    status, answer = yield bus.post(API + "/bus/pull", {"relayId": me, "sinceId": since, "limit": 3})
    assert [f["id"] for f in answer["frames"]] == ids[:3] and answer["more"] is True
    status, answer = yield bus.post(API + "/bus/pull", {"relayId": me, "sinceId": since, "limit": 1000})
    within_budget = -(-PULL_BUDGET_BYTES // len(payload))  # frames start while the total before them is under it
    assert [f["id"] for f in answer["frames"]] == ids[:within_budget] and answer["more"] is True
    seen: List[int] = []
    cursor = since
    while len(seen) < len(ids):
        status, answer = yield bus.post(API + "/bus/pull", {"relayId": me, "sinceId": cursor, "limit": 7})
        seen.extend(f["id"] for f in answer["frames"])
        cursor = answer["frames"][-1]["id"]
    assert seen == ids


@pytest_twisted.inlineCallbacks
def test_a_bad_frame_rejects_the_whole_batch(bus: Bus) -> Any:
    """One invalid frame refuses the batch, naming its index, and none of it is stored; size limits apply per frame and in all."""
    source = _unique("src")

    def stored() -> int:
        return int(bus.database.execute("SELECT count(*) FROM relay_bus_frames WHERE source_relay_id = %s", (source,))[0][0])

    good = _frame(source, None)
    status, answer = yield bus.post(API + "/bus/publish", {"frames": [good, good, _frame(source, None, payload=None)]})
    assert (status, answer["reason"]) == (400, "INVALID_REQUEST") and answer["error"].startswith("frames[2]: payload")
    status, answer = yield bus.post(API + "/bus/publish", {"frames": [good, _frame(source, None, payload="x" * (MAX_PAYLOAD + 1))]})
    assert (status, answer["reason"]) == (413, "PAYLOAD_TOO_LARGE") and answer["error"].startswith("frames[1]: ")
    big = _frame(source, None, payload="x" * MAX_PAYLOAD)
    status, answer = yield bus.post(API + "/bus/publish", {"frames": [big] * (MAX_BATCH // MAX_PAYLOAD + 1)})
    assert (status, answer["reason"]) == (413, "BATCH_TOO_LARGE")
    assert stored() == 0
    status, answer = yield bus.post(API + "/bus/publish", {"frames": [big] * (MAX_BATCH // MAX_PAYLOAD)})
    assert status == 200 and stored() == MAX_BATCH // MAX_PAYLOAD


@pytest_twisted.inlineCallbacks
def test_the_body_cap_admits_the_largest_valid_batch(bus: Bus) -> Any:
    """500 frames with every field at its longest, escaped at its worst, and BUS_MAX_BATCH_BYTES of payload fit the cap."""
    wide = "\U0001F600"  # 12 bytes as an escaped surrogate pair

    def longest(n: int) -> Dict[str, Any]:
        payload_bytes = MAX_BATCH // 500 + (1 if n < MAX_BATCH % 500 else 0)
        return _frame(wide * 255, wide * 255, workspaceId=wide * 128, runtimeTargetId=wide * 128, machineId=wide * 255,
                      signature=wide * 512, issuedAtMs=2**63 - 1, direction="daemon_to_clients",
                      payload="\u0001" * payload_bytes)

    body = json.dumps({"frames": [longest(n) for n in range(500)]}).encode("ascii")
    assert len(body) <= max_body_bytes_for(MAX_PAYLOAD, MAX_BATCH)
    status, answer = yield bus.post(API + "/bus/publish", raw=body)
    assert status == 200 and len(answer["ids"]) == 500


@pytest_twisted.inlineCallbacks
def test_every_pull_answer_carries_capabilities(bus: Bus) -> Any:
    """Empty, timed-out and full pull answers all name the bus's capabilities."""
    me = _unique("r")
    since = yield _head(bus)
    status, answer = yield bus.post(API + "/bus/pull", {"relayId": me, "sinceId": since, "waitMs": 50})
    assert answer["frames"] == [] and answer["capabilities"] == CAPABILITIES
    yield bus.post(API + "/bus/publish", _frame(_unique("src"), me))
    status, answer = yield bus.post(API + "/bus/pull", {"relayId": me, "sinceId": since})
    assert len(answer["frames"]) == 1 and answer["capabilities"] == CAPABILITIES


# --- retention and presence ----------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_retention_deletes_old_frames(short_lived_bus: Bus) -> Any:
    """Frames older than BUS_RETENTION_SECONDS are deleted by the retention timer."""
    bus = short_lived_bus
    status, answer = yield bus.post(API + "/bus/publish", _frame("src", None))
    assert status == 200
    assert bus.database.execute("SELECT count(*) FROM relay_bus_frames")[0][0] == 1

    def gone() -> Any:
        return task.deferLater(
            reactor, 0, lambda: bus.database.execute("SELECT count(*) FROM relay_bus_frames")[0][0] == 0
        )

    yield _eventually(gone, timeout=5.0)
    status, answer = yield bus.post(API + "/bus/pull", {"relayId": "r", "sinceId": 0})
    assert answer["frames"] == []


@pytest_twisted.inlineCallbacks
def test_presence_expires_after_ttl(short_lived_bus: Bus) -> Any:
    """A presence not refreshed within BUS_PRESENCE_TTL_SECONDS resolves as not connected."""
    bus = short_lived_bus
    upsert = {"workspaceId": "w", "runtimeTargetId": "t", "relayId": "a", "relayWsBaseUrl": "ws://a/ws",
              "daemonConnected": True}
    yield bus.post(API + "/presence/upsert", upsert)
    status, answer = yield bus.post(API + "/presence/resolve", {"workspaceId": "w", "runtimeTargetId": "t"})
    assert answer["daemonConnected"] is True
    started = time.monotonic()

    @inlineCallbacks
    def expired() -> Any:
        status, answer = yield bus.post(API + "/presence/resolve", {"workspaceId": "w", "runtimeTargetId": "t"})
        return answer == {"ok": True, "daemonConnected": False}

    yield _eventually(expired, timeout=5.0)
    assert time.monotonic() - started >= 0.3


@pytest_twisted.inlineCallbacks
def test_presence_upsert_resolve_and_compare_and_delete(bus: Bus) -> Any:
    """Resolve returns the last upsert; a disconnect by a relay that no longer owns the entry changes nothing."""
    workspace = _unique("ws")

    def upsert(relay: str, connected: bool, **extra: Any) -> Any:
        body = {"workspaceId": workspace, "runtimeTargetId": "t", "relayId": relay,
                "relayWsBaseUrl": f"ws://{relay}/ws", "daemonConnected": connected}
        body.update(extra)
        return bus.post(API + "/presence/upsert", body)

    def resolve() -> Any:
        return bus.post(API + "/presence/resolve", {"workspaceId": workspace, "runtimeTargetId": "t"})

    status, answer = yield resolve()
    assert (status, answer) == (200, {"ok": True, "daemonConnected": False})
    status, answer = yield upsert("relay-a", True, machineId="m1")
    assert (status, answer) == (200, {"ok": True})
    status, answer = yield resolve()
    assert answer == {"ok": True, "daemonConnected": True, "relayId": "relay-a", "relayWsBaseUrl": "ws://relay-a/ws",
                      "runtimeTargetId": "t", "machineId": "m1"}
    yield upsert("relay-a", True)
    status, answer = yield resolve()
    assert answer["machineId"] == "m1", "a refresh without machineId keeps it"

    status, answer = yield upsert("relay-b", False)
    assert answer["cleared"] is False
    status, answer = yield resolve()
    assert answer["relayId"] == "relay-a"

    yield upsert("relay-b", True)
    status, answer = yield resolve()
    assert (answer["relayId"], answer["machineId"]) == ("relay-b", None)
    status, answer = yield upsert("relay-a", False)
    assert answer["cleared"] is False
    status, answer = yield upsert("relay-b", False)
    assert answer["cleared"] is True
    status, answer = yield resolve()
    assert answer == {"ok": True, "daemonConnected": False}

    yield upsert("relay-c", True)
    status, answer = yield bus.post(API + "/presence/resolve", {"workspaceId": workspace})
    assert answer["relayId"] == "relay-c", "without a runtime target the workspace's live entry is found"


# --- relay liveness --------------------------------------------------------------------------------


def _heartbeat(bus: Bus, relay: str, **fields: Any) -> Any:
    return bus.post(API + "/relays/heartbeat", {"relayId": relay, **fields})


def _alive(bus: Bus, *relays: str) -> Any:
    return bus.post(API + "/relays/alive", {"relayIds": list(relays)})


@pytest_twisted.inlineCallbacks
def test_heartbeats_goodbyes_and_unknown_relays(bus: Bus) -> Any:
    """alive sorts ids by their row: unexpired (alive), expired or said goodbye (dead), none (unknown)."""
    live, leaving, short, never = _unique("live"), _unique("leaving"), _unique("short"), _unique("never")
    for relay in (live, leaving):
        status, answer = yield _heartbeat(bus, relay, ttlMs=60000)
        assert (status, answer) == (200, {"ok": True})
    yield _heartbeat(bus, short, ttlMs=500)
    status, answer = yield _heartbeat(bus, leaving, gone=True)
    assert (status, answer) == (200, {"ok": True})
    status, answer = yield _alive(bus, never, live, leaving, short, live)
    assert answer == {"ok": True, "alive": [live, short], "dead": [leaving], "unknown": [never]}

    @inlineCallbacks
    def expired() -> Any:
        status, answer = yield _alive(bus, short)
        return answer["dead"] == [short]

    yield _eventually(expired, timeout=5.0)
    yield _heartbeat(bus, leaving)
    status, answer = yield _alive(bus, leaving, never)
    assert (answer["alive"], answer["unknown"]) == ([leaving], [never]), "a heartbeat after a goodbye revives"
    status, answer = yield _alive(bus)
    assert answer == {"ok": True, "alive": [], "dead": [], "unknown": []}
    expires = bus.database.execute(
        "SELECT extract(epoch FROM expires_at - now()) FROM relay_bus_relays WHERE relay_id = %s", (leaving,)
    )[0][0]
    assert 2.0 < float(expires) <= 3.0, "ttlMs defaults to 3000"


@pytest_twisted.inlineCallbacks
def test_resolve_ignores_presence_of_dead_relays(bus: Bus) -> Any:
    """A relay without heartbeats stays resolvable; one whose heartbeat expired, or that said goodbye, does not."""
    workspace = _unique("ws")
    silent, beating, leaving = _unique("silent"), _unique("beating"), _unique("leaving")

    def upsert(relay: str, target: str) -> Any:
        return bus.post(API + "/presence/upsert", {"workspaceId": workspace, "runtimeTargetId": target, "relayId": relay,
                                                   "relayWsBaseUrl": f"ws://{relay}/ws", "daemonConnected": True})

    @inlineCallbacks
    def resolved(target: Optional[str] = None) -> Any:
        body = {"workspaceId": workspace, **({"runtimeTargetId": target} if target is not None else {})}
        status, answer = yield bus.post(API + "/presence/resolve", body)
        return answer.get("relayId") if answer["daemonConnected"] else None

    yield upsert(silent, "t1")
    yield upsert(beating, "t2")
    yield upsert(leaving, "t3")
    yield _heartbeat(bus, beating, ttlMs=500)
    yield _heartbeat(bus, leaving, ttlMs=60000)
    for target, relay in (("t1", silent), ("t2", beating), ("t3", leaving)):
        assert (yield resolved(target)) == relay
    yield _heartbeat(bus, leaving, gone=True)
    assert (yield resolved("t3")) is None, "a goodbye ends the relay's presence at once"

    @inlineCallbacks
    def beating_expired() -> Any:
        return (yield resolved("t2")) is None

    yield _eventually(beating_expired, timeout=5.0)
    assert (yield resolved("t1")) == silent, "a relay that never sent a heartbeat is still resolvable"
    yield _heartbeat(bus, beating)
    assert (yield resolved("t2")) == beating, "the presence row outlives a missed heartbeat"

    yield upsert(leaving, "")
    assert (yield resolved()) == beating, "without a runtime target, a dead relay's entry is skipped, not preferred"
    yield _heartbeat(bus, leaving)
    assert (yield resolved()) == leaving


@pytest_twisted.inlineCallbacks
def test_retention_deletes_relay_rows_an_hour_after_expiry(short_lived_bus: Bus) -> Any:
    """Retention removes relay rows expired for over an hour and keeps younger tombstones and live rows."""
    bus = short_lived_bus
    for relay in ("old", "recent", "live"):
        yield _heartbeat(bus, relay, ttlMs=60000)
    bus.database.execute("UPDATE relay_bus_relays SET expires_at = now() - interval '61 minutes' WHERE relay_id = 'old'")
    bus.database.execute("UPDATE relay_bus_relays SET expires_at = now() - interval '59 minutes' WHERE relay_id = 'recent'")

    def old_gone() -> Any:
        return task.deferLater(reactor, 0, lambda: not bus.database.execute(
            "SELECT 1 FROM relay_bus_relays WHERE relay_id = 'old'"))

    yield _eventually(old_gone, timeout=5.0)
    status, answer = yield _alive(bus, "old", "recent", "live")
    assert answer == {"ok": True, "alive": ["live"], "dead": ["recent"], "unknown": ["old"]}


# --- validate ------------------------------------------------------------------------------------


def _token(claims: Dict[str, Any], *, key: str = TOKEN_SECRET, ttl: int = 600, now: Optional[float] = None) -> str:
    return mint_token(key=key, algorithm="HS256", claims=claims, ttl_seconds=ttl, now=now or time.time())


@pytest_twisted.inlineCallbacks
def test_validate_verifies_local_tokens(bus: Bus) -> Any:
    """validate answers the token's claims for a good token and a 401 reason otherwise."""
    claims = {"workspaceId": "w", "runtimeTargetId": "t", "role": "client", "scope": "runtime", "machineId": "m"}
    good = _token(claims)
    status, answer = yield bus.post(API + "/validate", {"relayToken": good, "role": "client", "workspaceId": "w",
                                                        "runtimeTargetId": "t"})
    assert status == 200 and answer["ok"] is True
    assert validate_claims(answer["claims"]) is not None
    assert {k: answer["claims"][k] for k in claims} == claims

    refusals = [
        (_token(claims, key="another-secret-0123456789abcdef0123456789"), "client", "INVALID_SIGNATURE"),
        (_token(claims, now=time.time() - 7200), "client", "TOKEN_EXPIRED"),
        (good, "workspace-daemon", "ROLE_CLAIM_MISMATCH"),
        ("not-a-token", "client", "MALFORMED_TOKEN"),
    ]
    for token, role, reason in refusals:
        status, answer = yield bus.post(API + "/validate", {"relayToken": token, "role": role, "workspaceId": "w"})
        assert (status, answer) == (401, {"ok": False, "reason": reason})


@pytest_twisted.inlineCallbacks
def test_relay_platform_admission_accepts_bus_answers(bus: Bus) -> Any:
    """The relay's own PlatformAdmission, pointed at the bus, admits a valid token and refuses a bad one."""
    admission = PlatformAdmission(bus.client, reactor, bus.process.url, INTERNAL_KEY, 2000, 262144)
    token = _token({"workspaceId": "w", "runtimeTargetId": "t", "role": "workspace-daemon"})
    result = yield admission.admit(token, "workspace-daemon", "w", "t")
    assert result.ok and result.claims.workspace_id == "w"
    result = yield admission.admit(token + "x", "workspace-daemon", "w", "t")
    assert not result.ok and result.reason == "INVALID_SIGNATURE"


# --- wake-ups ---------------------------------------------------------------------------------


def test_notification_payloads_are_read_leniently() -> None:
    """A NOTIFY names id, source and targets; a bare id (an older bus) or an unreadable payload means everyone."""
    assert parse_notification('{"id" : 7, "source" : "b", "targets" : ["a", "c"]}') == Notification(
        7, "b", frozenset({"a", "c"})
    )
    assert parse_notification('{"id" : 8, "source" : null, "targets" : null, "origin" : "p1"}') == Notification(
        8, origin="p1"
    )
    assert parse_notification("9") == Notification(9)
    for unreadable in ("", "x", "[1]", '{"id": "9"}', '{"id": 9, "targets": "a"}', '{"id": 9, "targets": [1]}', "١"):
        assert parse_notification(unreadable) == Notification(0), unreadable


def test_a_notification_wakes_only_the_pulls_it_is_for() -> None:
    """Targeted frames wake their targets' pulls, frames for everyone every pull but the source's; wake_all wakes all."""
    clock = Clock()
    waiters = PullWaiters(clock)
    pulls = {relay: waiters.watch(relay) for relay in ("a", "b", "c")}
    woken: List[str] = []
    for relay, waiter in pulls.items():
        waiter.sleep(1.0).addCallback(lambda _, relay=relay: woken.append(relay))
    waiters.notify(Notification(1, source="b", targets=frozenset({"a", "x"})))
    assert woken == ["a"]
    pulls["a"].sleep(1.0).addCallback(lambda _: woken.append("a"))
    waiters.notify(Notification(2, source="b"))
    assert sorted(woken) == ["a", "a", "c"]
    waiters.wake_all()
    assert sorted(woken) == ["a", "a", "b", "c"]
    for waiter in pulls.values():
        waiter.close()
    assert len(waiters) == 0 and not clock.getDelayedCalls()


def test_a_wake_up_during_the_query_is_not_slept_through() -> None:
    """A frame stored while a pull's query runs makes its next sleep return at once; without one it sleeps until timeout."""
    clock = Clock()
    waiters = PullWaiters(clock)
    waiter = waiters.watch("a")
    waiter.woken = False  # the query starts
    waiters.notify(Notification(5, targets=frozenset({"a"})))  # ... and a frame for "a" commits meanwhile
    assert waiter.sleep(1.0).called
    sleeping = waiter.sleep(1.0)
    assert not sleeping.called
    clock.advance(1.0)
    assert sleeping.called
    waiter.close()
    assert len(waiters) == 0 and not clock.getDelayedCalls()


def _stored_frame(source: str, target: Optional[str], payload: str = "{}") -> NewFrame:
    return NewFrame("w", "t", None, source, target, "client_to_daemon", payload, None, None)


def test_own_notifications_are_left_to_the_insert_that_made_them() -> None:
    """This process's NOTIFYs wake nobody (its insert's return did); another process's wake as usual; a failed insert wakes too."""
    clock = Clock()
    waiters = PullWaiters(clock, origin="me")
    waiter = waiters.watch("a", since_id=3, limit=10, budget_bytes=1000)
    sleeping = waiter.sleep(1.0)
    waiters.notify(Notification(5, targets=frozenset({"a"}), origin="me"))
    assert not sleeping.called
    waiters.notify(Notification(5, targets=frozenset({"a"}), origin="other-bus"))
    assert sleeping.called and waiter.page is None
    waiter.woken = False  # the pull queries again, then sleeps
    sleeping = waiter.sleep(1.0)
    waiters.not_stored([_stored_frame("b", "a")])
    assert sleeping.called and waiter.page is None
    waiter.woken = False
    sleeping = waiter.sleep(1.0)
    waiters.stored([_stored_frame("b", "c")], [6])  # for someone else: no page, and "a" stays asleep
    assert not sleeping.called
    waiters.stored([_stored_frame("b", "a")], [9])  # for "a", but not right after its cursor: it wakes to query
    assert sleeping.called and waiter.page is None
    waiter.woken = False
    waiter.seen_through = 9  # its query found nothing up to head 9
    sleeping = waiter.sleep(1.0)
    waiters.stored([_stored_frame("a", None), _stored_frame("a", "c")], [10, 11])  # its own: nothing for "a" ...
    assert not sleeping.called and waiter.seen_through == 11
    waiters.stored([_stored_frame("b", None)], [12])  # ... so this batch is what it reads next
    assert sleeping.called and waiter.page is not None and waiter.page.head_id == 12
    waiter.close()
    assert not clock.getDelayedCalls()


def test_a_stored_batch_answers_the_sleeping_pull_right_before_it() -> None:
    """Only a sleeping pull whose cursor is the id before the batch gets it, filtered for its relay; others wake to query."""
    clock = Clock()
    waiters = PullWaiters(clock)
    right_before = waiters.watch("a", since_id=9, limit=100, budget_bytes=1 << 20)
    behind = waiters.watch("a", since_id=5, limit=100, budget_bytes=1 << 20)
    querying = waiters.watch("a", since_id=9, limit=100, budget_bytes=1 << 20)
    for waiter in (right_before, behind):
        waiter.sleep(1.0)
    waiters.stored([_stored_frame("b", "a"), _stored_frame("b", "c"), _stored_frame("a", None)], [10, 11, 12])
    assert right_before.page is not None and behind.page is None and querying.page is None
    assert [f["id"] for f in json.loads(right_before.page.frames_json)] == [10]
    assert (right_before.page.count, right_before.page.head_id, right_before.page.more) == (1, 12, False)
    assert behind.woken and right_before.woken  # the one behind queries for what it missed
    for waiter in (right_before, behind, querying):
        waiter.close()
    assert not clock.getDelayedCalls()


def test_a_batch_too_big_for_a_page_is_left_to_the_query() -> None:
    """A batch beyond the pull's limit or payload budget gives no page (the pull queries); one with nothing for it an empty page."""
    frames = [_stored_frame("b", "a", "x" * 10) for _ in range(3)]
    page = page_of_batch(frames, [1, 2, 3], "a", limit=3, budget_bytes=21)
    assert page is not None and page.count == 3  # 10 and 20 bytes before the second and third: under 21
    assert page_of_batch(frames, [1, 2, 3], "a", limit=2, budget_bytes=1000) is None
    assert page_of_batch(frames, [1, 2, 3], "a", limit=3, budget_bytes=20) is None
    assert page_of_batch(frames, [1, 2, 3], "c", limit=3, budget_bytes=1000) == PullPage("[]", 0, 3, False)
    assert page_of_batch(frames[:1], [1], "a", limit=1, budget_bytes=0) is not None  # the first frame always fits


def test_a_cancelled_sleep_leaves_no_timer() -> None:
    """A pull whose client went away cancels its sleep: the timer goes, and later notifications find nothing to fire."""
    clock = Clock()
    waiters = PullWaiters(clock)
    waiter = waiters.watch("a")
    sleeping = waiter.sleep(1.0)
    sleeping.addErrback(lambda failure: failure.trap(CancelledError))
    sleeping.cancel()
    waiter.close()
    waiters.notify(Notification(1))
    assert not clock.getDelayedCalls() and len(waiters) == 0


# --- process and configuration ----------------------------------------------------------------


def test_refuses_a_reactor_other_than_asyncio() -> None:
    """Without ``-r asyncio`` the bus exits with one line saying how to run it."""
    workdir = tempfile.mkdtemp(prefix="bus-")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": workdir, "PYTHONPATH": REPO_ROOT,
           "RELAY_INTERNAL_KEY": INTERNAL_KEY, "RELAY_TOKEN_SECRET": TOKEN_SECRET}
    try:
        result = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "viewport-bus", "--port", "0"],
            env=env, cwd=workdir, capture_output=True, text=True, timeout=60,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "viewport-bus needs the asyncio reactor: run `twistd -r asyncio -n viewport-bus`"
    ]


def _trouble(process: BusProcess, since_line: int = 0) -> List[str]:
    """Error-level or traceback lines the bus wrote (its JSON log from ``since_line`` on, and stderr)."""
    lines = [line for line in process.output.lines[since_line:]
             if "Traceback" in line or '"level":"error"' in line or '"level":"critical"' in line]
    stderr = process.output.stderr.decode("utf-8", "replace")
    return lines + ([stderr] if stderr.strip() else [])


@pytest_twisted.inlineCallbacks
def test_a_relay_hanging_up_mid_query_is_not_an_error(bus: Bus) -> Any:
    """A pull whose client goes away while its query runs is dropped quietly, and the bus keeps serving."""
    since_line = len(bus.process.output.lines)
    since = yield _head(bus)
    blocker = psycopg.connect(bus.database.url, connect_timeout=5)
    try:
        blocker.execute("LOCK TABLE relay_bus_frames IN ACCESS EXCLUSIVE MODE")
        pulling = bus.post(API + "/bus/pull", {"relayId": _unique("r"), "sinceId": since})
        yield task.deferLater(reactor, 0.3, lambda: None)
        pulling.addErrback(lambda failure: failure.trap(CancelledError, ResponseNeverReceived))
        pulling.cancel()
        yield task.deferLater(reactor, 0.3, lambda: None)
    finally:
        blocker.rollback()
        blocker.close()
    status, answer = yield bus.post(API + "/bus/pull", {"relayId": _unique("r"), "sinceId": since})
    assert status == 200
    assert _trouble(bus.process, since_line) == []


@pytest_twisted.inlineCallbacks
def test_sigterm_ends_long_polls_and_shuts_down_cleanly() -> Any:
    """On SIGTERM a waiting pull answers at once (no frames), one stuck in a query gets 503, and nothing is logged as an error."""
    bus = yield _start_bus({"BUS_MAX_WAIT_MS": "30000"})
    blocker = psycopg.connect(bus.database.url, connect_timeout=5)
    try:
        since = yield _head(bus)
        waiting = bus.post(API + "/bus/pull", {"relayId": "waiting", "sinceId": since, "waitMs": 30000})
        yield task.deferLater(reactor, 0.3, lambda: None)
        blocker.execute("LOCK TABLE relay_bus_frames IN ACCESS EXCLUSIVE MODE")
        stuck = bus.post(API + "/bus/pull", {"relayId": "stuck", "sinceId": since})
        yield task.deferLater(reactor, 0.3, lambda: None)
        assert not waiting.called and not stuck.called
        stopped_at = time.monotonic()
        ended = bus.process.stop()
        status, answer = yield waiting
        assert (status, answer["frames"], answer["capabilities"]) == (200, [], CAPABILITIES)
        assert time.monotonic() - stopped_at < 1.0
        status, answer = yield stuck
        assert (status, answer) == (503, {"ok": False, "reason": "SHUTTING_DOWN"})
        code = yield ended
        assert code == 0 or bus.process.output.exit_signal == signal.SIGTERM
        assert time.monotonic() - stopped_at < 10.0
        assert _trouble(bus.process) == []
        assert any("Server Shut Down." in line for line in bus.process.output.lines)
    finally:
        blocker.close()
        bus.process.kill()
        yield bus.close()


def _config_error(environ: Dict[str, str], overrides: Optional[Dict[str, object]] = None) -> Tuple[str, str]:
    base = {"RELAY_INTERNAL_KEY": INTERNAL_KEY, "HOME": "/nonexistent"}
    base.update(environ)
    with pytest.raises(ConfigError) as caught:
        load_bus_config(base, overrides)
    return caught.value.variable, str(caught.value)


def test_config_defaults_and_overrides() -> None:
    """Defaults match the documentation; --host/--port win over HOST/PORT; port 0 is allowed."""
    config = load_bus_config(
        {"RELAY_INTERNAL_KEY": "internal-secret", "HOME": "/home/x", "PORT": "9000",
         "BUS_DATABASE_URL": "postgresql://bus:db-password@db:5432/bus"},
        {"port": 0},
    )
    assert (config.host, config.port) == ("127.0.0.1", 0)
    assert load_bus_config({"RELAY_INTERNAL_KEY": "k"}).database_url == "postgresql://postgres@127.0.0.1:5432/postgres"
    assert (config.retention_seconds, config.max_wait_ms, config.max_payload_bytes, config.presence_ttl_seconds) == (
        300.0, 2000, 1048576, 60.0
    )
    assert config.max_batch_bytes == 4194304
    big_frames = load_bus_config({"RELAY_INTERNAL_KEY": "k", "BUS_MAX_PAYLOAD_BYTES": "8388608"})
    assert big_frames.max_batch_bytes == 8388608, "a batch always holds one frame of the largest size"
    assert (config.token_key, config.token_secret_file) == ("secret_file", "/home/x/.viewport/relay-token-secret")
    assert "internal-secret" not in repr(config) and "db-password" not in repr(config)


@pytest.mark.parametrize(
    "environ, variable",
    [
        ({"RELAY_INTERNAL_KEY": ""}, "RELAY_INTERNAL_KEY"),
        ({"HOST": "0.0.0.0", "RELAY_INTERNAL_KEY": "short"}, "RELAY_INTERNAL_KEY"),
        ({"BUS_DATABASE_URL": "mysql://x/y"}, "BUS_DATABASE_URL"),
        ({"PORT": "70000"}, "PORT"),
        ({"BUS_RETENTION_SECONDS": "0"}, "BUS_RETENTION_SECONDS"),
        ({"BUS_PRESENCE_TTL_SECONDS": "soon"}, "BUS_PRESENCE_TTL_SECONDS"),
        ({"BUS_MAX_WAIT_MS": "-1"}, "BUS_MAX_WAIT_MS"),
        ({"BUS_MAX_PAYLOAD_BYTES": "0"}, "BUS_MAX_PAYLOAD_BYTES"),
        ({"BUS_MAX_BATCH_BYTES": "lots"}, "BUS_MAX_BATCH_BYTES"),
        ({"BUS_MAX_PAYLOAD_BYTES": "4096", "BUS_MAX_BATCH_BYTES": "4095"}, "BUS_MAX_BATCH_BYTES"),
        ({"RELAY_TOKEN_SECRET": "too-short"}, "RELAY_TOKEN_SECRET"),
        ({"RELAY_TOKEN_SECRET": TOKEN_SECRET, "RELAY_TOKEN_PUBLIC_KEY": "/etc/hostname"}, "RELAY_TOKEN_PUBLIC_KEY"),
        ({"RELAY_TOKEN_PUBLIC_KEY": "/nonexistent.pem"}, "RELAY_TOKEN_PUBLIC_KEY"),
    ],
)
def test_config_errors_name_the_variable(environ: Dict[str, str], variable: str) -> None:
    """Each invalid setting stops startup with a one-line message naming the variable."""
    named, message = _config_error(environ)
    assert named == variable and message.startswith(variable) and "\n" not in message


@pytest.mark.relay_log_errors(r"encoding SQL_ASCII.*BUS_DATABASE_URL")
@pytest_twisted.inlineCallbacks
def test_a_database_that_is_not_utf8_is_refused_with_the_reason() -> Any:
    """
    A SQL_ASCII database would store payloads byte for byte and hand them back mangled: the bus says why at
    start (an error naming BUS_DATABASE_URL), /health and every call answer 503 DATABASE_UNSUITABLE, and no
    table is created in it.
    """
    database = ScratchDatabase(encoding="SQL_ASCII")
    bus = Bus(BusProcess(database.url), database)
    try:
        yield bus.process.start()
        yield _eventually(lambda: task.deferLater(reactor, 0, lambda: bool(bus.process.events("bus_migration_error"))))
        [logged] = bus.process.events("bus_migration_error")
        assert logged["level"] == "error"
        assert "SQL_ASCII" in logged["details"]["error"] and "BUS_DATABASE_URL" in logged["details"]["error"]
        status, answer = yield bus.get("/health")
        assert status == 503 and answer["reason"] == "DATABASE_UNSUITABLE"
        status, answer = yield bus.post(API + "/bus/publish", _frame("relay-a", None, payload='{"é":"ü"}'))
        assert (status, answer["reason"]) == (503, "DATABASE_UNSUITABLE")
        assert database.execute("SELECT to_regclass('relay_bus_frames')") == [(None,)]
    finally:
        yield bus.close()
