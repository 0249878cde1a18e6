"""
The upgrade path over in-memory sockets: ``HandshakeDispatcher``'s and ``UpgradeGate``'s refusals, Autobahn's
handshake checks, admission (local and platform) and the client cap, with the status each peer reads and the
counter each refusal moves (docs/protocol.md §2.3); plain HTTP handed to the site (§8).
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from tests.support import token
from tests.test_socket_layer import HeldPlatform, RawPeer, RelayHarness, platform_admission, upgrade_head, ws_target

ADMIN_TOKEN = "admin-token-for-socket-tests-0123"

#: Every counter an upgrade refusal can move.
REFUSAL_COUNTERS = (
    "relay_upgrade_rate_limited_total",
    "relay_upgrade_rejected_total_connections_total",
    "relay_upgrade_rejected_ip_connections_total",
    "relay_upgrade_rejected_origin_total",
    "relay_upgrade_invalid_query_total",
    "relay_upgrade_missing_auth_total",
    "relay_admission_denied_total",
    "relay_admission_ok_total",
    "relay_upgrade_rejected_workspace_clients_total",
    "relay_upgrade_errors_total",
)


def bearer(role: str = "client", workspace: str = "w1", runtime_target: str = "rt1", **claims: Any) -> str:
    """An ``Authorization`` header line with a token minted at clock time 0."""
    return f"Authorization: Bearer {token(role, workspace, runtime_target, now=0, **claims)}"


def bare(status: int, phrase: str) -> bytes:
    """A bare refusal: the status line, no header, no body."""
    return f"HTTP/1.1 {status} {phrase}\r\n\r\n".encode("ascii")


class RefusalCase(SynchronousTestCase):
    """Shared assertions."""

    harness: RelayHarness

    def moved(self) -> Dict[str, int]:
        """The refusal counters that are not zero."""
        return {name: self.harness.count(name) for name in REFUSAL_COUNTERS if self.harness.count(name)}

    def assertRefused(self, peer: RawPeer, status: int, phrase: str) -> None:
        """The peer read exactly a bare refusal, and the relay closed the socket."""
        self.assertEqual(peer.received, bare(status, phrase))
        self.assertTrue(peer.lost, "the relay left the socket open")


class DispatcherTests(RefusalCase):
    """What ``HandshakeDispatcher`` decides from the request head alone."""

    def setUp(self) -> None:
        self.harness = RelayHarness(self)

    def test_malformed_head_is_a_bare_400(self) -> None:
        """A request line that is not three parts, or a header line without a colon, is a bare 400."""
        for head in (b"GET /ws\r\nUpgrade: websocket\r\n\r\n", b"GET /ws HTTP/1.1\r\nUpgrade websocket\r\n\r\n"):
            self.assertRefused(self.harness.raw(head), 400, "Bad Request")
        self.assertEqual(self.moved(), {})

    def test_head_not_complete_within_ten_seconds_is_dropped_silently(self) -> None:
        """A head still incomplete 10 s after connecting is aborted with nothing written; 9.999 s is not enough."""
        peer = self.harness.raw(b"GET /ws?role=client HTTP/1.1\r\nUpgrade: websocket\r\n")
        self.harness.advance_to(9.999)
        self.assertFalse(peer.lost)
        self.harness.advance_to(10.0)
        self.assertTrue(peer.lost)
        self.assertEqual(peer.received, b"")

    def test_silent_connection_is_dropped_after_ten_seconds(self) -> None:
        """A socket that sends nothing at all is dropped at the same deadline."""
        peer = self.harness.raw()
        self.harness.advance_to(10.0)
        self.assertTrue(peer.lost)
        self.assertEqual(peer.received, b"")

    def test_head_growing_past_16_kib_is_431_before_it_ends(self) -> None:
        """A head that passes 16 KiB without its blank line is refused 431 while it is still arriving."""
        peer = self.harness.raw(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n")
        for _ in range(17):
            peer.send(b"X-Padding: " + b"p" * 1000 + b"\r\n")
            self.harness.flush()
        self.assertRefused(peer, 431, "Request Header Fields Too Large")

    def test_wrong_path_is_dropped_without_a_byte(self) -> None:
        """An upgrade to any path but ``/ws`` is aborted: nothing written, nothing counted."""
        for target in ("/", "/ws/", "/WS?role=client&workspaceId=w1", "/other?role=client&workspaceId=w1"):
            peer = self.harness.raw(upgrade_head(target, bearer()))
            self.assertEqual(peer.received, b"", target)
            self.assertTrue(peer.lost, target)
        self.assertEqual(self.moved(), {})

    def test_invalid_query_is_400_and_counted(self) -> None:
        """Missing or unknown role, a bad workspace id, an empty runtimeTargetId: a bare 400 each, each counted."""
        targets = [
            "/ws?workspaceId=w1",
            "/ws?role=admin&workspaceId=w1",
            "/ws?role=client",
            "/ws?role=client&workspaceId=w%201",
            "/ws?role=client&workspaceId=" + "w" * 129,
            "/ws?role=client&workspaceId=w1&runtimeTargetId=",
        ]
        for target in targets:
            self.assertRefused(self.harness.raw(upgrade_head(target, bearer())), 400, "Bad Request")
        self.assertEqual(self.moved(), {"relay_upgrade_invalid_query_total": len(targets)})

    def test_missing_or_unusable_token_is_401_and_counted(self) -> None:
        """No token, a too-short Bearer, an empty ``auth.`` entry: a bare 401, counted, no admission attempted."""
        heads = [
            upgrade_head(),
            upgrade_head(ws_target("client", "w1", "rt1"), "Authorization: Bearer short"),
            upgrade_head(ws_target("client", "w1", "rt1"), "Authorization: Basic dXNlcjpwYXNzd29yZA=="),
            upgrade_head(ws_target("client", "w1", "rt1"), "Sec-WebSocket-Protocol: viewport-relay-v1, auth."),
        ]
        for head in heads:
            self.assertRefused(self.harness.raw(head), 401, "Unauthorized")
        self.assertEqual(self.moved(), {"relay_upgrade_missing_auth_total": len(heads)})

    def test_autobahn_handshake_refusals_carry_no_body(self) -> None:
        """Method, HTTP version, key and WebSocket version are Autobahn's checks: 405, 505, 400; never an admission."""
        cases = [
            (upgrade_head(ws_target("client", "w1", "rt1"), bearer(), method="POST"), bare(405, "Method Not Allowed")),
            (upgrade_head(ws_target("client", "w1", "rt1"), bearer(), version="HTTP/1.0"),
             bare(505, "HTTP Version Not Supported")),
            (upgrade_head(ws_target("client", "w1", "rt1"), bearer(), key=None), bare(400, "Bad Request")),
            (upgrade_head(ws_target("client", "w1", "rt1"), bearer(), key="too-short"), bare(400, "Bad Request")),
            (upgrade_head(ws_target("client", "w1", "rt1"), bearer(), ws_version="12"),
             b"HTTP/1.1 400 Bad Request\r\nSec-WebSocket-Version: 13,8\r\n\r\n"),
        ]
        for head, answer in cases:
            peer = self.harness.raw(head)
            self.assertEqual(peer.received, answer)
            self.assertTrue(peer.lost)
        refused = self.harness.logged("handshake_refused")
        self.assertEqual([event["status"] for event in refused], [405, 505, 400, 400, 400])
        self.assertEqual(self.moved(), {})

    def test_plain_http_goes_to_the_site(self) -> None:
        """A request without ``Upgrade`` is served by the site: /health with the uptime on the relay's clock."""
        self.harness.advance_to(2.5)
        peer = self.harness.raw(b"GET /health HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        status, headers, body = peer.http_response()
        self.assertEqual((status, headers["content-type"], headers["server"]),
                         (200, "application/json", "viewport-relay"))
        answer = json.loads(body)
        self.assertEqual((answer["ok"], answer["service"], answer["uptimeMs"]), (True, "relay", 2500))
        self.assertTrue(peer.lost)

    def test_get_ws_without_upgrade_and_unknown_routes_are_404(self) -> None:
        """``GET /ws`` without ``Upgrade``, an unknown path and ``HEAD /health`` are 404 ``NOT_FOUND``."""
        for request in (b"GET /ws HTTP/1.1", b"GET /nowhere HTTP/1.1", b"POST /health HTTP/1.1"):
            peer = self.harness.raw(request + b"\r\nHost: relay\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            status, _, body = peer.http_response()
            self.assertEqual((status, json.loads(body)), (404, {"ok": False, "reason": "NOT_FOUND"}), request)

    def test_accepted_upgrade_echoes_the_plain_subprotocol(self) -> None:
        """A browser's ``viewport-relay-v1, auth.<token>`` offer opens with ``viewport-relay-v1`` echoed."""
        minted = token("client", "w1", "rt1", now=0)
        peer = self.harness.raw(upgrade_head(
            ws_target("client", "w1", "rt1"), f"Sec-WebSocket-Protocol: viewport-relay-v1, auth.{minted}"
        ))
        head = peer.received.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower().split("\r\n")
        self.assertEqual(head[0], "http/1.1 101 switching protocols")
        self.assertIn("sec-websocket-protocol: viewport-relay-v1", head)
        self.assertNotIn(minted.lower(), peer.received.decode("latin-1").lower())
        self.assertEqual(self.moved(), {"relay_admission_ok_total": 1})
        self.assertEqual(self.harness.open_sockets(), 1)

    def test_an_open_socket_keeps_neither_the_request_head_nor_the_token(self) -> None:
        """Once open, the socket has dropped the head, its parsed parts and the upgrade decision (token included)."""
        minted = token("client", "w1", "rt1", now=0)
        self.harness.raw(upgrade_head(
            ws_target("client", "w1", "rt1"), f"Sec-WebSocket-Protocol: viewport-relay-v1, auth.{minted}"
        ))
        (socket,) = list(self.harness.relay.sockets)
        kept = {name for name in ("http_request_data", "http_headers", "http_request_params", "websocket_protocols",
                                  "upgrade") if name in vars(socket)}
        self.assertEqual(kept, set())
        self.assertNotIn(minted, repr(vars(socket)))
        self.assertEqual(socket.websocket_version, 13)


class GateLimitTests(RefusalCase):
    """The upgrade rate, the connection caps and the origin policy, with their own settings."""

    def test_upgrade_rate_counts_every_attempt_and_resets_after_a_minute(self) -> None:
        """At 2 a minute the third attempt from an IP is 429 (refused ones count too); another IP, a new window pass."""
        self.harness = RelayHarness(self, {"RELAY_UPGRADE_RATE_PER_MINUTE": "2"})
        self.harness.raw(upgrade_head("/elsewhere", bearer()))
        self.harness.open("client", "w1", "rt1")
        self.assertRefused(self.harness.raw(upgrade_head(ws_target("client", "w1", "rt1"), bearer())), 429,
                           "Too Many Requests")
        self.harness.open("client", "w1", "rt1", ip="10.0.0.8")
        self.harness.advance_to(59.999)
        self.assertRefused(self.harness.raw(upgrade_head(ws_target("client", "w1", "rt1"), bearer())), 429,
                           "Too Many Requests")
        self.harness.advance_to(60.0)
        self.harness.open("client", "w1", "rt1")
        self.assertEqual(self.moved(), {"relay_upgrade_rate_limited_total": 2, "relay_admission_ok_total": 3})

    def test_total_connection_cap_is_503(self) -> None:
        """At RELAY_MAX_TOTAL_CONNECTIONS registered sockets an upgrade from anywhere is 503; a close makes room."""
        self.harness = RelayHarness(self, {"RELAY_MAX_TOTAL_CONNECTIONS": "1"})
        daemon, _ = self.harness.open("workspace-daemon", "w1", "rt1")
        self.assertRefused(self.harness.raw(upgrade_head(ws_target("client", "w1", "rt1"), bearer()), ip="10.0.0.9"),
                           503, "Service Unavailable")
        self.assertEqual(self.harness.count("relay_upgrade_rejected_total_connections_total"), 1)
        daemon.sendClose(1000)
        self.harness.flush()
        self.harness.open("client", "w1", "rt1", ip="10.0.0.9")

    def test_per_ip_cap_is_429(self) -> None:
        """At RELAY_MAX_CONNECTIONS_PER_IP open sockets from an IP its next upgrade is 429; other IPs still open."""
        self.harness = RelayHarness(self, {"RELAY_MAX_CONNECTIONS_PER_IP": "1"})
        self.harness.open("workspace-daemon", "w1", "rt1")
        self.assertRefused(self.harness.raw(upgrade_head(ws_target("client", "w1", "rt1"), bearer())), 429,
                           "Too Many Requests")
        self.harness.open("client", "w1", "rt1", ip="10.0.0.8")
        self.assertEqual(self.moved(), {"relay_upgrade_rejected_ip_connections_total": 1,
                                        "relay_admission_ok_total": 2})

    def test_origin_outside_the_allowed_list_is_403(self) -> None:
        """With RELAY_ALLOWED_ORIGINS set, a foreign Origin is 403 before admission; the listed one and none pass."""
        self.harness = RelayHarness(self, {"RELAY_ALLOWED_ORIGINS": "https://app.example.com"})
        target = ws_target("client", "w1", "rt1")
        for origin in ("https://evil.example", "null", "https://app.example.com.evil.example"):
            self.assertRefused(self.harness.raw(upgrade_head(target, bearer(), f"Origin: {origin}")), 403, "Forbidden")
        self.harness.open("client", "w1", "rt1", headers={"Origin": "https://APP.example.com:443"})
        self.harness.open("client", "w1", "rt1")
        self.assertEqual(self.moved(), {"relay_upgrade_rejected_origin_total": 3, "relay_admission_ok_total": 2})

    def test_query_token_is_refused_outside_dev_mode(self) -> None:
        """In staging a valid token in the query is a 401, counted as missing auth."""
        self.harness = RelayHarness(self, {"RELAY_MODE": "staging"})
        query_token = token("client", "w1", "rt1", now=0)
        peer = self.harness.raw(upgrade_head(ws_target("client", "w1", "rt1", token=query_token)))
        self.assertRefused(peer, 401, "Unauthorized")
        self.assertEqual(self.moved(), {"relay_upgrade_missing_auth_total": 1})

    def test_query_token_admits_in_dev_mode(self) -> None:
        """In dev mode the same query token is admitted."""
        self.harness = RelayHarness(self, {"RELAY_MODE": "dev"})
        query_token = token("client", "w1", "rt1", now=0)
        peer = self.harness.raw(upgrade_head(ws_target("client", "w1", "rt1", token=query_token)))
        self.assertTrue(peer.received.startswith(b"HTTP/1.1 101 "))
        self.assertEqual(self.moved(), {"relay_admission_ok_total": 1})


class AdmissionTests(RefusalCase):
    """After Autobahn's checks: local admission, the client cap, and the claims checked after the 101."""

    def setUp(self) -> None:
        self.harness = RelayHarness(self, {"RELAY_MAX_CLIENTS_PER_WORKSPACE": "1"})

    def test_denied_tokens_are_a_bare_401_with_the_reason_logged(self) -> None:
        """A forged, an expired and a wrong-role token: 401 each, counted, the reason in the log but not the token."""
        forged = token("client", "w1", "rt1", now=0, key="another-secret-0123456789abcdef0123456789")
        expired = token("client", "w1", "rt1", now=-7200, ttl=60)
        wrong_role = token("workspace-daemon", "w1", "rt1", now=0)
        for minted in (forged, expired, wrong_role):
            peer = self.harness.raw(upgrade_head(ws_target("client", "w1", "rt1"), f"Authorization: Bearer {minted}"))
            self.assertRefused(peer, 401, "Unauthorized")
        self.assertEqual(self.moved(), {"relay_admission_denied_total": 3})
        denied = self.harness.logged("admission_denied")
        self.assertEqual([event["reason"] for event in denied],
                         ["INVALID_SIGNATURE", "TOKEN_EXPIRED", "ROLE_CLAIM_MISMATCH"])
        # The internal status is logged (403 for the role mismatch); the peer reads 401 whatever it is.
        self.assertEqual([event["status"] for event in denied], [401, 401, 403])
        text = repr([dict(event) for event in self.harness.events])
        for minted in (forged, expired, wrong_role):
            self.assertNotIn(minted.rsplit(".", 1)[1], text)

    def test_client_cap_of_a_scope_is_429_after_admission(self) -> None:
        """A second client of a full scope is 429 (counted once admitted); another target and the daemon still open."""
        self.harness.open("client", "w1", "rt1")
        peer = self.harness.raw(upgrade_head(ws_target("client", "w1", "rt1"), bearer()), ip="10.0.0.8")
        self.assertRefused(peer, 429, "Too Many Requests")
        self.harness.open("client", "w1", "rt2", ip="10.0.0.8")
        self.harness.open("workspace-daemon", "w1", "rt1", ip="10.0.0.8")
        self.assertEqual(self.moved(), {"relay_upgrade_rejected_workspace_clients_total": 1,
                                        "relay_admission_ok_total": 4})
        self.assertEqual(self.harness.open_sockets(), 3)

    def test_claims_not_matching_the_query_close_4008_after_the_upgrade(self) -> None:
        """A token for another workspace opens (admission checks the role only), then is closed 4008 unregistered."""
        peer, _ = self.harness.connect("client", "w1", "rt1", bearer=token("client", "w2", "rt1", now=0))
        self.assertTrue(peer.opened)
        self.assertEqual(peer.closed_with, (True, 4008, "workspace claim mismatch"))
        self.assertEqual(self.harness.count("relay_ws_connections_rejected_total"), 1)
        self.assertEqual(self.harness.open_sockets(), 0)


def get(path: str, *headers: str) -> bytes:
    """A plain HTTP request that asks the relay to close after answering."""
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: relay", "Connection: close", *headers, "", ""]).encode("latin-1")


class WebRouteTests(SynchronousTestCase):
    """The site behind the dispatcher (``web.RelayRoot``): readiness and the admin gate, on the relay's clock."""

    def admin_relay(self) -> RelayHarness:
        """A relay with the admin routes on and ``ADMIN_TOKEN``."""
        return RelayHarness(self, {"RELAY_ENABLE_ADMIN_HTTP": "1", "RELAY_ADMIN_TOKEN": ADMIN_TOKEN,
                                   "RELAY_STATE_INCLUDE_CLIENT_IDS": "0"})

    def test_admin_routes_are_404_while_disabled(self) -> None:
        """Without RELAY_ENABLE_ADMIN_HTTP every admin route is 404 ``ADMIN_ENDPOINTS_DISABLED``, token or not."""
        harness = RelayHarness(self, {"RELAY_ADMIN_TOKEN": ADMIN_TOKEN})
        for path in ("/state", "/logs", "/metrics", "/admin", "/admin/status"):
            status, _, body = harness.raw(get(path, f"Authorization: Bearer {ADMIN_TOKEN}")).http_response()
            self.assertEqual((status, json.loads(body)), (404, {"ok": False, "reason": "ADMIN_ENDPOINTS_DISABLED"}),
                             path)

    def test_admin_gate_asks_for_the_token_and_counts_refusals(self) -> None:
        """No token or a wrong one: 401 ``ADMIN_UNAUTHORIZED`` with a Basic challenge, each counted."""
        harness = self.admin_relay()
        for headers in ((), ("Authorization: Bearer not-the-token",), ("X-Relay-Admin-Token: nope",)):
            status, found, body = harness.raw(get("/metrics", *headers)).http_response()
            self.assertEqual((status, json.loads(body)), (401, {"ok": False, "reason": "ADMIN_UNAUTHORIZED"}))
            self.assertTrue(found["www-authenticate"].startswith("Basic "))
        self.assertEqual(harness.count("relay_admin_unauthorized_total"), 3)

    def test_metrics_with_bearer_and_state_with_basic(self) -> None:
        """The token as Bearer opens /metrics (Prometheus text), as a Basic password /state (times on the relay's clock)."""
        harness = self.admin_relay()
        harness.advance_to(5.0)
        harness.open("workspace-daemon", "w1", "rt1")
        status, found, body = harness.raw(get("/metrics", f"Authorization: Bearer {ADMIN_TOKEN}")).http_response()
        self.assertEqual((status, found["content-type"]), (200, "text/plain; version=0.0.4; charset=utf-8"))
        self.assertIn(b"\nrelay_ws_connections_opened_total 1.0\n", body)
        basic = base64.b64encode(f"admin:{ADMIN_TOKEN}".encode()).decode()
        status, _, body = harness.raw(get("/state", f"Authorization: Basic {basic}")).http_response()
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["workspaces"], [{
            "workspaceId": "w1", "runtimeTargetId": "rt1", "daemonConnected": True, "clientCount": 0,
            "lastActivityAt": "1970-01-01T00:00:05.000Z",
        }])

    def test_ready_follows_the_gate(self) -> None:
        """/ready is 200 while the relay accepts upgrades, 503 ``SHUTTING_DOWN`` once it drains."""
        harness = RelayHarness(self)
        status, _, body = harness.raw(get("/ready")).http_response()
        self.assertEqual((status, json.loads(body)), (200, {"ok": True, "ready": True, "backplaneMode": "single"}))
        harness.relay.shutdown(1.0)
        status, _, body = harness.raw(get("/ready")).http_response()
        self.assertEqual((status, json.loads(body)), (503, {"ok": False, "ready": False, "reason": "SHUTTING_DOWN"}))


class PlatformAdmissionTests(RefusalCase):
    """Admission by a platform that takes its time: the deadline runs on the relay's clock."""

    TIMEOUT_MS = 300

    def setUp(self) -> None:
        self.platform = HeldPlatform()
        self.stub = StubTreq(self.platform)
        self.harness = RelayHarness(
            self, {"SERVER_URL": "http://platform.test", "RELAY_ADMISSION_TIMEOUT_MS": str(self.TIMEOUT_MS)},
            admission=platform_admission(self.stub, self.TIMEOUT_MS), secret=False,
        )

    def test_platform_that_never_answers_is_401_at_the_admission_timeout(self) -> None:
        """Nothing is answered before RELAY_ADMISSION_TIMEOUT_MS; then the peer reads a bare 401, logged as a 504."""
        peer = self.harness.raw(upgrade_head(ws_target("workspace-daemon", "pw", "rt1"), "Authorization: Bearer tok-stalled"))
        self.stub.flush()
        self.assertEqual(len(self.platform.waiting), 1)
        self.harness.advance_to(0.299)
        self.assertEqual((peer.received, peer.lost), (b"", False))
        self.harness.advance_to(0.3)
        self.assertRefused(peer, 401, "Unauthorized")
        denied = self.harness.logged("admission_denied")[-1]
        self.assertEqual((denied["status"], denied["reason"]), (504, "admission request timed out after 300ms"))
        self.assertEqual(self.moved(), {"relay_admission_denied_total": 1})
        self.stub.flush()

    def test_platform_answer_within_the_deadline_opens(self) -> None:
        """An answer just before the deadline opens the socket, and the deadline leaves no timer behind."""
        peer = self.harness.raw(upgrade_head(ws_target("workspace-daemon", "pw", "rt1"), "Authorization: Bearer tok-late-ok"))
        self.stub.flush()
        self.harness.advance_to(0.299)
        self.platform.admit_all({"workspaceId": "pw", "runtimeTargetId": "rt1", "role": "workspace-daemon"})
        self.stub.flush()
        self.harness.flush()
        self.assertTrue(peer.received.startswith(b"HTTP/1.1 101 "))
        self.assertEqual(self.harness.open_sockets(), 1)
        self.harness.advance_to(1.0)
        self.assertFalse(peer.lost)
