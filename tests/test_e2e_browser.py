"""End-to-end: a page in headless Chromium, on another origin, opens the browser's own WebSocket to a relay
process, does a key exchange with the example daemon and gets its e2ee envelope echoed (ws:// and wss://)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional
from urllib.parse import quote, urlsplit

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from tests.browser import Chromium, Page, chromium_binary, observe
from tests.certs import make_certificates
from tests.support import (
    REPO_ROOT,
    RelayProcess,
    e2e_env,
    envelope,
    kex_init,
    poll_until,
    start_relays,
    stop_relays,
    token,
)
from viewport.client.url import DEFAULT_SUBPROTOCOL, Handshake, handshake_for

if TYPE_CHECKING:
    # Imported for the annotation only: a Test* class in the module would be collected by pytest.
    from tests.certs import TestCertificates

WORKSPACE = "browser-e2e"
RUNTIME_TARGET = "rt1"
PAGE_TIMEOUT_MS = 10_000
STOP_DEADLINE_SECONDS = 10.0

# The page runs one exchange as a browser application would and resolves ``window.outcome`` with a report.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>viewport-relay browser e2e</title>
<script>
"use strict";
window.outcome = new Promise((resolve) => {
  const config = JSON.parse(new URLSearchParams(location.search).get("config"));
  const report = {origin: location.origin, opened: false, protocol: null, sessionId: null, echoed: false,
                  received: [], close: null, errorEvent: false, outcome: null};
  let socket = null;
  let sent = null;
  const finish = (outcome) => {
    if (report.outcome !== null) return;
    report.outcome = outcome;
    clearTimeout(timer);
    document.getElementById("status").textContent = outcome;
    resolve(report);
    if (socket !== null && socket.readyState <= WebSocket.OPEN) socket.close(1000, "done");
  };
  const timer = setTimeout(() => finish("timeout"), config.timeoutMs);
  try {
    socket = config.protocols.length ? new WebSocket(config.url, config.protocols) : new WebSocket(config.url);
  } catch (error) {
    console.error("new WebSocket threw: " + error);
    finish("constructor threw");
    return;
  }
  socket.onopen = () => {
    report.opened = true;
    report.protocol = socket.protocol;
    socket.send(config.keyExchangeInit);
  };
  socket.onmessage = (event) => {
    const frame = JSON.parse(event.data);
    report.received.push(frame.type);
    if (frame.type === "relay_key_exchange_response" && frame.requestId === config.requestId) {
      report.sessionId = frame.sessionId;
      sent = JSON.stringify(Object.assign({}, config.envelope, {sessionId: frame.sessionId}));
      socket.send(sent);
    } else if (frame.type === "e2ee" && sent !== null) {
      report.echoed = event.data === sent;
      finish("echo");
    }
  };
  socket.onerror = () => { report.errorEvent = true; };
  socket.onclose = (event) => {
    report.close = {code: event.code, reason: event.reason, wasClean: event.wasClean};
    finish("closed");
  };
});
</script></head>
<body><p id="status">running</p></body></html>
"""


class ExampleDaemon(ProcessProtocol):
    """``examples/daemon.py`` as a process: its output lines and a Deferred for its exit."""

    def __init__(self) -> None:
        self.lines: List[str] = []
        self.stderr = b""
        self.ended: Deferred[Optional[int]] = Deferred()
        self._partial = b""
        self.transport: Any = None

    def start(self, relay: RelayProcess, env: Dict[str, str]) -> None:
        """Run the example daemon against ``relay`` with a daemon token for the test's scope."""
        argv = [
            sys.executable, os.path.join(REPO_ROOT, "examples", "daemon.py"), "--url", relay.url,
            "--token", token("workspace-daemon", WORKSPACE, RUNTIME_TARGET),
            "--workspace", WORKSPACE, "--runtime-target", RUNTIME_TARGET,
        ]
        reactor.spawnProcess(self, sys.executable, argv, env=env, path=relay.workdir)  # type: ignore[attr-defined]

    def outReceived(self, data: bytes) -> None:
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        self.lines.extend(raw.decode("utf-8", "replace") for raw in complete)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        code = reason.value.exitCode if isinstance(reason.value, (ProcessDone, ProcessTerminated)) else None
        self.ended.callback(code)

    @inlineCallbacks
    def stop(self) -> Any:
        """SIGTERM, then SIGKILL after a deadline; fire once it exited."""
        if self.transport is None or self.ended.called:
            return
        self.transport.signalProcess("TERM")
        try:
            yield observe(self.ended).addTimeout(STOP_DEADLINE_SECONDS, reactor)
        except Exception:
            self.transport.signalProcess("KILL")
            yield observe(self.ended)


def _connected(relay: RelayProcess, daemon: ExampleDaemon) -> Callable[[], bool]:
    """A check for ``poll_until``: the relay registered a daemon (failing at once if the daemon exited)."""

    def check() -> bool:
        if daemon.ended.called:
            raise AssertionError(f"example daemon exited: {daemon.lines[-5:]} {daemon.stderr.decode()[-2000:]}")
        return bool(relay.events("daemon_connected"))

    return check


@dataclass(frozen=True)
class PageRun:
    """One case as the browser saw it: the page's report, the handshake it was given, its WebSockets and console."""

    report: Dict[str, Any]
    handshake: Handshake
    sockets: List[Dict[str, Any]]
    described: str


class Stack:
    """What the tests share: the page server, one relay and example daemon per scheme, and the browser."""

    def __init__(self) -> None:
        self.relays: Dict[str, RelayProcess] = {}
        self.daemons: Dict[str, ExampleDaemon] = {}
        self.page_origin = ""
        self.browser: Optional[Chromium] = None
        self.trust = ""
        self.certs: Optional["TestCertificates"] = None
        self._cleanups: List[Callable[[], Any]] = []

    @inlineCallbacks
    def start(self) -> Any:
        """Start everything; whatever started is stopped by ``stop`` even if a later step fails."""
        chromium_binary()
        certs = self.certs = make_certificates(tempfile.mkdtemp(prefix="relay-browser-certs-"))
        self._cleanups.append(lambda: shutil.rmtree(os.path.dirname(certs.ca_path), ignore_errors=True))

        root = Resource()
        root.putChild(b"relay.html", Data(PAGE.encode("utf-8"), "text/html; charset=utf-8"))
        root.putChild(b"favicon.ico", Data(b"", "image/x-icon"))  # keeps a 404 out of the page's console
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))
        self._cleanups.append(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        self.page_origin = f"http://127.0.0.1:{address.port}"

        self.relays = {
            "ws": RelayProcess(e2e_env(RELAY_MODE="dev")),
            "wss": RelayProcess(e2e_env(
                RELAY_MODE="dev", RELAY_TLS="1", RELAY_TLS_CERT_PATH=certs.cert_path, RELAY_TLS_KEY_PATH=certs.key_path,
            )),
        }
        relays = list(self.relays.values())
        self._cleanups.append(lambda: stop_relays(*relays))
        yield start_relays(*relays)

        for scheme, relay in self.relays.items():
            daemon = ExampleDaemon()
            self.daemons[scheme] = daemon
            self._cleanups.append(daemon.stop)
            # The daemon verifies the relay's certificate against the test CA (OpenSSL's default paths).
            daemon.start(relay, {**relay.env, "SSL_CERT_FILE": certs.ca_path})
        for scheme, relay in self.relays.items():
            yield poll_until(_connected(relay, self.daemons[scheme]), 20, f"example daemon on {scheme} connected")

        # Trust the test CA like a root when certutil can build the profile's NSS database; else pin the
        # relay's certificate key. Never --ignore-certificate-errors.
        if shutil.which("certutil"):
            self.browser, self.trust = Chromium(trusted_ca=certs.ca_path), "CA in the profile's NSS database"
        else:
            self.browser, self.trust = Chromium(pinned_certificates=[certs.cert_path]), "SPKI pin of the relay certificate"
        self._cleanups.append(self.browser.stop)
        yield self.browser.start()

    @inlineCallbacks
    def stop(self) -> Any:
        """Stop what was started, last first, carrying on past failures."""
        while self._cleanups:
            try:
                yield self._cleanups.pop()()
            except Exception:
                pass

    @inlineCallbacks
    def run_page(self, scheme: str, token_via: str, subprotocol: Optional[str] = DEFAULT_SUBPROTOCOL) -> Any:
        """Open the test page for one case in a fresh browser context; fire with a ``PageRun``."""
        assert self.browser is not None
        relay = self.relays[scheme]
        handshake = handshake_for(
            relay.url, token=token("client", WORKSPACE, RUNTIME_TARGET), role="client", workspace_id=WORKSPACE,
            runtime_target_id=RUNTIME_TARGET, token_via=token_via,  # type: ignore[arg-type]
            subprotocol=subprotocol,
        )
        request_id = "r-browser-" + secrets.token_hex(4)
        config = {
            "url": handshake.url,
            "protocols": handshake.protocols,
            "requestId": request_id,
            "keyExchangeInit": kex_init(request_id),
            "envelope": json.loads(envelope("placeholder")),
            "timeoutMs": PAGE_TIMEOUT_MS,
        }
        page: Page = yield self.browser.open_page()
        try:
            yield page.navigate(f"{self.page_origin}/relay.html?config={quote(json.dumps(config))}")
            report = yield page.evaluate("window.outcome")
            return PageRun(report, handshake, page.websocket_handshakes(), page.describe())
        finally:
            yield page.close()


@pytest.fixture(scope="module")
def stack() -> Any:
    """The page server, a ws:// and a wss:// relay each with an example daemon, and headless Chromium."""
    started = Stack()
    try:
        pytest_twisted.blockon(started.start())
        yield started
    finally:
        pytest_twisted.blockon(started.stop())


@inlineCallbacks
def assert_round_trip(stack: Stack, scheme: str, token_via: str, subprotocol: Optional[str] = None) -> Any:
    """
    Run the page for one case and check that the browser opened the socket with the subprotocol the relay
    should echo (the plain name, else the only ``auth.`` offer, else none), that its envelope came back
    unchanged, and that the example daemon echoed that very session.
    """
    run: PageRun = yield stack.run_page(scheme, token_via, subprotocol)
    report, handshake = run.report, run.handshake
    diagnostics = f"report {report}\nbrowser trusts the test CA via: {stack.trust}\n{run.described}"
    assert urlsplit(stack.page_origin).netloc != urlsplit(stack.relays[scheme].url).netloc
    assert report["origin"] == stack.page_origin, diagnostics
    assert [socket["request"].get("Origin") for socket in run.sockets if socket["request"]] == [stack.page_origin], diagnostics
    assert report["outcome"] == "echo", diagnostics
    expected = handshake.protocols[0] if handshake.protocols else ""
    assert report["opened"] and report["protocol"] == expected, diagnostics
    assert report["echoed"] is True, diagnostics
    daemon = stack.daemons[scheme]
    echoed_line = f"echoed envelope seq=1 of session {report['sessionId']}"
    yield poll_until(lambda: echoed_line in daemon.lines, 10, f"daemon line {echoed_line!r}")


@pytest.mark.parametrize("scheme", ["ws", "wss"])
@pytest_twisted.inlineCallbacks
def test_browser_offering_plain_name_and_auth_token_round_trips(stack: Stack, scheme: str) -> Any:
    """A page offering ["viewport-relay-v1", "auth.<token>"] opens with viewport-relay-v1 echoed and gets its envelope back from the daemon."""
    yield assert_round_trip(stack, scheme, "subprotocol", DEFAULT_SUBPROTOCOL)


@pytest.mark.parametrize("scheme", ["ws", "wss"])
@pytest_twisted.inlineCallbacks
def test_browser_offering_only_auth_token_round_trips(stack: Stack, scheme: str) -> Any:
    """A page offering only ["auth.<token>"] gets that offer echoed, so the browser opens the socket and the envelope comes back."""
    yield assert_round_trip(stack, scheme, "subprotocol", None)


@pytest.mark.parametrize("scheme", ["ws", "wss"])
@pytest_twisted.inlineCallbacks
def test_browser_with_query_token_in_dev_mode_round_trips(stack: Stack, scheme: str) -> Any:
    """In dev mode a page passing ?token=<token> and offering no subprotocol opens with none echoed and gets its envelope back."""
    yield assert_round_trip(stack, scheme, "query")
