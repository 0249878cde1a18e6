"""End-to-end: a daemon on one relay, its clients on others, over Redis and over viewport-bus (server mode)."""

from __future__ import annotations

import json
import time
from typing import Any, Dict, List

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

from tests.relay_cluster import (
    CROSS_RELAY_MODES,
    Backplane,
    BusOnScratchDatabase,
    all_ready,
    expect_status,
    key_exchange,
    relay_id_of,
    ws_url,
)
from tests.support import (
    CHANNEL,
    OTHER_CHANNEL,
    RelayProcess,
    assert_nothing_pending,
    envelope,
    fetch_metrics,
    kex_init,
    kex_response,
    offer_request,
    offer_response,
    open_peer,
    poll_until,
    presence,
    redeem_request,
    redeem_response,
    session_event,
    start_relays,
    stop_all,
    stop_relays,
    subscribe,
    token,
    unique_workspace,
)
from viewport.client import ReconnectingConnection, UpgradeRefused, connect


class Cluster:
    """Three started relays on one backplane."""

    def __init__(self, backplane: Backplane, a: RelayProcess, b: RelayProcess, c: RelayProcess) -> None:
        self.backplane = backplane
        self.a = a
        self.b = b
        self.c = c


@pytest.fixture(scope="module")
def bus() -> Any:
    """One viewport-bus on a scratch database, shared by the server-mode relays of this module."""
    process = BusOnScratchDatabase()
    pytest_twisted.blockon(process.start())
    yield process
    pytest_twisted.blockon(process.close())


def make_backplane(request: Any, mode: str) -> Backplane:
    """A fresh backplane of ``mode`` (server mode starts the module's bus on first use)."""
    return Backplane(mode, bus_url=request.getfixturevalue("bus").url if mode == "server" else "")


@pytest.fixture(scope="module", params=CROSS_RELAY_MODES)
def cluster(request: Any) -> Any:
    """Relays A, B and C forwarding over the bus (no client redirect), ready."""
    backplane = make_backplane(request, request.param)
    relays = [backplane.relay(name) for name in ("a", "b", "c")]
    pytest_twisted.blockon(start_relays(*relays))
    try:
        pytest_twisted.blockon(all_ready(relays))
        yield Cluster(backplane, *relays)
    finally:
        pytest_twisted.blockon(stop_relays(*relays))


@pytest.fixture(scope="module", params=CROSS_RELAY_MODES)
def redirecting(request: Any) -> Any:
    """Relays A and B with client redirect on, each announcing its real URL (fixed free ports), ready."""
    backplane = make_backplane(request, request.param)
    relays = [backplane.relay(name, redirect=True) for name in ("a", "b")]
    pytest_twisted.blockon(start_relays(*relays))
    try:
        pytest_twisted.blockon(all_ready(relays))
        yield backplane, relays[0], relays[1]
    finally:
        pytest_twisted.blockon(stop_relays(*relays))


@inlineCallbacks
def daemon_on(cluster_backplane: Backplane, relay: RelayProcess, ws: str) -> Any:
    """A daemon for (ws, rt1) on ``relay``, once the backplane names that relay."""
    daemon = yield open_peer(relay, "workspace-daemon", ws, "rt1")
    yield cluster_backplane.presence_at(ws, "rt1", relay)
    return daemon


# --- 1. bus forwarding between relays ------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_key_exchange_and_e2ee_cross_relays_reach_only_their_owner(cluster: Cluster) -> Any:
    """Clients on B and C key-exchange with A's daemon, envelopes flow both ways, nobody sees another's frames."""
    ws = unique_workspace("kex")
    daemon = yield daemon_on(cluster.backplane, cluster.a, ws)
    alice = yield open_peer(cluster.b, "client", ws, "rt1", clientId="alice")
    bob = yield open_peer(cluster.b, "client", ws, "rt1", clientId="bob")
    carol = yield open_peer(cluster.c, "client", ws, "rt1", clientId="carol")
    try:
        for client, request_id in ((alice, "ra"), (bob, "rb"), (carol, "rc")):
            client.send_text(kex_init(request_id))
            assert (yield daemon.next_message()) == kex_init(request_id)
        daemon.send_text(kex_response("ra", "sa"))
        daemon.send_text(envelope("sa", 1))
        daemon.send_text(kex_response("rb", "sb"))
        daemon.send_text(kex_response("rc", "sc"))
        assert (yield alice.next_message()) == kex_response("ra", "sa")
        assert (yield alice.next_message()) == envelope("sa", 1)
        # Each relay hands bus frames over in order: a leak of alice's frames would come first.
        assert (yield bob.next_message()) == kex_response("rb", "sb")
        assert (yield carol.next_message()) == kex_response("rc", "sc")
        alice.send_text(envelope("sa", 2))
        assert (yield daemon.next_message()) == envelope("sa", 2)
        carol.send_text(envelope("sc", 3))
        assert (yield daemon.next_message()) == envelope("sc", 3)
        daemon.send_text(envelope("sa", 4))
        daemon.send_text(envelope("sc", 5))
        daemon.send_text(envelope("sb", 6))
        assert (yield alice.next_message()) == envelope("sa", 4)
        assert (yield carol.next_message()) == envelope("sc", 5)
        assert (yield bob.next_message()) == envelope("sb", 6)
        yield assert_nothing_pending(alice, bob, carol)
        metrics = yield fetch_metrics(cluster.a)
        assert metrics["relay_key_exchange_response_routed_bus_total"] >= 3
        assert metrics["relay_session_frame_routed_bus_total"] >= 4
    finally:
        yield stop_all(daemon, alice, bob, carol)


@pytest_twisted.inlineCallbacks
def test_pairing_round_trip_across_relays(cluster: Cluster) -> Any:
    """Pairing offer and redeem from a client on B reach A's daemon and the answers return only to it."""
    ws = unique_workspace("pair")
    daemon = yield daemon_on(cluster.backplane, cluster.a, ws)
    asker = yield open_peer(cluster.b, "client", ws, "rt1", scope="pairing", clientId="asker")
    other = yield open_peer(cluster.c, "client", ws, "rt1", scope="pairing", clientId="other")
    try:
        asker.send_text(offer_request("p1"))
        assert (yield daemon.next_message()) == offer_request("p1")
        daemon.send_text(offer_response("p1"))
        assert (yield asker.next_message()) == offer_response("p1")
        asker.send_text(redeem_request("p2"))
        assert (yield daemon.next_message()) == redeem_request("p2")
        daemon.send_text(redeem_response("p2"))
        other.send_text(offer_request("p3"))
        assert (yield daemon.next_message()) == offer_request("p3")
        daemon.send_text(offer_response("p3"))
        assert (yield asker.next_message()) == redeem_response("p2")
        assert (yield other.next_message()) == offer_response("p3")
        yield assert_nothing_pending(asker, other)
    finally:
        yield stop_all(daemon, asker, other)


@pytest_twisted.inlineCallbacks
def test_session_events_and_viewer_presence_cross_relays(cluster: Cluster) -> Any:
    """Session events from A's daemon reach subscribers on every relay; viewer presence crosses relays, never back."""
    ws = unique_workspace("events")
    daemon = yield daemon_on(cluster.backplane, cluster.a, ws)

    def viewer(relay: RelayProcess, name: str) -> Any:
        return open_peer(relay, "client", ws, "rt1", scope="session-events", sessionChannels=[CHANNEL], clientId=name)

    on_a = yield viewer(cluster.a, "on-a")
    on_b = yield viewer(cluster.b, "on-b")
    on_c = yield viewer(cluster.c, "on-c")
    try:
        for conn in (on_a, on_b, on_c):
            conn.send_text(subscribe(CHANNEL))
            assert (yield conn.next_json())["type"] == "viewport.session_events.subscribed/v1"
        daemon.send_text(session_event(OTHER_CHANNEL, 1))
        daemon.send_text(session_event(CHANNEL, 2))
        for conn in (on_a, on_b, on_c):
            assert (yield conn.next_message()) == session_event(CHANNEL, 2)
        on_b.send_text(presence(CHANNEL, "user-b"))
        assert (yield on_a.next_message()) == presence(CHANNEL, "user-b")
        assert (yield on_c.next_message()) == presence(CHANNEL, "user-b")
        on_a.send_text(presence(CHANNEL, "user-a"))
        assert (yield on_b.next_message()) == presence(CHANNEL, "user-a")
        assert (yield on_c.next_message()) == presence(CHANNEL, "user-a")
        yield assert_nothing_pending(on_a, on_b, on_c)
    finally:
        yield stop_all(daemon, on_a, on_b, on_c)


@pytest_twisted.inlineCallbacks
def test_daemon_disconnect_reaches_clients_on_other_relays(cluster: Cluster) -> Any:
    """When A's daemon disconnects, clients on B and C get DAEMON_UNAVAILABLE, and so does their next frame."""
    ws = unique_workspace("gone")
    daemon = yield daemon_on(cluster.backplane, cluster.a, ws)
    on_b = yield open_peer(cluster.b, "client", ws, "rt1")
    on_c = yield open_peer(cluster.c, "client", ws, "rt1")
    try:
        yield key_exchange(on_b, daemon, "r1", "s1")
        yield daemon.close()
        notice = yield expect_status(on_b, "DAEMON_UNAVAILABLE")
        assert notice["workspaceId"] == ws and notice["runtimeTargetId"] == "rt1"
        yield expect_status(on_c, "DAEMON_UNAVAILABLE")
        yield cluster.backplane.presence_at(ws, "rt1", None)
        on_b.send_text(kex_init("r2"))
        yield expect_status(on_b, "DAEMON_UNAVAILABLE")
        on_c.send_text(envelope("s1", 2))
        yield expect_status(on_c, "DAEMON_UNAVAILABLE")
    finally:
        yield stop_all(daemon, on_b, on_c)


@pytest_twisted.inlineCallbacks
def test_frame_with_no_daemon_anywhere_gets_daemon_unavailable(cluster: Cluster) -> Any:
    """A client frame for a runtime target no relay holds is answered DAEMON_UNAVAILABLE without publishing."""
    ws = unique_workspace("nobody")
    client = yield open_peer(cluster.b, "client", ws, "rt1")
    try:
        before = yield fetch_metrics(cluster.b)
        client.send_text(kex_init("r1"))
        yield expect_status(client, "DAEMON_UNAVAILABLE")
        after = yield fetch_metrics(cluster.b)
        assert after["relay_bus_publish_ok_total"] == before["relay_bus_publish_ok_total"]
        assert after["relay_client_messages_dropped_total"] == before["relay_client_messages_dropped_total"] + 1
    finally:
        yield stop_all(client)


@pytest.mark.parametrize("cluster", ["redis", "redis-cluster"], indirect=True)
@pytest_twisted.inlineCallbacks
def test_redis_publish_reaching_nobody_gives_daemon_unavailable(cluster: Cluster) -> Any:
    """Redis mode (PUBLISH, or SPUBLISH on a cluster, counts receivers): a stale presence leads to a publish that reaches nobody, answered DAEMON_UNAVAILABLE."""
    ws = unique_workspace("stale")
    key = cluster.backplane.presence_key(ws, "rt1")
    stale = {"relayId": relay_id_of(cluster.c), "relayWsBaseUrl": "ws://127.0.0.1:9/ws", "daemonConnected": True,
             "runtimeTargetId": "rt1", "updatedAtMs": 0}
    cluster.backplane.redis("SET", key, json.dumps(stale), "PX", "30000")
    before = yield fetch_metrics(cluster.b)
    # B looks the presence up when the client registers and for its frame (once if the first answer is cached by then).
    client = yield open_peer(cluster.b, "client", ws, "rt1")
    try:
        client.send_text(kex_init("r1"))
        yield expect_status(client, "DAEMON_UNAVAILABLE")
        after = yield fetch_metrics(cluster.b)
        assert after["relay_bus_publish_failed_total"] == before["relay_bus_publish_failed_total"] + 1
        assert after["relay_presence_resolve_ok_total"] - before["relay_presence_resolve_ok_total"] in (1, 2)
    finally:
        cluster.backplane.redis("DEL", key)
        yield stop_all(client)


# --- 2. client redirect ---------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_in_band_redirect_once_and_first_frame_still_forwarded(redirecting: Any) -> Any:
    """A client on B is told once (RELAY_REDIRECT naming A) and its frames still reach A's daemon over the bus."""
    backplane, a, b = redirecting
    ws = unique_workspace("inband")
    daemon = yield daemon_on(backplane, a, ws)
    client = yield open_peer(b, "client", ws, "rt1")
    try:
        redirect = yield expect_status(client, "RELAY_REDIRECT")
        assert redirect["relayWsBaseUrl"] == ws_url(a.port)
        assert "runtimeTargetId" not in redirect
        yield key_exchange(client, daemon, "r1", "s1")
        client.send_text(envelope("s1", 1))
        assert (yield daemon.next_message()) == envelope("s1", 1)
        daemon.send_text(envelope("s1", 2))
        assert (yield client.next_message()) == envelope("s1", 2)
        yield assert_nothing_pending(client)
    finally:
        yield stop_all(daemon, client)


@pytest_twisted.inlineCallbacks
def test_http_redirect_answers_307_to_the_daemon_relay(redirecting: Any) -> Any:
    """With redirect=http B answers 307 to A; connect() follows it and the key exchange is local to A."""
    backplane, a, b = redirecting
    ws = unique_workspace("http")
    daemon = yield daemon_on(backplane, a, ws)
    bearer = token("client", ws, "rt1")
    options: Dict[str, Any] = dict(token=bearer, role="client", workspace_id=ws, runtime_target_id="rt1",
                                   http_redirect=True)
    client = None
    try:
        with pytest.raises(UpgradeRefused) as refused:
            yield connect(reactor, b.url, follow_redirects=False, **options)
        assert refused.value.status == 307
        assert (refused.value.location or "").startswith(ws_url(a.port) + "?")
        client = yield connect(reactor, b.url, **options)
        assert client.url.startswith(ws_url(a.port) + "?")
        assert [url.split("?")[0] for url in client.redirected_from] == [b.url]
        yield key_exchange(client, daemon, "r1", "s1")
        metrics = yield fetch_metrics(a)
        assert metrics["relay_key_exchange_response_routed_local_total"] >= 1
    finally:
        yield stop_all(daemon, client)


@pytest.fixture(params=CROSS_RELAY_MODES)
def fresh_backplane(request: Any) -> Backplane:
    """A backplane of each cross-relay mode for relays the test starts (and may kill) itself."""
    return make_backplane(request, request.param)


@pytest_twisted.inlineCallbacks
def test_no_redirect_points_at_a_relay_that_died(fresh_backplane: Backplane) -> Any:
    """
    Relay A, holding the daemon, is SIGKILLed (no goodbye). Within 3 s an idle client on B is told
    DAEMON_UNAVAILABLE, and B neither answers a 307 naming A nor sends RELAY_REDIRECT: a client
    opening on B stays and is told DAEMON_UNAVAILABLE.
    """
    backplane = fresh_backplane
    a, b = (backplane.relay(name, redirect=True) for name in ("ghost-a", "ghost-b"))
    yield start_relays(a, b)
    ws = unique_workspace("ghost")
    options: Dict[str, Any] = dict(token=token("client", ws, "rt1"), role="client", workspace_id=ws,
                                   runtime_target_id="rt1", http_redirect=True)
    client = idle = None
    try:
        yield all_ready([a, b])
        yield daemon_on(backplane, a, ws)
        idle = yield open_peer(b, "client", ws, "rt1", clientId="idle")
        yield expect_status(idle, "RELAY_REDIRECT")
        with pytest.raises(UpgradeRefused) as refused:
            yield connect(reactor, b.url, follow_redirects=False, **options)
        assert refused.value.status == 307 and (refused.value.location or "").startswith(ws_url(a.port))
        a.signal("KILL")
        killed_at = time.monotonic()
        yield expect_status(idle, "DAEMON_UNAVAILABLE", timeout=10.0)
        told_after = time.monotonic() - killed_at

        @inlineCallbacks
        def opened_on_b() -> Any:
            try:
                conn = yield connect(reactor, b.url, follow_redirects=False, **options)
            except UpgradeRefused as still:
                assert still.status == 307, still  # anything else is a failure of its own
                return None
            return conn

        client = yield poll_until(opened_on_b, 10.0, "B no longer redirecting to the dead relay")
        redirects_for = time.monotonic() - killed_at
        print(f"\n{backplane.mode}: idle client on B told {told_after:.2f} s and redirects to the dead relay "
              f"stopped {redirects_for:.2f} s after the kill")
        assert told_after <= 3.0 and redirects_for <= 3.0
        client.send_text(kex_init("r1"))
        yield expect_status(client, "DAEMON_UNAVAILABLE")
        yield assert_nothing_pending(client)
    finally:
        yield stop_all(client, idle)
        yield stop_relays(a, b)


@pytest_twisted.inlineCallbacks
def test_reconnecting_client_follows_both_redirects_to_the_daemon_relay(redirecting: Any) -> Any:
    """ReconnectingConnection clients pointed at B end up on A, whether told in-band or by a 307."""
    backplane, a, b = redirecting
    ws = unique_workspace("follow")
    daemon = yield daemon_on(backplane, a, ws)
    followers: List[ReconnectingConnection] = []
    landed: List[List[str]] = []
    try:
        for http_redirect in (False, True):
            redirected: List[str] = []
            follower = ReconnectingConnection(
                reactor, b.url, token_factory=lambda: token("client", ws, "rt1"), role="client", workspace_id=ws,
                runtime_target_id="rt1", http_redirect=http_redirect, base_delay=0.05, max_delay=0.2,
                on_redirected=redirected.append,
            )
            followers.append(follower)
            landed.append(redirected)
            follower.start()
        yield poll_until(
            lambda: all(f.connected and f.current is not None and f.current.url.startswith(ws_url(a.port))
                        for f in followers),
            10, "clients on A")
        assert landed == [[ws_url(a.port)], [ws_url(a.port)]]
        received: List[str] = []
        for n, follower in enumerate(followers):
            follower.on_message = received.append
            follower.send_text(kex_init(f"r{n}"))
            assert (yield daemon.next_message()) == kex_init(f"r{n}")
            daemon.send_text(kex_response(f"r{n}", f"s{n}"))
            yield poll_until(lambda: kex_response(f"r{n}", f"s{n}") in received, 10, "key exchange response")
    finally:
        for follower in followers:
            yield follower.stop()
        yield stop_all(daemon)
