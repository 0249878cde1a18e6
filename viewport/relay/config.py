"""The relay's configuration: the environment (and twistd options) parsed once into a frozen RelayConfig."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import secrets
import socket
from dataclasses import dataclass, fields
from typing import Callable, Literal, Mapping, NamedTuple, TypeVar
from urllib.parse import SplitResult, urlsplit, urlunsplit

from viewport.environment import ConfigError, is_loopback_host, looks_local
from viewport.relay.backplane.redis_url import parse_redis_url

RelayMode = Literal["dev", "staging", "prod"]
BackplaneMode = Literal["single", "server", "redis"]
Admission = Literal["platform", "local_secret", "local_public_key", "embedded_secret_file"]
TriState = Literal["auto", "0", "1"]
TlsTermination = Literal["self", "platform"]
ServerAuthMode = Literal["mtls", "private_network_shared_secret"]

_RELAY_MODES: tuple[RelayMode, ...] = ("dev", "staging", "prod")
_BACKPLANE_MODES: tuple[BackplaneMode, ...] = ("single", "server", "redis")
_TRI_STATES: tuple[TriState, ...] = ("auto", "0", "1")
_TLS_TERMINATIONS: tuple[TlsTermination, ...] = ("self", "platform")
_SERVER_AUTH_MODES: tuple[ServerAuthMode, ...] = ("mtls", "private_network_shared_secret")
_BOOLISH = {"0": False, "1": True, "false": False, "true": True, "no": False, "yes": True, "off": False, "on": True}

DEFAULT_SERVER_URL = "https://api.getviewport.com"
DEFAULT_TLS_HOST = "relay.getviewport.com"
DEFAULT_PORT = 7781
_PLACEHOLDER_WORDS = ("change-me", "placeholder", "example")
_MIN_INTERNAL_KEY_LENGTH = 24
_MIN_TOKEN_SECRET_LENGTH = 32
_MASK = "***"

_INT_KNOBS: dict[str, tuple[str, int]] = {
    "http.max_logs": ("MAX_LOGS", 400),
    "admission.timeout_ms": ("RELAY_ADMISSION_TIMEOUT_MS", 2000),
    "admission.max_response_bytes": ("RELAY_ADMISSION_MAX_RESPONSE_BYTES", 262144),
    "platform.timeout_ms": ("RELAY_INTERNAL_API_TIMEOUT_MS", 2000),
    "platform.max_response_bytes": ("RELAY_INTERNAL_API_MAX_RESPONSE_BYTES", 262144),
    "limits.max_total_connections": ("RELAY_MAX_TOTAL_CONNECTIONS", 2000),
    "limits.max_connections_per_ip": ("RELAY_MAX_CONNECTIONS_PER_IP", 50),
    "limits.max_clients_per_workspace": ("RELAY_MAX_CLIENTS_PER_WORKSPACE", 100),
    "limits.max_frame_bytes": ("RELAY_MAX_FRAME_BYTES", 1048576),
    "limits.max_pending_bytes": ("RELAY_MAX_PENDING_BYTES", 4194304),
    "limits.upgrade_rate_per_minute": ("RELAY_UPGRADE_RATE_PER_MINUTE", 120),
    "limits.upgrade_bucket_max": ("RELAY_UPGRADE_BUCKET_MAX", 50000),
    "limits.kex_init_rate_per_minute": ("RELAY_KEX_INIT_RATE_PER_MINUTE", 60),
    "limits.kex_rate_limiter_max_keys": ("RELAY_KEX_RATE_LIMITER_MAX_KEYS", 20000),
    "limits.runtime_rate_per_minute": ("RELAY_RUNTIME_RATE_PER_MINUTE", 240),
    "limits.runtime_rate_per_minute_workspace": ("RELAY_RUNTIME_RATE_PER_MINUTE_WORKSPACE", 1200),
    "limits.runtime_rate_limiter_max_keys": ("RELAY_RUNTIME_RATE_LIMITER_MAX_KEYS", 20000),
    "limits.runtime_workspace_rate_limiter_max_keys": ("RELAY_RUNTIME_WORKSPACE_RATE_LIMITER_MAX_KEYS", 10000),
    "limits.daemon_runtime_rate_per_minute": ("RELAY_DAEMON_RUNTIME_RATE_PER_MINUTE", 2400),
    "limits.daemon_rate_limiter_max_keys": ("RELAY_DAEMON_RATE_LIMITER_MAX_KEYS", 10000),
    "limits.pairing_rate_per_minute": ("RELAY_PAIRING_RATE_PER_MINUTE", 30),
    "limits.pairing_rate_limiter_max_keys": ("RELAY_PAIRING_RATE_LIMITER_MAX_KEYS", 20000),
    "limits.pairing_request_track_max": ("RELAY_PAIRING_REQUEST_TRACK_MAX", 2048),
    "limits.session_owner_track_max": ("RELAY_SESSION_OWNER_TRACK_MAX", 4096),
    "heartbeat.ping_interval_ms": ("RELAY_PING_INTERVAL_MS", 30000),
    "heartbeat.pong_timeout_ms": ("RELAY_PONG_TIMEOUT_MS", 10000),
    "heartbeat.idle_timeout_ms": ("RELAY_IDLE_TIMEOUT_MS", 300000),
    "heartbeat.empty_workspace_ttl_ms": ("RELAY_EMPTY_WORKSPACE_TTL_MS", 120000),
    "heartbeat.cleanup_interval_ms": ("RELAY_CLEANUP_INTERVAL_MS", 30000),
    "heartbeat.shutdown_grace_ms": ("RELAY_SHUTDOWN_GRACE_MS", 10000),
    "backplane.redis_connect_timeout_ms": ("RELAY_REDIS_CONNECT_TIMEOUT_MS", 5000),
    "backplane.redis_presence_ttl_ms": ("RELAY_REDIS_PRESENCE_TTL_MS", 45000),
    "backplane.presence_sync_interval_ms": ("RELAY_PRESENCE_SYNC_INTERVAL_MS", 20000),
    "backplane.presence_resolve_cache_max": ("RELAY_PRESENCE_RESOLVE_CACHE_MAX", 10000),
    "backplane.bus_pull_limit": ("RELAY_BUS_PULL_LIMIT", 200),
    "backplane.bus_pull_wait_ms": ("RELAY_BUS_PULL_WAIT_MS", 1000),
    "backplane.bus_signature_max_skew_ms": ("RELAY_BUS_SIGNATURE_MAX_SKEW_MS", 15000),
    "backplane.bus_freshness_track_max": ("RELAY_BUS_FRESHNESS_TRACK_MAX", 20000),
    "backplane.liveness_ttl_ms": ("RELAY_LIVENESS_TTL_MS", 2000),
    "backplane.bus_queue_max_bytes": ("RELAY_BUS_QUEUE_MAX_BYTES", 4 * 1024 * 1024),
    "backplane.bus_queue_max_age_ms": ("RELAY_BUS_QUEUE_MAX_AGE_MS", 2000),
    "backplane.bus_publish_batch_max": ("RELAY_BUS_PUBLISH_BATCH_MAX", 200),
}

#: Variables of the reference relay that mean nothing here: accepted (checked as integers), with a warning.
_INERT_KNOBS: dict[str, str] = {
    "RELAY_REDIS_QUEUE_MAX": "redis mode is pub/sub, with no per-relay queues to cap",
    "RELAY_BUS_POLL_INTERVAL_MS": "server mode long-polls the bus (RELAY_BUS_PULL_WAIT_MS) instead of polling at an interval",
}

_T = TypeVar("_T", bound=str)


@dataclass(frozen=True, kw_only=True)
class ListenConfig:
    """Where the relay listens and whom it believes about client addresses and origins."""

    host: str
    port: int
    trusted_proxies: tuple[str, ...]
    allowed_origins: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """The relay's own TLS: whether it serves it, with which files, or whether a proxy terminates it."""

    mode: TriState
    enabled: bool
    termination: TlsTermination
    host: str
    cert_dir: str
    cert_path: str
    key_path: str


@dataclass(frozen=True, kw_only=True)
class HttpConfig:
    """The plain HTTP routes: the admin gate and how much ``/health``, ``/state`` and ``/logs`` show."""

    admin_token_sha256: str | None
    enable_admin: bool
    health_verbose: bool
    state_include_client_ids: bool
    max_logs: int


@dataclass(frozen=True, kw_only=True)
class AdmissionConfig:
    """How upgrades are admitted: the platform's validate call or locally verified tokens."""

    mode: Admission
    timeout_ms: int
    max_response_bytes: int
    token_secret: str | None
    token_public_key_path: str | None
    token_secret_file: str
    token_issuer: str | None
    token_audience: str | None


@dataclass(frozen=True, kw_only=True)
class PlatformConfig:
    """The Viewport platform's HTTP API (admission, worker transport, the server backplane) and how to reach it."""

    url: str
    url_explicit: bool
    internal_key: str | None
    timeout_ms: int
    max_response_bytes: int
    tls_verify_mode: TriState
    tls_verify: bool
    auth_mode: ServerAuthMode
    ca_cert_path: str | None
    mtls_enabled: bool
    client_cert_path: str | None
    client_key_path: str | None
    client_key_passphrase: str | None


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    """Connection caps, frame and buffer sizes, rate limiters and ownership table sizes."""

    max_total_connections: int
    max_connections_per_ip: int
    max_clients_per_workspace: int
    max_frame_bytes: int
    max_pending_bytes: int
    upgrade_rate_per_minute: int
    upgrade_bucket_max: int
    kex_init_rate_per_minute: int
    kex_rate_limiter_max_keys: int
    runtime_rate_per_minute: int
    runtime_rate_per_minute_workspace: int
    runtime_rate_limiter_max_keys: int
    runtime_workspace_rate_limiter_max_keys: int
    daemon_runtime_rate_per_minute: int
    daemon_rate_limiter_max_keys: int
    pairing_rate_per_minute: int
    pairing_rate_limiter_max_keys: int
    pairing_request_track_max: int
    session_owner_track_max: int


@dataclass(frozen=True, kw_only=True)
class HeartbeatConfig:
    """Pings, timeouts, the periodic cleanup and the shutdown grace."""

    ping_interval_ms: int
    pong_timeout_ms: int
    idle_timeout_ms: int
    empty_workspace_ttl_ms: int
    cleanup_interval_ms: int
    shutdown_grace_ms: int


@dataclass(frozen=True, kw_only=True)
class BackplaneConfig:
    """How this relay reaches other relays: the mode, its URL, presence, the bus and client redirect."""

    mode: BackplaneMode
    public_ws_base_url: str
    redis_url: str | None
    redis_key_prefix: str
    redis_connect_timeout_ms: int
    redis_presence_ttl_ms: int
    presence_sync_enabled: bool
    presence_sync_interval_ms: int
    presence_resolve_cache_max: int
    bus_enabled: bool
    bus_hmac_key: str | None
    bus_pull_limit: int
    bus_pull_wait_ms: int
    bus_signature_max_skew_ms: int
    bus_freshness_track_max: int
    liveness_ttl_ms: int
    bus_queue_max_bytes: int
    bus_queue_max_age_ms: int
    bus_publish_batch_max: int
    client_redirect_enabled: bool
    redirect_allowed_hosts: tuple[str, ...]


#: The sections of a RelayConfig, by attribute name.
SECTIONS: dict[str, type] = {
    "listen": ListenConfig,
    "tls": TlsConfig,
    "http": HttpConfig,
    "admission": AdmissionConfig,
    "platform": PlatformConfig,
    "limits": LimitsConfig,
    "heartbeat": HeartbeatConfig,
    "backplane": BackplaneConfig,
}


@dataclass(frozen=True, kw_only=True, repr=False)
class RelayConfig:
    """
    Every setting of one relay process, typed, checked and derived once at startup, in sections, so
    that each part of the relay is built from the section it needs (``build_backplane(config.backplane)``).
    """

    relay_id: str
    relay_mode: RelayMode
    listen: ListenConfig
    tls: TlsConfig
    http: HttpConfig
    admission: AdmissionConfig
    platform: PlatformConfig
    limits: LimitsConfig
    heartbeat: HeartbeatConfig
    backplane: BackplaneConfig
    warnings: tuple[str, ...] = ()

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in masked(self).items())
        return f"RelayConfig({shown})"


_SECRET_FIELDS = frozenset(
    {
        "http.admin_token_sha256", "platform.internal_key", "backplane.bus_hmac_key", "admission.token_secret",
        "platform.client_key_passphrase",
    }
)
_URL_FIELDS = frozenset({"platform.url", "backplane.redis_url", "backplane.public_ws_base_url"})


def masked(config: RelayConfig) -> dict[str, object]:
    """
    The effective configuration as a flat JSON-able dict keyed ``section.field`` (``relay_id``,
    ``relay_mode`` and ``warnings`` unprefixed), with secrets and URL credentials replaced by ``***``.
    """
    result: dict[str, object] = {}
    for field in fields(config):
        value = getattr(config, field.name)
        if field.name in SECTIONS:
            for inner in fields(value):
                result[f"{field.name}.{inner.name}"] = _shown(f"{field.name}.{inner.name}", getattr(value, inner.name))
        else:
            result[field.name] = _shown(field.name, value)
    return result


def _shown(name: str, value: object) -> object:
    if value is not None and name in _SECRET_FIELDS:
        return _MASK
    if isinstance(value, str) and name in _URL_FIELDS:
        return _mask_url(value)
    if isinstance(value, tuple):
        return list(value)
    return value


#: The environment variable behind each configuration field that has one (the rest are derived).
VARIABLE_OF: dict[str, str] = {
    "listen.host": "HOST",
    "listen.port": "PORT",
    "listen.trusted_proxies": "RELAY_TRUSTED_PROXIES",
    "listen.allowed_origins": "RELAY_ALLOWED_ORIGINS",
    "tls.mode": "RELAY_TLS",
    "tls.termination": "RELAY_TLS_TERMINATION",
    "tls.host": "RELAY_TLS_HOST",
    "tls.cert_dir": "RELAY_TLS_CERT_DIR",
    "tls.cert_path": "RELAY_TLS_CERT_PATH",
    "tls.key_path": "RELAY_TLS_KEY_PATH",
    "http.admin_token_sha256": "RELAY_ADMIN_TOKEN",
    "http.enable_admin": "RELAY_ENABLE_ADMIN_HTTP",
    "http.health_verbose": "RELAY_HEALTH_VERBOSE",
    "http.state_include_client_ids": "RELAY_STATE_INCLUDE_CLIENT_IDS",
    "admission.token_secret": "RELAY_TOKEN_SECRET",
    "admission.token_public_key_path": "RELAY_TOKEN_PUBLIC_KEY",
    "admission.token_secret_file": "RELAY_TOKEN_SECRET_FILE",
    "admission.token_issuer": "RELAY_TOKEN_ISSUER",
    "admission.token_audience": "RELAY_TOKEN_AUDIENCE",
    "platform.url": "SERVER_URL",
    "platform.internal_key": "RELAY_INTERNAL_KEY",
    "platform.tls_verify_mode": "RELAY_SERVER_TLS_VERIFY",
    "platform.auth_mode": "RELAY_SERVER_AUTH_MODE",
    "platform.ca_cert_path": "RELAY_SERVER_CA_CERT_PATH",
    "platform.mtls_enabled": "RELAY_SERVER_MTLS",
    "platform.client_cert_path": "RELAY_SERVER_CLIENT_CERT_PATH",
    "platform.client_key_path": "RELAY_SERVER_CLIENT_KEY_PATH",
    "platform.client_key_passphrase": "RELAY_SERVER_CLIENT_KEY_PASSPHRASE",
    "relay_id": "RELAY_ID",
    "relay_mode": "RELAY_MODE",
    "backplane.public_ws_base_url": "RELAY_PUBLIC_WS_BASE_URL",
    "backplane.mode": "RELAY_BACKPLANE_MODE",
    "backplane.redis_url": "RELAY_BACKPLANE_URL",
    "backplane.redis_key_prefix": "RELAY_REDIS_KEY_PREFIX",
    "backplane.presence_sync_enabled": "RELAY_PRESENCE_SYNC_ENABLED",
    "backplane.bus_enabled": "RELAY_BUS_ENABLED",
    "backplane.bus_hmac_key": "RELAY_BUS_HMAC_KEY",
    "backplane.client_redirect_enabled": "RELAY_CLIENT_REDIRECT_ENABLED",
    "backplane.redirect_allowed_hosts": "RELAY_REDIRECT_ALLOWED_HOSTS",
    **{field: variable for field, (variable, _) in _INT_KNOBS.items()},
}


def by_variable(config: RelayConfig) -> dict[str, object]:
    """
    The effective configuration as an operator reads it: ``settings`` keyed by environment variable
    (defaults filled in, secrets and URL credentials masked), ``derived`` for what the relay worked
    out from them (admission mode, whether TLS is on, ...), and the startup ``warnings``.
    """
    values = masked(config)
    warnings = values.pop("warnings", [])
    settings = {VARIABLE_OF[name]: value for name, value in values.items() if name in VARIABLE_OF}
    derived = {name: value for name, value in values.items() if name not in VARIABLE_OF}
    return {"settings": dict(sorted(settings.items())), "derived": derived, "warnings": warnings}


def _mask_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return _MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = _MASK + "@" + netloc.rpartition("@")[2]
    query = "&".join(
        pair.partition("=")[0] + ("=" + _MASK if "=" in pair else "") for pair in parts.query.split("&") if pair
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _invalid(name: str, value: str, accepted: str) -> ConfigError:
    return ConfigError(name, f"invalid value {value!r}; accepted: {accepted}")


class _Env:
    """Typed, strict readers over the environment mapping."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str, *, trim: bool = True) -> str | None:
        value = self._environ.get(name)
        if value is None or not value.strip():
            return None
        return value.strip() if trim else value

    def choice(self, name: str, accepted: tuple[_T, ...], *, lower: bool = False) -> _T | None:
        value = self._environ.get(name)
        if value is None:
            return None
        wanted = value.lower() if lower else value
        for option in accepted:
            if wanted == option:
                return option
        raise _invalid(name, value, ", ".join(accepted))

    def boolish(self, name: str) -> bool | None:
        value = self._environ.get(name)
        if value is None:
            return None
        if value not in _BOOLISH:
            raise _invalid(name, value, " ".join(_BOOLISH))
        return _BOOLISH[value]

    def positive_int(self, name: str, default: int) -> int:
        value = self._environ.get(name)
        if value is None or not value.strip():
            return default
        return _parse_int(name, value, minimum=1, maximum=None)

    def csv(self, name: str) -> tuple[str, ...]:
        value = self._environ.get(name) or ""
        return tuple(entry.strip() for entry in value.split(",") if entry.strip())


def _parse_int(name: str, value: str, *, minimum: int, maximum: int | None) -> int:
    text = value.strip()
    number = int(text) if re.fullmatch(r"[0-9]+", text) else None
    if number is None or number < minimum or (maximum is not None and number > maximum):
        bounds = f"{minimum}..{maximum}" if maximum is not None else f"an integer >= {minimum}"
        raise _invalid(name, value, f"decimal digits, {bounds}")
    return number


def _listen_address(env: _Env, overrides: Mapping[str, object]) -> tuple[str, int]:
    host = env.text("HOST") or "127.0.0.1"
    port_text = env.text("PORT")
    port = _parse_int("PORT", port_text, minimum=0, maximum=65535) if port_text else DEFAULT_PORT
    host_override = overrides.get("host")
    if host_override is not None:
        if not isinstance(host_override, str) or not host_override.strip():
            raise ConfigError("--host", f"invalid value {host_override!r}; accepted: a host name or address")
        host = host_override.strip()
    port_override = overrides.get("port")
    if port_override is not None:
        if isinstance(port_override, bool) or not isinstance(port_override, (int, str)):
            raise ConfigError("--port", f"invalid value {port_override!r}; accepted: an integer 0..65535")
        port = _parse_int("--port", str(port_override), minimum=0, maximum=65535)
    return host, port


def _split_url(name: str, value: str, schemes: frozenset[str], *, need_host: bool) -> SplitResult:
    accepted = "a URL with scheme " + " or ".join(sorted(schemes)) + (" and a host" if need_host else "")
    try:
        parts = urlsplit(value)
        parts.port
    except ValueError:
        raise _invalid(name, _mask_url(value), accepted) from None
    if parts.scheme.lower() not in schemes or (need_host and not parts.hostname):
        raise _invalid(name, _mask_url(value), accepted)
    return parts


def _platform_url(name: str, value: str) -> str:
    parts = _split_url(name, value, frozenset({"http", "https"}), need_host=True)
    return f"{parts.scheme.lower()}://{parts.netloc}"


def _redis_url(name: str, value: str) -> str:
    accepted = (
        "redis://host[:port][/db], rediss://..., redis+sentinel://host[:port][,host:port]/service, unix:///path,"
        " redis+cluster://host[:port][,host:port] (rediss+cluster:// with TLS)"
    )
    try:
        parse_redis_url(value)
    except ValueError as error:
        raise ConfigError(name, f"invalid value {_mask_url(value)!r} ({error}); accepted: {accepted}") from None
    return value


_ORIGIN_ENTRY = re.compile(r"\*|null|[a-z][a-z0-9+.-]*://(\*\.)?[^/\s*]+")


def _origin(name: str, entry: str) -> str:
    if not _ORIGIN_ENTRY.fullmatch(entry.lower().rstrip("/")):
        raise _invalid(name, entry, "comma-separated origins (https://app.example.com, https://*.example.com), null, or *")
    return entry


def _proxy(name: str, entry: str) -> str:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        raise _invalid(name, entry, "comma-separated IP addresses or CIDR ranges") from None
    return entry


def _check_file(name: str, path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(name, f"{what} file not found: {path!r}; accepted: the path of an existing file")


def _is_placeholder(key: str) -> bool:
    lowered = key.lower()
    return len(key) < _MIN_INTERNAL_KEY_LENGTH or any(word in lowered for word in _PLACEHOLDER_WORDS)


def _default_random_hex(length: int) -> str:
    return secrets.token_hex((length + 1) // 2)[:length]


_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "*", ""})


def _default_public_url(host: str, tls_host: str | None, port: int, tls_enabled: bool, hostname: Callable[[], str]) -> str:
    """
    This relay's ``/ws`` URL as derived from where it listens: the TLS host name when one is set,
    else the listen address, else (listening on every interface) the machine's host name.
    """
    name = tls_host or (hostname() if host.strip() in _WILDCARD_HOSTS else host.strip())
    shown = f"[{name}]" if ":" in name and not name.startswith("[") else name
    scheme = "wss" if tls_enabled else "ws"
    default_port = 443 if tls_enabled else 80
    return f"{scheme}://{shown}/ws" if port == default_port else f"{scheme}://{shown}:{port}/ws"


def _server_tls_verify(mode: TriState, server_url: str) -> bool:
    if mode != "auto":
        return mode == "1"
    parts = urlsplit(server_url)
    hostname = parts.hostname or ""
    return not (parts.scheme == "https" and (hostname == "localhost" or hostname.endswith(".test")))


class _Urls(NamedTuple):
    server_url: str
    server_url_source: str
    server_url_explicit: bool
    redis_url: str | None


class _Tls(NamedTuple):
    host: str
    cert_dir: str
    cert_path: str
    key_path: str
    enabled: bool


class _PlatformTls(NamedTuple):
    ca_cert_path: str | None
    mtls_enabled: bool
    client_cert_path: str | None
    client_key_path: str | None


def _backplane_urls(env: _Env, backplane_mode: BackplaneMode) -> _Urls:
    backplane_url = env.text("RELAY_BACKPLANE_URL")
    if backplane_url is not None and backplane_mode == "single":
        accepted = "RELAY_BACKPLANE_MODE=server or redis"
        raise ConfigError("RELAY_BACKPLANE_URL", f"set but the backplane mode is single; accepted: {accepted}")
    server_text = env.text("SERVER_URL")
    server_url = _platform_url("SERVER_URL", server_text) if server_text else DEFAULT_SERVER_URL
    redis_text = env.text("RELAY_REDIS_URL")
    redis_url = _redis_url("RELAY_REDIS_URL", redis_text) if redis_text else None
    if backplane_url is not None and backplane_mode == "server":
        from_backplane = _platform_url("RELAY_BACKPLANE_URL", backplane_url)
        if server_text is not None and from_backplane != server_url:
            raise ConfigError("RELAY_BACKPLANE_URL", "differs from SERVER_URL; accepted: set one, or both equal")
        return _Urls(from_backplane, "RELAY_BACKPLANE_URL", True, redis_url)
    if backplane_url is not None and backplane_mode == "redis":
        from_backplane = _redis_url("RELAY_BACKPLANE_URL", backplane_url)
        if redis_url is not None and from_backplane != redis_url:
            raise ConfigError("RELAY_BACKPLANE_URL", "differs from RELAY_REDIS_URL; accepted: set one, or both equal")
        redis_url = from_backplane
    return _Urls(server_url, "SERVER_URL", server_text is not None, redis_url)


def _relay_tls(env: _Env, tls_mode: TriState, home: str) -> _Tls:
    tls_host = env.text("RELAY_TLS_HOST") or DEFAULT_TLS_HOST
    cert_dir = env.text("RELAY_TLS_CERT_DIR") or os.path.join(home, ".viewport", "relay-certs")
    cert_path = env.text("RELAY_TLS_CERT_PATH", trim=False) or os.path.join(cert_dir, f"{tls_host}.crt")
    key_path = env.text("RELAY_TLS_KEY_PATH", trim=False) or os.path.join(cert_dir, f"{tls_host}.key")
    if tls_mode == "1":
        _check_file("RELAY_TLS_CERT_PATH", cert_path, "TLS certificate")
        _check_file("RELAY_TLS_KEY_PATH", key_path, "TLS key")
    both_exist = os.path.isfile(cert_path) and os.path.isfile(key_path)
    return _Tls(tls_host, cert_dir, cert_path, key_path, tls_mode == "1" or (tls_mode == "auto" and both_exist))


def _platform_tls(env: _Env, server_mtls: bool | None) -> _PlatformTls:
    cert_path = env.text("RELAY_SERVER_CLIENT_CERT_PATH")
    key_path = env.text("RELAY_SERVER_CLIENT_KEY_PATH")
    enabled = bool(server_mtls) or (cert_path is not None and key_path is not None)
    if enabled:
        for name, path, what in (
            ("RELAY_SERVER_CLIENT_CERT_PATH", cert_path, "client certificate"),
            ("RELAY_SERVER_CLIENT_KEY_PATH", key_path, "client key"),
        ):
            if path is None:
                raise ConfigError(name, "required when platform mTLS is enabled; accepted: the path of a PEM file")
            _check_file(name, path, what)
    ca_path = env.text("RELAY_SERVER_CA_CERT_PATH")
    if ca_path is not None:
        _check_file("RELAY_SERVER_CA_CERT_PATH", ca_path, "CA certificate")
    return _PlatformTls(ca_path, enabled, cert_path, key_path)


def _choose_admission(
    token_secret: str | None,
    token_public_key_path: str | None,
    *,
    server_url_explicit: bool,
    backplane_mode: BackplaneMode,
    host: str,
) -> Admission:
    if token_secret is not None and token_public_key_path is not None:
        raise ConfigError("RELAY_TOKEN_PUBLIC_KEY", "cannot be combined with RELAY_TOKEN_SECRET; accepted: set one")
    if token_secret is not None:
        return "local_secret"
    if token_public_key_path is not None:
        _check_file("RELAY_TOKEN_PUBLIC_KEY", token_public_key_path, "token public key (PEM, EdDSA or RSA)")
        return "local_public_key"
    if server_url_explicit or backplane_mode != "single":
        return "platform"
    return "embedded_secret_file" if is_loopback_host(host) else "platform"


DEVELOPMENT_BUS_HMAC_KEY = "viewport-relay-development-bus-key"


def _check_backplane_requirements(
    backplane_mode: BackplaneMode,
    admission: Admission,
    internal_key: str | None,
    redis_url: str | None,
    bus_hmac_key: str | None,
    relay_mode: RelayMode,
) -> tuple[str, ...]:
    """
    Refuse what a backplane cannot run without; return warnings for what only a dev relay may lack.

    Outside dev a cross-relay relay refuses to start without ``RELAY_BUS_HMAC_KEY``: with the public
    development key anyone who can publish to Redis (or the bus) could inject frames into any
    workspace, key exchanges included. Server mode outside dev also needs ``RELAY_INTERNAL_KEY``
    (the bus API authenticates relays with it). A dev relay (loopback) starts without them, with a
    warning naming each; platform admission without an internal key is a warning in any mode but prod.
    """
    if backplane_mode == "redis" and redis_url is None:
        problem = "required in redis backplane mode (or RELAY_REDIS_URL); accepted: a Redis URL"
        raise ConfigError("RELAY_BACKPLANE_URL", problem)
    if backplane_mode == "single":
        return ()
    warnings: list[str] = []
    if bus_hmac_key is None:
        if relay_mode != "dev":
            problem = (
                f"required in {backplane_mode} backplane mode outside dev (bus frames are signed with it; "
                "the development key is public); accepted: a random key of 32+ characters"
            )
            raise ConfigError("RELAY_BUS_HMAC_KEY", problem)
        warnings.append("RELAY_BUS_HMAC_KEY: not set; bus frames are signed with the public development key")
    if internal_key is None:
        if backplane_mode == "server" and relay_mode != "dev":
            problem = "required in server backplane mode outside dev (the bus API checks it); accepted: a non-empty key"
            raise ConfigError("RELAY_INTERNAL_KEY", problem)
        if backplane_mode == "server" or admission == "platform":
            if relay_mode == "prod":
                problem = f"required in {backplane_mode} backplane mode in prod; accepted: a non-empty key"
                raise ConfigError("RELAY_INTERNAL_KEY", problem)
            warnings.insert(0, "RELAY_INTERNAL_KEY: not set; platform calls carry no x-relay-internal-key")
    return tuple(warnings)


def _check_local_urls(host: str, named_urls: tuple[tuple[str, str], ...]) -> None:
    if is_loopback_host(host):
        return
    for name, url in named_urls:
        if looks_local(url):
            raise ConfigError(
                name,
                f"{_mask_url(url)!r} looks local but HOST {host!r} is not a loopback address; "
                "accepted: SERVER_URL and RELAY_PUBLIC_WS_BASE_URL set explicitly to non-local URLs, "
                "or HOST=127.0.0.1, localhost or ::1",
            )


def _infer_relay_mode(
    setting: RelayMode | None, host: str, server_url: str, public_url: str, any_url_explicit: bool
) -> RelayMode:
    """
    ``RELAY_MODE`` when set; else ``dev`` on a loopback host or with local-looking URLs; else
    ``staging`` (no query-string tokens, terse state) — never dev behaviour on a public address.
    Prod hardening (TLS, keys, mTLS checks) applies only when ``RELAY_MODE=prod`` is set: the
    reference relay inferred prod from explicit URLs, which made the documented
    ``docker run -e RELAY_BACKPLANE_MODE=server -e RELAY_BACKPLANE_URL=…`` refuse to start.
    """
    if setting is not None:
        return setting
    if is_loopback_host(host) or looks_local(server_url) or looks_local(public_url):
        return "dev"
    return "staging"


def _check_prod(
    *,
    tls_enabled: bool,
    tls_termination: TlsTermination,
    uses_platform: bool,
    internal_key: str | None,
    server_auth_mode: ServerAuthMode,
    server_mtls_enabled: bool,
    server_tls_verify_mode: TriState,
    urls: _Urls,
) -> None:
    if not tls_enabled and tls_termination != "platform":
        raise ConfigError(
            "RELAY_TLS",
            "prod mode needs TLS but no certificate and key are in use; "
            "accepted: RELAY_TLS=1 with existing files, or RELAY_TLS_TERMINATION=platform",
        )
    if uses_platform and internal_key is None:
        raise ConfigError("RELAY_INTERNAL_KEY", "required in prod mode; accepted: a random key of 24+ characters")
    if internal_key is not None and _is_placeholder(internal_key):
        raise ConfigError(
            "RELAY_INTERNAL_KEY",
            "looks like a placeholder; accepted: a random key of 24+ characters "
            "without 'change-me', 'placeholder' or 'example'",
        )
    if not uses_platform:
        return
    if server_auth_mode == "mtls" and not server_mtls_enabled:
        raise ConfigError(
            "RELAY_SERVER_MTLS",
            "prod mode with RELAY_SERVER_AUTH_MODE=mtls needs platform mTLS; "
            "accepted: 1 with RELAY_SERVER_CLIENT_CERT_PATH and RELAY_SERVER_CLIENT_KEY_PATH",
        )
    if server_auth_mode == "mtls" and server_tls_verify_mode != "1":
        raise _invalid(
            "RELAY_SERVER_TLS_VERIFY", server_tls_verify_mode, "1 in prod mode with RELAY_SERVER_AUTH_MODE=mtls"
        )
    if server_auth_mode == "private_network_shared_secret" and looks_local(urls.server_url):
        raise ConfigError(
            urls.server_url_source,
            "must not look local in prod mode with RELAY_SERVER_AUTH_MODE=private_network_shared_secret; "
            "accepted: the platform's non-local URL",
        )


def load_config(
    environ: Mapping[str, str],
    overrides: Mapping[str, object] | None = None,
    *,
    home: str | None = None,
    random_hex: Callable[[int], str] | None = None,
    hostname: Callable[[], str] | None = None,
) -> RelayConfig:
    """
    Parse and check the environment into a L{RelayConfig}, or raise L{ConfigError} naming the first bad variable.

    Only the ``host`` and ``port`` keys of ``overrides`` (twistd options) are read; they win over HOST/PORT and
    C{None} means "not given". ``random_hex(n)`` returns ``n`` lowercase hex characters for the default relayId.
    Unlike the reference relay, every invalid value (enum, boolish, integer, URL, missing file) is an error
    rather than a silent default. Syntax is checked first, then the startup checks in the reference order.

    When RELAY_MODE is unset the relay mode is ``dev`` if HOST is a loopback name or the platform or public URL
    looks local, and ``staging`` otherwise (e.g. HOST=0.0.0.0 in a container), so query-string tokens and
    verbose state are never allowed silently on a public address. ``prod`` is never inferred: only
    ``RELAY_MODE=prod`` turns on prod hardening (a warning says so when URLs are set explicitly). Prod hardening
    of the platform link (internal key, mTLS, TLS verification) applies only when the relay talks to the
    platform: platform admission or the server backplane. Variables of the reference relay that mean nothing
    here (``RELAY_REDIS_QUEUE_MAX``, ``RELAY_BUS_POLL_INTERVAL_MS``) are checked and draw a warning.
    """
    env = _Env(environ)
    home = home if home is not None else os.path.expanduser("~")
    random_hex = random_hex or _default_random_hex

    host, port = _listen_address(env, overrides or {})
    ints = {field: env.positive_int(name, default) for field, (name, default) in _INT_KNOBS.items()}
    relay_mode_setting = env.choice("RELAY_MODE", _RELAY_MODES)
    backplane_setting = env.choice("RELAY_BACKPLANE_MODE", _BACKPLANE_MODES)
    tls_mode = env.choice("RELAY_TLS", _TRI_STATES, lower=True) or "auto"
    tls_termination = env.choice("RELAY_TLS_TERMINATION", _TLS_TERMINATIONS) or "self"
    server_tls_verify_mode = env.choice("RELAY_SERVER_TLS_VERIFY", _TRI_STATES) or "auto"
    server_auth_mode = env.choice("RELAY_SERVER_AUTH_MODE", _SERVER_AUTH_MODES) or "mtls"
    enable_admin_http = env.boolish("RELAY_ENABLE_ADMIN_HTTP")
    health_verbose = env.boolish("RELAY_HEALTH_VERBOSE")
    state_include_client_ids = env.boolish("RELAY_STATE_INCLUDE_CLIENT_IDS")
    server_mtls = env.boolish("RELAY_SERVER_MTLS")
    presence_sync = env.boolish("RELAY_PRESENCE_SYNC_ENABLED")
    bus = env.boolish("RELAY_BUS_ENABLED")
    client_redirect = env.boolish("RELAY_CLIENT_REDIRECT_ENABLED")

    internal_key = env.text("RELAY_INTERNAL_KEY")
    backplane_mode = backplane_setting or ("server" if internal_key is not None or bus or presence_sync else "single")
    urls = _backplane_urls(env, backplane_mode)
    public_url_text = env.text("RELAY_PUBLIC_WS_BASE_URL")
    if public_url_text is not None:
        _split_url("RELAY_PUBLIC_WS_BASE_URL", public_url_text, frozenset({"ws", "wss"}), need_host=True)
    trusted_proxies = tuple(_proxy("RELAY_TRUSTED_PROXIES", entry) for entry in env.csv("RELAY_TRUSTED_PROXIES"))
    allowed_origins = tuple(_origin("RELAY_ALLOWED_ORIGINS", entry) for entry in env.csv("RELAY_ALLOWED_ORIGINS")) or ("*",)
    token_secret = env.text("RELAY_TOKEN_SECRET")
    if token_secret is not None and len(token_secret) < _MIN_TOKEN_SECRET_LENGTH:
        raise ConfigError(
            "RELAY_TOKEN_SECRET",
            f"too short ({len(token_secret)} characters); accepted: at least {_MIN_TOKEN_SECRET_LENGTH} characters",
        )

    tls = _relay_tls(env, tls_mode, home)
    platform_tls = _platform_tls(env, server_mtls)
    token_public_key_path = env.text("RELAY_TOKEN_PUBLIC_KEY")
    admission = _choose_admission(
        token_secret,
        token_public_key_path,
        server_url_explicit=urls.server_url_explicit,
        backplane_mode=backplane_mode,
        host=host,
    )
    bus_hmac_key = env.text("RELAY_BUS_HMAC_KEY")

    public_ws_base_url = public_url_text or _default_public_url(
        host, env.text("RELAY_TLS_HOST"), port, tls.enabled, hostname or socket.gethostname
    )
    explicit_urls = [(urls.server_url_source, urls.server_url)]
    if public_url_text is not None:
        explicit_urls.append(("RELAY_PUBLIC_WS_BASE_URL", public_url_text))
    elif env.text("RELAY_TLS_HOST") is not None:
        explicit_urls.append(("RELAY_TLS_HOST", public_ws_base_url))
    _check_local_urls(host, tuple(explicit_urls))
    any_url_explicit = urls.server_url_explicit or public_url_text is not None
    relay_mode = _infer_relay_mode(
        relay_mode_setting, host, urls.server_url, public_url_text or "", any_url_explicit
    )
    warnings = _check_backplane_requirements(
        backplane_mode, admission, internal_key, urls.redis_url, bus_hmac_key, relay_mode
    )
    if public_url_text is None and backplane_mode != "single":
        warnings += (
            f"RELAY_PUBLIC_WS_BASE_URL: not set; other relays (and redirected browsers) are told {public_ws_base_url}, "
            "derived from the listen address",
        )
    if admission == "platform" and not urls.server_url_explicit and backplane_mode == "single":
        warnings += (
            f"HOST: {host!r} is not a loopback address, so the embedded token secret is not used: admission is "
            f"the Viewport platform's validate call at {urls.server_url}; set RELAY_TOKEN_SECRET or "
            "RELAY_TOKEN_PUBLIC_KEY to admit locally signed tokens",
        )
    if relay_mode_setting is None and relay_mode == "staging" and any_url_explicit:
        warnings += ("RELAY_MODE: not set; running as staging (set RELAY_MODE=prod for production hardening)",)
    if bus_hmac_key is None and backplane_mode != "single":
        bus_hmac_key = DEVELOPMENT_BUS_HMAC_KEY
    if relay_mode == "prod":
        _check_prod(
            tls_enabled=tls.enabled,
            tls_termination=tls_termination,
            uses_platform=admission == "platform" or backplane_mode == "server",
            internal_key=internal_key,
            server_auth_mode=server_auth_mode,
            server_mtls_enabled=platform_tls.mtls_enabled,
            server_tls_verify_mode=server_tls_verify_mode,
            urls=urls,
        )

    admin_token = env.text("RELAY_ADMIN_TOKEN")
    is_dev = relay_mode == "dev"
    single = backplane_mode == "single"
    for name, why in _INERT_KNOBS.items():
        if env.text(name) is not None:
            env.positive_int(name, 1)
            warnings += (f"{name}: has no effect here; {why}",)

    def section(prefix: str) -> dict[str, int]:
        return {path.partition(".")[2]: value for path, value in ints.items() if path.startswith(prefix + ".")}

    return RelayConfig(
        relay_id=env.text("RELAY_ID") or f"{host}:{port}:{random_hex(12)}",
        relay_mode=relay_mode,
        listen=ListenConfig(host=host, port=port, trusted_proxies=trusted_proxies, allowed_origins=allowed_origins),
        tls=TlsConfig(
            mode=tls_mode,
            enabled=tls.enabled,
            termination=tls_termination,
            host=tls.host,
            cert_dir=tls.cert_dir,
            cert_path=tls.cert_path,
            key_path=tls.key_path,
        ),
        http=HttpConfig(
            admin_token_sha256=hashlib.sha256(admin_token.encode("utf-8")).hexdigest() if admin_token else None,
            enable_admin=bool(enable_admin_http),
            health_verbose=is_dev if health_verbose is None else health_verbose,
            state_include_client_ids=is_dev if state_include_client_ids is None else state_include_client_ids,
            **section("http"),
        ),
        admission=AdmissionConfig(
            mode=admission,
            token_secret=token_secret,
            token_public_key_path=token_public_key_path,
            token_secret_file=env.text("RELAY_TOKEN_SECRET_FILE") or os.path.join(home, ".viewport", "relay-token-secret"),
            token_issuer=env.text("RELAY_TOKEN_ISSUER"),
            token_audience=env.text("RELAY_TOKEN_AUDIENCE"),
            **section("admission"),
        ),
        platform=PlatformConfig(
            url=urls.server_url,
            url_explicit=urls.server_url_explicit,
            internal_key=internal_key,
            tls_verify_mode=server_tls_verify_mode,
            tls_verify=_server_tls_verify(server_tls_verify_mode, urls.server_url),
            auth_mode=server_auth_mode,
            ca_cert_path=platform_tls.ca_cert_path,
            mtls_enabled=platform_tls.mtls_enabled,
            client_cert_path=platform_tls.client_cert_path,
            client_key_path=platform_tls.client_key_path,
            client_key_passphrase=env.text("RELAY_SERVER_CLIENT_KEY_PASSPHRASE"),
            **section("platform"),
        ),
        limits=LimitsConfig(**section("limits")),
        heartbeat=HeartbeatConfig(**section("heartbeat")),
        backplane=BackplaneConfig(
            mode=backplane_mode,
            public_ws_base_url=public_ws_base_url,
            redis_url=urls.redis_url,
            redis_key_prefix=env.text("RELAY_REDIS_KEY_PREFIX") or "viewport:relay",
            presence_sync_enabled=not single and presence_sync is not False,
            bus_enabled=not single and bus is not False,
            bus_hmac_key=bus_hmac_key,
            client_redirect_enabled=not single and bool(client_redirect),
            redirect_allowed_hosts=tuple(entry.lower() for entry in env.csv("RELAY_REDIRECT_ALLOWED_HOSTS")),
            **section("backplane"),
        ),
        warnings=warnings,
    )
