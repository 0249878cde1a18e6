"""Helpers for the cross-relay end-to-end suites: relays sharing a Redis or viewport-bus backplane."""

from __future__ import annotations

import json
import uuid
from typing import Any, Dict, Iterable, Optional

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks

from tests.pg_server import INTERNAL_KEY, BusProcess, ScratchDatabase
from tests.redis_cluster import RedisCluster, shared_cluster
from tests.redis_server import SHARED_REDIS_HOST, SHARED_REDIS_PORT, free_port, redis_command
from tests.support import RelayProcess, e2e_env, http_request, kex_init, kex_response, poll_until
from viewport.client import RelayConnection, is_status
from viewport.relay.backplane.cluster_slots import key_slot
from viewport.relay.backplane.redis import presence_key
from viewport.relay.backplane.redis_cluster import cluster_presence_key

MACHINE_REDIS_PORT = SHARED_REDIS_PORT
HMAC_KEY = "cross-relay-test-bus-hmac-key-0123456789"
MODES = ("redis", "server")
#: The cross-relay suites also run on a Redis Cluster (``redis+cluster://``, the session's shared cluster).
CROSS_RELAY_MODES = MODES + ("redis-cluster",)


class Backplane:
    """
    What the relays of one test share: the machine's Redis under a fresh key prefix (or a private
    redis-server, or a Redis Cluster: mode ``redis-cluster``), or a viewport-bus; builds relay
    environments and reads presence directly.
    """

    def __init__(self, mode: str, *, bus_url: str = "", redis_port: int = MACHINE_REDIS_PORT,
                 redis_cluster: Optional[RedisCluster] = None) -> None:
        self.mode = mode
        self.bus_url = bus_url
        self.redis_port = redis_port
        if mode == "redis-cluster" and redis_cluster is None:
            redis_cluster = shared_cluster()
        self.redis_cluster = redis_cluster
        #: The machine's Redis may live elsewhere (VIEWPORT_TEST_REDIS_URL); private servers are local.
        self.redis_host = SHARED_REDIS_HOST if redis_port == SHARED_REDIS_PORT else "127.0.0.1"
        self.prefix = f"viewport-test:{uuid.uuid4().hex[:12]}"
        self.tag = uuid.uuid4().hex[:8]

    def env(self, relay_id: str, **extra: str) -> Dict[str, str]:
        """A relay environment on this backplane (admin HTTP on, bus forwarding by default)."""
        env = e2e_env(RELAY_BACKPLANE_MODE=self.mode, RELAY_BUS_HMAC_KEY=HMAC_KEY, RELAY_ID=relay_id)
        if self.mode == "redis":
            env.update(RELAY_BACKPLANE_URL=f"redis://{self.redis_host}:{self.redis_port}", RELAY_REDIS_KEY_PREFIX=self.prefix)
        elif self.redis_cluster is not None:
            env.update(RELAY_BACKPLANE_MODE="redis", RELAY_BACKPLANE_URL=self.redis_cluster.url,
                       RELAY_REDIS_KEY_PREFIX=self.prefix)
            if self.redis_cluster.certs is not None:
                # rediss+cluster:// trusts what OpenSSL trusts: the cluster's private CA here.
                env.update(SSL_CERT_FILE=self.redis_cluster.certs.ca_path)
        elif self.mode == "server":
            env.update(RELAY_BACKPLANE_URL=self.bus_url, RELAY_INTERNAL_KEY=INTERNAL_KEY)
        env.update(extra)
        return env

    def relay(self, name: str, *, port: int = 0, redirect: bool = False, **extra: str) -> RelayProcess:
        """
        A relay called ``<name>-<tag>`` (not started). With ``redirect`` it listens on a fixed free port,
        announces that port as its public URL and redirects clients to the daemon's relay.
        """
        if redirect:
            port = port or free_port()
            extra.setdefault("RELAY_CLIENT_REDIRECT_ENABLED", "1")
        if port:
            extra.setdefault("RELAY_PUBLIC_WS_BASE_URL", ws_url(port))
        return RelayProcess(self.env(f"{name}-{self.tag}", **extra), port=port)

    @inlineCallbacks
    def presence(self, workspace: str, runtime_target: str) -> Any:
        """The relay id the backplane names for the scope's daemon right now (None when none)."""
        if self.mode in ("redis", "redis-cluster"):
            raw = self.redis("GET", self.presence_key(workspace, runtime_target))
            return json.loads(raw)["relayId"] if isinstance(raw, str) else None
        body = json.dumps({"workspaceId": workspace, "runtimeTargetId": runtime_target}).encode()
        status, _, answer = yield http_request(
            "POST",
            self.bus_url + "/api/runtime/internal/relay/presence/resolve",
            {"content-type": "application/json", "x-relay-internal-key": INTERNAL_KEY},
            body,
        )
        document = json.loads(answer) if status == 200 else {}
        return document.get("relayId") if document.get("daemonConnected") else None

    def presence_key(self, workspace: str, runtime_target: str) -> str:
        """The Redis key of the scope's presence (hash-tagged on a cluster)."""
        if self.redis_cluster is not None:
            return cluster_presence_key(self.prefix, workspace, runtime_target)
        return presence_key(self.prefix, workspace, runtime_target)

    def redis(self, *args: str) -> object:
        """One command on the Redis (on a cluster: on the master of the slot of ``args[1]``, the key)."""
        if self.redis_cluster is not None:
            port = self.redis_cluster.master_of(key_slot(args[1]))
            return self.redis_cluster.command(port, *args)
        return redis_command(self.redis_port, *args, host=self.redis_host)

    def presence_at(self, workspace: str, runtime_target: str, relay: Optional[RelayProcess],
                    timeout: float = 10.0) -> "Deferred[Any]":
        """Wait until the scope's presence names ``relay`` (None: until no relay is named)."""
        wanted = relay_id_of(relay) if relay is not None else None

        @inlineCallbacks
        def check() -> Any:
            return (yield self.presence(workspace, runtime_target)) == wanted

        return poll_until(check, timeout, f"presence of {workspace} at {wanted}")


class BusOnScratchDatabase:
    """A viewport-bus process on a database of its own (for server mode)."""

    def __init__(self, database_url: Optional[str] = None, port: int = 0) -> None:
        self.database: Optional[ScratchDatabase] = None
        if database_url is None:
            self.database = ScratchDatabase()
            database_url = self.database.url
        self.process = BusProcess(database_url, port=port)

    @property
    def url(self) -> str:
        """The bus's base URL (http://127.0.0.1:port)."""
        return self.process.url

    def start(self) -> "Deferred[Any]":
        """Start the bus process; fires once it listens."""
        return self.process.start()

    def stop(self) -> "Deferred[int]":
        """SIGTERM the bus process."""
        return self.process.stop()

    @inlineCallbacks
    def close(self) -> Any:
        """Stop the process and drop the database."""
        try:
            yield self.process.stop()
        finally:
            if self.database is not None:
                self.database.drop()


def ws_url(port: int) -> str:
    """The WebSocket URL of a relay listening on 127.0.0.1:``port``."""
    return f"ws://127.0.0.1:{port}/ws"


def relay_id_of(relay: RelayProcess) -> str:
    """The RELAY_ID a relay was started with."""
    return relay.env["RELAY_ID"]


@inlineCallbacks
def ready_status(relay: RelayProcess) -> Any:
    """The HTTP status of the relay's /ready (None when it does not answer)."""
    try:
        status, _, _ = yield http_request("GET", relay.http_url + "/ready")
    except Exception:
        return None
    return status


def all_ready(relays: Iterable[RelayProcess], status: int = 200, timeout: float = 15.0) -> "Deferred[Any]":
    """Wait until every relay's /ready answers ``status``."""
    relays = list(relays)

    @inlineCallbacks
    def check() -> Any:
        statuses = yield gatherResults([ready_status(relay) for relay in relays])
        return all(each == status for each in statuses)

    return poll_until(check, timeout, f"/ready {status} on {len(relays)} relays")


@inlineCallbacks
def expect_status(conn: RelayConnection, code: str, timeout: float = 10.0) -> Any:
    """The connection's next message is a relay_status with ``code``; returns it."""
    frame = yield conn.next_json(timeout)
    assert is_status(frame, code), frame
    return frame


@inlineCallbacks
def key_exchange(client: RelayConnection, daemon: RelayConnection, request_id: str, session_id: str) -> Any:
    """A key exchange through the relays: init reaches the daemon, the response reaches the client."""
    client.send_text(kex_init(request_id))
    assert (yield daemon.next_message()) == kex_init(request_id)
    daemon.send_text(kex_response(request_id, session_id))
    received = yield client.next_message()
    assert received == kex_response(request_id, session_id), received


def successor(relay: RelayProcess) -> RelayProcess:
    """
    A fresh, not yet started process for a relay that stopped: the same environment, arguments
    and port (start it with a fixed port so it comes back where the balancer expects it).
    """
    env = {name: value for name, value in relay.env.items() if name != "HOME"}
    return RelayProcess(env, args=list(relay.args), port=relay.port)


def stopped_counters(relay: RelayProcess) -> Dict[str, int]:
    """The counters a stopped relay logged in its ``relay_stopped`` line (name → value; {} if it has none)."""
    entries = relay.events("relay_stopped")
    if not entries:
        return {}
    return {str(name): int(value) for name, value in entries[-1]["details"]["counters"]}


__all__ = [
    "CROSS_RELAY_MODES",
    "HMAC_KEY",
    "MODES",
    "Backplane",
    "BusOnScratchDatabase",
    "all_ready",
    "expect_status",
    "free_port",
    "key_exchange",
    "ready_status",
    "relay_id_of",
    "stopped_counters",
    "successor",
    "ws_url",
]
