"""
The txredisapi cluster protocols against a real 3-master, 3-replica Redis Cluster (redis-server 7.0+).

Besides checking the code, these tests pin what Redis 7.0 does to sharded subscriptions when the
topology changes, which the cluster backplane relies on: a completed slot migration unsubscribes
(``sunsubscribe`` push) the old shard's subscribers from that slot's channels only; a manual failover
unsubscribes the demoted master's subscribers from all their channels while the promoted replica's keep
theirs; a killed master's subscribers just lose the connection.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Type, cast

import pytest
import pytest_twisted
import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure

from tests.redis_cluster import RedisCluster, start_cluster
from tests.redis_server import redis_command
from tests.support import poll_until
from viewport.relay.backplane.cluster_protocol import (
    AskError,
    ClusterCommandProtocol,
    ClusterCommandsMixin,
    ClusterRedirectError,
    MovedError,
    ShardSubscriberMixin,
    typed_error,
)
from viewport.relay.backplane.cluster_slots import key_slot

WAIT_SECONDS = 10.0


class _Recording(ShardSubscriberMixin):
    """A shard subscriber that records what it hears."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.messages: List[Tuple[str, object]] = []
        self.dropped: List[str] = []
        self.lost: Optional[Failure] = None

    def shardMessageReceived(self, channel: str, message: object) -> None:
        """Record an smessage."""
        self.messages.append((channel, message))

    def shardChannelUnsubscribed(self, channel: str) -> None:
        """Record a subscription Redis ended."""
        self.dropped.append(channel)

    def connectionLost(self, why: Failure) -> None:
        """Record the end of the connection."""
        super().connectionLost(why)
        self.lost = why


class HiredisSubscriber(_Recording, txredisapi.RedisProtocol):  # type: ignore[misc]
    """txredisapi's default protocol (hiredis parses the replies)."""


class PythonSubscriber(_Recording, txredisapi.BaseRedisProtocol):  # type: ignore[misc]
    """txredisapi's pure-Python reply parser."""


class PythonCommands(ClusterCommandsMixin, txredisapi.BaseRedisProtocol):  # type: ignore[misc]
    """The command protocol on the pure-Python parser."""


SUBSCRIBERS = {"hiredis": HiredisSubscriber, "python": PythonSubscriber}
COMMANDS = {"hiredis": ClusterCommandProtocol, "python": PythonCommands}
assert txredisapi.RedisProtocol is txredisapi.HiredisProtocol, "hiredis is a dependency: the default parser"


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    """A private 3-master, 3-replica cluster for this module (topology changes as the tests go)."""
    started = start_cluster()
    print(f"\ncluster of 6 nodes healthy after {started.start_seconds:.2f} s")
    try:
        yield started
    finally:
        started.stop()


class Connections:
    """Opens protocol connections to cluster nodes and closes them after the test."""

    def __init__(self) -> None:
        self.opened: List[Any] = []

    def open(self, port: int, protocol_class: Type[Any]) -> "Deferred[Any]":
        """A connected ``protocol_class`` instance (utf-8 replies, numbers left as text, commands time out)."""
        proto = protocol_class(charset="utf-8", convertNumbers=False, replyTimeout=WAIT_SECONDS)
        proto.callLater = reactor.callLater
        self.opened.append(proto)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
        return connectProtocol(endpoint, proto)

    def subscriber(self, port: int, flavour: str = "hiredis") -> "Deferred[Any]":
        """A recording shard subscriber."""
        return self.open(port, SUBSCRIBERS[flavour])

    def commands(self, port: int, flavour: str = "hiredis") -> "Deferred[Any]":
        """A cluster command connection."""
        return self.open(port, COMMANDS[flavour])

    def close_all(self) -> "Deferred[Any]":
        """Close every connection still open; fires once all are closed."""
        waits = []
        for proto in self.opened:
            if proto.transport is not None and proto.connected:
                waits.append(proto.whenDisconnected())
                proto.transport.loseConnection()
        return gatherResults(waits)


@pytest.fixture
def connections() -> Iterator[Connections]:
    """Connections closed after the test."""
    opened = Connections()
    yield opened
    pytest_twisted.blockon(opened.close_all())


def _channel(cluster: RedisCluster, master_port: int, prefix: str, avoid_slot: int = -1) -> str:
    """A channel name whose slot ``master_port`` serves (and that is not ``avoid_slot``)."""
    for number in range(100000):
        name = f"{prefix}-{number}"
        slot = key_slot(name)
        if slot != avoid_slot and cluster.master_of(slot) == master_port:
            return name
    raise AssertionError("no channel found")


def _owners(cluster: RedisCluster, channel: str) -> Tuple[int, int, int]:
    """(slot, master port, replica port) of ``channel``."""
    slot = key_slot(channel)
    return slot, cluster.master_of(slot), cluster.replicas_of(slot)[0]


def _cluster_state(port: int) -> str:
    """``cluster_state`` from the node's CLUSTER INFO (``ok`` or ``fail``)."""
    info = str(redis_command(port, "CLUSTER", "INFO"))
    return info.split("cluster_state:", 1)[1].split()[0]


def _other_master(cluster: RedisCluster, port: int) -> int:
    return next(master for master in cluster.masters() if master != port)


def _eventually(condition: Callable[[], Any], what: str) -> "Deferred[Any]":
    result: Deferred[Any] = poll_until(condition, WAIT_SECONDS, what)
    return result


@inlineCallbacks
def _failure_of(d: "Deferred[Any]") -> Any:
    """The exception ``d`` fails with (an AssertionError if it succeeds)."""
    try:
        value = yield d
    except Exception as error:  # noqa: BLE001 - the point is to catch it
        return error
    raise AssertionError(f"expected a failure, got {value!r}")


# -- slot maps ----------------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_slot_map_matches_cluster_nodes(cluster: RedisCluster, connections: Connections) -> Any:
    """``slot_map()`` (CLUSTER SHARDS) asked of every node gives the masters and replicas CLUSTER NODES shows."""
    view = cluster.view()
    for port in cluster.ports:
        proto = yield connections.commands(port)
        slots = yield proto.slot_map()
        assert slots.complete
        for entry in view:
            if not (entry.is_master and entry.slots):
                continue
            replicas = tuple(("127.0.0.1", other.port) for other in view if other.master_id == entry.node_id)
            for start, end in entry.slots:
                for slot in (start, (start + end) // 2, end):
                    assert slots.master_for(slot) == ("127.0.0.1", entry.port)
                    assert slots.replicas_for(slot) == replicas
                    shard = slots.shard_for(slot)
                    assert shard.master.node_id == entry.node_id


class _ShardsUnknown(ClusterCommandProtocol):
    """Asks a subcommand Redis does not know in place of SHARDS: the kind of error a 6.x server gives SHARDS."""

    def cluster_shards(self) -> "Deferred[List[Any]]":
        d: Deferred[List[Any]] = self.execute_command("CLUSTER", "NOSUCHSUBCOMMAND")
        return d


class _ShardsBroken(ClusterCommandProtocol):
    """A SHARDS request that fails for another reason (wrong arguments)."""

    def cluster_shards(self) -> "Deferred[List[Any]]":
        d: Deferred[List[Any]] = self.execute_command("CLUSTER", "SHARDS", "extra")
        return d


@pytest_twisted.inlineCallbacks
def test_slot_map_falls_back_to_cluster_slots(cluster: RedisCluster, connections: Connections) -> Any:
    """A server without CLUSTER SHARDS ("unknown subcommand") is asked CLUSTER SLOTS; other errors fail."""
    reference = yield (yield connections.commands(cluster.ports[0])).slot_map()
    proto = yield connections.open(cluster.ports[0], _ShardsUnknown)
    slots = yield proto.slot_map()
    assert slots.masters() == reference.masters()
    assert [slots.replicas_for(s) for s in range(0, 16384, 512)] == [reference.replicas_for(s) for s in range(0, 16384, 512)]
    broken = yield connections.open(cluster.ports[0], _ShardsBroken)
    error = yield _failure_of(broken.slot_map())
    assert isinstance(error, txredisapi.ResponseError) and "wrong number of arguments" in str(error)


# -- sharded pub/sub on a stable cluster ---------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["hiredis", "python"])
@pytest_twisted.inlineCallbacks
def test_spublish_delivers_to_master_and_replica_subscribers(
    cluster: RedisCluster, connections: Connections, flavour: str
) -> Any:
    """
    SSUBSCRIBE works on the slot's master and (without READONLY) on its replica; SPUBLISH on either
    reaches both, and its count is only the subscribers connected to the node that published.
    """
    channel = f"viewport:test:{{ws-{flavour}}}:bus"
    _, master, replica = _owners(cluster, channel)
    on_master = yield connections.subscriber(master, flavour)
    on_replica = yield connections.subscriber(replica, flavour)
    assert (yield on_master.ssubscribe([channel])) == 1
    assert (yield on_replica.ssubscribe([channel])) == 1
    assert on_master.shard_channels == frozenset([channel])
    publisher = yield connections.commands(master, flavour)
    assert (yield publisher.spublish(channel, "from master")) == 1
    replica_publisher = yield connections.commands(replica, flavour)
    assert (yield replica_publisher.spublish(channel, "from replica")) == 1
    # The two publishes reach each node by different paths (its own client, the cluster bus), so each
    # subscriber may see them in either order; what counts is that both arrive, once each.
    expected = sorted([(channel, "from master"), (channel, "from replica")])
    try:
        yield _eventually(lambda: len(on_master.messages) >= 2 and len(on_replica.messages) >= 2, "both deliveries")
    except AssertionError as error:
        raise AssertionError(f"{error}: master saw {on_master.messages}, replica saw {on_replica.messages}") from None
    assert sorted(on_master.messages) == expected, on_master.messages
    assert sorted(on_replica.messages) == expected, on_replica.messages
    assert on_master.dropped == on_replica.dropped == []


@pytest.mark.parametrize("flavour", ["hiredis", "python"])
@pytest_twisted.inlineCallbacks
def test_confirmations_and_replies_keep_their_order(
    cluster: RedisCluster, connections: Connections, flavour: str
) -> Any:
    """
    Pipelined SSUBSCRIBE (two channels, two confirmations), PING and SSUBSCRIBE each fire with their
    own answer; SUNSUBSCRIBE counts down; with no channel left the connection answers plain commands
    again, even a list that starts with "smessage".
    """
    first, second, third = "{order}:a", "{order}:b", "{order}:c"
    _, master, _ = _owners(cluster, first)
    sub = yield connections.subscriber(master, flavour)
    both = sub.ssubscribe([first, second])
    pong = sub.ping()
    one_more = sub.ssubscribe([third])
    assert (yield gatherResults([both, pong, one_more])) == [2, "PONG", 3]
    assert sub.shard_channels == frozenset([first, second, third])
    assert (yield sub.sunsubscribe([first])) == 2
    assert (yield sub.sunsubscribe()) == 0
    assert sub.shard_channels == frozenset()
    assert (yield sub.sunsubscribe()) == 0  # nothing left: Redis confirms once, with a nil channel
    key = "{order}:list"
    yield sub.execute_command("DEL", key)
    yield sub.execute_command("RPUSH", key, "smessage", "a", "b")
    assert (yield sub.execute_command("LRANGE", key, 0, -1)) == ["smessage", "a", "b"]
    assert sub.messages == [] and sub.dropped == []


@pytest.mark.parametrize("flavour", ["hiredis", "python"])
@pytest_twisted.inlineCallbacks
def test_redirections_are_typed(cluster: RedisCluster, connections: Connections, flavour: str) -> Any:
    """
    SPUBLISH, SSUBSCRIBE and even SUNSUBSCRIBE sent to a node outside the slot's shard fail with
    MovedError (slot, owner's address); channels of two slots fail with CROSSSLOT; the connection goes on.
    """
    channel = "viewport:test:redirect"
    slot, master, _ = _owners(cluster, channel)
    elsewhere = _other_master(cluster, master)
    publisher = yield connections.commands(elsewhere, flavour)
    moved = yield _failure_of(publisher.spublish(channel, "x"))
    assert isinstance(moved, MovedError) and isinstance(moved, txredisapi.ResponseError)
    assert (moved.slot, moved.address, moved.redirect.kind) == (slot, ("127.0.0.1", master), "MOVED")
    assert str(moved) == f"MOVED {slot} 127.0.0.1:{master}"
    sub = yield connections.subscriber(elsewhere, flavour)
    moved = yield _failure_of(sub.ssubscribe([channel]))
    assert isinstance(moved, MovedError) and moved.address == ("127.0.0.1", master)
    moved = yield _failure_of(sub.sunsubscribe([channel]))
    assert isinstance(moved, MovedError)
    local = _channel(cluster, elsewhere, "local")
    other_slot = _channel(cluster, elsewhere, "local", avoid_slot=key_slot(local))
    crossslot = yield _failure_of(sub.ssubscribe([local, other_slot]))
    assert isinstance(crossslot, txredisapi.ResponseError) and not isinstance(crossslot, ClusterRedirectError)
    assert str(crossslot).startswith("CROSSSLOT")
    assert (yield sub.ssubscribe([local])) == 1
    assert (yield sub.ping()) == "PONG"
    assert (yield publisher.ping()) == "PONG"


@pytest_twisted.inlineCallbacks
def test_a_subscribed_connection_cannot_publish(cluster: RedisCluster, connections: Connections) -> Any:
    """Redis refuses SPUBLISH on a connection holding subscriptions (RESP2): publishing needs its own connection."""
    channel = "viewport:test:own-connection"
    _, master, _ = _owners(cluster, channel)
    sub = yield connections.subscriber(master)
    yield sub.ssubscribe([channel])
    refused = yield _failure_of(sub.execute_command("SPUBLISH", channel, "x"))
    assert "only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed" in str(refused)
    assert (yield sub.ping()) == "PONG"


class _Exploding(HiredisSubscriber):
    """A subscriber whose message callback has a bug."""

    def shardMessageReceived(self, channel: str, message: object) -> None:
        """Record, then fail on "boom"."""
        super().shardMessageReceived(channel, message)
        if message == "boom":
            raise RuntimeError("a bug in the callback")


@pytest_twisted.inlineCallbacks
def test_a_failing_callback_is_logged_and_the_connection_goes_on(cluster: RedisCluster, connections: Connections) -> Any:
    """An exception in ``shardMessageReceived`` is logged; later messages and replies still arrive."""
    channel = "viewport:test:{exploding}"
    _, master, _ = _owners(cluster, channel)
    events: List[Dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        sub = yield connections.open(master, _Exploding)
        yield sub.ssubscribe([channel])
        publisher = yield connections.commands(master)
        yield publisher.spublish(channel, "boom")
        yield publisher.spublish(channel, "after")
        yield _eventually(lambda: sub.messages == [(channel, "boom"), (channel, "after")], "both messages")
        assert (yield sub.ping()) == "PONG"
    finally:
        globalLogPublisher.removeObserver(observer)
    failures = [event for event in events if event.get("log_format") == "sharded pub/sub callback failed"]
    assert len(failures) == 1 and failures[0]["log_failure"].check(RuntimeError)


def test_typed_error_leaves_other_values_alone() -> None:
    """Only a ResponseError carrying a redirection becomes a MovedError/AskError."""
    plain = txredisapi.ResponseError("CLUSTERDOWN The cluster is down")
    assert typed_error(plain) is plain
    assert typed_error(["MOVED 1 h:1"]) == ["MOVED 1 h:1"]
    ask = typed_error(txredisapi.ResponseError("ASK 5 :7001"), asked_host="10.0.0.1")
    assert isinstance(ask, AskError) and ask.address == ("10.0.0.1", 7001)
    assert typed_error(ask) is ask


# -- topology changes ---------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_during_a_slot_migration(cluster: RedisCluster, connections: Connections) -> Any:
    """
    While a slot is MIGRATING/IMPORTING, a key command for a missing key gets ASK (AskError), but shard
    channels are not keys: SPUBLISH and SSUBSCRIBE stay on the source and the target answers MOVED.
    """
    channel = "viewport:test:{migrating}"
    slot, source, _ = _owners(cluster, channel)
    target = _other_master(cluster, source)
    sub = yield connections.subscriber(source)
    yield sub.ssubscribe([channel])
    on_source = yield connections.commands(source)
    on_target = yield connections.commands(target)
    cluster.begin_slot_move(slot, target)
    try:
        ask = yield _failure_of(on_source.get("{migrating}:absent"))
        assert isinstance(ask, AskError) and (ask.slot, ask.address) == (slot, ("127.0.0.1", target))
        assert (yield on_source.spublish(channel, "still here")) == 1
        moved = yield _failure_of(on_target.spublish(channel, "x"))
        assert isinstance(moved, MovedError) and moved.address == ("127.0.0.1", source)
        yield _eventually(lambda: sub.messages == [(channel, "still here")], "delivery during the migration")
    finally:
        cluster.finish_slot_move(slot, target)


@pytest_twisted.inlineCallbacks
def test_slot_migration_unsubscribes_that_slot(cluster: RedisCluster, connections: Connections) -> Any:
    """
    Once a slot has moved, Redis sends ``sunsubscribe`` for that slot's channels to the subscribers on
    the old master and its replica (other slots keep theirs, connections stay open); the new owner serves it.
    """
    channel, sibling = "{moving}:a", "{moving}:b"
    slot, source, replica = _owners(cluster, channel)
    staying = _channel(cluster, source, "staying", avoid_slot=slot)
    target = _other_master(cluster, source)
    on_source = yield connections.subscriber(source)
    yield on_source.ssubscribe([channel, sibling])
    yield on_source.ssubscribe([staying])
    on_replica = yield connections.subscriber(replica)
    yield on_replica.ssubscribe([channel])
    cluster.move_slot(slot, target)
    yield _eventually(lambda: sorted(on_source.dropped) == [channel, sibling] and on_replica.dropped == [channel],
                      "sunsubscribe pushes after the migration")
    assert on_source.shard_channels == frozenset([staying]) and on_replica.shard_channels == frozenset()
    assert (yield on_source.ping()) == "PONG" and on_source.lost is None
    moved = yield _failure_of((yield connections.commands(source)).spublish(channel, "x"))
    assert isinstance(moved, MovedError) and moved.address == ("127.0.0.1", target)
    on_target = yield connections.subscriber(target)
    yield on_target.ssubscribe([channel])
    assert (yield (yield connections.commands(target)).spublish(channel, "moved")) == 1
    yield _eventually(lambda: on_target.messages == [(channel, "moved")], "delivery at the new owner")


@pytest_twisted.inlineCallbacks
def test_manual_failover(cluster: RedisCluster, connections: Connections) -> Any:
    """
    CLUSTER FAILOVER on a replica: the demoted master's subscribers get ``sunsubscribe`` for all their
    channels (every slot of the shard) and stay connected; the promoted replica's subscribers keep their
    subscriptions; SPUBLISH is accepted on both nodes of the shard and reaches the remaining subscriber.
    """
    channel = "viewport:test:{failover}"
    slot, master, replica = _owners(cluster, channel)
    other_slot_channel = _channel(cluster, master, "failover", avoid_slot=slot)
    on_master = yield connections.subscriber(master)
    yield on_master.ssubscribe([channel])
    yield on_master.ssubscribe([other_slot_channel])
    on_replica = yield connections.subscriber(replica)
    yield on_replica.ssubscribe([channel])
    seconds = cluster.failover(replica)
    print(f"\nCLUSTER FAILOVER: every node agreed after {seconds:.2f} s")
    yield _eventually(lambda: sorted(on_master.dropped) == sorted([channel, other_slot_channel]),
                      "sunsubscribe pushes on the demoted master")
    assert on_master.lost is None and (yield on_master.ping()) == "PONG"
    assert on_replica.dropped == [] and on_replica.shard_channels == frozenset([channel])
    assert cluster.master_of(slot) == replica
    new_master = yield connections.commands(replica)
    demoted = yield connections.commands(master)
    assert (yield new_master.spublish(channel, "after")) == 1
    assert (yield demoted.spublish(channel, "via the demoted")) == 0  # a replica serves SPUBLISH, counts its own
    yield _eventually(lambda: on_replica.messages == [(channel, "after"), (channel, "via the demoted")],
                      "deliveries after the failover")
    assert on_master.messages == []
    assert (yield on_master.ssubscribe([channel])) == 1  # the demoted master now serves as a replica


@pytest_twisted.inlineCallbacks
def test_killed_master(cluster: RedisCluster, connections: Connections) -> Any:
    """
    SIGKILL of a master: its subscribers lose the connection at once; the replica keeps its
    subscriptions (no ``sunsubscribe``) and serves SPUBLISH even while the cluster state is "fail"
    (cluster-allow-pubsubshard-when-down defaults to yes); after the promotion the others redirect to it.
    """
    channel = "viewport:test:{killed}"
    slot, master, replica = _owners(cluster, channel)
    elsewhere = _other_master(cluster, master)
    on_master = yield connections.subscriber(master)
    yield on_master.ssubscribe([channel])
    on_replica = yield connections.subscriber(replica)
    yield on_replica.ssubscribe([channel])
    on_replica_publisher = yield connections.commands(replica)
    began = time.monotonic()
    cluster.kill(master)
    yield _eventually(lambda: on_master.lost is not None, "the killed master's subscriber noticing")
    noticed = time.monotonic() - began
    yield _eventually(lambda: _cluster_state(replica) == "fail" or cluster.master_of_as_seen(slot, replica) == replica,
                      "the failure detection")
    detected = time.monotonic() - began
    outage = _cluster_state(replica) == "fail"
    assert (yield on_replica_publisher.spublish(channel, "during")) == 1
    cluster.wait_for_promotion(replica)
    promoted = time.monotonic() - began
    print(f"\nkilled master: subscriber lost the connection after {noticed:.2f} s, cluster_state fail after "
          f"{detected:.2f} s (observed: {outage}), replica promoted and agreed after {promoted:.2f} s "
          f"(cluster-node-timeout {cluster.node_timeout_ms} ms)")
    assert outage, "the replica should report cluster_state:fail before its election (>= 500 ms delay)"
    assert (yield on_replica_publisher.spublish(channel, "after")) == 1
    yield _eventually(lambda: on_replica.messages == [(channel, "during"), (channel, "after")], "deliveries")
    assert on_replica.dropped == [] and on_replica.lost is None
    moved = yield _failure_of((yield connections.commands(elsewhere)).spublish(channel, "x"))
    assert isinstance(moved, MovedError) and moved.address == ("127.0.0.1", replica)
    cluster.revive(master)
    assert cluster.replicas_of(slot) == [master]
