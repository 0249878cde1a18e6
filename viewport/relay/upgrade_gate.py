"""The relay's own checks of an upgrade request, before Autobahn and admission see it."""

from __future__ import annotations

from typing import Mapping, Optional
from urllib.parse import parse_qs, urlsplit

from viewport.relay.config import RelayConfig
from viewport.relay.limits import FixedWindowLimiter
from viewport.relay.metrics import EventCount, RelayMetrics
from viewport.relay.registry import Registry
from viewport.relay.upgrade import (
    OriginPolicy,
    TrustedProxies,
    UpgradePrecheck,
    UpgradeRefusal,
    UpgradeRefused,
    client_ip,
    precheck_upgrade,
)


class UpgradeGate:
    """
    Rate, capacity, path, origin, query and token checks of one upgrade request (docs/protocol.md
    docs/protocol.md §2.3 steps 1–7), each refusal counted; ``accepting`` is False while the relay drains.
    """

    def __init__(self, *, config: RelayConfig, registry: Registry, metrics: RelayMetrics) -> None:
        self._config = config
        self._registry = registry
        self._limiter = FixedWindowLimiter(config.limits.upgrade_rate_per_minute, 60_000, config.limits.upgrade_bucket_max)
        self._proxies = TrustedProxies(config.listen.trusted_proxies)
        self._origins = OriginPolicy(config.listen.allowed_origins)
        self._counters: Mapping[UpgradeRefusal, EventCount] = {
            UpgradeRefusal.RATE_LIMITED: metrics.relay_upgrade_rate_limited,
            UpgradeRefusal.TOTAL_CONNECTIONS: metrics.relay_upgrade_rejected_total_connections,
            UpgradeRefusal.IP_CONNECTIONS: metrics.relay_upgrade_rejected_ip_connections,
            UpgradeRefusal.ORIGIN_NOT_ALLOWED: metrics.relay_upgrade_rejected_origin,
            UpgradeRefusal.INVALID_QUERY: metrics.relay_upgrade_invalid_query,
            UpgradeRefusal.MISSING_AUTH: metrics.relay_upgrade_missing_auth,
            UpgradeRefusal.WORKSPACE_CLIENTS: metrics.relay_upgrade_rejected_workspace_clients,
            UpgradeRefusal.ADMISSION_DENIED: metrics.relay_admission_denied,
        }
        self.accepting = True

    def client_ip(self, peer_host: Optional[str], forwarded_for: Optional[str]) -> str:
        """The client's address: the first X-Forwarded-For entry from a trusted proxy, else the peer."""
        return client_ip(peer_host, forwarded_for, self._proxies)

    def check(self, target: str, headers: Mapping[str, str], ip: str, now_ms: float) -> UpgradePrecheck:
        """Run the checks on a parsed request head; a refusal is counted here."""
        config = self._config
        split = urlsplit(target)
        decision = precheck_upgrade(
            path=split.path,
            params=parse_qs(split.query, keep_blank_values=True),
            authorization=headers.get("authorization"),
            websocket_protocol=headers.get("sec-websocket-protocol"),
            relay_mode=config.relay_mode,
            ip=ip,
            now_ms=now_ms,
            upgrade_limiter=self._limiter,
            registered_connections=self._registry.registered_connections,
            max_total_connections=config.limits.max_total_connections,
            ip_connections=self._registry.ip_count(ip),
            max_connections_per_ip=config.limits.max_connections_per_ip,
            origin=headers.get("origin"),
            origin_policy=self._origins,
        )
        if isinstance(decision, UpgradeRefused):
            counter = self._counters.get(decision.refusal)
            if counter is not None:
                counter.inc()
        return decision

    def sweep(self, now_ms: float) -> None:
        """Forget upgrade-rate windows two windows old (every heartbeat interval)."""
        self._limiter.sweep(now_ms)
