"""The IBackplane contract: one suite, run against every provider (single, redis, server)."""

from __future__ import annotations

from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from zope.interface.verify import verifyObject

from tests.backplane_providers import PROVIDERS, BackplaneHarness
from viewport.relay.interfaces import BusFrame, IBackplane, Presence

DELIVERY_DEADLINE_SECONDS = 10.0


@pytest.fixture(params=sorted(PROVIDERS))
def harness(request: Any) -> Any:
    """Two relays' backplanes (A and B) on one shared infrastructure, for each provider."""
    made: BackplaneHarness = pytest_twisted.blockon(PROVIDERS[request.param]())
    yield made
    pytest_twisted.blockon(made.close())


def _frame(source: str, target: Any, direction: str = "client_to_daemon", payload: str = '{"type":"e2ee"}',
           workspace: str = "w:1", runtime_target: str = "rt:1") -> BusFrame:
    return BusFrame(
        workspace_id=workspace,
        runtime_target_id=runtime_target,
        source_relay_id=source,
        target_relay_id=target,
        direction=direction,  # type: ignore[arg-type]
        payload=payload,
    )


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


def _settle() -> Any:
    """Give a provider a moment to (not) deliver: used only to assert that nothing arrives."""
    return task.deferLater(reactor, 0.3, lambda: None)


def test_provides_interface(harness: BackplaneHarness) -> None:
    """Every provider fully provides IBackplane."""
    assert verifyObject(IBackplane, harness.a)
    assert harness.a.relay_id == "relay-a"


@pytest_twisted.inlineCallbacks
def test_targeted_frame_reaches_the_watching_relay(harness: BackplaneHarness) -> Any:
    """A client→daemon frame published by A for B arrives at B unchanged, and not at A."""
    if not harness.cross_relay:
        ok = yield harness.a.publish(_frame("relay-a", "relay-b"))
        assert ok is False
        return
    harness.b.watch_scope("w:1", "rt:1", "daemon")
    yield harness.ready()
    sent = _frame("relay-a", "relay-b", payload='{"type":"e2ee","x":"é\\n"}')
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
    if not harness.cross_relay:
        return
    harness.b.watch_scope("w:1", "rt:1", "daemon")
    yield harness.ready()
    for index in range(30):
        yield harness.a.publish(_frame("relay-a", "relay-b", payload=f'{{"n":{index}}}'))
    yield _wait_for(harness.received_b, 30)
    assert [f.payload for f in harness.received_b] == [f'{{"n":{i}}}' for i in range(30)]


@pytest_twisted.inlineCallbacks
def test_pipelined_frames_arrive_in_publish_order(harness: BackplaneHarness) -> Any:
    """Frames published without waiting for each other (one scope, one direction) still arrive in order."""
    if not harness.cross_relay:
        return
    harness.b.watch_scope("w:1", "rt:1", "daemon")
    yield harness.ready()
    published = [harness.a.publish(_frame("relay-a", "relay-b", payload=f'{{"n":{i}}}')) for i in range(40)]
    from twisted.internet.defer import gatherResults

    yield gatherResults(published)
    yield _wait_for(harness.received_b, 40)
    assert [f.payload for f in harness.received_b] == [f'{{"n":{i}}}' for i in range(40)]


@pytest_twisted.inlineCallbacks
def test_reply_reaches_only_its_target_relay(harness: BackplaneHarness) -> Any:
    """A daemon→clients frame targeted at A reaches A even when B also watches the clients side."""
    if not harness.cross_relay:
        return
    harness.a.watch_scope("w:1", "rt:1", "clients")
    harness.b.watch_scope("w:1", "rt:1", "clients")
    yield harness.ready()
    yield harness.c.publish(_frame("relay-c", "relay-a", direction="daemon_to_clients"))
    yield _wait_for(harness.received_a, 1)
    yield _settle()
    assert harness.received_b == []


@pytest_twisted.inlineCallbacks
def test_broadcast_reaches_every_watching_relay(harness: BackplaneHarness) -> Any:
    """An untargeted daemon→clients frame (session events) reaches every relay watching the clients side."""
    if not harness.cross_relay:
        return
    harness.a.watch_scope("w:1", "rt:1", "clients")
    harness.b.watch_scope("w:1", "rt:1", "clients")
    yield harness.ready()
    yield harness.c.publish(_frame("relay-c", None, direction="daemon_to_clients"))
    yield _wait_for(harness.received_a, 1)
    yield _wait_for(harness.received_b, 1)


@pytest_twisted.inlineCallbacks
def test_unwatched_scope_receives_nothing(harness: BackplaneHarness) -> Any:
    """After unwatch, frames for the scope are no longer delivered."""
    if not harness.cross_relay:
        return
    harness.b.watch_scope("w:1", "rt:1", "daemon")
    yield harness.ready()
    harness.b.unwatch_scope("w:1", "rt:1", "daemon")
    yield harness.ready()
    ok = yield harness.a.publish(_frame("relay-a", "relay-b"))
    if harness.confirms_delivery:
        assert ok is False
    yield _settle()
    assert harness.received_b == []


@pytest_twisted.inlineCallbacks
def test_ids_with_colons_do_not_collide(harness: BackplaneHarness) -> Any:
    """Workspace ``a:b`` without more and workspace ``a`` with target ``b:…`` are different channels."""
    if not harness.cross_relay:
        return
    harness.b.watch_scope("a", "b:c", "daemon")
    yield harness.ready()
    yield harness.a.publish(_frame("relay-a", "relay-b", workspace="a:b", runtime_target="c"))
    yield _settle()
    assert harness.received_b == []


@pytest_twisted.inlineCallbacks
def test_presence_round_trip(harness: BackplaneHarness) -> Any:
    """A's daemon presence resolves from B with relay id, URL and machine id, and clears on disconnect."""
    presence = Presence("w:1", "rt:1", "relay-a", "ws://a.example:7781/ws", True, machine_id="m1")
    yield harness.a.announce_presence(presence)
    found = yield harness.b.resolve_presence("w:1", "rt:1")
    if not harness.cross_relay:
        assert found is None
        return
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
def test_disconnect_by_another_relay_keeps_presence(harness: BackplaneHarness) -> Any:
    """A relay clearing presence it no longer owns leaves the new owner's presence in place."""
    if not harness.cross_relay:
        return
    yield harness.a.announce_presence(Presence("w:1", "rt:1", "relay-a", "ws://a.example/ws", True))
    yield harness.b.announce_presence(Presence("w:1", "rt:1", "relay-b", "ws://b.example/ws", False))
    found = yield harness.c.resolve_presence("w:1", "rt:1")
    assert found is not None and found.relay_id == "relay-a"


@pytest_twisted.inlineCallbacks
def test_stop_then_publish_fails_quietly(harness: BackplaneHarness) -> Any:
    """After stop, publishing reports False instead of raising."""
    yield harness.a.stop()
    ok = yield harness.a.publish(_frame("relay-a", "relay-b"))
    assert ok is False
