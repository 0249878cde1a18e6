"""The IBackplane contract: one suite, run against every provider (single, the in-memory fakes, redis, server)."""

from __future__ import annotations

from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.backplane_providers import PROVIDERS, BackplaneHarness, bus_frame
from viewport.relay.interfaces import BusFrame, IBackplane, Presence
from viewport.testing import InMemoryBackplane, InMemoryBus, RecordingBackplane

DELIVERY_DEADLINE_SECONDS = 10.0


@pytest.fixture(params=sorted(PROVIDERS))
def harness(request: Any) -> Any:
    """Two relays' backplanes (A and B) on one shared infrastructure, for each provider."""
    made: BackplaneHarness = pytest_twisted.blockon(PROVIDERS[request.param]())
    yield made
    pytest_twisted.blockon(made.close())




def _wait_for(received: List[BusFrame], count: int) -> Any:
    """Poll (bounded by a deadline) until ``count`` frames arrived."""
    deadline = reactor.seconds() + DELIVERY_DEADLINE_SECONDS

    def check() -> Any:
        if len(received) >= count:
            return received
        if reactor.seconds() > deadline:
            raise AssertionError(f"only {len(received)} of {count} frames arrived")
        return task.deferLater(reactor, 0.01, check)

    return check()


def _needs_other_relays(harness: BackplaneHarness) -> None:
    """Skip a test of what crosses relays on a provider that reaches none (``test_a_relay_alone_reaches_no_one``)."""
    if not harness.cross_relay:
        pytest.skip("this provider reaches no other relay (cross_relay is False)")


def _settle() -> Any:
    """Give a provider a moment to (not) deliver: used only to assert that nothing arrives."""
    return task.deferLater(reactor, 0.3, lambda: None)


def test_provides_interface(harness: BackplaneHarness) -> None:
    """Every provider fully provides IBackplane."""
    assert verifyObject(IBackplane, harness.a)
    assert harness.a.relay_id == "relay-a"
    assert harness.a.cross_relay is harness.cross_relay


@pytest_twisted.inlineCallbacks
def test_a_relay_alone_reaches_no_one(harness: BackplaneHarness) -> Any:
    """A provider without other relays refuses every publish and resolves no other relay's presence."""
    if harness.cross_relay:
        pytest.skip("this provider reaches other relays (cross_relay is True)")
    harness.b.watch_scope("w:1", "rt:1", "daemon")
    yield harness.ready()
    ok = yield harness.a.publish(bus_frame("relay-a", "relay-b"))
    assert ok is False
    yield harness.a.announce_presence(Presence("w:1", "rt:1", "relay-a", "ws://a.example:7781/ws", True))
    found = yield harness.b.resolve_presence("w:1", "rt:1")
    assert found is None
    yield _settle()
    assert harness.received_b == []


@pytest_twisted.inlineCallbacks
def test_targeted_frame_reaches_the_watching_relay(harness: BackplaneHarness) -> Any:
    """A client→daemon frame published by A for B arrives at B unchanged, and not at A."""
    _needs_other_relays(harness)
    harness.b.watch_scope("w:1", "rt:1", "daemon")
    yield harness.ready()
    sent = bus_frame("relay-a", "relay-b", payload='{"type":"e2ee","x":"é\\n"}')
    ok = yield harness.a.publish(sent)
    assert ok is True
    yield _wait_for(harness.received_b, 1)
    got = harness.received_b[0]
    assert (got.workspace_id, got.runtime_target_id, got.payload, got.direction, got.source_relay_id) == (
        sent.workspace_id, sent.runtime_target_id, sent.payload, sent.direction, "relay-a"
    )
    yield _settle()
    assert harness.received_a == []


@pytest_twisted.inlineCallbacks
def test_frames_arrive_in_publish_order(harness: BackplaneHarness) -> Any:
    """Frames published one after another by one relay arrive in that order."""
    _needs_other_relays(harness)
    harness.b.watch_scope("w:1", "rt:1", "daemon")
    yield harness.ready()
    for index in range(30):
        yield harness.a.publish(bus_frame("relay-a", "relay-b", payload=f'{{"n":{index}}}'))
    yield _wait_for(harness.received_b, 30)
    assert [f.payload for f in harness.received_b] == [f'{{"n":{i}}}' for i in range(30)]


@pytest_twisted.inlineCallbacks
def test_pipelined_frames_arrive_in_publish_order(harness: BackplaneHarness) -> Any:
    """Frames published without waiting for each other (one scope, one direction) still arrive in order."""
    _needs_other_relays(harness)
    harness.b.watch_scope("w:1", "rt:1", "daemon")
    yield harness.ready()
    published = [harness.a.publish(bus_frame("relay-a", "relay-b", payload=f'{{"n":{i}}}')) for i in range(40)]
    from twisted.internet.defer import gatherResults

    yield gatherResults(published)
    yield _wait_for(harness.received_b, 40)
    assert [f.payload for f in harness.received_b] == [f'{{"n":{i}}}' for i in range(40)]


@pytest_twisted.inlineCallbacks
def test_reply_reaches_only_its_target_relay(harness: BackplaneHarness) -> Any:
    """A daemon→clients frame targeted at A reaches A even when B also watches the clients side."""
    _needs_other_relays(harness)
    harness.a.watch_scope("w:1", "rt:1", "clients")
    harness.b.watch_scope("w:1", "rt:1", "clients")
    yield harness.ready()
    yield harness.c.publish(bus_frame("relay-c", "relay-a", direction="daemon_to_clients"))
    yield _wait_for(harness.received_a, 1)
    yield _settle()
    assert harness.received_b == []


@pytest_twisted.inlineCallbacks
def test_broadcast_reaches_every_watching_relay(harness: BackplaneHarness) -> Any:
    """An untargeted daemon→clients frame (session events) reaches every relay watching the clients side."""
    _needs_other_relays(harness)
    harness.a.watch_scope("w:1", "rt:1", "clients")
    harness.b.watch_scope("w:1", "rt:1", "clients")
    yield harness.ready()
    yield harness.c.publish(bus_frame("relay-c", None, direction="daemon_to_clients"))
    yield _wait_for(harness.received_a, 1)
    yield _wait_for(harness.received_b, 1)


@pytest_twisted.inlineCallbacks
def test_unwatched_scope_receives_nothing(harness: BackplaneHarness) -> Any:
    """After unwatch, frames for the scope are no longer delivered."""
    _needs_other_relays(harness)
    harness.b.watch_scope("w:1", "rt:1", "daemon")
    yield harness.ready()
    harness.b.unwatch_scope("w:1", "rt:1", "daemon")
    yield harness.ready()
    ok = yield harness.a.publish(bus_frame("relay-a", "relay-b"))
    if harness.confirms_delivery:
        assert ok is False
    yield _settle()
    assert harness.received_b == []


@pytest_twisted.inlineCallbacks
def test_ids_with_colons_do_not_collide(harness: BackplaneHarness) -> Any:
    """Workspace ``a:b`` without more and workspace ``a`` with target ``b:…`` are different channels."""
    _needs_other_relays(harness)
    harness.b.watch_scope("a", "b:c", "daemon")
    yield harness.ready()
    yield harness.a.publish(bus_frame("relay-a", "relay-b", workspace="a:b", runtime_target="c"))
    yield _settle()
    assert harness.received_b == []


@pytest_twisted.inlineCallbacks
def test_presence_round_trip(harness: BackplaneHarness) -> Any:
    """A's daemon presence resolves from B with relay id, URL and machine id, and clears on disconnect."""
    _needs_other_relays(harness)
    presence = Presence("w:1", "rt:1", "relay-a", "ws://a.example:7781/ws", True, machine_id="m1")
    yield harness.a.announce_presence(presence)
    found = yield harness.b.resolve_presence("w:1", "rt:1")
    assert found is not None
    assert (found.relay_id, found.relay_ws_base_url, found.daemon_connected, found.machine_id) == (
        "relay-a", "ws://a.example:7781/ws", True, "m1"
    )
    yield harness.a.announce_presence(
        Presence("w:1", "rt:1", "relay-a", "ws://a.example:7781/ws", False, machine_id="m1")
    )
    gone = yield harness.b.resolve_presence("w:1", "rt:1")
    assert gone is None


@pytest_twisted.inlineCallbacks
def test_forgotten_presence_is_read_again(harness: BackplaneHarness) -> Any:
    """
    After forget_presence naming A (the router heard A's daemon-gone notice), B's next resolve reads the
    store, whatever B kept; forgetting a scope nobody resolved, or another relay's presence, is harmless.
    """
    harness.a.forget_presence("w:never", None, "relay-z")
    _needs_other_relays(harness)
    presence = Presence("w:1", "rt:1", "relay-a", "ws://a.example:7781/ws", True)
    yield harness.a.announce_presence(presence)
    found = yield harness.b.resolve_presence("w:1", "rt:1")
    assert found is not None and found.relay_id == "relay-a"
    harness.b.forget_presence("w:1", "rt:1", "relay-c")
    yield harness.a.announce_presence(Presence("w:1", "rt:1", "relay-a", "ws://a.example:7781/ws", False))
    harness.b.forget_presence("w:1", "rt:1", "relay-a")
    gone = yield harness.b.resolve_presence("w:1", "rt:1")
    assert gone is None


@pytest_twisted.inlineCallbacks
def test_known_presence_is_what_resolve_would_answer(harness: BackplaneHarness) -> Any:
    """
    ``known_presence`` never invents an answer: None for a scope nobody resolved, else (when kept)
    the answer ``resolve_presence`` gave, and None again once ``forget_presence`` names its relay.
    """
    assert harness.b.known_presence("w:never", "rt:1") is None
    _needs_other_relays(harness)
    yield harness.a.announce_presence(Presence("w:1", "rt:1", "relay-a", "ws://a.example:7781/ws", True))
    found = yield harness.b.resolve_presence("w:1", "rt:1")
    assert found is not None
    assert harness.b.known_presence("w:1", "rt:1") in (None, found)
    assert harness.b.known_presence("w:1", "rt:other") is None
    harness.b.forget_presence("w:1", "rt:1", "relay-a")
    assert harness.b.known_presence("w:1", "rt:1") is None


@pytest_twisted.inlineCallbacks
def test_disconnect_by_another_relay_keeps_presence(harness: BackplaneHarness) -> Any:
    """A relay clearing presence it no longer owns leaves the new owner's presence in place."""
    _needs_other_relays(harness)
    yield harness.a.announce_presence(Presence("w:1", "rt:1", "relay-a", "ws://a.example/ws", True))
    yield harness.b.announce_presence(Presence("w:1", "rt:1", "relay-b", "ws://b.example/ws", False))
    found = yield harness.c.resolve_presence("w:1", "rt:1")
    assert found is not None and found.relay_id == "relay-a"


@pytest_twisted.inlineCallbacks
def test_stop_then_publish_fails_quietly(harness: BackplaneHarness) -> Any:
    """After stop, publishing reports False instead of raising."""
    yield harness.a.stop()
    ok = yield harness.a.publish(bus_frame("relay-a", "relay-b"))
    assert ok is False


@pytest_twisted.inlineCallbacks
def test_watching_twice_delivers_once(harness: BackplaneHarness) -> Any:
    """Watching a scope twice delivers each frame once, and one unwatch stops it (watch and unwatch are idempotent)."""
    _needs_other_relays(harness)
    harness.b.watch_scope("w:1", "rt:1", "daemon")
    harness.b.watch_scope("w:1", "rt:1", "daemon")
    harness.b.unwatch_scope("w:1", "rt:1", "clients")
    yield harness.ready()
    yield harness.a.publish(bus_frame("relay-a", "relay-b", payload='{"n":1}'))
    yield _wait_for(harness.received_b, 1)
    harness.b.unwatch_scope("w:1", "rt:1", "daemon")
    yield harness.ready()
    yield harness.a.publish(bus_frame("relay-a", "relay-b", payload='{"n":2}'))
    yield _settle()
    assert [f.payload for f in harness.received_b] == ['{"n":1}']


@pytest_twisted.inlineCallbacks
def test_live_and_unknown_relays_are_not_dead(harness: BackplaneHarness) -> Any:
    """``dead_relays`` names neither a running relay (whose presence was seen) nor a relay nobody heard of."""
    yield harness.a.announce_presence(Presence("w:1", "rt:1", "relay-a", "ws://a.example/ws", True))
    yield harness.b.resolve_presence("w:1", "rt:1")
    dead = yield harness.b.dead_relays(["relay-a", "relay-never-heard-of", "relay-b"])
    assert dead == frozenset()


@pytest_twisted.inlineCallbacks
def test_a_relay_that_said_goodbye_is_dead(harness: BackplaneHarness) -> Any:
    """After A stops, its presence no longer resolves and the relays that saw it report A dead."""
    _needs_other_relays(harness)
    yield harness.a.announce_presence(Presence("w:1", "rt:1", "relay-a", "ws://a.example/ws", True))
    found = yield harness.b.resolve_presence("w:1", "rt:1")
    assert found is not None and found.relay_id == "relay-a"
    yield harness.a.stop()
    dead = yield harness.b.dead_relays(["relay-a", "relay-c"])
    assert dead == frozenset({"relay-a"})
    gone = yield harness.c.resolve_presence("w:1", "rt:1")
    assert gone is None


# -- what only the in-memory bus can simulate (the faults and the recording of the fakes above) ---------


class InMemoryBusTests(SynchronousTestCase):
    """The in-memory backplane's crash, outage and delivery-order simulations, which real providers get from real faults."""

    def setUp(self) -> None:
        self.bus = InMemoryBus()
        self.a, self.b = InMemoryBackplane("relay-a", self.bus), InMemoryBackplane("relay-b", self.bus)
        self.received_a: List[BusFrame] = []
        self.received_b: List[BusFrame] = []
        self.paths_b: List[bool] = []
        self.a.start(self.received_a.append)
        self.b.start(self.received_b.append, self.paths_b.append)

    def test_crash_leaves_presence_that_never_resolves(self) -> None:
        """A relay that crashed is reported dead, its presence never resolves and is then forgotten; it answers nothing."""
        self.a.announce_presence(Presence("w", "t", "relay-a", "ws://a/ws", True))
        self.a.watch_scope("w", "t", "daemon")
        self.bus.crash("relay-a")
        self.assertIn(("w", "t"), self.bus.presence)
        self.assertIsNone(self.successResultOf(self.b.resolve_presence("w", "t")))
        self.assertEqual(self.successResultOf(self.b.dead_relays(["relay-a"])), frozenset({"relay-a"}))
        self.assertEqual(self.bus.presence, {})
        self.assertFalse(self.successResultOf(self.b.publish(bus_frame("relay-b", "relay-a"))))
        self.assertFalse(self.successResultOf(self.a.publish(bus_frame("relay-a", None, direction="daemon_to_clients"))))

    def test_restarted_relay_is_alive_again(self) -> None:
        """A relay id that said goodbye is alive again once a backplane with that id starts."""
        self.a.stop()
        self.assertEqual(self.successResultOf(self.b.dead_relays(["relay-a"])), frozenset({"relay-a"}))
        InMemoryBackplane("relay-a", self.bus).start(lambda frame: None)
        self.assertEqual(self.successResultOf(self.b.dead_relays(["relay-a"])), frozenset())

    def test_lost_path_is_reported_and_presence_replayed(self) -> None:
        """While cut off a relay is unhealthy and refuses everything; on return it writes what it announced meanwhile."""
        self.b.announce_presence(Presence("w", "old", "relay-b", "ws://b/ws", True))
        self.b.watch_scope("w", "t", "daemon")
        self.b.disconnect()
        self.assertEqual((self.paths_b, self.b.healthy, self.a.healthy), ([False], False, True))
        self.assertFalse(self.successResultOf(self.a.publish(bus_frame("relay-a", "relay-b", workspace="w", runtime_target="t"))))
        self.assertFalse(self.successResultOf(self.b.publish(bus_frame("relay-b", None, direction="daemon_to_clients"))))
        self.b.announce_presence(Presence("w", "t", "relay-b", "ws://b/ws", True))
        self.b.announce_presence(Presence("w", "old", "relay-b", "ws://b/ws", False))
        self.assertIsNone(self.successResultOf(self.b.resolve_presence("w", "old")))
        self.assertIsNotNone(self.successResultOf(self.a.resolve_presence("w", "old")))
        self.b.reconnect()
        self.assertEqual((self.paths_b, self.b.healthy), ([False, True], True))
        self.assertEqual(sorted(self.bus.presence), [("w", "t")])
        self.assertTrue(self.successResultOf(self.a.publish(bus_frame("relay-a", "relay-b", workspace="w", runtime_target="t"))))
        self.assertEqual(len(self.received_b), 1)

    def test_outage_cuts_every_relay_off(self) -> None:
        """An outage of the bus is every relay losing its path at once, and a restore every one regaining it."""
        self.bus.outage()
        self.assertEqual((self.a.healthy, self.b.healthy, self.paths_b), (False, False, [False]))
        self.bus.restore()
        self.assertEqual((self.a.healthy, self.b.healthy, self.paths_b), (True, True, [False, True]))

    def test_a_reply_published_while_delivering_comes_after(self) -> None:
        """A frame published from inside ``deliver`` is delivered once the frame being delivered is done, in order."""
        seen: List[str] = []

        def answer(frame: BusFrame) -> None:
            seen.append(f"start {frame.payload}")
            if frame.payload == "1":
                self.b.publish(bus_frame("relay-b", "relay-a", payload="2"))
                self.b.publish(bus_frame("relay-b", "relay-a", payload="3"))
            seen.append(f"end {frame.payload}")

        self.a.stop()
        a = InMemoryBackplane("relay-a", self.bus)
        a.start(answer)
        a.watch_scope("w:1", "rt:1", "daemon")
        self.assertTrue(self.successResultOf(self.b.publish(bus_frame("relay-b", "relay-a", payload="1"))))
        self.assertEqual(seen, ["start 1", "end 1", "start 2", "end 2", "start 3", "end 3"])

    def test_a_clock_delays_delivery_to_its_next_turn(self) -> None:
        """With a clock, a frame is taken at once (publish fires True) and delivered when the clock turns."""
        clock = Clock()
        bus = InMemoryBus(clock=clock)
        a, b = InMemoryBackplane("relay-a", bus), InMemoryBackplane("relay-b", bus)
        received: List[BusFrame] = []
        a.start(lambda frame: None)
        b.start(received.append)
        b.watch_scope("w:1", "rt:1", "daemon")
        self.assertTrue(self.successResultOf(a.publish(bus_frame("relay-a", "relay-b"))))
        self.assertEqual(received, [])
        clock.advance(0)
        self.assertEqual([frame.source_relay_id for frame in received], ["relay-a"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_failing_deliver_is_logged_and_the_next_frame_still_arrives(self) -> None:
        """An exception in ``deliver`` is logged as the real backplanes log it; delivery goes on."""
        got: List[BusFrame] = []

        def deliver(frame: BusFrame) -> None:
            got.append(frame)
            if len(got) == 1:
                raise RuntimeError("boom")

        b = InMemoryBackplane("relay-c", self.bus)
        b.start(deliver)
        b.watch_scope("w:1", "rt:1", "daemon")
        self.assertTrue(self.successResultOf(self.a.publish(bus_frame("relay-a", None))))
        self.assertTrue(self.successResultOf(self.a.publish(bus_frame("relay-a", None))))
        self.assertEqual((len(got), len(self.flushLoggedErrors(RuntimeError))), (2, 1))

    def test_invalid_frames_are_refused(self) -> None:
        """A frame without a runtime target, or with a payload over the bus's limit, is refused."""
        self.b.watch_scope("w:1", "", "daemon")
        self.assertFalse(self.successResultOf(self.a.publish(bus_frame("relay-a", "relay-b", runtime_target=""))))
        small = InMemoryBus(max_payload_bytes=4)
        a, b = InMemoryBackplane("relay-a", small), InMemoryBackplane("relay-b", small)
        b.start(lambda frame: None)
        b.watch_scope("w:1", "rt:1", "daemon")
        self.assertFalse(self.successResultOf(a.publish(bus_frame("relay-a", "relay-b", payload="12345"))))
        self.assertTrue(self.successResultOf(a.publish(bus_frame("relay-a", "relay-b", payload="1234"))))


class RecordingBackplaneTests(SynchronousTestCase):
    """What the router tests' fake adds to the in-memory backplane."""

    def test_records_calls_and_forces_publish_answers(self) -> None:
        """Calls are recorded; ``publish_result`` answers publishes until stop, after which they fail."""
        backplane = RecordingBackplane("relay-a")
        frame = bus_frame("relay-a", "relay-b")
        self.assertFalse(self.successResultOf(backplane.publish(frame)))
        backplane.publish_result = True
        self.assertTrue(self.successResultOf(backplane.publish(frame)))
        backplane.watch_scope("w:1", "rt:1", "clients")
        backplane.unwatch_scope("w:1", "rt:1", "clients")
        backplane.start(lambda frame: None)
        self.assertTrue(backplane.running)
        backplane.stop()
        self.assertFalse(self.successResultOf(backplane.publish(frame)))
        self.assertEqual(
            (backplane.published, backplane.watch_calls, backplane.unwatch_calls, backplane.running),
            ([frame] * 3, [("w:1", "rt:1", "clients")], [("w:1", "rt:1", "clients")], False),
        )

    def test_seeded_presence_and_deaths(self) -> None:
        """Another relay's daemon seeded in ``presence`` resolves until that relay is in ``dead`` and found so."""
        backplane = RecordingBackplane("relay-a")
        backplane.presence[("w", "t")] = Presence("w", "t", "relay-b", "ws://b/ws", True)
        self.assertEqual(self.successResultOf(backplane.resolve_presence("w", "t")).relay_id, "relay-b")  # type: ignore[union-attr]
        backplane.dead.add("relay-b")
        self.assertEqual(self.successResultOf(backplane.dead_relays(["relay-b", "relay-c"])), frozenset({"relay-b"}))
        self.assertEqual((backplane.presence, backplane.resolved), ({}, [("w", "t")]))
