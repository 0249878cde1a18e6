"""Tests for the router: admission of open sockets, registration, the client/daemon/worker/bus pipelines."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from twisted.internet.defer import Deferred

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from viewport.relay import frames
from viewport.relay.backplane.single import SingleBackplane
from viewport.relay.config import load_config
from viewport.relay.interfaces import BusFrame, IBackplane, IPeer, Presence
from viewport.relay.metrics import RelayMetrics
from viewport.relay.registry import Connection, Registry
from viewport.relay.claims_check import check_connection_claims
from viewport.relay.limits import Limiters
from viewport.relay.router import Router
from viewport.testing import FakePeer, RecordingBackplane
from viewport.tokens import Claims

WS = "ws1"
RT = "rt1"
MACHINE = "machine-1"
CHANNEL = "agent-session:one"
OTHER_CHANNEL = "agent-session:two"
PUBLIC_URL = "wss://relay-a.example/ws"
B_URL = "wss://relay-b.example/ws"
MINUTE = 60_000
#: A configuration with a cross-relay backplane and client redirects switched on.
REDIS_ENV = {
    "RELAY_BACKPLANE_MODE": "redis",
    "RELAY_CLIENT_REDIRECT_ENABLED": "1",
    "RELAY_REDIS_URL": "redis://127.0.0.1:6379",
    "RELAY_TOKEN_SECRET": "s" * 32,
    "RELAY_BUS_HMAC_KEY": "h" * 32,
}
SAME: Any = object()


def encode(**fields: object) -> bytes:
    """A compact JSON frame."""
    return json.dumps(fields, separators=(",", ":")).encode("utf-8")


def e2ee(session_id: str = "s1", profile: str = "noise-ik", seq: int = 1) -> bytes:
    """A valid E2EE envelope."""
    return encode(type="e2ee", version=2, profile=profile, sessionId=session_id, epoch=1, seq=seq,
                  iv="iv", tag="tag", ciphertext="ct")


def kex_init(request_id: str = "k1", profile: str = "noise-ik") -> bytes:
    """A valid v3 key exchange init."""
    extra = {"pairingPeerId": "peer"} if profile == "noise-ikpsk2" else {}
    return encode(type="relay_key_exchange_init", version=3, profile=profile, requestId=request_id,
                  clientEphemeralPublicKey="e", encryptedClientStatic="s", **extra)


def kex_response(request_id: str = "k1", session_id: str = "s1", profile: str = "noise-ik") -> bytes:
    """A valid v3 key exchange response."""
    return encode(type="relay_key_exchange_response", version=3, profile=profile, requestId=request_id,
                  daemonPublicKey="d", daemonEphemeralPublicKey="e", encryptedMetadata="m",
                  sessionId=session_id, proof="p", epoch=1)


def key_update(session_id: str = "s1") -> bytes:
    """A valid key update required frame."""
    return encode(type="relay_key_update_required", sessionId=session_id, nextEpoch=2)


def pairing_offer(request_id: str = "p1") -> bytes:
    """A valid pairing offer request."""
    return encode(type="relay_pairing_offer_request", requestId=request_id, clientChannelPublicKey="k")


def pairing_response(request_id: str = "p1") -> bytes:
    """A valid (refusing) pairing offer response."""
    return encode(type="relay_pairing_offer_response", requestId=request_id, ok=False, errorCode="E")


def subscribe(channel: str = CHANNEL, **extra: object) -> bytes:
    """A session-events subscribe frame."""
    return encode(type="viewport.session_events.subscribe/v1", channel=channel, **extra)


def unsubscribe(channel: str = CHANNEL) -> bytes:
    """A session-events unsubscribe frame."""
    return encode(type="viewport.session_events.unsubscribe/v1", channel=channel)


def viewer_presence(channel: str = CHANNEL, user: str = "u1") -> bytes:
    """A viewer presence frame."""
    return encode(type="viewport.session_viewer_presence/v1", channel=channel, action="joined", userId=user)


def session_event(channel: str = CHANNEL) -> bytes:
    """A session event relay frame."""
    return encode(schema="viewport.session_event_relay_frame/v1", channel=channel, event={"n": 1})


def worker_request(path: str) -> bytes:
    """A worker transport request."""
    return encode(type="viewport.worker_transport.request/v1", requestId="w1", method="GET", path=path)


def peer(conn: Connection) -> FakePeer:
    """The fake behind a connection."""
    assert isinstance(conn.peer, FakePeer)
    return conn.peer


class Harness:
    """A router over a recording backplane, fresh metrics and a config from ``env``."""

    def __init__(self, env: Optional[Dict[str, str]] = None, cross_relay: bool = True) -> None:
        base = {"RELAY_PUBLIC_WS_BASE_URL": PUBLIC_URL}
        self.config = load_config({**base, **(env or {})}, home="/nonexistent-home")
        self.backplane = RecordingBackplane("relay-a", cross_relay)
        self.metrics = RelayMetrics()
        self.registry = Registry(self.config.pairing_request_track_max, self.config.session_owner_track_max)
        self.forwarded: List[tuple[Connection, dict, str]] = []
        self.router = Router(
            config=self.config,
            registry=self.registry,
            backplane=self.backplane,
            metrics=self.metrics,
            limiters=Limiters(self.config),
            worker_forward=lambda conn, frame, path: self.forwarded.append((conn, frame, path)),
        )

    def connect(self, role: str, ws: str = WS, rt: Optional[str] = RT, query_rt: Any = SAME,
                ip: str = "10.0.0.1", now: float = 0, **claims: Any) -> Connection:
        """Open a connection whose claims name ``ws``/``rt`` (plus ``claims``) through the router."""
        conn = Connection(FakePeer(), role, ws, ip, Claims(workspace_id=ws, runtime_target_id=rt, role=role, **claims), now)
        self.router.open_connection(conn, rt if query_rt is SAME else query_rt, now)
        return conn

    def daemon(self, **kw: Any) -> Connection:
        """A daemon of ``ws1``/``rt1`` on machine ``machine-1``."""
        kw.setdefault("machine_id", MACHINE)
        return self.connect("workspace-daemon", **kw)

    def client(self, scope: str = "runtime", client_id: str = "c1", **kw: Any) -> Connection:
        """A client of ``ws1``/``rt1``."""
        if scope == "session-events":
            kw.setdefault("session_channels", (CHANNEL, OTHER_CHANNEL))
        return self.connect("client", scope=scope, client_id=client_id, **kw)

    def close(self, conn: Connection, now: float = 0) -> None:
        """The socket went away: tell the router."""
        peer(conn).lose()
        self.router.close_connection(conn, now)

    def count(self, name: str) -> float:
        """The value of a counter, by attribute name."""
        return float(getattr(self.metrics, name)._value.get())

    def key_exchange(self, client: Connection, daemon: Connection, request_id: str = "k1",
                     session_id: str = "s1", now: float = 0) -> None:
        """Run a key exchange so ``client`` owns ``session_id``."""
        self.router.client_frame(client, kex_init(request_id), now)
        self.router.daemon_frame(daemon, kex_response(request_id, session_id), now)

    def bus(self, payload: bytes, direction: str = "client_to_daemon", source: str = "relay-b",
            rt: str = RT, now: float = 0) -> None:
        """Hand the router a frame from another relay."""
        self.router.bus_frame(
            BusFrame(WS, rt, source, "relay-a", direction, payload.decode("utf-8")),  # type: ignore[arg-type]
            now,
        )


class FakesTests(SynchronousTestCase):
    """The fakes used here provide the interfaces the router talks through."""

    def test_fake_peer_provides_ipeer(self) -> None:
        """FakePeer fully provides IPeer."""
        self.assertTrue(verifyObject(IPeer, FakePeer()))

    def test_recording_backplane_provides_ibackplane(self) -> None:
        """RecordingBackplane fully provides IBackplane."""
        self.assertTrue(verifyObject(IBackplane, RecordingBackplane()))

    def test_recording_backplane_resolves_announcements(self) -> None:
        """An announced daemon resolves until the same relay announces it gone."""
        bp = RecordingBackplane("r")
        up = Presence(WS, RT, "r", PUBLIC_URL, True, MACHINE)
        bp.announce_presence(up)
        self.assertIs(self.successResultOf(bp.resolve_presence(WS, RT)), up)
        bp.announce_presence(Presence(WS, RT, "r", PUBLIC_URL, False, MACHINE))
        self.assertIsNone(self.successResultOf(bp.resolve_presence(WS, RT)))

    def test_single_backplane_provides_ibackplane(self) -> None:
        """The single backplane fully provides IBackplane."""
        self.assertTrue(verifyObject(IBackplane, SingleBackplane("r")))


class CheckConnectionClaimsTests(SynchronousTestCase):
    """The claims-versus-query checks of contract §3.4, in order."""

    def check(self, role: str, query_rt: Optional[str], **claims: Any) -> tuple[Optional[str], Optional[str]]:
        """The effective target and the close reason (or None) for workspace ``ws1``."""
        target, rejection = check_connection_claims(role, WS, query_rt, Claims(**claims))
        return target, rejection.close_reason if rejection else None

    def test_missing_workspace(self) -> None:
        """Empty claims are refused for a missing workspace claim, before any other check."""
        self.assertEqual(self.check("client", RT), (None, "missing workspace claim"))

    def test_blank_workspace(self) -> None:
        """A workspace claim of spaces counts as missing."""
        self.assertEqual(self.check("workspace-daemon", RT, workspace_id="  "), (None, "missing workspace claim"))

    def test_workspace_trimmed(self) -> None:
        """The workspace claim is trimmed before the comparison."""
        self.assertEqual(self.check("workspace-daemon", RT, workspace_id=" ws1 ", runtime_target_id=RT), (RT, None))

    def test_workspace_mismatch_before_scope(self) -> None:
        """A different workspace is refused before the scope is looked at."""
        self.assertEqual(self.check("client", RT, workspace_id="other", scope="bogus"),
                         (None, "workspace claim mismatch"))

    def test_runtime_target_mismatch_before_scope(self) -> None:
        """A query target different from the claim is refused before the scope is looked at."""
        self.assertEqual(self.check("client", RT, workspace_id=WS, runtime_target_id="x", scope="bogus"),
                         (None, "runtime target claim mismatch"))

    def test_query_target_without_claim(self) -> None:
        """A query target with no target claim is a mismatch."""
        self.assertEqual(self.check("workspace-daemon", RT, workspace_id=WS), (None, "runtime target claim mismatch"))

    def test_runtime_target_trimmed(self) -> None:
        """The target claim is trimmed before the comparison and the trimmed value is effective."""
        self.assertEqual(self.check("workspace-daemon", RT, workspace_id=WS, runtime_target_id=" rt1 "), (RT, None))

    def test_invalid_scope_before_missing_target(self) -> None:
        """A client with an unknown scope is refused before the runtime target is required."""
        self.assertEqual(self.check("client", None, workspace_id=WS, scope="bogus"), (None, "invalid scope claim"))

    def test_client_without_scope(self) -> None:
        """A client without a scope claim is refused."""
        self.assertEqual(self.check("client", RT, workspace_id=WS, runtime_target_id=RT), (None, "invalid scope claim"))

    def test_missing_target_daemon(self) -> None:
        """A daemon without a runtime target is refused and told RUNTIME_TARGET_REQUIRED first."""
        target, rejection = check_connection_claims("workspace-daemon", WS, None, Claims(workspace_id=WS))
        assert rejection is not None
        self.assertEqual((target, rejection.close_reason, rejection.send_runtime_target_required),
                         (None, "missing runtime target claim", True))

    def test_missing_target_runtime_client(self) -> None:
        """A runtime client needs a runtime target."""
        self.assertEqual(self.check("client", None, workspace_id=WS, scope="runtime"),
                         (None, "missing runtime target claim"))

    def test_missing_target_session_events_client(self) -> None:
        """A session-events client needs a runtime target."""
        self.assertEqual(self.check("client", None, workspace_id=WS, scope="session-events"),
                         (None, "missing runtime target claim"))

    def test_pairing_client_without_target(self) -> None:
        """A pairing client may have no runtime target."""
        self.assertEqual(self.check("client", None, workspace_id=WS, scope="pairing"), (None, None))

    def test_worker_ignores_scope_and_target(self) -> None:
        """A worker needs neither a valid scope nor a runtime target."""
        self.assertEqual(self.check("worker", None, workspace_id=WS, scope="bogus"), (None, None))

    def test_target_from_claim(self) -> None:
        """Without a query target the claim supplies the effective runtime target."""
        self.assertEqual(self.check("client", None, workspace_id=WS, runtime_target_id=RT, scope="runtime"), (RT, None))


class AdmissionCloseTests(SynchronousTestCase):
    """Each §3.4 refusal closes 4008 with its reason, registers nothing and counts a rejection."""

    def setUp(self) -> None:
        self.h = Harness()

    def assertRefused(self, conn: Connection, reason: str) -> None:
        """Assert a 4008 close with ``reason`` and no registration side effect."""
        self.assertEqual(peer(conn).closes, [(4008, reason)])
        self.assertEqual((conn.registered, self.h.registry.ip_counts, self.h.registry.registered_connections),
                         (False, {}, 0))
        self.assertEqual(self.h.count("relay_ws_connections_rejected"), 1)
        self.assertEqual(self.h.backplane.announcements, [])

    def test_missing_workspace_claim(self) -> None:
        """No workspace claim closes 4008 ``missing workspace claim``."""
        conn = Connection(FakePeer(), "client", WS, "ip", Claims(scope="runtime"), 0)
        self.h.router.open_connection(conn, None, 0)
        self.assertRefused(conn, "missing workspace claim")

    def test_workspace_claim_mismatch(self) -> None:
        """A different workspace claim closes 4008 ``workspace claim mismatch``."""
        conn = Connection(FakePeer(), "client", WS, "ip", Claims(workspace_id="x", scope="runtime"), 0)
        self.h.router.open_connection(conn, None, 0)
        self.assertRefused(conn, "workspace claim mismatch")

    def test_runtime_target_claim_mismatch(self) -> None:
        """A different runtime target closes 4008 ``runtime target claim mismatch``."""
        self.assertRefused(self.h.daemon(query_rt="other"), "runtime target claim mismatch")

    def test_invalid_scope_claim(self) -> None:
        """A client with an unknown scope closes 4008 ``invalid scope claim``."""
        self.assertRefused(self.h.client(scope="admin"), "invalid scope claim")

    def test_missing_runtime_target_claim(self) -> None:
        """A daemon without a target gets RUNTIME_TARGET_REQUIRED, then 4008 ``missing runtime target claim``."""
        conn = self.h.daemon(rt=None)
        self.assertRefused(conn, "missing runtime target claim")
        self.assertEqual(peer(conn).history, ["text", "close"])
        self.assertEqual(peer(conn).texts, [frames.runtime_target_required(WS)])


class DaemonGenerationTests(SynchronousTestCase):
    """Daemon fencing by issue generation and the one-daemon-per-scope rule (§4.4)."""

    def setUp(self) -> None:
        self.h = Harness()

    def test_stale_generation_rejected(self) -> None:
        """A daemon with a lower generation than recorded closes 4008 ``stale daemon generation``."""
        self.h.close(self.h.daemon(daemon_issue_generation=5))
        stale = self.h.daemon(daemon_issue_generation=4)
        self.assertEqual(peer(stale).closes, [(4008, "stale daemon generation")])
        self.assertEqual((stale.registered, self.h.registry.ip_counts), (False, {}))
        self.assertEqual(self.h.count("relay_ws_connections_rejected"), 1)

    def test_equal_generation_allowed(self) -> None:
        """A daemon with the recorded generation is accepted."""
        self.h.close(self.h.daemon(daemon_issue_generation=5))
        again = self.h.daemon(daemon_issue_generation=5)
        self.assertEqual((again.registered, peer(again).closes), (True, []))

    def test_no_generation_keeps_record(self) -> None:
        """A daemon without a generation is accepted and leaves the recorded generation unchanged."""
        self.h.close(self.h.daemon(daemon_issue_generation=5))
        self.h.close(self.h.daemon())
        self.assertEqual(peer(self.h.daemon(daemon_issue_generation=4)).closes, [(4008, "stale daemon generation")])

    def test_higher_generation_recorded(self) -> None:
        """A newer generation replaces the record."""
        self.h.close(self.h.daemon(daemon_issue_generation=5))
        self.h.close(self.h.daemon(daemon_issue_generation=9))
        self.assertEqual(self.h.registry.get(WS, RT).daemon_issue_generation, 9)  # type: ignore[union-attr]

    def test_duplicate_open_daemon_rejected(self) -> None:
        """A second daemon while the first is open closes 4008 ``daemon already connected``, even if newer."""
        first = self.h.daemon(daemon_issue_generation=1)
        second = self.h.daemon(daemon_issue_generation=2, ip="10.0.0.2")
        self.assertEqual(peer(second).closes, [(4008, "daemon already connected")])
        scope = self.h.registry.get(WS, RT)
        assert scope is not None
        self.assertEqual((scope.daemon, scope.daemon_issue_generation), (first, 1))
        self.assertEqual(self.h.registry.ip_counts, {"10.0.0.1": 1})
        self.assertEqual(len(self.h.backplane.announcements), 1)

    def test_replaces_non_open_leftover(self) -> None:
        """A daemon whose predecessor's socket is no longer open replaces it."""
        old = self.h.daemon()
        peer(old).lose()
        new = self.h.daemon()
        self.assertIs(self.h.registry.get(WS, RT).daemon, new)  # type: ignore[union-attr]

    def test_stale_socket_close_changes_nothing(self) -> None:
        """The replaced socket closing later keeps the new daemon, its routes, and announces nothing."""
        old = self.h.daemon()
        peer(old).lose()
        new = self.h.daemon()
        client = self.h.client()
        self.h.key_exchange(client, new)
        announced = list(self.h.backplane.announcements)
        self.h.router.close_connection(old, 10)
        scope = self.h.registry.get(WS, RT)
        assert scope is not None
        self.assertEqual((scope.daemon, len(scope.session_owners)), (new, 1))
        self.assertEqual(self.h.backplane.announcements, announced)
        self.assertEqual(self.h.backplane.unwatch_calls, [])
        self.assertEqual(peer(client).texts, [])
        self.assertEqual(self.h.registry.ip_counts, {"10.0.0.1": 2})

    def test_connect_clears_kex_and_sessions_not_pairing(self) -> None:
        """A daemon (re)connecting forgets key exchange requests and session owners but keeps pairing requests."""
        scope = self.h.registry.get_or_create(WS, RT, 0)
        client = self.h.client()
        self.h.router.client_frame(client, kex_init("k1"), 0)
        pairing = self.h.client(scope="pairing", client_id="p")
        self.h.router.client_frame(pairing, pairing_offer("p1"), 0)
        self.h.daemon()
        self.assertEqual((len(scope.kex_requests), len(scope.pairing_requests)), (0, 1))


class RegistrationTests(SynchronousTestCase):
    """Side effects of registering and closing connections (§4.3–4.6)."""

    def setUp(self) -> None:
        self.h = Harness()

    def test_counts(self) -> None:
        """Daemons, clients and workers count per IP; only daemons and clients count as registered."""
        daemon, client = self.h.daemon(), self.h.client()
        worker = self.h.connect("worker", rt=None, managed_executor_id="e1")
        self.assertEqual((self.h.registry.ip_counts, self.h.registry.registered_connections), ({"10.0.0.1": 3}, 2))
        self.assertEqual(self.h.count("relay_ws_connections_opened"), 3)
        for conn in (daemon, client, worker):
            self.h.close(conn)
        self.assertEqual((self.h.registry.ip_counts, self.h.registry.registered_connections), ({}, 0))
        self.assertEqual(self.h.count("relay_ws_connections_closed"), 3)

    def test_gauges(self) -> None:
        """The connection and scope gauges follow registrations."""
        self.h.daemon()
        self.h.client()
        self.assertEqual((self.h.metrics.relay_connections_total._value.get(),
                          self.h.metrics.relay_workspaces_total._value.get()), (2, 1))

    def test_presence_on_connect(self) -> None:
        """A daemon's connection is announced with its workspace, target, machine and this relay."""
        self.h.daemon()
        self.assertEqual(self.h.backplane.announcements, [Presence(WS, RT, "relay-a", PUBLIC_URL, True, MACHINE)])

    def test_presence_on_disconnect(self) -> None:
        """The current daemon's disconnection is announced with the same machine."""
        self.h.close(self.h.daemon())
        self.assertEqual(self.h.backplane.announcements[1:], [Presence(WS, RT, "relay-a", PUBLIC_URL, False, MACHINE)])

    def test_withdraw_presence(self) -> None:
        """Withdrawing presence announces every local daemon as disconnected, with its machine."""
        self.h.daemon()
        self.h.daemon(rt="rt2", machine_id="m2")
        self.h.client(rt="rt3")
        self.h.backplane.announcements.clear()
        self.successResultOf(self.h.router.withdraw_presence())
        self.assertEqual(sorted(self.h.backplane.announcements, key=lambda p: str(p.runtime_target_id)), [
            Presence(WS, RT, "relay-a", PUBLIC_URL, False, MACHINE),
            Presence(WS, "rt2", "relay-a", PUBLIC_URL, False, "m2")])

    def test_client_announces_nothing(self) -> None:
        """Clients do not touch presence."""
        self.h.close(self.h.client())
        self.assertEqual(self.h.backplane.announcements, [])

    def test_watch_on_registration(self) -> None:
        """Registering a daemon watches the scope's daemon side, a client its clients side."""
        self.h.daemon()
        self.h.client()
        self.assertEqual(self.h.backplane.watch_calls, [(WS, RT, "daemon"), (WS, RT, "clients")])

    def test_unwatch_daemon_side(self) -> None:
        """The daemon side is unwatched when the current daemon leaves."""
        self.h.client()
        self.h.close(self.h.daemon())
        self.assertEqual(self.h.backplane.unwatch_calls, [(WS, RT, "daemon")])

    def test_unwatch_clients_side_after_last_client(self) -> None:
        """The clients side is unwatched only when the scope's last client leaves."""
        a, b = self.h.client(client_id="a"), self.h.client(client_id="b")
        self.h.close(a)
        self.assertEqual(self.h.backplane.unwatch_calls, [])
        self.h.close(b)
        self.assertEqual(self.h.backplane.unwatch_calls, [(WS, RT, "clients")])

    def test_worker_has_no_scope(self) -> None:
        """A worker is counted but joins no scope and watches nothing."""
        worker = self.h.connect("worker", rt=None, managed_executor_id="e1")
        self.assertEqual((worker.registered, worker.scope, self.h.backplane.watch_calls), (True, None, []))

    def test_client_cap(self) -> None:
        """The client cap counts only open clients of the scope and creates nothing."""
        h = Harness({"RELAY_MAX_CLIENTS_PER_WORKSPACE": "1"})
        self.assertFalse(h.router.client_cap_reached(WS, RT))
        self.assertEqual(h.registry.scopes, {})
        client = h.client()
        self.assertTrue(h.router.client_cap_reached(WS, RT))
        peer(client).lose()
        self.assertFalse(h.router.client_cap_reached(WS, RT))

    def test_frames_mark_activity(self) -> None:
        """Every inbound client, daemon or worker frame records the connection's activity time."""
        daemon, client = self.h.daemon(), self.h.client()
        worker = self.h.connect("worker", rt=None, managed_executor_id="e1")
        self.h.router.client_frame(client, b"junk", 11)
        self.h.router.daemon_frame(daemon, b"junk", 12)
        self.h.router.worker_frame(worker, b"junk", 13)
        self.assertEqual([c.last_activity_ms for c in (client, daemon, worker)], [11, 12, 13])

    def test_close_unregistered_is_noop(self) -> None:
        """Closing a refused connection changes no count."""
        refused = self.h.client(scope="bogus")
        self.h.router.close_connection(refused, 0)
        self.assertEqual(self.h.count("relay_ws_connections_closed"), 0)

    def test_client_close_forgets_its_state(self) -> None:
        """A closing client loses its requests, sessions and subscriptions; others keep theirs."""
        daemon = self.h.daemon()
        gone, stays = self.h.client(client_id="a"), self.h.client(client_id="b")
        viewer = self.h.client("session-events", client_id="v")
        self.h.key_exchange(gone, daemon, "k1", "s1")
        self.h.key_exchange(stays, daemon, "k2", "s2")
        self.h.router.client_frame(gone, kex_init("k3"), 0)
        self.h.router.client_frame(viewer, subscribe(), 0)
        scope = self.h.registry.get(WS, RT)
        assert scope is not None
        self.h.close(gone)
        self.h.close(viewer)
        self.assertEqual((len(scope.session_owners), len(scope.kex_requests), scope.subscribers), (1, 0, {}))
        self.assertEqual(list(scope.clients), [stays])


class StatusFrameTests(SynchronousTestCase):
    """Every relay_status frame of §5.7, with its exact text."""

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
                        metrics=RelayMetrics(), limiters=Limiters(config))
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
    """Every close of the §5.8 table the router produces after admission."""

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


class RoutingTests(SynchronousTestCase):
    """Request/response ownership and session-owned frames (§5.6.1, §5.6.2)."""

    def setUp(self) -> None:
        self.h = Harness()
        self.daemon = self.h.daemon()
        self.a = self.h.client(client_id="a")
        self.b = self.h.client(client_id="b")

    def test_client_frame_forwarded_verbatim(self) -> None:
        """A client frame reaches the daemon byte for byte, extra fields and spacing included."""
        payload = b'{ "type":"e2ee","version":2,"profile":"noise-ik","sessionId":"x","epoch":1,"seq":1,' \
                  b'"iv":"i","tag":"t","ciphertext":"c","extra":[1, 2] }'
        self.h.router.client_frame(self.a, payload, 0)
        self.assertEqual(peer(self.daemon).payloads, [payload])
        self.assertEqual((self.h.count("relay_frames_client_to_daemon"),
                          self.h.count("relay_bytes_client_to_daemon")), (1, len(payload)))

    def test_kex_response_to_owner_only(self) -> None:
        """A key exchange response goes only to the client that asked, which then owns the session."""
        response = kex_response("k1", "s1")
        self.h.router.client_frame(self.a, kex_init("k1"), 0)
        self.h.router.daemon_frame(self.daemon, response, 1)
        self.assertEqual((peer(self.a).payloads, peer(self.b).frames), ([response], []))
        owner = self.h.registry.get(WS, RT).session_owners.get("s1", 2)  # type: ignore[union-attr]
        self.assertIs(owner.connection, self.a)  # type: ignore[union-attr]
        self.assertEqual(self.h.count("relay_key_exchange_response_routed_local"), 1)

    def test_reused_request_id_cannot_steal_a_key_exchange(self) -> None:
        """A second client reusing a live request id (even padded) gets INVALID_FRAME; the owner keeps the answer."""
        self.h.router.client_frame(self.a, kex_init("r1"), 0)
        self.h.router.client_frame(self.b, kex_init("r1"), 1)
        self.h.router.client_frame(self.b, kex_init(" r1 "), 2)
        self.assertEqual(len(peer(self.daemon).payloads), 1)
        self.assertEqual([json.loads(t)["code"] for t in peer(self.b).texts], ["INVALID_FRAME", "INVALID_FRAME"])
        response = kex_response("r1", "s1")
        self.h.router.daemon_frame(self.daemon, response, 3)
        self.assertEqual(peer(self.a).payloads, [response])
        self.h.router.daemon_frame(self.daemon, e2ee("s1"), 4)
        self.assertEqual(len(peer(self.a).payloads), 2)
        self.assertEqual(len(peer(self.b).payloads), 0)

    def test_request_id_is_free_again_once_its_owner_left(self) -> None:
        """After the owning connection closed, another client may use the same request id."""
        self.h.router.client_frame(self.a, kex_init("r1"), 0)
        self.h.close(self.a)
        self.h.router.client_frame(self.b, kex_init("r1"), 1)
        self.h.router.daemon_frame(self.daemon, kex_response("r1", "s1"), 2)
        self.assertEqual(len(peer(self.b).payloads), 1)

    def test_reused_session_id_is_refused(self) -> None:
        """Envelopes naming a session another live client owns are refused with INVALID_FRAME, not forwarded."""
        self.h.key_exchange(self.a, self.daemon, "r1", "s1")
        forwarded = len(peer(self.daemon).payloads)
        for padded in ("s1", " s1", "\ts1", "\u00a0s1"):
            self.h.router.client_frame(self.b, e2ee(padded), 1)
            self.assertEqual(len(peer(self.daemon).payloads), forwarded, padded)
            self.assertEqual(json.loads(peer(self.b).texts[-1])["code"], "INVALID_FRAME")
        self.h.router.client_frame(self.a, e2ee("s1"), 2)
        self.assertEqual(len(peer(self.daemon).payloads), forwarded + 1)

    def test_reused_pairing_request_id_is_refused(self) -> None:
        """A pairing request id owned by a live client cannot be taken over by another."""
        pa = self.h.client("pairing", client_id="pa")
        pb = self.h.client("pairing", client_id="pb")
        self.h.router.client_frame(pa, pairing_offer("p1"), 0)
        self.h.router.client_frame(pb, pairing_offer("p1"), 1)
        self.h.router.daemon_frame(self.daemon, pairing_response("p1"), 2)
        self.assertEqual((len(peer(pa).payloads), json.loads(peer(pb).texts[-1])["code"]), (1, "INVALID_FRAME"))

    def test_bus_frames_cannot_take_over_a_local_request(self) -> None:
        """A key exchange from another relay reusing a local client's live request id is rejected."""
        self.h.router.client_frame(self.a, kex_init("r1"), 0)
        self.h.bus(kex_init("r1"), source="relay-b", now=1)
        self.h.router.daemon_frame(self.daemon, kex_response("r1", "s1"), 2)
        self.assertEqual(len(peer(self.a).payloads), 1)
        self.assertEqual(self.h.count("relay_bus_frames_rejected"), 1)

    def test_kex_response_answered_once(self) -> None:
        """A second response to the same request finds no owner and is dropped."""
        self.h.router.client_frame(self.a, kex_init("k1"), 0)
        self.h.router.daemon_frame(self.daemon, kex_response("k1", "s1"), 1)
        self.h.router.daemon_frame(self.daemon, kex_response("k1", "s2"), 2)
        self.assertEqual(len(peer(self.a).payloads), 1)
        self.assertEqual(self.h.count("relay_key_exchange_response_dropped"), 1)

    def test_kex_response_unknown_request(self) -> None:
        """A response to an unknown request is dropped and creates no session."""
        self.h.router.daemon_frame(self.daemon, kex_response("nope", "s1"), 0)
        self.assertEqual((peer(self.a).frames, peer(self.b).frames), ([], []))
        self.assertEqual(len(self.h.registry.get(WS, RT).session_owners), 0)  # type: ignore[union-attr]

    def test_kex_request_expires(self) -> None:
        """A key exchange request is forgotten two minutes after it was made."""
        self.h.router.client_frame(self.a, kex_init("k1"), 0)
        self.h.router.daemon_frame(self.daemon, kex_response("k1", "s1"), 2 * MINUTE)
        self.assertEqual(peer(self.a).frames, [])

    def test_kex_init_with_empty_request_id_not_tracked(self) -> None:
        """A key exchange init with a blank requestId is forwarded without recording an owner."""
        self.h.router.client_frame(self.a, kex_init("  "), 0)
        self.assertEqual(len(peer(self.daemon).payloads), 1)
        self.assertEqual(len(self.h.registry.get(WS, RT).kex_requests), 0)  # type: ignore[union-attr]

    def test_session_frames_to_owner_only(self) -> None:
        """Daemon E2EE envelopes and key updates of a session go only to its owner."""
        self.h.key_exchange(self.a, self.daemon)
        envelope, update = e2ee("s1"), key_update("s1")
        self.h.router.daemon_frame(self.daemon, envelope, 1)
        self.h.router.daemon_frame(self.daemon, update, 2)
        self.assertEqual((peer(self.a).payloads[1:], peer(self.b).frames), ([envelope, update], []))
        self.assertEqual(self.h.count("relay_session_frame_routed_local"), 2)

    def test_unknown_session_dropped(self) -> None:
        """A daemon frame for an unknown session reaches nobody."""
        self.h.router.daemon_frame(self.daemon, e2ee("ghost"), 0)
        self.assertEqual((peer(self.a).frames, peer(self.b).frames), ([], []))
        self.assertEqual(self.h.count("relay_session_frame_dropped"), 1)

    def test_closed_owner_session_dropped(self) -> None:
        """After the owner leaves, its session's frames are dropped."""
        self.h.key_exchange(self.a, self.daemon)
        self.h.close(self.a)
        self.h.router.daemon_frame(self.daemon, e2ee("s1"), 1)
        self.assertEqual(peer(self.b).frames, [])
        self.assertEqual(self.h.count("relay_session_frame_dropped"), 1)

    def test_daemon_reconnect_forgets_sessions(self) -> None:
        """A reconnected daemon cannot reach sessions of its predecessor."""
        self.h.key_exchange(self.a, self.daemon)
        self.h.close(self.daemon)
        daemon = self.h.daemon()
        self.h.router.daemon_frame(daemon, e2ee("s1"), 1)
        self.assertEqual(len(peer(self.a).payloads), 1)

    def test_pairing_response_to_requester_only(self) -> None:
        """A pairing response goes only to the pairing client that asked."""
        p1, p2 = self.h.client("pairing", client_id="p1"), self.h.client("pairing", client_id="p2")
        self.h.router.client_frame(p1, pairing_offer("r1"), 0)
        self.h.router.client_frame(p2, pairing_offer("r2"), 0)
        response = pairing_response("r1")
        self.h.router.daemon_frame(self.daemon, response, 1)
        self.assertEqual((peer(p1).payloads, peer(p2).frames, peer(self.a).frames), ([response], [], []))
        self.assertEqual(self.h.count("relay_pairing_response_routed_local"), 1)

    def test_pairing_tracking_cap_evicts_oldest(self) -> None:
        """At the request tracking cap the oldest pairing request is forgotten first."""
        h = Harness({"RELAY_PAIRING_REQUEST_TRACK_MAX": "2"})
        daemon = h.daemon()
        clients = [h.client("pairing", client_id=f"p{n}") for n in range(3)]
        for n, conn in enumerate(clients):
            h.router.client_frame(conn, pairing_offer(f"r{n}"), n)
        for n in range(3):
            h.router.daemon_frame(daemon, pairing_response(f"r{n}"), 10)
        self.assertEqual([len(peer(c).payloads) for c in clients], [0, 1, 1])
        self.assertEqual(h.count("relay_pairing_response_dropped"), 1)

    def test_session_owner_cap(self) -> None:
        """At the session owner cap the oldest session is forgotten first."""
        h = Harness({"RELAY_SESSION_OWNER_TRACK_MAX": "2"})
        daemon, conn = h.daemon(), h.client()
        for n in range(3):
            h.key_exchange(conn, daemon, f"k{n}", f"s{n}", now=n)
        for n in range(3):
            h.router.daemon_frame(daemon, e2ee(f"s{n}"), 10)
        self.assertEqual([json.loads(p)["sessionId"] for p in peer(conn).payloads[3:]], ["s1", "s2"])

    def test_session_owner_expires_without_traffic(self) -> None:
        """A session with no traffic for 30 minutes is forgotten."""
        self.h.key_exchange(self.a, self.daemon, now=0)
        self.h.router.daemon_frame(self.daemon, e2ee("s1"), 30 * MINUTE)
        self.assertEqual(len(peer(self.a).payloads), 1)

    def test_session_owner_alive_just_before_expiry(self) -> None:
        """A session is still routed just under 30 minutes after its last traffic."""
        self.h.key_exchange(self.a, self.daemon, now=0)
        self.h.router.daemon_frame(self.daemon, e2ee("s1"), 30 * MINUTE - 1)
        self.assertEqual(len(peer(self.a).payloads), 2)

    def test_daemon_traffic_keeps_session(self) -> None:
        """Daemon traffic every 20 minutes keeps a session routed well past 30 minutes."""
        self.h.key_exchange(self.a, self.daemon, now=0)
        for minutes in (20, 40, 60):
            self.h.router.daemon_frame(self.daemon, e2ee("s1"), minutes * MINUTE)
        self.assertEqual(len(peer(self.a).payloads), 4)

    def test_client_traffic_keeps_session(self) -> None:
        """Client traffic alone keeps its session: a daemon frame 45 minutes in still arrives."""
        self.h.key_exchange(self.a, self.daemon, now=0)
        self.h.router.client_frame(self.a, e2ee("s1"), 20 * MINUTE)
        self.h.router.client_frame(self.a, e2ee("s1", seq=2), 40 * MINUTE)
        self.h.router.daemon_frame(self.daemon, e2ee("s1"), 45 * MINUTE)
        self.assertEqual(len(peer(self.a).payloads), 2)

    def test_other_client_traffic_does_not_keep_session(self) -> None:
        """Frames naming a session from a client that does not own it do not keep it alive."""
        self.h.key_exchange(self.a, self.daemon, now=0)
        self.h.router.client_frame(self.b, e2ee("s1"), 20 * MINUTE)
        self.h.router.daemon_frame(self.daemon, e2ee("s1"), 31 * MINUTE)
        self.assertEqual(len(peer(self.a).payloads), 1)

    def test_invalid_daemon_frame_dropped_silently(self) -> None:
        """An invalid daemon frame is counted and dropped, with no reply and no close."""
        for junk in (b"[]", b'{"type":"context-candidate-preview"}', kex_init()):
            self.h.router.daemon_frame(self.daemon, junk, 0)
        self.assertEqual((peer(self.daemon).history, peer(self.a).frames), ([], []))
        self.assertEqual(self.h.count("relay_frames_daemon_rejected"), 3)

    def test_daemon_frame_counters(self) -> None:
        """Valid daemon frames count toward daemon→clients frames and bytes, routed or not."""
        payload = e2ee("ghost")
        self.h.router.daemon_frame(self.daemon, payload, 0)
        self.assertEqual((self.h.count("relay_frames_daemon_to_clients"),
                          self.h.count("relay_bytes_daemon_to_clients")), (1, len(payload)))


class SessionEventTests(SynchronousTestCase):
    """Subscriptions, session event delivery and viewer presence (§5.6.3, §5.6.4)."""

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
        """An unsubscribe from a channel outside the claims gets the unsubscribe_denied frame (§11 item 20)."""
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
        """A local daemon's session event reaches the channel's subscribers only (§11 item 4)."""
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


class ScopeCollisionTests(SynchronousTestCase):
    """IDs containing ``:`` never make two scopes share state (§11 item 2)."""

    def test_pairing_client_does_not_reach_other_scope(self) -> None:
        """A pairing client of workspace ``a:b`` without target does not reach the daemon of ``a``/``b``."""
        h = Harness()
        daemon = h.daemon(ws="a", rt="b")
        pairing = h.client("pairing", ws="a:b", rt=None)
        h.router.client_frame(pairing, pairing_offer(), 0)
        self.assertEqual(peer(daemon).frames, [])
        self.assertEqual(peer(pairing).texts, [frames.runtime_target_required("a:b")])
        self.assertEqual(set(h.registry.scopes), {("a", "b"), ("a:b", None)})

    def test_two_daemons_with_colon_ids(self) -> None:
        """Daemons of ``a:b``/``c`` and ``a``/``b:c`` both register."""
        h = Harness()
        first, second = h.daemon(ws="a:b", rt="c"), h.daemon(ws="a", rt="b:c")
        self.assertEqual((first.registered, second.registered), (True, True))


class RateLimitTests(SynchronousTestCase):
    """The process-wide limiters (§5.9)."""

    def test_kex_fixed_window(self) -> None:
        """The key exchange window allows N inits until 60 s after the first, then refuses."""
        h = Harness({"RELAY_KEX_INIT_RATE_PER_MINUTE": "2"})
        conn = h.client()
        h.router.client_frame(conn, kex_init("k1"), 0)
        h.router.client_frame(conn, kex_init("k2"), 1000)
        h.router.client_frame(conn, kex_init("k3"), MINUTE - 1)
        self.assertEqual(peer(conn).closes, [(4008, "key exchange rate limit exceeded")])

    def test_kex_window_restarts(self) -> None:
        """60 s after the window started a new window begins."""
        h = Harness({"RELAY_KEX_INIT_RATE_PER_MINUTE": "2"})
        conn = h.client()
        for n, now in enumerate((0, 1000, MINUTE, MINUTE + 1)):
            h.router.client_frame(conn, kex_init(f"k{n}"), now)
        self.assertEqual(peer(conn).closes, [])

    def test_kex_limit_survives_reconnect(self) -> None:
        """A client reconnecting with the same identity and IP finds its window still used."""
        h = Harness({"RELAY_KEX_INIT_RATE_PER_MINUTE": "1"})
        first = h.client()
        h.router.client_frame(first, kex_init("k1"), 0)
        h.close(first, 1)
        second = h.client()
        h.router.client_frame(second, kex_init("k2"), 2)
        self.assertEqual(peer(second).closes, [(4008, "key exchange rate limit exceeded")])

    def test_kex_limit_keyed_by_ip(self) -> None:
        """The same client from another IP has its own window."""
        h = Harness({"RELAY_KEX_INIT_RATE_PER_MINUTE": "1"})
        h.router.client_frame(h.client(), kex_init("k1"), 0)
        other = h.client(ip="10.0.0.9")
        h.router.client_frame(other, kex_init("k2"), 1)
        self.assertEqual(peer(other).closes, [])

    def test_runtime_bucket_refills(self) -> None:
        """The per-client bucket refills continuously: one token after 30 s at 2 per minute."""
        h = Harness({"RELAY_RUNTIME_RATE_PER_MINUTE": "2"})
        first = h.client()
        h.router.client_frame(first, e2ee(), 0)
        h.router.client_frame(first, e2ee(), 0)
        h.close(first, 0)
        second = h.client()
        h.router.client_frame(second, e2ee(), MINUTE // 2 - 1)
        self.assertEqual(peer(second).closes, [(4008, "runtime rate limit exceeded")])
        third = h.client()
        h.router.client_frame(third, e2ee(), MINUTE // 2 + 10)
        self.assertEqual(peer(third).closes, [])

    def test_runtime_bucket_per_client(self) -> None:
        """Another clientId has its own per-client bucket."""
        h = Harness({"RELAY_RUNTIME_RATE_PER_MINUTE": "1"})
        h.router.client_frame(h.client(client_id="a"), e2ee(), 0)
        b = h.client(client_id="b")
        h.router.client_frame(b, e2ee(), 0)
        self.assertEqual(peer(b).closes, [])

    def test_runtime_workspace_bucket_aggregates(self) -> None:
        """The per-workspace bucket is shared by all clients of the workspace."""
        h = Harness({"RELAY_RUNTIME_RATE_PER_MINUTE_WORKSPACE": "3"})
        a, b = h.client(client_id="a"), h.client(client_id="b")
        for conn in (a, a, b):
            h.router.client_frame(conn, e2ee(), 0)
        h.router.client_frame(b, e2ee(), 0)
        self.assertEqual((peer(a).closes, peer(b).closes), ([], [(4008, "runtime rate limit exceeded")]))

    def test_refused_client_token_spares_workspace(self) -> None:
        """A frame refused by the per-client bucket does not use a workspace token."""
        h = Harness({"RELAY_RUNTIME_RATE_PER_MINUTE": "1", "RELAY_RUNTIME_RATE_PER_MINUTE_WORKSPACE": "2"})
        a = h.client(client_id="a")
        h.router.client_frame(a, e2ee(), 0)
        h.router.client_frame(a, e2ee(), 0)
        b = h.client(client_id="b")
        h.router.client_frame(b, e2ee(), 0)
        self.assertEqual(peer(b).closes, [])

    def test_presence_uses_runtime_buckets(self) -> None:
        """Viewer presence draws from the same per-client bucket as E2EE frames."""
        h = Harness({"RELAY_RUNTIME_RATE_PER_MINUTE": "1"})
        h.router.client_frame(h.client(client_id="same"), e2ee(), 0)
        viewer = h.client("session-events", client_id="same")
        h.router.client_frame(viewer, viewer_presence(), 1)
        self.assertEqual(peer(viewer).closes, [(4008, "presence rate limit exceeded")])

    def test_pairing_window(self) -> None:
        """Pairing requests share a fixed window per workspace, client and IP, across reconnects."""
        h = Harness({"RELAY_PAIRING_RATE_PER_MINUTE": "1"})
        first = h.client("pairing")
        h.router.client_frame(first, pairing_offer("r1"), 0)
        h.close(first)
        second = h.client("pairing")
        h.router.client_frame(second, pairing_offer("r2"), 1)
        self.assertEqual(peer(second).closes, [(4008, "pairing rate limit exceeded")])

    def test_daemon_bucket_shared_with_worker(self) -> None:
        """Daemon and worker frames of one workspace share the daemon bucket."""
        h = Harness({"RELAY_DAEMON_RUNTIME_RATE_PER_MINUTE": "2"})
        daemon, client = h.daemon(), h.client()
        h.key_exchange(client, daemon)
        h.router.daemon_frame(daemon, e2ee(), 0)
        worker = h.connect("worker", rt=None, managed_executor_id="e1")
        h.router.worker_frame(worker, worker_request("/api/runtime/workspaces/ws1/managed-executors/e1"), 0)
        self.assertEqual((peer(daemon).closes, peer(worker).closes), ([], [(4008, "worker rate limit exceeded")]))

    def test_daemon_bucket_survives_reconnect(self) -> None:
        """A reconnecting daemon finds the workspace bucket as its predecessor left it."""
        h = Harness({"RELAY_DAEMON_RUNTIME_RATE_PER_MINUTE": "1"})
        first, client = h.daemon(), h.client()
        h.key_exchange(client, first)
        h.close(first)
        second = h.daemon()
        h.key_exchange(client, second, "k2", "s2", now=1)
        self.assertEqual(h.count("relay_frames_daemon_rate_limited"), 1)
        self.assertEqual(len(peer(client).frames), 2)  # the first response and the first daemon's notice


class WorkerTests(SynchronousTestCase):
    """The worker transport decisions the router makes (§5.6.6)."""

    def setUp(self) -> None:
        self.h = Harness()
        self.worker = self.h.connect("worker", rt=None, managed_executor_id="e1")

    def test_path_denied(self) -> None:
        """A path outside the worker's executor is answered 403 WORKER_TRANSPORT_PATH_DENIED."""
        self.h.router.worker_frame(self.worker, worker_request("/api/runtime/workspaces/ws1/managed-executors/e2"), 0)
        self.assertEqual(peer(self.worker).texts, [frames.worker_path_denied("w1")])
        self.assertEqual((self.h.forwarded, self.h.count("relay_worker_transport_rejected")), ([], 1))

    def test_path_allowed_forwarded(self) -> None:
        """A path under the executor is handed to the forwarder."""
        path = "/api/runtime/workspaces/ws1/managed-executors/e1/runs"
        self.h.router.worker_frame(self.worker, worker_request(path), 0)
        self.assertEqual([(c, p) for c, _, p in self.h.forwarded], [(self.worker, path)])

    def test_invalid_worker_frame(self) -> None:
        """An invalid worker frame is dropped silently and counted."""
        self.h.router.worker_frame(self.worker, e2ee(), 0)
        self.assertEqual((peer(self.worker).history, self.h.count("relay_frames_daemon_rejected")), ([], 1))


class EvictionTests(SynchronousTestCase):
    """Empty scope eviction (§4.7)."""

    def setUp(self) -> None:
        self.h = Harness({"RELAY_EMPTY_WORKSPACE_TTL_MS": "1000"})

    def test_evicted_after_ttl(self) -> None:
        """A scope empty since its last client left is evicted once the TTL has passed, not before."""
        self.h.close(self.h.client(), 500)
        self.h.router.evict_empty_scopes(1499)
        self.assertIsNotNone(self.h.registry.get(WS, RT))
        self.h.router.evict_empty_scopes(1500)
        self.assertIsNone(self.h.registry.get(WS, RT))
        self.assertEqual(self.h.count("relay_workspace_evictions"), 1)
        self.assertEqual(self.h.metrics.relay_workspaces_total._value.get(), 0)

    def test_daemon_scope_not_evicted(self) -> None:
        """A scope holding a daemon is never evicted."""
        self.h.daemon()
        self.h.router.evict_empty_scopes(10**9)
        self.assertIsNotNone(self.h.registry.get(WS, RT))

    def test_bus_frame_touches_scope(self) -> None:
        """A bus frame for an empty scope postpones its eviction."""
        self.h.close(self.h.client(), 0)
        self.h.bus(e2ee(), now=900)
        self.h.router.evict_empty_scopes(1000)
        self.assertIsNotNone(self.h.registry.get(WS, RT))

    def test_eviction_forgets_generation(self) -> None:
        """After eviction, a daemon with a lower generation than before is accepted."""
        self.h.close(self.h.daemon(daemon_issue_generation=5), 0)
        self.h.router.evict_empty_scopes(1000)
        self.assertTrue(self.h.daemon(daemon_issue_generation=1).registered)


class BusTests(SynchronousTestCase):
    """Frames from other relays (§6.8), with the reply path of §11 item 1 fixed."""

    def setUp(self) -> None:
        self.h = Harness()

    def test_client_to_daemon_forwarded(self) -> None:
        """A client frame from another relay reaches the local daemon verbatim."""
        daemon = self.h.daemon()
        payload = kex_init("k1")
        self.h.bus(payload)
        self.assertEqual(peer(daemon).payloads, [payload])
        self.assertEqual(self.h.count("relay_bus_frames_to_daemon"), 1)

    def test_client_to_daemon_without_daemon(self) -> None:
        """A client frame from the bus with no local daemon is dropped, counted, and the sender's relay is told."""
        self.h.bus(kex_init(), source="relay-b")
        self.assertEqual(self.h.count("relay_bus_frames_dropped"), 1)
        self.assertEqual(self.h.backplane.published, [
            BusFrame(WS, RT, "relay-a", "relay-b", "daemon_to_clients", frames.daemon_unavailable(WS, RT))])

    def test_kex_response_published_to_source_relay(self) -> None:
        """The daemon's answer to a remote key exchange is published back to the asking relay."""
        daemon = self.h.daemon()
        self.h.bus(kex_init("k1"), source="relay-b")
        response = kex_response("k1", "s1")
        self.h.router.daemon_frame(daemon, response, 1)
        self.assertEqual(self.h.backplane.published, [
            BusFrame(WS, RT, "relay-a", "relay-b", "daemon_to_clients", response.decode())])
        self.assertEqual(self.h.count("relay_key_exchange_response_routed_bus"), 1)

    def test_remote_session_frames_published(self) -> None:
        """Later session frames of a remote owner are published to its relay."""
        daemon = self.h.daemon()
        self.h.bus(kex_init("k1"), source="relay-b")
        self.h.router.daemon_frame(daemon, kex_response("k1", "s1"), 1)
        envelope = e2ee("s1")
        self.h.router.daemon_frame(daemon, envelope, 2)
        self.assertEqual(self.h.backplane.published[-1],
                         BusFrame(WS, RT, "relay-a", "relay-b", "daemon_to_clients", envelope.decode()))
        self.assertEqual(self.h.count("relay_session_frame_routed_bus"), 1)

    def test_pairing_response_published_to_source_relay(self) -> None:
        """The daemon's answer to a remote pairing request is published back to the asking relay."""
        daemon = self.h.daemon()
        self.h.bus(pairing_offer("r1"), source="relay-c")
        self.h.router.daemon_frame(daemon, pairing_response("r1"), 1)
        self.assertEqual([(f.target_relay_id, f.direction) for f in self.h.backplane.published],
                         [("relay-c", "daemon_to_clients")])

    def test_remote_session_kept_alive_by_bus_traffic(self) -> None:
        """Client frames arriving over the bus keep a remote owner's session alive like local ones."""
        daemon = self.h.daemon()
        self.h.bus(kex_init("k1"), now=0)
        self.h.router.daemon_frame(daemon, kex_response("k1", "s1"), 0)
        self.h.bus(e2ee("s1"), now=20 * MINUTE)
        self.h.router.daemon_frame(daemon, e2ee("s1"), 45 * MINUTE)
        self.assertEqual(len(self.h.backplane.published), 2)

    def test_daemon_to_clients_reaches_local_owner(self) -> None:
        """A daemon's answer over the bus reaches the local client that asked, and then its session frames."""
        self.h.backplane.presence[(WS, RT)] = Presence(WS, RT, "relay-b", B_URL, True)
        a, b = self.h.client(client_id="a"), self.h.client(client_id="b")
        self.h.router.client_frame(a, kex_init("k1"), 0)
        response, envelope = kex_response("k1", "s1"), e2ee("s1")
        self.h.bus(response, "daemon_to_clients", now=1)
        self.h.bus(envelope, "daemon_to_clients", now=2)
        self.assertEqual((peer(a).payloads, peer(b).frames), ([response, envelope], []))
        self.assertEqual(self.h.count("relay_bus_frames_to_clients"), 2)

    def test_daemon_to_clients_unknown_session(self) -> None:
        """A bus session frame for an unknown session reaches nobody and is not counted as delivered."""
        a = self.h.client()
        self.h.bus(e2ee("ghost"), "daemon_to_clients")
        self.assertEqual((peer(a).frames, self.h.count("relay_bus_frames_to_clients")), ([], 0))

    def test_missing_runtime_target_rejected(self) -> None:
        """A bus frame without a runtime target is rejected."""
        self.h.bus(kex_init(), rt="")
        self.assertEqual(self.h.count("relay_bus_frames_rejected"), 1)

    def test_invalid_client_payload_rejected(self) -> None:
        """A client_to_daemon bus frame that is no valid client frame is rejected, not forwarded."""
        daemon = self.h.daemon()
        for junk in (b"{", kex_response()):
            self.h.bus(junk)
        self.assertEqual((peer(daemon).frames, self.h.count("relay_bus_frames_rejected")), ([], 2))

    def test_invalid_daemon_payload_rejected(self) -> None:
        """A daemon_to_clients bus frame that is no valid daemon frame is rejected."""
        a = self.h.client()
        for junk in (b"[]", kex_init(), b'{"type":"ack"}'):
            self.h.bus(junk, "daemon_to_clients")
        self.assertEqual((peer(a).frames, self.h.count("relay_bus_frames_rejected")), ([], 3))

    def test_bus_daemon_limiter(self) -> None:
        """Bus daemon frames beyond the workspace's daemon bucket are dropped without closing anything."""
        h = Harness({"RELAY_DAEMON_RUNTIME_RATE_PER_MINUTE": "1"})
        viewer = h.client("session-events")
        h.router.client_frame(viewer, subscribe(), 0)
        h.bus(session_event(), "daemon_to_clients", now=1)
        h.bus(session_event(), "daemon_to_clients", now=2)
        self.assertEqual((len(peer(viewer).payloads), peer(viewer).closes), (1, []))
        self.assertEqual(h.count("relay_bus_frames_daemon_rate_limited"), 1)

    def test_bus_daemon_limiter_shared_with_local_daemon(self) -> None:
        """A local daemon's frames use up the bucket bus daemon frames of the workspace draw from."""
        h = Harness({"RELAY_DAEMON_RUNTIME_RATE_PER_MINUTE": "1"})
        h.key_exchange(h.client(), h.daemon())
        viewer = h.client("session-events", rt="rt2", client_id="v1")
        h.router.client_frame(viewer, subscribe(), 0)
        h.bus(session_event(), "daemon_to_clients", rt="rt2", now=1)
        self.assertEqual(h.count("relay_bus_frames_daemon_rate_limited"), 1)


class MetricsTests(SynchronousTestCase):
    """Counters move with the traffic they describe."""

    def test_render_after_forwarding(self) -> None:
        """The exposition shows a forwarded frame and a registered connection."""
        h = Harness()
        daemon, client = h.daemon(), h.client()
        h.router.client_frame(client, e2ee(), 0)
        h.router.daemon_frame(daemon, e2ee("ghost"), 0)
        text = h.metrics.render().decode()
        for line in ("relay_frames_client_to_daemon_total 1.0", "relay_frames_daemon_to_clients_total 1.0",
                     "relay_session_frame_dropped_total 1.0", "relay_ws_connections_opened_total 2.0",
                     "relay_connections_total 2.0"):
            self.assertIn(line + "\n", text)


class RemoteOrderingTests(SynchronousTestCase):
    """A client's frames for a daemon on another relay are published in the order they arrived."""

    def test_slow_presence_lookup_does_not_reorder(self) -> None:
        """The second frame waits for the first one's presence lookup, even if its own lookup is faster."""
        h = Harness({k: v for k, v in REDIS_ENV.items() if k != "RELAY_CLIENT_REDIRECT_ENABLED"})
        remote = Presence(WS, RT, "relay-b", B_URL, True)
        lookups: List[Deferred] = []

        def slow_resolve(workspace_id: str, runtime_target_id: Optional[str]) -> Deferred:
            d: Deferred = Deferred()
            lookups.append(d)
            return d

        conn = h.client()
        h.backplane.resolve_presence = slow_resolve  # type: ignore[method-assign]
        h.router.client_frame(conn, e2ee(seq=1), 0)
        h.router.client_frame(conn, e2ee(seq=2), 0)
        self.assertEqual(len(lookups), 1)
        lookups[0].callback(remote)
        self.assertEqual(len(lookups), 2)
        lookups[1].callback(remote)
        self.assertEqual([json.loads(f.payload)["seq"] for f in h.backplane.published], [1, 2])
        self.assertIsNone(conn.bus_queue)

    def _stalled_first_lookup(self, h: Harness) -> List[Deferred]:
        """The first presence lookup waits for the test; later ones answer at once from ``h.backplane.presence``."""
        lookups: List[Deferred] = []
        original = h.backplane.resolve_presence

        def resolve(workspace_id: str, runtime_target_id: Optional[str]) -> Deferred:
            if not lookups:
                d: Deferred = Deferred()
                lookups.append(d)
                return d
            return original(workspace_id, runtime_target_id)

        h.backplane.resolve_presence = resolve  # type: ignore[method-assign]
        return lookups

    def test_long_queue_answered_without_recursion(self) -> None:
        """Thousands of frames queued behind a slow lookup are each answered when lookups then answer at once."""
        env = {k: v for k, v in REDIS_ENV.items() if k != "RELAY_CLIENT_REDIRECT_ENABLED"}
        h = Harness({**env, "RELAY_RUNTIME_RATE_PER_MINUTE": "100000", "RELAY_RUNTIME_RATE_PER_MINUTE_WORKSPACE": "100000"})
        conn = h.client()
        lookups = self._stalled_first_lookup(h)
        for seq in range(1, 3002):
            h.router.client_frame(conn, e2ee(seq=seq), 0)
        lookups[0].callback(None)
        self.assertEqual(len(peer(conn).texts), 3001)
        self.assertIsNone(conn.bus_queue)

    def test_waiting_frames_go_to_a_daemon_that_connected_meanwhile(self) -> None:
        """Frames waiting for a remote route are delivered, in order, to a daemon that connected here meanwhile."""
        h = Harness({k: v for k, v in REDIS_ENV.items() if k != "RELAY_CLIENT_REDIRECT_ENABLED"})
        conn = h.client()
        lookups = self._stalled_first_lookup(h)
        h.router.client_frame(conn, e2ee(seq=1), 0)
        h.router.client_frame(conn, e2ee(seq=2), 0)
        daemon = h.daemon()
        h.router.client_frame(conn, e2ee(seq=3), 0)
        self.assertEqual(peer(daemon).payloads, [])
        lookups[0].callback(None)
        self.assertEqual([json.loads(p)["seq"] for p in peer(daemon).payloads], [1, 2, 3])
        self.assertEqual(peer(conn).texts, [])


class RemotePathTests(SynchronousTestCase):
    """Clients whose daemon is on another relay are told when their path breaks (issue: faults without silent loss)."""

    def setUp(self) -> None:
        self.h = Harness()
        self.h.backplane.presence[(WS, RT)] = Presence(WS, RT, "relay-b", B_URL, True)

    def test_lost_inbound_path_tells_clients_of_remote_daemons_once(self) -> None:
        """When the backplane loses its inbound path, clients with a remote daemon get DAEMON_UNAVAILABLE, once per outage."""
        remote = self.h.client(client_id="remote")
        local_daemon = self.h.daemon(rt="rt2")
        local = self.h.client(client_id="local", rt="rt2")
        self.h.router.path_changed(False, 1)
        self.h.router.path_changed(False, 2)
        self.assertEqual(peer(remote).texts, [frames.daemon_unavailable(WS, RT)])
        self.assertEqual((peer(local).texts, peer(local_daemon).texts), ([], []))
        self.h.router.path_changed(True, 3)
        self.h.router.path_changed(False, 4)
        self.assertEqual(len(peer(remote).texts), 2)

    def test_dead_relay_is_noticed_for_an_idle_client(self) -> None:
        """A client that never sent anything learns nothing, but the liveness check tells it when its daemon's relay died."""
        idle = self.h.client()
        self.assertEqual(self.h.registry.get(WS, RT).remote_daemon_relay, "relay-b")  # type: ignore[union-attr]
        self.h.router.check_remote_relays(1000)
        self.assertEqual(peer(idle).texts, [])
        self.h.backplane.dead.add("relay-b")
        self.h.router.check_remote_relays(2000)
        self.assertEqual(peer(idle).texts, [frames.daemon_unavailable(WS, RT)])
        self.h.router.check_remote_relays(3000)
        self.assertEqual(len(peer(idle).texts), 1)
        self.assertEqual((self.h.count("relay_remote_relay_dead"), self.h.backplane.presence), (1, {}))

    def test_a_daemon_moving_here_tells_clients_their_sessions_are_gone(self) -> None:
        """When the daemon of a scope whose clients used it on another relay connects here, those clients are told to re-key."""
        client = self.h.client()
        self.h.daemon()
        self.assertEqual(peer(client).texts, [frames.daemon_unavailable(WS, RT)])
        self.assertIsNone(self.h.registry.get(WS, RT).remote_daemon_relay)  # type: ignore[union-attr]

    def test_lost_daemon_frames_owe_the_remote_clients_a_notice(self) -> None:
        """A daemon frame for a session owned on relay-b that cannot be published is counted; relay-b's clients are told once it can."""
        del self.h.backplane.presence[(WS, RT)]
        daemon = self.h.daemon()
        self.h.bus(kex_init("k1"), source="relay-b")
        self.h.router.daemon_frame(daemon, kex_response("k1", "s1"), 1)
        self.h.backplane.publish_result = False
        self.h.router.daemon_frame(daemon, e2ee("s1"), 2)
        self.h.router.check_remote_relays(1000)
        self.assertEqual(self.h.count("relay_bus_daemon_frames_lost"), 1)
        self.h.backplane.publish_result = True
        self.h.backplane.published.clear()
        self.h.router.path_changed(False, 1500)
        self.h.router.path_changed(True, 2000)
        self.assertEqual(self.h.backplane.published, [
            BusFrame(WS, RT, "relay-a", "relay-b", "daemon_to_clients", frames.daemon_unavailable(WS, RT))])
        self.h.router.check_remote_relays(3000)
        self.assertEqual(len(self.h.backplane.published), 1)
        self.assertEqual(self.h.count("relay_bus_loss_notices_sent"), 1)


class WarningBudgetTests(SynchronousTestCase):
    """A peer sending garbage cannot flood the log: warnings are budgeted per event name per heartbeat tick."""

    def test_warnings_beyond_budget_are_counted_not_logged(self) -> None:
        """Past the budget, invalid frames are still answered but logged once as a suppressed count."""
        from twisted.logger import globalLogPublisher

        from viewport.relay.router import WARNINGS_PER_TICK

        h = Harness({"RELAY_RUNTIME_RATE_PER_MINUTE": "100000"})
        conn = h.client()
        seen: List[dict] = []
        globalLogPublisher.addObserver(seen.append)
        try:
            for _ in range(WARNINGS_PER_TICK + 7):
                h.router.client_frame(conn, b"garbage", 0)
            h.router.reset_log_budget()
        finally:
            globalLogPublisher.removeObserver(seen.append)
        events = [e.get("relay_event") for e in seen]
        self.assertEqual(events.count("client_frame_rejected"), WARNINGS_PER_TICK)
        suppressed = [e for e in seen if e.get("relay_event") == "log_events_suppressed"]
        self.assertEqual(suppressed[0]["counts"], [("client_frame_rejected", 7)])
        self.assertEqual(len(peer(conn).texts), WARNINGS_PER_TICK + 7)
