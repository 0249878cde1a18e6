"""Load balancers for the end-to-end tests: HAProxy and nginx run with the shipped configs, and peers that use them.

HAProxy runs ``deploy/haproxy/haproxy.cfg`` as it is; nginx runs ``deploy/nginx/viewport-relay.conf.template``
rendered into a private prefix directory. Both take the same three placeholders (``RELAY_A``,
``RELAY_B``, ``LISTEN``), listen on a free loopback port and are stopped with SIGTERM.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Protocol as TypingProtocol

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from tests.ports import free_port
from tests.support import (
    REPO_ROOT,
    EchoDaemon,
    RawClient,
    RelayProcess,
    e2e_env,
    envelope,
    fetch_metrics,
    http_request,
    kex_init,
    poll_until,
    start_relays,
    status_of,
    stop_relays,
    token,
    upgrade_request,
)
from viewport.client import ReconnectingConnection

HAPROXY_CONFIG = os.path.join(REPO_ROOT, "deploy", "haproxy", "haproxy.cfg")
NGINX_TEMPLATE = os.path.join(REPO_ROOT, "deploy", "nginx", "viewport-relay.conf.template")
RUNTIME_TARGET = "rt1"


def _binary(name: str) -> Optional[str]:
    """The path of a Debian server binary (``/usr/sbin`` is not always on a user's PATH), or None."""
    found = shutil.which(name)
    if found:
        return found
    fallback = f"/usr/sbin/{name}"
    return fallback if os.access(fallback, os.X_OK) else None


HAPROXY_BINARY = _binary("haproxy")
NGINX_BINARY = _binary("nginx")
#: Skipped on a developer machine without HAProxy; in CI (which installs it) a missing HAProxy fails.
needs_haproxy = pytest.mark.skipif(
    HAPROXY_BINARY is None and not os.environ.get("CI"),
    reason="HAProxy is not installed (apt-get install haproxy); .ci/run installs it",
)
#: Skipped on a developer machine without nginx; in CI (which installs it) a missing nginx fails.
needs_nginx = pytest.mark.skipif(
    NGINX_BINARY is None and not os.environ.get("CI"),
    reason="nginx is not installed (apt-get install nginx-light); .ci/run installs it",
)


def relay_address(relay: RelayProcess) -> str:
    """The ``host:port`` a started relay listens on."""
    return relay.url.split("//", 1)[1].split("/", 1)[0]


class ProcessOutput(ProcessProtocol):
    """Collects a balancer's output (both streams); ``ended`` fires when the process is gone."""

    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class AnyBalancer(TypingProtocol):
    """What the scenarios use of a balancer."""

    name: str
    port: int
    url: str
    protocol: ProcessOutput

    def stop(self) -> "Deferred[None]":
        """Stop the balancer; fire once its process is gone."""


def _spawn(protocol: ProcessOutput, argv: List[str], env: Dict[str, str], path: Optional[str] = None) -> Any:
    """Spawn a balancer process that is sent SIGTERM (which stops nginx's workers too) if the test run ends first."""
    transport = reactor.spawnProcess(protocol, argv[0], argv, env=env, path=path)  # type: ignore[attr-defined]

    def terminate() -> None:
        if not protocol.ended.called and transport.pid is not None:
            try:
                os.kill(transport.pid, signal.SIGTERM)
            except OSError:
                pass

    atexit.register(terminate)
    return transport


class Balancer:
    """HAProxy started with the shipped config, listening on a free loopback port."""

    name = "HAProxy"

    def __init__(self, relay_a: RelayProcess, relay_b: RelayProcess) -> None:
        if HAPROXY_BINARY is None:
            raise AssertionError("HAProxy is not installed (apt-get install haproxy)")
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.protocol = ProcessOutput()
        env = {
            "LISTEN": f"127.0.0.1:{self.port}",
            "RELAY_A": relay_address(relay_a),
            "RELAY_B": relay_address(relay_b),
            "PATH": os.environ.get("PATH", ""),
        }
        self.transport = _spawn(self.protocol, [HAPROXY_BINARY, "-db", "-f", HAPROXY_CONFIG], env)

    def stop(self) -> "Deferred[None]":
        """Stop HAProxy."""
        if not self.protocol.ended.called:
            self.transport.signalProcess("TERM")
        return self.protocol.ended


def render_nginx(relay_a: str, relay_b: str, listen: str) -> str:
    """The shipped nginx template with its three placeholders filled in, as ``envsubst`` would."""
    with open(NGINX_TEMPLATE, encoding="utf-8") as template:
        text = template.read()
    for name, value in (("RELAY_A", relay_a), ("RELAY_B", relay_b), ("LISTEN", listen)):
        text = text.replace("${" + name + "}", value)
    return text


class Nginx:
    """nginx in the foreground with the shipped server block, in a private prefix directory on a free loopback port."""

    name = "nginx"

    def __init__(self, relay_a: RelayProcess, relay_b: RelayProcess) -> None:
        if NGINX_BINARY is None:
            raise AssertionError("nginx is not installed (apt-get install nginx-light)")
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.prefix = tempfile.mkdtemp(prefix="nginx-")
        with open(os.path.join(self.prefix, "viewport-relay.conf"), "w", encoding="utf-8") as server_block:
            server_block.write(render_nginx(relay_address(relay_a), relay_address(relay_b), f"127.0.0.1:{self.port}"))
        config = os.path.join(self.prefix, "nginx.conf")
        with open(config, "w", encoding="utf-8") as main:
            main.write(self._main_config())
        self.protocol = ProcessOutput()
        argv = [NGINX_BINARY, "-p", self.prefix, "-c", config, "-g", "daemon off; error_log stderr;"]
        self.transport = _spawn(self.protocol, argv, {"PATH": os.environ.get("PATH", "")}, self.prefix)
        self.protocol.ended.addBoth(self._remove_prefix)

    @staticmethod
    def _main_config() -> str:
        # Relative paths are under the prefix, so nothing touches /var/lib/nginx or /run. Run as
        # root, nginx would switch its worker to "nobody", which cannot enter the private prefix.
        user = "user root;\n" if os.geteuid() == 0 else ""
        temp_paths = "".join(f"    {kind}_temp_path {kind}_temp;\n"
                             for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return (f"{user}worker_processes 1;\npid nginx.pid;\nevents {{ worker_connections 1024; }}\n"
                f"http {{\n    access_log off;\n{temp_paths}    include viewport-relay.conf;\n}}\n")

    def _remove_prefix(self, result: Any) -> Any:
        shutil.rmtree(self.prefix, ignore_errors=True)
        return result

    def stop(self) -> "Deferred[None]":
        """Stop nginx (SIGTERM: the master stops its worker at once, open WebSockets included)."""
        if not self.protocol.ended.called:
            self.transport.signalProcess("TERM")
        return self.protocol.ended


@inlineCallbacks
def routing(balancer: AnyBalancer, timeout: float = 15.0) -> Any:
    """Wait until the balancer listens and passes a ``/health`` request to a relay."""

    @inlineCallbacks
    def answered() -> Any:
        if balancer.protocol.ended.called:
            raise AssertionError(f"{balancer.name} exited: {balancer.protocol.output.decode('utf-8', 'replace')[-2000:]}")
        try:
            status, _, _ = yield http_request("GET", f"http://127.0.0.1:{balancer.port}/health")
        except Exception:
            return False
        return status == 200

    yield poll_until(answered, timeout, f"{balancer.name} routing /health")


# --- peers behind a balancer -------------------------------------------------------------------------


class BrowserClient:
    """A client behind the balancer (token in the subprotocol, as browsers send it) that records what it receives."""

    def __init__(self, url: str, workspace: str) -> None:
        self.received: List[Dict[str, Any]] = []
        self.failed_attempts: List[BaseException] = []
        self.connection = ReconnectingConnection(
            reactor, url, token_factory=lambda: token("client", workspace, RUNTIME_TARGET), role="client",
            workspace_id=workspace, runtime_target_id=RUNTIME_TARGET, token_via="subprotocol",
            base_delay=0.05, max_delay=0.5, on_message=lambda text: self.received.append(json.loads(text)),
            on_attempt_failed=self.failed_attempts.append,
        )

    def of_type(self, kind: str) -> List[Dict[str, Any]]:
        """The received frames of one type."""
        return [frame for frame in self.received if frame.get("type") == kind]


def holder(relays: List[RelayProcess], event: str, workspace: str) -> Optional[RelayProcess]:
    """The relay whose log says ``event`` for the workspace (None when none does)."""
    for relay in relays:
        if [e for e in relay.events(event) if e["details"].get("workspaceId") == workspace]:
            return relay
    return None


@inlineCallbacks
def round_trip(client: BrowserClient, request_id: str) -> Any:
    """Key exchange then one envelope echoed by the daemon; returns when the echo arrived."""
    before_kex = len(client.of_type("relay_key_exchange_response"))
    client.connection.send_text(kex_init(request_id))
    yield poll_until(lambda: len(client.of_type("relay_key_exchange_response")) > before_kex, 10, "key exchange")
    session = client.of_type("relay_key_exchange_response")[-1]["sessionId"]
    before = len(client.of_type("e2ee"))
    client.connection.send_text(envelope(session))
    yield poll_until(lambda: len(client.of_type("e2ee")) > before, 10, "echo")


# --- raw upgrades from a chosen source address -------------------------------------------------------


class SourceClients:
    """
    Client upgrades sent from chosen loopback addresses (127.0.0.2, 127.0.0.3, ...: all local on
    Linux), each with its own ``clientId`` so the relays' ``client_connected`` lines tell which IP
    the relay counted it under. Accepted sockets stay open until :meth:`close_all`.
    """

    def __init__(self, relays: List[RelayProcess], workspace: str) -> None:
        self.relays = relays
        self.workspace = workspace
        self._probes: List[RawClient] = []

    @inlineCallbacks
    def open(self, source: str, port: int, client_id: str, forwarded_for: Optional[str] = None) -> Any:
        """Upgrade from ``source`` to ``127.0.0.1:port``; fire with the status once a 101 is registered by a relay."""
        headers = {"Authorization": f"Bearer {token('client', self.workspace, RUNTIME_TARGET, clientId=client_id)}"}
        if forwarded_for is not None:
            headers["X-Forwarded-For"] = forwarded_for
        target = f"/ws?role=client&workspaceId={self.workspace}&runtimeTargetId={RUNTIME_TARGET}"
        probe = RawClient(upgrade_request(target, headers), head_only=True)  # a 101 socket stays open
        self._probes.append(probe)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5, bindAddress=(source, 0))
        yield connectProtocol(endpoint, probe)
        status = status_of((yield probe.done.addTimeout(10, reactor)))
        if status == 101:
            # The next upgrade must find this one counted against its IP.
            yield poll_until(lambda: self.ip_of(client_id), 10, f"{client_id} registered")
        return status

    @inlineCallbacks
    def open_each(self, source: str, port: int, client_ids: List[str]) -> Any:
        """Open one upgrade per client id from ``source``, one after the other; fire with their statuses."""
        statuses = []
        for client_id in client_ids:
            statuses.append((yield self.open(source, port, client_id)))
        return statuses

    def ip_of(self, client_id: str) -> Optional[str]:
        """The IP a relay logged for the client's ``client_connected`` (None before it registered)."""
        for relay in self.relays:
            for entry in relay.events("client_connected"):
                if entry["details"].get("clientId") == client_id:
                    ip: Optional[str] = entry["details"].get("ip")
                    return ip
        return None

    def close_all(self) -> None:
        """Drop every socket opened so far."""
        for probe in self._probes:
            if probe.transport is not None:
                probe.transport.abortConnection()  # type: ignore[attr-defined]


# --- the scenarios every balancer passes -------------------------------------------------------------

BalancerFactory = Callable[[RelayProcess, RelayProcess], AnyBalancer]
#: Relays that believe the balancer's X-Forwarded-For (it connects from 127.0.0.1), with limits a test reaches.
LIMITED_RELAY_ENV = {
    "RELAY_TRUSTED_PROXIES": "127.0.0.1",
    "RELAY_MAX_CONNECTIONS_PER_IP": "2",
    "RELAY_UPGRADE_RATE_PER_MINUTE": "4",
}
IP_CAP = "relay_upgrade_rejected_ip_connections_total"
RATE = "relay_upgrade_rate_limited_total"


@inlineCallbacks
def refusals(relays: List[RelayProcess]) -> Any:
    """The per-IP refusals counted by all relays: connection cap and upgrade rate."""
    totals = {IP_CAP: 0, RATE: 0}
    for relay in relays:
        values = yield fetch_metrics(relay)
        for name in totals:
            totals[name] += int(values.get(name, 0.0))
    return totals


@inlineCallbacks
def sticky_failover(make: BalancerFactory, workspace_count: int) -> Any:
    """
    Daemon and browser of each workspace land on one relay and the workspaces use both relays;
    when the relay of one stops, both reconnect through the balancer to the other at their first
    attempt and an envelope round-trips again. Fires with the seconds from the stop until then.
    """
    env = e2e_env()
    relays = [RelayProcess(env), RelayProcess(env)]
    yield start_relays(*relays)
    balancer: Optional[AnyBalancer] = None
    peers: List[ReconnectingConnection] = []
    try:
        balancer = make(*relays)
        workspaces = [f"ws-{n}" for n in range(workspace_count)]
        daemons = {w: EchoDaemon(balancer.url, w, RUNTIME_TARGET) for w in workspaces}
        clients = {w: BrowserClient(balancer.url, w) for w in workspaces}
        # Each daemon just before its client: a balancer that alternates between the relays would split them.
        peers = [peer.connection for w in workspaces for peer in (daemons[w], clients[w])]
        for connection in peers:
            connection.start()
        yield poll_until(lambda: all(connection.connected for connection in peers), 20, "everyone connected")
        for workspace in workspaces:
            daemon_relay = holder(relays, "daemon_connected", workspace)
            assert daemon_relay is not None and daemon_relay is holder(relays, "client_connected", workspace), workspace
        assert {id(holder(relays, "daemon_connected", w)) for w in workspaces} == {id(r) for r in relays}, \
            f"{workspace_count} workspaces all hashed to one relay"
        watched = workspaces[0]
        yield round_trip(clients[watched], "before")
        doomed = holder(relays, "daemon_connected", watched)
        survivor = relays[1] if doomed is relays[0] else relays[0]
        everyone = list(daemons.values()) + list(clients.values())
        for peer in everyone:
            del peer.failed_attempts[:]
        stopped_at = time.monotonic()
        yield doomed.stop()  # type: ignore[union-attr]
        for role in ("daemon", "client"):
            yield poll_until(lambda: holder([survivor], f"{role}_connected", watched), 20, f"{role} moved")
        yield poll_until(lambda: clients[watched].connection.connected, 20, "client reconnected")
        yield round_trip(clients[watched], "after")
        resumed = time.monotonic() - stopped_at
        yield poll_until(lambda: all(connection.connected for connection in peers), 20, "everyone reconnected")
        # The balancer retries a refused connection on the other relay itself: no peer sees the stop fail an attempt.
        failed = [repr(error) for peer in everyone for error in peer.failed_attempts]
        assert not failed, f"reconnects through {balancer.name} failed: {failed}"
        return resumed
    finally:
        for connection in peers:
            yield connection.stop()
        if balancer is not None:
            yield balancer.stop()
        yield stop_relays(*relays)


@inlineCallbacks
def per_source_limits(make: BalancerFactory) -> Any:
    """
    Through the balancer, clients from 127.0.0.2 (A), 127.0.0.3 (B) and 127.0.0.4 (C) each meet
    their own connection cap (2) and upgrade rate (4 a minute), and a forged X-Forwarded-For
    neither lifts a cap nor poses as another address. All use one workspace, so one relay.
    """
    relays = [RelayProcess(e2e_env(**LIMITED_RELAY_ENV)) for _ in range(2)]
    yield start_relays(*relays)
    balancer: Optional[AnyBalancer] = None
    clients = SourceClients(relays, "limits")
    a, b, c = "127.0.0.2", "127.0.0.3", "127.0.0.4"
    try:
        balancer = make(*relays)
        yield routing(balancer)
        port = balancer.port
        opened = yield clients.open_each(a, port, ["a1", "a2", "a3"])
        assert opened == [101, 101, 429], f"A's upgrades through {balancer.name}: {opened}"
        assert [clients.ip_of("a1"), clients.ip_of("a2")] == [a, a]
        assert (yield refusals(relays)) == {IP_CAP: 1, RATE: 0}
        opened = yield clients.open_each(b, port, ["b1", "b2"])
        assert opened == [101, 101], f"B was refused ({opened}): B and A share one per-IP count"
        assert [clients.ip_of("b1"), clients.ip_of("b2")] == [b, b]

        forged = yield clients.open(a, port, "a4", forwarded_for="203.0.113.9")
        assert forged == 429, f"A at its cap got {forged} by sending its own X-Forwarded-For"
        forged = yield clients.open(c, port, "c1", forwarded_for=b)
        assert forged == 101, f"C posing as B (at its cap) was refused ({forged}): the forged address was counted"
        assert clients.ip_of("c1") == c, f"C was counted as {clients.ip_of('c1')}"
        assert (yield refusals(relays)) == {IP_CAP: 2, RATE: 0}

        # A's fifth upgrade this minute passes the rate of 4: refused before its cap is even looked at.
        assert (yield clients.open(a, port, "a5")) == 429
        assert (yield refusals(relays)) == {IP_CAP: 2, RATE: 1}
        assert (yield clients.open(c, port, "c2")) == 101, "C was refused once A hit its upgrade rate"
    finally:
        clients.close_all()
        if balancer is not None:
            yield balancer.stop()
        yield stop_relays(*relays)
