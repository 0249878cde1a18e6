"""The relay-token claims schema, and local JWT minting and verification."""

from __future__ import annotations

import math
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal, Optional, Union

import jwt

__all__ = [
    "DEFAULT_AUDIENCE",
    "DEFAULT_ISSUER",
    "Claims",
    "LocalTokenVerifier",
    "TokenRejected",
    "load_or_create_secret",
    "mint_token",
    "validate_claims",
]

#: Issuer and audience a Viewport daemon expects by default (it verifies relay tokens itself).
DEFAULT_ISSUER = "viewport-server"
DEFAULT_AUDIENCE = "viewport-relay"

Algorithm = Literal["HS256", "EdDSA", "RS256"]
_SUPPORTED_ALGORITHMS = frozenset(("HS256", "EdDSA", "RS256"))

_ROLES = frozenset(("workspace-daemon", "client", "worker"))
_SCOPES = frozenset(("runtime", "pairing", "session-events"))
_E2EE_PROFILES = frozenset(("noise-ik", "noise-ikpsk2"))
_MAX_LIST_ENTRIES = 64
# JS `.` stops at line terminators, so a channel holding one does not match the original pattern.
_SESSION_CHANNEL = re.compile("agent-session:[^\n\r\u2028\u2029]+")


@dataclass(frozen=True)
class Claims:
    """The validated claims of one relay token; ``None`` means absent (or JSON null where allowed)."""

    workspace_id: Optional[str] = None
    runtime_target_id: Optional[str] = None
    role: Optional[str] = None
    scope: Optional[str] = None
    client_id: Optional[str] = None
    machine_id: Optional[str] = None
    e2ee_profile: Optional[str] = None
    daemon_issue_generation: Optional[int] = None
    session_channels: Optional[tuple[str, ...]] = None
    session_ids: Optional[tuple[str, ...]] = None
    managed_executor_id: Optional[str] = None
    user_id: Optional[str] = None
    install_id: Optional[str] = None
    policy_mode: Optional[str] = None
    daemon_public_key: Optional[str] = None
    pairing_secret: Optional[str] = None
    relay_ws_base_url: Optional[str] = None
    iss: Optional[str] = None
    jti: Optional[str] = None
    aud: Optional[Union[str, tuple[str, ...]]] = None
    iat: Optional[float] = None
    exp: Optional[float] = None
    nbf: Optional[float] = None
    ver: Optional[int] = None

    def to_json(self) -> dict[str, object]:
        """The claims as a JSON-ready dict with the wire (camelCase) keys; absent claims are omitted."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[_CAMEL[f.name]] = list(value) if isinstance(value, tuple) else value
        return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


_CAMEL = {f.name: _camel(f.name) for f in fields(Claims)}
_SNAKE = {camel: snake for snake, camel in _CAMEL.items()}


class _Invalid(Exception):
    """One claim failed the schema; ``args[0]`` names it."""


def _utf16_length(text: str) -> int:
    # Lengths are counted in UTF-16 code units, like the original (JavaScript) schema.
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _string(low: int, high: int, *, nullable: bool = False, trim: bool = False) -> Callable[[str, object], object]:
    def check(key: str, value: object) -> object:
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            raise _Invalid(key)
        if trim:
            value = value.strip()
        if not low <= _utf16_length(value) <= high:
            raise _Invalid(key)
        return value

    return check


def _enum(allowed: frozenset[str]) -> Callable[[str, object], object]:
    def check(key: str, value: object) -> object:
        if not isinstance(value, str) or value not in allowed:
            raise _Invalid(key)
        return value

    return check


def as_json_integer(value: object) -> Optional[int]:
    """A JSON integer the way JavaScript sees one: a number (not a bool) without a fraction."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _integer(minimum: Optional[int] = None) -> Callable[[str, object], object]:
    def check(key: str, value: object) -> object:
        number = as_json_integer(value)
        if number is None or (minimum is not None and number < minimum):
            raise _Invalid(key)
        return number

    return check


def _string_list(entry: Callable[[str, object], object]) -> Callable[[str, object], object]:
    def check(key: str, value: object) -> object:
        if not isinstance(value, list) or len(value) > _MAX_LIST_ENTRIES:
            raise _Invalid(key)
        return tuple(entry(key, item) for item in value)

    return check


def _session_channel(key: str, value: object) -> object:
    if not isinstance(value, str) or _utf16_length(value) > 255 or not _SESSION_CHANNEL.fullmatch(value):
        raise _Invalid(key)
    return value


_AUD_ENTRY = _string(1, 255)


def _audience(key: str, value: object) -> object:
    if isinstance(value, list):
        return tuple(_AUD_ENTRY(key, item) for item in value)
    return _AUD_ENTRY(key, value)


_SCHEMA: dict[str, Callable[[str, object], object]] = {
    "workspaceId": _string(1, 128),
    "runtimeTargetId": _string(1, 128),
    "role": _enum(_ROLES),
    "scope": _enum(_SCOPES),
    "clientId": _string(1, 128),
    "machineId": _string(1, 255, trim=True),
    "e2eeProfile": _enum(_E2EE_PROFILES),
    "daemonIssueGeneration": _integer(minimum=0),
    "sessionChannels": _string_list(_session_channel),
    "sessionIds": _string_list(_string(1, 128)),
    "managedExecutorId": _string(1, 128),
    "userId": _string(1, 128),
    "installId": _string(1, 128),
    "policyMode": _string(1, 128),
    "daemonPublicKey": _string(1, 512, nullable=True),
    "pairingSecret": _string(1, 1024, nullable=True),
    "relayWsBaseUrl": _string(1, 512, nullable=True),
    "iss": _string(1, 255),
    "jti": _string(1, 255),
    "aud": _audience,
    "iat": _integer(),
    "exp": _integer(),
    "nbf": _integer(),
    "ver": _integer(),
}
assert set(_SCHEMA) == set(_SNAKE), "schema and Claims fields must list the same claims"


def _parse_claims(obj: object) -> Claims:
    """Validate ``obj`` strictly against the claims schema; raises ``_Invalid(key)``."""
    if not isinstance(obj, dict):
        raise _Invalid("<claims>")
    values: dict[str, object] = {}
    for key, raw in obj.items():
        check = _SCHEMA.get(key) if isinstance(key, str) else None
        if check is None:
            raise _Invalid(repr(key))
        values[_SNAKE[key]] = check(key, raw)
    return Claims(**values)  # type: ignore[arg-type]


def _registered_string(key: str, value: object) -> object:
    if not isinstance(value, str):
        raise _Invalid(key)
    return value


def _registered_audience(key: str, value: object) -> object:
    if isinstance(value, list):
        return tuple(_registered_string(key, item) for item in value)
    return _registered_string(key, value)


#: NumericDates beyond this (about the year 33658) are not dates; an integer too big for a float
#: would otherwise fail the time checks with an OverflowError.
_MAX_NUMERIC_DATE = 10**15


def _numeric_date(key: str, value: object) -> object:
    # RFC 7519 §2: seconds since the epoch, "non-integer values can be represented".
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(key)
    if isinstance(value, float) and not math.isfinite(value):
        raise _Invalid(key)
    if abs(value) > _MAX_NUMERIC_DATE:
        raise _Invalid(key)
    return value


#: The registered claims of RFC 7519 §4.1, with the types the RFC gives them. Identity providers put
#: them in tokens as they see fit (``sub`` above all), so local tokens accept them all; ``sub`` is
#: checked for its type and not kept.
_REGISTERED_CLAIMS: dict[str, Callable[[str, object], object]] = {
    "iss": _registered_string,
    "sub": _registered_string,
    "aud": _registered_audience,
    "exp": _numeric_date,
    "nbf": _numeric_date,
    "iat": _numeric_date,
    "jti": _registered_string,
}


def _parse_local_claims(obj: object) -> Claims:
    """
    The payload of a locally verified token: RFC 7519's registered claims with the RFC's types,
    every other key against the strict relay schema. Raises ``_Invalid(key)``.
    """
    if not isinstance(obj, dict):
        raise _Invalid("<claims>")
    registered: dict[str, object] = {}
    contract: dict[object, object] = {}
    for key, raw in obj.items():
        check = _REGISTERED_CLAIMS.get(key) if isinstance(key, str) else None
        if check is None:
            contract[key] = raw
        else:
            registered[key] = check(key, raw)
    registered.pop("sub", None)
    return replace(_parse_claims(contract), **registered)  # type: ignore[arg-type]


def validate_claims(obj: object) -> Optional[Claims]:
    """
    Check a decoded JSON value against the strict relay claims schema.

    Returns the typed claims, or None when ``obj`` is not an object, holds an unknown key, or any
    value has the wrong type, length or enum value.
    """
    try:
        return _parse_claims(obj)
    except _Invalid:
        return None


class TokenRejected(Exception):
    """A locally verified token was refused; ``reason`` is a short constant code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def mint_token(
    *,
    key: Union[str, bytes],
    algorithm: Algorithm,
    claims: Mapping[str, object],
    ttl_seconds: int,
    now: float,
    issuer: Optional[str] = None,
    audience: Optional[str] = None,
    key_id: Optional[str] = None,
) -> str:
    """
    Sign a relay token holding ``claims`` (camelCase keys of the schema).

    ``iat`` (``now``, whole seconds), ``exp`` (``iat + ttl_seconds``) and a random ``jti`` are
    added, as are ``iss``/``aud`` when given; these replace same-named entries of ``claims``.
    ``key`` is the HS256 secret or a PEM private key; ``key_id`` becomes the ``kid`` header.
    Raises ValueError when the resulting claims do not match the schema.
    """
    if algorithm not in _SUPPORTED_ALGORITHMS:
        raise ValueError(f"unsupported token algorithm {algorithm!r}")
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")
    payload: dict[str, object] = dict(claims)
    issued_at = int(now)
    payload["iat"] = issued_at
    payload["exp"] = issued_at + ttl_seconds
    payload["jti"] = secrets.token_hex(16)
    if issuer is not None:
        payload["iss"] = issuer
    if audience is not None:
        payload["aud"] = audience
    try:
        _parse_claims(payload)
    except _Invalid as invalid:
        raise ValueError(f"claim {invalid.args[0]} does not match the relay claims schema") from None
    headers = {"kid": key_id} if key_id is not None else None
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


class LocalTokenVerifier:
    """Verify relay tokens signed with a locally held key (HS256 secret or EdDSA/RS256 public key)."""

    def __init__(
        self,
        key: Union[str, bytes],
        algorithms: Sequence[str],
        issuer: Optional[str] = None,
        audience: Optional[str] = None,
        leeway_seconds: int = 30,
    ) -> None:
        """``issuer``/``audience`` are checked only when given; ``leeway_seconds`` absorbs clock skew."""
        chosen = tuple(algorithms)
        if not chosen:
            raise ValueError("at least one token algorithm is required")
        unknown = [name for name in chosen if name not in _SUPPORTED_ALGORITHMS]
        if unknown:
            raise ValueError(f"unsupported token algorithms: {', '.join(unknown)}")
        if leeway_seconds < 0:
            raise ValueError("leeway_seconds must not be negative")
        self._key = key
        self._algorithms = list(chosen)
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds

    def verify(self, token: str, now: float) -> Claims:
        """Return the token's claims if it is valid at ``now`` (epoch seconds); else raise TokenRejected."""
        try:
            # Time, issuer and audience checks are ours (against the explicit ``now``).
            payload = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_iss": False,
                    "verify_aud": False,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise TokenRejected("INVALID_SIGNATURE") from None
        except jwt.InvalidAlgorithmError:
            raise TokenRejected("INVALID_ALGORITHM") from None
        except jwt.DecodeError:
            raise TokenRejected("MALFORMED_TOKEN") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise TokenRejected("INVALID_TOKEN") from None
        try:
            claims = _parse_local_claims(payload)
        except _Invalid:
            raise TokenRejected("INVALID_CLAIMS") from None
        if claims.exp is None:
            raise TokenRejected("TOKEN_EXP_REQUIRED")
        if claims.exp <= now - self._leeway:
            raise TokenRejected("TOKEN_EXPIRED")
        if claims.nbf is not None and claims.nbf > now + self._leeway:
            raise TokenRejected("TOKEN_NOT_YET_VALID")
        if claims.iat is not None and claims.iat > now + self._leeway:
            raise TokenRejected("TOKEN_ISSUED_IN_FUTURE")
        if self._issuer is not None and claims.iss != self._issuer:
            raise TokenRejected("INVALID_ISSUER")
        if self._audience is not None and not _audience_matches(claims.aud, self._audience):
            raise TokenRejected("INVALID_AUDIENCE")
        return claims


def _audience_matches(aud: Optional[Union[str, tuple[str, ...]]], expected: str) -> bool:
    if isinstance(aud, tuple):
        return expected in aud
    return aud == expected


def load_or_create_secret(path: str) -> tuple[str, bool]:
    """
    Return ``(secret, created)``: the HS256 secret stored at ``path``, creating it first if missing.

    A new secret is 64 hex characters, written with mode 0600 (parent directories are created)
    and published atomically, so a concurrent reader never sees a partial file.
    Raises ValueError when an existing file is empty.
    """
    try:
        return _read_secret(path), False
    except FileNotFoundError:
        pass
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    secret = secrets.token_hex(32)
    temporary = os.path.join(parent, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secret + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            # link() refuses to replace an existing file, unlike rename(): whoever links first wins.
            os.link(temporary, path)
        except FileExistsError:
            return _read_secret(path), False
    finally:
        os.unlink(temporary)
    return secret, True


def _read_secret(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        secret = handle.read().strip()
    if not secret:
        raise ValueError(f"token secret file {path} is empty; delete it to have a new secret generated")
    return secret
