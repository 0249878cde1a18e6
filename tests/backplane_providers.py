"""Factories of backplane trios for the IBackplane contract suite (one entry per provider, fakes included)."""

from __future__ import annotations

import uuid
from typing import Any, Callable, Dict, List, Optional

from twisted.internet.defer import Deferred, succeed

from viewport.relay.backplane.redis import RedisBackplane
from viewport.relay.backplane.single import SingleBackplane
from viewport.relay.interfaces import BusFrame, Direction
from viewport.testing import InMemoryBackplane, InMemoryBus, RecordingBackplane



def bus_frame(source: str, target: Optional[str], *, direction: Direction = "client_to_daemon",
              payload: str = '{"type":"e2ee"}', workspace: str = "w:1", runtime_target: str = "rt:1") -> BusFrame:
    """A bus frame of the backplane tests: from ``source`` to ``target`` (None: every relay), in scope w:1/rt:1."""
    return BusFrame(
        workspace_id=workspace,
        runtime_target_id=runtime_target,
        source_relay_id=source,
        target_relay_id=target,
        direction=direction,
        payload=payload,
    )

class BackplaneHarness:
    """Three relays' backplanes (``a``, ``b``, ``c``) and what each received."""

    cross_relay = False
    confirms_delivery = True

    def __init__(self, a: Any, b: Any, c: Any) -> None:
        self.a, self.b, self.c = a, b, c
        self.received_a: List[BusFrame] = []
        self.received_b: List[BusFrame] = []
        self.received_c: List[BusFrame] = []

    def start(self) -> "Deferred[BackplaneHarness]":
        """Start all three, each delivering into its own list."""
        from twisted.internet.defer import gatherResults

        return gatherResults(
            [
                self.a.start(self.received_a.append),
                self.b.start(self.received_b.append),
                self.c.start(self.received_c.append),
            ]
        ).addCallback(lambda _: self)

    def ready(self) -> "Deferred[None]":
        """Fires once watch/unwatch calls made so far took effect (e.g. Redis SUBSCRIBE acknowledged)."""
        return succeed(None)

    def close(self) -> "Deferred[Any]":
        """Stop all three and release shared infrastructure."""
        from twisted.internet.defer import gatherResults

        return gatherResults([self.a.stop(), self.b.stop(), self.c.stop()])


def _single() -> "Deferred[BackplaneHarness]":
    return BackplaneHarness(
        SingleBackplane("relay-a"), SingleBackplane("relay-b"), SingleBackplane("relay-c")
    ).start()


class InMemoryHarness(BackplaneHarness):
    """Three in-memory relays on one ``InMemoryBus``: cross-relay, and a publish says whether a relay took it."""

    cross_relay = True
    confirms_delivery = True


def _memory() -> "Deferred[BackplaneHarness]":
    from twisted.internet import reactor

    # Frames wait for the reactor's next turn, as on a real bus.
    bus = InMemoryBus(clock=reactor)
    return InMemoryHarness(*(InMemoryBackplane(relay_id, bus) for relay_id in ("relay-a", "relay-b", "relay-c"))).start()


def _recording() -> "Deferred[BackplaneHarness]":
    # The router tests' fake, as they build it but sharing one bus, synchronous (no clock).
    bus = InMemoryBus()
    return InMemoryHarness(*(RecordingBackplane(relay_id, bus=bus) for relay_id in ("relay-a", "relay-b", "relay-c"))).start()


#: The machine's shared Redis (VIEWPORT_TEST_REDIS_URL); each harness uses its own key prefix.
from tests.redis_server import SHARED_REDIS_URL  # noqa: E402


class RedisHarness(BackplaneHarness):
    """Three ``RedisBackplane`` relays (or ``kind``) on the shared Redis (or ``url``), under a key prefix of their own."""

    cross_relay = True
    confirms_delivery = True

    def __init__(self, url: str = SHARED_REDIS_URL, kind: type = RedisBackplane) -> None:
        from twisted.internet import reactor

        self.url = url
        prefix = f"viewport-test:{uuid.uuid4().hex}"
        super().__init__(*(
            kind(
                relay_id=relay_id,
                redis_url=url,
                hmac_key="contract-bus-key",
                reactor=reactor,
                key_prefix=prefix,
                # The contract expects another relay's disconnect to be visible at once; the
                # positive cache (up to resolve_cache_ms stale) is covered by test_backplane_redis.
                resolve_cache_ms=0,
            )
            for relay_id in ("relay-a", "relay-b", "relay-c")
        ))

    def start(self) -> "Deferred[BackplaneHarness]":
        """Start all three and insist that Redis was reachable."""

        def connected(harness: BackplaneHarness) -> Any:
            if all(backplane.healthy for backplane in (self.a, self.b, self.c)):
                return harness

            def unreachable(_: object) -> None:
                raise AssertionError(f"Redis at {self.url} unreachable")

            return self.close().addCallback(unreachable)

        return super().start().addCallback(connected)

    def ready(self) -> "Deferred[None]":
        """Fires once Redis answered every SUBSCRIBE/UNSUBSCRIBE sent so far."""
        from twisted.internet.defer import gatherResults

        return gatherResults(
            [backplane.subscriptions_settled() for backplane in (self.a, self.b, self.c)]
        ).addCallback(lambda _: None)


def _redis() -> "Deferred[BackplaneHarness]":
    return RedisHarness().start()


def _redis_cluster() -> "Deferred[BackplaneHarness]":
    # A private 3-master, 3-replica Redis Cluster shared by the session (its topology stays as started).
    from tests.redis_cluster import shared_cluster
    from viewport.relay.backplane.redis_cluster import RedisClusterBackplane

    return RedisHarness(shared_cluster().url, RedisClusterBackplane).start()


def _server() -> "Deferred[BackplaneHarness]":
    # A real viewport-bus process on a fresh PostgreSQL database (see tests/pg_server.py).
    from tests.pg_server import server_harness

    return server_harness()  # type: ignore[no-any-return]


PROVIDERS: Dict[str, Callable[[], "Deferred[BackplaneHarness]"]] = {
    "single": _single,
    "memory": _memory,
    "recording": _recording,
    "redis": _redis,
    "redis-cluster": _redis_cluster,
    "server": _server,
}
