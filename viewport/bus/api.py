"""The viewport-bus HTTP API: validate, presence, relay liveness, bus publish (batched)/pull (long-poll), health."""

from __future__ import annotations

import hmac
import io
import json
from typing import Any, Callable, Generator, Optional, Union

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from viewport.bus.store import BusStore, DatabaseUnavailable, DatabaseUnsuitable, NewFrame, PullPage
from viewport.bus.waiters import PullWaiter, PullWaiters
from viewport.platform_api import (
    ALIVE_PATH,
    HEARTBEAT_PATH,
    PUBLISH_PATH,
    PULL_PATH,
    RESOLVE_PATH,
    UPSERT_PATH,
    VALIDATE_PATH,
)
from viewport.sockets import set_no_delay
from viewport.strict_json import reject_constant
from viewport.tokens import LocalTokenVerifier, TokenRejected

__all__ = ["BusApi", "BusSite", "PullWaiter", "PullWaiters", "max_body_bytes_for"]

HEALTH = "/health"

#: What this bus offers beyond the platform API (which takes one frame per publish and has no
#: liveness endpoints); every pull answer and /health carries it.
CAPABILITIES = ("batch", "liveness")
_CAPABILITIES_JSON = json.dumps(list(CAPABILITIES), separators=(",", ":")).encode("ascii")

INTERNAL_KEY_HEADER = b"x-relay-internal-key"
DIRECTIONS = frozenset(("client_to_daemon", "daemon_to_clients"))
#: Largest ``limit`` a pull may ask for (larger values are clamped, not refused).
MAX_PULL_LIMIT = 1000
DEFAULT_PULL_LIMIT = 100
#: A pull stops adding frames once their payloads reach this many bytes (the first always fits).
PULL_BUDGET_BYTES = 262144
#: Frames one batched publish may carry.
MAX_BATCH_FRAMES = 500
#: Relay ids one liveness query may ask about.
MAX_ALIVE_IDS = 1000
DEFAULT_HEARTBEAT_TTL_MS = 3000
MIN_HEARTBEAT_TTL_MS = 500
MAX_HEARTBEAT_TTL_MS = 60000
#: Longest workspace / runtime target id, relay or machine id, and signature (characters).
SCOPE_ID_CHARS = 128
RELAY_ID_CHARS = 255
SIGNATURE_CHARS = 512
#: Room in a body for one frame's fields besides the payload: JSON may spend 12 bytes on a character
#: (an escaped surrogate pair), plus names, direction, issuedAtMs and punctuation.
FRAME_OVERHEAD_BYTES = 12 * (2 * SCOPE_ID_CHARS + 3 * RELAY_ID_CHARS + SIGNATURE_CHARS) + 2048
_ROLE_CLAIM_MISMATCH = "ROLE_CLAIM_MISMATCH"
_JSON_HEADERS = ((b"content-type", b"application/json"), (b"cache-control", b"no-store"))
_BIGINT_MAX = 2**63 - 1

#: A status and the document to answer (a dict, or bytes already encoded).
Answer = tuple[int, Union[dict[str, Any], bytes]]


def max_body_bytes_for(max_payload_bytes: int, max_batch_bytes: int) -> int:
    """
    Request body cap, so that any valid publish fits: payloads escaped inside JSON grow at most
    sixfold, plus the other fields of a full batch at their longest, plus slack.
    """
    return 6 * max(max_payload_bytes, max_batch_bytes) + MAX_BATCH_FRAMES * FRAME_OVERHEAD_BYTES + 65536


class BadRequest(Exception):
    """A request field is missing or invalid; ``error`` names it."""

    def __init__(self, error: str, status: int = 400, reason: str = "INVALID_REQUEST") -> None:
        super().__init__(error)
        self.error = error
        self.status = status
        self.reason = reason


class CappedRequest(Request):
    """
    A request that stops buffering its body beyond the site's ``max_body_bytes``, and never buffers
    the body of a request without the internal key (it is refused with 401 unread).
    """

    too_large = False
    _unauthorized = False
    _received = 0

    def _cap(self) -> int:
        return int(getattr(getattr(self.channel, "site", None), "max_body_bytes", 1 << 20))

    def gotLength(self, length: Optional[int]) -> None:
        """Refuse (later, with 413 or 401) a body announced larger than the cap or sent without the key."""
        site = getattr(self.channel, "site", None)
        if isinstance(site, BusSite) and not site.api.authorized(self):
            self._unauthorized = True
        elif length is not None and length > self._cap():
            self.too_large = True
        if self._unauthorized or self.too_large:
            self.content = io.BytesIO()  # type: ignore[assignment]
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """Count and store a chunk until the cap is passed."""
        self._received += len(data)
        if self.too_large or self._unauthorized:
            return
        if self._received > self._cap():
            self.too_large = True
            self.content = io.BytesIO()  # type: ignore[assignment]
            return
        super().handleContentChunk(data)


class _NoDelayChannel(http.HTTPChannel):
    """HTTP/1.1 with TCP_NODELAY: a long-poll answer must not wait for the ACK of the previous one."""

    def connectionMade(self) -> None:
        """Set the option, then start reading requests."""
        set_no_delay(self.transport)
        super().connectionMade()


class BusSite(Site):
    """A Site with the body cap and without per-request access log lines (pulls arrive constantly)."""

    protocol = _NoDelayChannel  # type: ignore[assignment]  # HTTP/1.1 only, which is all relays speak

    def __init__(self, api: "BusApi", max_body_bytes: int) -> None:
        # Bodies are JSON, never forms: parsing every request's content type (through the email
        # package) for form data was a tenth of the bus's request handling.
        super().__init__(api, parsePOSTFormSubmission=False)
        self.api = api
        self.requestFactory = CappedRequest
        self.max_body_bytes = max_body_bytes

    def log(self, request: http.Request) -> None:
        """No access log."""


def _text_field(body: dict[str, Any], key: str, max_chars: int, *, required: bool, empty_ok: bool = False) -> Optional[str]:
    value = body.get(key)
    if value is None:
        if required:
            raise BadRequest(f"{key} is required")
        return None
    if not isinstance(value, str) or len(value) > max_chars or (not value and not empty_ok):
        raise BadRequest(f"{key} must be a string of 1..{max_chars} characters")
    _storable(key, value)
    return value


def _storable(key: str, value: str) -> int:
    """Refuse what PostgreSQL text cannot hold (NUL, lone surrogates); the value's size in UTF-8."""
    if "\x00" in value:
        raise BadRequest(f"{key} must not contain NUL")
    if value.isascii():
        return len(value)
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest(f"{key} must be valid Unicode") from None


def _integer_field(
    body: dict[str, Any], key: str, default: Optional[int], minimum: int, maximum: int = _BIGINT_MAX
) -> Optional[int]:
    value = body.get(key)
    if value is None:
        return default
    number: Optional[int] = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    if number is None or number < minimum or number > maximum:
        bounds = f">= {minimum}" if maximum == _BIGINT_MAX else f"{minimum}..{maximum}"
        raise BadRequest(f"{key} must be an integer {bounds}")
    return number


def _bool_field(body: dict[str, Any], key: str, default: Optional[bool] = None) -> bool:
    value = body.get(key)
    if value is None and default is not None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be a boolean")
    return value


def _id_list(body: dict[str, Any], key: str, max_items: int) -> list[str]:
    """A list of relay ids (each like ``relayId``), duplicates dropped, first occurrence order kept."""
    value = body.get(key)
    if not isinstance(value, list) or len(value) > max_items:
        raise BadRequest(f"{key} must be a list of at most {max_items} relay ids")
    ids: dict[str, None] = {}
    for index, item in enumerate(value):
        if not isinstance(item, str) or not 1 <= len(item) <= RELAY_ID_CHARS:
            raise BadRequest(f"{key}[{index}] must be a string of 1..{RELAY_ID_CHARS} characters")
        _storable(f"{key}[{index}]", item)
        ids[item] = None
    return list(ids)


#: The fields of a single-frame publish body (a batch body carries ``frames`` and none of these).
_FRAME_KEYS = frozenset((
    "workspaceId", "runtimeTargetId", "machineId", "sourceRelayId", "targetRelayId", "direction", "payload",
    "issuedAtMs", "signature",
))


class BusApi(Resource):
    """
    Every endpoint of the bus: JSON POSTs authenticated by ``x-relay-internal-key`` (and GET /health).

    Errors are JSON ``{ok:false, reason}``: 401 UNAUTHORIZED, 400 INVALID_JSON / INVALID_REQUEST
    (with ``error`` naming the field), 413 REQUEST_TOO_LARGE / PAYLOAD_TOO_LARGE / BATCH_TOO_LARGE,
    404, 405, 503 DATABASE_UNAVAILABLE / SHUTTING_DOWN, 500 INTERNAL_ERROR.
    """

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        *,
        store: BusStore,
        waiters: PullWaiters,
        clock: IReactorTime,
        internal_key: str,
        verifier: LocalTokenVerifier,
        max_wait_ms: int,
        max_payload_bytes: int,
        max_batch_bytes: int,
        presence_ttl_seconds: float,
    ) -> None:
        super().__init__()
        self._store = store
        self._waiters = waiters
        self._clock = clock
        self._internal_key = internal_key.encode("utf-8")
        self._verifier = verifier
        self._max_wait_ms = max_wait_ms
        self._max_payload_bytes = max_payload_bytes
        self._max_batch_bytes = max_batch_bytes
        self._presence_ttl_seconds = presence_ttl_seconds
        self._routes: dict[str, Callable[[dict[str, Any]], Any]] = {
            VALIDATE_PATH: self._validate,
            UPSERT_PATH: self._presence_upsert,
            RESOLVE_PATH: self._presence_resolve,
            PUBLISH_PATH: self._publish,
            PULL_PATH: self._pull,
            HEARTBEAT_PATH: self._relay_heartbeat,
            ALIVE_PATH: self._relays_alive,
        }
        self._stopping = False
        self._in_flight: set[Deferred[Any]] = set()
        self._drained: list[Deferred[None]] = []

    def authorized(self, request: Request) -> bool:
        """Whether the request carries the internal key."""
        given = request.getHeader(INTERNAL_KEY_HEADER)
        return given is not None and hmac.compare_digest(given, self._internal_key)

    def stop(self, grace_seconds: float) -> "Deferred[None]":
        """
        Shut down gently: new requests get 503 SHUTTING_DOWN, waiting pulls answer at once (no new
        frames), and requests still running after ``grace_seconds`` are cancelled (503); fires once
        every request has been answered.
        """
        self._stopping = True
        self._waiters.wake_all()
        if not self._in_flight:
            return succeed(None)
        drained: Deferred[None] = Deferred()
        self._drained.append(drained)
        timer = self._clock.callLater(grace_seconds, self._cancel_in_flight)

        def stop_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        return drained.addBoth(stop_timer)

    def _cancel_in_flight(self) -> None:
        for running in list(self._in_flight):
            running.cancel()

    def _settled(self, result: "Deferred[Any]") -> None:
        self._in_flight.discard(result)
        if self._stopping and not self._in_flight:
            drained, self._drained = self._drained, []
            for waiting in drained:
                waiting.callback(None)

    def render(self, request: Request) -> Union[bytes, int]:
        """Route, authenticate, parse, and answer asynchronously."""
        request.setHeader(b"server", b"viewport-bus")
        if self._stopping:
            request.setHeader(b"connection", b"close")
            return self._refuse(request, 503, "SHUTTING_DOWN")
        path = request.path.decode("latin-1")
        if path == HEALTH:
            if request.method not in (b"GET", b"HEAD"):
                return self._refuse(request, 405, "METHOD_NOT_ALLOWED")
            return self._respond(request, self._health())
        handler = self._routes.get(path)
        if handler is None:
            return self._refuse(request, 404, "NOT_FOUND")
        if request.method != b"POST":
            return self._refuse(request, 405, "METHOD_NOT_ALLOWED")
        if not self.authorized(request):
            return self._refuse(request, 401, "UNAUTHORIZED")
        if getattr(request, "too_large", False):
            request.setHeader(b"connection", b"close")
            return self._refuse(request, 413, "REQUEST_TOO_LARGE")
        try:
            assert request.content is not None
            document = json.loads(request.content.read().decode("utf-8"), parse_constant=reject_constant)
        except (ValueError, RecursionError):
            return self._refuse(request, 400, "INVALID_JSON")
        if not isinstance(document, dict):
            return self._refuse(request, 400, "INVALID_JSON")
        return self._respond(request, maybeDeferred(handler, document))

    def _refuse(self, request: Request, status: int, reason: str) -> bytes:
        self._headers(request, status)
        return _encode({"ok": False, "reason": reason})

    @staticmethod
    def _headers(request: Request, status: int) -> None:
        request.setResponseCode(status)
        for name, value in _JSON_HEADERS:
            request.setHeader(name, value)

    def _respond(self, request: Request, result: "Deferred[Answer]") -> int:
        finished = [False]
        self._in_flight.add(result)

        def gone(_: object) -> None:
            finished[0] = True
            result.cancel()

        request.notifyFinish().addErrback(gone)

        def mapped(failure: Failure) -> Answer:
            if failure.check(BadRequest):
                error: BadRequest = failure.value
                return error.status, {"ok": False, "reason": error.reason, "error": error.error}
            if failure.check(DatabaseUnsuitable):
                return 503, {"ok": False, "reason": "DATABASE_UNSUITABLE", "error": str(failure.value)}
            if failure.check(DatabaseUnavailable):
                return 503, {"ok": False, "reason": "DATABASE_UNAVAILABLE"}
            if failure.check(CancelledError) and finished[0]:
                return 499, {}
            if failure.check(CancelledError) and self._stopping:
                return 503, {"ok": False, "reason": "SHUTTING_DOWN"}
            self._log.failure(
                "bus request {path} failed", failure, relay_event="bus_request_error", path=request.path.decode("latin-1")
            )
            return 500, {"ok": False, "reason": "INTERNAL_ERROR"}

        def write(answer: Answer) -> None:
            if finished[0]:
                return
            status, document = answer
            self._headers(request, status)
            data = _encode(document)
            # A length instead of chunks: one write, and the relay's parser reads it in one go.
            request.setHeader(b"content-length", b"%d" % len(data))
            request.write(data)
            request.finish()

        result.addErrback(mapped).addCallback(write).addErrback(
            lambda f: self._log.failure("bus response failed", f, relay_event="bus_response_error")
        ).addBoth(lambda _: self._settled(result))
        return NOT_DONE_YET

    # --- endpoints --------------------------------------------------------------------------

    def _health(self) -> "Deferred[Answer]":
        answer = {"ok": True, "database": "up", "capabilities": list(CAPABILITIES)}
        return self._store.ping().addCallback(lambda _: (200, answer))

    def _validate(self, body: dict[str, Any]) -> Answer:
        """Verify the relay token as local admission does: signature, times, claims schema, role."""
        token = _text_field(body, "relayToken", 16384, required=True)
        role = _text_field(body, "role", 64, required=True)
        _text_field(body, "workspaceId", SCOPE_ID_CHARS, required=False)
        _text_field(body, "runtimeTargetId", SCOPE_ID_CHARS, required=False)
        assert token is not None
        try:
            claims = self._verifier.verify(token, self._clock.seconds())
        except TokenRejected as rejected:
            return 401, {"ok": False, "reason": rejected.reason}
        if claims.role is not None and claims.role != role:
            return 401, {"ok": False, "reason": _ROLE_CLAIM_MISMATCH}
        return 200, {"ok": True, "claims": claims.to_json()}

    def _presence_upsert(self, body: dict[str, Any]) -> "Deferred[Answer]":
        workspace_id = _text_field(body, "workspaceId", SCOPE_ID_CHARS, required=True)
        runtime_target_id = _text_field(body, "runtimeTargetId", SCOPE_ID_CHARS, required=False, empty_ok=True) or ""
        machine_id = _text_field(body, "machineId", RELAY_ID_CHARS, required=False, empty_ok=True) or None
        relay_id = _text_field(body, "relayId", RELAY_ID_CHARS, required=True)
        connected = _bool_field(body, "daemonConnected")
        assert workspace_id is not None and relay_id is not None
        if not connected:
            cleared = self._store.clear_presence(workspace_id, runtime_target_id, relay_id)
            return cleared.addCallback(lambda deleted: (200, {"ok": True, "cleared": deleted}))
        url = _text_field(body, "relayWsBaseUrl", 2048, required=True)
        assert url is not None
        upserted = self._store.upsert_presence(workspace_id, runtime_target_id, relay_id, url, machine_id)
        return upserted.addCallback(lambda _: (200, {"ok": True}))

    def _presence_resolve(self, body: dict[str, Any]) -> "Deferred[Answer]":
        workspace_id = _text_field(body, "workspaceId", SCOPE_ID_CHARS, required=True)
        runtime_target_id = _text_field(body, "runtimeTargetId", SCOPE_ID_CHARS, required=False, empty_ok=True)
        assert workspace_id is not None

        def answer(row: Any) -> Answer:
            if row is None:
                return 200, {"ok": True, "daemonConnected": False}
            return 200, {
                "ok": True,
                "daemonConnected": True,
                "relayId": row.relay_id,
                "relayWsBaseUrl": row.relay_ws_base_url,
                "runtimeTargetId": row.runtime_target_id or None,
                "machineId": row.machine_id,
            }

        resolved = self._store.resolve_presence(workspace_id, runtime_target_id, self._presence_ttl_seconds)
        return resolved.addCallback(answer)

    def _publish(self, body: dict[str, Any]) -> "Deferred[Answer]":
        """One frame (answer ``id``), or ``{"frames": [...]}`` stored in one transaction (answer ``ids``)."""
        if "frames" not in body:
            frame, _ = self._new_frame(body)

            def stored_one(frame_id: int) -> Answer:
                self._waiters.stored([frame], [frame_id])
                return 200, {"ok": True, "id": frame_id}

            return self._store.publish(frame).addCallbacks(stored_one, self._not_stored, errbackArgs=([frame],))
        entries = body["frames"]
        if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_BATCH_FRAMES:
            raise BadRequest(f"frames must be a list of 1..{MAX_BATCH_FRAMES} frames")
        if _FRAME_KEYS.intersection(body):
            raise BadRequest("frames cannot be combined with the fields of a single frame")
        frames: list[NewFrame] = []
        total_bytes = 0
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise BadRequest(f"frames[{index}] must be an object")
            try:
                frame, payload_bytes = self._new_frame(entry)
            except BadRequest as refused:
                raise BadRequest(f"frames[{index}]: {refused.error}", refused.status, refused.reason) from None
            frames.append(frame)
            total_bytes += payload_bytes
        if total_bytes > self._max_batch_bytes:
            raise BadRequest(f"frames: payloads over {self._max_batch_bytes} bytes in all", 413, "BATCH_TOO_LARGE")

        def stored(ids: list[int]) -> Answer:
            self._waiters.stored(frames, ids)
            return 200, {"ok": True, "ids": ids}

        return self._store.publish_batch(frames).addCallbacks(stored, self._not_stored, errbackArgs=(frames,))

    def _not_stored(self, failure: Failure, frames: list[NewFrame]) -> Failure:
        # The insert may have committed before it failed (a timeout, a cancel): let its pulls look.
        self._waiters.not_stored(frames)
        return failure

    def _new_frame(self, body: dict[str, Any]) -> tuple[NewFrame, int]:
        """A published frame, checked field by field, and its payload's size in bytes."""
        direction = body.get("direction")
        if direction not in DIRECTIONS:
            raise BadRequest("direction must be client_to_daemon or daemon_to_clients")
        payload = body.get("payload")
        if not isinstance(payload, str):
            raise BadRequest("payload must be a string")
        payload_bytes = _storable("payload", payload)
        if payload_bytes > self._max_payload_bytes:
            raise BadRequest(f"payload over {self._max_payload_bytes} bytes", 413, "PAYLOAD_TOO_LARGE")
        frame = NewFrame(
            workspace_id=_text_field(body, "workspaceId", SCOPE_ID_CHARS, required=True) or "",
            runtime_target_id=_text_field(body, "runtimeTargetId", SCOPE_ID_CHARS, required=True) or "",
            machine_id=_text_field(body, "machineId", RELAY_ID_CHARS, required=False, empty_ok=True),
            source_relay_id=_text_field(body, "sourceRelayId", RELAY_ID_CHARS, required=True) or "",
            target_relay_id=_text_field(body, "targetRelayId", RELAY_ID_CHARS, required=False, empty_ok=True),
            direction=direction,
            payload=payload,
            issued_at_ms=_integer_field(body, "issuedAtMs", None, 0),
            signature=_text_field(body, "signature", SIGNATURE_CHARS, required=False, empty_ok=True),
        )
        return frame, payload_bytes

    def _relay_heartbeat(self, body: dict[str, Any]) -> "Deferred[Answer]":
        """A relay is alive for ``ttlMs`` more; with ``gone: true`` it is dead from now on (its goodbye)."""
        relay_id = _text_field(body, "relayId", RELAY_ID_CHARS, required=True)
        ttl_ms = _integer_field(body, "ttlMs", DEFAULT_HEARTBEAT_TTL_MS, MIN_HEARTBEAT_TTL_MS, MAX_HEARTBEAT_TTL_MS)
        gone = _bool_field(body, "gone", False)
        assert relay_id is not None and ttl_ms is not None
        stored = self._store.relay_gone(relay_id) if gone else self._store.relay_heartbeat(relay_id, ttl_ms / 1000.0)
        return stored.addCallback(lambda _: (200, {"ok": True}))

    def _relays_alive(self, body: dict[str, Any]) -> "Deferred[Answer]":
        """Sort relay ids into alive (unexpired heartbeat), dead (expired or said goodbye) and unknown (never seen)."""
        relay_ids = _id_list(body, "relayIds", MAX_ALIVE_IDS)

        def answer(known: dict[str, bool]) -> Answer:
            return 200, {
                "ok": True,
                "alive": [relay_id for relay_id in relay_ids if known.get(relay_id) is True],
                "dead": [relay_id for relay_id in relay_ids if known.get(relay_id) is False],
                "unknown": [relay_id for relay_id in relay_ids if relay_id not in known],
            }

        known = self._store.relay_liveness(relay_ids) if relay_ids else succeed({})
        return known.addCallback(answer)

    @inlineCallbacks
    def _pull(self, body: dict[str, Any]) -> Generator[Any, Any, Answer]:
        relay_id = _text_field(body, "relayId", RELAY_ID_CHARS, required=True)
        since_id = _integer_field(body, "sinceId", 0, 0)
        limit = min(_integer_field(body, "limit", DEFAULT_PULL_LIMIT, 1) or DEFAULT_PULL_LIMIT, MAX_PULL_LIMIT)
        wait_ms = min(_integer_field(body, "waitMs", 0, 0) or 0, self._max_wait_ms)
        assert relay_id is not None and since_id is not None
        deadline = self._clock.seconds() + wait_ms / 1000.0
        # Watching before the first query: a frame stored while a query runs wakes the waiter, so
        # the pull queries again instead of sleeping through it.
        waiter = self._waiters.watch(relay_id, since_id, limit, PULL_BUDGET_BYTES)
        try:
            while True:
                waiter.woken = False
                page: PullPage = yield self._store.pull(relay_id, since_id, limit, PULL_BUDGET_BYTES)
                remaining = deadline - self._clock.seconds()
                if page.count or remaining <= 0 or self._stopping:
                    return 200, _page_json(page)
                waiter.seen_through = max(waiter.seen_through, page.head_id)
                yield waiter.sleep(remaining)
                if waiter.page is not None:
                    # A batch stored by this process right after our cursor: its frames are the answer.
                    return 200, _page_json(waiter.page)
                if self._stopping:
                    return 200, _page_json(page)
        finally:
            waiter.close()


def _page_json(page: PullPage) -> bytes:
    """A pull's answer, around the frames' JSON as PostgreSQL wrote it."""
    return b"".join((
        b'{"ok":true,"frames":',
        page.frames_json.encode("utf-8"),
        b',"headId":%d,"more":%s,"capabilities":%s}'
        % (page.head_id, b"true" if page.more else b"false", _CAPABILITIES_JSON),
    ))


def _encode(document: Union[dict[str, Any], bytes]) -> bytes:
    if isinstance(document, bytes):
        return document
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
