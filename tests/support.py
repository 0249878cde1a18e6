"""Helpers for end-to-end tests: real twistd service processes (``viewport-relay``; the bus in pg_server.py), tokens, clients, peers."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, FirstError, gatherResults, inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from viewport.client import CloseInfo, ReconnectingConnection, RelayConnection, UpgradeRefused, connect, is_status
from viewport.tokens import mint_token

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_SECRET = "test-secret-0123456789abcdef0123456789abcdef"
STARTUP_DEADLINE_SECONDS = 20.0


#: Every token the test helpers minted, so tests/conftest.py can look for them in what services logged.
MINTED_TOKENS: List[str] = []


class ServiceOutput(ProcessProtocol):
    """Collects a twistd service's JSON log lines; ``listening`` fires with the URL of ``listening_event``."""

    #: Every output ever collected in this test process (tests/conftest.py scans them for secrets).
    instances: "List[ServiceOutput]" = []

    def __init__(self, listening_event: str = "relay_listening") -> None:
        ServiceOutput.instances.append(self)
        self._listening_event = f'"{listening_event}"'
        self.lines: List[str] = []
        self.listening: Deferred[str] = Deferred()
        self.ended: Deferred[int] = Deferred()
        self._partial = b""
        self.stderr = b""
        self.exit_signal: Optional[int] = None

    def outReceived(self, data: bytes) -> None:
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            if not self.listening.called and self._listening_event in line:
                self.listening.callback(json.loads(line)["details"]["url"])

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        code = reason.value.exitCode if isinstance(reason.value, (ProcessDone, ProcessTerminated)) else None
        self.exit_signal = getattr(reason.value, "signal", None)
        if not self.listening.called:
            self.listening.errback(
                RuntimeError(f"exited ({code}) before listening: {self.stderr.decode()[-2000:]} {self.lines[-5:]}")
            )
        self.ended.callback(code if code is not None else -1)


class ServiceProcess:
    """
    A twistd service started as ``twistd -n <plugin> --port <port>`` in its own working directory, with
    its JSON log collected; subclasses say which plugin and what its ``listening_event`` tells them.
    """

    #: What the service is called in messages.
    kind = "service"
    #: The log event whose ``details.url`` says the service listens.
    listening_event = "relay_listening"

    def __init__(self, workdir_prefix: str, env: Mapping[str, str], port: int) -> None:
        """``env`` adds to (or overrides) PATH, HOME and PYTHONPATH; ``port`` 0 is any free port."""
        self.workdir = tempfile.mkdtemp(prefix=workdir_prefix)
        self.env: Dict[str, str] = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": self.workdir,
            "PYTHONPATH": REPO_ROOT,
            **env,
        }
        self.port = port
        self.output = ServiceOutput(self.listening_event)
        self.url = ""
        self.transport: Any = None

    def _spawn(self, twistd_args: List[str]) -> "Deferred[Any]":
        """Spawn ``twistd`` with ``twistd_args``; fire with self once it listens, fail after the startup deadline."""
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *twistd_args]
        self.transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            self.output, sys.executable, argv, env=self.env, path=self.workdir
        )
        timer = reactor.callLater(STARTUP_DEADLINE_SECONDS, self._startup_timeout)  # type: ignore[attr-defined]

        def listening(url: str) -> "ServiceProcess":
            if timer.active():
                timer.cancel()
            self._listening(url)
            return self

        def failed(f: Failure) -> Failure:
            if timer.active():
                timer.cancel()
            return f

        return self.output.listening.addCallbacks(listening, failed)

    def _listening(self, url: str) -> None:
        self.url = url

    def _startup_timeout(self) -> None:
        if not self.output.listening.called:
            self.output.listening.errback(RuntimeError(f"{self.kind} did not listen in time"))
            self.kill()

    def signal(self, name: str) -> None:
        """Send a signal to the process (nothing once it is gone)."""
        if self.transport is not None and self.transport.pid is not None:
            self.transport.signalProcess(name)

    def stop(self) -> "Deferred[int]":
        """SIGTERM the process; fire with its exit code."""
        if not self.output.ended.called:
            try:
                self.signal("TERM")
            except ProcessExitedAlready:
                pass  # it exited meanwhile: ``ended`` fires all the same
        return self.output.ended

    def kill(self) -> None:
        """SIGKILL, for cleanup after a failure."""
        try:
            self.signal("KILL")
        except Exception:
            pass

    def events(self, name: str) -> List[Dict[str, Any]]:
        """Parsed JSON log entries with the given event name."""
        found = []
        for line in self.output.lines:
            if f'"{name}"' in line:
                entry = json.loads(line)
                if entry.get("event") == name:
                    found.append(entry)
        return found


class RelayProcess(ServiceProcess):
    """One relay started with ``twistd -n viewport-relay --port <port>`` (default 0) in its own working directory."""

    kind = "relay"

    def __init__(
        self,
        env: Optional[Mapping[str, str]] = None,
        args: Optional[List[str]] = None,
        unset: Iterable[str] = (),
        port: int = 0,
    ) -> None:
        """
        ``env`` adds to the defaults; ``unset`` removes default variables (e.g. RELAY_TOKEN_SECRET);
        ``port`` is the port to listen on (0: any free port).
        """
        super().__init__("relay-", {"RELAY_TOKEN_SECRET": TEST_SECRET, **(env or {})}, port)
        for name in unset:
            self.env.pop(name, None)
        self.args = args or []
        self.http_url = ""

    def start(self) -> "Deferred[RelayProcess]":
        """Spawn the relay; fire once it listens (with ``url`` set)."""
        return self._spawn(["-n", "--pidfile=", "viewport-relay", "--port", str(self.port), *self.args])

    def _listening(self, url: str) -> None:
        self.url = url
        self.http_url = url.replace("ws://", "http://").rsplit("/ws", 1)[0]


def token(
    role: str,
    workspace: str,
    runtime_target: Optional[str] = None,
    ttl: int = 3600,
    *,
    now: Optional[float] = None,
    key: str = TEST_SECRET,
    **claims: Any,
) -> str:
    """
    A relay token signed with the test secret (camelCase claims as keyword arguments).

    A claim given as ``None`` is left out (``scope=None`` drops the client's default scope);
    ``now`` back-dates the token and ``key`` signs it with another secret.
    """
    body: Dict[str, Any] = {"role": role, "workspaceId": workspace}
    if runtime_target is not None:
        body["runtimeTargetId"] = runtime_target
    if role == "client":
        body.setdefault("scope", "runtime")
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    issued = time.time() if now is None else now
    minted = mint_token(key=key, algorithm="HS256", claims=body, ttl_seconds=ttl, now=issued)
    MINTED_TOKENS.append(minted)
    return minted


def raw_token(claims: Mapping[str, Any], ttl: int = 3600) -> str:
    """A token holding exactly ``claims`` (plus iat/exp/jti), signed with the test secret."""
    minted = mint_token(key=TEST_SECRET, algorithm="HS256", claims=dict(claims), ttl_seconds=ttl, now=time.time())
    MINTED_TOKENS.append(minted)
    return minted


def open_peer(
    relay: RelayProcess,
    role: str,
    workspace: str,
    runtime_target: Optional[str] = None,
    query_target: Any = "same",
    token_via: str = "header",
    **claims: Any,
) -> "Deferred[RelayConnection]":
    """Connect a daemon/client/worker with a matching token; ``query_target`` may differ from the claim."""
    target = runtime_target if query_target == "same" else query_target
    return connect(
        reactor,
        relay.url,
        token=token(role, workspace, runtime_target, **claims),
        role=role,
        workspace_id=workspace,
        runtime_target_id=target,
        token_via=token_via,  # type: ignore[arg-type]
    )


@inlineCallbacks
def stop_all(*items: Any) -> Any:
    """Close connections and stop relays, ignoring what is already gone."""
    for item in items:
        try:
            if isinstance(item, RelayProcess):
                yield item.stop()
            elif item is not None and item.is_open:
                yield item.abort()
        except Exception:
            pass


def kill_on_exit(relay: RelayProcess) -> None:
    """Make sure a relay never outlives the test run."""
    import atexit

    atexit.register(lambda: os.kill(relay.transport.pid, signal.SIGKILL) if relay.transport and relay.transport.pid else None)


# --- helpers for the end-to-end suites (test_e2e_*.py) ------------------------------------------------

ADMIN_TOKEN = "admin-token-for-tests-0123456789"
POLL_INTERVAL_SECONDS = 0.02


def start_relays(*relays: RelayProcess) -> "Deferred[List[RelayProcess]]":
    """Start several relays at once; fire when all listen (kill them all if one fails)."""
    for relay in relays:
        kill_on_exit_later(relay)

    def failed(f: Failure) -> Failure:
        for relay in relays:
            relay.kill()
        return f.value.subFailure if isinstance(f.value, FirstError) else f  # type: ignore[no-any-return]

    return gatherResults([relay.start() for relay in relays], consumeErrors=True).addErrback(failed)


def stop_relays(*relays: RelayProcess) -> "Deferred[List[int]]":
    """SIGTERM several relays at once; fire with their exit codes."""
    return gatherResults([relay.stop() for relay in relays], consumeErrors=True)


def kill_on_exit_later(relay: RelayProcess) -> None:
    """Register an atexit SIGKILL that looks the pid up when it runs (the process may not exist yet)."""
    import atexit

    def kill() -> None:
        transport = relay.transport
        if transport is not None and transport.pid is not None:
            try:
                os.kill(transport.pid, signal.SIGKILL)
            except OSError:
                pass

    atexit.register(kill)


def open_with(
    relay: RelayProcess,
    bearer: str,
    role: str,
    workspace: str,
    runtime_target: Optional[str] = None,
    **options: Any,
) -> "Deferred[RelayConnection]":
    """Connect with a given token string; ``options`` go to ``viewport.client.connect`` (token_via, subprotocol, ...)."""
    return connect(
        reactor,
        relay.url,
        token=bearer,
        role=role,
        workspace_id=workspace,
        runtime_target_id=runtime_target,
        **options,
    )


def with_timeout(d: "Deferred[Any]", seconds: float) -> "Deferred[Any]":
    """``d``, failing with TimeoutError if it has not fired after ``seconds``."""
    return d.addTimeout(seconds, reactor)


def closed_within(conn: RelayConnection, seconds: float = 5.0) -> "Deferred[CloseInfo]":
    """The connection's CloseInfo, or TimeoutError if it stays open for ``seconds``."""
    return with_timeout(conn.closed, seconds)


@inlineCallbacks
def refused_status(d: "Deferred[RelayConnection]") -> Any:
    """The HTTP status of a refused upgrade (None when closed without an answer); fails if it opened."""
    try:
        conn = yield d
    except UpgradeRefused as refused:
        return refused.status
    yield conn.abort()
    raise AssertionError("the upgrade was accepted")


def unique_workspace(name: str) -> str:
    """A workspace id no other test uses (the suites share relays and backplanes)."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


@inlineCallbacks
def expect_close(conn: RelayConnection, code: int, reason: str, timeout: float = 5.0) -> Any:
    """The connection is closed by the relay with ``code`` and ``reason``."""
    info = yield closed_within(conn, timeout)
    assert (info.code, info.reason) == (code, reason)


@inlineCallbacks
def assert_nothing_pending(*conns: RelayConnection) -> Any:
    """
    Prove that no earlier frame is queued for each connection: its next message must be the
    INVALID_FRAME reply to a garbage frame it sends now (the relay answers in order).
    """
    for conn in conns:
        conn.send_text("garbage")
        reply = yield conn.next_json()
        assert is_status(reply, "INVALID_FRAME"), reply


class EchoDaemon:
    """
    A daemon that reconnects by itself (``connection``, not yet started), answers every key exchange
    init with session ``session-<requestId>`` and echoes every envelope; it keeps its failed attempts.
    """

    def __init__(self, url: str, workspace: str, runtime_target: str = "rt1", max_delay: float = 0.5) -> None:
        self.failed_attempts: List[BaseException] = []
        self.connection = ReconnectingConnection(
            reactor, url, token_factory=lambda: token("workspace-daemon", workspace, runtime_target),
            role="workspace-daemon", workspace_id=workspace, runtime_target_id=runtime_target,
            base_delay=0.05, max_delay=max_delay, on_message=self._message, on_attempt_failed=self.failed_attempts.append,
        )

    def _message(self, text: str) -> None:
        frame = json.loads(text)
        if frame.get("type") == "relay_key_exchange_init":
            request_id = frame["requestId"]
            self.connection.send_text(kex_response(request_id, f"session-{request_id}"))
        elif frame.get("type") == "e2ee":
            self.connection.send_text(text)


@inlineCallbacks
def poll_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """
    Call ``check`` (which may return a Deferred) every few milliseconds until it returns a truthy
    value, and return that value; fail with AssertionError after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = yield maybeDeferred(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s (last value {value!r})")
        yield deferLater(reactor, POLL_INTERVAL_SECONDS, lambda: None)


@inlineCallbacks
def http_request(
    method: str, url: str, headers: Optional[Mapping[str, str]] = None, data: Optional[bytes] = None
) -> Any:
    """One non-persistent HTTP request; fires with (status, lower-cased headers, body bytes)."""
    import treq

    sent: Dict[Any, Any] = dict(headers or {})
    response = yield treq.request(method, url, headers=sent, data=data, persistent=False, timeout=10)
    body = yield treq.content(response)
    found = {
        name.decode("latin-1").lower(): b", ".join(values).decode("latin-1")
        for name, values in response.headers.getAllRawHeaders()
    }
    return response.code, found, body


@inlineCallbacks
def fetch_metrics(relay: RelayProcess, admin_token: str = ADMIN_TOKEN) -> Any:
    """The relay's /metrics parsed into name → value (needs RELAY_ENABLE_ADMIN_HTTP and the admin token)."""
    status, _, body = yield http_request("GET", relay.http_url + "/metrics", {"Authorization": f"Bearer {admin_token}"})
    if status != 200:
        raise AssertionError(f"/metrics answered {status}: {body[:200]!r}")
    return parse_metrics(body.decode("utf-8"))


def parse_metrics(text: str) -> Dict[str, float]:
    """Prometheus text exposition to name (labels included verbatim) → value."""
    values: Dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        values[name] = float(value)
    return values


@inlineCallbacks
def metric_delta(relay: RelayProcess, names: Iterable[str], action: Callable[[], Any]) -> Any:
    """Run ``action`` (may return a Deferred) and return how much each named metric grew meanwhile."""
    names = list(names)
    before = yield fetch_metrics(relay)
    yield maybeDeferred(action)
    after = yield fetch_metrics(relay)
    return {name: after.get(name, 0.0) - before.get(name, 0.0) for name in names}


@inlineCallbacks
def metric_reaches(relay: RelayProcess, name: str, minimum: float, timeout: float = 10.0) -> Any:
    """Poll /metrics until ``name`` is at least ``minimum``; return the value."""

    @inlineCallbacks
    def check() -> Any:
        values = yield fetch_metrics(relay)
        value = values.get(name, 0.0)
        return value if value >= minimum else None

    return (yield poll_until(check, timeout, f"{name} >= {minimum}"))


class RawClient(Protocol):
    """Writes one request and collects what the server answers until it closes (``head_only``: until a whole response head arrived)."""

    def __init__(self, request: bytes, head_only: bool) -> None:
        self.request = request
        self.head_only = head_only
        self.received = b""
        self.done: "Deferred[bytes]" = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.head_only and b"\r\n\r\n" in self.received and not self.done.called:
            self.done.callback(self.received)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(self.received)


@inlineCallbacks
def raw_exchange(relay: RelayProcess, request: bytes, timeout: float = 5.0, head_only: bool = False) -> Any:
    """
    Send raw bytes over TCP; fire with everything the relay wrote before it closed the socket
    (or, with ``head_only``, as soon as a complete response head arrived; the socket is then dropped).
    """
    host, port = relay.http_url.split("://", 1)[1].rsplit(":", 1)
    endpoint = TCP4ClientEndpoint(reactor, host, int(port), timeout=timeout)
    client = RawClient(request, head_only)
    yield connectProtocol(endpoint, client)
    try:
        received = yield with_timeout(client.done, timeout)
    finally:
        if client.transport is not None:
            client.transport.abortConnection()  # type: ignore[attr-defined]
    return received


def upgrade_request(target: str, headers: Mapping[str, str], *, key: Optional[str] = "dGhlIHNhbXBsZSBub25jZQ==") -> bytes:
    """A raw WebSocket upgrade request head for ``target`` (``key=None`` leaves Sec-WebSocket-Key out)."""
    lines = [
        f"GET {target} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
    ]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def status_of(response: bytes) -> Optional[int]:
    """The status code of a raw HTTP response, or None if nothing (or no status line) arrived."""
    from viewport.client import parse_status_line

    return parse_status_line(response)


def e2e_env(**overrides: str) -> Dict[str, str]:
    """Relay environment for the e2e suites: admin HTTP on with ADMIN_TOKEN, a high upgrade rate, plus overrides."""
    env = {
        "RELAY_ENABLE_ADMIN_HTTP": "1",
        "RELAY_ADMIN_TOKEN": ADMIN_TOKEN,
        "RELAY_UPGRADE_RATE_PER_MINUTE": "100000",
    }
    env.update(overrides)
    return env


@inlineCallbacks
def settled(relay: RelayProcess, open_sockets: int = 0, timeout: float = 10.0) -> Any:
    """Wait until the relay counts exactly ``open_sockets`` registered sockets (opened − closed)."""

    @inlineCallbacks
    def check() -> Any:
        values = yield fetch_metrics(relay)
        live = values.get("relay_ws_connections_opened_total", 0.0) - values.get("relay_ws_connections_closed_total", 0.0)
        return live == open_sockets

    yield poll_until(check, timeout, f"{open_sockets} open sockets")


# --- frames as peers send them ------------------------------------------------------------------------

CHANNEL = "agent-session:a"
OTHER_CHANNEL = "agent-session:b"


def dumps(frame: Dict[str, Any]) -> str:
    """Compact JSON, as peers send it."""
    return json.dumps(frame, separators=(",", ":"))


def kex_init(request_id: str, profile: str = "noise-ik") -> str:
    """A v3 key exchange init."""
    return dumps({"type": "relay_key_exchange_init", "version": 3, "profile": profile, "requestId": request_id,
                  "clientEphemeralPublicKey": "e", "encryptedClientStatic": "s"})


def kex_response(request_id: str, session_id: str) -> str:
    """A v3 key exchange response with an extra field (forwarded untouched)."""
    return dumps({"type": "relay_key_exchange_response", "version": 3, "profile": "noise-ik", "requestId": request_id,
                  "daemonPublicKey": "d", "daemonEphemeralPublicKey": "e", "encryptedMetadata": "m",
                  "sessionId": session_id, "proof": "p", "epoch": 1, "extra": {"kept": True}})


def envelope(session_id: str, seq: int = 1, profile: str = "noise-ik") -> str:
    """An E2EE envelope."""
    return dumps({"type": "e2ee", "version": 2, "profile": profile, "sessionId": session_id, "epoch": 1, "seq": seq,
                  "iv": "i", "tag": "t", "ciphertext": f"c{seq}"})


def offer_request(request_id: str) -> str:
    """A pairing offer request."""
    return dumps({"type": "relay_pairing_offer_request", "requestId": request_id, "clientChannelPublicKey": "k",
                  "ttlSeconds": 60})


def offer_response(request_id: str) -> str:
    """A successful pairing offer response."""
    return dumps({"type": "relay_pairing_offer_response", "requestId": request_id, "ok": True,
                  "daemonChannelPublicKey": "d", "encIv": "i", "encTag": "t", "encCiphertext": "c"})


def redeem_request(request_id: str) -> str:
    """A pairing redeem request."""
    return dumps({"type": "relay_pairing_redeem_request", "requestId": request_id, "offerId": "o", "encIv": "i",
                  "encTag": "t", "encCiphertext": "c"})


def redeem_response(request_id: str) -> str:
    """A refused pairing redeem response."""
    return dumps({"type": "relay_pairing_redeem_response", "requestId": request_id, "ok": False,
                  "errorCode": "OFFER_EXPIRED"})


def subscribe(channel: str, after: Optional[int] = None) -> str:
    """A session-events subscribe."""
    frame: Dict[str, Any] = {"type": "viewport.session_events.subscribe/v1", "channel": channel}
    if after is not None:
        frame["afterSequence"] = after
    return dumps(frame)


def unsubscribe(channel: str) -> str:
    """A session-events unsubscribe."""
    return dumps({"type": "viewport.session_events.unsubscribe/v1", "channel": channel})


def presence(channel: str, user: str = "u1") -> str:
    """A viewer presence announcement."""
    return dumps({"type": "viewport.session_viewer_presence/v1", "channel": channel, "action": "joined",
                  "userId": user, "displayName": "Viewer"})


def session_event(channel: str, sequence: int) -> str:
    """A session event relay frame as a daemon emits it."""
    return dumps({"schema": "viewport.session_event_relay_frame/v1", "channel": channel,
                  "event": {"sequence": sequence, "kind": "message"}})
