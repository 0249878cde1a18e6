"""HAProxy (deploy/haproxy/haproxy.cfg) in front of two relays: sticky by workspace, failover on stop.

Needs Debian's ``haproxy`` (``apt-get install haproxy``; ``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from typing import Any, Dict, List, Optional

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from tests.support import REPO_ROOT, RelayProcess, e2e_env, poll_until, start_relays, token
from viewport.client import ReconnectingConnection

HAPROXY_CONFIG = os.path.join(REPO_ROOT, "deploy", "haproxy", "haproxy.cfg")
HAPROXY_INSTALLED = bool(shutil.which("haproxy") or os.path.exists("/usr/sbin/haproxy"))
#: Skipped on a developer machine without HAProxy; in CI (which installs it) a missing HAProxy fails.
needs_haproxy = pytest.mark.skipif(
    not HAPROXY_INSTALLED and not os.environ.get("CI"),
    reason="HAProxy is not installed (apt-get install haproxy); .ci/run installs it",
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _Quiet(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


class Balancer:
    """HAProxy started with the shipped config, listening on a free loopback port."""

    def __init__(self, relay_a: RelayProcess, relay_b: RelayProcess) -> None:
        self.port = _free_port()
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.protocol = _Quiet()
        env = {
            "LISTEN": f"127.0.0.1:{self.port}",
            "RELAY_A": relay_a.url.split("//")[1].split("/")[0],
            "RELAY_B": relay_b.url.split("//")[1].split("/")[0],
            "PATH": os.environ.get("PATH", ""),
        }
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            self.protocol, binary, [binary, "-db", "-f", HAPROXY_CONFIG], env=env
        )

    def stop(self) -> "Deferred[None]":
        """Stop HAProxy."""
        if not self.protocol.ended.called:
            self.transport.signalProcess("TERM")
        return self.protocol.ended


def _kex(request_id: str) -> str:
    return json.dumps({"type": "relay_key_exchange_init", "version": 3, "profile": "noise-ik", "requestId": request_id,
                       "clientEphemeralPublicKey": "e", "encryptedClientStatic": "s"}, separators=(",", ":"))


class EchoDaemon:
    """A daemon behind the balancer: answers key exchanges and echoes envelopes, reconnecting on its own."""

    def __init__(self, url: str, workspace: str) -> None:
        self.sessions = 0
        self.connection = ReconnectingConnection(
            reactor, url, token_factory=lambda: token("workspace-daemon", workspace, "rt1"),
            role="workspace-daemon", workspace_id=workspace, runtime_target_id="rt1",
            base_delay=0.05, max_delay=0.5, on_message=self._message,
        )

    def _message(self, text: str) -> None:
        frame = json.loads(text)
        if frame.get("type") == "relay_key_exchange_init":
            self.sessions += 1
            self.connection.send_json({
                "type": "relay_key_exchange_response", "version": 3, "profile": "noise-ik",
                "requestId": frame["requestId"], "daemonPublicKey": "d", "daemonEphemeralPublicKey": "e",
                "encryptedMetadata": "m", "sessionId": f"s{self.sessions}", "proof": "p", "epoch": 1,
            })
        elif frame.get("type") == "e2ee":
            self.connection.send_text(text)


class BrowserClient:
    """A client behind the balancer that records what it receives."""

    def __init__(self, url: str, workspace: str) -> None:
        self.received: List[Dict[str, Any]] = []
        self.connection = ReconnectingConnection(
            reactor, url, token_factory=lambda: token("client", workspace, "rt1"), role="client",
            workspace_id=workspace, runtime_target_id="rt1", token_via="subprotocol",
            base_delay=0.05, max_delay=0.5, on_message=lambda text: self.received.append(json.loads(text)),
        )

    def of_type(self, kind: str) -> List[Dict[str, Any]]:
        return [frame for frame in self.received if frame.get("type") == kind]


def _holder(relays: List[RelayProcess], event: str, workspace: str) -> Optional[RelayProcess]:
    """The relay whose latest log says ``event`` for the workspace (None when none does)."""
    for relay in relays:
        if [e for e in relay.events(event) if e["details"].get("workspaceId") == workspace]:
            return relay
    return None


@pytest_twisted.inlineCallbacks
def round_trip(client: BrowserClient, request_id: str) -> Any:
    """Key exchange then one envelope echoed by the daemon; returns when the echo arrived."""
    before_kex = len(client.of_type("relay_key_exchange_response"))
    client.connection.send_text(_kex(request_id))
    yield poll_until(lambda: len(client.of_type("relay_key_exchange_response")) > before_kex, 10, "key exchange")
    session = client.of_type("relay_key_exchange_response")[-1]["sessionId"]
    before = len(client.of_type("e2ee"))
    client.connection.send_json({"type": "e2ee", "version": 2, "profile": "noise-ik", "sessionId": session,
                                 "epoch": 1, "seq": 1, "iv": "i", "tag": "t", "ciphertext": "c"})
    yield poll_until(lambda: len(client.of_type("e2ee")) > before, 10, "echo")


@needs_haproxy
@pytest_twisted.inlineCallbacks
def test_workspace_sticks_to_one_relay_and_fails_over() -> Any:
    """Daemon and browsers of a workspace land on the same relay; when it stops they reconnect through HAProxy and traffic resumes."""
    env = e2e_env(RELAY_ENABLE_ADMIN_HTTP="1")
    relays = [RelayProcess(env), RelayProcess(env)]
    yield start_relays(*relays)
    balancer = Balancer(*relays)
    peers: List[Any] = []
    try:
        workspaces = [f"ws-{n}" for n in range(6)]
        daemons = {w: EchoDaemon(balancer.url, w) for w in workspaces}
        clients = {w: BrowserClient(balancer.url, w) for w in workspaces}
        peers = [p.connection for p in list(daemons.values()) + list(clients.values())]
        for connection in peers:
            connection.start()
        yield poll_until(lambda: all(c.connection.connected for c in clients.values())
                         and all(d.connection.connected for d in daemons.values()), 20, "everyone connected")
        for workspace in workspaces:
            daemon_relay = _holder(relays, "daemon_connected", workspace)
            client_relay = _holder(relays, "client_connected", workspace)
            assert daemon_relay is not None and daemon_relay is client_relay, workspace
        assert {id(_holder(relays, "daemon_connected", w)) for w in workspaces} == {id(r) for r in relays}, \
            "six workspaces all hashed to one relay"
        watched = workspaces[0]
        yield round_trip(clients[watched], "before")
        doomed = _holder(relays, "daemon_connected", watched)
        survivor = relays[1] if doomed is relays[0] else relays[0]
        stopped_at = time.monotonic()
        yield doomed.stop()  # type: ignore[union-attr]
        yield poll_until(lambda: bool([e for e in survivor.events("daemon_connected")
                                       if e["details"]["workspaceId"] == watched]), 20, "daemon moved")
        yield poll_until(lambda: bool([e for e in survivor.events("client_connected")
                                       if e["details"]["workspaceId"] == watched]), 20, "client moved")
        yield poll_until(lambda: clients[watched].connection.connected, 20, "client reconnected")
        yield round_trip(clients[watched], "after")
        print(f"\nworkspace {watched}: traffic resumed {time.monotonic() - stopped_at:.2f} s after its relay stopped")
    finally:
        for connection in peers:
            yield connection.stop()
        yield balancer.stop()
        for relay in relays:
            yield relay.stop()
