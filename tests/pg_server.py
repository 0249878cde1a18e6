"""PostgreSQL for tests (a fresh database on the shared server, or a private cluster) and a real viewport-bus process."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from typing import Any, Dict, List, Mapping, Optional

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.failure import Failure

from tests.support import REPO_ROOT, ServiceOutput

#: The machine's PostgreSQL (trust auth); override with VIEWPORT_TEST_PG_URL.
SHARED_SERVER_URL = os.environ.get("VIEWPORT_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432")
INTERNAL_KEY = "bus-test-internal-key-0123456789abcdef"
TOKEN_SECRET = "bus-test-token-secret-0123456789abcdef0123"
STARTUP_DEADLINE_SECONDS = 20.0


def _server_url(url: str, database: str) -> str:
    return f"{url.rstrip('/')}/{database}"


class ScratchDatabase:
    """A database of its own on a PostgreSQL server, dropped (even with open connections) by ``drop``."""

    def __init__(self, server_url: str = SHARED_SERVER_URL) -> None:
        self.server_url = server_url
        self.name = f"bus_{uuid.uuid4().hex}"
        with psycopg.connect(_server_url(server_url, "postgres"), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.url = _server_url(server_url, self.name)

    def execute(self, sql: str, params: Any = None) -> List[Any]:
        """Run one statement in the test database; the rows it returned (if any)."""
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def drop(self) -> None:
        """Drop the database (PostgreSQL 13+: terminating its connections)."""
        try:
            with psycopg.connect(_server_url(self.server_url, "postgres"), autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        except psycopg.OperationalError:
            pass


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not candidates:
        raise RuntimeError(f"PostgreSQL's {name} was not found")
    return candidates[-1]


def _unprivileged(argv: List[str]) -> List[str]:
    # PostgreSQL refuses to run as root: map root to an ordinary uid in a user namespace.
    if os.geteuid() == 0:
        return ["unshare", "--user", "--map-user=1000", "--map-group=1000", "--", *argv]
    return argv


class PrivateCluster:
    """A throw-away PostgreSQL cluster on a free port, which tests may stop and start at will."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="pg-")
        self.data = os.path.join(self.root, "data")
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}"
        self._run(
            _pg_binary("initdb"), "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"
        )

    def _run(self, *argv: str) -> None:
        result = subprocess.run(_unprivileged(list(argv)), capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({result.returncode}): {result.stderr[-2000:]}")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(_pg_binary("pg_ctl"), "-D", self.data, "-o", options, "-l", os.path.join(self.root, "log"), "-w", "start")

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are terminated)."""
        self._run(_pg_binary("pg_ctl"), "-D", self.data, "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        """Stop the server if it runs and delete its files."""
        try:
            self.stop()
        except RuntimeError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


class BusProcess:
    """``twistd -r asyncio -n viewport-bus --port N`` on a database, in its own working directory."""

    def __init__(self, database_url: str, env: Optional[Mapping[str, str]] = None, port: int = 0) -> None:
        self.workdir = tempfile.mkdtemp(prefix="bus-")
        self.env: Dict[str, str] = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": self.workdir,
            "PYTHONPATH": REPO_ROOT,
            "BUS_DATABASE_URL": database_url,
            "RELAY_INTERNAL_KEY": INTERNAL_KEY,
            "RELAY_TOKEN_SECRET": TOKEN_SECRET,
        }
        if env:
            self.env.update(env)
        self.port = port
        self.output = ServiceOutput("bus_listening")
        self.url = ""
        self.transport: Any = None

    def start(self) -> "Deferred[BusProcess]":
        """Spawn the bus; fire once it listens (``url`` is then its http://host:port)."""
        self.output = ServiceOutput("bus_listening")
        os.makedirs(self.workdir, exist_ok=True)
        self.output.ended.addBoth(self._remove_workdir)
        argv = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-r", "asyncio", "-n", "--pidfile=", "viewport-bus", "--port", str(self.port),
        ]
        self.transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            self.output, sys.executable, argv, env=self.env, path=self.workdir
        )
        timer = reactor.callLater(STARTUP_DEADLINE_SECONDS, self._startup_timeout)  # type: ignore[attr-defined]

        def listening(url: str) -> "BusProcess":
            if timer.active():
                timer.cancel()
            self.url = url
            self.port = int(url.rsplit(":", 1)[1])
            return self

        def failed(f: Failure) -> Failure:
            if timer.active():
                timer.cancel()
            return f

        return self.output.listening.addCallbacks(listening, failed)

    def _remove_workdir(self, result: Any) -> Any:
        shutil.rmtree(self.workdir, ignore_errors=True)
        return result

    def _startup_timeout(self) -> None:
        if not self.output.listening.called:
            self.output.listening.errback(RuntimeError("bus did not listen in time"))
            self.kill()

    def stop(self) -> "Deferred[int]":
        """SIGTERM the bus; fire with its exit code."""
        if not self.output.ended.called and self.transport is not None:
            try:
                self.transport.signalProcess("TERM")
            except Exception:
                pass
        return self.output.ended

    def kill(self) -> None:
        """SIGKILL, for cleanup after a failure."""
        if self.transport is not None and not self.output.ended.called:
            try:
                self.transport.signalProcess("KILL")
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


__all__ = ["BusProcess", "PrivateCluster", "ScratchDatabase", "free_port", "server_backplane", "server_harness"]


# --- the "server" provider of the IBackplane contract suite ------------------------------------

#: The bus HMAC key shared by the server-mode backplanes of the contract suite.
BUS_HMAC_KEY = "contract-bus-hmac-key"


def http_client() -> Any:
    """A treq client on its own persistent connection pool; returns ``(client, pool)``."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    return HTTPClient(Agent(reactor, pool=pool)), pool


def server_backplane(bus_url: str, relay_id: str, client: Any, **overrides: Any) -> Any:
    """A ServerBackplane for ``relay_id`` talking to the bus at ``bus_url`` with test settings."""
    from viewport.relay.backplane.server import ServerBackplane

    settings: Dict[str, Any] = {
        "relay_id": relay_id,
        "public_ws_base_url": f"ws://{relay_id}.test:7781/ws",
        "server_url": bus_url,
        "internal_key": INTERNAL_KEY,
        "hmac_key": BUS_HMAC_KEY,
        "http_client": client,
        "clock": reactor,
        "pull_wait_ms": 1000,
    }
    settings.update(overrides)
    return ServerBackplane(**settings)


@inlineCallbacks
def server_harness() -> Any:
    """Contract harness: three ServerBackplanes on a real viewport-bus with a database of its own."""
    from tests.backplane_providers import BackplaneHarness

    class ServerHarness(BackplaneHarness):
        cross_relay = True
        confirms_delivery = False

        @inlineCallbacks
        def close(self) -> Any:
            try:
                yield BackplaneHarness.close(self)
                yield pool.closeCachedConnections()
            finally:
                yield bus.stop()
                database.drop()

    database = ScratchDatabase()
    bus = BusProcess(database.url)
    try:
        yield bus.start()
    except Exception:
        bus.kill()
        database.drop()
        raise
    client, pool = http_client()
    # The contract expects another relay's disconnect to be visible at once: no positive cache
    # here (the cache is covered by test_backplane_server).
    harness = ServerHarness(
        *(server_backplane(bus.url, relay_id, client, resolve_cache_ms=0) for relay_id in ("relay-a", "relay-b", "relay-c"))
    )
    yield harness.start()
    return harness
