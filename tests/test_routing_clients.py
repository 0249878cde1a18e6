"""Router: status frames and close codes of the client and daemon pipelines, session events."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from tests.routing_support import (
    B_URL,
    CHANNEL,
    Harness,
    MACHINE,
    OTHER_CHANNEL,
    PUBLIC_URL,
    REDIS_ENV,
    RT,
    WS,
    e2ee,
    kex_init,
    pairing_offer,
    peer,
    session_event,
    subscribe,
    unsubscribe,
    viewer_presence,
    worker_request,
)
from viewport.relay import frames
from viewport.relay.backplane.single import SingleBackplane
from viewport.relay.config import load_config
from viewport.relay.interfaces import BusFrame, Presence
from viewport.relay.limits import Limiters
from viewport.relay.metrics import RelayMetrics
from viewport.relay.registry import Connection, Registry
from viewport.relay.router import Router
from viewport.testing import FakePeer
from viewport.tokens import Claims


class StatusFrameTests(SynchronousTestCase):
    """Every relay_status frame of docs/protocol.md §5.1, with its exact text."""

    def setUp(self) -> None:
        self.h = Harness()

    def test_runtime_target_required_at_admission(self) -> None:
        """A client refused for a missing target first receives the exact RUNTIME_TARGET_REQUIRED frame."""
        conn = self.h.client(rt=None)
        self.assertEqual(peer(conn).texts, [
            '{"type":"relay_status","code":"RUNTIME_TARGET_REQUIRED",'
            '"message":"Runtime client must specify a runtime target","workspaceId":"ws1","retryable":false}'])

    def test_runtime_target_required_pairing_without_target(self) -> None:
        """A pairing client without a target and without a daemon gets RUNTIME_TARGET_REQUIRED, and stays open."""
        conn = self.h.client("pairing", rt=None)
        self.h.router.client_frame(conn, pairing_offer(), 0)
        self.assertEqual((peer(conn).texts, peer(conn).closes), ([frames.runtime_target_required(WS)], []))
        self.assertEqual(self.h.count("relay_client_messages_dropped"), 1)

    def test_daemon_unavailable_single(self) -> None:
        """With no daemon and no other relay, a client frame is answered DAEMON_UNAVAILABLE with its machineId."""
        h = Harness(cross_relay=False)
        conn = h.client(machine_id="m-client")
        h.router.client_frame(conn, kex_init(), 0)
        self.assertEqual(peer(conn).texts, [
            '{"type":"relay_status","code":"DAEMON_UNAVAILABLE",'
            '"message":"No machine runtime is connected for this runtime target","workspaceId":"ws1",'
            '"retryable":true,"runtimeTargetId":"rt1","machineId":"m-client"}'])
        self.assertEqual((h.backplane.resolved, h.count("relay_client_messages_dropped")), ([], 1))

    def test_daemon_unavailable_with_single_backplane(self) -> None:
        """The real single backplane leads to DAEMON_UNAVAILABLE too."""
        config = load_config({}, home="/nonexistent-home")
        router = Router(config=config, registry=Registry(8, 8), backplane=SingleBackplane("r"),
                        metrics=RelayMetrics(), limiters=Limiters(config.limits))
        conn = Connection(FakePeer(), "client", WS, "ip", Claims(workspace_id=WS, runtime_target_id=RT, scope="runtime"), 0)
        router.open_connection(conn, RT, 0)
        router.client_frame(conn, e2ee(), 0)
        self.assertEqual(peer(conn).texts, [frames.daemon_unavailable(WS, RT)])

    def test_daemon_unavailable_no_presence(self) -> None:
        """When presence knows no daemon, the client gets DAEMON_UNAVAILABLE and nothing is published."""
        conn = self.h.client()
        self.h.router.client_frame(conn, e2ee(), 0)
        self.assertEqual(peer(conn).texts, [frames.daemon_unavailable(WS, RT)])
        # One lookup when the client registered (to learn its daemon's relay), one for the frame.
        self.assertEqual((self.h.backplane.resolved, self.h.backplane.published), ([(WS, RT), (WS, RT)], []))

    def test_daemon_unavailable_presence_on_this_relay(self) -> None:
        """Presence naming this relay is no remote route: DAEMON_UNAVAILABLE."""
        self.h.backplane.presence[(WS, RT)] = Presence(WS, RT, "relay-a", PUBLIC_URL, True)
        conn = self.h.client()
        self.h.router.client_frame(conn, e2ee(), 0)
        self.assertEqual((peer(conn).texts, self.h.backplane.published), ([frames.daemon_unavailable(WS, RT)], []))

    def test_daemon_unavailable_when_publish_fails(self) -> None:
        """A remote daemon whose publish fails leads to DAEMON_UNAVAILABLE (redirect off)."""
        h = Harness({k: v for k, v in REDIS_ENV.items() if k != "RELAY_CLIENT_REDIRECT_ENABLED"})
        h.backplane.presence[(WS, RT)] = Presence(WS, RT, "relay-b", B_URL, True)
        h.backplane.publish_result = False
        conn = h.client()
        h.router.client_frame(conn, e2ee(), 0)
        self.assertEqual(peer(conn).texts, [frames.daemon_unavailable(WS, RT)])
        self.assertEqual(len(h.backplane.published), 1)

    def test_a_known_presence_routes_without_a_lookup(self) -> None:
        """
        Frames for a daemon whose presence the backplane keeps are published in order without a lookup;
        a frame whose publish raises is logged and the ones after it still go.
        """
        h = Harness({k: v for k, v in REDIS_ENV.items() if k != "RELAY_CLIENT_REDIRECT_ENABLED"})
        conn = h.client()
        lookups = list(h.backplane.resolved)
        h.backplane.known[(WS, RT)] = Presence(WS, RT, "relay-b", B_URL, True)
        payloads = [e2ee(seq=n) for n in range(1, 4)]
        publish = h.backplane.publish

        def broken_once(frame: BusFrame) -> object:
            if frame.payload == payloads[1].decode():
                raise RuntimeError("backplane broke its promise")
            return publish(frame)

        h.backplane.publish = broken_once  # type: ignore[method-assign]
        for payload in payloads:
            h.router.client_frame(conn, payload, 0)
        self.assertEqual([f.payload for f in h.backplane.published], [payloads[0].decode(), payloads[2].decode()])
        self.assertEqual((h.backplane.resolved, peer(conn).texts), (lookups, []))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_bus_disabled_means_unavailable_without_publishing(self) -> None:
        """With RELAY_BUS_ENABLED=0 a frame for a remote daemon is not published: the client hears DAEMON_UNAVAILABLE."""
        h = Harness({**REDIS_ENV, "RELAY_BUS_ENABLED": "0", "RELAY_CLIENT_REDIRECT_ENABLED": "0"})
        h.backplane.presence[(WS, RT)] = Presence(WS, RT, "relay-b", B_URL, True)
        conn = h.client()
        h.router.client_frame(conn, e2ee(), 0)
        self.assertEqual(peer(conn).texts, [frames.daemon_unavailable(WS, RT)])
        self.assertEqual(h.backplane.published, [])

    def test_daemon_unavailable_pushed_on_disconnect(self) -> None:
        """When the daemon leaves, every client of its scope is told DAEMON_UNAVAILABLE at once; others are not."""
        daemon = self.h.daemon()
        a = self.h.client(client_id="a", machine_id=MACHINE)
        b = self.h.client(client_id="b", machine_id=MACHINE)
        elsewhere = self.h.client(client_id="c", rt="rt2", machine_id=MACHINE)
        self.h.close(daemon, 5)
        expected = frames.daemon_unavailable(WS, RT, MACHINE)
        self.assertEqual((peer(a).texts, peer(b).texts, peer(elsewhere).texts), ([expected], [expected], []))

    def test_relay_redirect_per_frame(self) -> None:
        """With redirect on, a frame for a daemon on another relay gets RELAY_REDIRECT and is published there."""
        h = Harness(REDIS_ENV)
        h.backplane.presence[(WS, RT)] = Presence(WS, RT, "relay-b", B_URL, True)
        conn = h.client(machine_id="m-client")
        payload = e2ee()
        h.router.client_frame(conn, payload, 0)
        self.assertEqual(peer(conn).texts, [
            '{"type":"relay_status","code":"RELAY_REDIRECT",'
            '"message":"Workspace is assigned to a different relay instance","workspaceId":"ws1",'
            '"runtimeTargetId":"rt1","relayWsBaseUrl":"wss://relay-b.example/ws"}'])
        self.assertEqual(h.backplane.published, [
            BusFrame(WS, RT, "relay-a", "relay-b", "client_to_daemon", payload.decode(), "m-client")])
        self.assertEqual(h.count("relay_client_messages_routed_bus"), 1)

    def test_redirect_then_unavailable(self) -> None:
        """With redirect on and a failed publish the client receives RELAY_REDIRECT then DAEMON_UNAVAILABLE."""
        h = Harness(REDIS_ENV)
        h.backplane.presence[(WS, RT)] = Presence(WS, RT, "relay-b", B_URL, True)
        h.backplane.publish_result = False
        conn = h.client()
        h.router.client_frame(conn, e2ee(), 0)
        self.assertEqual(peer(conn).texts, [frames.relay_redirect(WS, B_URL, RT), frames.daemon_unavailable(WS, RT)])

    def test_no_redirect_when_disabled(self) -> None:
        """With redirect switched off a frame for a remote daemon is only published."""
        h = Harness({**REDIS_ENV, "RELAY_CLIENT_REDIRECT_ENABLED": "0"})
        h.backplane.presence[(WS, RT)] = Presence(WS, RT, "relay-b", B_URL, True)
        conn = h.client()
        h.router.client_frame(conn, e2ee(), 0)
        self.assertEqual((peer(conn).texts, len(h.backplane.published)), ([], 1))

    def test_invalid_frame(self) -> None:
        """An unusable client frame is answered with the exact INVALID_FRAME frame and the socket stays open."""
        conn = self.h.client()
        for junk in (b"[1]", b"null", b"{", b'{"type":"ack"}'):
            self.h.router.client_frame(conn, junk, 0)
        invalid = ('{"type":"relay_status","code":"INVALID_FRAME",'
                   '"message":"client frame must be a valid runtime or pairing control frame","workspaceId":"ws1"}')
        self.assertEqual((peer(conn).texts, peer(conn).closes), ([invalid] * 4, []))
        self.assertEqual(self.h.count("relay_frames_client_rejected"), 4)

    def test_session_events_scope_only(self) -> None:
        """A session-events client sending a runtime frame gets SESSION_EVENTS_SCOPE_ONLY and stays open."""
        daemon = self.h.daemon()
        conn = self.h.client("session-events")
        self.h.router.client_frame(conn, e2ee(), 0)
        self.assertEqual(peer(conn).texts, [
            '{"type":"relay_status","code":"SESSION_EVENTS_SCOPE_ONLY","message":"session-events scoped clients '
            'can only subscribe to authorized session event channels","workspaceId":"ws1"}'])
        self.assertEqual((peer(conn).closes, peer(daemon).frames), ([], []))
        self.assertEqual(self.h.count("relay_frames_client_rejected_scope"), 1)


class CloseCodeTests(SynchronousTestCase):
    """Every close of the docs/protocol.md §6 table the router produces after admission."""

    def harness(self, **env: str) -> Harness:
        """A harness with ``RELAY_<NAME>`` settings given as lower-case keywords."""
        return Harness({f"RELAY_{k.upper()}": v for k, v in env.items()})

    def assertClosed(self, conn: Connection, code: int, reason: str) -> None:
        """Assert exactly one close, with ``code`` and ``reason``."""
        self.assertEqual(peer(conn).closes, [(code, reason)])

    def test_session_events_scope_required_runtime(self) -> None:
        """A runtime client sending a session-events frame closes 4008 ``session-events scope required``."""
        h = self.harness()
        conn = h.client()
        h.router.client_frame(conn, subscribe(), 0)
        self.assertClosed(conn, 4008, "session-events scope required")

    def test_session_events_scope_required_pairing(self) -> None:
        """A pairing client sending viewer presence closes 4008 ``session-events scope required``."""
        h = self.harness()
        conn = h.client("pairing")
        h.router.client_frame(conn, viewer_presence(), 0)
        self.assertClosed(conn, 4008, "session-events scope required")

    def test_pairing_scope_only(self) -> None:
        """A pairing client sending a key exchange closes 4008 ``pairing scope only``."""
        h = self.harness()
        daemon = h.daemon()
        conn = h.client("pairing")
        h.router.client_frame(conn, kex_init(), 0)
        self.assertClosed(conn, 4008, "pairing scope only")
        self.assertEqual(peer(daemon).frames, [])

    def test_runtime_scope_only(self) -> None:
        """A runtime client sending a pairing request closes 4008 ``runtime scope only``."""
        h = self.harness()
        conn = h.client()
        h.router.client_frame(conn, pairing_offer(), 0)
        self.assertClosed(conn, 4008, "runtime scope only")

    def test_client_frame_profile_mismatch(self) -> None:
        """A client frame whose profile differs from the claim closes 4008 ``client frame profile mismatch``."""
        h = self.harness()
        daemon = h.daemon()
        conn = h.client(e2ee_profile="noise-ikpsk2")
        h.router.client_frame(conn, e2ee(profile="noise-ik"), 0)
        self.assertClosed(conn, 4008, "client frame profile mismatch")
        self.assertEqual(peer(daemon).frames, [])
        self.assertEqual(h.count("relay_frames_client_rejected_profile_mismatch"), 1)

    def test_client_frame_profile_match(self) -> None:
        """A client frame with the claimed profile is forwarded."""
        h = self.harness()
        daemon = h.daemon()
        conn = h.client(e2ee_profile="noise-ikpsk2")
        h.router.client_frame(conn, kex_init(profile="noise-ikpsk2"), 0)
        self.assertEqual((peer(conn).closes, len(peer(daemon).frames)), ([], 1))

    def test_key_exchange_rate_limit(self) -> None:
        """Key exchanges beyond the per-minute limit close 4008 ``key exchange rate limit exceeded``."""
        h = self.harness(kex_init_rate_per_minute="2")
        conn = h.client()
        for n in range(3):
            h.router.client_frame(conn, kex_init(f"k{n}"), n)
        self.assertClosed(conn, 4008, "key exchange rate limit exceeded")
        self.assertEqual(h.count("relay_frames_client_kex_rate_limited"), 1)

    def test_runtime_rate_limit(self) -> None:
        """E2EE frames beyond the per-client bucket close 4008 ``runtime rate limit exceeded``."""
        h = self.harness(runtime_rate_per_minute="2")
        conn = h.client()
        for n in range(3):
            h.router.client_frame(conn, e2ee(seq=n + 1), 0)
        self.assertClosed(conn, 4008, "runtime rate limit exceeded")
        self.assertEqual(h.count("relay_frames_client_runtime_rate_limited"), 1)

    def test_pairing_rate_limit(self) -> None:
        """Pairing requests beyond the per-minute limit close 4008 ``pairing rate limit exceeded``."""
        h = self.harness(pairing_rate_per_minute="1")
        conn = h.client("pairing")
        h.router.client_frame(conn, pairing_offer("p1"), 0)
        h.router.client_frame(conn, pairing_offer("p2"), 1)
        self.assertClosed(conn, 4008, "pairing rate limit exceeded")
        self.assertEqual(h.count("relay_frames_client_pairing_rate_limited"), 1)

    def test_presence_rate_limit(self) -> None:
        """Viewer presence beyond the runtime bucket closes 4008 ``presence rate limit exceeded``."""
        h = self.harness(runtime_rate_per_minute="1")
        conn = h.client("session-events")
        h.router.client_frame(conn, viewer_presence(), 0)
        h.router.client_frame(conn, viewer_presence(), 1)
        self.assertClosed(conn, 4008, "presence rate limit exceeded")
        self.assertEqual(h.count("relay_session_viewer_presence_rate_limited"), 1)

    def test_daemon_rate_limit_drops_the_excess(self) -> None:
        """Daemon frames to live owners beyond the workspace bucket are dropped and counted; the daemon stays."""
        h = self.harness(daemon_runtime_rate_per_minute="2")
        daemon, client = h.daemon(), h.client()
        h.key_exchange(client, daemon)
        h.router.daemon_frame(daemon, e2ee(), 1)
        h.router.daemon_frame(daemon, e2ee(), 2)
        self.assertEqual(peer(daemon).closes, [])
        self.assertEqual(len(peer(client).frames), 2)
        self.assertEqual(h.count("relay_frames_daemon_rate_limited"), 1)

    def test_frames_without_a_live_owner_do_not_consume_the_daemon_budget(self) -> None:
        """Frames for sessions whose client left (and invalid frames) are dropped without charging the bucket."""
        h = self.harness(daemon_runtime_rate_per_minute="3")
        daemon, live, gone = h.daemon(), h.client(client_id="live"), h.client(client_id="gone")
        h.key_exchange(live, daemon, "k1", "s-live")
        h.key_exchange(gone, daemon, "k2", "s-gone")
        h.close(gone)
        for now in range(1, 50):
            h.router.daemon_frame(daemon, e2ee("s-gone"), now)
            h.router.daemon_frame(daemon, e2ee("s-never-keyed"), now)
            h.router.daemon_frame(daemon, b"not json", now)
        h.router.daemon_frame(daemon, e2ee("s-live"), 50)
        self.assertEqual([json.loads(f)["sessionId"] for f in peer(live).frames[1:]], ["s-live"])
        self.assertEqual(h.count("relay_frames_daemon_rate_limited"), 0)
        self.assertEqual(peer(daemon).closes, [])

    def test_daemon_frame_profile_mismatch(self) -> None:
        """A daemon frame weaker than the claimed profile closes 4008 ``daemon frame profile mismatch``."""
        h = self.harness()
        daemon = h.daemon(e2ee_profile="noise-ikpsk2")
        h.router.daemon_frame(daemon, e2ee(profile="noise-ik"), 0)
        self.assertClosed(daemon, 4008, "daemon frame profile mismatch")

    def test_daemon_stronger_profile_accepted(self) -> None:
        """A daemon frame stronger than the claimed profile is accepted."""
        h = self.harness()
        daemon = h.daemon(e2ee_profile="noise-ik")
        h.router.daemon_frame(daemon, e2ee(profile="noise-ikpsk2"), 0)
        self.assertEqual(peer(daemon).closes, [])

    def test_worker_rate_limit(self) -> None:
        """Worker frames beyond the workspace's daemon bucket close 4008 ``worker rate limit exceeded``."""
        h = self.harness(daemon_runtime_rate_per_minute="1")
        worker = h.connect("worker", rt=None, managed_executor_id="e1")
        path = "/api/runtime/workspaces/ws1/managed-executors/e1/x"
        h.router.worker_frame(worker, worker_request(path), 0)
        h.router.worker_frame(worker, worker_request(path), 1)
        self.assertClosed(worker, 4008, "worker rate limit exceeded")

    def test_client_frame_too_large(self) -> None:
        """A client frame over the size limit closes 1009 ``frame too large``; one at the limit passes."""
        h = self.harness(max_frame_bytes="200")
        daemon = h.daemon()
        conn = h.client()
        fits = e2ee()[:-1] + b" " * (200 - len(e2ee())) + b"}"
        h.router.client_frame(conn, fits, 0)
        h.router.client_frame(conn, fits[:-1] + b" }", 0)
        self.assertEqual(peer(daemon).payloads, [fits])
        self.assertClosed(conn, 1009, "frame too large")
        self.assertEqual(h.count("relay_ws_frame_too_large"), 1)

    def test_daemon_frame_too_large(self) -> None:
        """A daemon frame over the size limit closes 1009 ``frame too large``."""
        h = self.harness(max_frame_bytes="100")
        daemon = h.daemon()
        h.router.daemon_frame(daemon, e2ee(session_id="s" * 100), 0)
        self.assertClosed(daemon, 1009, "frame too large")

    def test_worker_frame_too_large(self) -> None:
        """A worker frame over the size limit closes 1009 ``frame too large``."""
        h = self.harness(max_frame_bytes="100")
        worker = h.connect("worker", rt=None, managed_executor_id="e1")
        h.router.worker_frame(worker, worker_request("/api/runtime/workspaces/" + "x" * 100), 0)
        self.assertClosed(worker, 1009, "frame too large")


class SessionEventTests(SynchronousTestCase):
    """Subscriptions, session event delivery and viewer presence (docs/protocol.md §4.7)."""

    def setUp(self) -> None:
        self.h = Harness()
        self.daemon = self.h.daemon()
        self.v1 = self.h.client("session-events", client_id="v1")
        self.v2 = self.h.client("session-events", client_id="v2")

    def test_subscribe_reply(self) -> None:
        """A subscribe is acknowledged with the exact subscribed frame, afterSequence 0 by default."""
        self.h.router.client_frame(self.v1, subscribe(), 0)
        self.assertEqual(peer(self.v1).texts, [
            '{"type":"viewport.session_events.subscribed/v1","channel":"agent-session:one","afterSequence":0,'
            '"authoritativeSource":"session_events","websocketRequiredForBackfill":false}'])
        self.assertEqual(self.h.count("relay_session_event_subscribed"), 1)

    def test_subscribe_echoes_after_sequence(self) -> None:
        """The requested afterSequence is echoed as an integer."""
        self.h.router.client_frame(self.v1, subscribe(afterSequence=7.0), 0)
        self.assertEqual(peer(self.v1).texts, [frames.subscribed(CHANNEL, 7)])
        self.assertIn('"afterSequence":7,', peer(self.v1).texts[0])

    def test_subscribe_trims_channel(self) -> None:
        """The channel is trimmed before the authorisation check and in the reply."""
        self.h.router.client_frame(self.v1, subscribe(CHANNEL + "  "), 0)
        self.assertEqual(peer(self.v1).texts, [frames.subscribed(CHANNEL)])

    def test_subscribe_denied(self) -> None:
        """A subscribe to a channel outside the claims gets the exact subscribe_denied frame."""
        self.h.router.client_frame(self.v1, subscribe("agent-session:secret"), 0)
        self.assertEqual(peer(self.v1).texts, [
            '{"type":"viewport.session_events.subscribe_denied/v1","channel":"agent-session:secret",'
            '"reason":"CHANNEL_NOT_AUTHORIZED","workspaceId":"ws1"}'])
        self.assertEqual(self.h.registry.get(WS, RT).subscribers, {})  # type: ignore[union-attr]
        self.assertEqual(self.h.count("relay_session_event_subscribe_rejected"), 1)

    def test_unsubscribe_reply(self) -> None:
        """An unsubscribe is acknowledged and removes the subscription."""
        self.h.router.client_frame(self.v1, subscribe(), 0)
        self.h.router.client_frame(self.v1, unsubscribe(), 1)
        self.assertEqual(peer(self.v1).texts[1:], [
            '{"type":"viewport.session_events.unsubscribed/v1","channel":"agent-session:one"}'])
        self.assertEqual(self.h.registry.get(WS, RT).subscribers, {})  # type: ignore[union-attr]
        self.assertEqual(self.h.count("relay_session_event_unsubscribed"), 1)

    def test_unsubscribe_denied(self) -> None:
        """An unsubscribe from a channel outside the claims gets the unsubscribe_denied frame (docs/protocol.md §9, item 20)."""
        self.h.router.client_frame(self.v1, unsubscribe("agent-session:secret"), 0)
        self.assertEqual(peer(self.v1).texts, [
            '{"type":"viewport.session_events.unsubscribe_denied/v1","channel":"agent-session:secret",'
            '"reason":"CHANNEL_NOT_AUTHORIZED","workspaceId":"ws1"}'])

    def test_session_event_frames_not_forwarded(self) -> None:
        """Subscribe, unsubscribe and presence frames never reach the daemon."""
        for payload in (subscribe(), viewer_presence(), unsubscribe()):
            self.h.router.client_frame(self.v1, payload, 0)
        self.assertEqual(peer(self.daemon).frames, [])

    def test_local_daemon_session_event_to_channel_subscribers(self) -> None:
        """A local daemon's session event reaches the channel's subscribers only (docs/protocol.md §9, item 4)."""
        runtime = self.h.client(client_id="r")
        self.h.router.client_frame(self.v1, subscribe(CHANNEL), 0)
        self.h.router.client_frame(self.v2, subscribe(OTHER_CHANNEL), 0)
        event = session_event(CHANNEL)
        self.h.router.daemon_frame(self.daemon, event, 1)
        self.assertEqual((peer(self.v1).payloads, peer(self.v2).payloads, peer(runtime).frames), ([event], [], []))
        self.assertEqual(self.h.count("relay_session_event_frame_delivered"), 1)

    def test_local_session_event_published_for_other_relays(self) -> None:
        """A local daemon's session event is also published, untargeted, for subscribers on other relays."""
        event = session_event()
        self.h.router.daemon_frame(self.daemon, event, 0)
        self.assertEqual(self.h.backplane.published,
                         [BusFrame(WS, RT, "relay-a", None, "daemon_to_clients", event.decode())])

    def test_local_session_event_other_scope_not_reached(self) -> None:
        """Subscribers of the same channel in another scope do not receive the event."""
        other = self.h.client("session-events", client_id="o", rt="rt2")
        self.h.router.client_frame(other, subscribe(), 0)
        self.h.router.daemon_frame(self.daemon, session_event(), 1)
        self.assertEqual(peer(other).payloads, [])

    def test_session_event_without_subscribers(self) -> None:
        """A session event with no subscriber is counted as dropped."""
        self.h.router.daemon_frame(self.daemon, session_event(), 0)
        self.assertEqual(self.h.count("relay_session_event_frame_dropped"), 1)

    def test_unsubscribed_client_not_reached(self) -> None:
        """After unsubscribing, a client no longer receives the channel's events."""
        self.h.router.client_frame(self.v1, subscribe(), 0)
        self.h.router.client_frame(self.v1, unsubscribe(), 1)
        self.h.router.daemon_frame(self.daemon, session_event(), 2)
        self.assertEqual(peer(self.v1).payloads, [])

    def test_bus_session_event_delivered_not_republished(self) -> None:
        """A session event from the bus reaches local subscribers and is not published again."""
        self.h.router.client_frame(self.v1, subscribe(), 0)
        event = session_event()
        self.h.bus(event, "daemon_to_clients", now=1)
        self.assertEqual((peer(self.v1).payloads, self.h.backplane.published), ([event], []))
        self.assertEqual(self.h.count("relay_bus_frames_to_clients"), 1)

    def test_viewer_presence_fanout_excludes_sender(self) -> None:
        """Viewer presence reaches the channel's other subscribers verbatim, not the sender or other channels."""
        v3 = self.h.client("session-events", client_id="v3")
        self.h.router.client_frame(self.v1, subscribe(), 0)
        self.h.router.client_frame(self.v2, subscribe(), 0)
        self.h.router.client_frame(v3, subscribe(OTHER_CHANNEL), 0)
        presence = viewer_presence()
        self.h.router.client_frame(self.v1, presence, 1)
        self.assertEqual((peer(self.v1).payloads, peer(self.v2).payloads, peer(v3).payloads), ([], [presence], []))
        self.assertEqual(self.h.count("relay_session_viewer_presence_fanned"), 1)

    def test_viewer_presence_sender_need_not_subscribe(self) -> None:
        """An unsubscribed sender's presence still reaches the channel's subscribers."""
        self.h.router.client_frame(self.v2, subscribe(), 0)
        self.h.router.client_frame(self.v1, viewer_presence(), 1)
        self.assertEqual(peer(self.v2).payloads, [viewer_presence()])

    def test_viewer_presence_no_peers(self) -> None:
        """Viewer presence nobody receives is counted as having no peers."""
        self.h.router.client_frame(self.v1, viewer_presence(), 0)
        self.assertEqual(self.h.count("relay_session_viewer_presence_no_peers"), 1)

    def test_viewer_presence_denied(self) -> None:
        """Viewer presence on a channel outside the claims is refused with the exact denied frame, not fanned out."""
        self.h.router.client_frame(self.v2, subscribe(), 0)
        self.h.router.client_frame(self.v1, viewer_presence("agent-session:secret"), 1)
        self.assertEqual(peer(self.v1).texts, [
            '{"type":"viewport.session_viewer_presence_denied/v1","channel":"agent-session:secret",'
            '"reason":"CHANNEL_NOT_AUTHORIZED","workspaceId":"ws1"}'])
        self.assertEqual(peer(self.v2).payloads, [])
        self.assertEqual(self.h.count("relay_session_viewer_presence_rejected"), 1)
