"""
The one grammar of Redis URLs (``RELAY_BACKPLANE_URL`` in redis mode): parsed here for the backplane's
connections and for the configuration's startup check alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL: where to connect and how to log in (the password is never shown)."""

    scheme: str
    host: Optional[str] = None
    port: int = DEFAULT_PORT
    path: Optional[str] = None
    sentinels: Tuple[Tuple[str, int], ...] = ()
    service: Optional[str] = None
    db: Optional[int] = None
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)


def parse_redis_url(url: str) -> RedisTarget:
    """
    Parse ``redis://[user:pass@]host[:port][/db]``, ``rediss://…`` (TLS), ``unix://[:pass@]/path[?db=N]``
    and ``redis+sentinel://[user:pass@]host[:port][,host2[:port2]…]/service[/db]``.

    The credentials log in to Redis itself (for Sentinel: to the master). Raises ``ValueError``
    with a message that never contains the password.
    """
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in _SCHEMES:
        raise ValueError("unsupported Redis URL; accepted schemes: " + ", ".join(_SCHEMES))
    if scheme == "redis+sentinel":
        return _parse_sentinel_url(rest)
    parts = urlsplit(url)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if scheme == "unix":
        path = unquote(parts.path)
        if not path:
            raise ValueError("unix Redis URL without a socket path")
        db_values = parse_qs(parts.query).get("db")
        db = _parse_db(db_values[-1]) if db_values else None
        return RedisTarget(scheme, path=path, db=db, username=username, password=password)
    try:
        port = parts.port
    except ValueError:
        raise ValueError("Redis URL with an invalid port") from None
    if not parts.hostname:
        raise ValueError("Redis URL without a host")
    db = _parse_db(parts.path.strip("/")) if parts.path.strip("/") else None
    return RedisTarget(
        scheme, host=parts.hostname, port=port or DEFAULT_PORT, db=db, username=username, password=password
    )


def _parse_sentinel_url(rest: str) -> RedisTarget:
    rest = rest.split("#", 1)[0].split("?", 1)[0]
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    user, _, secret = userinfo.partition(":")
    sentinels = tuple(_host_port(entry, DEFAULT_SENTINEL_PORT) for entry in hosts.split(","))
    segments = path.split("/")
    service = unquote(segments[0])
    if not service or len(segments) > 2:
        raise ValueError("redis+sentinel URL needs /<service>[/<db>] after the Sentinel addresses")
    db = _parse_db(segments[1]) if len(segments) == 2 and segments[1] else None
    return RedisTarget(
        "redis+sentinel",
        sentinels=sentinels,
        service=service,
        db=db,
        username=unquote(user) or None,
        password=unquote(secret) if userinfo and ":" in userinfo else None,
    )


def _host_port(text: str, default_port: int) -> Tuple[str, int]:
    if text.startswith("["):
        close = text.find("]")
        host, remainder = text[1:close], text[close + 1 :]
        if close < 0 or (remainder and not remainder.startswith(":")):
            raise ValueError("Sentinel address with an invalid IPv6 literal")
        port_text = remainder[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError("Sentinel address without a host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("Sentinel address with an invalid port")
    return host, int(port_text)


def _parse_db(text: str) -> int:
    if not text.isdigit():
        raise ValueError("Redis database must be a non-negative integer")
    return int(text)
