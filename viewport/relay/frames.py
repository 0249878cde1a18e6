"""Frame parsing, validation, scope rules and relay-originated frames: pure code on the per-frame path."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence, TypeGuard
from urllib.parse import quote

import orjson

from viewport.strict_json import reject_constant

PROFILE_STRENGTH: Mapping[str, int] = {"noise-ik": 1, "noise-ikpsk2": 2}
PROFILES = ("noise-ik", "noise-ikpsk2")
CHANNEL_PREFIX = "agent-session:"
SESSION_EVENT_RELAY_SCHEMA = "viewport.session_event_relay_frame/v1"
WORKER_PATH_ROOT = "/api/runtime/workspaces/"

E2EE_TYPE = "e2ee"
KEX_INIT_TYPE = "relay_key_exchange_init"
KEX_RESPONSE_TYPE = "relay_key_exchange_response"
KEY_UPDATE_REQUIRED_TYPE = "relay_key_update_required"
PAIRING_OFFER_REQUEST_TYPE = "relay_pairing_offer_request"
PAIRING_REDEEM_REQUEST_TYPE = "relay_pairing_redeem_request"
PAIRING_OFFER_RESPONSE_TYPE = "relay_pairing_offer_response"
PAIRING_REDEEM_RESPONSE_TYPE = "relay_pairing_redeem_response"
SUBSCRIBE_TYPE = "viewport.session_events.subscribe/v1"
UNSUBSCRIBE_TYPE = "viewport.session_events.unsubscribe/v1"
VIEWER_PRESENCE_TYPE = "viewport.session_viewer_presence/v1"
WORKER_REQUEST_TYPE = "viewport.worker_transport.request/v1"
WORKER_RESPONSE_TYPE = "viewport.worker_transport.response/v1"

# JavaScript String.prototype.trim: WhiteSpace (incl. U+FEFF and category Zs) plus LineTerminator.
_JS_WHITESPACE = (
    "\t\n\x0b\x0c\r \xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
)
_JSON_WHITESPACE = " \t\n\r"


class ClientKind(enum.Enum):
    """A valid frame a client may send (docs/protocol.md §4.2)."""

    E2EE = "e2ee"
    KEX_INIT = "kex_init"
    PAIRING_OFFER_REQUEST = "pairing_offer_request"
    PAIRING_REDEEM_REQUEST = "pairing_redeem_request"
    SESSION_SUBSCRIBE = "session_subscribe"
    SESSION_UNSUBSCRIBE = "session_unsubscribe"
    VIEWER_PRESENCE = "viewer_presence"


class DaemonKind(enum.Enum):
    """A valid frame a daemon (or the bus, daemon→clients) may carry (docs/protocol.md §4.2)."""

    E2EE = "e2ee"
    KEY_UPDATE_REQUIRED = "key_update_required"
    KEX_RESPONSE = "kex_response"
    PAIRING_OFFER_RESPONSE = "pairing_offer_response"
    PAIRING_REDEEM_RESPONSE = "pairing_redeem_response"
    SESSION_EVENT = "session_event"


class WorkerKind(enum.Enum):
    """A valid frame a worker may send (docs/protocol.md §4.2)."""

    WORKER_REQUEST = "worker_request"


RUNTIME_KINDS = frozenset({ClientKind.E2EE, ClientKind.KEX_INIT})
PAIRING_KINDS = frozenset({ClientKind.PAIRING_OFFER_REQUEST, ClientKind.PAIRING_REDEEM_REQUEST})
SESSION_EVENT_KINDS = frozenset(
    {ClientKind.SESSION_SUBSCRIBE, ClientKind.SESSION_UNSUBSCRIBE, ClientKind.VIEWER_PRESENCE}
)

#: Digits beyond which an integer is surely outside [-2**63, 2**64) (2**64 has 20).
_MAX_EXACT_DIGITS = 20


def _integer_as_orjson_reads_it(text: str) -> int | float:
    """
    An integer within [-2**63, 2**64) exactly, a larger one as a float (orjson's rule, near JSON.parse's):
    one beyond the double range is infinity, as in JavaScript, and a long digit string is never made an
    ``int`` (Python refuses over 4300 digits, and the conversion is quadratic).
    """
    if len(text) - text.startswith("-") <= _MAX_EXACT_DIGITS:
        value = int(text)
        if -(2**63) <= value < 2**64:
            return value
    return float(text)


# raw_decode skips the whitespace/trailing-data handling of loads; _parse_strictly does its own.
_raw_decode = json.JSONDecoder(parse_constant=reject_constant, parse_int=_integer_as_orjson_reads_it).raw_decode


def parse_frame(data: bytes | str) -> dict[str, object] | None:
    """
    Decode a message with JavaScript ``JSON.parse`` semantics; ``None`` unless it is a JSON object.

    orjson parses the frames that make up the traffic about three times faster than ``json``; what it
    refuses (``1e400``, lone surrogates, nesting over 1024 levels, invalid UTF-8) is parsed again by
    ``json``, whose answer stands, so the accepted set is ``json``'s. Both read integers beyond 64 bits
    as floats, as ``JSON.parse`` reads every number as a double.
    """
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError:
        return _parse_strictly(data)
    return frame if type(frame) is dict else None


def _parse_strictly(data: bytes | str) -> dict[str, object] | None:
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    start = 0
    if text[:1] != "{":
        start = len(text) - len(text.lstrip(_JSON_WHITESPACE))
        if text[start : start + 1] != "{":
            return None
    try:
        frame, end = _raw_decode(text, start)
    except (ValueError, RecursionError):
        return None
    if end != len(text) and text[end:].strip(_JSON_WHITESPACE):
        return None
    return frame


def js_trim(value: str) -> str:
    """Strip whitespace as JavaScript's ``String.prototype.trim`` does."""
    return value.strip(_JS_WHITESPACE)


def is_number(value: object) -> bool:
    """True for a JSON number (booleans excluded)."""
    return type(value) is int or type(value) is float


def is_integer(value: object) -> TypeGuard[int | float]:
    """True for a JSON number without a fractional part (``2.0`` counts, booleans do not)."""
    return type(value) is int or (type(value) is float and value.is_integer())


def _integer_at_least(value: object, low: int) -> bool:
    if type(value) is int:
        return value >= low
    return type(value) is float and value >= low and value.is_integer()


def is_non_empty_string(value: object) -> TypeGuard[str]:
    """True for a string that is not empty after JavaScript trimming."""
    return type(value) is str and value.strip(_JS_WHITESPACE) != ""


def utf16_len(value: str) -> int:
    """Length in UTF-16 code units, as JavaScript's ``String.length``."""
    if value.isascii():
        return len(value)
    return len(value.encode("utf-16-le", "surrogatepass")) >> 1


def _is_channel(value: object) -> bool:
    return (
        type(value) is str
        and value.startswith(CHANNEL_PREFIX)
        and value.strip(_JS_WHITESPACE) != ""
    )


def _needs_pairing_peer(frame: dict[str, object]) -> bool:
    return frame.get("profile") == "noise-ikpsk2" and not is_non_empty_string(frame.get("pairingPeerId"))


def _is_e2ee(frame: dict[str, object]) -> bool:
    # Inlined checks: this is the one frame shape on the hot path.
    get = frame.get
    if get("version") != 2:
        return False
    profile = get("profile")
    if profile != "noise-ik" and profile != "noise-ikpsk2":
        return False
    ws = _JS_WHITESPACE
    value = get("sessionId")
    if type(value) is not str or not value.strip(ws):
        return False
    value = get("epoch")
    if type(value) is int:
        if value < 1:
            return False
    elif type(value) is not float or not (value >= 1 and value.is_integer()):
        return False
    value = get("seq")
    if type(value) is int:
        if value < 1:
            return False
    elif type(value) is not float or not (value >= 1 and value.is_integer()):
        return False
    value = get("iv")
    if type(value) is not str or not value.strip(ws):
        return False
    value = get("tag")
    if type(value) is not str or not value.strip(ws):
        return False
    value = get("ciphertext")
    return type(value) is str and value.strip(ws) != ""


def _all_strings(frame: dict[str, object], names: tuple[str, ...]) -> bool:
    for name in names:
        if type(frame.get(name)) is not str:
            return False
    return True


def _all_non_empty(frame: dict[str, object], names: tuple[str, ...]) -> bool:
    for name in names:
        if not is_non_empty_string(frame.get(name)):
            return False
    return True


_KEX_INIT_V3_FIELDS = ("requestId", "clientEphemeralPublicKey", "encryptedClientStatic")
_KEX_INIT_V2_FIELDS = ("requestId", "clientPublicKey", "clientNonce", "clientProof")


def _is_kex_init(frame: dict[str, object]) -> bool:
    if frame.get("profile") not in PROFILES:
        return False
    version = frame.get("version")
    fields: tuple[str, ...]
    if version == 3:
        fields = _KEX_INIT_V3_FIELDS
    elif version == 2:
        fields = _KEX_INIT_V2_FIELDS
    else:
        return False
    return _all_strings(frame, fields) and not _needs_pairing_peer(frame)


def _is_pairing_offer_request(frame: dict[str, object]) -> bool:
    if not _all_non_empty(frame, ("requestId", "clientChannelPublicKey")):
        return False
    if "ttlSeconds" not in frame:
        return True
    ttl = frame["ttlSeconds"]
    return is_integer(ttl) and 30 <= ttl <= 3600


def _is_pairing_redeem_request(frame: dict[str, object]) -> bool:
    return _all_non_empty(frame, ("requestId", "offerId", "encIv", "encTag", "encCiphertext"))


def _is_subscribe(frame: dict[str, object]) -> bool:
    if not _is_channel(frame.get("channel")):
        return False
    return "afterSequence" not in frame or _integer_at_least(frame["afterSequence"], 0)


def _is_unsubscribe(frame: dict[str, object]) -> bool:
    return _is_channel(frame.get("channel"))


def _is_viewer_presence(frame: dict[str, object]) -> bool:
    get = frame.get
    if not _is_channel(get("channel")) or get("action") not in ("joined", "left", "heartbeat"):
        return False
    user_id = get("userId")
    if not is_non_empty_string(user_id) or utf16_len(user_id) > 128:
        return False
    if "displayName" in frame:
        name = frame["displayName"]
        if type(name) is not str or utf16_len(name) > 255:
            return False
    return "sentAt" not in frame or type(frame["sentAt"]) is str


_CLIENT_RULES: dict[str, tuple[Callable[[dict[str, object]], bool], ClientKind]] = {
    E2EE_TYPE: (_is_e2ee, ClientKind.E2EE),
    KEX_INIT_TYPE: (_is_kex_init, ClientKind.KEX_INIT),
    PAIRING_OFFER_REQUEST_TYPE: (_is_pairing_offer_request, ClientKind.PAIRING_OFFER_REQUEST),
    PAIRING_REDEEM_REQUEST_TYPE: (_is_pairing_redeem_request, ClientKind.PAIRING_REDEEM_REQUEST),
    SUBSCRIBE_TYPE: (_is_subscribe, ClientKind.SESSION_SUBSCRIBE),
    UNSUBSCRIBE_TYPE: (_is_unsubscribe, ClientKind.SESSION_UNSUBSCRIBE),
    VIEWER_PRESENCE_TYPE: (_is_viewer_presence, ClientKind.VIEWER_PRESENCE),
}


def classify_client_frame(frame: dict[str, object]) -> ClientKind | None:
    """The kind of a valid client frame, or ``None`` when it is no valid client frame (docs/protocol.md §4.2)."""
    frame_type = frame.get("type")
    if type(frame_type) is not str:
        return None
    rule = _CLIENT_RULES.get(frame_type)
    if rule is None or not rule[0](frame):
        return None
    return rule[1]


def _is_key_update_required(frame: dict[str, object]) -> bool:
    return type(frame.get("sessionId")) is str and is_number(frame.get("nextEpoch"))


_KEX_RESPONSE_V3_FIELDS = (
    "requestId",
    "daemonPublicKey",
    "daemonEphemeralPublicKey",
    "encryptedMetadata",
    "sessionId",
    "proof",
)
_KEX_RESPONSE_V2_FIELDS = ("requestId", "daemonNonce", "sessionId", "proof")


def _is_kex_response(frame: dict[str, object]) -> bool:
    if frame.get("profile") not in PROFILES:
        return False
    version = frame.get("version")
    if version == 3:
        return _all_strings(frame, _KEX_RESPONSE_V3_FIELDS) and _integer_at_least(frame.get("epoch"), 1)
    if version == 2:
        return _all_strings(frame, _KEX_RESPONSE_V2_FIELDS) and is_number(frame.get("epoch"))
    return False


def _pairing_response_ok(frame: dict[str, object]) -> bool | None:
    """``ok`` of a well-formed pairing response, ``None`` when the common part is invalid."""
    ok = frame.get("ok")
    if type(ok) is not bool or not is_non_empty_string(frame.get("requestId")):
        return None
    if not ok and not is_non_empty_string(frame.get("errorCode")):
        return None
    return ok


_OFFER_OK_FIELDS = ("daemonChannelPublicKey", "encIv", "encTag", "encCiphertext")


def _is_pairing_offer_response(frame: dict[str, object]) -> bool:
    ok = _pairing_response_ok(frame)
    return ok is False or (ok is True and _all_non_empty(frame, _OFFER_OK_FIELDS))


def _is_pairing_redeem_response(frame: dict[str, object]) -> bool:
    return _pairing_response_ok(frame) is not None


def _is_session_event(frame: dict[str, object]) -> bool:
    # Unlike the reference relay, a JSON null event is refused.
    return (
        frame.get("schema") == SESSION_EVENT_RELAY_SCHEMA
        and _is_channel(frame.get("channel"))
        and type(frame.get("event")) is dict
    )


_DAEMON_RULES: dict[str, tuple[Callable[[dict[str, object]], bool], DaemonKind]] = {
    E2EE_TYPE: (_is_e2ee, DaemonKind.E2EE),
    KEY_UPDATE_REQUIRED_TYPE: (_is_key_update_required, DaemonKind.KEY_UPDATE_REQUIRED),
    KEX_RESPONSE_TYPE: (_is_kex_response, DaemonKind.KEX_RESPONSE),
    PAIRING_OFFER_RESPONSE_TYPE: (_is_pairing_offer_response, DaemonKind.PAIRING_OFFER_RESPONSE),
    PAIRING_REDEEM_RESPONSE_TYPE: (_is_pairing_redeem_response, DaemonKind.PAIRING_REDEEM_RESPONSE),
}


def classify_daemon_frame(frame: dict[str, object]) -> DaemonKind | None:
    """The kind of a valid daemon→clients frame, or ``None`` when it is no valid daemon frame (docs/protocol.md §4.2)."""
    frame_type = frame.get("type")
    if type(frame_type) is str:
        rule = _DAEMON_RULES.get(frame_type)
        if rule is not None and rule[0](frame):
            return rule[1]
    if _is_session_event(frame):
        return DaemonKind.SESSION_EVENT
    return None


def is_worker_request(frame: dict[str, object]) -> bool:
    """True for a valid worker transport request frame (docs/protocol.md §4.2, §4.8 step 3)."""
    if frame.get("type") != WORKER_REQUEST_TYPE or not is_non_empty_string(frame.get("requestId")):
        return False
    if frame.get("method") not in ("GET", "POST", "PATCH"):
        return False
    path = frame.get("path")
    if type(path) is not str or not path.startswith(WORKER_PATH_ROOT):
        return False
    if "headers" in frame and type(frame["headers"]) is not dict:
        return False
    return "body" not in frame or type(frame["body"]) is str


def classify_worker_frame(frame: dict[str, object]) -> WorkerKind | None:
    """The kind of a valid worker frame, or ``None``."""
    return WorkerKind.WORKER_REQUEST if is_worker_request(frame) else None


def frame_profile(frame: Mapping[str, object]) -> str | None:
    """The frame's ``profile`` when it is a known profile, else ``None``."""
    profile = frame.get("profile")
    return profile if profile in PROFILES else None


def client_profile_mismatch(claimed: str | None, frame: Mapping[str, object]) -> bool:
    """True when a client frame's known profile differs from the claimed ``e2eeProfile`` (docs/protocol.md §4.4 step 7)."""
    if not claimed:
        return False
    profile = frame_profile(frame)
    return profile is not None and profile != claimed


def daemon_profile_too_weak(claimed: str | None, frame: Mapping[str, object]) -> bool:
    """True when a daemon frame's profile is weaker than the claimed ``e2eeProfile`` (docs/protocol.md §4.5 step 4)."""
    required = PROFILE_STRENGTH.get(claimed) if claimed else None
    profile = frame_profile(frame)
    return required is not None and profile is not None and PROFILE_STRENGTH[profile] < required


class ScopeAction(enum.Enum):
    """What the relay does with a valid client frame given the client's scope."""

    ALLOW = "allow"
    CLOSE = "close"
    REPLY_SESSION_EVENTS_SCOPE_ONLY = "reply_session_events_scope_only"


@dataclass(frozen=True, slots=True)
class ScopeDecision:
    """The outcome of the scope rules (docs/protocol.md §4.3) for one frame."""

    action: ScopeAction
    close_code: int | None = None
    close_reason: str | None = None
    log_reason: str | None = None

    @property
    def allowed(self) -> bool:
        """True when the frame may continue down the pipeline."""
        return self.action is ScopeAction.ALLOW


SCOPE_RUNTIME = "runtime"
SCOPE_PAIRING = "pairing"
SCOPE_SESSION_EVENTS = "session-events"

SCOPE_ALLOWED = ScopeDecision(ScopeAction.ALLOW)
SCOPE_RUNTIME_ONLY = ScopeDecision(
    ScopeAction.CLOSE, 4008, "runtime scope only", "scope_mismatch_runtime_only"
)
SCOPE_PAIRING_ONLY = ScopeDecision(
    ScopeAction.CLOSE, 4008, "pairing scope only", "scope_mismatch_pairing_only"
)
SCOPE_SESSION_EVENTS_REQUIRED = ScopeDecision(
    ScopeAction.CLOSE,
    4008,
    "session-events scope required",
    "scope_mismatch_runtime_or_pairing_only",
)
SCOPE_SESSION_EVENTS_ONLY = ScopeDecision(
    ScopeAction.REPLY_SESSION_EVENTS_SCOPE_ONLY,
    log_reason="scope_mismatch_session_events_only",
)


def _scope_table(scope: str) -> dict[ClientKind, ScopeDecision]:
    table = {}
    for kind in ClientKind:
        if scope == SCOPE_SESSION_EVENTS:
            decision = SCOPE_ALLOWED if kind in SESSION_EVENT_KINDS else SCOPE_SESSION_EVENTS_ONLY
        elif kind in SESSION_EVENT_KINDS:
            decision = SCOPE_SESSION_EVENTS_REQUIRED
        elif scope == SCOPE_PAIRING:
            decision = SCOPE_ALLOWED if kind in PAIRING_KINDS else SCOPE_PAIRING_ONLY
        else:
            decision = SCOPE_RUNTIME_ONLY if kind in PAIRING_KINDS else SCOPE_ALLOWED
        table[kind] = decision
    return table


_SCOPE_TABLES = {scope: _scope_table(scope) for scope in (SCOPE_RUNTIME, SCOPE_PAIRING, SCOPE_SESSION_EVENTS)}


def client_scope_decision(scope: str, kind: ClientKind) -> ScopeDecision:
    """Apply the scope rules of docs/protocol.md §4.3 (§4.4 step 4); any scope other than pairing/session-events is runtime (§1, Client scopes)."""
    return _SCOPE_TABLES.get(scope, _SCOPE_TABLES[SCOPE_RUNTIME])[kind]


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_encode_ascii = json.JSONEncoder(separators=(",", ":")).encode


def _dumps(payload: Mapping[str, object]) -> str:
    text: str = _encode(payload)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate echoed from a peer: escape it, as JSON.stringify does.
            text = _encode_ascii(payload)
    return text


def _status(code: str, message: str, workspace_id: str) -> dict[str, object]:
    return {"type": "relay_status", "code": code, "message": message, "workspaceId": workspace_id}


def runtime_target_required(workspace_id: str) -> str:
    """The ``RUNTIME_TARGET_REQUIRED`` status frame."""
    payload = _status(
        "RUNTIME_TARGET_REQUIRED", "Runtime client must specify a runtime target", workspace_id
    )
    payload["retryable"] = False
    return _dumps(payload)


def daemon_unavailable(
    workspace_id: str, runtime_target_id: str | None = None, machine_id: str | None = None
) -> str:
    """The ``DAEMON_UNAVAILABLE`` status frame; empty optional ids are omitted."""
    payload = _status(
        "DAEMON_UNAVAILABLE", "No machine runtime is connected for this runtime target", workspace_id
    )
    payload["retryable"] = True
    if runtime_target_id:
        payload["runtimeTargetId"] = runtime_target_id
    if machine_id:
        payload["machineId"] = machine_id
    return _dumps(payload)


def relay_redirect(
    workspace_id: str, relay_ws_base_url: str, runtime_target_id: str | None = None
) -> str:
    """The ``RELAY_REDIRECT`` status frame; ``runtimeTargetId`` only on the per-frame path."""
    payload = _status(
        "RELAY_REDIRECT", "Workspace is assigned to a different relay instance", workspace_id
    )
    if runtime_target_id:
        payload["runtimeTargetId"] = runtime_target_id
    payload["relayWsBaseUrl"] = relay_ws_base_url
    return _dumps(payload)


def invalid_frame(workspace_id: str) -> str:
    """The ``INVALID_FRAME`` status frame."""
    return _dumps(
        _status(
            "INVALID_FRAME",
            "client frame must be a valid runtime or pairing control frame",
            workspace_id,
        )
    )


def session_events_scope_only(workspace_id: str) -> str:
    """The ``SESSION_EVENTS_SCOPE_ONLY`` status frame."""
    return _dumps(
        _status(
            "SESSION_EVENTS_SCOPE_ONLY",
            "session-events scoped clients can only subscribe to authorized session event channels",
            workspace_id,
        )
    )


def subscribed(channel: str, after_sequence: int | float = 0) -> str:
    """The subscribe acknowledgement; an integral float sequence is written as an integer, like JS."""
    return _dumps(
        {
            "type": "viewport.session_events.subscribed/v1",
            "channel": channel,
            "afterSequence": int(after_sequence),
            "authoritativeSource": "session_events",
            "websocketRequiredForBackfill": False,
        }
    )


def unsubscribed(channel: str) -> str:
    """The unsubscribe acknowledgement."""
    return _dumps({"type": "viewport.session_events.unsubscribed/v1", "channel": channel})


def _denied(frame_type: str, channel: str, workspace_id: str) -> str:
    return _dumps(
        {
            "type": frame_type,
            "channel": channel,
            "reason": "CHANNEL_NOT_AUTHORIZED",
            "workspaceId": workspace_id,
        }
    )


def subscribe_denied(channel: str, workspace_id: str) -> str:
    """The reply to a subscribe on a channel outside the claims."""
    return _denied("viewport.session_events.subscribe_denied/v1", channel, workspace_id)


def unsubscribe_denied(channel: str, workspace_id: str) -> str:
    """The reply to an unsubscribe on a channel outside the claims (docs/protocol.md §9, item 20)."""
    return _denied("viewport.session_events.unsubscribe_denied/v1", channel, workspace_id)


def viewer_presence_denied(channel: str, workspace_id: str) -> str:
    """The reply to viewer presence on a channel outside the claims."""
    return _denied("viewport.session_viewer_presence_denied/v1", channel, workspace_id)


def worker_response(request_id: str, status: int, headers: Mapping[str, str], body: str) -> str:
    """A worker transport response frame."""
    return _dumps(
        {
            "type": WORKER_RESPONSE_TYPE,
            "requestId": request_id,
            "status": status,
            "headers": dict(headers),
            "body": body,
        }
    )


_JSON_HEADERS = {"content-type": "application/json"}


def worker_path_denied(request_id: str) -> str:
    """The 403 response for a path outside the worker's managed executor (docs/protocol.md §4.8 step 4)."""
    body = '{"ok":false,"reason":"WORKER_TRANSPORT_PATH_DENIED"}'
    return worker_response(request_id, 403, _JSON_HEADERS, body)


def worker_forward_failed(request_id: str) -> str:
    """The 502 response when the upstream request fails (docs/protocol.md §4.8 step 6)."""
    body = '{"ok":false,"reason":"WORKER_TRANSPORT_FORWARD_FAILED"}'
    return worker_response(request_id, 502, _JSON_HEADERS, body)


def encode_uri_component(value: str) -> str:
    """JavaScript ``encodeURIComponent``."""
    return quote(value, safe="-_.!~*'()")


_ENCODED_SEPARATORS = ("%2f", "%5c", "%2e")


def worker_path_allowed(path: str, workspace_id: str, managed_executor_id: str | None) -> str | None:
    """The path to forward (fragment dropped) when it stays under the worker's executor, else ``None``."""
    if not managed_executor_id:
        return None
    cut = len(path)
    for mark in ("?", "#"):
        index = path.find(mark)
        if index != -1 and index < cut:
            cut = index
    path_part = path[:cut]
    # URL parsers drop tabs/newlines and map "\" to "/"; raw CR/LF would reach the request line.
    if not path.isascii() or not path.isprintable() or " " in path or "\\" in path_part:
        return None
    lowered = path_part.lower()
    if any(encoded in lowered for encoded in _ENCODED_SEPARATORS):
        return None
    segments = path_part.split("/")
    if segments[0] != "":
        return None
    for segment in segments[1:-1]:
        if segment in ("", ".", ".."):
            return None
    if segments[-1] in (".", ".."):
        return None
    prefix = (
        f"{WORKER_PATH_ROOT}{encode_uri_component(workspace_id)}"
        f"/managed-executors/{encode_uri_component(managed_executor_id)}"
    )
    if path_part != prefix and not path_part.startswith(prefix + "/"):
        return None
    fragment = path.find("#")
    return path if fragment == -1 else path[:fragment]


WORKER_FORWARD_HEADERS = frozenset(
    {
        "authorization",
        "accept",
        "content-type",
        "x-viewport-run-lease",
        "x-viewport-assignment-claim",
        "x-viewport-worker-fingerprint",
        "x-viewport-worker-timestamp",
        "x-viewport-worker-nonce",
        "x-viewport-worker-body-sha256",
        "x-viewport-worker-signature",
        "x-viewport-server-id",
    }
)
_DROPPED_RESPONSE_HEADERS = frozenset({"authorization", "set-cookie", "cookie"})


def _header_value_ok(value: str) -> bool:
    return "\r" not in value and "\n" not in value and "\0" not in value


def filter_worker_request_headers(headers: Mapping[str, object]) -> dict[str, str]:
    """Allow-listed request headers with string values, original spelling kept (docs/protocol.md §4.8 step 5)."""
    return {
        name: value
        for name, value in headers.items()
        if name.lower() in WORKER_FORWARD_HEADERS and type(value) is str and _header_value_ok(value)
    }


def filter_worker_response_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Upstream headers lower-cased, repeats joined by ``", "``, credentials removed (docs/protocol.md §4.8 step 6)."""
    result: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        if key in _DROPPED_RESPONSE_HEADERS:
            continue
        result[key] = f"{result[key]}, {value}" if key in result else value
    return result


def allowed_channels(session_channels: Sequence[object] | None) -> frozenset[str]:
    """The channels a session-events client may use: trimmed claims starting ``agent-session:`` (docs/protocol.md §4.7)."""
    if not session_channels:
        return frozenset()
    trimmed = (js_trim(channel) for channel in session_channels if type(channel) is str)
    return frozenset(channel for channel in trimmed if channel.startswith(CHANNEL_PREFIX))
