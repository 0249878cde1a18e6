"""
The redis backplane on a real Redis Cluster (3 masters, 3 replicas, private to this module): URLs, hash tags,
routing by slot, SPUBLISH's receiver count, and surviving slot moves, a manual failover and a killed master;
and rediss+cluster:// against TLS clusters (a trusted and an untrusted CA, plain ports beside the TLS ones).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Iterator, List, Tuple

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from tests.certs import make_certificates
from tests.redis_cluster import RedisCluster, start_cluster
from tests.redis_server import redis_command
from tests.support import poll_until
from viewport.environment import ConfigError
from viewport.relay.backplane.cluster_slots import key_slot
from viewport.relay.backplane.redis_cluster import (
    RedisClusterBackplane,
    cluster_bus_channel,
    cluster_presence_key,
)
from viewport.relay.backplane.redis_url import parse_redis_url
from viewport.relay.config import load_config
from viewport.relay.interfaces import BusFrame, Presence
from viewport.relay.metrics import RelayMetrics
from viewport.relay.tap import build_backplane

WAIT_SECONDS = 15.0
#: After the cluster agrees on a new master, frames flow again within this (issue 12's failover bound).
RECOVERY_SECONDS = 3.0


# -- pure ------------------------------------------------------------------------------------------


def test_a_scopes_channels_and_presence_share_a_slot() -> None:
    """Both sides' channels and the presence key of a scope hash to one slot; other scopes spread over slots."""
    for workspace, target in [("w", "rt"), ("a:b", "c"), ("a", "b:c"), ("we}ird{", "t{x}"), ("é", "")]:
        names = [cluster_bus_channel("p", "daemon", workspace, target), cluster_bus_channel("p", "clients", workspace, target),
                 cluster_presence_key("p", workspace, target)]
        assert len({key_slot(name) for name in names}) == 1, names
    assert cluster_bus_channel("p", "daemon", "a:b", "c") != cluster_bus_channel("p", "daemon", "a", "b:c")
    assert len({key_slot(cluster_presence_key("p", f"ws-{n}", "rt")) for n in range(200)}) > 150


def test_cluster_urls() -> None:
    """redis+cluster:// and rediss+cluster:// list seed nodes (default port 6379) with optional credentials."""
    target = parse_redis_url("redis+cluster://user:p%40ss@n1:7000,n2,[::1]:7001")
    assert (target.scheme, target.cluster, target.tls) == ("redis+cluster", True, False)
    assert target.seeds == (("n1", 7000), ("n2", 6379), ("::1", 7001))
    assert (target.username, target.password) == ("user", "p@ss") and "p@ss" not in repr(target)
    tls = parse_redis_url("rediss+cluster://:pw@n1:7000/")
    assert (tls.tls, tls.cluster, tls.password, tls.username) == (True, True, "pw", None)
    assert not parse_redis_url("redis://h").cluster


@pytest.mark.parametrize(
    "url", ["redis+cluster://", "redis+cluster://:hunter2@n1:7000/0", "redis+cluster://n1,,n2",
            "redis+cluster://:hunter2@n1:abc", "rediss+cluster://[::1:7000"],
)
def test_bad_cluster_urls(url: str) -> None:
    """A malformed cluster URL is a ValueError that never shows the password, and a ConfigError naming the variable."""
    with pytest.raises(ValueError) as caught:
        parse_redis_url(url)
    assert "hunter2" not in str(caught.value)
    environ = {"RELAY_BACKPLANE_MODE": "redis", "RELAY_BACKPLANE_URL": url, "RELAY_BUS_HMAC_KEY": "k" * 32}
    with pytest.raises(ConfigError) as refused:
        load_config(environ, home=tempfile.mkdtemp())
    assert refused.value.variable == "RELAY_BACKPLANE_URL" and "hunter2" not in str(refused.value)


def test_tap_builds_the_cluster_backplane() -> None:
    """RELAY_BACKPLANE_URL=redis+cluster://… builds a RedisClusterBackplane (nothing connects until start)."""
    environ = {"RELAY_BACKPLANE_MODE": "redis", "RELAY_BACKPLANE_URL": "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
               "RELAY_BUS_HMAC_KEY": "k" * 32}
    config = load_config(environ, home=tempfile.mkdtemp())
    clock = Clock()
    backplane = build_backplane(relay_id="relay-a", backplane=config.backplane, platform=config.platform,
                                max_frame_bytes=1024, reactor=clock, metrics=RelayMetrics())
    assert isinstance(backplane, RedisClusterBackplane) and not backplane.healthy
    assert clock.getDelayedCalls() == []


def test_braces_in_the_key_prefix_are_refused() -> None:
    """A key prefix with a brace would make it every key's hash tag (one shard for all): refused."""
    with pytest.raises(ValueError, match="braces"):
        RedisClusterBackplane(relay_id="a", redis_url="redis+cluster://h:1", hmac_key="k", reactor=Clock(),
                              key_prefix="viewport:{relay}")
    with pytest.raises(ValueError, match="redis\\+cluster"):
        RedisClusterBackplane(relay_id="a", redis_url="redis://h:1", hmac_key="k", reactor=Clock())


# -- on a real cluster -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    """A private cluster for this module: its tests move slots, fail over and kill masters."""
    started = start_cluster()
    try:
        yield started
    finally:
        started.stop()


class Pair:
    """Relays A (the daemon's) and B (the clients') on the cluster, under a key prefix of their own."""

    def __init__(self, cluster: RedisCluster, name: str) -> None:
        self.cluster = cluster
        self.prefix = f"viewport-test:{name}:{time.monotonic_ns()}"
        self.workspace = f"ws-{name}"
        self.received_a: List[BusFrame] = []
        self.received_b: List[BusFrame] = []
        self.paths_a: List[bool] = []
        self.paths_b: List[bool] = []
        self.a = self._backplane("relay-a")
        self.b = self._backplane("relay-b")

    def _backplane(self, relay_id: str) -> RedisClusterBackplane:
        return RedisClusterBackplane(relay_id=relay_id, redis_url=self.cluster.url, hmac_key="cluster-test-key",
                                     reactor=reactor, key_prefix=self.prefix, resolve_cache_ms=0)

    @inlineCallbacks
    def start(self) -> Any:
        """Start both; A holds the scope's daemon (presence, daemon side watched), B watches the clients side."""
        started = yield gatherResults([self.a.start(self.received_a.append, self.paths_a.append),
                                       self.b.start(self.received_b.append, self.paths_b.append)])
        assert started == [True, True]
        self.a.watch_scope(self.workspace, "rt", "daemon")
        self.b.watch_scope(self.workspace, "rt", "clients")
        yield gatherResults([self.a.subscriptions_settled(), self.b.subscriptions_settled()])
        yield self.a.announce_presence(Presence(self.workspace, "rt", "relay-a", "ws://a/ws", True))
        return self

    @property
    def slot(self) -> int:
        """The slot of the scope (channels and presence)."""
        return key_slot(self.presence_key)

    @property
    def presence_key(self) -> str:
        """The scope's presence key."""
        return cluster_presence_key(self.prefix, self.workspace, "rt")

    def to_daemon(self, n: int) -> BusFrame:
        """Frame ``n`` from B's client to A's daemon."""
        return BusFrame(self.workspace, "rt", "relay-b", "relay-a", "client_to_daemon", f'{{"n":{n}}}')

    def to_clients(self, n: int) -> BusFrame:
        """Frame ``n`` from A's daemon to B's clients."""
        return BusFrame(self.workspace, "rt", "relay-a", "relay-b", "daemon_to_clients", f'{{"n":{n}}}')

    @inlineCallbacks
    def round_trip(self, n: int) -> Any:
        """True when a frame each way was published to a receiver and arrived."""
        ok = yield gatherResults([self.b.publish(self.to_daemon(n)), self.a.publish(self.to_clients(n))])
        if not all(ok):
            return False
        payload = f'{{"n":{n}}}'
        yield poll_until(lambda: any(f.payload == payload for f in self.received_a)
                         and any(f.payload == payload for f in self.received_b), WAIT_SECONDS, f"frames {n}")
        return True

    @inlineCallbacks
    def flowing_again(self, timeout: float) -> Any:
        """Seconds until both are healthy and a round trip works (polling, bounded by ``timeout``)."""
        began = time.monotonic()
        attempt = iter(range(1, 10**6))
        yield poll_until(lambda: self.a.healthy and self.b.healthy, timeout, "both healthy")
        yield poll_until(lambda: self.round_trip(next(attempt) + 1000), timeout, "a round trip")
        return time.monotonic() - began

    def stop(self) -> Any:
        """Stop both."""
        return gatherResults([self.a.stop(), self.b.stop()])


@pytest.fixture
def pairs(cluster: RedisCluster) -> Iterator[List[Pair]]:
    """Pairs made by the test, stopped after it."""
    made: List[Pair] = []
    yield made
    pytest_twisted.blockon(gatherResults([pair.stop() for pair in made]))


@inlineCallbacks
def started_pair(cluster: RedisCluster, pairs: List[Pair], name: str) -> Any:
    """A started ``Pair``, stopped after the test."""
    pair = Pair(cluster, name)
    pairs.append(pair)
    yield pair.start()
    return pair


def source_and_target(cluster: RedisCluster, pair: Pair) -> Tuple[int, int]:
    """The master holding the pair's scope, and another master to move its slot to."""
    source = cluster.master_of(pair.slot)
    return source, next(port for port in cluster.masters() if port != source)


@pytest_twisted.inlineCallbacks
def test_a_scope_lives_on_its_slots_master(cluster: RedisCluster, pairs: List[Pair]) -> Any:
    """The presence key is stored on the master of the scope's slot, whose shard channels hold both subscriptions."""
    pair = yield started_pair(cluster, pairs, "placement")
    master = cluster.master_of(pair.slot)
    assert "relay-a" in str(redis_command(master, "GET", pair.presence_key))
    channels = redis_command(master, "PUBSUB", "SHARDCHANNELS", f"{pair.prefix}:*")
    assert sorted(channels) == sorted([cluster_bus_channel(pair.prefix, side, pair.workspace, "rt")  # type: ignore[arg-type]
                                       for side in ("daemon", "clients")])
    assert (yield pair.round_trip(1))
    found = yield pair.b.resolve_presence(pair.workspace, "rt")
    assert found is not None and found.relay_id == "relay-a"
    yield pair.a.announce_presence(Presence(pair.workspace, "rt", "relay-a", "ws://a/ws", False))
    assert redis_command(master, "GET", pair.presence_key) is None


@pytest_twisted.inlineCallbacks
def test_spublish_reaching_nobody_is_reported(cluster: RedisCluster, pairs: List[Pair]) -> Any:
    """A frame for a scope nobody watches is refused (SPUBLISH counted 0 receivers); a watched one is accepted."""
    pair = yield started_pair(cluster, pairs, "nobody")
    unwatched = BusFrame("ws-nobody-else", "rt", "relay-b", "relay-a", "client_to_daemon", "{}")
    assert (yield pair.b.publish(unwatched)) is False
    assert (yield pair.b.publish(pair.to_daemon(1))) is True
    pair.a.unwatch_scope(pair.workspace, "rt", "daemon")
    yield pair.a.subscriptions_settled()
    assert (yield pair.b.publish(pair.to_daemon(2))) is False
    assert [frame.payload for frame in pair.received_a] == ['{"n":1}']


@pytest_twisted.inlineCallbacks
def test_a_slot_move_is_followed(cluster: RedisCluster, pairs: List[Pair]) -> Any:
    """The scope's slot migrated to another master: subscriptions follow (a gap is signalled), MOVED is followed for keys."""
    pair = yield started_pair(cluster, pairs, "moving")
    source, target = source_and_target(cluster, pair)
    yield deferToThread(cluster.move_slot, pair.slot, target)
    seconds = yield pair.flowing_again(WAIT_SECONDS)
    print(f"\nslot {pair.slot} moved {source} -> {target}: flowing again after {seconds:.2f} s")
    assert pair.paths_a[-2:] == [False, True] and pair.paths_b[-2:] == [False, True]
    found = yield pair.b.resolve_presence(pair.workspace, "rt")
    assert found is not None and found.relay_id == "relay-a"
    assert "relay-a" in str(redis_command(target, "GET", pair.presence_key))


@pytest_twisted.inlineCallbacks
def test_manual_failover_resubscribes_and_reannounces(cluster: RedisCluster, pairs: List[Pair]) -> Any:
    """CLUSTER FAILOVER of the scope's shard: the gap is signalled, channels move to the new master, presence is written again."""
    pair = yield started_pair(cluster, pairs, "failover")
    master = cluster.master_of(pair.slot)
    replica = cluster.replicas_of(pair.slot)[0]
    # Aged so that a re-announcement shows: a fresh write has the full TTL again.
    redis_command(master, "PEXPIRE", pair.presence_key, "5000")
    yield deferToThread(cluster.failover, replica)
    seconds = yield pair.flowing_again(RECOVERY_SECONDS)
    print(f"\nfailover {master} -> {replica}: flowing again after {seconds:.2f} s")
    assert False in pair.paths_a and pair.paths_a[-1] is True and pair.b.healthy
    yield poll_until(lambda: int(redis_command(replica, "PTTL", pair.presence_key)) > 5000,  # type: ignore[call-overload]
                     WAIT_SECONDS, "presence re-announced on the new master")


@pytest_twisted.inlineCallbacks
def test_a_killed_master_is_survived(cluster: RedisCluster, pairs: List[Pair]) -> Any:
    """The scope's master SIGKILLed: unhealthy at once (``/ready`` says so), flowing again within 3 s of the promotion."""
    pair = yield started_pair(cluster, pairs, "killed")
    master = cluster.master_of(pair.slot)
    replica = cluster.replicas_of(pair.slot)[0]
    began = time.monotonic()
    cluster.kill(master)
    yield poll_until(lambda: not pair.a.healthy and not pair.b.healthy, WAIT_SECONDS, "both unhealthy")
    noticed = time.monotonic() - began
    assert pair.paths_b[-1] is False
    promoted = yield deferToThread(cluster.wait_for_promotion, replica)
    seconds = yield pair.flowing_again(RECOVERY_SECONDS)
    print(f"\nmaster {master} killed: unhealthy after {noticed:.2f} s, {replica} promoted after {promoted:.2f} s, "
          f"flowing again {seconds:.2f} s later")
    found = yield pair.b.resolve_presence(pair.workspace, "rt")
    assert found is not None and found.relay_id == "relay-a"
    yield deferToThread(cluster.revive, master)


@pytest_twisted.inlineCallbacks
def test_ask_is_followed_during_a_slot_migration(cluster: RedisCluster, pairs: List[Pair]) -> Any:
    """While the scope's slot migrates, a presence the source no longer has is read and written on the importing node (ASK)."""
    pair = yield started_pair(cluster, pairs, "asking")
    source, target = source_and_target(cluster, pair)
    yield deferToThread(cluster.begin_slot_move, pair.slot, target)
    try:
        # Moved by hand, as MIGRATE does key by key: the source now answers ASK for it.
        redis_command(source, "MIGRATE", "127.0.0.1", str(target), pair.presence_key, "0", "5000")
        found = yield pair.b.resolve_presence(pair.workspace, "rt")
        assert found is not None and found.relay_id == "relay-a"
        yield pair.b.announce_presence(Presence(pair.workspace, "rt", "relay-b", "ws://b/ws", True))
        found = yield pair.a.resolve_presence(pair.workspace, "rt")
        assert found is not None and found.relay_id == "relay-b"
        assert (yield pair.round_trip(1))
    finally:
        yield deferToThread(cluster.finish_slot_move, pair.slot, target)
    assert "relay-b" in str(redis_command(target, "GET", pair.presence_key))


# -- on a real TLS cluster (rediss+cluster://) -------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[RedisCluster]:
    """
    A private 3-master, 3-replica cluster on ``tls-port`` only (bus and replication over TLS too), its
    certificate for 127.0.0.1 issued by a private CA; skipped without a TLS-capable redis-server (fails in CI).
    """
    started = start_cluster(tls=True)
    try:
        yield started
    finally:
        started.stop()


def _trusting(monkeypatch: pytest.MonkeyPatch, ca_path: str) -> None:
    # What rediss:// has always used: the platform's trust store, which OpenSSL reads from SSL_CERT_FILE
    # when set (SSL_CERT_DIR unset, so that no other directory adds or hides an authority).
    monkeypatch.setenv("SSL_CERT_FILE", ca_path)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


@pytest_twisted.inlineCallbacks
def test_tls_cluster_exchanges_frames_and_resolves_presence(
    tls_cluster: RedisCluster, pairs: List[Pair], monkeypatch: pytest.MonkeyPatch
) -> Any:
    """rediss+cluster:// with the cluster's CA trusted: frames cross relays over SPUBLISH and presence resolves, all over TLS."""
    assert tls_cluster.certs is not None and tls_cluster.url.startswith("rediss+cluster://127.0.0.1:")
    _trusting(monkeypatch, tls_cluster.certs.ca_path)
    began = time.monotonic()
    pair = yield started_pair(tls_cluster, pairs, "tls")
    started = time.monotonic() - began
    assert pair.a.healthy and pair.b.healthy
    assert (yield pair.round_trip(1))
    found = yield pair.b.resolve_presence(pair.workspace, "rt")
    assert found is not None and found.relay_id == "relay-a" and found.relay_ws_base_url == "ws://a/ws"
    master = tls_cluster.master_of(pair.slot)
    assert "relay-a" in str(tls_cluster.command(master, "GET", pair.presence_key))
    # Seeds by name: verified as a DNS name (sent as SNI), the nodes then as the IPs CLUSTER SHARDS gives.
    by_name = RedisClusterBackplane(relay_id="relay-c", redis_url=tls_cluster.url.replace("127.0.0.1", "localhost"),
                                    hmac_key="cluster-test-key", reactor=reactor, key_prefix=pair.prefix,
                                    resolve_cache_ms=0)
    try:
        assert (yield by_name.start(lambda frame: None)) is True
        found = yield by_name.resolve_presence(pair.workspace, "rt")
        assert found is not None and found.relay_id == "relay-a"
    finally:
        yield by_name.stop()
    print(f"\nTLS pair healthy after {started:.2f} s")


@pytest_twisted.inlineCallbacks
def test_tls_cluster_with_an_untrusted_certificate_stays_unhealthy(
    tls_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """Another CA trusted: start() gives False within the connect timeout, healthy stays False, the reason is logged; stop() ends it."""
    other = make_certificates(tempfile.mkdtemp(prefix="viewport-other-ca-"))
    _trusting(monkeypatch, other.ca_path)
    events: List[Any] = []
    globalLogPublisher.addObserver(events.append)
    backplane = RedisClusterBackplane(relay_id="relay-a", redis_url=tls_cluster.url, hmac_key="cluster-test-key",
                                      reactor=reactor, key_prefix=f"viewport-test:untrusted:{time.monotonic_ns()}",
                                      connect_timeout_ms=1500)
    try:
        began = time.monotonic()
        assert (yield backplane.start(lambda frame: None)) is False
        assert time.monotonic() - began < 5
        assert not backplane.healthy
        errors = [formatEvent(e) for e in events if e.get("relay_event") == "relay_redis_error"]
        print("\n" + "\n".join(errors[:5]))
        # Once, however often the seeds are tried again (every 0.25 s while broken).
        assert len(errors) == 1 and errors[0].startswith("redis cluster slot map unavailable: 127.0.0.1:")
        assert errors[0].endswith("TLS handshake failed: certificate verify failed"), errors
        assert not [e for e in events if e.get("log_level") is not None and e["log_level"].name == "critical"]
        assert not backplane.healthy
    finally:
        globalLogPublisher.removeObserver(events.append)
        yield backplane.stop()


@pytest_twisted.inlineCallbacks
def test_tls_cluster_with_plain_ports_too_is_reached_on_its_tls_ports(
    pairs: List[Pair], monkeypatch: pytest.MonkeyPatch
) -> Any:
    """
    A TLS cluster that keeps a plain port (moving to TLS): CLUSTER SHARDS reports ``port`` (plain) beside
    ``tls-port``; rediss+cluster:// must connect to the TLS ports, and the plain ones stay unused.
    """
    cluster = start_cluster(masters=1, replicas=0, tls=True, plain_port=True)
    try:
        assert cluster.certs is not None
        _trusting(monkeypatch, cluster.certs.ca_path)
        node = cluster.nodes[0]
        assert node.plain_port and redis_command(node.plain_port, "PING") == "PONG"
        pair = yield started_pair(cluster, pairs, "tls-dual")
        assert (yield pair.round_trip(1))
        found = yield pair.b.resolve_presence(pair.workspace, "rt")
        assert found is not None and found.relay_id == "relay-a"
        # CLIENT LIST names every client with the local port it came in on: ours all on the TLS port.
        clients = str(redis_command(node.plain_port, "CLIENT", "LIST")).splitlines()
        on_plain = [line for line in clients if f" laddr=127.0.0.1:{node.plain_port} " in line]
        assert len(on_plain) == 1 and "cmd=client|list" in on_plain[0], clients
        assert sum(f" laddr=127.0.0.1:{node.port} " in line for line in clients) >= 4, clients
        yield pair.stop()
    finally:
        cluster.stop()
