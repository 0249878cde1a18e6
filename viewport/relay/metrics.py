"""Per-relay Prometheus metrics: the counters and gauges of the contract plus forwarding latency."""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from viewport import __version__

#: The ``/metrics`` content type of the contract. Spelled out because prometheus-client's
#: ``CONTENT_TYPE_LATEST`` moved to ``version=1.0.0``.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Histogram upper bounds in seconds, 10 µs to 100 ms (``+Inf`` is implicit).
FORWARD_LATENCY_BUCKETS: tuple[float, ...] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
)


class LatencyHistogram:
    """
    A label-free histogram whose ``observe`` is a bisect and two in-place additions.

    prometheus-client's ``Histogram.observe`` takes two locks and scans the buckets linearly
    (about 0.6 µs here); this one costs about a quarter of that. The relay runs on one reactor
    thread, so no lock is needed. Counts are kept per bucket and made cumulative at scrape time.
    """

    __slots__ = ("name", "documentation", "_bounds", "_counts", "_sum")

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        """Create an empty histogram named ``name`` (exposed as ``name_bucket``/``_count``/``_sum``)."""
        bounds = sorted(float(b) for b in buckets)
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError("buckets must be a non-empty list of distinct bounds")
        self.name = name
        self.documentation = documentation
        self._bounds: list[float] = bounds
        # One slot per bound (observations <= bound) plus one for +Inf.
        self._counts: list[int] = [0] * (len(bounds) + 1)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        """Record one duration in seconds."""
        # bisect_left finds the first bound >= seconds, i.e. Prometheus' "le" bucket.
        self._counts[bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds

    @property
    def count(self) -> int:
        """Total number of observations."""
        return sum(self._counts)

    def counts(self) -> tuple[tuple[float, ...], tuple[int, ...]]:
        """The bucket upper bounds and the (non-cumulative) count per bucket, +Inf last."""
        return tuple(self._bounds), tuple(self._counts)

    @property
    def sum(self) -> float:
        """Sum of all observed durations in seconds."""
        return self._sum

    def family(self) -> HistogramMetricFamily:
        """Return the current state as a Prometheus histogram family with cumulative buckets."""
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self._bounds, self._counts):
            running += count
            buckets.append((floatToGoString(bound), running))
        running += self._counts[-1]
        buckets.append(("+Inf", running))
        return HistogramMetricFamily(
            self.name, self.documentation, buckets=buckets, sum_value=self._sum
        )


class _HistogramCollector:
    """Exports ``LatencyHistogram``s to a ``CollectorRegistry`` at scrape time."""

    def __init__(self, histograms: Sequence[LatencyHistogram]) -> None:
        """Export ``histograms`` in the given order."""
        self._histograms = tuple(histograms)

    def collect(self) -> Iterable[Metric]:
        """Yield one family per histogram."""
        for histogram in self._histograms:
            yield histogram.family()

    def describe(self) -> Iterable[Metric]:
        """Describe the same families, so the registry can detect name clashes."""
        return self.collect()


class EventCount:
    """
    A counter kept as a plain integer: ``inc`` is one addition (prometheus-client's ``Counter.inc``
    takes a lock and checks its argument, about 0.25 µs, and the frame path counts two to four
    things per frame). The relay runs on one reactor thread; ``_CountCollector`` exposes the value
    at scrape time, exactly as a ``Counter`` would.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        """Add ``amount`` (one by default)."""
        self.value += amount


class _CountCollector:
    """Exports ``EventCount``s as Prometheus counters, in registration order, at scrape time."""

    def __init__(self, counts: Mapping[str, "tuple[EventCount, str]"]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        """One counter family per count (``name`` without ``_total``: the family adds it to the sample)."""
        for name, (count, documentation) in self._counts.items():
            yield CounterMetricFamily(name[: -len("_total")], documentation, value=count.value)

    def describe(self) -> Iterable[Metric]:
        """Nothing at registration (counts are added after it); the names are unique by construction."""
        return ()


class RelayMetrics:
    """
    Every metric one relay exposes, registered in a registry of its own.

    Calling convention (one uniform approach, attribute access, no name lookups at run time):

    - Counters are ``EventCount`` objects (plain integers, exposed as Prometheus counters) on
      attributes named after the metric without its ``_total`` suffix, so the exposed name is the
      attribute plus ``_total``: ``metrics.relay_frames_client_to_daemon.inc()``,
      ``metrics.relay_bytes_client_to_daemon.inc(n)``; the value is ``.value``.
    - The two gauges keep their full names: ``metrics.relay_connections_total.set(n)``.
    - Forwarding latency: ``metrics.relay_forward_client_to_daemon_seconds.observe(s)`` and
      ``metrics.relay_forward_daemon_to_client_seconds.observe(s)`` (see ``LatencyHistogram``).

    Every metric exists, at zero, from construction on; ``_created`` series are disabled.
    """

    def __init__(self) -> None:
        """Create the registry and all metrics of the contract at zero."""
        # _created series are switched off process-wide by prometheus-client; idempotent.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        #: Every counter by its exposed name (with ``_total``), in registration order.
        self.counters: dict[str, EventCount] = {}
        self._documented: dict[str, tuple[EventCount, str]] = {}
        # First, so the counters come first in the exposition, as when each was its own Counter.
        self.registry.register(_CountCollector(self._documented))

        # upgrade
        self.relay_upgrade_rate_limited = self._counter(
            "relay_upgrade_rate_limited_total", "Upgrades refused by the upgrade rate limiter.")
        self.relay_upgrade_rejected_total_connections = self._counter(
            "relay_upgrade_rejected_total_connections_total", "Upgrades refused by the global connection cap.")
        self.relay_upgrade_rejected_ip_connections = self._counter(
            "relay_upgrade_rejected_ip_connections_total", "Upgrades refused by the per-IP connection cap.")
        self.relay_upgrade_invalid_query = self._counter(
            "relay_upgrade_invalid_query_total", "Upgrades refused for a bad query.")
        self.relay_upgrade_missing_auth = self._counter(
            "relay_upgrade_missing_auth_total", "Upgrades refused for lack of a usable token.")
        self.relay_upgrade_rejected_origin = self._counter(
            "relay_upgrade_rejected_origin_total", "Upgrades refused because RELAY_ALLOWED_ORIGINS excludes their Origin.")
        self.relay_bus_frames_expired = self._counter(
            "relay_bus_frames_expired_total",
            "Bus frames received after their deliver-by deadline (their sender was told they failed).")
        self.relay_bus_frames_out_of_order = self._counter(
            "relay_bus_frames_out_of_order_total",
            "Bus frames dropped for arriving after a later frame of their stream (the clients are then told).")
        self.relay_bus_frames_missing = self._counter(
            "relay_bus_frames_missing_total",
            "Bus frames of a stream that never arrived, seen by the gap in its numbers (the clients are then told);"
            " publishes reported failed to their sender count here too.")
        self.relay_presence_dead_relay = self._counter(
            "relay_presence_dead_relay_total", "Presences ignored because the relay they name is no longer alive.")
        self.relay_remote_relay_dead = self._counter(
            "relay_remote_relay_dead_total", "Relays holding our clients' daemons found dead by the liveness check.")
        self.relay_bus_daemon_frames_lost = self._counter(
            "relay_bus_daemon_frames_lost_total",
            "Daemon frames for another relay's clients that could not be published (those clients are then told).")
        self.relay_bus_loss_notices_sent = self._counter(
            "relay_bus_loss_notices_sent_total", "DAEMON_UNAVAILABLE notices published for frames lost earlier.")
        self.relay_upgrade_rejected_workspace_clients = self._counter(
            "relay_upgrade_rejected_workspace_clients_total", "Upgrades refused by the per-scope client cap.")
        self.relay_admission_ok = self._counter(
            "relay_admission_ok_total", "Platform admissions accepted.")
        self.relay_admission_denied = self._counter(
            "relay_admission_denied_total", "Platform admissions denied or failed.")
        self.relay_client_redirect = self._counter(
            "relay_client_redirect_total", "Redirects sent right after an upgrade.")
        self.relay_upgrade_errors = self._counter(
            "relay_upgrade_errors_total", "Exceptions during an upgrade.")
        # admin
        self.relay_admin_unauthorized = self._counter(
            "relay_admin_unauthorized_total", "Admin endpoint requests answered 401.")
        # connections
        self.relay_ws_connections_opened = self._counter(
            "relay_ws_connections_opened_total", "Connections registered (any role).")
        self.relay_ws_connections_closed = self._counter(
            "relay_ws_connections_closed_total", "Registered connections closed (any role).")
        self.relay_ws_connections_rejected = self._counter(
            "relay_ws_connections_rejected_total", "Connections rejected after the upgrade.")
        self.relay_ws_frame_too_large = self._counter(
            "relay_ws_frame_too_large_total", "Frames over the relay's size limit.")
        self.relay_ws_idle_terminated = self._counter(
            "relay_ws_idle_terminated_total", "Connections terminated for idleness.")
        self.relay_ws_stale_terminated = self._counter(
            "relay_ws_stale_terminated_total", "Connections terminated for a missed heartbeat.")
        self.relay_ws_slow_client_terminated = self._counter(
            "relay_ws_slow_client_terminated_total", "Connections closed by back-pressure.")
        # registry
        self.relay_workspace_evictions = self._counter(
            "relay_workspace_evictions_total", "Empty scopes evicted.")
        # client frames
        self.relay_frames_client_rejected = self._counter(
            "relay_frames_client_rejected_total", "Invalid client frames.")
        self.relay_frames_client_rejected_scope = self._counter(
            "relay_frames_client_rejected_scope_total", "Client frames outside the client's scope.")
        self.relay_frames_client_rejected_profile_mismatch = self._counter(
            "relay_frames_client_rejected_profile_mismatch_total", "Client frames with a mismatched profile.")
        self.relay_frames_client_kex_rate_limited = self._counter(
            "relay_frames_client_kex_rate_limited_total", "Client key-exchange frames refused by the limiter.")
        self.relay_frames_client_runtime_rate_limited = self._counter(
            "relay_frames_client_runtime_rate_limited_total", "Client runtime frames refused by the limiter.")
        self.relay_frames_client_pairing_rate_limited = self._counter(
            "relay_frames_client_pairing_rate_limited_total", "Client pairing frames refused by the limiter.")
        self.relay_frames_client_to_daemon = self._counter(
            "relay_frames_client_to_daemon_total", "Client frames forwarded to the local daemon.")
        self.relay_bytes_client_to_daemon = self._counter(
            "relay_bytes_client_to_daemon_total", "Bytes of client frames forwarded to the local daemon.")
        self.relay_client_messages_dropped = self._counter(
            "relay_client_messages_dropped_total", "Client frames with no daemon answered by a status frame.")
        self.relay_client_messages_routed_bus = self._counter(
            "relay_client_messages_routed_bus_total", "Client frames with no local daemon published to the bus.")
        # daemon frames
        self.relay_frames_daemon_rate_limited = self._counter(
            "relay_frames_daemon_rate_limited_total", "Daemon or worker frames refused by the limiter.")
        self.relay_frames_daemon_rejected = self._counter(
            "relay_frames_daemon_rejected_total", "Invalid daemon or worker frames.")
        self.relay_frames_daemon_rejected_profile_mismatch = self._counter(
            "relay_frames_daemon_rejected_profile_mismatch_total", "Daemon frames with a weaker profile.")
        self.relay_frames_daemon_to_clients = self._counter(
            "relay_frames_daemon_to_clients_total", "Valid daemon frames, routable or not.")
        self.relay_bytes_daemon_to_clients = self._counter(
            "relay_bytes_daemon_to_clients_total", "Bytes of valid daemon frames.")
        # routing
        self.relay_key_exchange_response_routed_local = self._counter(
            "relay_key_exchange_response_routed_local_total", "Key-exchange responses sent to a local client.")
        self.relay_key_exchange_response_routed_bus = self._counter(
            "relay_key_exchange_response_routed_bus_total", "Key-exchange responses published to the bus.")
        self.relay_key_exchange_response_dropped = self._counter(
            "relay_key_exchange_response_dropped_total", "Key-exchange responses without an owner.")
        self.relay_pairing_response_routed_local = self._counter(
            "relay_pairing_response_routed_local_total", "Pairing responses sent to a local client.")
        self.relay_pairing_response_routed_bus = self._counter(
            "relay_pairing_response_routed_bus_total", "Pairing responses published to the bus.")
        self.relay_pairing_response_dropped = self._counter(
            "relay_pairing_response_dropped_total", "Pairing responses without an owner.")
        self.relay_session_frame_routed_local = self._counter(
            "relay_session_frame_routed_local_total", "Session frames sent to a local client.")
        self.relay_session_frame_routed_bus = self._counter(
            "relay_session_frame_routed_bus_total", "Session frames published to the bus.")
        self.relay_session_frame_dropped = self._counter(
            "relay_session_frame_dropped_total", "Session frames without an owner.")
        # session events
        self.relay_session_event_subscribed = self._counter(
            "relay_session_event_subscribed_total", "Session-event subscriptions accepted.")
        self.relay_session_event_unsubscribed = self._counter(
            "relay_session_event_unsubscribed_total", "Session-event subscriptions removed.")
        self.relay_session_event_subscribe_rejected = self._counter(
            "relay_session_event_subscribe_rejected_total", "Session-event subscriptions refused.")
        self.relay_session_event_frame_delivered = self._counter(
            "relay_session_event_frame_delivered_total", "Session-event frame deliveries (by recipients).")
        self.relay_session_event_frame_dropped = self._counter(
            "relay_session_event_frame_dropped_total", "Session-event frames with no recipient.")
        # viewer presence
        self.relay_session_viewer_presence_fanned = self._counter(
            "relay_session_viewer_presence_fanned_total", "Viewer presence deliveries (by recipients).")
        self.relay_session_viewer_presence_no_peers = self._counter(
            "relay_session_viewer_presence_no_peers_total", "Viewer presence frames with no peer.")
        self.relay_session_viewer_presence_rejected = self._counter(
            "relay_session_viewer_presence_rejected_total", "Viewer presence frames refused.")
        self.relay_session_viewer_presence_rate_limited = self._counter(
            "relay_session_viewer_presence_rate_limited_total", "Viewer presence frames refused by the limiter.")
        # worker
        self.relay_worker_transport_forwarded = self._counter(
            "relay_worker_transport_forwarded_total", "Worker transport requests forwarded.")
        self.relay_worker_transport_rejected = self._counter(
            "relay_worker_transport_rejected_total", "Worker transport requests refused.")
        self.relay_worker_transport_forward_failed = self._counter(
            "relay_worker_transport_forward_failed_total", "Worker transport forwards that failed.")
        # bus routing
        self.relay_bus_frames_to_daemon = self._counter(
            "relay_bus_frames_to_daemon_total", "Bus frames delivered to a local daemon.")
        self.relay_bus_frames_to_clients = self._counter(
            "relay_bus_frames_to_clients_total", "Bus frames delivered to local clients.")
        self.relay_bus_frames_dropped = self._counter(
            "relay_bus_frames_dropped_total", "Bus frames with no local recipient.")
        self.relay_bus_frames_rejected = self._counter(
            "relay_bus_frames_rejected_total", "Bus frames refused.")
        self.relay_bus_frames_daemon_rate_limited = self._counter(
            "relay_bus_frames_daemon_rate_limited_total", "Bus daemon frames refused by the limiter.")
        # bus transport
        self.relay_bus_publish_ok = self._counter(
            "relay_bus_publish_ok_total", "Bus publishes that succeeded.")
        self.relay_bus_publish_failed = self._counter(
            "relay_bus_publish_failed_total", "Bus publishes that failed.")
        self.relay_bus_pull_ok = self._counter(
            "relay_bus_pull_ok_total", "Bus pulls that succeeded.")
        self.relay_bus_pull_failed = self._counter(
            "relay_bus_pull_failed_total", "Bus pulls that failed.")
        self.relay_bus_pull_frame_too_large = self._counter(
            "relay_bus_pull_frame_too_large_total", "Pulled bus frames over the size limit.")
        self.relay_bus_pull_invalid_signature = self._counter(
            "relay_bus_pull_invalid_signature_total", "Pulled bus frames with a bad signature.")
        self.relay_bus_pull_stale_signature = self._counter(
            "relay_bus_pull_stale_signature_total", "Pulled bus frames outside the freshness window.")
        self.relay_bus_pull_replayed_signature = self._counter(
            "relay_bus_pull_replayed_signature_total", "Pulled bus frames seen before.")
        # presence
        self.relay_presence_upsert_ok = self._counter(
            "relay_presence_upsert_ok_total", "Presence upserts that succeeded.")
        self.relay_presence_upsert_failed = self._counter(
            "relay_presence_upsert_failed_total", "Presence upserts that failed.")
        self.relay_presence_resolve_ok = self._counter(
            "relay_presence_resolve_ok_total", "Presence resolutions that succeeded.")
        self.relay_presence_resolve_failed = self._counter(
            "relay_presence_resolve_failed_total", "Presence resolutions that failed.")

        # Gauges: the contract names them with a _total suffix, which Gauge keeps as is.
        self.relay_connections_total = Gauge(
            "relay_connections_total", "Registered daemons and clients.", registry=self.registry)
        self.relay_workspaces_total = Gauge(
            "relay_workspaces_total", "Scope entries in the registry, empty ones included.",
            registry=self.registry)

        # What /ready answers, as numbers a scrape can alert on (their values are read at scrape time).
        self.relay_ready = Gauge(
            "relay_ready", "1 while /ready answers 200 (accepting upgrades, backplane working), else 0.",
            registry=self.registry)
        self.relay_backplane_healthy = Gauge(
            "relay_backplane_healthy", "1 while the backplane reaches its Redis or bus (always 1 in single mode).",
            registry=self.registry)

        # Which build is running: one sample, always 1, the version as a label (the usual *_build_info).
        build_info = Gauge(
            "relay_build_info", "The running relay's version (always 1).", ["version"], registry=self.registry)
        build_info.labels(version=__version__).set(1)

        self.relay_forward_client_to_daemon_seconds = LatencyHistogram(
            "relay_forward_client_to_daemon_seconds",
            "Time to forward one client frame to the daemon.",
            FORWARD_LATENCY_BUCKETS,
        )
        self.relay_forward_daemon_to_client_seconds = LatencyHistogram(
            "relay_forward_daemon_to_client_seconds",
            "Time to forward one daemon frame to its clients.",
            FORWARD_LATENCY_BUCKETS,
        )
        self.registry.register(
            _HistogramCollector(
                [self.relay_forward_client_to_daemon_seconds, self.relay_forward_daemon_to_client_seconds]
            )
        )

    def _counter(self, name: str, documentation: str) -> EventCount:
        """Create and register one counter; ``name`` is the exposed name, ending in ``_total``."""
        if not name.endswith("_total"):
            raise ValueError(f"counter name {name!r} must end in _total")
        if name in self.counters:
            raise ValueError(f"counter {name!r} registered twice")
        count = EventCount()
        self.counters[name] = count
        self._documented[name] = (count, documentation)
        return count

    def counter_values(self) -> dict[str, int]:
        """Every counter that moved, by its exposed name (logged when the relay stops)."""
        values: dict[str, int] = {}
        for name, counter in self.counters.items():
            value = counter.value
            if value:
                values[name] = value
        return values

    def render(self) -> bytes:
        """Return the Prometheus text exposition (format 0.0.4) of every metric."""
        return generate_latest(self.registry)
