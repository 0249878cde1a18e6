"""The operator's status page: one JSON snapshot of the relay, and the small page that shows it live."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from viewport import __version__

if TYPE_CHECKING:
    from viewport.relay.core import Relay

#: Scopes listed in one snapshot (the busiest relays hold thousands; the page shows the first ones).
MAX_LISTED_SCOPES = 200


def bucket_quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> Optional[float]:
    """
    The upper bound of the histogram bucket holding quantile ``q`` (the last, +Inf, bucket gives
    the highest finite bound); None without observations.
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    running = 0
    for index, count in enumerate(counts):
        running += count
        if running >= rank:
            return bounds[min(index, len(bounds) - 1)]
    return bounds[-1]


def _latency(histogram: Any) -> Dict[str, Any]:
    bounds, counts = histogram.counts()
    p50 = bucket_quantile(bounds, counts, 0.5)
    p99 = bucket_quantile(bounds, counts, 0.99)
    return {
        "count": sum(counts),
        "p50Ms": None if p50 is None else p50 * 1000.0,
        "p99Ms": None if p99 is None else p99 * 1000.0,
    }


def status_snapshot(relay: "Relay") -> Dict[str, Any]:
    """What the status page shows, as JSON: identity, backplane health, connections, scopes, traffic."""
    config = relay.config
    metrics = relay.metrics
    daemons = clients = 0
    scopes: List[Dict[str, Any]] = []
    for scope in relay.registry:
        daemon = scope.daemon_open() is not None
        open_clients = scope.open_client_count()
        daemons += int(daemon)
        clients += open_clients
        if len(scopes) < MAX_LISTED_SCOPES:
            scopes.append({
                "workspaceId": scope.workspace_id,
                "runtimeTargetId": scope.runtime_target_id,
                "daemon": "here" if daemon else ("on " + scope.remote_daemon_relay if scope.remote_daemon_relay else "none"),
                "clients": open_clients,
            })
    counters = metrics.counter_values()
    return {
        "ok": True,
        "version": __version__,
        "relayId": config.relay_id,
        "relayMode": config.relay_mode,
        "publicWsBaseUrl": config.backplane.public_ws_base_url,
        "uptimeMs": int(relay.now_ms() - relay.started_at_ms),
        "accepting": relay.accepting,
        "backplane": {
            "mode": config.backplane.mode,
            "healthy": bool(relay.backplane.healthy),
            "busEnabled": config.backplane.bus_enabled,
            "clientRedirectEnabled": config.backplane.client_redirect_enabled,
        },
        "connections": {"daemons": daemons, "clients": clients, "sockets": len(relay.sockets)},
        "scopeCount": len(relay.registry.scopes),
        "scopes": scopes,
        "frames": {
            "clientToDaemon": counters.get("relay_frames_client_to_daemon_total", 0),
            "daemonToClients": counters.get("relay_frames_daemon_to_clients_total", 0),
            "routedOverBus": counters.get("relay_client_messages_routed_bus_total", 0),
            "busToDaemon": counters.get("relay_bus_frames_to_daemon_total", 0),
            "busToClients": counters.get("relay_bus_frames_to_clients_total", 0),
        },
        "forwarding": {
            "clientToDaemon": _latency(metrics.relay_forward_client_to_daemon_seconds),
            "daemonToClients": _latency(metrics.relay_forward_daemon_to_client_seconds),
        },
        "problems": {
            "slowPeersClosed": counters.get("relay_ws_slow_client_terminated_total", 0),
            "admissionDenied": counters.get("relay_admission_denied_total", 0),
            "busPublishFailed": counters.get("relay_bus_publish_failed_total", 0),
            "busPullFailed": counters.get("relay_bus_pull_failed_total", 0),
            "daemonFramesLost": counters.get("relay_bus_daemon_frames_lost_total", 0),
        },
    }


@lru_cache(maxsize=1)
def status_page() -> bytes:
    """The page (no build step, no framework: one HTML file with a little script that polls the snapshot)."""
    return resources.files("viewport.relay").joinpath("status_page.html").read_bytes()
