"""
The Docker image for real: built from this checkout on a private engine, the README's ``docker run`` lines, compose.

Without an engine only the static checks run (hadolint, pinned dependencies, the version label); the rest is
skipped on a machine without docker.io and mmdebstrap, and fails under ``CI``. See tests/docker_engine.py for
how the engine and the registry-free base images are made.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import secrets
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import pytest
import pytest_twisted
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.ssl import Certificate, optionsForClientTLS

from tests import docker_engine
from tests.certs import make_certificates
from tests.docker_engine import Container, DockerEngine
from tests.image_constraints import CONSTRAINTS_PATH, pinned, runtime_closure
from tests.pg_server import INTERNAL_KEY, ScratchDatabase
from tests.redis_server import RedisServer, free_port
from tests.relay_cluster import Backplane, expect_status, key_exchange
from tests.support import REPO_ROOT, TEST_SECRET, envelope, poll_until, stop_all, token
from viewport.client import UpgradeRefused, connect

DOCKERFILE = os.path.join(REPO_ROOT, "Dockerfile")
README = os.path.join(REPO_ROOT, "README.md")
IMAGE = "viewport-relay"
#: The README's ``BUS_KEY=$(openssl rand -hex 32) INTERNAL_KEY=...``; the bus helpers' key, so they can ask the bus.
SHELL_VARIABLES = {"BUS_KEY": secrets.token_hex(32), "INTERNAL_KEY": INTERNAL_KEY}
PLUGIN_CACHE_ERROR = "Unable to write to plugin cache"


def unavailable(reason: str) -> None:
    """Skip here, fail under CI (which must run the image tests)."""
    if os.environ.get("CI"):
        pytest.fail(f"the image tests need a Docker engine in CI: {reason}", pytrace=False)
    pytest.skip(reason)


# --- without an engine -------------------------------------------------------------------------------


def _dockerfile() -> str:
    with open(DOCKERFILE, encoding="utf-8") as handle:
        return handle.read()


def test_hadolint_clean() -> None:
    """hadolint finds nothing at warning level or above in the Dockerfile."""
    hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "warning", DOCKERFILE], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_constraints_pin_every_runtime_dependency() -> None:
    """
    deploy/image-constraints.txt pins every direct runtime requirement within what setup.cfg accepts, and, in a
    venv holding the pinned versions, exactly the runtime closure. (With newer versions installed the closure
    may differ; the offline image build then shows whether the pins are complete.)
    """
    from importlib import metadata

    pins = pinned(os.path.join(REPO_ROOT, CONSTRAINTS_PATH))
    for text in metadata.requires("viewport-relay") or []:
        requirement = Requirement(text)
        if requirement.marker is None:
            name = canonicalize_name(requirement.name)
            assert name in pins and requirement.specifier.contains(pins[name]), (text, pins.get(name))
    closure = runtime_closure()
    if all(pins.get(name) == version for name, version in closure.items()):
        regenerate = f"regenerate: .venv/bin/python -m tests.image_constraints > {CONSTRAINTS_PATH}"
        assert sorted(pins) == sorted(closure), regenerate


def test_version_label_is_the_package_version() -> None:
    """The Dockerfile's VERSION (org.opencontainers.image.version) is viewport.__version__."""
    import viewport

    match = re.search(r"^ARG VERSION=(\S+)$", _dockerfile(), re.M)
    assert match and match.group(1) == viewport.__version__  # type: ignore[attr-defined]


# --- the README's docker run lines -------------------------------------------------------------------


def documented_runs() -> Dict[str, List[str]]:
    """The ``docker run`` lines of the README's Deploy section by kind: single, server, redis, redirect, bus."""
    with open(README, encoding="utf-8") as handle:
        text = handle.read()
    section = text[text.index("## Deploy"):]
    end = section.find("\n## ")
    section = section if end < 0 else section[:end]
    lines = [line.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)
             for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`(docker run [^`]+)`", section)
    runs: Dict[str, List[str]] = {}
    for line in lines:
        if not line.startswith("docker run"):
            continue
        argv = shlex.split(re.sub(r"\$(\w+)", lambda m: SHELL_VARIABLES[m.group(1)], line))
        env = dict(argv[i + 1].split("=", 1) for i, arg in enumerate(argv) if arg == "-e")
        if "viewport-bus" in argv:
            kind = "bus"
        elif env.get("RELAY_CLIENT_REDIRECT_ENABLED") == "1":
            kind = "redirect"
        else:
            kind = env["RELAY_BACKPLANE_MODE"]
        assert kind not in runs, f"two documented lines of kind {kind}"
        runs[kind] = argv
    assert sorted(runs) == ["bus", "redirect", "redis", "server", "single"], sorted(runs)
    return runs


def as_test_run(argv: Sequence[str], port: int, env: Mapping[str, str], options: Sequence[str] = (),
                drop: Sequence[str] = ()) -> List[str]:
    """
    A documented line on the private engine: host networking and ``-e PORT`` instead of ``-p``, ``env``
    replacing or adding ``-e`` values, ``drop`` removing some, ``options`` added (names, hosts, mounts).
    """
    assert list(argv[:2]) == ["docker", "run"], argv
    out: List[str] = ["run"]
    seen = set()
    index = 2
    while argv[index].startswith("-"):
        flag = argv[index]
        assert flag in ("-d", "-p", "-e"), f"a documented option this test does not translate: {flag}"
        if flag == "-d":
            out.append(flag)
            index += 1
            continue
        if flag == "-e":
            name, _, value = argv[index + 1].partition("=")
            seen.add(name)
            if name not in drop:
                out += ["-e", f"{name}={env.get(name, value)}"]
        index += 2
    out += [part for name, value in env.items() if name not in seen for part in ("-e", f"{name}={value}")]
    return [*out, "--network", "host", "-e", f"PORT={port}", *options, *argv[index:]]


# --- the engine and the images -----------------------------------------------------------------------


class Images:
    """What the module built: the relay image (and the compose stand-ins, still building)."""

    def __init__(self, engine: DockerEngine, timings: Dict[str, float], stand_ins: "Future[None]") -> None:
        self.engine = engine
        self.timings = timings
        self.stand_ins = stand_ins


@pytest.fixture(scope="module")
def engine() -> Iterator[DockerEngine]:
    """A private dockerd for this module."""
    reason = docker_engine.missing_tools()
    if reason:
        unavailable(reason)
    started = time.monotonic()
    try:
        private = DockerEngine().start()
    except RuntimeError as failure:
        unavailable(str(failure))
        raise
    print(f"\nimage test: dockerd up in {time.monotonic() - started:.1f} s")
    yield private
    private.stop()


def _build_context(destination: str) -> None:
    """This checkout's working tree (the .dockerignore applies on top) and a wheelhouse of the pinned dependencies."""
    shutil.copytree(REPO_ROOT, destination, symlinks=True, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".mypy_cache", "_trial_temp*", "wheelhouse"))
    # --no-deps: exactly the pins; the offline image build then fails if the constraints miss a dependency.
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir",
         os.path.join(destination, "wheelhouse"), "-r", os.path.join(destination, CONSTRAINTS_PATH),
         "setuptools>=68", "wheel"],
        capture_output=True, text=True, timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pip wheel failed ({result.returncode}): {result.stderr[-3000:]}")


def _revision() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


@pytest.fixture(scope="module")
def images(engine: DockerEngine) -> Iterator[Images]:
    """
    The base image (mmdebstrap, cached), then the relay image from this checkout built offline
    (``--network none``) from wheels made on the host, while the compose stand-ins build beside it.
    """
    timings: Dict[str, float] = {}
    log: List[str] = []
    pool = ThreadPoolExecutor(3)
    context = tempfile.mkdtemp(prefix="vpd-build-")
    started = time.monotonic()

    def timed(name: str, work: Any, *args: Any) -> Any:
        begin = time.monotonic()
        result = work(*args)
        timings[name] = time.monotonic() - begin
        return result

    base = docker_engine.dockerfile_base_image()
    try:
        prepared = pool.submit(timed, "wheels and context", _build_context, context)
        rootfs = timed("base rootfs", docker_engine.debian_rootfs, "python-base",
                       docker_engine.PYTHON_BASE_PACKAGES, log)
        timed("base import", docker_engine.import_rootfs, engine, rootfs, base)
        stand_ins: "Future[None]" = pool.submit(timed, "compose stand-ins", docker_engine.build_stand_ins, engine, base)
        prepared.result()
        timed("relay image", engine.docker, "build", "-q", "--network", "none", "--build-arg", "PIP_NO_INDEX=1",
              "--build-arg", f"REVISION={_revision()}", "-t", IMAGE, context)
        timings["images total"] = time.monotonic() - started
        print("image test: " + "; ".join(log) + "; " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        yield Images(engine, timings, stand_ins)
    finally:
        pool.shutdown(wait=True)
        shutil.rmtree(context, ignore_errors=True)


def run(engine: DockerEngine, argv: Sequence[str], port: int = 0) -> Container:
    """``docker ARGV`` (a ``run -d`` line); the started container."""
    return Container(engine, engine.docker(*argv, timeout=60).stdout.strip(), port)


# --- the documented lines, all started at once -------------------------------------------------------


class Deployment:
    """Every documented line running: single; redis plain and two redirect relays; bus and two server relays; TLS."""

    def __init__(self, engine: DockerEngine) -> None:
        self.engine = engine
        self.runs = documented_runs()
        self.containers: Dict[str, Container] = {}
        self.redis = RedisServer()
        self.database: Optional[ScratchDatabase] = None
        self.certs = make_certificates(tempfile.mkdtemp(prefix="vpd-certs-"))
        os.chmod(os.path.dirname(self.certs.key_path), 0o755)
        os.chmod(self.certs.key_path, 0o644)  # uid 10001 in the container reads the mounted key
        self.bus_port = free_port()

    def start(self) -> None:
        """Start Redis, a scratch database and every container (the bus first), then wait until each listens."""
        self.redis.start()
        self.database = ScratchDatabase()
        runs, tag = self.runs, secrets.token_hex(3)
        local = {"RELAY_TOKEN_SECRET": TEST_SECRET}
        redis_env = {**local, "RELAY_BACKPLANE_URL": f"redis://redis:{self.redis.port}/0"}
        redis_host = ["--add-host", "redis:127.0.0.1"]
        bus_env = {"BUS_DATABASE_URL": self.database.url, "RELAY_INTERNAL_KEY": SHELL_VARIABLES["INTERNAL_KEY"],
                   "RELAY_TOKEN_SECRET": TEST_SECRET}
        server_env = {"RELAY_BACKPLANE_URL": f"http://viewport-bus:{self.bus_port}"}
        bus_host = ["--add-host", "viewport-bus:127.0.0.1"]
        tls_mount = ["-v", f"{os.path.dirname(self.certs.cert_path)}:/certs:ro", "--health-interval=1s",
                     "-e", "RELAY_TLS_CERT_PATH=/certs/relay.crt", "-e", "RELAY_TLS_KEY_PATH=/certs/relay.key"]
        plan: List[Tuple[str, str, Dict[str, str], List[str]]] = [
            ("bus", "bus", bus_env, []),
            ("single", "single", local, []),
            ("redis", "redis", redis_env, redis_host),
            ("redirect-b", "redirect", redis_env, redis_host),
            ("redirect-c", "redirect", redis_env, redis_host),
            ("server-a", "server", server_env, bus_host),
            ("server-b", "server", server_env, bus_host),
            ("tls-on", "single", {**local, "RELAY_TLS": "1"}, tls_mount),
            ("tls-auto", "single", local, tls_mount),
        ]
        for name, kind, env, options in plan:
            port = self.bus_port if name == "bus" else free_port()
            if kind == "redirect":
                env = {**env, "RELAY_PUBLIC_WS_BASE_URL": f"ws://relay-{name[-1]}.example.com:{port}/ws"}
            argv = as_test_run(runs[kind], port, env, ["--name", f"vp-{name}-{tag}", *options])
            self.containers[name] = run(self.engine, argv, port)
        for container in self.containers.values():
            container.wait_listening()

    def close(self) -> None:
        """Remove the containers, stop Redis, drop the database, delete the certificates."""
        for container in self.containers.values():
            container.remove()
        self.redis.stop()
        if self.database is not None:
            self.database.drop()
        shutil.rmtree(os.path.dirname(self.certs.cert_path), ignore_errors=True)


@pytest.fixture(scope="module")
def deployment(images: Images) -> Iterator[Deployment]:
    """The documented lines, started once for the module."""
    started = time.monotonic()
    running = Deployment(images.engine)
    try:
        running.start()  # a failure here still ends in close(): nothing outlives the module
        print(f"\nimage test: {len(running.containers)} containers listening in {time.monotonic() - started:.1f} s")
        yield running
    finally:
        running.close()


def health(container: Container, scheme: str = "http", context: Optional[ssl.SSLContext] = None) -> Dict[str, Any]:
    """GET /health on the container's port."""
    with urllib.request.urlopen(f"{scheme}://127.0.0.1:{container.port}/health", timeout=5, context=context) as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


def assert_clean_logs(container: Container) -> str:
    """The container's logs hold no plugin-cache error and no traceback; returns them."""
    text = container.logs()
    assert PLUGIN_CACHE_ERROR not in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    return text


def peer(relay: Any, role: str, workspace: str, tls_options: Any = None, **claims: Any) -> Any:
    """Connect to a container's relay as ``role`` with a token signed with the test secret."""
    return connect(reactor, relay.url, token=token(role, workspace, "rt1", **claims), role=role,
                   workspace_id=workspace, runtime_target_id="rt1", tls_options=tls_options)


@inlineCallbacks
def redirect_probe(relay: Any, workspace: str, timeout: float = 20.0) -> Any:
    """
    Wait until ``relay`` knows that the workspace's daemon is on another relay: it then answers an
    HTTP-redirect client with 307 (a few attempts a second, well under the upgrade rate limit).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = yield connect(reactor, relay.url, token=token("client", workspace, "rt1"), role="client",
                                 workspace_id=workspace, runtime_target_id="rt1", http_redirect=True,
                                 follow_redirects=False)
        except UpgradeRefused as refused:
            if refused.status == 307:
                return refused.location
            raise
        yield conn.abort()
        assert time.monotonic() < deadline, f"{relay.url} never learnt where the daemon of {workspace} is"
        yield deferLater(reactor, 0.25, lambda: None)


@inlineCallbacks
def cross_exchange(daemon_at: Any, client_at: Any, workspace: str, *, backplane: Optional[Backplane] = None,
                   probe: bool = False, redirect_to: Optional[str] = None, tls_options: Any = None,
                   **client_claims: Any) -> Any:
    """
    A daemon on one relay, a client on another (or the same): key exchange and an e2ee envelope each way.
    Before the client connects, wait until ``backplane`` names the daemon's relay, or (``probe``) until the
    client's relay redirects to it.
    """
    daemon = yield peer(daemon_at, "workspace-daemon", workspace, tls_options)
    client = None
    try:
        if backplane is not None:
            yield poll_until(lambda: backplane.presence(workspace, "rt1"), 15, f"presence of {workspace}")
        if probe:
            yield redirect_probe(client_at, workspace)
        client = yield peer(client_at, "client", workspace, tls_options, **client_claims)
        if redirect_to is not None:
            redirect = yield expect_status(client, "RELAY_REDIRECT")
            assert redirect["relayWsBaseUrl"] == redirect_to, redirect
        yield key_exchange(client, daemon, "r1", "s1")
        client.send_text(envelope("s1", 1))
        assert (yield daemon.next_message()) == envelope("s1", 1)
        daemon.send_text(envelope("s1", 2))
        assert (yield client.next_message()) == envelope("s1", 2)
    finally:
        yield stop_all(daemon, client)


def test_image_labels_user_and_installed_version(images: Images) -> None:
    """The image carries the OCI labels (version = the installed package's), runs as uid 10001, from a pinned venv."""
    engine = images.engine
    labels = json.loads(engine.docker("image", "inspect", "--format", "{{json .Config.Labels}}", IMAGE).stdout)
    probe = ("import importlib.metadata as m, os; print(json.dumps([m.version('viewport-relay'), os.getuid(), "
             "{d.metadata['Name'].lower(): d.version for d in m.distributions()}]))")
    installed, uid, versions = json.loads(engine.docker(
        "run", "--rm", "--network", "none", IMAGE, "python", "-c", "import json; " + probe).stdout)
    assert labels["org.opencontainers.image.version"] == installed
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert "org.opencontainers.image.source" in labels and "org.opencontainers.image.revision" in labels
    assert uid == 10001
    pins = pinned(os.path.join(REPO_ROOT, CONSTRAINTS_PATH))
    installed_versions = {re.sub(r"[-_.]+", "-", name): version for name, version in versions.items()}
    assert {name: installed_versions.get(name) for name in pins} == pins


@pytest_twisted.inlineCallbacks
def test_single_line_serves_a_daemon_and_a_client(deployment: Deployment) -> Any:
    """`docker run ... -e RELAY_BACKPLANE_MODE=single viewport-relay`: staging, query tokens refused, e2ee flows."""
    single = deployment.containers["single"]
    assert health(single)["ok"] is True
    with socket.create_connection(("127.0.0.1", single.port), timeout=5) as raw:
        raw.sendall(b"GET /ws?role=client&workspaceId=w1&token=abcdefghijklmnop HTTP/1.1\r\nHost: x\r\n"
                    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        assert raw.recv(64).startswith(b"HTTP/1.1 401")
    yield cross_exchange(single, single, "w-single")
    text = assert_clean_logs(single)
    assert '"relayMode":"staging"' in text and '"backplaneMode":"single"' in text


@pytest_twisted.inlineCallbacks
def test_redis_lines_forward_across_relays_and_redirect(deployment: Deployment) -> Any:
    """The redis lines on one Redis: a client on the plain line reaches a daemon elsewhere; a redirect names its URL."""
    plain, b, c = (deployment.containers[name] for name in ("redis", "redirect-b", "redirect-c"))
    backplane = Backplane("redis", redis_port=deployment.redis.port)
    backplane.prefix = "viewport:relay"  # the default RELAY_REDIS_KEY_PREFIX
    yield cross_exchange(b, plain, "w-redis", backplane=backplane)
    yield cross_exchange(b, c, "w-redirect", backplane=backplane, redirect_to=f"ws://relay-b.example.com:{b.port}/ws")
    for container in (plain, b, c):
        assert '"backplaneMode":"redis"' in assert_clean_logs(container)


@pytest_twisted.inlineCallbacks
def test_server_lines_forward_through_the_viewport_bus_container(deployment: Deployment) -> Any:
    """The bus line on PostgreSQL and two server lines admitting through it: e2ee crosses relays over the bus."""
    a, b, bus = (deployment.containers[name] for name in ("server-a", "server-b", "bus"))
    assert health(bus)["ok"] is True
    backplane = Backplane("server", bus_url=f"http://127.0.0.1:{bus.port}")
    yield cross_exchange(a, b, "w-server", backplane=backplane)
    for container in (a, b, bus):
        assert_clean_logs(container)
    assert '"admission":"platform"' in a.logs()


@pytest.mark.parametrize("kind,missing", [("redis", "RELAY_BUS_HMAC_KEY"), ("server", "RELAY_INTERNAL_KEY")])
def test_cross_relay_lines_refuse_to_start_without_their_keys(deployment: Deployment, kind: str, missing: str) -> None:
    """A documented cross-relay line without its key exits at once, naming the variable."""
    argv = [arg for arg in as_test_run(deployment.runs[kind], free_port(), {}, ["--rm"], drop=[missing]) if arg != "-d"]
    result = deployment.engine.docker(*argv, check=False, timeout=60)
    assert result.returncode != 0
    assert missing in result.stdout + result.stderr and "Traceback" not in result.stdout + result.stderr


@pytest_twisted.inlineCallbacks
def test_healthcheck_passes_with_tls(deployment: Deployment) -> Any:
    """With RELAY_TLS=1 (and with auto and both files mounted) the HEALTHCHECK reaches healthy; wss works."""
    context = ssl.create_default_context(cafile=deployment.certs.ca_path)
    with open(deployment.certs.ca_path, "rb") as handle:
        trust = Certificate.loadPEM(handle.read())
    for name in ("tls-on", "tls-auto"):
        container = deployment.containers[name]
        container.wait_health("healthy", timeout=30)
        assert health(container, "https", context)["ok"] is True
        container.url = f"wss://127.0.0.1:{container.port}/ws"
        yield cross_exchange(container, container, f"w-{name}",
                             tls_options=optionsForClientTLS("127.0.0.1", trustRoot=trust))
        assert '"tlsEnabled":true' in assert_clean_logs(container)


# --- compose -----------------------------------------------------------------------------------------


def _free_subnet() -> Tuple[str, str]:
    """A /24 no route of the machine overlaps, and the balancer's address in it."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout if shutil.which("ip") else ""
    taken = []
    for line in routes.splitlines():
        word = line.split()[0] if line.split() else ""
        try:
            taken.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue
    for third in random.sample(range(16, 250), 200):
        subnet = ipaddress.ip_network(f"172.31.{third}.0/24")
        if not any(subnet.overlaps(other) for other in taken):
            return str(subnet), f"172.31.{third}.10"
    raise AssertionError("no free 172.31.x.0/24 on this machine")


class Compose:
    """One of deploy/compose/*.yml brought up with docker-compose on free ports and a free subnet."""

    def __init__(self, engine: DockerEngine, name: str) -> None:
        self.engine = engine
        self.file = os.path.join(REPO_ROOT, "deploy", "compose", name)
        self.project = f"vp{secrets.token_hex(3)}"
        self.ports = {"RELAY_PORT": free_port(), "RELAY_A_PORT": free_port(), "RELAY_B_PORT": free_port()}
        subnet, balancer = _free_subnet()
        self.balancer_ip = balancer
        self.env = {"RELAY_IMAGE": IMAGE, "RELAY_BUS_HMAC_KEY": SHELL_VARIABLES["BUS_KEY"],
                    "RELAY_INTERNAL_KEY": INTERNAL_KEY, "RELAY_TOKEN_SECRET": TEST_SECRET,
                    "RELAY_SUBNET": subnet, "RELAY_BALANCER_IP": balancer,
                    **{name: str(port) for name, port in self.ports.items()}}
        self.relay_a = Container(engine, f"{self.project}_relay-a_1", self.ports["RELAY_A_PORT"])
        self.relay_b = Container(engine, f"{self.project}_relay-b_1", self.ports["RELAY_B_PORT"])
        self.balancer = Container(engine, f"{self.project}_balancer_1", self.ports["RELAY_PORT"])

    def compose(self, *args: str, timeout: float = 180) -> "subprocess.CompletedProcess[str]":
        """``docker-compose -p PROJECT -f FILE ARGS`` against the private engine."""
        result = subprocess.run(["docker-compose", "--no-ansi", "-p", self.project, "-f", self.file, *args],
                                env={**self.engine.env, **self.env}, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    def up(self) -> None:
        """``up -d`` with the image this module built; wait until both relays are ready and the balancer answers."""
        self.compose("up", "-d", "--no-build")

        def ready() -> bool:
            try:
                for port in (self.ports["RELAY_A_PORT"], self.ports["RELAY_B_PORT"]):
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as answer:
                        assert answer.status == 200
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['RELAY_PORT']}/health", timeout=2) as answer:
                    return answer.status == 200
            except (OSError, urllib.error.URLError, AssertionError):
                return False

        bus = Container(self.engine, f"{self.project}_bus_1") if "server" in self.file else None

        def bus_ready() -> bool:
            # The relays call the bus before PostgreSQL is up (answered 503): wait until the bus has its database.
            return bus is None or '"bus_database_ready"' in bus.logs()

        def crashed() -> bool:
            # restart: unless-stopped would restart a relay that cannot start for ever: fail at once instead.
            relays = (self.relay_a, self.relay_b)
            return any(relay.inspect("{{.State.Status}} {{.RestartCount}}") != "running 0" for relay in relays)

        deadline = time.monotonic() + 90
        while not (bus_ready() and ready()):
            if time.monotonic() > deadline or crashed():
                raise AssertionError(f"compose not ready: {self.compose('logs', '--no-color', '--tail', '40').stdout}")
            time.sleep(0.25)

    def down(self) -> Tuple[str, Dict[str, int]]:
        """``stop``, collect the logs (scanned for tokens like every service's) and exit codes, then ``down``."""
        started = time.monotonic()
        self.compose("stop", "-t", "15")
        stopped = time.monotonic() - started
        codes = {name: int(container.inspect("{{.State.ExitCode}}"))
                 for name, container in (("relay-a", self.relay_a), ("relay-b", self.relay_b))}
        logs = ""
        for container in (self.relay_a, self.relay_b, self.balancer):
            logs += container.logs()
        logs += self.compose("logs", "--no-color").stdout
        print(f"\nimage test: {os.path.basename(self.file)} stopped in {stopped:.1f} s, exit codes {codes}")
        if os.environ.get("VIEWPORT_IMAGE_TEST_LOGS"):  # a directory to keep the compose logs in, for debugging
            with open(os.path.join(os.environ["VIEWPORT_IMAGE_TEST_LOGS"], f"{self.project}.log"), "w") as handle:
                handle.write(logs)
        self.compose("down", "-v", "--remove-orphans", "-t", "5")
        return logs, codes


@pytest.fixture(params=["redis.yml", "server.yml"])
def compose(request: Any, images: Images) -> Iterator[Compose]:
    """A compose file running, with Debian-built stand-ins for redis, postgres and haproxy."""
    if shutil.which("docker-compose") is None:
        unavailable("docker-compose not installed (apt-get install docker-compose)")
    images.stand_ins.result()
    started = time.monotonic()
    stack = Compose(images.engine, request.param)
    try:
        stack.up()
        print(f"\nimage test: {request.param} up and ready in {time.monotonic() - started:.1f} s")
        yield stack
    finally:
        logs, codes = stack.down()
        assert PLUGIN_CACHE_ERROR not in logs and "Traceback" not in logs, logs[-3000:]
        assert set(codes.values()) <= {0, 143}, codes  # SIGTERM: a clean drain, not a kill after the timeout


@pytest_twisted.inlineCallbacks
def test_compose_relays_exchange_across_and_through_the_balancer(compose: Compose) -> Any:
    """Two relays behind HAProxy: daemon on relay-a, client on relay-b (told a's own URL); then both via HAProxy."""
    a_url = f"ws://relay.localhost:{compose.ports['RELAY_A_PORT']}/ws"
    yield cross_exchange(compose.relay_a, compose.relay_b, "w-compose-cross", probe=True, redirect_to=a_url)
    yield cross_exchange(compose.balancer, compose.balancer, "w-compose-balanced", clientId="balanced")
    gateway = compose.balancer_ip.rsplit(".", 1)[0] + ".1"
    connected = [json.loads(line)["details"] for relay in (compose.relay_a, compose.relay_b)
                 for line in relay.logs().splitlines() if '"client_connected"' in line]
    balanced = [entry for entry in connected if entry.get("clientId") == "balanced"]
    # HAProxy forwards the docker-proxy's address (the gateway) and the relay believes it: RELAY_TRUSTED_PROXIES.
    assert balanced and balanced[0].get("ip") == gateway, connected


# --- last, so that the single line's first scheduled health check (15 s) has passed meanwhile ------------


def test_single_line_becomes_healthy_on_the_image_schedule(deployment: Deployment) -> None:
    """The single line, with the image's own HEALTHCHECK timing, reports healthy."""
    single = deployment.containers["single"]
    waited = single.wait_health("healthy", timeout=45)
    print(f"\nimage test: single container healthy after a further {waited:.1f} s")
    assert json.loads(single.inspect("{{json .Config.Healthcheck.Interval}}")) == 15 * 10**9


def test_no_container_logged_a_plugin_cache_error_or_traceback(deployment: Deployment) -> None:
    """No container of the module (relays, bus, TLS) logged Twisted's plugin-cache error or a traceback."""
    for container in deployment.containers.values():
        assert_clean_logs(container)


def test_sigterm_stops_a_container_cleanly(deployment: Deployment) -> None:
    """``docker stop`` (SIGTERM): the relay shuts down cleanly and exits 143, as supervisors expect."""
    single = deployment.containers["single"]
    deployment.engine.docker("stop", "-t", "20", single.id, timeout=60)
    assert single.state()["ExitCode"] in (0, 143)
    assert "Server Shut Down." in assert_clean_logs(single)
