"""A private Redis Cluster for tests: six (or one or two) ``redis-server --cluster-enabled yes`` processes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from tests.certs import TestCertificates, make_certificates
from tests.redis_server import _read_reply, free_port, redis_command, redis_server_binary

SLOT_COUNT = 16384
#: Short enough that a killed master is replaced in a few seconds, long enough that a busy
#: two-core machine does not see spurious failures (a node busy for a second is "PFAIL").
DEFAULT_NODE_TIMEOUT_MS = 1000
READY_DEADLINE_SECONDS = 30.0
POLL_SECONDS = 0.05


def redis_cli_binary() -> str:
    """The machine's ``redis-cli``: the test is skipped without one (and fails in CI)."""
    found = shutil.which("redis-cli")
    if found:
        return found
    import pytest

    if os.environ.get("CI"):
        raise RuntimeError("no redis-cli on PATH")
    pytest.skip("no redis-cli on PATH")
    raise AssertionError("unreachable")


def require_sharded_pubsub(binary: str) -> None:
    """Skip (fail in CI) unless ``binary`` is Redis 7.0 or later, the first with SSUBSCRIBE/SPUBLISH."""
    output = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    found = re.search(r"v=(\d+)\.(\d+)", output)
    if found and (int(found.group(1)), int(found.group(2))) >= (7, 0):
        return
    import pytest

    message = f"Redis Cluster tests need redis-server 7.0+, found {output.strip()!r}"
    if os.environ.get("CI"):
        raise RuntimeError(message)
    pytest.skip(message)


def _tls_context(ca_path: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_path)
    context.check_hostname = False  # the test's own commands: the relay's verification is what is tested
    return context


def tls_redis_command(port: int, ca_path: str, *args: str, host: str = "127.0.0.1") -> object:
    """``redis_command`` over TLS (trusting ``ca_path``): for a node that listens on a ``tls-port`` only."""
    with socket.create_connection((host, port), timeout=5) as raw:
        with _tls_context(ca_path).wrap_socket(raw, server_hostname=host) as conn:
            encoded = [part.encode("utf-8") for part in args]
            conn.sendall(b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in encoded))
            return _read_reply(conn.makefile("rb"))


@dataclass(frozen=True)
class ClusterCertificates:
    """
    What the nodes present: ``server`` (``make_certificates``: the private CA the relay is told to trust,
    and the nodes' serverAuth certificate for 127.0.0.1), plus a self-signed client certificate for the
    cluster bus, which demands one from its peers whatever ``tls-auth-clients`` says (Redis 7.0) and
    refuses a serverAuth-only one ("unsupported certificate"); ``bundle`` trusts both.
    """

    server: TestCertificates
    client_cert_path: str
    client_key_path: str
    bundle_path: str


def make_cluster_certificates(directory: str) -> ClusterCertificates:
    """``make_certificates`` in ``directory``, and the cluster bus's client certificate beside it."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    server = make_certificates(directory)
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "viewport-relay test cluster bus")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    paths = ClusterCertificates(server, os.path.join(directory, "bus-client.crt"),
                                os.path.join(directory, "bus-client.key"), os.path.join(directory, "node-ca.pem"))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    with open(paths.client_cert_path, "wb") as handle:
        handle.write(pem)
    with open(paths.client_key_path, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    with open(paths.bundle_path, "wb") as handle:
        handle.write(server.ca_pem() + pem)
    return paths


def _tls_args(certs: ClusterCertificates, port: int, plain_port: int = 0) -> List[str]:
    """A node on ``tls-port`` (and on ``plain_port`` unless 0) whose bus and replication links are TLS too."""
    return [
        "--port", str(plain_port),
        "--tls-port", str(port),
        "--tls-cert-file", certs.server.cert_path,
        "--tls-key-file", certs.server.key_path,
        "--tls-client-cert-file", certs.client_cert_path,
        "--tls-client-key-file", certs.client_key_path,
        "--tls-ca-cert-file", certs.bundle_path,
        "--tls-cluster", "yes",
        "--tls-replication", "yes",
        # Clients (the relay, redis-cli, these helpers) present no certificate: not what is tested.
        "--tls-auth-clients", "no",
    ]


def require_tls(binary: str, certs: ClusterCertificates) -> None:
    """
    Skip (fail in CI) unless ``binary`` serves TLS: a throwaway ``redis-server --port 0 --tls-port P``
    must answer PING over TLS within a deadline (a build without TLS refuses the options or never answers).
    """
    port = free_port()
    directory = tempfile.mkdtemp(prefix="viewport-redis-tls-probe-")
    process = subprocess.Popen(
        _die_with_parent([binary, *_tls_args(certs, port), "--tls-cluster", "no", "--tls-replication", "no",
                          "--save", "", "--appendonly", "no", "--dir", directory, "--daemonize", "no"]),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    problem = ""
    try:
        deadline = time.monotonic() + READY_DEADLINE_SECONDS
        while True:
            if process.poll() is not None:
                output = process.stdout.read().decode("utf-8", "replace") if process.stdout else ""
                problem = f"redis-server exited with {process.returncode}: {output[-500:].strip()}"
                break
            try:
                if tls_redis_command(port, certs.server.ca_path, "PING") == "PONG":
                    return
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                problem = f"no TLS answer on port {port} within {READY_DEADLINE_SECONDS} s"
                break
            time.sleep(POLL_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)
    import pytest

    message = f"TLS Redis Cluster tests need a redis-server built with TLS ({problem})"
    if os.environ.get("CI"):
        raise RuntimeError(message)
    pytest.skip(message)


@dataclass(frozen=True)
class NodeView:
    """One line of ``CLUSTER NODES``: a node as some node of the cluster sees it."""

    node_id: str
    port: int
    flags: Tuple[str, ...]
    master_id: Optional[str]
    slots: Tuple[Tuple[int, int], ...]

    @property
    def is_master(self) -> bool:
        """The node claims the master role."""
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        """The node is flagged as failing (``fail`` or ``fail?``)."""
        return "fail" in self.flags or "fail?" in self.flags


def parse_cluster_nodes(text: str) -> List[NodeView]:
    """Parse a ``CLUSTER NODES`` reply (an independent view, so tests can check the code's SlotMap)."""
    views = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split("@", 1)[0]
        port = int(address.rsplit(":", 1)[1])
        slots = []
        for entry in fields[8:]:
            if entry.startswith("["):
                continue  # a slot being imported or migrated: still owned by the node that lists it plainly
            start, _, end = entry.partition("-")
            slots.append((int(start), int(end or start)))
        master_id = None if fields[3] == "-" else fields[3]
        views.append(NodeView(fields[0], port, tuple(fields[2].split(",")), master_id, tuple(slots)))
    return views


def _info(port: int, section: str, command: Callable[..., object] = redis_command) -> Dict[str, str]:
    text = command(port, "INFO", section) if section != "cluster" else command(port, "CLUSTER", "INFO")
    assert isinstance(text, str)
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))
    return {key: value for key, value in pairs}


class ClusterNode:
    """One ``redis-server --cluster-enabled yes`` in its own directory (``nodes.conf`` survives a kill)."""

    def __init__(
        self, root: str, node_timeout_ms: int, used_ports: set[int], tls: Optional[ClusterCertificates] = None,
        plain_port: bool = False,
    ) -> None:
        """
        ``tls``: the node listens on a ``tls-port`` (``port`` is that port) and talks TLS to its peers;
        ``plain_port`` adds a plain ``port`` beside it (``plain_port``), as while a cluster moves to TLS.
        """
        self.tls = tls
        self.port = _distinct_free_port(used_ports)
        self.plain_port = _distinct_free_port(used_ports) if tls is not None and plain_port else 0
        self.bus_port = _distinct_free_port(used_ports)
        self.directory = os.path.join(root, str(self.port))
        os.makedirs(self.directory)
        self.log_path = os.path.join(self.directory, "redis.log")
        self.node_id = ""
        self._node_timeout_ms = node_timeout_ms
        self._process: Optional[subprocess.Popen[bytes]] = None

    @property
    def alive(self) -> bool:
        """The process runs (it was started and not killed)."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the process (no waiting: the cluster waits for all its nodes at once)."""
        listen = _tls_args(self.tls, self.port, self.plain_port) if self.tls is not None else ["--port", str(self.port)]
        args = [
            redis_server_binary(),
            *listen,
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-port", str(self.bus_port),  # port + 10000 may not exist for a high free port
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self._node_timeout_ms),
            # A replica of a killed master must always be allowed to take over, however stale.
            "--cluster-replica-validity-factor", "0",
            "--cluster-allow-replica-migration", "no",
            # A replica's first sync starts at once, and its offset moves every second (a replica
            # whose offset is still 0 counts as "loading" in CLUSTER SHARDS and is left out of CLUSTER SLOTS).
            "--repl-diskless-sync-delay", "0",
            "--repl-ping-replica-period", "1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--daemonize", "no",
            "--logfile", self.log_path,
            "--loglevel", "notice",
        ]
        self._process = subprocess.Popen(_die_with_parent(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def exited(self) -> Optional[int]:
        """The exit status when the process died by itself, else None."""
        return None if self._process is None else self._process.poll()

    def kill(self) -> None:
        """SIGKILL (resuming first, should it be stopped) and reap."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
        if process is not None:
            process.wait(timeout=10)

    def command(self, *args: str) -> object:
        """One command on a fresh connection (``redis_command``; over TLS for a TLS node)."""
        if self.tls is not None:
            return tls_redis_command(self.port, self.tls.server.ca_path, *args)
        return redis_command(self.port, *args)

    def log_tail(self, lines: int = 15) -> str:
        """The end of the node's log, for error messages."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""


def _die_with_parent(args: List[str]) -> List[str]:
    """
    ``args`` run so that the kernel SIGKILLs the node should the test process die without a teardown
    (util-linux ``setpriv --pdeathsig``, kept across exec), instead of leaving orphans holding ports.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *args] if setpriv else args


def _distinct_free_port(used: set[int]) -> int:
    while True:
        port = free_port()
        if port not in used:
            used.add(port)
            return port


class RedisCluster:
    """
    A private Redis Cluster of ``masters`` shards with ``replicas`` replicas each, in a temporary directory.

    ``start()`` blocks (polling, bounded by a deadline) until every live node reports ``cluster_state:ok``,
    all 16384 slots are served, all nodes agree on who owns which slot and every replica's link to its
    master is up. Three masters or more are joined with ``redis-cli --cluster create``; smaller clusters
    (benchmarks) are assembled by hand, as redis-cli refuses fewer than three masters. Use it as a context
    manager or call ``stop()`` in a ``finally``: it kills every process and removes the directory.

    ``tls=True``: every node listens on a ``tls-port`` only (``port 0``), with cluster bus and replication
    over TLS too, presenting a certificate (for 127.0.0.1 and localhost) from a private CA made in the
    directory (``certs``); ``url`` is then ``rediss+cluster://``, and the helpers talk TLS. ``plain_port=True``
    (with ``tls``) gives each node a plain port as well, which CLUSTER SHARDS then reports as ``port``
    beside ``tls-port``.
    """

    def __init__(
        self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = DEFAULT_NODE_TIMEOUT_MS, tls: bool = False,
        plain_port: bool = False,
    ) -> None:
        if masters < 1 or replicas < 0:
            raise ValueError("a cluster needs a master")
        self.masters_wanted = masters
        self.replicas_wanted = replicas
        self.node_timeout_ms = node_timeout_ms
        self.directory = tempfile.mkdtemp(prefix="viewport-redis-cluster-")
        self._tls = make_cluster_certificates(os.path.join(self.directory, "certs")) if tls else None
        #: The private CA (``ca_path``: what a client must trust) and the nodes' certificate (``tls=True``), else None.
        self.certs = self._tls.server if self._tls is not None else None
        used: set[int] = set()
        self.nodes = [ClusterNode(self.directory, node_timeout_ms, used, self._tls, plain_port)
                      for _ in range(masters * (1 + replicas))]
        #: Seconds the last ``start()`` took (processes up to a healthy, agreed cluster).
        self.start_seconds = 0.0

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> "RedisCluster":
        """Start the nodes, join them into a cluster and wait until it is healthy; on failure stop everything."""
        began = time.monotonic()
        try:
            require_sharded_pubsub(redis_server_binary())
            if self._tls is not None:
                require_tls(redis_server_binary(), self._tls)
            for node in self.nodes:
                node.start()
            self._wait_until(lambda: all(self._answers(node) for node in self.nodes), "cluster nodes did not start")
            for node in self.nodes:
                node.node_id = str(node.command("CLUSTER", "MYID"))
            if self.masters_wanted >= 3:
                self._create_with_redis_cli()
            else:
                self._create_by_hand()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Kill every node and remove the directory (safe to call twice, or after a failed start)."""
        for node in self.nodes:
            try:
                node.kill()
            except Exception:  # noqa: BLE001 - keep killing the others
                pass
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "RedisCluster":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _create_with_redis_cli(self) -> None:
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        tls = ["--tls", "--cacert", self.certs.ca_path] if self.certs is not None else []
        result = subprocess.run(
            [redis_cli_binary(), *tls, "--cluster", "create", *addresses,
             "--cluster-replicas", str(self.replicas_wanted), "--cluster-yes"],
            capture_output=True, text=True, timeout=READY_DEADLINE_SECONDS,
        )
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {result.stdout[-2000:]} {result.stderr[-2000:]}")

    def _create_by_hand(self) -> None:
        # What redis-cli does, for a cluster it refuses to build: spread the slots over the masters,
        # give each its own config epoch, introduce everyone, then attach the replicas.
        masters = self.nodes[: self.masters_wanted]
        bounds = [SLOT_COUNT * index // len(masters) for index in range(len(masters) + 1)]
        for index, master in enumerate(masters):
            master.command("CLUSTER", "ADDSLOTSRANGE", str(bounds[index]), str(bounds[index + 1] - 1))
            master.command("CLUSTER", "SET-CONFIG-EPOCH", str(index + 1))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.command("CLUSTER", "MEET", "127.0.0.1", str(first.port), str(first.bus_port))
        self._wait_until(
            lambda: all(self._info(node.port, "cluster").get("cluster_known_nodes") == str(len(self.nodes))
                        for node in self.nodes),
            "cluster nodes did not meet",
        )
        for index, replica in enumerate(self.nodes[len(masters):]):
            master = masters[index % len(masters)]
            # The replica must know the master's id before it can follow it.
            self._wait_until(lambda: master.node_id in str(replica.command("CLUSTER", "NODES")),
                             "replica does not know its master")
            replica.command("CLUSTER", "REPLICATE", master.node_id)

    # -- topology ---------------------------------------------------------------------------------

    @property
    def live_nodes(self) -> List[ClusterNode]:
        """The nodes whose process runs."""
        return [node for node in self.nodes if node.alive]

    @property
    def ports(self) -> List[int]:
        """Every node's client port, in start order."""
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...`` naming every live node (``rediss+cluster://`` with TLS)."""
        scheme = "rediss+cluster" if self.certs is not None else "redis+cluster"
        return f"{scheme}://" + ",".join(f"127.0.0.1:{node.port}" for node in self.live_nodes)

    def command(self, port: int, *args: str) -> object:
        """One command to the node on ``port`` (``redis_command``; over TLS, trusting the CA, with ``tls=True``)."""
        if self.certs is not None:
            return tls_redis_command(port, self.certs.ca_path, *args)
        return redis_command(port, *args)

    def _info(self, port: int, section: str) -> Dict[str, str]:
        return _info(port, section, self.command)

    def node(self, port: int) -> ClusterNode:
        """The node listening on ``port``."""
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    def view(self, port: Optional[int] = None) -> List[NodeView]:
        """``CLUSTER NODES`` as the node on ``port`` (default: the first live node) sees it."""
        asked = port if port is not None else self.live_nodes[0].port
        text = self.command(asked, "CLUSTER", "NODES")
        assert isinstance(text, str)
        return parse_cluster_nodes(text)

    def key_slot(self, key: str) -> int:
        """The slot of ``key`` as Redis computes it (``CLUSTER KEYSLOT``)."""
        slot = self.command(self.live_nodes[0].port, "CLUSTER", "KEYSLOT", key)
        assert isinstance(slot, int)
        return slot

    def master_of(self, slot: int) -> int:
        """The port of the master that serves ``slot`` (as the first live node sees it)."""
        for entry in self.view():
            if entry.is_master and not entry.failed and any(start <= slot <= end for start, end in entry.slots):
                return entry.port
        raise LookupError(f"no master serves slot {slot}")

    def replicas_of(self, slot: int) -> List[int]:
        """The ports of the live replicas of ``slot``'s master."""
        views = self.view()
        master_port = self.master_of(slot)
        master_id = next(entry.node_id for entry in views if entry.port == master_port)
        return sorted(
            entry.port for entry in views
            if entry.master_id == master_id and not entry.failed and self.node(entry.port).alive
        )

    def masters(self) -> List[int]:
        """The ports of the masters that serve slots, in slot order."""
        serving = [entry for entry in self.view() if entry.is_master and entry.slots and not entry.failed]
        return [entry.port for entry in sorted(serving, key=lambda entry: min(entry.slots))]

    # -- faults -----------------------------------------------------------------------------------

    def failover(self, replica_port: int, mode: str = "") -> float:
        """
        ``CLUSTER FAILOVER [FORCE|TAKEOVER]`` on a replica; returns the seconds until every live node
        agrees it is a master and the cluster is healthy again.
        """
        began = time.monotonic()
        args = ["CLUSTER", "FAILOVER"] + ([mode] if mode else [])
        self.node(replica_port).command(*args)
        self.wait_healthy(lambda: self._agreed_master(replica_port))
        return time.monotonic() - began

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port``: its clients see their connections reset."""
        self.node(port).kill()

    def wait_for_promotion(self, replica_port: int) -> float:
        """After a master was killed: seconds until ``replica_port`` is master on every live node and all is ok."""
        began = time.monotonic()
        self.wait_healthy(lambda: self._agreed_master(replica_port))
        return time.monotonic() - began

    def revive(self, port: int) -> None:
        """Restart a killed node with its ``nodes.conf``; it rejoins (a former master as a replica)."""
        node = self.node(port)
        node.start()
        self._wait_until(lambda: self._answers(node), f"node {port} did not restart")
        self.wait_healthy(lambda: not any(entry.failed for entry in self.view(port)))

    def move_slot(self, slot: int, to_port: int) -> None:
        """Migrate ``slot`` (and its keys) to the master on ``to_port``, as ``redis-cli --cluster reshard`` does."""
        self.begin_slot_move(slot, to_port)
        self.finish_slot_move(slot, to_port)

    def begin_slot_move(self, slot: int, to_port: int) -> None:
        """Mark ``slot`` IMPORTING on the master on ``to_port`` and MIGRATING on its owner (keys stay put)."""
        source = self.node(self.master_of(slot))
        target = self.node(to_port)
        target.command("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source.node_id)
        source.command("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target.node_id)

    def finish_slot_move(self, slot: int, to_port: int) -> None:
        """MIGRATE the slot's keys, then ``SETSLOT NODE`` on both ends and every other master; wait for agreement."""
        source = self.node(self.master_of(slot))
        target = self.node(to_port)
        while True:
            keys = source.command("CLUSTER", "GETKEYSINSLOT", str(slot), "100")
            assert isinstance(keys, list)
            if not keys:
                break
            source.command("MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", *map(str, keys))
        others = [self.node(port) for port in self.masters() if port not in (source.port, target.port)]
        for node in [target, source, *others]:
            node.command("CLUSTER", "SETSLOT", str(slot), "NODE", target.node_id)
        self.wait_healthy(lambda: all(self.master_of_as_seen(slot, node.port) == to_port for node in self.live_nodes))

    def master_of_as_seen(self, slot: int, by_port: int) -> Optional[int]:
        """The master of ``slot`` according to the node on ``by_port`` (None when it knows none)."""
        for entry in self.view(by_port):
            if entry.is_master and any(start <= slot <= end for start, end in entry.slots):
                return entry.port
        return None

    # -- waiting ----------------------------------------------------------------------------------

    def healthy(self) -> bool:
        """Every live node: state ok, all slots ok, same slot owners; every live replica linked to its master."""
        try:
            owners = None
            for node in self.live_nodes:
                info = self._info(node.port, "cluster")
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOT_COUNT):
                    return False
                views = self.view(node.port)
                mine = sorted((entry.port, entry.slots) for entry in views if entry.is_master and entry.slots)
                if owners is None:
                    owners = mine
                elif mine != owners:
                    return False
                me = next(entry for entry in views if "myself" in entry.flags)
                if not me.is_master and self._info(node.port, "replication").get("master_link_status") != "up":
                    return False
                if not self._all_live_online(node.port):
                    return False
            return owners is not None
        except (OSError, RuntimeError, StopIteration):
            return False

    def wait_healthy(self, also: Callable[[], bool] = lambda: True) -> None:
        """Block until ``healthy()`` and ``also()`` hold (deadline ``READY_DEADLINE_SECONDS``)."""
        self._wait_until(lambda: self.healthy() and also(), "the cluster did not become healthy")

    def _all_live_online(self, port: int) -> bool:
        # CLUSTER SHARDS calls a replica "loading" until its replication offset moved off 0: clients
        # (and CLUSTER SLOTS) ignore it until then.
        health = {}
        shards = self.command(port, "CLUSTER", "SHARDS")
        assert isinstance(shards, list)
        for shard in shards:
            for fields in dict(zip(shard[::2], shard[1::2]))["nodes"]:
                entry = dict(zip(fields[::2], fields[1::2]))
                # A TLS cluster names the TLS port "tls-port" (and "port" only for a plain one beside it).
                health[entry["tls-port" if self.certs is not None else "port"]] = entry["health"]
        return all(health.get(node.port) == "online" for node in self.live_nodes)

    def _agreed_master(self, port: int) -> bool:
        return all(
            any(entry.port == port and entry.is_master and entry.slots for entry in self.view(node.port))
            for node in self.live_nodes
        )

    def _answers(self, node: ClusterNode) -> bool:
        # A short timeout: whatever else listens on a port a node failed to bind must not stall the wait.
        try:
            if self.certs is not None:
                return self._answers_tls(node.port, self.certs.ca_path)
            with socket.create_connection(("127.0.0.1", node.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _answers_tls(self, port: int, ca_path: str) -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw:
            with _tls_context(ca_path).wrap_socket(raw, server_hostname="127.0.0.1") as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")

    def _wait_until(self, ready: Callable[[], bool], message: str) -> None:
        deadline = time.monotonic() + READY_DEADLINE_SECONDS
        while True:
            for node in self.nodes:
                status = node.exited()
                if status is not None:
                    raise RuntimeError(f"{message}: node {node.port} exited with {status}:\n{node.log_tail()}")
            try:
                if ready():
                    return
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {node.port}\n{node.log_tail(5)}" for node in self.nodes)
                raise RuntimeError(f"{message} within {READY_DEADLINE_SECONDS} s\n{logs}")
            time.sleep(POLL_SECONDS)


def start_cluster(
    masters: int = 3, replicas: int = 1, node_timeout_ms: int = DEFAULT_NODE_TIMEOUT_MS, tls: bool = False,
    plain_port: bool = False,
) -> RedisCluster:
    """A started ``RedisCluster`` (for a fixture: ``cluster = start_cluster(); yield cluster; cluster.stop()``)."""
    return RedisCluster(masters, replicas, node_timeout_ms, tls=tls, plain_port=plain_port).start()


_SHARED: Optional[RedisCluster] = None


def shared_cluster() -> RedisCluster:
    """
    A 3-master, 3-replica cluster started on first use and stopped when the test process exits, for
    tests that leave its topology alone (each under a key prefix of its own).
    """
    global _SHARED
    if _SHARED is None or not all(node.alive for node in _SHARED.nodes):
        import atexit

        _SHARED = start_cluster()
        atexit.register(_SHARED.stop)
    return _SHARED


def single_shard(replica: bool = False, node_timeout_ms: int = DEFAULT_NODE_TIMEOUT_MS) -> RedisCluster:
    """A started one-shard cluster (one master owning every slot, optionally one replica), for benchmarks."""
    return RedisCluster(1, 1 if replica else 0, node_timeout_ms).start()
