"""Pure decisions of the WebSocket upgrade: client IP, query, token source, subprotocol and refusals."""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Iterable, Literal, Mapping, Sequence, Union

from viewport.relay.limits import FixedWindowLimiter

#: The ``Server`` header of every response (upgrades and plain HTTP): no library names or versions.
SERVER_HEADER = "viewport-relay"

ROLES = frozenset({"workspace-daemon", "client", "worker"})
WS_PATH = "/ws"
MIN_TOKEN_LENGTH = 10
MAX_TOKEN_LENGTH = 4096

_MAPPED_PREFIX = "::ffff:"
_AUTH_PREFIX = "auth."
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_BEARER = re.compile(r"bearer\s+(.+)", re.IGNORECASE | re.DOTALL)

TokenSource = Literal["header", "subprotocol", "query"]
TokenRefusal = Literal["MISSING_AUTH_TOKEN", "QUERY_TOKEN_NOT_ALLOWED"]
_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def strip_mapped(ip: str) -> str:
    """Remove an IPv4-mapped IPv6 prefix (``::ffff:``) from an address."""
    if ip[:7].lower() == _MAPPED_PREFIX:
        return ip[7:]
    return ip


class TrustedProxies:
    """The IPs and CIDRs whose ``X-Forwarded-For`` header is believed; invalid entries are ignored."""

    def __init__(self, entries: Iterable[str]) -> None:
        networks: list[_Network] = []
        for raw in entries:
            entry = strip_mapped(raw.strip())
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                continue
        self._v4 = tuple(n for n in networks if n.version == 4)
        self._v6 = tuple(n for n in networks if n.version == 6)

    def __len__(self) -> int:
        """Return the number of valid entries."""
        return len(self._v4) + len(self._v6)

    def contains(self, ip: str) -> bool:
        """Say whether ``ip`` (IPv4-mapped or not) is a valid address inside one of the entries."""
        if not (self._v4 or self._v6):
            return False
        try:
            address = ipaddress.ip_address(strip_mapped(ip.strip()))
        except ValueError:
            return False
        if address.version == 4:
            return any(address in network for network in self._v4)
        return any(address in network for network in self._v6)


def client_ip(peer_host: str | None, forwarded_for: str | None, trusted: TrustedProxies) -> str:
    """Return the client's IP: the first ``X-Forwarded-For`` entry when the peer is trusted, else the peer."""
    if not peer_host:
        return "unknown"
    peer = strip_mapped(peer_host)
    if forwarded_for and trusted.contains(peer):
        first = strip_mapped(forwarded_for.split(",", 1)[0].strip())
        if first:
            return first
    return peer


@dataclass(frozen=True)
class UpgradeQuery:
    """The validated query of an upgrade request; ``token`` is raw (untrimmed) and may be empty."""

    role: str
    workspace_id: str
    runtime_target_id: str | None
    token: str | None


def _first(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    return values[0]


def is_valid_id(value: str) -> bool:
    """Say whether ``value`` is a valid workspace or runtime target id (1–128 of ``A–Z a–z 0–9 . _ : -``)."""
    return _ID.fullmatch(value) is not None


def parse_query(params: Mapping[str, Sequence[str]]) -> UpgradeQuery | None:
    """Validate ``parse_qs``-style upgrade parameters (first occurrence wins), or return None if invalid."""
    role = _first(params, "role")
    if role is None or role not in ROLES:
        return None
    workspace_id = _first(params, "workspaceId")
    if workspace_id is None or not is_valid_id(workspace_id):
        return None
    runtime_target_id = _first(params, "runtimeTargetId")
    if runtime_target_id is not None and not is_valid_id(runtime_target_id):
        return None
    return UpgradeQuery(role, workspace_id, runtime_target_id, _first(params, "token"))


@dataclass(frozen=True)
class TokenExtraction:
    """The token found for an upgrade and where it came from, or why there is none."""

    token: str | None
    source: TokenSource | None
    refusal: TokenRefusal | None


def _valid_token_length(token: str) -> bool:
    return MIN_TOKEN_LENGTH <= len(token) <= MAX_TOKEN_LENGTH


def _offered(websocket_protocol: str) -> list[str]:
    return [entry for entry in (part.strip() for part in websocket_protocol.split(",")) if entry]


def extract_token(
    authorization: str | None,
    websocket_protocol: str | None,
    query_token: str | None,
    relay_mode: str,
) -> TokenExtraction:
    """Take the token from a Bearer header, then an ``auth.`` subprotocol, then (dev mode only) the query."""
    if authorization:
        match = _BEARER.fullmatch(authorization.strip())
        if match is not None:
            token = match.group(1).strip()
            if _valid_token_length(token):
                return TokenExtraction(token, "header", None)
    if websocket_protocol:
        for entry in _offered(websocket_protocol):
            if entry.startswith(_AUTH_PREFIX):
                token = entry[len(_AUTH_PREFIX):]
                if _valid_token_length(token):
                    return TokenExtraction(token, "subprotocol", None)
    if query_token is None:
        return TokenExtraction(None, None, "MISSING_AUTH_TOKEN")
    token = query_token.strip()
    if not token:
        return TokenExtraction(None, None, "MISSING_AUTH_TOKEN")
    if relay_mode != "dev":
        return TokenExtraction(None, None, "QUERY_TOKEN_NOT_ALLOWED")
    if not _valid_token_length(token):
        return TokenExtraction(None, None, "MISSING_AUTH_TOKEN")
    return TokenExtraction(token, "query", None)


def select_subprotocol(offered: Sequence[str]) -> str | None:
    """
    The subprotocol to echo: the first offer that is not an ``auth.`` token carrier, else the first
    ``auth.`` offer itself.

    A browser fails the handshake when it offered subprotocols and none is echoed, so a browser that
    offers only ``auth.<token>`` gets its own offer back (as from the original relay); the token then
    travels back in the response header to the peer that sent it, and nowhere else.
    """
    first_auth: str | None = None
    for raw in offered:
        entry = raw.strip()
        if not entry:
            continue
        if not entry.startswith(_AUTH_PREFIX):
            return entry
        if first_auth is None:
            first_auth = entry
    return first_auth


class OriginPolicy:
    """
    Which browser origins may open a WebSocket (``RELAY_ALLOWED_ORIGINS``).

    Entries are ``*`` (any origin), ``null`` (pages without an origin, such as ``file://``), an
    exact origin ``scheme://host[:port]``, or ``scheme://*.domain`` for every subdomain of
    ``domain``. Comparison is case-insensitive; a default port is the same as none. A request
    without an ``Origin`` header is not a browser's and is always allowed.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.any = False
        self._exact: set[str] = set()
        self._suffixes: list[tuple[str, str]] = []
        for raw in entries:
            entry = raw.strip().lower().rstrip("/")
            if entry == "*":
                self.any = True
            elif "://*." in entry:
                scheme, _, domain = entry.partition("://*.")
                self._suffixes.append((scheme, "." + domain))
            elif entry:
                self._exact.add(normalize_origin(entry))

    def allows(self, origin: str | None) -> bool:
        """Whether a request with this ``Origin`` header value (None: no header) may upgrade."""
        if origin is None or self.any:
            return True
        value = normalize_origin(origin.strip().lower())
        if value in self._exact:
            return True
        scheme, _, host = value.partition("://")
        if not host or any(mark in host for mark in "/?#@\\ "):
            # An origin is scheme://host[:port]; anything more is not one a browser sends.
            return False
        host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return any(scheme == wanted and host.endswith(suffix) for wanted, suffix in self._suffixes)


_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def normalize_origin(origin: str) -> str:
    """``scheme://host[:port]`` lower-cased, without a trailing slash or the scheme's default port."""
    value = origin.strip().lower().rstrip("/")
    scheme, separator, host = value.partition("://")
    if not separator:
        return value
    default = _DEFAULT_PORTS.get(scheme)
    if default is not None and host.endswith(":" + default):
        host = host[: -len(default) - 1]
    return f"{scheme}://{host}"


class UpgradeRefusal(enum.Enum):
    """A refused upgrade: the HTTP status written (None = destroy the socket silently) and its counter."""

    status: int | None
    counter: str | None

    RATE_LIMITED = (429, "relay_upgrade_rate_limited_total")
    TOTAL_CONNECTIONS = (503, "relay_upgrade_rejected_total_connections_total")
    IP_CONNECTIONS = (429, "relay_upgrade_rejected_ip_connections_total")
    WRONG_PATH = (None, None)
    ORIGIN_NOT_ALLOWED = (403, "relay_upgrade_rejected_origin_total")
    INVALID_QUERY = (400, "relay_upgrade_invalid_query_total")
    MISSING_AUTH = (401, "relay_upgrade_missing_auth_total")
    WORKSPACE_CLIENTS = (429, "relay_upgrade_rejected_workspace_clients_total")
    ADMISSION_DENIED = (401, "relay_admission_denied_total")

    def __init__(self, status: int | None, counter: str | None) -> None:
        self.status = status
        self.counter = counter


@dataclass(frozen=True)
class UpgradeRefused:
    """The pre-handshake checks refused the upgrade; ``token_refusal`` details a MISSING_AUTH refusal."""

    refusal: UpgradeRefusal
    token_refusal: TokenRefusal | None = None


@dataclass(frozen=True)
class UpgradeAccepted:
    """The pre-handshake checks passed: the validated query and the token to admit."""

    query: UpgradeQuery
    token: str
    token_source: TokenSource


UpgradePrecheck = Union[UpgradeRefused, UpgradeAccepted]


def precheck_upgrade(
    *,
    path: str,
    params: Mapping[str, Sequence[str]],
    authorization: str | None,
    websocket_protocol: str | None,
    relay_mode: str,
    ip: str,
    now_ms: float,
    upgrade_limiter: FixedWindowLimiter,
    registered_connections: int,
    max_total_connections: int,
    ip_connections: int,
    max_connections_per_ip: int,
    origin: str | None = None,
    origin_policy: OriginPolicy | None = None,
) -> UpgradePrecheck:
    """
    Run the rate, capacity, path, origin, query and token checks in order; ``path`` excludes the
    query string, ``origin`` is the ``Origin`` header (None when absent).
    """
    if not upgrade_limiter.allow(ip, now_ms):
        return UpgradeRefused(UpgradeRefusal.RATE_LIMITED)
    if registered_connections >= max_total_connections:
        return UpgradeRefused(UpgradeRefusal.TOTAL_CONNECTIONS)
    if ip_connections >= max_connections_per_ip:
        return UpgradeRefused(UpgradeRefusal.IP_CONNECTIONS)
    if path != WS_PATH:
        return UpgradeRefused(UpgradeRefusal.WRONG_PATH)
    if origin_policy is not None and not origin_policy.allows(origin):
        return UpgradeRefused(UpgradeRefusal.ORIGIN_NOT_ALLOWED)
    query = parse_query(params)
    if query is None:
        return UpgradeRefused(UpgradeRefusal.INVALID_QUERY)
    found = extract_token(authorization, websocket_protocol, query.token, relay_mode)
    if found.token is None or found.source is None:
        return UpgradeRefused(UpgradeRefusal.MISSING_AUTH, found.refusal)
    return UpgradeAccepted(query, found.token, found.source)


def client_cap_exceeded(clients_in_scope: int, max_clients_per_workspace: int) -> bool:
    """Say whether a scope already holds the maximum number of clients (checked after admission)."""
    return clients_in_scope >= max_clients_per_workspace


def role_claim_matches(requested_role: str, claimed_role: str | None) -> bool:
    """Say whether a token's role claim, when present, equals the role requested in the query."""
    return claimed_role is None or claimed_role == requested_role


def bare_refusal_bytes(status: int) -> bytes:
    """Return a bare ``HTTP/1.1 <code> <reason>`` status line and empty header block."""
    return f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n\r\n".encode("ascii")
