"""End-to-end: the WebSocket upgrade pipeline and connection admission of a real relay process."""

from __future__ import annotations

import json
import time
from typing import Any, Dict
from urllib.parse import quote

import pytest
import pytest_twisted
from twisted.internet.defer import inlineCallbacks

from tests.support import (
    RelayProcess,
    http_request,
    poll_until,
    closed_within,
    e2e_env,
    fetch_metrics,
    open_peer,
    open_with,
    raw_exchange,
    raw_token,
    refused_status,
    settled,
    start_relays,
    status_of,
    stop_all,
    stop_relays,
    token,
    upgrade_request,
)
from viewport.client import is_status

BARE = {status: f"HTTP/1.1 {status} {phrase}\r\n\r\n".encode() for status, phrase in (
    (400, "Bad Request"), (401, "Unauthorized"), (429, "Too Many Requests"), (503, "Service Unavailable"))}


@pytest.fixture(scope="module")
def relays() -> Any:
    """Four relays started together: a default dev relay, a tight upgrade rate, tight caps, and staging."""
    procs: Dict[str, RelayProcess] = {
        "main": RelayProcess(e2e_env()),
        "rate": RelayProcess(e2e_env(RELAY_UPGRADE_RATE_PER_MINUTE="3")),
        "caps": RelayProcess(e2e_env(RELAY_MAX_TOTAL_CONNECTIONS="2", RELAY_MAX_CONNECTIONS_PER_IP="3")),
        "staging": RelayProcess(e2e_env(RELAY_MODE="staging", RELAY_MAX_CLIENTS_PER_WORKSPACE="1")),
        "origins": RelayProcess(e2e_env(RELAY_ALLOWED_ORIGINS="https://app.example.com,https://*.viewport.test")),
    }
    pytest_twisted.blockon(start_relays(*procs.values()))
    yield procs
    pytest_twisted.blockon(stop_relays(*procs.values()))


def ws_target(role: str = "client", workspace: str = "w1", runtime_target: str | None = "rt1", **extra: str) -> str:
    """An upgrade request target with the given query."""
    query = f"role={quote(role)}&workspaceId={quote(workspace)}"
    if runtime_target is not None:
        query += f"&runtimeTargetId={quote(runtime_target)}"
    for name, value in extra.items():
        query += f"&{name}={quote(value)}"
    return f"/ws?{query}"


# -- docs/protocol.md §2.3: refusals before the handshake ------------------------------------------


@pytest_twisted.inlineCallbacks
def test_upgrade_rate_limit_answers_bare_429(relays: Any) -> Any:
    """Every upgrade attempt counts toward the per-IP window; once it is used up the relay writes a bare 429."""
    relay = relays["rate"]
    before = yield fetch_metrics(relay)
    for _ in range(3):
        answer = yield raw_exchange(relay, upgrade_request(ws_target(role="nobody"), {}))
        assert answer == BARE[400]
    answer = yield raw_exchange(relay, upgrade_request(ws_target(), {"Authorization": "Bearer " + token("client", "w1", "rt1")}))
    assert answer == BARE[429]
    after = yield fetch_metrics(relay)
    assert after["relay_upgrade_rate_limited_total"] - before["relay_upgrade_rate_limited_total"] == 1


@pytest_twisted.inlineCallbacks
def test_total_connection_cap_answers_503(relays: Any) -> Any:
    """With daemons plus clients at RELAY_MAX_TOTAL_CONNECTIONS, the next upgrade is refused with 503."""
    relay = relays["caps"]
    daemon = yield open_peer(relay, "workspace-daemon", "cap", "rt1")
    client = yield open_peer(relay, "client", "cap", "rt1")
    try:
        status = yield refused_status(open_peer(relay, "client", "cap", "rt1"))
        assert status == 503
        metrics = yield fetch_metrics(relay)
        assert metrics["relay_upgrade_rejected_total_connections_total"] == 1
    finally:
        yield stop_all(daemon, client)
        yield settled(relay)


@pytest_twisted.inlineCallbacks
def test_per_ip_cap_counts_workers_and_answers_429(relays: Any) -> Any:
    """Workers count toward the per-IP cap (not the total cap), sockets closed 4008 at admission do not; over it: 429."""
    relay = relays["caps"]
    peers = []
    try:
        for _ in range(3):
            rejected = yield open_peer(relay, "client", "ipcap", "rt1", query_target="other")
            yield closed_within(rejected)
        peers.append((yield open_peer(relay, "workspace-daemon", "ipcap", "rt1")))
        peers.append((yield open_peer(relay, "worker", "ipcap", managedExecutorId="me1")))
        peers.append((yield open_peer(relay, "worker", "ipcap", managedExecutorId="me2")))
        yield settled(relay, 3)
        status = yield refused_status(open_peer(relay, "client", "ipcap", "rt1"))
        assert status == 429
        metrics = yield fetch_metrics(relay)
        assert metrics["relay_upgrade_rejected_ip_connections_total"] == 1
        assert metrics["relay_upgrade_rejected_total_connections_total"] <= 1
    finally:
        yield stop_all(*peers)
        yield settled(relay)


@pytest_twisted.inlineCallbacks
def test_wrong_path_closes_socket_without_writing(relays: Any) -> Any:
    """An upgrade request on a path other than exactly /ws is dropped with nothing written back."""
    relay = relays["main"]
    bearer = {"Authorization": "Bearer " + token("client", "w1", "rt1")}
    for path in ("/socket", "/ws/", "/ws/extra", "/WS"):
        target = path + ws_target()[len("/ws"):]
        answer = yield raw_exchange(relay, upgrade_request(target, bearer))
        assert answer == b"", path


@pytest_twisted.inlineCallbacks
def test_bad_query_answers_bare_400(relays: Any) -> Any:
    """A missing or invalid role, workspaceId or runtimeTargetId is refused with a bare 400 before any token check."""
    relay = relays["main"]
    bearer = {"Authorization": "Bearer " + token("client", "w1", "rt1")}
    targets = [
        "/ws?workspaceId=w1",
        "/ws?role=admin&workspaceId=w1",
        "/ws?role=client",
        "/ws?role=client&workspaceId=",
        "/ws?role=client&workspaceId=bad%2Fslash",
        "/ws?role=client&workspaceId=" + "w" * 129,
        "/ws?role=client&workspaceId=w1&runtimeTargetId=",
        "/ws?role=client&workspaceId=w1&runtimeTargetId=has%20space",
    ]
    before = yield fetch_metrics(relay)
    for target in targets:
        answer = yield raw_exchange(relay, upgrade_request(target, bearer))
        assert answer == BARE[400], target
    after = yield fetch_metrics(relay)
    assert after["relay_upgrade_invalid_query_total"] - before["relay_upgrade_invalid_query_total"] == len(targets)
    assert after["relay_admission_ok_total"] == before["relay_admission_ok_total"]


@pytest_twisted.inlineCallbacks
def test_missing_or_short_token_answers_bare_401(relays: Any) -> Any:
    """No token, or one shorter than 10 characters in any source, is refused with a bare 401."""
    relay = relays["main"]
    cases = [
        (ws_target(), {}),
        (ws_target(), {"Authorization": "Bearer short"}),
        (ws_target(), {"Authorization": "Basic " + token("client", "w1", "rt1")}),
        (ws_target(), {"Sec-WebSocket-Protocol": "viewport-relay-v1, auth.short"}),
        (ws_target(token="short"), {}),
        (ws_target(token="   "), {}),
    ]
    before = yield fetch_metrics(relay)
    for target, headers in cases:
        answer = yield raw_exchange(relay, upgrade_request(target, headers))
        assert answer == BARE[401], (target, headers)
    after = yield fetch_metrics(relay)
    assert after["relay_upgrade_missing_auth_total"] - before["relay_upgrade_missing_auth_total"] == len(cases)


@pytest_twisted.inlineCallbacks
def test_query_token_refused_outside_dev_mode(relays: Any) -> Any:
    """In staging a query-string token is refused with 401, while the same token in a header is admitted."""
    relay = relays["staging"]
    status = yield refused_status(open_peer(relay, "workspace-daemon", "stg", "rt1", token_via="query"))
    assert status == 401
    daemon = yield open_peer(relay, "workspace-daemon", "stg", "rt1", token_via="header")
    yield stop_all(daemon)


@pytest_twisted.inlineCallbacks
def test_invalid_tokens_are_denied_with_401(relays: Any) -> Any:
    """A bad signature, an expired token and a role claim that differs from the requested role are all 401."""
    relay = relays["main"]
    wrong_key = token("client", "w1", "rt1", key="another-secret-0123456789abcdef0123456789")
    expired = token("client", "w1", "rt1", ttl=60, now=time.time() - 3600)
    daemon_claim = token("workspace-daemon", "w1", "rt1")
    before = yield fetch_metrics(relay)
    assert (yield refused_status(open_with(relay, wrong_key, "client", "w1", "rt1"))) == 401
    assert (yield refused_status(open_with(relay, expired, "client", "w1", "rt1"))) == 401
    assert (yield refused_status(open_with(relay, daemon_claim, "client", "w1", "rt1"))) == 401
    after = yield fetch_metrics(relay)
    assert after["relay_admission_denied_total"] - before["relay_admission_denied_total"] == 3
    reasons = [entry["details"]["reason"] for entry in relay.events("admission_denied")]
    assert {"INVALID_SIGNATURE", "TOKEN_EXPIRED", "ROLE_CLAIM_MISMATCH"} <= set(reasons)


@pytest_twisted.inlineCallbacks
def test_client_cap_uses_the_claimed_runtime_target(relays: Any) -> Any:
    """The per-scope client cap counts the claim's runtime target, so omitting it from the query does not bypass it."""
    relay = relays["staging"]
    first = yield open_peer(relay, "client", "capws", "rt1", query_target=None)
    try:
        assert (yield refused_status(open_peer(relay, "client", "capws", "rt1", query_target=None))) == 429
        assert (yield refused_status(open_peer(relay, "client", "capws", "rt1"))) == 429
        other_target = yield open_peer(relay, "client", "capws", "rt2", query_target=None)
        yield stop_all(other_target)
        metrics = yield fetch_metrics(relay)
        assert metrics["relay_upgrade_rejected_workspace_clients_total"] == 2
    finally:
        yield stop_all(first)


# -- token sources and subprotocols -----------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_three_token_sources_are_admitted(relays: Any) -> Any:
    """A token in the Authorization header, in an auth.<token> subprotocol, or (dev) in the query is admitted."""
    relay = relays["main"]
    for via in ("header", "subprotocol", "query"):
        client = yield open_peer(relay, "client", "sources", "rt1", token_via=via)
        client.send_text("not json")
        reply = yield client.next_json()
        assert is_status(reply, "INVALID_FRAME"), via
        yield stop_all(client)


@pytest_twisted.inlineCallbacks
def test_subprotocol_echo_prefers_a_plain_name_and_else_echoes_the_only_offer(relays: Any) -> Any:
    """
    Offering viewport-relay-v1 then auth.<t> selects viewport-relay-v1; offering only auth.<t> echoes it, as
    browsers require an echo of one of their offers; a Bearer header without subprotocols selects nothing.
    """
    relay = relays["main"]
    bearer = token("client", "echo", "rt1")
    both = yield open_with(relay, bearer, "client", "echo", "rt1", token_via="subprotocol")
    only_auth = yield open_with(relay, bearer, "client", "echo", "rt1", token_via="subprotocol", subprotocol=None)
    header = yield open_with(relay, bearer, "client", "echo", "rt1", token_via="header", subprotocol=None)
    try:
        assert both.subprotocol == "viewport-relay-v1"
        assert only_auth.subprotocol == f"auth.{bearer}"
        assert header.subprotocol is None
    finally:
        yield stop_all(both, only_auth, header)
    answer = yield raw_exchange(
        relay,
        upgrade_request(ws_target(workspace="echo"), {"Sec-WebSocket-Protocol": f"viewport-relay-v1, auth.{bearer}"}),
        head_only=True,
    )
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    assert head.startswith("HTTP/1.1 101")
    assert bearer not in head
    assert "sec-websocket-protocol: viewport-relay-v1" in head.lower()


@pytest_twisted.inlineCallbacks
def test_malformed_handshake_is_refused_before_admission(relays: Any) -> Any:
    """A handshake without Sec-WebSocket-Key (or with a bad version) gets 400 and never reaches admission."""
    relay = relays["main"]
    bearer = {"Authorization": "Bearer " + token("client", "hs", "rt1")}
    before = yield fetch_metrics(relay)
    denied_logs = len(relay.events("admission_denied"))
    no_key = yield raw_exchange(relay, upgrade_request(ws_target(workspace="hs"), bearer, key=None))
    assert status_of(no_key) == 400
    bad_version = upgrade_request(ws_target(workspace="hs"), bearer).replace(
        b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 99"
    )
    assert status_of((yield raw_exchange(relay, bad_version))) == 400
    after = yield fetch_metrics(relay)
    assert after["relay_admission_ok_total"] == before["relay_admission_ok_total"]
    assert after["relay_admission_denied_total"] == before["relay_admission_denied_total"]
    assert len(relay.events("admission_denied")) == denied_logs


# -- docs/protocol.md §3.1, §3.2: 4008 after the upgrade -------------------------------------------


@inlineCallbacks
def expect_4008(relay: RelayProcess, bearer: str, role: str, workspace: str, runtime_target: str | None, reason: str) -> Any:
    """Open with ``bearer`` and expect a 101 followed by close 4008 with ``reason``; return frames received first."""
    conn = yield open_with(relay, bearer, role, workspace, runtime_target)
    info = yield closed_within(conn)
    assert (info.code, info.reason) == (4008, reason)
    return [json.loads(text) for text in conn.pending_messages()]


@pytest_twisted.inlineCallbacks
def test_claims_versus_query_rejections(relays: Any) -> Any:
    """Admitted sockets whose claims contradict the query are closed 4008 with the contract's exact reason."""
    relay = relays["main"]
    before = yield fetch_metrics(relay)
    no_workspace = raw_token({"role": "client", "scope": "runtime", "runtimeTargetId": "rt1"})
    assert (yield expect_4008(relay, no_workspace, "client", "rej", "rt1", "missing workspace claim")) == []
    other_workspace = token("client", "other", "rt1")
    assert (yield expect_4008(relay, other_workspace, "client", "rej", "rt1", "workspace claim mismatch")) == []
    other_target = token("workspace-daemon", "rej", "rt9")
    assert (yield expect_4008(relay, other_target, "workspace-daemon", "rej", "rt1", "runtime target claim mismatch")) == []
    no_scope = token("client", "rej", "rt1", scope=None)
    assert (yield expect_4008(relay, no_scope, "client", "rej", "rt1", "invalid scope claim")) == []
    after = yield fetch_metrics(relay)
    assert after["relay_ws_connections_rejected_total"] - before["relay_ws_connections_rejected_total"] == 4
    assert after["relay_ws_connections_opened_total"] == before["relay_ws_connections_opened_total"]


@pytest_twisted.inlineCallbacks
def test_missing_runtime_target_sends_status_then_4008(relays: Any) -> Any:
    """A daemon, runtime client or session-events client without any runtime target gets RUNTIME_TARGET_REQUIRED, then 4008."""
    relay = relays["main"]
    cases = [
        ("workspace-daemon", token("workspace-daemon", "notarget")),
        ("client", token("client", "notarget", scope="runtime")),
        ("client", token("client", "notarget", scope="session-events")),
    ]
    for role, bearer in cases:
        received = yield expect_4008(relay, bearer, role, "notarget", None, "missing runtime target claim")
        assert received == [{
            "type": "relay_status",
            "code": "RUNTIME_TARGET_REQUIRED",
            "message": "Runtime client must specify a runtime target",
            "workspaceId": "notarget",
            "retryable": False,
        }], role
    pairing = yield open_peer(relay, "client", "notarget", None, scope="pairing")
    assert pairing.is_open
    yield stop_all(pairing)


@pytest_twisted.inlineCallbacks
def test_stale_daemon_generation_is_rejected(relays: Any) -> Any:
    """After a daemon with generation 5, a daemon claiming generation 3 is closed 4008 while 5 and none are accepted."""
    relay = relays["main"]
    first = yield open_peer(relay, "workspace-daemon", "gen", "rt1", daemonIssueGeneration=5)
    yield first.close()
    stale = token("workspace-daemon", "gen", "rt1", daemonIssueGeneration=3)
    yield expect_4008(relay, stale, "workspace-daemon", "gen", "rt1", "stale daemon generation")
    assert relay.events("daemon_connection_rejected")[-1]["details"]["reason"] == "stale_daemon_issue_generation"
    same = yield open_peer(relay, "workspace-daemon", "gen", "rt1", daemonIssueGeneration=5)
    yield same.close()
    unversioned = yield open_peer(relay, "workspace-daemon", "gen", "rt1")
    yield unversioned.close()


@pytest_twisted.inlineCallbacks
def test_second_daemon_is_rejected_and_first_kept(relays: Any) -> Any:
    """A second daemon for an occupied scope is closed 4008, even with a higher generation, and the first keeps working."""
    relay = relays["main"]
    daemon = yield open_peer(relay, "workspace-daemon", "dup", "rt1", daemonIssueGeneration=1)
    client = yield open_peer(relay, "client", "dup", "rt1")
    try:
        newcomer = token("workspace-daemon", "dup", "rt1", daemonIssueGeneration=2)
        yield expect_4008(relay, newcomer, "workspace-daemon", "dup", "rt1", "daemon already connected")
        envelope = ('{"type":"e2ee","version":2,"profile":"noise-ik","sessionId":"s","epoch":1,"seq":1,'
                    '"iv":"i","tag":"t","ciphertext":"c"}')
        client.send_text(envelope)
        assert (yield daemon.next_message()) == envelope
    finally:
        yield stop_all(daemon, client)


@pytest_twisted.inlineCallbacks
def test_tokens_with_every_registered_jwt_claim_are_admitted(relays: Any) -> Any:
    """A daemon token from an identity provider, carrying sub, iss, aud, nbf, iat and jti, is admitted locally."""
    import jwt

    from tests.support import TEST_SECRET

    now = time.time()
    bearer = jwt.encode(
        {"role": "workspace-daemon", "workspaceId": "registered", "runtimeTargetId": "rt1", "machineId": "m1",
         "iss": "https://idp.example.com/", "sub": "machine|m1", "aud": ["viewport-relay"], "exp": now + 600,
         "nbf": now - 5, "iat": now - 5, "jti": "a-token-id"},
        TEST_SECRET,
        algorithm="HS256",
    )
    daemon = yield open_with(relays["main"], bearer, "workspace-daemon", "registered", "rt1")
    client = yield open_peer(relays["main"], "client", "registered", "rt1")
    client.send_text(json.dumps({"type": "relay_key_exchange_init", "version": 3, "profile": "noise-ik",
                                 "requestId": "r1", "clientEphemeralPublicKey": "e", "encryptedClientStatic": "s"}))
    assert (yield daemon.next_json())["requestId"] == "r1"
    yield stop_all(client, daemon)


@pytest_twisted.inlineCallbacks
def test_duplicated_token_offer_is_refused_without_quoting_it(relays: Any) -> Any:
    """Two identical auth.<token> offers get a bare 400 Bad Request; the token is in neither the answer nor the log."""
    relay = relays["main"]
    bearer = token("client", "dup", "rt1")
    answer = yield raw_exchange(
        relay, upgrade_request(ws_target(workspace="dup"), {"Sec-WebSocket-Protocol": f"auth.{bearer}, auth.{bearer}"})
    )
    assert answer == b"HTTP/1.1 400 Bad Request\r\n\r\n"
    yield poll_until(lambda: relay.events("handshake_refused"), what="the refusal logged")
    signature = bearer.rsplit(".", 1)[1]
    assert not [line for line in relay.output.lines if signature in line]
    assert signature not in relay.output.stderr.decode("utf-8", "replace")


@pytest_twisted.inlineCallbacks
def test_responses_name_no_library_in_their_server_header(relays: Any) -> Any:
    """Plain HTTP answers and the 101 both send Server: viewport-relay, never AutobahnPython or TwistedWeb."""
    relay = relays["main"]
    _, headers, _ = yield http_request("GET", relay.http_url + "/health")
    assert headers["server"] == "viewport-relay"
    answer = yield raw_exchange(
        relay,
        upgrade_request(ws_target(workspace="server"), {"Authorization": "Bearer " + token("client", "server", "rt1")}),
        head_only=True,
    )
    lines = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower().split("\r\n")
    assert lines[0].startswith("http/1.1 101") and "server: viewport-relay" in lines


@pytest_twisted.inlineCallbacks
def test_origins_outside_the_allowed_list_are_403_before_admission(relays: Any) -> Any:
    """With RELAY_ALLOWED_ORIGINS set, other origins (null included) get 403 and no admission; listed ones upgrade."""
    relay = relays["origins"]
    bearer = {"Authorization": "Bearer " + token("client", "origins", "rt1")}
    before = yield fetch_metrics(relay)
    for origin in ("https://app.example.com", "https://a.viewport.test", None):
        headers = dict(bearer, **({"Origin": origin} if origin else {}))
        answer = yield raw_exchange(relay, upgrade_request(ws_target(workspace="origins"), headers), head_only=True)
        assert status_of(answer) == 101, origin
    for origin in ("https://evil.example.com", "null", "https://app.example.com.evil.net"):
        answer = yield raw_exchange(relay, upgrade_request(ws_target(workspace="origins"), dict(bearer, Origin=origin)))
        assert answer == b"HTTP/1.1 403 Forbidden\r\n\r\n", origin
    after = yield fetch_metrics(relay)
    assert after["relay_upgrade_rejected_origin_total"] - before["relay_upgrade_rejected_origin_total"] == 3
    assert after["relay_admission_ok_total"] - before["relay_admission_ok_total"] == 3


@pytest_twisted.inlineCallbacks
def test_any_origin_by_default_including_null(relays: Any) -> Any:
    """Without RELAY_ALLOWED_ORIGINS every origin upgrades, Origin: null (a file:// page) included."""
    bearer = {"Authorization": "Bearer " + token("client", "null-origin", "rt1")}
    for origin in ("null", "https://anything.example"):
        answer = yield raw_exchange(
            relays["main"], upgrade_request(ws_target(workspace="null-origin"), dict(bearer, Origin=origin)), head_only=True
        )
        assert status_of(answer) == 101, origin
