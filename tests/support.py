"""Helpers for end-to-end tests: a real ``twistd -n viewport-relay`` process, tokens, clients."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from viewport.client import RelayConnection, connect
from viewport.tokens import mint_token

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_SECRET = "test-secret-0123456789abcdef0123456789abcdef"
STARTUP_DEADLINE_SECONDS = 20.0


class _RelayOutput(ProcessProtocol):
    """Collects the relay's JSON log lines and fires when it announces its listening URL."""

    def __init__(self) -> None:
        self.lines: List[str] = []
        self.listening: Deferred[str] = Deferred()
        self.ended: Deferred[int] = Deferred()
        self._partial = b""
        self.stderr = b""

    def outReceived(self, data: bytes) -> None:
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            if not self.listening.called and '"relay_listening"' in line:
                self.listening.callback(json.loads(line)["details"]["url"])

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        code = reason.value.exitCode if isinstance(reason.value, (ProcessDone, ProcessTerminated)) else None
        if not self.listening.called:
            self.listening.errback(
                RuntimeError(f"relay exited ({code}) before listening: {self.stderr.decode()[-2000:]} {self.lines[-5:]}")
            )
        self.ended.callback(code if code is not None else -1)


class RelayProcess:
    """One relay started with ``twistd -n viewport-relay --port 0`` in its own working directory."""

    def __init__(self, env: Optional[Mapping[str, str]] = None, args: Optional[List[str]] = None) -> None:
        self.workdir = tempfile.mkdtemp(prefix="relay-")
        self.env: Dict[str, str] = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": self.workdir,
            "PYTHONPATH": REPO_ROOT,
            "RELAY_TOKEN_SECRET": TEST_SECRET,
        }
        if env:
            self.env.update(env)
        self.args = args or []
        self.output = _RelayOutput()
        self.url = ""
        self.http_url = ""
        self.transport: Any = None

    def start(self) -> "Deferred[RelayProcess]":
        """Spawn the relay; fire once it listens (with ``url`` set)."""
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "viewport-relay", "--port", "0", *self.args]
        self.transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            self.output, sys.executable, argv, env=self.env, path=self.workdir
        )
        timer = reactor.callLater(STARTUP_DEADLINE_SECONDS, self._startup_timeout)  # type: ignore[attr-defined]

        def listening(url: str) -> "RelayProcess":
            if timer.active():
                timer.cancel()
            self.url = url
            self.http_url = url.replace("ws://", "http://").rsplit("/ws", 1)[0]
            return self

        def failed(f: Failure) -> Failure:
            if timer.active():
                timer.cancel()
            return f

        return self.output.listening.addCallbacks(listening, failed)

    def _startup_timeout(self) -> None:
        if not self.output.listening.called:
            self.output.listening.errback(RuntimeError("relay did not listen in time"))
            self.kill()

    def signal(self, name: str) -> None:
        """Send a signal to the relay process."""
        if self.transport is not None and self.transport.pid is not None:
            self.transport.signalProcess(name)

    def stop(self) -> "Deferred[int]":
        """SIGTERM the relay; fire with its exit code."""
        if not self.output.ended.called:
            self.signal("TERM")
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


def token(role: str, workspace: str, runtime_target: Optional[str] = None, ttl: int = 3600, **claims: Any) -> str:
    """A relay token signed with the test secret (camelCase claims as keyword arguments)."""
    body: Dict[str, Any] = {"role": role, "workspaceId": workspace}
    if runtime_target is not None:
        body["runtimeTargetId"] = runtime_target
    if role == "client":
        body.setdefault("scope", "runtime")
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return mint_token(key=TEST_SECRET, algorithm="HS256", claims=body, ttl_seconds=ttl, now=time.time())


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
