"""End-to-end: HTTP routes, platform admission and worker transport of a real relay process."""

from __future__ import annotations

import json
from typing import Any, Dict

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.server import Site

from tests.fake_platform import AdmissionPlatform
from tests.support import (
    ADMIN_TOKEN,
    RelayProcess,
    e2e_env,
    fetch_metrics,
    http_request,
    kex_init,
    kex_response,
    open_peer,
    open_with,
    refused_status,
    start_relays,
    stop_all,
    stop_relays,
    token,
)
from viewport.client import is_status

COUNTERS = """
relay_upgrade_rate_limited_total relay_upgrade_rejected_total_connections_total
relay_upgrade_rejected_ip_connections_total relay_upgrade_invalid_query_total relay_upgrade_missing_auth_total
relay_upgrade_rejected_workspace_clients_total relay_admission_ok_total relay_admission_denied_total
relay_client_redirect_total relay_upgrade_errors_total relay_admin_unauthorized_total
relay_ws_connections_opened_total relay_ws_connections_closed_total relay_ws_connections_rejected_total
relay_ws_frame_too_large_total relay_ws_idle_terminated_total relay_ws_stale_terminated_total
relay_ws_slow_client_terminated_total relay_workspace_evictions_total relay_frames_client_rejected_total
relay_frames_client_rejected_scope_total relay_frames_client_rejected_profile_mismatch_total
relay_frames_client_kex_rate_limited_total relay_frames_client_runtime_rate_limited_total
relay_frames_client_pairing_rate_limited_total relay_frames_client_to_daemon_total relay_bytes_client_to_daemon_total
relay_client_messages_dropped_total relay_client_messages_routed_bus_total relay_frames_daemon_rate_limited_total
relay_frames_daemon_rejected_total relay_frames_daemon_rejected_profile_mismatch_total
relay_frames_daemon_to_clients_total relay_bytes_daemon_to_clients_total
relay_key_exchange_response_routed_local_total relay_key_exchange_response_routed_bus_total
relay_key_exchange_response_dropped_total relay_pairing_response_routed_local_total
relay_pairing_response_routed_bus_total relay_pairing_response_dropped_total relay_session_frame_routed_local_total
relay_session_frame_routed_bus_total relay_session_frame_dropped_total relay_session_event_subscribed_total
relay_session_event_unsubscribed_total relay_session_event_subscribe_rejected_total
relay_session_event_frame_delivered_total relay_session_event_frame_dropped_total
relay_session_viewer_presence_fanned_total relay_session_viewer_presence_no_peers_total
relay_session_viewer_presence_rejected_total relay_session_viewer_presence_rate_limited_total
relay_worker_transport_forwarded_total relay_worker_transport_rejected_total
relay_worker_transport_forward_failed_total relay_bus_frames_to_daemon_total relay_bus_frames_to_clients_total
relay_bus_frames_dropped_total relay_bus_frames_rejected_total relay_bus_frames_daemon_rate_limited_total
relay_bus_publish_ok_total relay_bus_publish_failed_total relay_bus_pull_ok_total relay_bus_pull_failed_total
relay_bus_pull_frame_too_large_total relay_bus_pull_invalid_signature_total relay_bus_pull_stale_signature_total
relay_bus_pull_replayed_signature_total relay_presence_upsert_ok_total relay_presence_upsert_failed_total
relay_presence_resolve_ok_total relay_presence_resolve_failed_total
""".split()
GAUGES = ["relay_connections_total", "relay_workspaces_total"]
ADMISSION_TIMEOUT_MS = 300
ADMISSION_MAX_RESPONSE_BYTES = 4096
EXECUTOR_PREFIX = "/api/runtime/workspaces/pw/managed-executors/me1"


@pytest.fixture(scope="module")
def env() -> Any:
    """A fake platform on 127.0.0.1 and four relays: admin on, admin off, staging, and platform admission."""
    platform = AdmissionPlatform(ADMISSION_MAX_RESPONSE_BYTES)
    port = reactor.listenTCP(0, Site(platform), interface="127.0.0.1")  # type: ignore[attr-defined, arg-type]
    server_url = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
    procs: Dict[str, RelayProcess] = {
        "admin": RelayProcess(e2e_env()),
        "closed": RelayProcess({"RELAY_HEALTH_VERBOSE": "0"}),
        "staging": RelayProcess(e2e_env(RELAY_MODE="staging")),
        "platform": RelayProcess(
            e2e_env(
                SERVER_URL=server_url,
                RELAY_ADMISSION_TIMEOUT_MS=str(ADMISSION_TIMEOUT_MS),
                RELAY_ADMISSION_MAX_RESPONSE_BYTES=str(ADMISSION_MAX_RESPONSE_BYTES),
            ),
            unset=["RELAY_TOKEN_SECRET"],
        ),
    }
    try:
        pytest_twisted.blockon(start_relays(*procs.values()))
        yield {"api": platform, **procs}
        pytest_twisted.blockon(stop_relays(*procs.values()))
    finally:
        platform.release()
        pytest_twisted.blockon(port.stopListening())


def admin(via: str = "bearer", value: str = ADMIN_TOKEN) -> Dict[str, str]:
    """Admin credentials as a Bearer header or an X-Relay-Admin-Token header."""
    return {"Authorization": f"Bearer {value}"} if via == "bearer" else {"X-Relay-Admin-Token": value}


# -- plain routes -----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_health_is_open_and_verbose_in_dev(env: Any) -> Any:
    """GET /health needs no credentials; dev mode adds tlsEnabled, relayMode and relayId, non-verbose omits them."""
    status, headers, body = yield http_request("GET", env["admin"].http_url + "/health")
    assert (status, headers["content-type"]) == (200, "application/json")
    health = json.loads(body)
    assert (health["ok"], health["service"], health["tlsEnabled"], health["relayMode"]) == (True, "relay", False, "dev")
    assert isinstance(health["uptimeMs"], int) and health["uptimeMs"] >= 0
    assert health["relayId"].startswith("127.0.0.1:")
    status, _, body = yield http_request("GET", env["closed"].http_url + "/health")
    assert status == 200
    assert set(json.loads(body)) == {"ok", "service", "uptimeMs"}


@pytest_twisted.inlineCallbacks
def test_admin_routes_are_404_when_disabled(env: Any) -> Any:
    """With admin HTTP off, /state, /logs and /metrics answer 404 ADMIN_ENDPOINTS_DISABLED even with a token."""
    for path in ("/state", "/logs", "/metrics"):
        status, headers, body = yield http_request("GET", env["closed"].http_url + path, admin())
        assert (status, headers["content-type"]) == (404, "application/json")
        assert json.loads(body) == {"ok": False, "reason": "ADMIN_ENDPOINTS_DISABLED"}


@pytest_twisted.inlineCallbacks
def test_admin_token_is_required_in_either_header(env: Any) -> Any:
    """Admin routes accept the token as Bearer or X-Relay-Admin-Token and answer 401 ADMIN_UNAUTHORIZED otherwise."""
    relay = env["admin"]
    before = yield fetch_metrics(relay)
    for headers in ({}, admin("bearer", "wrong-token"), admin("header", "wrong-token"), {"Authorization": "Basic x"}):
        status, _, body = yield http_request("GET", relay.http_url + "/state", headers)
        assert (status, json.loads(body)) == (401, {"ok": False, "reason": "ADMIN_UNAUTHORIZED"}), headers
    for via in ("bearer", "header"):
        status, _, _ = yield http_request("GET", relay.http_url + "/state", admin(via))
        assert status == 200
    after = yield fetch_metrics(relay)
    assert after["relay_admin_unauthorized_total"] - before["relay_admin_unauthorized_total"] == 4


@pytest_twisted.inlineCallbacks
def test_state_lists_scopes_without_workers(env: Any) -> Any:
    """/state reports the relay and one entry per scope with daemon, client count and client ids; workers are not listed."""
    relay = env["admin"]
    daemon = yield open_peer(relay, "workspace-daemon", "st", "rt1")
    alice = yield open_peer(relay, "client", "st", "rt1", clientId="alice")
    bob = yield open_peer(relay, "client", "st", "rt1", clientId="bob")
    worker = yield open_peer(relay, "worker", "st-workers", managedExecutorId="me1")
    try:
        status, _, body = yield http_request("GET", relay.http_url + "/state", admin("header"))
        state = json.loads(body)
        assert status == 200
        assert {k: state[k] for k in ("ok", "service", "relayMode", "backplaneMode", "busEnabled",
                                      "clientRedirectEnabled", "tlsEnabled")} == {
            "ok": True, "service": "relay", "relayMode": "dev", "backplaneMode": "single", "busEnabled": False,
            "clientRedirectEnabled": False, "tlsEnabled": False}
        assert {"relayId", "serverUrl", "tlsHost", "wsBaseUrl"} <= set(state)
        entries = [w for w in state["workspaces"] if w["workspaceId"].startswith("st")]
        assert len(entries) == 1
        entry = entries[0]
        assert (entry["workspaceId"], entry["runtimeTargetId"], entry["daemonConnected"], entry["clientCount"]) == (
            "st", "rt1", True, 2)
        assert sorted(entry["clientIds"]) == ["alice", "bob"]
        assert entry["lastActivityAt"].endswith("Z")
    finally:
        yield stop_all(daemon, alice, bob, worker)
    status, _, body = yield http_request("GET", env["staging"].http_url + "/state", admin())
    state = json.loads(body)
    assert status == 200 and state["relayMode"] == "staging"
    assert "serverUrl" not in state and "wsBaseUrl" not in state


@pytest_twisted.inlineCallbacks
def test_logs_are_served_and_redacted(env: Any) -> Any:
    """/logs returns the structured entries; tokens and frame payloads never appear in them or on stdout."""
    relay = env["admin"]
    marker = "PAYLOAD-MARKER-7f3a"
    secret_bearer = token("client", "logs", "rt1", clientId="log-client")
    refused_bearer = token("client", "logs", "rt1", key="another-secret-0123456789abcdef0123456789")
    client = yield open_with(relay, secret_bearer, "client", "logs", "rt1", token_via="query")
    try:
        client.send_text('{"type":"e2ee","ciphertext":"%s"}' % marker)
        assert is_status((yield client.next_json()), "INVALID_FRAME")
        client.send_text(kex_init(marker))
        assert is_status((yield client.next_json()), "DAEMON_UNAVAILABLE")
    finally:
        yield stop_all(client)
    assert (yield refused_status(open_with(relay, refused_bearer, "client", "logs", "rt1", token_via="subprotocol"))) == 401
    status, headers, body = yield http_request("GET", relay.http_url + "/logs", admin())
    assert (status, headers["content-type"]) == (200, "application/json")
    logs = json.loads(body)
    assert logs["ok"] is True
    events = {entry["event"] for entry in logs["logs"]}
    assert {"client_connected", "client_frame_rejected", "client_message_dropped", "admission_denied"} <= events
    assert all(set(entry) == {"ts", "level", "event", "details"} for entry in logs["logs"])
    stdout = "\n".join(relay.output.lines)
    for text in (body.decode(), stdout):
        assert secret_bearer not in text and refused_bearer not in text
        assert secret_bearer.split(".")[2] not in text
        assert marker not in text
    status, _, body = yield http_request("GET", env["staging"].http_url + "/logs", admin())
    summaries = json.loads(body)["logs"]
    assert summaries and all(set(entry) == {"ts", "level", "event"} for entry in summaries)


@pytest_twisted.inlineCallbacks
def test_metrics_expose_contract_names(env: Any) -> Any:
    """/metrics is Prometheus text with every contract counter and both gauges, reflecting live connections."""
    relay = env["admin"]
    daemon = yield open_peer(relay, "workspace-daemon", "metrics", "rt1")
    try:
        status, headers, body = yield http_request("GET", relay.http_url + "/metrics", admin())
        assert status == 200
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = body.decode()
        assert len(COUNTERS) == 72
        for name in COUNTERS:
            assert f"# TYPE {name} counter\n" in text, name
        for name in GAUGES:
            assert f"# TYPE {name} gauge\n" in text, name
        metrics = yield fetch_metrics(relay)
        assert metrics["relay_connections_total"] >= 1
        assert metrics["relay_ws_connections_opened_total"] >= 1
    finally:
        yield stop_all(daemon)


@pytest_twisted.inlineCallbacks
def test_other_paths_and_methods_are_404_json(env: Any) -> Any:
    """Unknown paths, other methods and a plain GET /ws without upgrade get 404 NOT_FOUND as JSON."""
    base = env["admin"].http_url
    for method, path in (("GET", "/"), ("GET", "/nope"), ("POST", "/health"), ("PUT", "/state"),
                         ("DELETE", "/metrics"), ("GET", "/ws"), ("GET", "/ws?role=client&workspaceId=w1"),
                         ("GET", "/health/extra")):
        status, headers, body = yield http_request(method, base + path, admin())
        assert (status, headers["content-type"], json.loads(body)) == (
            404, "application/json", {"ok": False, "reason": "NOT_FOUND"}), (method, path)
    status, _, body = yield http_request("HEAD", base + "/health")
    assert (status, body) == (404, b"")


# -- platform admission -------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_platform_admission_accepts_claims(env: Any) -> Any:
    """With SERVER_URL and no local secret, the platform's claims admit peers, which then route normally."""
    relay, api = env["platform"], env["api"]
    api.grants["tok-daemon-accept"] = {"workspaceId": "pw", "runtimeTargetId": "rt1", "role": "workspace-daemon"}
    api.grants["tok-client-accept"] = {"workspaceId": "pw", "runtimeTargetId": "rt1", "role": "client",
                                       "scope": "runtime", "clientId": "c1"}
    daemon = yield open_with(relay, "tok-daemon-accept", "workspace-daemon", "pw", "rt1")
    client = yield open_with(relay, "tok-client-accept", "client", "pw", None, token_via="subprotocol")
    try:
        client.send_text(kex_init("r1"))
        assert (yield daemon.next_message()) == kex_init("r1")
        daemon.send_text(kex_response("r1", "s1"))
        assert (yield client.next_message()) == kex_response("r1", "s1")
    finally:
        yield stop_all(daemon, client)
    calls = {call.body["relayToken"]: call for call in api.validations}
    call = calls["tok-daemon-accept"]
    assert call.body == {"relayToken": "tok-daemon-accept", "role": "workspace-daemon", "workspaceId": "pw",
                         "runtimeTargetId": "rt1"}
    assert call.headers["content-type"] == "application/json"
    assert "x-relay-internal-key" not in call.headers
    assert calls["tok-client-accept"].body == {"relayToken": "tok-client-accept", "role": "client", "workspaceId": "pw"}


@pytest_twisted.inlineCallbacks
def test_platform_denials_are_401(env: Any) -> Any:
    """A platform denial, a non-JSON answer, claims outside the schema and a role claim mismatch all give 401."""
    relay, api = env["platform"], env["api"]
    api.grants.update({
        "tok-denied-1": "deny",
        "tok-not-json": "not-json",
        "tok-bad-claims": "bad-claims",
        "tok-wrong-role": {"workspaceId": "pw", "runtimeTargetId": "rt1", "role": "client", "scope": "runtime"},
    })
    for bearer in ("tok-denied-1", "tok-not-json", "tok-bad-claims", "tok-wrong-role"):
        assert (yield refused_status(open_with(relay, bearer, "workspace-daemon", "pw", "rt1"))) == 401, bearer
    reasons = [entry["details"]["reason"] for entry in relay.events("admission_denied")]
    assert {"TOKEN_REVOKED", "INVALID_JSON", "INVALID_CLAIMS", "ROLE_CLAIM_MISMATCH"} <= set(reasons)


@pytest_twisted.inlineCallbacks
def test_oversized_platform_answer_is_401_and_relay_keeps_serving(env: Any) -> Any:
    """An admission answer over the byte cap, declared or written in one piece, gives 401 and the relay keeps serving."""
    relay, api = env["platform"], env["api"]
    api.grants.update({"tok-huge-declared": "huge-declared", "tok-huge-raw": "huge-raw",
                       "tok-after-huge": {"workspaceId": "pw", "runtimeTargetId": "rt9"}})
    for bearer in ("tok-huge-declared", "tok-huge-raw"):
        assert (yield refused_status(open_with(relay, bearer, "workspace-daemon", "pw", "rt9"))) == 401, bearer
    reasons = [entry["details"]["reason"] for entry in relay.events("admission_denied")]
    assert reasons.count("ADMISSION_RESPONSE_TOO_LARGE") >= 2
    daemon = yield open_with(relay, "tok-after-huge", "workspace-daemon", "pw", "rt9")
    yield stop_all(daemon)
    status, _, _ = yield http_request("GET", relay.http_url + "/health")
    assert status == 200


@pytest_twisted.inlineCallbacks
def test_stalled_platform_is_401_within_the_admission_timeout(env: Any) -> Any:
    """A platform that never answers gives 401, logged as the admission timeout (its timing: tests/test_socket_upgrades.py)."""
    relay, api = env["platform"], env["api"]
    api.grants["tok-stall-1"] = "stall"
    assert (yield refused_status(open_with(relay, "tok-stall-1", "workspace-daemon", "pw", "rt1"))) == 401
    assert api.held, "the platform never saw the call"
    denied = relay.events("admission_denied")[-1]["details"]
    assert (denied["status"], denied["reason"]) == (504, f"admission request timed out after {ADMISSION_TIMEOUT_MS}ms")


# -- worker transport -----------------------------------------------------------------------------------


def worker_request(request_id: str, path: str, method: str = "GET", **extra: Any) -> str:
    """A worker transport request frame."""
    return json.dumps({"type": "viewport.worker_transport.request/v1", "requestId": request_id, "method": method,
                       "path": path, **extra})


@pytest_twisted.inlineCallbacks
def test_worker_paths_outside_the_executor_are_denied(env: Any) -> Any:
    """Paths outside the worker's managed-executor prefix, dot segments and encoded separators get a 403 frame."""
    relay, api = env["platform"], env["api"]
    api.grants["tok-worker-deny"] = {"workspaceId": "pw", "role": "worker", "managedExecutorId": "me1"}
    api.grants["tok-worker-noexec"] = {"workspaceId": "pw", "role": "worker"}
    worker = yield open_with(relay, "tok-worker-deny", "worker", "pw")
    unscoped = yield open_with(relay, "tok-worker-noexec", "worker", "pw")
    calls_before = len(api.worker_calls)
    try:
        paths = [
            "/api/runtime/workspaces/pw/managed-executors/me2/jobs",
            "/api/runtime/workspaces/pw/managed-executors/me10",
            "/api/runtime/workspaces/other/managed-executors/me1",
            EXECUTOR_PREFIX + "/../../../other/x",
            EXECUTOR_PREFIX + "/../me2",
            EXECUTOR_PREFIX + "/%2e%2e/me2",
            EXECUTOR_PREFIX + "%2fjobs",
            EXECUTOR_PREFIX + "/./jobs",
        ]
        for n, path in enumerate(paths):
            worker.send_text(worker_request(f"q{n}", path))
            assert (yield worker.next_json()) == {
                "type": "viewport.worker_transport.response/v1", "requestId": f"q{n}", "status": 403,
                "headers": {"content-type": "application/json"},
                "body": '{"ok":false,"reason":"WORKER_TRANSPORT_PATH_DENIED"}'}, path
        unscoped.send_text(worker_request("u1", EXECUTOR_PREFIX))
        assert (yield unscoped.next_json())["status"] == 403
        assert len(api.worker_calls) == calls_before
    finally:
        yield stop_all(worker, unscoped)


@pytest_twisted.inlineCallbacks
def test_worker_request_is_forwarded_with_filtered_headers(env: Any) -> Any:
    """An allowed worker request reaches SERVER_URL with only allowed headers, and the answer comes back filtered."""
    relay, api = env["platform"], env["api"]
    api.grants["tok-worker-forward"] = {"workspaceId": "pw", "role": "worker", "managedExecutorId": "me1"}
    worker = yield open_with(relay, "tok-worker-forward", "worker", "pw")
    try:
        headers = {"Authorization": "Bearer worker-cred", "X-Viewport-Run-Lease": "lease-1",
                   "Content-Type": "application/json", "Cookie": "c=1", "X-Evil": "no", "Host": "evil.example"}
        worker.send_text(worker_request("f1", EXECUTOR_PREFIX + "/jobs/5?attempt=2", "PATCH", headers=headers,
                                        body='{"state":"done"}'))
        answer = yield worker.next_json()
        call = api.worker_calls[-1]
        assert (call.method, call.uri, call.text) == ("PATCH", EXECUTOR_PREFIX + "/jobs/5?attempt=2", '{"state":"done"}')
        assert call.headers["authorization"] == "Bearer worker-cred"
        assert call.headers["x-viewport-run-lease"] == "lease-1"
        assert call.headers["content-type"] == "application/json"
        assert "cookie" not in call.headers and "x-evil" not in call.headers
        assert call.headers["host"] != "evil.example"
        assert (answer["type"], answer["requestId"], answer["status"]) == (
            "viewport.worker_transport.response/v1", "f1", 201)
        assert json.loads(answer["body"]) == {"ok": True, "seen": EXECUTOR_PREFIX + "/jobs/5?attempt=2"}
        assert answer["headers"]["x-upstream"] == "yes"
        assert answer["headers"]["content-type"] == "application/json"
        assert not {"set-cookie", "authorization", "cookie"} & set(answer["headers"])
        assert all(name == name.lower() for name in answer["headers"])
        worker.send_text(worker_request("f2", EXECUTOR_PREFIX, body="ignored for GET"))
        answer = yield worker.next_json()
        assert (answer["requestId"], answer["status"]) == ("f2", 201)
        assert (api.worker_calls[-1].method, api.worker_calls[-1].text) == ("GET", "")
        metrics = yield fetch_metrics(relay)
        assert metrics["relay_worker_transport_forwarded_total"] == 2
    finally:
        yield stop_all(worker)


def test_startup_log_shows_sizes_and_hides_nothing_that_is_not_secret(env: Any) -> None:
    """relay_started carries maxFrameBytes as a number: a size is not redacted for its key's name."""
    started = env["admin"].events("relay_started")[0]["details"]
    assert started["maxFrameBytes"] == 1048576
    assert "[redacted]" not in json.dumps(started)
