"""PostgreSQL for tests (a fresh database on the shared server, or a private cluster) and a real viewport-bus process."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from typing import Any, Dict, List, Mapping, Optional

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks

from tests.ports import free_port
from tests.support import REPO_ROOT, ServiceOutput, ServiceProcess  # noqa: F401 - test_bus_api.py imports REPO_ROOT from here

#: The machine's PostgreSQL (trust auth); override with VIEWPORT_TEST_PG_URL.
SHARED_SERVER_URL = os.environ.get("VIEWPORT_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432")
INTERNAL_KEY = "bus-test-internal-key-0123456789abcdef"
TOKEN_SECRET = "bus-test-token-secret-0123456789abcdef0123"


def _server_url(url: str, database: str) -> str:
    return f"{url.rstrip('/')}/{database}"


class ScratchDatabase:
    """A database of its own on a PostgreSQL server, dropped (even with open connections) by ``drop``."""

    def __init__(self, server_url: str = SHARED_SERVER_URL, encoding: Optional[str] = None) -> None:
        self.server_url = server_url
        self.name = f"bus_{uuid.uuid4().hex}"
        options = f" ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0" if encoding else ""
        with psycopg.connect(_server_url(server_url, "postgres"), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"{options}')
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


class BusProcess(ServiceProcess):
    """``twistd -r asyncio -n viewport-bus --port N`` on a database, in its own working directory."""

    kind = "bus"
    listening_event = "bus_listening"

    def __init__(self, database_url: str, env: Optional[Mapping[str, str]] = None, port: int = 0) -> None:
        super().__init__("bus-", {
            "BUS_DATABASE_URL": database_url,
            "RELAY_INTERNAL_KEY": INTERNAL_KEY,
            "RELAY_TOKEN_SECRET": TOKEN_SECRET,
            **(env or {}),
        }, port)

    def start(self) -> "Deferred[BusProcess]":
        """Spawn the bus (again, after a stop); fire once it listens (``url`` is then its http://host:port)."""
        self.output = ServiceOutput(self.listening_event)
        os.makedirs(self.workdir, exist_ok=True)
        self.output.ended.addBoth(self._remove_workdir)
        return self._spawn(["-r", "asyncio", "-n", "--pidfile=", "viewport-bus", "--port", str(self.port)])

    def _listening(self, url: str) -> None:
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])

    def _remove_workdir(self, result: Any) -> Any:
        shutil.rmtree(self.workdir, ignore_errors=True)
        return result


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
