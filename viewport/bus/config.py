"""viewport-bus configuration: the environment (and twistd options) parsed once into a frozen BusConfig."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal, Mapping, Optional
from urllib.parse import urlsplit

from viewport.environment import ConfigError, is_loopback_host

__all__ = ["BusConfig", "ConfigError", "load_bus_config"]

TokenKey = Literal["secret", "public_key", "secret_file"]

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7790
_MIN_TOKEN_SECRET_LENGTH = 32
_MIN_REMOTE_KEY_LENGTH = 24
_PLACEHOLDER_WORDS = ("change-me", "placeholder", "example")
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")
_INTEGER = re.compile(r"[0-9]+")
_MAX_PAYLOAD_BYTES = 64 * 1048576
#: A batched publish's payloads together: this much by default, and never less than one frame.
DEFAULT_MAX_BATCH_BYTES = 4 * 1048576


@dataclass(frozen=True, kw_only=True, repr=False)
class BusConfig:
    """Every setting of one viewport-bus process, typed and checked at startup."""

    database_url: str
    host: str
    port: int
    internal_key: str
    token_key: TokenKey
    token_secret: Optional[str]
    token_public_key_path: Optional[str]
    token_secret_file: str
    token_issuer: Optional[str]
    token_audience: Optional[str]
    retention_seconds: float
    max_wait_ms: int
    max_payload_bytes: int
    max_batch_bytes: int
    presence_ttl_seconds: float

    def __repr__(self) -> str:
        secret_free = {
            "database_url": _mask_url(self.database_url),
            "host": self.host,
            "port": self.port,
            "token_key": self.token_key,
            "retention_seconds": self.retention_seconds,
            "max_wait_ms": self.max_wait_ms,
            "max_payload_bytes": self.max_payload_bytes,
            "max_batch_bytes": self.max_batch_bytes,
            "presence_ttl_seconds": self.presence_ttl_seconds,
        }
        return "BusConfig(" + ", ".join(f"{k}={v!r}" for k, v in secret_free.items()) + ")"


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


def _text(environ: Mapping[str, str], name: str) -> Optional[str]:
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _invalid(name: str, value: str, accepted: str) -> ConfigError:
    return ConfigError(name, f"invalid value {value!r}; accepted: {accepted}")


def _integer(name: str, value: Optional[str], default: int, minimum: int, maximum: Optional[int] = None) -> int:
    if value is None:
        return default
    number = int(value) if _INTEGER.fullmatch(value) else None
    if number is None or number < minimum or (maximum is not None and number > maximum):
        bounds = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise _invalid(name, value, f"an integer {bounds}")
    return number


def _seconds(name: str, value: Optional[str], default: float) -> float:
    if value is None:
        return default
    number = float(value) if _DECIMAL.fullmatch(value) else 0.0
    if number <= 0:
        raise _invalid(name, value, "a positive number of seconds (decimals allowed)")
    return number


def _max_batch_bytes(value: Optional[str], max_payload_bytes: int) -> int:
    name = "BUS_MAX_BATCH_BYTES"
    number = _integer(name, value, max(DEFAULT_MAX_BATCH_BYTES, max_payload_bytes), 1, _MAX_PAYLOAD_BYTES)
    if number < max_payload_bytes:
        raise ConfigError(
            name,
            f"{number} is below BUS_MAX_PAYLOAD_BYTES ({max_payload_bytes}); accepted: an integer "
            f"{max_payload_bytes}..{_MAX_PAYLOAD_BYTES}",
        )
    return number


def _database_url(value: Optional[str]) -> str:
    if value is None:
        return DEFAULT_DATABASE_URL
    try:
        parts = urlsplit(value)
        parts.port
    except ValueError:
        raise _invalid("BUS_DATABASE_URL", _mask_url(value), "postgresql://user@host:port/database") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise _invalid("BUS_DATABASE_URL", _mask_url(value), "postgresql://user@host:port/database")
    return value


def _listen(environ: Mapping[str, str], overrides: Mapping[str, object]) -> tuple[str, int]:
    host = _text(environ, "HOST") or DEFAULT_HOST
    port = _integer("PORT", _text(environ, "PORT"), DEFAULT_PORT, 0, 65535)
    host_override = overrides.get("host")
    if host_override is not None:
        if not isinstance(host_override, str) or not host_override.strip():
            raise _invalid("--host", str(host_override), "a host name or address")
        host = host_override.strip()
    port_override = overrides.get("port")
    if port_override is not None:
        if isinstance(port_override, bool) or not isinstance(port_override, (int, str)):
            raise _invalid("--port", str(port_override), "an integer 0..65535")
        port = _integer("--port", str(port_override).strip(), port, 0, 65535)
    return host, port


def _internal_key(environ: Mapping[str, str], host: str) -> str:
    key = _text(environ, "RELAY_INTERNAL_KEY")
    if key is None:
        raise ConfigError("RELAY_INTERNAL_KEY", "required; accepted: the key the relays send (24+ random characters)")
    weak = len(key) < _MIN_REMOTE_KEY_LENGTH or any(word in key.lower() for word in _PLACEHOLDER_WORDS)
    if weak and not is_loopback_host(host):
        raise ConfigError(
            "RELAY_INTERNAL_KEY",
            f"too weak to listen on {host!r}; accepted: a random key of {_MIN_REMOTE_KEY_LENGTH}+ characters "
            "without 'change-me', 'placeholder' or 'example' (or HOST=127.0.0.1)",
        )
    return key


def load_bus_config(
    environ: Mapping[str, str], overrides: Optional[Mapping[str, object]] = None, *, home: Optional[str] = None
) -> BusConfig:
    """
    Parse and check the environment into a L{BusConfig}, or raise L{ConfigError} naming the bad variable.

    ``overrides`` holds the ``host``/``port`` twistd options (C{None} = not given). Token verification
    follows the relay: RELAY_TOKEN_SECRET (HS256, 32+ characters) or RELAY_TOKEN_PUBLIC_KEY (a PEM
    file, EdDSA/RS256), else the HS256 secret in RELAY_TOKEN_SECRET_FILE (created when missing).
    """
    home = home if home is not None else (environ.get("HOME") or os.path.expanduser("~"))
    host, port = _listen(environ, overrides or {})
    database_url = _database_url(_text(environ, "BUS_DATABASE_URL"))
    internal_key = _internal_key(environ, host)

    token_secret = _text(environ, "RELAY_TOKEN_SECRET")
    token_public_key_path = _text(environ, "RELAY_TOKEN_PUBLIC_KEY")
    if token_secret is not None and token_public_key_path is not None:
        raise ConfigError("RELAY_TOKEN_PUBLIC_KEY", "cannot be combined with RELAY_TOKEN_SECRET; accepted: set one")
    if token_secret is not None and len(token_secret) < _MIN_TOKEN_SECRET_LENGTH:
        raise ConfigError(
            "RELAY_TOKEN_SECRET",
            f"too short ({len(token_secret)} characters); accepted: at least {_MIN_TOKEN_SECRET_LENGTH} characters",
        )
    if token_public_key_path is not None and not os.path.isfile(token_public_key_path):
        raise ConfigError(
            "RELAY_TOKEN_PUBLIC_KEY",
            f"token public key file not found: {token_public_key_path!r}; accepted: the path of a PEM file",
        )
    max_payload_bytes = _integer(
        "BUS_MAX_PAYLOAD_BYTES", _text(environ, "BUS_MAX_PAYLOAD_BYTES"), 1048576, 1, _MAX_PAYLOAD_BYTES
    )
    token_key: TokenKey = (
        "secret" if token_secret is not None else "public_key" if token_public_key_path is not None else "secret_file"
    )

    return BusConfig(
        database_url=database_url,
        host=host,
        port=port,
        internal_key=internal_key,
        token_key=token_key,
        token_secret=token_secret,
        token_public_key_path=token_public_key_path,
        token_secret_file=_text(environ, "RELAY_TOKEN_SECRET_FILE")
        or os.path.join(home, ".viewport", "relay-token-secret"),
        token_issuer=_text(environ, "RELAY_TOKEN_ISSUER"),
        token_audience=_text(environ, "RELAY_TOKEN_AUDIENCE"),
        retention_seconds=_seconds("BUS_RETENTION_SECONDS", _text(environ, "BUS_RETENTION_SECONDS"), 300.0),
        max_wait_ms=_integer("BUS_MAX_WAIT_MS", _text(environ, "BUS_MAX_WAIT_MS"), 2000, 0, 60000),
        max_payload_bytes=max_payload_bytes,
        max_batch_bytes=_max_batch_bytes(_text(environ, "BUS_MAX_BATCH_BYTES"), max_payload_bytes),
        presence_ttl_seconds=_seconds(
            "BUS_PRESENCE_TTL_SECONDS", _text(environ, "BUS_PRESENCE_TTL_SECONDS"), 60.0
        ),
    )
