"""Tests for viewport.relay.metrics: the contract's metric names, counters, gauges and histograms."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from viewport import __version__
from viewport.relay.metrics import (
    CONTENT_TYPE,
    FORWARD_LATENCY_BUCKETS,
    EventCount,
    LatencyHistogram,
    RelayMetrics,
)

# Typed out from the contract (the reference description's metrics list; docs/protocol.md §8),
# independently of the module under test.
SPEC_COUNTERS = frozenset(
    """
    relay_upgrade_rate_limited_total
    relay_upgrade_rejected_total_connections_total
    relay_upgrade_rejected_ip_connections_total
    relay_upgrade_invalid_query_total
    relay_upgrade_missing_auth_total
    relay_upgrade_rejected_workspace_clients_total
    relay_admission_ok_total
    relay_admission_denied_total
    relay_client_redirect_total
    relay_upgrade_errors_total
    relay_admin_unauthorized_total
    relay_ws_connections_opened_total
    relay_ws_connections_closed_total
    relay_ws_connections_rejected_total
    relay_ws_frame_too_large_total
    relay_ws_idle_terminated_total
    relay_ws_stale_terminated_total
    relay_ws_slow_client_terminated_total
    relay_workspace_evictions_total
    relay_frames_client_rejected_total
    relay_frames_client_rejected_scope_total
    relay_frames_client_rejected_profile_mismatch_total
    relay_frames_client_kex_rate_limited_total
    relay_frames_client_runtime_rate_limited_total
    relay_frames_client_pairing_rate_limited_total
    relay_frames_client_to_daemon_total
    relay_bytes_client_to_daemon_total
    relay_client_messages_dropped_total
    relay_client_messages_routed_bus_total
    relay_frames_daemon_rate_limited_total
    relay_frames_daemon_rejected_total
    relay_frames_daemon_rejected_profile_mismatch_total
    relay_frames_daemon_to_clients_total
    relay_bytes_daemon_to_clients_total
    relay_key_exchange_response_routed_local_total
    relay_key_exchange_response_routed_bus_total
    relay_key_exchange_response_dropped_total
    relay_pairing_response_routed_local_total
    relay_pairing_response_routed_bus_total
    relay_pairing_response_dropped_total
    relay_session_frame_routed_local_total
    relay_session_frame_routed_bus_total
    relay_session_frame_dropped_total
    relay_session_event_subscribed_total
    relay_session_event_unsubscribed_total
    relay_session_event_subscribe_rejected_total
    relay_session_event_frame_delivered_total
    relay_session_event_frame_dropped_total
    relay_session_viewer_presence_fanned_total
    relay_session_viewer_presence_no_peers_total
    relay_session_viewer_presence_rejected_total
    relay_session_viewer_presence_rate_limited_total
    relay_worker_transport_forwarded_total
    relay_worker_transport_rejected_total
    relay_worker_transport_forward_failed_total
    relay_bus_frames_to_daemon_total
    relay_bus_frames_to_clients_total
    relay_bus_frames_dropped_total
    relay_bus_frames_rejected_total
    relay_bus_frames_daemon_rate_limited_total
    relay_bus_publish_ok_total
    relay_bus_publish_failed_total
    relay_bus_pull_ok_total
    relay_bus_pull_failed_total
    relay_bus_pull_frame_too_large_total
    relay_bus_pull_invalid_signature_total
    relay_bus_pull_stale_signature_total
    relay_bus_pull_replayed_signature_total
    relay_presence_upsert_ok_total
    relay_presence_upsert_failed_total
    relay_presence_resolve_ok_total
    relay_presence_resolve_failed_total
    """.split()
)
SPEC_GAUGES = frozenset({"relay_connections_total", "relay_workspaces_total"})
#: Counters of ours beyond the contract's (docs/protocol.md §8 lists them).
OWN_COUNTERS = frozenset({
    "relay_upgrade_rejected_origin_total",
    "relay_bus_frames_expired_total",
    "relay_bus_frames_out_of_order_total",
    "relay_bus_frames_missing_total",
    "relay_presence_dead_relay_total",
    "relay_remote_relay_dead_total",
    "relay_bus_daemon_frames_lost_total",
    "relay_bus_loss_notices_sent_total",
})
COUNTERS = SPEC_COUNTERS | OWN_COUNTERS
#: Our gauge beyond the contract's: the version, as a label (docs/protocol.md §8).
BUILD_INFO = "relay_build_info"
#: Our gauges of /ready's answer.
OWN_GAUGES = frozenset({"relay_ready", "relay_backplane_healthy"})
HISTOGRAMS = ("relay_forward_client_to_daemon_seconds", "relay_forward_daemon_to_client_seconds")


def samples(text: bytes) -> dict[str, float]:
    """Parse exposition text into ``{sample name with labels: value}``."""
    result: dict[str, float] = {}
    for line in text.decode("utf-8").splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            result[name] = float(value)
    return result


def types(text: bytes) -> dict[str, str]:
    """Parse the ``# TYPE`` lines into ``{name: type}``."""
    result: dict[str, str] = {}
    for line in text.decode("utf-8").splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            result[name] = kind
    return result


class RelayMetricsTests(SynchronousTestCase):
    """RelayMetrics exposes exactly the contract's metrics in Prometheus text format."""

    def test_spec_lists(self) -> None:
        """The contract lists 72 counters and 2 gauges, 74 names in all."""
        self.assertEqual(len(SPEC_COUNTERS), 72)
        self.assertEqual(len(SPEC_COUNTERS | SPEC_GAUGES), 74)

    def test_exposes_exactly_spec_names(self) -> None:
        """Apart from the latency histograms, the exposed sample names are the 74 contract names and our own counters."""
        exposed = {
            name for name in samples(RelayMetrics().render()) if not name.startswith(HISTOGRAMS)
        }
        self.assertEqual(exposed, COUNTERS | SPEC_GAUGES | OWN_GAUGES | {f'{BUILD_INFO}{{version="{__version__}"}}'})

    def test_types(self) -> None:
        """Counters are typed counter, the two gauges gauge and the latencies histogram."""
        declared = types(RelayMetrics().render())
        expected = {name: "counter" for name in COUNTERS}
        expected.update({name: "gauge" for name in SPEC_GAUGES})
        expected.update({name: "histogram" for name in HISTOGRAMS})
        expected[BUILD_INFO] = "gauge"
        expected.update({name: "gauge" for name in OWN_GAUGES})
        self.assertEqual(declared, expected)

    def test_counters_attribute(self) -> None:
        """``counters`` lists every counter once: the contract's and our own."""
        metrics = RelayMetrics()
        self.assertEqual(len(metrics.counters), len(COUNTERS))
        self.assertEqual(set(metrics.counters), COUNTERS)

    def test_starts_at_zero(self) -> None:
        """Every counter and gauge is exposed at zero before any use."""
        exposed = samples(RelayMetrics().render())
        for name in COUNTERS | SPEC_GAUGES:
            self.assertEqual(exposed[name], 0.0, name)

    def test_no_created_series(self) -> None:
        """No ``_created`` series is exposed."""
        self.assertNotIn(b"_created", RelayMetrics().render())

    def test_attribute_per_counter(self) -> None:
        """Each counter is the attribute named after it without ``_total``, and its increments show."""
        metrics = RelayMetrics()
        for name in COUNTERS:
            counter = getattr(metrics, name[: -len("_total")])
            self.assertIsInstance(counter, EventCount)
            counter.inc()
        exposed = samples(metrics.render())
        for name in SPEC_COUNTERS:
            self.assertEqual(exposed[name], 1.0, name)

    def test_increment_by_amount(self) -> None:
        """``inc(n)`` adds n, as the byte counters need."""
        metrics = RelayMetrics()
        metrics.relay_frames_client_to_daemon.inc()
        metrics.relay_bytes_client_to_daemon.inc(250)
        metrics.relay_bytes_client_to_daemon.inc(6)
        text = metrics.render()
        self.assertIn(b"\nrelay_frames_client_to_daemon_total 1.0\n", text)
        self.assertIn(b"\nrelay_bytes_client_to_daemon_total 256.0\n", text)

    def test_gauges(self) -> None:
        """Gauges show the last value set."""
        metrics = RelayMetrics()
        metrics.relay_connections_total.set(7)
        metrics.relay_workspaces_total.set(3)
        metrics.relay_connections_total.set(5)
        exposed = samples(metrics.render())
        self.assertEqual(exposed["relay_connections_total"], 5.0)
        self.assertEqual(exposed["relay_workspaces_total"], 3.0)

    def test_histograms_present(self) -> None:
        """Both latency histograms are exposed, empty, with buckets from 10 µs to 100 ms and +Inf."""
        exposed = samples(RelayMetrics().render())
        for name in HISTOGRAMS:
            buckets = [key for key in exposed if key.startswith(name + "_bucket")]
            self.assertEqual(
                buckets,
                [f'{name}_bucket{{le="{le}"}}' for le in
                 ("1e-05", "2.5e-05", "5e-05", "0.0001", "0.00025", "0.0005", "0.001", "0.0025",
                  "0.005", "0.01", "0.025", "0.05", "0.1", "+Inf")],
            )
            self.assertEqual(exposed[name + "_count"], 0.0)
            self.assertEqual(exposed[name + "_sum"], 0.0)

    def test_histogram_observe(self) -> None:
        """Observations land in cumulative ``le`` buckets (bounds inclusive), with count and sum."""
        metrics = RelayMetrics()
        histogram = metrics.relay_forward_client_to_daemon_seconds
        for seconds in (0.00001, 0.00003, 0.002, 5.0):
            histogram.observe(seconds)
        exposed = samples(metrics.render())
        name = "relay_forward_client_to_daemon_seconds"
        self.assertEqual(exposed[f'{name}_bucket{{le="1e-05"}}'], 1.0)
        self.assertEqual(exposed[f'{name}_bucket{{le="2.5e-05"}}'], 1.0)
        self.assertEqual(exposed[f'{name}_bucket{{le="5e-05"}}'], 2.0)
        self.assertEqual(exposed[f'{name}_bucket{{le="0.0025"}}'], 3.0)
        self.assertEqual(exposed[f'{name}_bucket{{le="0.1"}}'], 3.0)
        self.assertEqual(exposed[f'{name}_bucket{{le="+Inf"}}'], 4.0)
        self.assertEqual(exposed[name + "_count"], 4.0)
        self.assertAlmostEqual(exposed[name + "_sum"], 5.00204)
        self.assertEqual(histogram.count, 4)
        self.assertAlmostEqual(histogram.sum, 5.00204)
        self.assertEqual(exposed["relay_forward_daemon_to_client_seconds_count"], 0.0)

    def test_instances_independent(self) -> None:
        """Two relays in one process keep separate registries and values."""
        first, second = RelayMetrics(), RelayMetrics()
        first.relay_admission_ok.inc(3)
        first.relay_connections_total.set(2)
        first.relay_forward_daemon_to_client_seconds.observe(0.001)
        self.assertIsNot(first.registry, second.registry)
        one, two = samples(first.render()), samples(second.render())
        self.assertEqual(one["relay_admission_ok_total"], 3.0)
        self.assertEqual(two["relay_admission_ok_total"], 0.0)
        self.assertEqual(one["relay_connections_total"], 2.0)
        self.assertEqual(two["relay_connections_total"], 0.0)
        self.assertEqual(one["relay_forward_daemon_to_client_seconds_count"], 1.0)
        self.assertEqual(two["relay_forward_daemon_to_client_seconds_count"], 0.0)

    def test_render_format(self) -> None:
        """``render`` gives UTF-8 text ending in a newline, with the contract's content type."""
        text = RelayMetrics().render()
        self.assertIsInstance(text, bytes)
        self.assertTrue(text.endswith(b"\n"))
        self.assertEqual(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")


class LatencyHistogramTests(SynchronousTestCase):
    """LatencyHistogram validates its buckets."""

    def test_default_buckets(self) -> None:
        """The default bounds run from 10 µs to 100 ms in increasing order."""
        self.assertEqual(FORWARD_LATENCY_BUCKETS[0], 0.00001)
        self.assertEqual(FORWARD_LATENCY_BUCKETS[-1], 0.1)
        self.assertEqual(list(FORWARD_LATENCY_BUCKETS), sorted(FORWARD_LATENCY_BUCKETS))

    def test_bad_buckets(self) -> None:
        """Empty or duplicated bounds are refused."""
        self.assertRaises(ValueError, LatencyHistogram, "x_seconds", "x", [])
        self.assertRaises(ValueError, LatencyHistogram, "x_seconds", "x", [0.1, 0.1])
