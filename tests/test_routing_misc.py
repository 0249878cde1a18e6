"""Router: the worker pipeline, counters, and the warning budget."""

from __future__ import annotations

from typing import List

from twisted.trial.unittest import SynchronousTestCase

from tests.routing_support import (
    Harness,
    e2ee,
    peer,
    worker_request,
)
from viewport.relay import frames
from viewport.relay.router import Router


class WorkerTests(SynchronousTestCase):
    """The worker transport decisions the router makes (docs/protocol.md §4.8)."""

    def setUp(self) -> None:
        self.h = Harness()
        self.worker = self.h.connect("worker", rt=None, managed_executor_id="e1")

    def test_path_denied(self) -> None:
        """A path outside the worker's executor is answered 403 WORKER_TRANSPORT_PATH_DENIED."""
        self.h.router.worker_frame(self.worker, worker_request("/api/runtime/workspaces/ws1/managed-executors/e2"), 0)
        self.assertEqual(peer(self.worker).texts, [frames.worker_path_denied("w1")])
        self.assertEqual((self.h.forwarded, self.h.count("relay_worker_transport_rejected")), ([], 1))

    def test_path_allowed_forwarded(self) -> None:
        """A path under the executor is handed to the forwarder."""
        path = "/api/runtime/workspaces/ws1/managed-executors/e1/runs"
        self.h.router.worker_frame(self.worker, worker_request(path), 0)
        self.assertEqual([(c, p) for c, _, p in self.h.forwarded], [(self.worker, path)])

    def test_invalid_worker_frame(self) -> None:
        """An invalid worker frame is dropped silently and counted."""
        self.h.router.worker_frame(self.worker, e2ee(), 0)
        self.assertEqual((peer(self.worker).history, self.h.count("relay_frames_daemon_rejected")), ([], 1))


class MetricsTests(SynchronousTestCase):
    """Counters move with the traffic they describe."""

    def test_render_after_forwarding(self) -> None:
        """The exposition shows a forwarded frame and a registered connection."""
        h = Harness()
        daemon, client = h.daemon(), h.client()
        h.router.client_frame(client, e2ee(), 0)
        h.router.daemon_frame(daemon, e2ee("ghost"), 0)
        text = h.metrics.render().decode()
        for line in ("relay_frames_client_to_daemon_total 1.0", "relay_frames_daemon_to_clients_total 1.0",
                     "relay_session_frame_dropped_total 1.0", "relay_ws_connections_opened_total 2.0",
                     "relay_connections_total 2.0"):
            self.assertIn(line + "\n", text)


class WarningBudgetTests(SynchronousTestCase):
    """A peer sending garbage cannot flood the log: warnings are budgeted per event name per heartbeat tick."""

    def test_warnings_beyond_budget_are_counted_not_logged(self) -> None:
        """Past the budget, invalid frames are still answered but logged once as a suppressed count."""
        from twisted.logger import globalLogPublisher

        from viewport.relay.routing.events import WARNINGS_PER_TICK

        h = Harness({"RELAY_RUNTIME_RATE_PER_MINUTE": "100000"})
        conn = h.client()
        seen: List[dict] = []
        globalLogPublisher.addObserver(seen.append)
        try:
            for _ in range(WARNINGS_PER_TICK + 7):
                h.router.client_frame(conn, b"garbage", 0)
            h.router.reset_log_budget()
        finally:
            globalLogPublisher.removeObserver(seen.append)
        events = [e.get("relay_event") for e in seen]
        self.assertEqual(events.count("client_frame_rejected"), WARNINGS_PER_TICK)
        suppressed = [e for e in seen if e.get("relay_event") == "log_events_suppressed"]
        self.assertEqual(suppressed[0]["counts"], [("client_frame_rejected", 7)])
        self.assertEqual(len(peer(conn).texts), WARNINGS_PER_TICK + 7)
