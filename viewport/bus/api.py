"""The viewport-bus HTTP API: validate, presence upsert/resolve, bus publish/pull (long-poll), health."""

from __future__ import annotations

import hmac
import io
import json
from typing import Any, Callable, Generator, Optional, Union

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from viewport.bus.store import BusStore, DatabaseUnavailable, NewFrame, PullPage
from viewport.sockets import set_no_delay
from viewport.tokens import LocalTokenVerifier, TokenRejected

__all__ = ["BusApi", "BusSite", "PullWaiters", "max_body_bytes_for"]

PREFIX = "/api/runtime/internal/relay"
VALIDATE = PREFIX + "/validate"
PRESENCE_UPSERT = PREFIX + "/presence/upsert"
PRESENCE_RESOLVE = PREFIX + "/presence/resolve"
BUS_PUBLISH = PREFIX + "/bus/publish"
BUS_PULL = PREFIX + "/bus/pull"
HEALTH = "/health"

INTERNAL_KEY_HEADER = b"x-relay-internal-key"
DIRECTIONS = frozenset(("client_to_daemon", "daemon_to_clients"))
#: Largest ``limit`` a pull may ask for (larger values are clamped, not refused).
MAX_PULL_LIMIT = 1000
DEFAULT_PULL_LIMIT = 100
#: A pull stops adding frames once their payloads reach this many bytes (the first always fits).
PULL_BUDGET_BYTES = 262144
_ROLE_CLAIM_MISMATCH = "ROLE_CLAIM_MISMATCH"
_JSON_HEADERS = ((b"content-type", b"application/json"), (b"cache-control", b"no-store"))
_BIGINT_MAX = 2**63 - 1

Answer = tuple[int, dict[str, Any]]


def max_body_bytes_for(max_payload_bytes: int) -> int:
    """Request body cap: a payload escaped inside JSON grows at most sixfold, plus room for the other fields."""
    return 6 * max_payload_bytes + 65536


class BadRequest(Exception):
    """A request field is missing or invalid; ``error`` names it."""

    def __init__(self, error: str, status: int = 400, reason: str = "INVALID_REQUEST") -> None:
        super().__init__(error)
        self.error = error
        self.status = status
        self.reason = reason


class CappedRequest(Request):
    """A request that stops buffering its body beyond the site's ``max_body_bytes``."""

    too_large = False
    _received = 0

    def _cap(self) -> int:
        return int(getattr(getattr(self.channel, "site", None), "max_body_bytes", 1 << 20))

    def gotLength(self, length: Optional[int]) -> None:
        """Refuse (later, with 413) a body announced larger than the cap, without storing it."""
        if length is not None and length > self._cap():
            self.too_large = True
            self.content = io.BytesIO()  # type: ignore[assignment]
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """Count and store a chunk until the cap is passed."""
        self._received += len(data)
        if self.too_large:
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

    def __init__(self, resource: Resource, max_body_bytes: int) -> None:
        super().__init__(resource)
        self.requestFactory = CappedRequest
        self.max_body_bytes = max_body_bytes

    def log(self, request: http.Request) -> None:
        """No access log."""


class PullWaiters:
    """Long-polling pulls waiting for a NOTIFY; ``generation`` counts notifications seen."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._waiting: set[Deferred[None]] = set()
        self.generation = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def notify(self, frame_id: int = 0) -> None:
        """A frame was stored (or notifications may have been missed): wake every waiting pull."""
        self.generation += 1
        waiting, self._waiting = self._waiting, set()
        for waiter in waiting:
            waiter.callback(None)

    def wait(self, seconds: float) -> "Deferred[None]":
        """Fires at the next notification or after ``seconds``, whichever comes first."""
        timer: list[IDelayedCall] = []

        def cancel(d: "Deferred[None]") -> None:
            self._waiting.discard(d)

        waiter: Deferred[None] = Deferred(cancel)

        def timed_out() -> None:
            if waiter in self._waiting:
                self._waiting.discard(waiter)
                waiter.callback(None)

        def cleanup(result: object) -> object:
            if timer and timer[0].active():
                timer[0].cancel()
            return result

        self._waiting.add(waiter)
        timer.append(self._clock.callLater(seconds, timed_out))
        waiter.addBoth(cleanup)
        return waiter


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


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


def _storable(key: str, value: str) -> None:
    # PostgreSQL text holds neither NUL nor lone surrogates.
    if "\x00" in value:
        raise BadRequest(f"{key} must not contain NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{key} must be valid Unicode") from None


def _integer_field(body: dict[str, Any], key: str, default: Optional[int], minimum: int) -> Optional[int]:
    value = body.get(key)
    if value is None:
        return default
    number: Optional[int] = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    if number is None or number < minimum or number > _BIGINT_MAX:
        raise BadRequest(f"{key} must be an integer >= {minimum}")
    return number


def _bool_field(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be a boolean")
    return value


class BusApi(Resource):
    """
    Every endpoint of the bus: JSON POSTs authenticated by ``x-relay-internal-key`` (and GET /health).

    Errors are JSON ``{ok:false, reason}``: 401 UNAUTHORIZED, 400 INVALID_JSON / INVALID_REQUEST
    (with ``error`` naming the field), 413 REQUEST_TOO_LARGE / PAYLOAD_TOO_LARGE, 404, 405,
    503 DATABASE_UNAVAILABLE, 500 INTERNAL_ERROR.
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
        self._presence_ttl_seconds = presence_ttl_seconds
        self._routes: dict[str, Callable[[dict[str, Any]], Any]] = {
            VALIDATE: self._validate,
            PRESENCE_UPSERT: self._presence_upsert,
            PRESENCE_RESOLVE: self._presence_resolve,
            BUS_PUBLISH: self._publish,
            BUS_PULL: self._pull,
        }

    def render(self, request: Request) -> Union[bytes, int]:
        """Route, authenticate, parse, and answer asynchronously."""
        request.setHeader(b"server", b"viewport-bus")
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
        given = request.getHeader(INTERNAL_KEY_HEADER)
        if given is None or not hmac.compare_digest(given, self._internal_key):
            return self._refuse(request, 401, "UNAUTHORIZED")
        if getattr(request, "too_large", False):
            request.setHeader(b"connection", b"close")
            return self._refuse(request, 413, "REQUEST_TOO_LARGE")
        try:
            assert request.content is not None
            document = json.loads(request.content.read().decode("utf-8"), parse_constant=_reject_constant)
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

        def gone(_: object) -> None:
            finished[0] = True
            result.cancel()

        request.notifyFinish().addErrback(gone)

        def mapped(failure: Failure) -> Answer:
            if failure.check(BadRequest):
                error: BadRequest = failure.value  # type: ignore[assignment]
                return error.status, {"ok": False, "reason": error.reason, "error": error.error}
            if failure.check(DatabaseUnavailable):
                return 503, {"ok": False, "reason": "DATABASE_UNAVAILABLE"}
            if failure.check(CancelledError) and finished[0]:
                return 499, {}
            self._log.failure("{relay_event}", failure, relay_event="bus_request_error", path=request.path.decode("latin-1"))
            return 500, {"ok": False, "reason": "INTERNAL_ERROR"}

        def write(answer: Answer) -> None:
            if finished[0]:
                return
            status, document = answer
            self._headers(request, status)
            request.write(_encode(document))
            request.finish()

        result.addErrback(mapped).addCallback(write).addErrback(
            lambda f: self._log.failure("{relay_event}", f, relay_event="bus_response_error")
        )
        return NOT_DONE_YET

    # --- endpoints --------------------------------------------------------------------------

    def _health(self) -> "Deferred[Answer]":
        return self._store.ping().addCallback(lambda _: (200, {"ok": True, "database": "up"}))

    def _validate(self, body: dict[str, Any]) -> Answer:
        """Verify the relay token as local admission does: signature, times, claims schema, role."""
        token = _text_field(body, "relayToken", 16384, required=True)
        role = _text_field(body, "role", 64, required=True)
        _text_field(body, "workspaceId", 128, required=False)
        _text_field(body, "runtimeTargetId", 128, required=False)
        assert token is not None
        try:
            claims = self._verifier.verify(token, self._clock.seconds())
        except TokenRejected as rejected:
            return 401, {"ok": False, "reason": rejected.reason}
        if claims.role is not None and claims.role != role:
            return 401, {"ok": False, "reason": _ROLE_CLAIM_MISMATCH}
        return 200, {"ok": True, "claims": claims.to_json()}

    def _presence_upsert(self, body: dict[str, Any]) -> "Deferred[Answer]":
        workspace_id = _text_field(body, "workspaceId", 128, required=True)
        runtime_target_id = _text_field(body, "runtimeTargetId", 128, required=False, empty_ok=True) or ""
        machine_id = _text_field(body, "machineId", 255, required=False, empty_ok=True) or None
        relay_id = _text_field(body, "relayId", 255, required=True)
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
        workspace_id = _text_field(body, "workspaceId", 128, required=True)
        runtime_target_id = _text_field(body, "runtimeTargetId", 128, required=False, empty_ok=True)
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
        direction = body.get("direction")
        if direction not in DIRECTIONS:
            raise BadRequest("direction must be client_to_daemon or daemon_to_clients")
        payload = body.get("payload")
        if not isinstance(payload, str):
            raise BadRequest("payload must be a string")
        _storable("payload", payload)
        if len(payload.encode("utf-8")) > self._max_payload_bytes:
            raise BadRequest(f"payload over {self._max_payload_bytes} bytes", 413, "PAYLOAD_TOO_LARGE")
        frame = NewFrame(
            workspace_id=_text_field(body, "workspaceId", 128, required=True) or "",
            runtime_target_id=_text_field(body, "runtimeTargetId", 128, required=True) or "",
            machine_id=_text_field(body, "machineId", 255, required=False, empty_ok=True),
            source_relay_id=_text_field(body, "sourceRelayId", 255, required=True) or "",
            target_relay_id=_text_field(body, "targetRelayId", 255, required=False, empty_ok=True),
            direction=direction,
            payload=payload,
            issued_at_ms=_integer_field(body, "issuedAtMs", None, 0),
            signature=_text_field(body, "signature", 512, required=False, empty_ok=True),
        )
        return self._store.publish(frame).addCallback(lambda frame_id: (200, {"ok": True, "id": frame_id}))

    @inlineCallbacks
    def _pull(self, body: dict[str, Any]) -> Generator[Any, Any, Answer]:
        relay_id = _text_field(body, "relayId", 255, required=True)
        since_id = _integer_field(body, "sinceId", 0, 0)
        limit = min(_integer_field(body, "limit", DEFAULT_PULL_LIMIT, 1) or DEFAULT_PULL_LIMIT, MAX_PULL_LIMIT)
        wait_ms = min(_integer_field(body, "waitMs", 0, 0) or 0, self._max_wait_ms)
        assert relay_id is not None and since_id is not None
        deadline = self._clock.seconds() + wait_ms / 1000.0
        while True:
            generation = self._waiters.generation
            page: PullPage = yield self._store.pull(relay_id, since_id, limit, PULL_BUDGET_BYTES)
            remaining = deadline - self._clock.seconds()
            if page.frames or remaining <= 0:
                return 200, _page_json(page)
            if self._waiters.generation == generation:
                # No frame was stored since the query started: sleep until one is (or time is up).
                yield self._waiters.wait(remaining)


def _page_json(page: PullPage) -> dict[str, Any]:
    frames = []
    for stored in page.frames:
        frame = stored.frame
        entry: dict[str, Any] = {
            "id": stored.id,
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
        frames.append(entry)
    return {"ok": True, "frames": frames, "headId": page.head_id, "more": page.more}


def _encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
