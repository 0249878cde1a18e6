"""End-to-end: frame routing between daemons and clients through a real relay process."""

from __future__ import annotations

import json
from typing import Any, Optional

import pytest
import pytest_twisted

from tests.support import (
    ADMIN_TOKEN,
    CHANNEL,
    OTHER_CHANNEL,
    RelayProcess,
    assert_nothing_pending,
    e2e_env,
    expect_close,
    fetch_metrics,
    http_request,
    envelope,
    kex_init,
    kex_response,
    offer_request,
    offer_response,
    open_peer,
    presence,
    redeem_request,
    redeem_response,
    session_event,
    start_relays,
    stop_all,
    stop_relays,
    subscribe,
    unsubscribe,
)
from viewport.client import RelayConnection, is_status

@pytest.fixture(scope="module")
def relay() -> Any:
    """One dev relay with admin HTTP shared by the tests of this module (each test uses its own workspace)."""
    process = RelayProcess(e2e_env())
    pytest_twisted.blockon(start_relays(process))
    yield process
    pytest_twisted.blockon(stop_relays(process))


@pytest_twisted.inlineCallbacks
def test_key_exchange_and_session_frames_reach_only_their_owner(relay: RelayProcess) -> Any:
    """Key-exchange responses and session frames go to the client that asked, never to another client of the scope."""
    daemon = yield open_peer(relay, "workspace-daemon", "own", "rt1")
    alice = yield open_peer(relay, "client", "own", "rt1", clientId="alice")
    bob = yield open_peer(relay, "client", "own", "rt1", clientId="bob")
    try:
        alice.send_text(kex_init("ra"))
        assert (yield daemon.next_message()) == kex_init("ra")
        bob.send_text(kex_init("rb"))
        assert (yield daemon.next_message()) == kex_init("rb")
        daemon.send_text(kex_response("ra", "sa"))
        daemon.send_text(kex_response("rb", "sb"))
        assert (yield alice.next_message()) == kex_response("ra", "sa")
        assert (yield bob.next_message()) == kex_response("rb", "sb")
        daemon.send_text(envelope("sb", 1))
        daemon.send_text(envelope("unknown-session", 1))
        daemon.send_text(envelope("sa", 2))
        assert (yield alice.next_message()) == envelope("sa", 2)
        assert (yield bob.next_message()) == envelope("sb", 1)
        daemon.send_text(kex_response("nobody-asked", "sx"))
        yield assert_nothing_pending(alice, bob)
        metrics = yield fetch_metrics(relay)
        assert metrics["relay_session_frame_dropped_total"] >= 1
        assert metrics["relay_key_exchange_response_dropped_total"] >= 1
    finally:
        yield stop_all(daemon, alice, bob)


@pytest_twisted.inlineCallbacks
def test_pairing_round_trip_answers_only_the_requester(relay: RelayProcess) -> Any:
    """Pairing offer and redeem requests reach the daemon and each response goes back only to the requesting client."""
    daemon = yield open_peer(relay, "workspace-daemon", "pair", "rt1")
    asker = yield open_peer(relay, "client", "pair", "rt1", scope="pairing", clientId="asker")
    bystander = yield open_peer(relay, "client", "pair", "rt1", scope="pairing", clientId="bystander")
    try:
        asker.send_text(offer_request("p1"))
        assert (yield daemon.next_message()) == offer_request("p1")
        daemon.send_text(offer_response("p1"))
        assert (yield asker.next_message()) == offer_response("p1")
        asker.send_text(redeem_request("p2"))
        assert (yield daemon.next_message()) == redeem_request("p2")
        daemon.send_text(redeem_response("p2"))
        assert (yield asker.next_message()) == redeem_response("p2")
        daemon.send_text(offer_response("p1"))
        yield assert_nothing_pending(asker, bystander)
    finally:
        yield stop_all(daemon, asker, bystander)


@pytest_twisted.inlineCallbacks
def test_session_event_subscriptions_and_denials(relay: RelayProcess) -> Any:
    """Subscribe and unsubscribe are acknowledged; channels outside the claim get subscribe_denied or unsubscribe_denied."""
    viewer = yield open_peer(relay, "client", "subs", "rt1", scope="session-events", sessionChannels=[CHANNEL])
    try:
        viewer.send_text(subscribe(CHANNEL, 5))
        assert (yield viewer.next_json()) == {
            "type": "viewport.session_events.subscribed/v1", "channel": CHANNEL, "afterSequence": 5,
            "authoritativeSource": "session_events", "websocketRequiredForBackfill": False}
        viewer.send_text(subscribe(CHANNEL))
        assert (yield viewer.next_json())["afterSequence"] == 0
        viewer.send_text(subscribe(OTHER_CHANNEL))
        assert (yield viewer.next_json()) == {
            "type": "viewport.session_events.subscribe_denied/v1", "channel": OTHER_CHANNEL,
            "reason": "CHANNEL_NOT_AUTHORIZED", "workspaceId": "subs"}
        viewer.send_text(unsubscribe(OTHER_CHANNEL))
        assert (yield viewer.next_json()) == {
            "type": "viewport.session_events.unsubscribe_denied/v1", "channel": OTHER_CHANNEL,
            "reason": "CHANNEL_NOT_AUTHORIZED", "workspaceId": "subs"}
        viewer.send_text(unsubscribe(CHANNEL))
        assert (yield viewer.next_json()) == {"type": "viewport.session_events.unsubscribed/v1", "channel": CHANNEL}
    finally:
        yield stop_all(viewer)


@pytest_twisted.inlineCallbacks
def test_local_daemon_session_events_reach_subscribers_only(relay: RelayProcess) -> Any:
    """A local daemon's session event relay frame goes verbatim to the channel's subscribers and to nobody else."""
    daemon = yield open_peer(relay, "workspace-daemon", "events", "rt1")
    first = yield open_peer(relay, "client", "events", "rt1", scope="session-events", sessionChannels=[CHANNEL])
    second = yield open_peer(relay, "client", "events", "rt1", scope="session-events", sessionChannels=[CHANNEL])
    idle = yield open_peer(relay, "client", "events", "rt1", scope="session-events", sessionChannels=[CHANNEL])
    runtime = yield open_peer(relay, "client", "events", "rt1")
    try:
        for viewer in (first, second):
            viewer.send_text(subscribe(CHANNEL))
            yield viewer.next_json()
        daemon.send_text(session_event(CHANNEL, 1))
        assert (yield first.next_message()) == session_event(CHANNEL, 1)
        assert (yield second.next_message()) == session_event(CHANNEL, 1)
        second.send_text(unsubscribe(CHANNEL))
        yield second.next_json()
        daemon.send_text(session_event(OTHER_CHANNEL, 2))
        daemon.send_text(session_event(CHANNEL, 3))
        assert (yield first.next_message()) == session_event(CHANNEL, 3)
        yield assert_nothing_pending(second, runtime)
        idle.send_text(subscribe(OTHER_CHANNEL))
        assert (yield idle.next_json())["type"] == "viewport.session_events.subscribe_denied/v1"
    finally:
        yield stop_all(daemon, first, second, idle, runtime)


@pytest_twisted.inlineCallbacks
def test_viewer_presence_fans_out_to_other_subscribers(relay: RelayProcess) -> Any:
    """Viewer presence goes to the channel's other subscribers, not back to the sender; unauthorized channels are denied."""
    sender = yield open_peer(relay, "client", "presence", "rt1", scope="session-events", sessionChannels=[CHANNEL],
                             clientId="sender")
    watcher = yield open_peer(relay, "client", "presence", "rt1", scope="session-events", sessionChannels=[CHANNEL],
                              clientId="watcher")
    outsider = yield open_peer(relay, "client", "presence", "rt1", scope="session-events", sessionChannels=[CHANNEL],
                               clientId="outsider")
    try:
        for viewer in (sender, watcher):
            viewer.send_text(subscribe(CHANNEL))
            yield viewer.next_json()
        sender.send_text(presence(CHANNEL))
        assert (yield watcher.next_message()) == presence(CHANNEL)
        sender.send_text(presence(OTHER_CHANNEL))
        assert (yield sender.next_json()) == {
            "type": "viewport.session_viewer_presence_denied/v1", "channel": OTHER_CHANNEL,
            "reason": "CHANNEL_NOT_AUTHORIZED", "workspaceId": "presence"}
        yield assert_nothing_pending(sender, watcher, outsider)
    finally:
        yield stop_all(sender, watcher, outsider)


@pytest_twisted.inlineCallbacks
def test_garbage_gets_invalid_frame_and_daemon_garbage_is_dropped(relay: RelayProcess) -> Any:
    """Unusable client frames get an INVALID_FRAME status (socket stays open); invalid daemon frames are dropped silently."""
    daemon = yield open_peer(relay, "workspace-daemon", "garbage", "rt1")
    client = yield open_peer(relay, "client", "garbage", "rt1")
    try:
        for text in ("not json", "[1,2]", "null", '{"type":"e2ee"}', '{"type":"context-candidate-preview"}',
                     '{"a":NaN}'):
            client.send_text(text)
            assert (yield client.next_json()) == {
                "type": "relay_status", "code": "INVALID_FRAME",
                "message": "client frame must be a valid runtime or pairing control frame", "workspaceId": "garbage"}
        assert client.is_open
        daemon.send_text("not json")
        daemon.send_text('{"type":"ack"}')
        client.send_text(kex_init("r1"))
        assert (yield daemon.next_message()) == kex_init("r1")
        daemon.send_text(kex_response("r1", "s1"))
        assert (yield client.next_message()) == kex_response("r1", "s1")
        assert daemon.is_open
    finally:
        yield stop_all(daemon, client)


@pytest_twisted.inlineCallbacks
def test_session_events_client_gets_scope_only_status(relay: RelayProcess) -> Any:
    """A session-events client sending a runtime frame gets SESSION_EVENTS_SCOPE_ONLY and stays connected."""
    viewer = yield open_peer(relay, "client", "sescope", "rt1", scope="session-events", sessionChannels=[CHANNEL])
    try:
        for frame in (envelope("s1"), kex_init("r1"), offer_request("p1")):
            viewer.send_text(frame)
            assert (yield viewer.next_json()) == {
                "type": "relay_status", "code": "SESSION_EVENTS_SCOPE_ONLY",
                "message": "session-events scoped clients can only subscribe to authorized session event channels",
                "workspaceId": "sescope"}
        viewer.send_text(subscribe(CHANNEL))
        assert (yield viewer.next_json())["type"] == "viewport.session_events.subscribed/v1"
    finally:
        yield stop_all(viewer)


@pytest_twisted.inlineCallbacks
def test_scope_violations_close_with_4008(relay: RelayProcess) -> Any:
    """Runtime and pairing clients sending frames outside their scope are closed 4008 with the exact reason."""
    cases = [
        ("runtime", subscribe(CHANNEL), "session-events scope required"),
        ("pairing", presence(CHANNEL), "session-events scope required"),
        ("pairing", envelope("s1"), "pairing scope only"),
        ("pairing", kex_init("r1"), "pairing scope only"),
        ("runtime", offer_request("p1"), "runtime scope only"),
        ("runtime", redeem_request("p1"), "runtime scope only"),
    ]
    for scope, frame, reason in cases:
        client = yield open_peer(relay, "client", "violations", "rt1", scope=scope, sessionChannels=[CHANNEL])
        client.send_text(frame)
        yield expect_close(client, 4008, reason)


@pytest_twisted.inlineCallbacks
def test_profile_mismatches_close_with_4008(relay: RelayProcess) -> Any:
    """A client frame whose profile differs from its claim, or a daemon frame weaker than its claim, is closed 4008."""
    daemon = yield open_peer(relay, "workspace-daemon", "profiles", "rt1", e2eeProfile="noise-ik")
    try:
        client = yield open_peer(relay, "client", "profiles", "rt1", e2eeProfile="noise-ikpsk2")
        client.send_text(kex_init("r1", profile="noise-ik"))
        yield expect_close(client, 4008, "client frame profile mismatch")
        daemon.send_text(envelope("s1", profile="noise-ikpsk2"))
        assert daemon.is_open
        strict = yield open_peer(relay, "workspace-daemon", "profiles", "rt2", e2eeProfile="noise-ikpsk2")
        strict.send_text(envelope("s1", profile="noise-ik"))
        yield expect_close(strict, 4008, "daemon frame profile mismatch")
        metrics = yield fetch_metrics(relay)
        assert metrics["relay_frames_client_rejected_profile_mismatch_total"] >= 1
        assert metrics["relay_frames_daemon_rejected_profile_mismatch_total"] >= 1
        assert daemon.is_open
    finally:
        yield stop_all(daemon)


@pytest_twisted.inlineCallbacks
def test_binary_frames_are_forwarded_as_text(relay: RelayProcess) -> Any:
    """A binary message carrying JSON is handled like text and forwarded as a text frame with the same bytes."""
    daemon = yield open_peer(relay, "workspace-daemon", "binary", "rt1")
    client = yield open_peer(relay, "client", "binary", "rt1")
    try:
        client.send_binary(kex_init("r1").encode())
        frame = yield daemon.next_frame()
        assert (frame.is_binary, frame.payload) == (False, kex_init("r1").encode())
        daemon.send_binary(kex_response("r1", "s1").encode())
        frame = yield client.next_frame()
        assert (frame.is_binary, frame.payload) == (False, kex_response("r1", "s1").encode())
    finally:
        yield stop_all(daemon, client)


@pytest_twisted.inlineCallbacks
def test_daemon_unavailable_without_a_daemon(relay: RelayProcess) -> Any:
    """A runtime frame with no daemon in the scope is answered with DAEMON_UNAVAILABLE naming the runtime target."""
    client = yield open_peer(relay, "client", "nodaemon", "rt1", machineId="m-client")
    try:
        client.send_text(kex_init("r1"))
        assert (yield client.next_json()) == {
            "type": "relay_status", "code": "DAEMON_UNAVAILABLE",
            "message": "No machine runtime is connected for this runtime target", "workspaceId": "nodaemon",
            "retryable": True, "runtimeTargetId": "rt1", "machineId": "m-client"}
        assert client.is_open
    finally:
        yield stop_all(client)


@pytest_twisted.inlineCallbacks
def test_daemon_disconnect_is_pushed_to_its_clients(relay: RelayProcess) -> Any:
    """When a daemon leaves, its scope's clients get DAEMON_UNAVAILABLE at once; other scopes hear nothing."""
    daemon = yield open_peer(relay, "workspace-daemon", "leave", "rt1", machineId="m-daemon")
    client = yield open_peer(relay, "client", "leave", "rt1")
    elsewhere = yield open_peer(relay, "client", "leave", "rt2")
    try:
        yield daemon.close()
        notice = yield client.next_json(timeout=5)
        assert is_status(notice, "DAEMON_UNAVAILABLE")
        assert (notice["workspaceId"], notice["runtimeTargetId"]) == ("leave", "rt1")
        yield assert_nothing_pending(elsewhere)
    finally:
        yield stop_all(client, elsewhere)


@pytest_twisted.inlineCallbacks
def test_pairing_client_without_target_gets_runtime_target_required(relay: RelayProcess) -> Any:
    """A pairing client with no runtime target is answered RUNTIME_TARGET_REQUIRED for a pairing request and stays open."""
    client = yield open_peer(relay, "client", "pairnotarget", None, scope="pairing")
    try:
        client.send_text(offer_request("p1"))
        assert (yield client.next_json()) == {
            "type": "relay_status", "code": "RUNTIME_TARGET_REQUIRED",
            "message": "Runtime client must specify a runtime target", "workspaceId": "pairnotarget",
            "retryable": False}
        assert client.is_open
    finally:
        yield stop_all(client)


@pytest_twisted.inlineCallbacks
def test_daemons_of_different_runtime_targets_are_isolated(relay: RelayProcess) -> Any:
    """Two daemons of one workspace with different runtime targets each see only their own clients' frames."""
    first = yield open_peer(relay, "workspace-daemon", "targets", "rt1")
    second = yield open_peer(relay, "workspace-daemon", "targets", "rt2")
    one = yield open_peer(relay, "client", "targets", "rt1")
    two = yield open_peer(relay, "client", "targets", "rt2")
    try:
        one.send_text(kex_init("r1"))
        two.send_text(kex_init("r2"))
        assert (yield first.next_message()) == kex_init("r1")
        assert (yield second.next_message()) == kex_init("r2")
        second.send_text(kex_response("r1", "s1"))
        first.send_text(kex_response("r1", "s1"))
        assert (yield one.next_message()) == kex_response("r1", "s1")
        yield assert_nothing_pending(two)
        assert first.pending_messages() == [] and second.pending_messages() == []
    finally:
        yield stop_all(first, second, one, two)


@pytest_twisted.inlineCallbacks
def test_scope_keys_with_colons_do_not_collide(relay: RelayProcess) -> Any:
    """Workspace "a:b" without a target and workspace "a" with target "b" are different scopes."""
    daemon = yield open_peer(relay, "workspace-daemon", "a", "b")
    colon = yield open_peer(relay, "client", "a:b", None, scope="pairing")
    legit = yield open_peer(relay, "client", "a", "b", scope="pairing")
    try:
        colon.send_text(offer_request("p-colon"))
        assert is_status((yield colon.next_json()), "RUNTIME_TARGET_REQUIRED")
        legit.send_text(offer_request("p-legit"))
        assert (yield daemon.next_message()) == offer_request("p-legit")
        status, _, body = yield http_request("GET", relay.http_url + "/state", {"X-Relay-Admin-Token": ADMIN_TOKEN})
        assert status == 200
        scopes = {(w["workspaceId"], w.get("runtimeTargetId")): w for w in json.loads(body)["workspaces"]}
        assert scopes[("a:b", None)]["daemonConnected"] is False
        assert scopes[("a:b", None)]["clientCount"] == 1
        assert scopes[("a", "b")]["daemonConnected"] is True
        assert scopes[("a", "b")]["clientCount"] == 1
    finally:
        yield stop_all(daemon, colon, legit)


@pytest_twisted.inlineCallbacks
def test_new_daemon_starts_without_old_sessions(relay: RelayProcess) -> Any:
    """After a daemon leaves and a new one connects, frames for the old sessions are dropped until a new key exchange."""
    old = yield open_peer(relay, "workspace-daemon", "fresh", "rt1")
    client = yield open_peer(relay, "client", "fresh", "rt1")
    new: Optional[RelayConnection] = None
    try:
        client.send_text(kex_init("r1"))
        yield old.next_message()
        old.send_text(kex_response("r1", "s1"))
        assert (yield client.next_message()) == kex_response("r1", "s1")
        yield old.close()
        assert is_status((yield client.next_json()), "DAEMON_UNAVAILABLE")
        new = yield open_peer(relay, "workspace-daemon", "fresh", "rt1")
        before = yield fetch_metrics(relay)
        new.send_text(envelope("s1", 7))
        client.send_text(kex_init("r2"))
        assert (yield new.next_message()) == kex_init("r2")
        new.send_text(kex_response("r2", "s2"))
        assert (yield client.next_message()) == kex_response("r2", "s2")
        after = yield fetch_metrics(relay)
        assert after["relay_session_frame_dropped_total"] - before["relay_session_frame_dropped_total"] == 1
    finally:
        yield stop_all(client, new)


@pytest_twisted.inlineCallbacks
def test_a_second_client_cannot_steal_a_key_exchange(relay: RelayProcess) -> Any:
    """Client B reusing client A's live requestId (or sessionId) gets INVALID_FRAME; A's exchange and session stay A's."""
    daemon = yield open_peer(relay, "workspace-daemon", "steal", "rt1")
    a = yield open_peer(relay, "client", "steal", "rt1", clientId="a")
    b = yield open_peer(relay, "client", "steal", "rt1", clientId="b")
    try:
        a.send_text(kex_init("r1"))
        assert json.loads((yield daemon.next_message()))["requestId"] == "r1"
        for request_id in ("r1", " r1 "):
            b.send_text(kex_init(request_id))
            assert is_status((yield b.next_json()), "INVALID_FRAME")
        daemon.send_text(kex_response("r1", "s1"))
        assert (yield a.next_json())["sessionId"] == "s1"
        b.send_text(envelope("s1", 7))
        assert is_status((yield b.next_json()), "INVALID_FRAME")
        daemon.send_text(envelope("s1", 8))
        assert (yield a.next_json())["seq"] == 8
        yield assert_nothing_pending(b)
        a.send_text(envelope("s1", 9))
        assert (yield daemon.next_json())["seq"] == 9
    finally:
        yield stop_all(a, b, daemon)
