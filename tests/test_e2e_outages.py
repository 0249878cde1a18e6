"""End-to-end: relays losing and regaining Redis, viewport-bus or PostgreSQL, and a relay switching backplane mode."""

from __future__ import annotations

from typing import Any, List, Optional

import pytest
import pytest_twisted
from twisted.internet.defer import inlineCallbacks

from tests.pg_server import PrivateCluster, ScratchDatabase
from tests.ports import free_port
from tests.redis_server import RedisServer
from tests.relay_cluster import (
    MODES,
    Backplane,
    BusOnScratchDatabase,
    all_ready,
    expect_status,
    key_exchange,
    ws_url,
)
from tests.support import (
    EchoDaemon,
    RelayProcess,
    e2e_env,
    envelope,
    fetch_metrics,
    kex_init,
    kex_response,
    metric_reaches,
    open_peer,
    poll_until,
    start_relays,
    stop_all,
    stop_relays,
    unique_workspace,
)
from viewport.client import MessageTimeout, RelayConnection, is_status


@inlineCallbacks
def drain_statuses(conn: RelayConnection, code: str, at_least: int) -> Any:
    """Read the statuses ``conn`` got (at least ``at_least``; all must be ``code``) until none follows for a moment."""
    seen = 0
    while True:
        try:
            frame = yield conn.next_json(timeout=1.0 if seen >= at_least else 10.0)
        except MessageTimeout:
            return seen
        assert is_status(frame, code), frame
        seen += 1


@inlineCallbacks
def outage_then_recovery(backplane: Backplane, relays: List[RelayProcess], down: Any, up: Any) -> Any:
    """
    Daemon on relays[0], client on relays[1]: a key exchange works; ``down()`` makes both relays answer
    /ready 503 and the client's frames DAEMON_UNAVAILABLE; after ``up()`` /ready is 200 again and
    traffic resumes with nothing from the outage delivered late or twice.
    """
    a, b = relays
    ws = unique_workspace("outage")
    daemon = yield open_peer(a, "workspace-daemon", ws, "rt1")
    client: Optional[RelayConnection] = None
    try:
        yield backplane.presence_at(ws, "rt1", a)
        client = yield open_peer(b, "client", ws, "rt1")
        yield key_exchange(client, daemon, "r1", "s1")

        yield down()
        yield all_ready(relays, 503)
        # /metrics says the same as /ready, for alerting.
        for relay in relays:
            values = yield fetch_metrics(relay)
            assert (values["relay_ready"], values["relay_backplane_healthy"]) == (0.0, 0.0)
        # B tells its client as soon as it lost its path (and again for each frame it cannot pass on).
        yield expect_status(client, "DAEMON_UNAVAILABLE")
        client.send_text(kex_init("r-down"))
        client.send_text(envelope("s1", 2))
        lost = (yield fetch_metrics(a))["relay_bus_daemon_frames_lost_total"]
        daemon.send_text(envelope("s1", 3))
        # A could not pass the daemon's answer on: it is lost (counted), not kept for later.
        yield metric_reaches(a, "relay_bus_daemon_frames_lost_total", lost + 1)

        yield up()
        yield all_ready(relays, 200, timeout=20)
        assert (yield fetch_metrics(a))["relay_ready"] == 1.0
        yield backplane.presence_at(ws, "rt1", a)
        # Once A can publish again, B's clients hear that a frame for them was lost.
        yield metric_reaches(a, "relay_bus_loss_notices_sent_total", 1, timeout=10)
        yield drain_statuses(client, "DAEMON_UNAVAILABLE", at_least=3)
        # Frames of the outage would arrive first: each side's next frame is the new one.
        yield key_exchange(client, daemon, "r2", "s2")
        client.send_text(envelope("s2", 4))
        assert (yield daemon.next_message()) == envelope("s2", 4)
        daemon.send_text(envelope("s2", 5))
        assert (yield client.next_message()) == envelope("s2", 5)
        client.send_text("garbage")
        assert is_status((yield client.next_json()), "INVALID_FRAME")
    finally:
        yield stop_all(daemon, client)


@pytest_twisted.inlineCallbacks
def test_redis_killed_and_restarted_mid_stream() -> Any:
    """With Redis killed, /ready is 503 and client frames get DAEMON_UNAVAILABLE; after its restart traffic resumes."""
    redis = RedisServer().start()
    backplane = Backplane("redis", redis_port=redis.port)
    relays = [backplane.relay("a"), backplane.relay("b")]
    try:
        yield start_relays(*relays)
        yield all_ready(relays)
        yield outage_then_recovery(backplane, relays, redis.kill, redis.start)
    finally:
        yield stop_relays(*relays)
        redis.stop()


@pytest_twisted.inlineCallbacks
def test_bus_restarted_in_server_mode() -> Any:
    """With viewport-bus stopped, /ready is 503 and frames get DAEMON_UNAVAILABLE; once it is back traffic resumes."""
    bus = BusOnScratchDatabase(port=free_port())
    relays: List[RelayProcess] = []
    try:
        yield bus.start()
        backplane = Backplane("server", bus_url=bus.url)
        relays = [backplane.relay("a"), backplane.relay("b")]
        yield start_relays(*relays)
        yield all_ready(relays)
        yield outage_then_recovery(backplane, relays, bus.stop, bus.start)
    finally:
        yield stop_relays(*relays)
        yield bus.close()


@pytest_twisted.inlineCallbacks
def test_postgres_restarted_under_the_bus() -> Any:
    """With the bus's PostgreSQL stopped, /ready is 503 and frames get DAEMON_UNAVAILABLE; then traffic resumes."""
    cluster = PrivateCluster()
    cluster.start()
    database = ScratchDatabase(cluster.url)
    bus = BusOnScratchDatabase(database.url)
    relays: List[RelayProcess] = []
    try:
        yield bus.start()
        backplane = Backplane("server", bus_url=bus.url)
        relays = [backplane.relay("a"), backplane.relay("b")]
        yield start_relays(*relays)
        yield all_ready(relays)
        yield outage_then_recovery(backplane, relays, cluster.stop, cluster.start)
    finally:
        yield stop_relays(*relays)
        yield bus.close()
        database.drop()
        cluster.destroy()


@pytest.fixture(params=MODES)
def backplane(request: Any) -> Any:
    """A backplane of each mode (server mode: a viewport-bus of its own)."""
    if request.param == "redis":
        yield Backplane("redis")
        return
    bus = BusOnScratchDatabase()
    pytest_twisted.blockon(bus.start())
    try:
        yield Backplane("server", bus_url=bus.url)
    finally:
        pytest_twisted.blockon(bus.close())


@pytest_twisted.inlineCallbacks
def test_relay_restarted_in_another_mode_gets_its_daemon_back(backplane: Backplane) -> Any:
    """
    A single-mode relay restarted on the same port in a cross-relay mode gets its daemon back by itself, a
    client on another relay then reaches it, and SIGTERM clears the presence it owns.
    """
    ws = unique_workspace("switch")
    port = free_port()
    single = RelayProcess(e2e_env(RELAY_PUBLIC_WS_BASE_URL=ws_url(port)), port=port)
    other = backplane.relay("other")
    yield start_relays(single, other)
    switched: Optional[RelayProcess] = None
    daemon = EchoDaemon(ws_url(port), ws, max_delay=0.2)
    client: Optional[RelayConnection] = None
    try:
        yield all_ready([other])
        daemon.connection.start()
        yield poll_until(lambda: daemon.connection.connected, 10, "daemon connected")
        yield single.stop()
        switched = backplane.relay("switched", port=port)
        yield start_relays(switched)
        yield poll_until(lambda: daemon.connection.connections == 2 and daemon.connection.connected, 15,
                         "daemon reconnected")
        yield backplane.presence_at(ws, "rt1", switched)

        client = yield open_peer(other, "client", ws, "rt1")
        client.send_text(kex_init("r1"))
        assert (yield client.next_message()) == kex_response("r1", "session-r1")

        yield switched.stop()
        assert (yield backplane.presence(ws, "rt1")) is None
        # The notice that the daemon left crossed over before the relay exited.
        yield expect_status(client, "DAEMON_UNAVAILABLE")
        dropped = (yield fetch_metrics(other))["relay_client_messages_dropped_total"]
        client.send_text(kex_init("r2"))
        yield expect_status(client, "DAEMON_UNAVAILABLE")
        yield metric_reaches(other, "relay_client_messages_dropped_total", dropped + 1)
    finally:
        yield daemon.connection.stop()
        yield stop_all(client)
        yield stop_relays(*[relay for relay in (single, other, switched) if relay is not None])
