"""The Redis backplane beyond the shared contract: outages, presence ownership, verification, URLs."""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterator, List, Optional

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.backplane_providers import bus_frame
from tests.redis_server import RedisServer, SentinelServer, free_port, redis_command
from viewport.relay.backplane.redis import (
    RedisBackplane,
    bus_channel,
    encode_envelope,
    encode_presence,
    parse_envelope,
    parse_presence,
    liveness_key,
    presence_key,
    signed_nonce,
)
from viewport.relay.backplane.redis_connection import backoff_delay
from viewport.relay.backplane.redis_url import RedisTarget, parse_redis_url
from viewport.relay.backplane.signing import sign
from viewport.relay.interfaces import BusFrame, IBackplane, Presence
from viewport.relay.metrics import RelayMetrics

KEY = "redis-test-bus-key"
DEADLINE_SECONDS = 15.0




def _presence(relay_id: str, connected: bool = True, machine_id: Optional[str] = "m1") -> Presence:
    return Presence("w:1", "rt:1", relay_id, f"ws://{relay_id}.example/ws", connected, machine_id=machine_id)


def _count(metrics: RelayMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name + "_total") or 0.0


def _poll(condition: Callable[[], bool], what: str, deadline: float = DEADLINE_SECONDS) -> Any:
    """Fire once ``condition()`` holds, checking every 20 ms; fail after ``deadline`` seconds."""
    give_up = reactor.seconds() + deadline

    def check() -> Any:
        if condition():
            return None
        if reactor.seconds() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        return task.deferLater(reactor, 0.02, check)

    return check()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server this test may kill, pause and restart."""
    server = RedisServer().start()
    yield server
    server.stop()


class Relays:
    """Builds backplanes (each with its own metrics and received list) and stops them all at the end."""

    def __init__(self) -> None:
        self.made: List[RedisBackplane] = []
        self.received: dict[str, List[BusFrame]] = {}
        self.metrics: dict[str, RelayMetrics] = {}

    def make(self, url: str, relay_id: str, **options: Any) -> RedisBackplane:
        settings: dict[str, Any] = dict(
            relay_id=relay_id,
            redis_url=url,
            hmac_key=KEY,
            reactor=reactor,
            key_prefix="viewport-test",
            command_timeout_ms=300,
            connect_timeout_ms=1000,
            retry_initial_ms=50,
            retry_max_ms=400,
            resolve_cache_ms=0,
            metrics=self.metrics.setdefault(relay_id, RelayMetrics()),
        )
        settings.update(options)
        backplane = RedisBackplane(**settings)
        self.made.append(backplane)
        return backplane

    def start(self, backplane: RedisBackplane) -> Any:
        received = self.received.setdefault(backplane.relay_id, [])
        return backplane.start(received.append)


@pytest.fixture
def relays() -> Iterator[Relays]:
    """Backplanes made by the test, stopped afterwards."""
    made = Relays()
    yield made
    pytest_twisted.blockon(gatherResults([backplane.stop() for backplane in made.made]))


# -- pure parts -------------------------------------------------------------------------------------


def test_channel_and_key_names_keep_ids_with_colons_apart() -> None:
    """The workspace length prefix makes (``a:b``, ``c``) and (``a``, ``b:c``) different channels and keys."""
    assert bus_channel("p", "daemon", "w:1", "rt:1") == "p:bus:daemon:3:w:1:rt:1"
    assert bus_channel("p", "clients", "w", None) == "p:bus:clients:1:w:"
    assert bus_channel("p", "daemon", "a:b", "c") != bus_channel("p", "daemon", "a", "b:c")
    assert presence_key("p", "w:1", "rt:1") == "p:presence:3:w:1:rt:1"
    assert presence_key("p", "a:b", "c") != presence_key("p", "a", "b:c")
    assert presence_key("p", "w", None) == presence_key("p", "w", "")


def test_parse_plain_tls_and_unix_urls() -> None:
    """redis://, rediss:// and unix:// URLs give host, port, database and credentials."""
    assert parse_redis_url("redis://127.0.0.1") == RedisTarget("redis", host="127.0.0.1", port=6379)
    target = parse_redis_url("rediss://user:p%40ss@redis.example:6380/3")
    assert (target.scheme, target.host, target.port, target.db, target.username, target.password) == (
        "rediss", "redis.example", 6380, 3, "user", "p@ss"
    )
    assert "p@ss" not in repr(target)
    unix = parse_redis_url("unix://:secret@/run/redis/redis.sock?db=2")
    assert (unix.scheme, unix.path, unix.db, unix.password) == ("unix", "/run/redis/redis.sock", 2, "secret")
    assert parse_redis_url("redis://[::1]:7000/").host == "::1"


def test_parse_sentinel_urls() -> None:
    """redis+sentinel:// lists Sentinels (default port 26379), the service and an optional database."""
    target = parse_redis_url("redis+sentinel://:pw@s1:26380,s2,[::1]:26381/mymaster/4")
    assert target.scheme == "redis+sentinel"
    assert target.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert (target.service, target.db, target.password, target.username) == ("mymaster", 4, "pw", None)
    single = parse_redis_url("redis+sentinel://sentinel.example/cache")
    assert (single.sentinels, single.service, single.db) == ((("sentinel.example", 26379),), "cache", None)


@pytest.mark.parametrize(
    "url",
    [
        "http://h",
        "redis://",
        "redis://:hunter2@h/x",
        "redis://h:99999",
        "unix://",
        "redis+sentinel://:hunter2@s1:26379",
        "redis+sentinel://s1:26379/",
        "redis+sentinel://s1:abc/m",
        "redis+sentinel://s1/m/1/2",
        "redis+sentinel://s1,,s2/m",
    ],
)
def test_bad_urls_are_refused_without_echoing_the_password(url: str) -> None:
    """Malformed URLs raise ValueError whose message never contains the password."""
    with pytest.raises(ValueError) as caught:
        parse_redis_url(url)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("payload", [
    '{"x":"é\\n"}', "quote \" backslash \\ slash /", "controls \x00\x01\x1f\x7f \b\f\n\r\t",
    "separators \u2028\u2029", "emoji 😀 and CJK 漢字", "", "x" * 70_000,
])
def test_envelope_text_is_what_json_dumps_gives(payload: str) -> None:
    """The envelope text (now written by orjson) is byte for byte the compact ``json.dumps`` text it replaced."""
    frame = BusFrame("w", "rt", "relay-a", "relay-b", "client_to_daemon", payload, machine_id="m")
    doc = {"workspaceId": "w", "runtimeTargetId": "rt", "machineId": "m", "sourceRelayId": "relay-a",
           "targetRelayId": "relay-b", "direction": "client_to_daemon", "payload": payload,
           "issuedAtMs": 1700000000000, "nonce": "1.2", "signature": "sig", "deliverByMs": 1700000002000}
    expected = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    assert encode_envelope(frame, 1700000000000, "1.2", "sig", 1700000002000) == expected


def test_envelope_with_a_lone_surrogate_is_still_text() -> None:
    """An id orjson refuses (a lone surrogate) is written as json did; sending it then fails as an encoding error."""
    frame = BusFrame("w\ud800", "rt", "relay-a", None, "daemon_to_clients", "{}")
    raw = encode_envelope(frame, 1700000000000, "1.2", "sig")
    assert json.loads(raw)["workspaceId"] == "w\ud800"
    with pytest.raises(UnicodeEncodeError):
        raw.encode("utf-8")


def test_envelope_round_trip_and_strict_parsing() -> None:
    """A published envelope parses back to the same frame; wrong types or shapes parse to None."""
    frame = BusFrame("w", "rt", "relay-a", None, "daemon_to_clients", '{"x":"é\\n"}', machine_id="m")
    raw = encode_envelope(frame, 1700000000000, "nonce", "sig")
    parsed = parse_envelope(raw)
    assert parsed is not None
    assert (parsed.frame, parsed.issued_at_ms, parsed.nonce, parsed.signature) == (frame, 1700000000000, "nonce", "sig")
    assert parse_envelope(raw.encode("utf-8")) == parsed
    doc = json.loads(raw)
    for field, bad in [
        ("workspaceId", 1), ("runtimeTargetId", ""), ("machineId", 5), ("sourceRelayId", None),
        ("targetRelayId", 3), ("direction", "sideways"), ("payload", {"a": 1}), ("issuedAtMs", True),
        ("issuedAtMs", "1"), ("nonce", 7), ("signature", ""),
    ]:
        assert parse_envelope(json.dumps({**doc, field: bad})) is None, field
    assert parse_envelope(raw.replace("1700000000000", "NaN")) is None
    assert parse_envelope("[1]") is None
    assert parse_envelope(b"\xff") is None


def test_presence_value_round_trip_and_strict_parsing() -> None:
    """A stored presence parses back with its machine id; anything not a connected daemon is None."""
    raw = encode_presence(_presence("relay-a"), 5)
    assert parse_presence(raw, "w:1", "rt:1") == _presence("relay-a")
    doc = json.loads(raw)
    for field, bad in [("daemonConnected", False), ("relayId", ""), ("relayWsBaseUrl", 1),
                       ("updatedAtMs", True), ("machineId", 1)]:
        assert parse_presence(json.dumps({**doc, field: bad}), "w:1", "rt:1") is None, field
    assert parse_presence("not json", "w:1", "rt:1") is None


def test_backoff_doubles_from_half_a_second_up_to_the_cap() -> None:
    """Without jitter the delay doubles from 0.5 s and stops at 10 s; jitter stays within ±20 %."""
    assert [backoff_delay(n, 0.5, 10.0, 0.0, lambda: 0.5) for n in (1, 2, 3, 5, 6, 100)] == [
        0.5, 1.0, 2.0, 8.0, 10.0, 10.0
    ]
    assert backoff_delay(2, 0.5, 10.0, 0.2, lambda: 0.0) == pytest.approx(0.8)
    assert backoff_delay(2, 0.5, 10.0, 0.2, lambda: 1.0) == pytest.approx(1.2)


# -- deterministic connection handling (memory reactor, no server) ----------------------------------


class _Transport(StringTransport):
    """A StringTransport that remembers the protocol connected over it."""

    protocol: Any = None


class ConnectionHandlingClockTests(SynchronousTestCase):
    """Connection handling driven over _Transport with a Clock (the links connect over unix://)."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.metrics = RelayMetrics()
        self.received: List[BusFrame] = []
        self.backplane = RedisBackplane(
            relay_id="relay-a", redis_url="unix:///fake/redis.sock", hmac_key=KEY, reactor=self.reactor,
            command_timeout_ms=2000, connect_timeout_ms=5000, metrics=self.metrics,
        )

    def _accept(self, index: int) -> _Transport:
        """Complete the ``index``-th connection attempt over a _Transport."""
        factory = self.reactor.unixClients[index][1]
        protocol = factory.buildProtocol(None)
        transport = _Transport()
        protocol.makeConnection(transport)
        transport.protocol = protocol
        return transport

    def _answer(self, transport: _Transport, reply: bytes) -> None:
        transport.clear()
        transport.protocol.dataReceived(reply)

    def _connect_both(self) -> tuple[_Transport, _Transport]:
        """Accept the last two attempts; returns (commands, subscriber), told apart by what they send."""
        first, second = (self._accept(len(self.reactor.unixClients) - n) for n in (2, 1))
        for transport in (first, second):
            self.assertIn(b"PING", transport.value())
            self._answer(transport, b"+PONG\r\n")
        if b"SUBSCRIBE" in first.value():
            return second, first
        return first, second

    def _stop(self, *transports: _Transport) -> None:
        """Stop (unanswered cleanup commands time out), close the transports, expect no timer left."""
        stopped = self.backplane.stop()
        self.reactor.advance(2.0)
        for transport in transports:
            if transport.disconnecting:
                transport.protocol.connectionLost(Failure(ConnectionLost()))
        self.successResultOf(stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_provides_interface(self) -> None:
        """RedisBackplane fully provides IBackplane and is cross-relay."""
        self.assertTrue(verifyObject(IBackplane, self.backplane))
        self.assertTrue(self.backplane.cross_relay)

    def test_start_gives_up_waiting_but_keeps_running_degraded(self) -> None:
        """With no answer, start fires False after the connect timeout and every call fails at once."""
        started = self.backplane.start(self.received.append)
        self.assertNoResult(started)
        self.reactor.advance(5.0)
        self.assertIs(self.successResultOf(started), False)
        self.assertFalse(self.backplane.healthy)
        self.assertIs(self.successResultOf(self.backplane.publish(bus_frame("relay-a", "relay-b"))), False)
        self.assertIsNone(self.successResultOf(self.backplane.resolve_presence("w:1", "rt:1")))
        self.assertIsNone(self.successResultOf(self.backplane.announce_presence(_presence("relay-a"))))
        self.assertEqual(_count(self.metrics, "relay_bus_publish_failed"), 1)
        self._stop()

    def test_unanswered_command_times_out_and_degrades(self) -> None:
        """A PUBLISH Redis never answers fires False after the command timeout and drops the connection."""
        started = self.backplane.start(self.received.append)
        commands, subscriber = self._connect_both()
        self.assertIs(self.successResultOf(started), True)
        published = self.backplane.publish(bus_frame("relay-a", "relay-b"))
        self.assertIn(b"PUBLISH", commands.value())
        self.reactor.advance(1.9)
        self.assertNoResult(published)
        self.reactor.advance(0.2)
        self.assertIs(self.successResultOf(published), False)
        self.assertTrue(commands.disconnected)
        commands.protocol.connectionLost(Failure(ConnectionLost()))
        self.assertFalse(self.backplane.healthy)
        attempts = len(self.reactor.unixClients)
        self.reactor.advance(0.7)
        self.assertEqual(len(self.reactor.unixClients), attempts + 1)
        self._stop(subscriber)

    def test_reconnection_resubscribes_and_reannounces(self) -> None:
        """After both connections drop, the new ones SUBSCRIBE every watched channel and SET every presence."""
        self.backplane.start(self.received.append)
        commands, subscriber = self._connect_both()
        self.backplane.watch_scope("w:1", "rt:1", "daemon")
        self.backplane.watch_scope("w:1", "rt:1", "clients")
        self.backplane.unwatch_scope("w:1", "rt:1", "clients")
        self.backplane.announce_presence(_presence("relay-a", machine_id="m9"))
        for transport in (commands, subscriber):
            transport.protocol.connectionLost(Failure(ConnectionLost()))
        self.assertFalse(self.backplane.healthy)
        self.reactor.advance(0.7)
        commands, subscriber = self._connect_both()
        self.assertIn(b"SET", commands.value())
        self.assertIn(b'"machineId":"m9"', commands.value())
        self.assertIn(b"viewport:relay:presence:3:w:1:rt:1", commands.value())
        channel = b"viewport:relay:bus:daemon:3:w:1:rt:1"
        self.assertIn(b"SUBSCRIBE", subscriber.value())
        self.assertIn(channel, subscriber.value())
        self.assertNotIn(b"bus:clients", subscriber.value())
        self.assertFalse(self.backplane.healthy)
        self._answer(subscriber, b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(channel), channel))
        self.assertTrue(self.backplane.healthy)
        self._stop(commands, subscriber)

    def test_presence_is_refreshed_every_third_of_the_ttl(self) -> None:
        """The refresh loop re-SETs owned presences (with machine id) every TTL/3 and stops after a clear."""
        self.backplane.start(self.received.append)
        commands, subscriber = self._connect_both()
        self.backplane.announce_presence(_presence("relay-a", machine_id="m7"))
        self._answer(commands, b"+OK\r\n")
        self.reactor.advance(15.0)
        self.assertIn(b'"machineId":"m7"', commands.value())
        self._answer(commands, b"+OK\r\n")
        self.backplane.announce_presence(_presence("relay-a", connected=False))
        self.assertIn(b"EVAL", commands.value())
        self._answer(commands, b":1\r\n")
        self.reactor.advance(15.0)
        self.assertNotIn(b"presence", commands.value())
        self.assertIn(b"viewport:relay:alive:relay-a", commands.value())
        self._stop(commands, subscriber)

    def test_liveness_record_is_refreshed_every_second(self) -> None:
        """The relay's liveness key is SET with a 3 s TTL when connected and again every second; stop deletes it."""
        self.backplane.start(self.received.append)
        commands, subscriber = self._connect_both()
        self.assertIn(b"viewport:relay:alive:relay-a", commands.value())
        self.assertIn(b"3000", commands.value())
        self._answer(commands, b"+OK\r\n")
        self.reactor.advance(1.0)
        self.assertIn(b"viewport:relay:alive:relay-a", commands.value())
        self._answer(commands, b"+OK\r\n")
        self.backplane.stop()
        self.assertIn(b"DEL", commands.value())
        self.assertIn(b"viewport:relay:alive:relay-a", commands.value())
        self._answer(commands, b":1\r\n")
        self._stop(commands, subscriber)


# -- against a private redis-server ---------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_redis_restart_degrades_then_recovers(redis_server: RedisServer, relays: Relays) -> Any:
    """Killing Redis mid-stream degrades both relays; after a restart they resubscribe and re-announce."""
    a, b = relays.make(redis_server.url, "relay-a"), relays.make(redis_server.url, "relay-b")
    assert (yield relays.start(a)) is True
    assert (yield relays.start(b)) is True
    b.watch_scope("w:1", "rt:1", "daemon")
    yield b.subscriptions_settled()
    yield b.announce_presence(_presence("relay-b", machine_id="m2"))
    received = relays.received["relay-b"]
    state = {"next": 0, "running": True}

    def stream() -> Any:
        if not state["running"]:
            return None
        index = state["next"]
        state["next"] += 1
        d = a.publish(bus_frame("relay-a", "relay-b", payload=f'{{"n":{index}}}'))
        return d.addCallback(lambda _: task.deferLater(reactor, 0.005, stream))

    streaming = stream()
    yield _poll(lambda: len(received) >= 20, "frames before the outage")
    redis_server.kill()
    yield _poll(lambda: not a.healthy and not b.healthy, "both relays degraded")
    state["running"] = False
    yield streaming

    began = reactor.seconds()
    assert (yield a.publish(bus_frame("relay-a", "relay-b"))) is False
    assert (yield a.resolve_presence("w:1", "rt:1")) is None
    yield a.announce_presence(_presence("relay-a", connected=False))
    assert reactor.seconds() - began < 0.1

    redis_server.start()
    yield _poll(lambda: a.healthy and b.healthy, "both relays healthy again")
    found = yield a.resolve_presence("w:1", "rt:1")
    assert found is not None and (found.relay_id, found.machine_id) == ("relay-b", "m2")
    assert (yield a.publish(bus_frame("relay-a", "relay-b", payload='{"n":"after"}'))) is True
    yield _poll(lambda: received[-1].payload == '{"n":"after"}', "the frame published after recovery")
    numbers = [json.loads(frame.payload)["n"] for frame in received[:-1]]
    assert numbers == sorted(set(numbers)), "a frame was delivered twice or out of order"
    assert [frame.payload for frame in received].count('{"n":"after"}') == 1
    assert _count(relays.metrics["relay-a"], "relay_bus_publish_failed") >= 1


@pytest_twisted.inlineCallbacks
def test_hung_redis_times_out_instead_of_hanging(redis_server: RedisServer, relays: Relays) -> Any:
    """A paused (SIGSTOP) Redis makes publish fail after the command timeout; SIGCONT brings it back."""
    a, b = relays.make(redis_server.url, "relay-a"), relays.make(redis_server.url, "relay-b")
    yield gatherResults([relays.start(a), relays.start(b)])
    b.watch_scope("w:1", "rt:1", "daemon")
    yield b.subscriptions_settled()
    redis_server.pause()
    try:
        began = reactor.seconds()
        assert (yield a.publish(bus_frame("relay-a", "relay-b"))) is False
        assert reactor.seconds() - began < 2.0
        yield _poll(lambda: not a.healthy, "relay A degraded")
    finally:
        redis_server.resume()
    yield _poll(lambda: a.healthy, "relay A healthy again")
    assert (yield a.publish(bus_frame("relay-a", "relay-b", payload='{"n":1}'))) is True
    yield _poll(lambda: len(relays.received["relay-b"]) == 1, "delivery after resuming")


@pytest_twisted.inlineCallbacks
def test_start_while_redis_is_down_then_catch_up(relays: Relays) -> Any:
    """Started with Redis down, a relay fires False, stays degraded, then subscribes and announces once it is up."""
    server = RedisServer(port=free_port())
    try:
        a = relays.make(server.url, "relay-a")
        began = reactor.seconds()
        assert (yield relays.start(a)) is False
        assert reactor.seconds() - began < 3.0
        assert not a.healthy
        a.watch_scope("w:1", "rt:1", "daemon")
        yield a.announce_presence(_presence("relay-a"))
        assert (yield a.publish(bus_frame("relay-a", "relay-b"))) is False
        server.start()
        yield _poll(lambda: a.healthy, "relay A connected")
        b = relays.make(server.url, "relay-b")
        assert (yield relays.start(b)) is True
        found = yield b.resolve_presence("w:1", "rt:1")
        assert found is not None and found.relay_id == "relay-a"
        assert (yield b.publish(bus_frame("relay-b", "relay-a"))) is True
        yield _poll(lambda: len(relays.received["relay-a"]) == 1, "delivery to the late starter")
    finally:
        server.stop()


@pytest_twisted.inlineCallbacks
def test_clearing_presence_only_deletes_our_own(redis_server: RedisServer, relays: Relays) -> Any:
    """Disconnect is compare-and-delete: a relay the daemon left cannot erase the new owner's presence."""
    a, b, c = (relays.make(redis_server.url, name) for name in ("relay-a", "relay-b", "relay-c"))
    yield gatherResults([relays.start(a), relays.start(b), relays.start(c)])
    key = presence_key("viewport-test", "w:1", "rt:1")
    yield a.announce_presence(_presence("relay-a"))
    yield b.announce_presence(_presence("relay-b", connected=False))
    assert json.loads(str(redis_command(redis_server.port, "GET", key)))["relayId"] == "relay-a"
    yield b.announce_presence(_presence("relay-b"))
    yield a.announce_presence(_presence("relay-a", connected=False))
    found = yield c.resolve_presence("w:1", "rt:1")
    assert found is not None and found.relay_id == "relay-b"
    yield b.announce_presence(_presence("relay-b", connected=False))
    assert redis_command(redis_server.port, "GET", key) is None
    assert _count(relays.metrics["relay-a"], "relay_presence_upsert_ok") == 2
    assert _count(relays.metrics["relay-c"], "relay_presence_resolve_ok") == 1


@pytest_twisted.inlineCallbacks
def test_refresh_keeps_presence_and_machine_id_alive(redis_server: RedisServer, relays: Relays) -> Any:
    """With a 600 ms TTL the presence (machine id included) is still there after two TTLs, then clears."""
    a = relays.make(redis_server.url, "relay-a", presence_ttl_ms=600)
    yield relays.start(a)
    key = presence_key("viewport-test", "w:1", "rt:1")
    yield a.announce_presence(_presence("relay-a", machine_id="machine-7"))
    until = reactor.seconds() + 1.3
    while reactor.seconds() < until:
        stored = redis_command(redis_server.port, "GET", key)
        assert stored is not None, "presence expired although the relay holds the daemon"
        assert json.loads(str(stored))["machineId"] == "machine-7"
        yield task.deferLater(reactor, 0.05, lambda: None)
    assert 0 < int(str(redis_command(redis_server.port, "PTTL", key))) <= 600
    yield a.announce_presence(_presence("relay-a", connected=False))
    assert redis_command(redis_server.port, "GET", key) is None


@pytest_twisted.inlineCallbacks
def test_resolve_cache_is_bounded_and_invalidated_by_own_announcements(
    redis_server: RedisServer, relays: Relays
) -> Any:
    """Positive answers are cached (LRU-bounded); this relay's own announcement for the key drops the entry."""
    a = relays.make(redis_server.url, "relay-a")
    b = relays.make(redis_server.url, "relay-b", resolve_cache_ms=60000, resolve_cache_max=1)
    yield gatherResults([relays.start(a), relays.start(b)])
    metrics = relays.metrics["relay-b"]
    yield a.announce_presence(_presence("relay-a"))
    yield a.announce_presence(Presence("w:2", "rt:2", "relay-a", "ws://a/ws", True))
    assert (yield b.resolve_presence("w:1", "rt:1")).relay_id == "relay-a"
    yield a.announce_presence(_presence("relay-a", connected=False))
    assert (yield b.resolve_presence("w:1", "rt:1")).relay_id == "relay-a"
    assert _count(metrics, "relay_presence_resolve_ok") == 1
    yield b.resolve_presence("w:2", "rt:2")
    assert (yield b.resolve_presence("w:1", "rt:1")) is None
    assert _count(metrics, "relay_presence_resolve_ok") == 2
    yield a.announce_presence(_presence("relay-a"))
    assert (yield b.resolve_presence("w:1", "rt:1")).relay_id == "relay-a"
    yield b.announce_presence(_presence("relay-b", connected=False))
    yield a.announce_presence(_presence("relay-a", connected=False))
    assert (yield b.resolve_presence("w:1", "rt:1")) is None


@pytest_twisted.inlineCallbacks
def test_inbound_envelopes_are_verified(redis_server: RedisServer, relays: Relays) -> Any:
    """
    Malformed, badly signed, stale, replayed, oversized and own envelopes are dropped and counted; a
    client→daemon frame addressed to another relay is still delivered, because only the relay
    holding the daemon listens on that channel (the sender's presence may be stale).
    """
    b = relays.make(redis_server.url, "relay-b", max_payload_bytes=100)
    yield relays.start(b)
    b.watch_scope("w:1", "rt:1", "daemon")
    yield b.subscriptions_settled()
    channel = bus_channel("viewport-test", "daemon", "w:1", "rt:1")
    now = int(time.time() * 1000)

    def envelope(frame: BusFrame, issued: int = now, nonce: str = "n", key: str = KEY) -> str:
        return encode_envelope(frame, issued, nonce, sign(key, frame, issued, nonce))

    good = bus_frame("relay-a", "relay-b", payload='{"n":"good"}')
    unsigned_nonce = bus_frame("relay-a", None, payload='{"n":"platform"}')
    platform_style = json.loads(envelope(unsigned_nonce))
    del platform_style["nonce"]
    platform_style["signature"] = sign(KEY, unsigned_nonce, now)
    messages = [
        "not json",
        envelope(bus_frame("relay-a", "relay-b", workspace="w:2")),
        envelope(bus_frame("relay-a", "relay-b", payload='{"n":"forged"}'), key="other-key"),
        envelope(bus_frame("relay-a", "relay-b", payload='{"n":"stale"}'), issued=now - 60000),
        envelope(good),
        envelope(good),
        envelope(bus_frame("relay-a", "relay-c", payload='{"n":"for c"}')),
        envelope(bus_frame("relay-b", "relay-b", payload='{"n":"own"}')),
        envelope(bus_frame("relay-a", "relay-b", payload='{"n":"' + "x" * 200 + '"}')),
        json.dumps(platform_style),
    ]
    for message in messages:
        assert redis_command(redis_server.port, "PUBLISH", channel, message) == 1
    metrics = relays.metrics["relay-b"]
    expected = {
        "relay_bus_pull_failed": 2,
        "relay_bus_pull_invalid_signature": 1,
        "relay_bus_pull_stale_signature": 1,
        "relay_bus_pull_replayed_signature": 1,
        "relay_bus_pull_frame_too_large": 1,
        "relay_bus_pull_ok": 3,
    }
    yield _poll(lambda: all(_count(metrics, k) == v for k, v in expected.items()), "every verdict counted")
    assert [frame.payload for frame in relays.received["relay-b"]] == [
        '{"n":"good"}', '{"n":"for c"}', '{"n":"platform"}'
    ]


@pytest_twisted.inlineCallbacks
def test_publish_refuses_oversized_and_unscoped_frames(redis_server: RedisServer, relays: Relays) -> Any:
    """A payload over max_payload_bytes or a frame without runtime target is not published."""
    a, b = relays.make(redis_server.url, "relay-a", max_payload_bytes=10), relays.make(redis_server.url, "relay-b")
    yield gatherResults([relays.start(a), relays.start(b)])
    b.watch_scope("w:1", "rt:1", "daemon")
    yield b.subscriptions_settled()
    assert (yield a.publish(bus_frame("relay-a", "relay-b", payload='{"n":"too long"}'))) is False
    assert (yield a.publish(bus_frame("relay-a", "relay-b", runtime_target=""))) is False
    assert (yield a.publish(bus_frame("relay-a", "relay-b", payload="{}"))) is True
    assert _count(relays.metrics["relay-a"], "relay_bus_publish_failed") == 2


@pytest_twisted.inlineCallbacks
def test_stop_clears_presence_and_subscriptions(redis_server: RedisServer, relays: Relays) -> Any:
    """After stop, the relay's presence is gone, nobody hears its channels and its publishes fail."""
    a, b = relays.make(redis_server.url, "relay-a"), relays.make(redis_server.url, "relay-b")
    yield gatherResults([relays.start(a), relays.start(b)])
    a.watch_scope("w:1", "rt:1", "daemon")
    yield a.subscriptions_settled()
    yield a.announce_presence(_presence("relay-a"))
    yield a.stop()
    assert not a.healthy
    assert (yield b.resolve_presence("w:1", "rt:1")) is None
    assert (yield b.publish(bus_frame("relay-b", "relay-a"))) is False
    assert (yield a.publish(bus_frame("relay-a", "relay-b"))) is False
    yield a.stop()
    assert redis_command(redis_server.port, "PUBSUB", "NUMSUB", bus_channel("viewport-test", "daemon", "w:1", "rt:1")
                         )[1] == 0  # type: ignore[index]


@pytest_twisted.inlineCallbacks
def test_unix_socket_and_database_selection(redis_server: RedisServer, relays: Relays) -> Any:
    """unix:// with ?db= and redis://…/db reach the same keys; another database does not see them."""
    a = relays.make(f"unix://{redis_server.unix_socket}?db=2", "relay-a")
    b = relays.make(f"{redis_server.url}/2", "relay-b")
    c = relays.make(f"{redis_server.url}/0", "relay-c")
    yield gatherResults([relays.start(a), relays.start(b), relays.start(c)])
    yield a.announce_presence(_presence("relay-a"))
    assert (yield b.resolve_presence("w:1", "rt:1")).relay_id == "relay-a"
    assert (yield c.resolve_presence("w:1", "rt:1")) is None
    a.watch_scope("w:1", "rt:1", "daemon")
    yield a.subscriptions_settled()
    assert (yield c.publish(bus_frame("relay-c", "relay-a"))) is True
    yield _poll(lambda: len(relays.received["relay-a"]) == 1, "delivery over the unix socket")


@pytest_twisted.inlineCallbacks
def test_password_is_sent_and_a_wrong_one_stays_degraded(relays: Relays) -> Any:
    """The URL's password logs in; with a wrong one the relay never becomes healthy."""
    server = RedisServer(extra_args=["--requirepass", "s3cret"]).start()
    try:
        good = relays.make(f"redis://:s3cret@127.0.0.1:{server.port}", "relay-a")
        bad = relays.make(f"redis://:wrong@127.0.0.1:{server.port}", "relay-b")
        assert (yield relays.start(good)) is True
        assert (yield relays.start(bad)) is False
        yield good.announce_presence(_presence("relay-a"))
        assert (yield good.resolve_presence("w:1", "rt:1")).relay_id == "relay-a"
    finally:
        server.stop()


@pytest_twisted.inlineCallbacks
def test_sentinel_url_finds_the_master(redis_server: RedisServer, relays: Relays) -> Any:
    """Through redis+sentinel:// the relay reaches the master Sentinel reports, for presence and frames."""
    sentinel = SentinelServer(redis_server.port).start()
    try:
        a = relays.make(f"redis+sentinel://127.0.0.1:{sentinel.port}/{sentinel.service}", "relay-a",
                        connect_timeout_ms=5000)
        b = relays.make(redis_server.url, "relay-b")
        assert (yield relays.start(a)) is True
        yield relays.start(b)
        yield a.announce_presence(_presence("relay-a"))
        assert (yield b.resolve_presence("w:1", "rt:1")).relay_id == "relay-a"
        a.watch_scope("w:1", "rt:1", "daemon")
        yield a.subscriptions_settled()
        assert (yield b.publish(bus_frame("relay-b", "relay-a"))) is True
        yield _poll(lambda: len(relays.received["relay-a"]) == 1, "delivery through the Sentinel-found master")
        yield a.stop()
    finally:
        sentinel.stop()


@pytest_twisted.inlineCallbacks
def test_frames_past_their_deadline_are_dropped(redis_server: RedisServer, relays: Relays) -> Any:
    """A correctly signed envelope received after its deliver-by time (its sender gave up) is dropped and counted."""
    b = relays.make(redis_server.url, "relay-b")
    yield relays.start(b)
    b.watch_scope("w:1", "rt:1", "daemon")
    yield b.subscriptions_settled()
    channel = bus_channel("viewport-test", "daemon", "w:1", "rt:1")
    now = int(time.time() * 1000)

    def envelope(payload: str, deliver_by: int) -> str:
        frame = bus_frame("relay-a", "relay-b", payload=payload)
        return encode_envelope(frame, now, "n" + payload, sign(KEY, frame, now, signed_nonce("n" + payload, deliver_by)),
                               deliver_by)

    redis_command(redis_server.port, "PUBLISH", channel, envelope('{"n":"late"}', now - 1))
    redis_command(redis_server.port, "PUBLISH", channel, envelope('{"n":"in time"}', now + 60000))
    forged = json.loads(envelope('{"n":"moved"}', now - 1))
    forged["deliverByMs"] = now + 60000
    redis_command(redis_server.port, "PUBLISH", channel, json.dumps(forged))
    yield _poll(lambda: _count(relays.metrics["relay-b"], "relay_bus_pull_invalid_signature") == 1, "the forged deadline")
    assert [f.payload for f in relays.received["relay-b"]] == ['{"n":"in time"}']
    assert _count(relays.metrics["relay-b"], "relay_bus_frames_expired") == 1


@pytest_twisted.inlineCallbacks
def test_presence_of_a_relay_that_died_is_ignored(redis_server: RedisServer, relays: Relays) -> Any:
    """A relay that stops refreshing its liveness key (it crashed) is reported dead and its presences stop resolving."""
    a = relays.make(redis_server.url, "relay-a", liveness_ttl_ms=600)
    b = relays.make(redis_server.url, "relay-b", liveness_ttl_ms=600, resolve_cache_ms=60000)
    yield relays.start(a)
    yield relays.start(b)
    yield a.announce_presence(_presence("relay-a"))
    assert (yield b.resolve_presence("w:1", "rt:1")).relay_id == "relay-a"
    assert (yield b.dead_relays(["relay-a", "never-seen"])) == frozenset()
    a._refresher.stop()  # a crash: nothing refreshes its keys any more, nothing deletes them
    yield _poll(lambda: redis_command(redis_server.port, "EXISTS", liveness_key("viewport-test", "relay-a")) == 0,
                "the liveness key to expire")
    assert (yield b.dead_relays(["relay-a", "never-seen"])) == frozenset({"relay-a"})
    assert (yield b.resolve_presence("w:1", "rt:1")) is None
    assert redis_command(redis_server.port, "EXISTS", presence_key("viewport-test", "w:1", "rt:1")) == 1
    assert _count(relays.metrics["relay-b"], "relay_presence_dead_relay") == 1


@pytest_twisted.inlineCallbacks
def test_a_stopped_redis_that_accepts_tcp_is_not_reported_connected(redis_server: RedisServer, relays: Relays) -> Any:
    """A SIGSTOPped Redis still accepts TCP connections: the backplane stays degraded and never logs relay_redis_connected."""
    events: List[Any] = []
    globalLogPublisher.addObserver(events.append)
    redis_server.pause()
    try:
        a = relays.make(redis_server.url, "relay-a", connect_timeout_ms=800)
        assert (yield relays.start(a)) is False
        assert not a.healthy
        assert [e for e in events if e.get("relay_event") == "relay_redis_connected"] == []
        redis_server.resume()
        yield _poll(lambda: a.healthy, "connected once Redis answers")
        assert len([e for e in events if e.get("relay_event") == "relay_redis_connected"]) == 1
    finally:
        redis_server.resume()
        globalLogPublisher.removeObserver(events.append)


@pytest_twisted.inlineCallbacks
def test_publish_errors_of_an_outage_are_logged_once_with_a_count(redis_server: RedisServer, relays: Relays) -> Any:
    """Hundreds of publishes failing in a Redis stall give one relay_bus_publish_error line (and a count later), not hundreds."""
    events: List[Any] = []
    globalLogPublisher.addObserver(events.append)
    try:
        a = relays.make(redis_server.url, "relay-a")
        yield relays.start(a)
        redis_server.pause()
        results = yield gatherResults([a.publish(bus_frame("relay-a", "relay-b", payload=f'{{"n":{n}}}'))
                                       for n in range(300)])
        assert results == [False] * 300
        logged = [e for e in events if e.get("relay_event") == "relay_bus_publish_error"]
        assert len(logged) == 1
    finally:
        redis_server.resume()
        globalLogPublisher.removeObserver(events.append)


@pytest_twisted.inlineCallbacks
def test_frames_out_of_order_are_dropped_and_gaps_reported(redis_server: RedisServer, relays: Relays) -> Any:
    """
    A stream's envelopes carry numbers in their signed nonce: one that comes after a later one is dropped,
    one after a gap is delivered, and both are reported (frames_missed) and counted; a re-subscription
    after unwatching starts afresh, and frames for another target relay form their own stream.
    """
    b = relays.make(redis_server.url, "relay-b")
    missed: List[BusFrame] = []
    received = relays.received.setdefault("relay-b", [])
    yield b.start(received.append, None, missed.append)
    b.watch_scope("w:1", "rt:1", "clients")
    yield b.subscriptions_settled()
    channel = bus_channel("viewport-test", "clients", "w:1", "rt:1")

    def publish(seq: int, target: str = "relay-b", epoch: str = "epochAAAA") -> None:
        frame = BusFrame("w:1", "rt:1", "relay-a", target, "daemon_to_clients", f'{{"n":{seq}}}')
        now = int(time.time() * 1000)
        nonce = f"{epoch}.{seq}"
        deadline = now + 60000
        envelope = encode_envelope(frame, now, nonce, sign(KEY, frame, now, signed_nonce(nonce, deadline)), deadline)
        redis_command(redis_server.port, "PUBLISH", channel, envelope)

    for seq in (1, 2, 4, 3, 5):
        publish(seq)
    yield _poll(lambda: len(received) == 4, "four frames delivered")
    assert [f.payload for f in received] == ['{"n":1}', '{"n":2}', '{"n":4}', '{"n":5}']
    assert [f.payload for f in missed] == ['{"n":4}', '{"n":3}']
    assert _count(relays.metrics["relay-b"], "relay_bus_frames_out_of_order") == 1
    assert _count(relays.metrics["relay-b"], "relay_bus_frames_missing") == 1

    publish(7, target="relay-c")  # skipped unread by relay-b, and no gap in relay-b's own stream
    publish(6)
    yield _poll(lambda: len(received) == 5, "frame 6 delivered")
    assert len(missed) == 2

    b.unwatch_scope("w:1", "rt:1", "clients")
    yield b.subscriptions_settled()
    publish(7)
    b.watch_scope("w:1", "rt:1", "clients")
    yield b.subscriptions_settled()
    publish(20)  # published while relay-b listened again: not a gap
    yield _poll(lambda: len(received) == 6, "frame 20 delivered")
    assert len(missed) == 2


@pytest_twisted.inlineCallbacks
def test_published_envelopes_are_numbered_per_stream(redis_server: RedisServer, relays: Relays) -> Any:
    """What a relay publishes carries ``<epoch>.<n>`` nonces, counting up per scope and target relay."""
    a = relays.make(redis_server.url, "relay-a")
    b = relays.make(redis_server.url, "relay-b")
    yield relays.start(a)
    yield relays.start(b)
    b.watch_scope("w:1", "rt:1", "clients")
    yield b.subscriptions_settled()
    for _ in range(3):
        frame = BusFrame("w:1", "rt:1", "relay-a", "relay-b", "daemon_to_clients", '{"n":1}')
        assert (yield a.publish(frame)) is True
    yield _poll(lambda: len(relays.received["relay-b"]) == 3, "three frames delivered")
    assert _count(relays.metrics["relay-b"], "relay_bus_frames_out_of_order") == 0
    assert _count(relays.metrics["relay-b"], "relay_bus_frames_missing") == 0


class CommandWatchTests(SynchronousTestCase):
    """The per-connection command timeout: one timer, moved on by answers, failing every waiting command at once."""

    def setUp(self) -> None:
        from viewport.relay.backplane.redis_connection import _CommandWatch

        self.clock = task.Clock()
        self.aborted: List[bool] = []
        self.watch = _CommandWatch(self.clock, 2.0, lambda: self.aborted.append(True))

    def test_many_commands_share_one_timer(self) -> None:
        """A thousand commands in flight schedule one delayed call, not a thousand."""
        waiting = [self.watch.watch(Deferred()) for _ in range(1000)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        for d in waiting:
            d.callback("OK")
        self.clock.advance(2.0)
        self.assertEqual((self.clock.getDelayedCalls(), self.aborted), ([], []))

    def test_silence_times_out_every_waiting_command_at_the_oldest_deadline(self) -> None:
        """2 s after the oldest unanswered command was sent, every waiting command fails with TimeoutError and the connection is aborted."""
        first, second, third = (self.watch.watch(Deferred()) for _ in range(3))
        self.clock.advance(1.5)
        first.callback(1)
        self.clock.advance(0.49)
        self.assertEqual(self.aborted, [])
        self.assertNoResult(second)
        self.clock.advance(0.01)
        self.assertEqual(self.aborted, [True])
        for d in (second, third):
            self.failureResultOf(d, DeferredTimeoutError)
        second.callback("late answer")  # what txredisapi might still do: ignored

    def test_answers_for_others_do_not_stretch_a_commands_deadline(self) -> None:
        """
        Commands behind a slow queue time out 2 s after they were sent even while answers keep coming
        (a publish answered later than the deliver-by deadline it was signed with would be counted
        delivered while its receivers drop it).
        """
        waiting = []
        for _ in range(5):
            waiting.append(self.watch.watch(Deferred()))
            self.clock.advance(0.1)
        # An answer every 1.9 s: the oldest is answered in time, the second is not.
        self.clock.advance(1.4)  # 1.9 s after the first was sent
        waiting[0].callback(1)
        self.clock.advance(0.19)  # 1.99 s after the second was sent
        self.assertEqual(self.aborted, [])
        self.clock.advance(0.02)  # 2.01 s after it: the answers for others did not stretch its deadline
        self.assertEqual(self.aborted, [True])
        for d in waiting[1:]:
            self.failureResultOf(d, DeferredTimeoutError)

    def test_a_command_after_an_idle_spell_gets_the_whole_timeout(self) -> None:
        """The timer armed for an earlier burst does not cut short a command sent after a quiet time."""
        self.watch.watch(Deferred()).callback(1)
        self.clock.advance(1.9)
        later = self.watch.watch(Deferred())
        self.clock.advance(1.9)
        self.assertNoResult(later)
        self.clock.advance(0.2)
        self.failureResultOf(later, DeferredTimeoutError)

    def test_readonly_answer_aborts_other_errors_do_not(self) -> None:
        """READONLY (a demoted server) aborts the connection; another error is just passed on."""
        import txredisapi

        wrong = self.watch.watch(Deferred())
        wrong.errback(txredisapi.ResponseError("WRONGTYPE Operation against a key"))
        self.failureResultOf(wrong, txredisapi.ResponseError)
        self.assertEqual(self.aborted, [])
        readonly = self.watch.watch(Deferred())
        readonly.errback(txredisapi.ResponseError("READONLY You can't write against a read only replica."))
        self.failureResultOf(readonly, txredisapi.ResponseError)
        self.assertEqual(self.aborted, [True])
