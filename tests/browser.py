"""Headless Chromium for end-to-end tests: a private profile, the DevTools protocol and what a page logged."""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple, TypeVar

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

CHROMIUM = "/usr/bin/chromium"
# What works headless as root on this kind of machine (STACK-NOTES "Browsers"); the profile directory
# and the DevTools port are added per run.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
START_DEADLINE_SECONDS = 30.0
STOP_DEADLINE_SECONDS = 10.0
CALL_DEADLINE_SECONDS = 20.0
_DEVTOOLS_LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")
T = TypeVar("T")


def observe(d: "Deferred[T]") -> "Deferred[T]":
    """A new Deferred firing with ``d``'s result, ``d`` left as it is (a timeout on the copy never cancels ``d``)."""
    copy: Deferred[T] = Deferred()

    def passed_on(result: T) -> T:
        copy.callback(result)
        return result

    d.addCallback(passed_on)
    return copy


def chromium_binary() -> str:
    """
    Debian's ``/usr/bin/chromium`` (else ``chromium`` on PATH). Neither: the test is skipped on a
    developer machine and fails in CI, where ``.ci/run`` installs the package.
    """
    found = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if found:
        return found
    import pytest

    if os.environ.get("CI"):
        raise RuntimeError("chromium is not installed (apt-get install -y chromium)")
    pytest.skip("chromium is not installed (apt-get install -y chromium)")
    raise AssertionError("unreachable")


def spki_sha256(cert_path: str) -> str:
    """Base64 SHA-256 of a PEM certificate's SubjectPublicKeyInfo, as ``--ignore-certificate-errors-spki-list`` wants it."""
    with open(cert_path, "rb") as handle:
        cert = x509.load_pem_x509_certificate(handle.read())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def trust_ca_in_nss(home: str, ca_path: str) -> None:
    """Create ``<home>/.pki/nssdb`` (where Chromium on Linux keeps user trust) trusting ``ca_path`` for TLS servers."""
    certutil = shutil.which("certutil")
    if certutil is None:
        raise RuntimeError("certutil is not installed (apt-get install -y libnss3-tools)")
    database = "sql:" + os.path.join(home, ".pki", "nssdb")
    os.makedirs(os.path.join(home, ".pki", "nssdb"), exist_ok=True)
    subprocess.run([certutil, "-d", database, "-N", "--empty-password"], check=True, capture_output=True, timeout=30)
    subprocess.run(
        [certutil, "-d", database, "-A", "-t", "C,,", "-n", "viewport-relay test CA", "-i", ca_path],
        check=True, capture_output=True, timeout=30,
    )


class DevToolsError(Exception):
    """A DevTools command answered with an error, or the page's script threw."""


class _ChromiumOutput(ProcessProtocol):
    """Keeps Chromium's stderr; ``devtools_url`` fires with the browser's DevTools WebSocket URL."""

    def __init__(self) -> None:
        self.stderr = b""
        self.devtools_url: Deferred[str] = Deferred()
        self.ended: Deferred[Optional[int]] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.errReceived(data)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        if not self.devtools_url.called:
            found = _DEVTOOLS_LISTENING.search(self.stderr)
            if found:
                self.devtools_url.callback(found.group(1).decode("ascii"))

    def processEnded(self, reason: Failure) -> None:
        code = reason.value.exitCode if isinstance(reason.value, (ProcessDone, ProcessTerminated)) else None
        if not self.devtools_url.called:
            self.devtools_url.errback(RuntimeError(f"chromium exited ({code}) before DevTools listened: {self.tail()}"))
        self.ended.callback(code)

    def tail(self, size: int = 3000) -> str:
        """The end of stderr, without the D-Bus complaints every headless run prints here."""
        lines = [line for line in self.stderr.decode("utf-8", "replace").splitlines() if "dbus" not in line]
        return "\n".join(lines)[-size:]


class _DevToolsProtocol(WebSocketClientProtocol):
    """Hands every DevTools message to its ``DevToolsConnection``."""

    def onOpen(self) -> None:
        self.factory.connection._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.connection._received(json.loads(payload))

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self.factory.connection._closed(f"DevTools socket closed ({code} {reason})")


class DevToolsConnection:
    """One WebSocket to the browser's DevTools endpoint: commands (for the browser or a flat session) and events."""

    def __init__(self) -> None:
        self.events: List[Dict[str, Any]] = []
        self.opened: Deferred[DevToolsConnection] = Deferred()
        self._protocol: Optional[_DevToolsProtocol] = None
        self._next_id = 0
        self._pending: Dict[int, Tuple[str, Deferred[Dict[str, Any]]]] = {}
        self._waiters: List[Tuple[str, Optional[str], Deferred[Dict[str, Any]]]] = []
        self._closed_reason: Optional[str] = None

    @classmethod
    def connect(cls, url: str) -> "Deferred[DevToolsConnection]":
        """Open the DevTools WebSocket at ``url`` (``ws://127.0.0.1:<port>/devtools/browser/<id>``)."""
        connection = cls()
        factory = WebSocketClientFactory(url)
        factory.protocol = _DevToolsProtocol
        factory.connection = connection  # type: ignore[attr-defined]
        endpoint = TCP4ClientEndpoint(reactor, factory.host, factory.port, timeout=10)
        connecting = endpoint.connect(factory)
        connecting.addErrback(lambda f: connection.opened.errback(f) if not connection.opened.called else None)
        return connection.opened.addTimeout(CALL_DEADLINE_SECONDS, reactor)

    def call(self, method: str, params: Optional[Dict[str, Any]] = None, session_id: Optional[str] = None) -> "Deferred[Dict[str, Any]]":
        """Send a command; fire with its result, or fail with ``DevToolsError``."""
        answer: Deferred[Dict[str, Any]] = Deferred()
        if self._protocol is None or self._closed_reason is not None:
            answer.errback(DevToolsError(f"{method}: {self._closed_reason or 'not connected'}"))
            return answer
        self._next_id += 1
        message: Dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        self._pending[self._next_id] = (method, answer)
        self._protocol.sendMessage(json.dumps(message).encode("utf-8"))
        return answer.addTimeout(CALL_DEADLINE_SECONDS, reactor)

    def next_event(self, method: str, session_id: Optional[str] = None) -> "Deferred[Dict[str, Any]]":
        """Fire with the params of the next ``method`` event (of ``session_id``); ask before causing it."""
        waiter: Deferred[Dict[str, Any]] = Deferred()
        self._waiters.append((method, session_id, waiter))
        return waiter

    def close(self) -> None:
        """Drop the socket (the browser may already be gone)."""
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.abortConnection()  # type: ignore[attr-defined]

    def _opened(self, protocol: _DevToolsProtocol) -> None:
        self._protocol = protocol
        if not self.opened.called:  # else it timed out meanwhile
            self.opened.callback(self)

    def _received(self, message: Dict[str, Any]) -> None:
        if "id" in message:
            entry = self._pending.pop(message["id"], None)
            if entry is None or entry[1].called:
                return
            method, answer = entry
            if "error" in message:
                answer.errback(DevToolsError(f"{method}: {message['error']}"))
            else:
                answer.callback(message.get("result", {}))
            return
        self.events.append(message)
        for waiter in list(self._waiters):
            method, session_id, deferred = waiter
            if message.get("method") == method and (session_id is None or message.get("sessionId") == session_id):
                self._waiters.remove(waiter)
                if not deferred.called:
                    deferred.callback(message.get("params", {}))

    def _closed(self, reason: str) -> None:
        self._closed_reason = reason
        pending, self._pending = self._pending, {}
        for method, answer in pending.values():
            if not answer.called:
                answer.errback(DevToolsError(f"{method}: {reason}"))
        waiters, self._waiters = self._waiters, []
        for method, _, deferred in waiters:
            if not deferred.called:
                deferred.errback(DevToolsError(f"waiting for {method}: {reason}"))
        if not self.opened.called:
            self.opened.errback(DevToolsError(reason))


class Page:
    """A tab in a browser context of its own, attached as a flat DevTools session that records its console and network."""

    def __init__(self, devtools: DevToolsConnection, context_id: str, target_id: str, session_id: str) -> None:
        self.devtools = devtools
        self.context_id = context_id
        self.target_id = target_id
        self.session_id = session_id

    def _events(self) -> List[Dict[str, Any]]:
        return [event for event in self.devtools.events if event.get("sessionId") == self.session_id]

    @inlineCallbacks
    def navigate(self, url: str) -> Any:
        """Load ``url``; fire once its load event fired."""
        loaded = self.devtools.next_event("Page.loadEventFired", self.session_id)
        try:
            result = yield self.devtools.call("Page.navigate", {"url": url}, self.session_id)
            if result.get("errorText"):
                raise DevToolsError(f"navigation to {url} failed: {result['errorText']}")
        except Exception:
            loaded.addErrback(lambda _: None)  # nobody waits for the load event any more
            raise
        yield loaded.addTimeout(CALL_DEADLINE_SECONDS, reactor)

    @inlineCallbacks
    def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` in the page, a returned promise awaited."""
        result = yield self.devtools.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            self.session_id,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise DevToolsError(f"{expression} threw: {details.get('exception', {}).get('description') or details.get('text')}")
        return result["result"].get("value")

    def console(self) -> List[str]:
        """What the page logged: console calls, uncaught exceptions and the browser's own messages (network, security)."""
        lines: List[str] = []
        for event in self._events():
            params = event.get("params", {})
            if event.get("method") == "Runtime.consoleAPICalled":
                values = [str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])]
                lines.append(f"console.{params.get('type')}: {' '.join(values)}")
            elif event.get("method") == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                lines.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
            elif event.get("method") == "Log.entryAdded":
                entry = params.get("entry", {})
                lines.append(f"{entry.get('level')} ({entry.get('source')}): {entry.get('text')}")
        return lines

    def websocket_handshakes(self) -> List[Dict[str, Any]]:
        """Per WebSocket the page opened: its URL, the request headers sent, the response (status, headers) and errors."""
        sockets: Dict[str, Dict[str, Any]] = {}
        for event in self._events():
            method = event.get("method", "")
            params = event.get("params", {})
            if not method.startswith("Network.webSocket"):
                continue
            entry = sockets.setdefault(params.get("requestId", ""), {"url": None, "request": None, "response": None, "errors": []})
            if method == "Network.webSocketCreated":
                entry["url"] = params.get("url")
            elif method == "Network.webSocketWillSendHandshakeRequest":
                entry["request"] = params.get("request", {}).get("headers", {})
            elif method == "Network.webSocketHandshakeResponseReceived":
                response = params.get("response", {})
                entry["response"] = {"status": response.get("status"), "headers": response.get("headers", {})}
            elif method == "Network.webSocketFrameError":
                entry["errors"].append(params.get("errorMessage"))
        return list(sockets.values())

    def describe(self) -> str:
        """The console and the WebSocket handshakes, for an assertion message."""
        return "console:\n  " + "\n  ".join(self.console() or ["(nothing)"]) + f"\nwebsockets: {self.websocket_handshakes()}"

    @inlineCallbacks
    def close(self) -> Any:
        """Close the tab and dispose of its browser context."""
        try:
            yield self.devtools.call("Target.closeTarget", {"targetId": self.target_id})
        finally:
            yield self.devtools.call("Target.disposeBrowserContext", {"browserContextId": self.context_id})


class Chromium:
    """
    ``chromium --headless`` with a new empty profile and HOME, driven over the DevTools protocol.

    ``trusted_ca`` (a PEM CA file) is added to the profile's NSS database, so the browser verifies servers
    against it like any root; ``pinned_certificates`` (PEM server certificates) go to
    ``--ignore-certificate-errors-spki-list`` instead, which accepts exactly those keys.
    """

    def __init__(self, *, trusted_ca: Optional[str] = None, pinned_certificates: Sequence[str] = ()) -> None:
        self.directory = tempfile.mkdtemp(prefix="viewport-chromium-")
        self.home = os.path.join(self.directory, "home")
        self.profile = os.path.join(self.directory, "profile")
        self._trusted_ca = trusted_ca
        self._pins = [spki_sha256(path) for path in pinned_certificates]
        self.output = _ChromiumOutput()
        self.devtools: Optional[DevToolsConnection] = None
        self.transport: Any = None
        self.pid: Optional[int] = None
        self._own_session = False

    @inlineCallbacks
    def start(self) -> Any:
        """Spawn the browser and connect to its DevTools endpoint; fire with this object."""
        binary = chromium_binary()
        os.makedirs(self.home)
        os.makedirs(self.profile)
        if self._trusted_ca is not None:
            trust_ca_in_nss(self.home, self._trusted_ca)
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0"]
        if self._pins:
            flags.append("--ignore-certificate-errors-spki-list=" + ",".join(self._pins))
        argv = [binary, *flags, "about:blank"]
        # Its own session, so that cleanup can signal every process of the browser at once. setsid execs
        # in place (the child is no group leader), so the pid is the browser's.
        setsid = shutil.which("setsid")
        if setsid is not None:
            argv = [setsid, *argv]
            self._own_session = True
        env = {"PATH": os.environ.get("PATH", ""), "HOME": self.home, "LANG": "C.UTF-8"}
        self.transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            self.output, argv[0], argv, env=env, path=self.directory
        )
        self.pid = self.transport.pid
        # Should the test run end without stop() (an interrupted run), the browser goes with it.
        atexit.register(self._kill_all)
        url = yield self.output.devtools_url.addTimeout(START_DEADLINE_SECONDS, reactor)
        self.devtools = yield DevToolsConnection.connect(url)
        return self

    @inlineCallbacks
    def open_page(self) -> Any:
        """A blank tab in a new browser context, with the Page, Runtime, Log and Network domains on."""
        assert self.devtools is not None, "start() first"
        context = yield self.devtools.call("Target.createBrowserContext", {})
        target = yield self.devtools.call(
            "Target.createTarget", {"url": "about:blank", "browserContextId": context["browserContextId"]}
        )
        attached = yield self.devtools.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self.devtools, context["browserContextId"], target["targetId"], attached["sessionId"])
        for domain in ("Page", "Runtime", "Log", "Network"):
            yield self.devtools.call(f"{domain}.enable", {}, page.session_id)
        return page

    @inlineCallbacks
    def stop(self) -> Any:
        """Close the browser (SIGTERM, SIGKILL to all its processes after a deadline) and remove the profile."""
        try:
            if self.devtools is not None:
                self.devtools.close()
            if self.pid is not None and not self.output.ended.called:
                try:
                    os.kill(self.pid, signal.SIGTERM)
                    yield observe(self.output.ended).addTimeout(STOP_DEADLINE_SECONDS, reactor)
                except Exception:
                    self._kill_all()
                    yield observe(self.output.ended)
            # Helpers (zygotes, renderers) may outlive the browser process by a moment.
            self._kill_all()
        finally:
            atexit.unregister(self._kill_all)
            shutil.rmtree(self.directory, ignore_errors=True)

    def _kill_all(self) -> None:
        """SIGKILL the browser's session (every process it started), or the browser alone without setsid."""
        if self.pid is None:
            return
        try:
            if self._own_session:
                os.killpg(self.pid, signal.SIGKILL)
            elif not self.output.ended.called:
                os.kill(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
