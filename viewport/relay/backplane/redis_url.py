"""
The one grammar of Redis URLs (``RELAY_BACKPLANE_URL`` in redis mode): parsed here for the backplane's
connections and for the configuration's startup check alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel") + _CLUSTER_SCHEMES


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL: where to connect and how to log in (the password is never shown)."""

    scheme: str
    host: Optional[str] = None
    port: int = DEFAULT_PORT
    path: Optional[str] = None
    sentinels: Tuple[Tuple[str, int], ...] = ()
    #: The seed nodes of a Redis Cluster (``redis+cluster``): any of them tells the slot map.
    seeds: Tuple[Tuple[str, int], ...] = ()
    service: Optional[str] = None
    db: Optional[int] = None
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)

    @property
    def cluster(self) -> bool:
        """A Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
        return self.scheme in _CLUSTER_SCHEMES

    @property
    def tls(self) -> bool:
        """Connections are wrapped in TLS (``rediss://``, ``rediss+cluster://``)."""
        return self.scheme in ("rediss", "rediss+cluster")


def parse_redis_url(url: str) -> RedisTarget:
    """
    Parse ``redis://[user:pass@]host[:port][/db]``, ``rediss://…`` (TLS), ``unix://[:pass@]/path[?db=N]``
    ``redis+sentinel://[user:pass@]host[:port][,host2[:port2]…]/service[/db]`` and
    ``redis+cluster://[user:pass@]host[:port][,host2[:port2]…]`` (``rediss+cluster://`` for TLS: seed
    nodes of a Redis Cluster, which has no databases).

    The credentials log in to Redis itself (for Sentinel: to the master; for Cluster: to every node). Raises ``ValueError``
    with a message that never contains the password.
    """
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in _SCHEMES:
        raise ValueError("unsupported Redis URL; accepted schemes: " + ", ".join(_SCHEMES))
    if scheme == "redis+sentinel":
        return _parse_sentinel_url(rest)
    if scheme in _CLUSTER_SCHEMES:
        return _parse_cluster_url(scheme, rest)
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


class _HostList(NamedTuple):
    addresses: Tuple[Tuple[str, int], ...]
    username: Optional[str]
    password: Optional[str]
    path: str


def _split_hosts(rest: str, what: str, default_port: int) -> _HostList:
    """``[user:pass@]h1[:p1][,h2…][/path]``; ``what`` names the addresses in error messages."""
    rest = rest.split("#", 1)[0].split("?", 1)[0]
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    user, colon, secret = userinfo.partition(":")
    addresses = tuple(_host_port(entry, default_port, what) for entry in hosts.split(","))
    return _HostList(addresses, unquote(user) or None, unquote(secret) if colon else None, path)


def _parse_cluster_url(scheme: str, rest: str) -> RedisTarget:
    hosts = _split_hosts(rest, "Cluster seed", DEFAULT_PORT)
    if hosts.path.strip("/"):
        raise ValueError(f"{scheme} URL takes no path: a Redis Cluster has one database")
    return RedisTarget(scheme, seeds=hosts.addresses, username=hosts.username, password=hosts.password)


def _parse_sentinel_url(rest: str) -> RedisTarget:
    hosts = _split_hosts(rest, "Sentinel", DEFAULT_SENTINEL_PORT)
    segments = hosts.path.split("/")
    service = unquote(segments[0])
    if not service or len(segments) > 2:
        raise ValueError("redis+sentinel URL needs /<service>[/<db>] after the Sentinel addresses")
    db = _parse_db(segments[1]) if len(segments) == 2 and segments[1] else None
    return RedisTarget(
        "redis+sentinel",
        sentinels=hosts.addresses,
        service=service,
        db=db,
        username=hosts.username,
        password=hosts.password,
    )


def _host_port(text: str, default_port: int, what: str) -> Tuple[str, int]:
    if text.startswith("["):
        close = text.find("]")
        host, remainder = text[1:close], text[close + 1 :]
        if close < 0 or (remainder and not remainder.startswith(":")):
            raise ValueError(f"{what} address with an invalid IPv6 literal")
        port_text = remainder[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"{what} address without a host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{what} address with an invalid port")
    return host, int(port_text)


def _parse_db(text: str) -> int:
    if not text.isdigit():
        raise ValueError("Redis database must be a non-negative integer")
    return int(text)
