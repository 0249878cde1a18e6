"""
A private Docker engine for the image tests: its own dockerd, base images built without a registry, containers.

The engine touches nothing else on the machine: its data, exec root and socket live in a temporary directory,
there is no default bridge, and it neither writes iptables rules nor turns on IP forwarding (containers use
host networking; user-defined networks, their DNS and published ports still work through docker-proxy).
Docker Hub is out of reach, so the Dockerfile's ``FROM`` image is Debian bookworm with Debian's python3, built
by mmdebstrap and cached in ``CACHE_DIR`` (rebuilt after ``CACHE_MAX_AGE_SECONDS`` or when the inputs change).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Dict, List, Mapping, Optional, Sequence

from tests.support import REPO_ROOT, ServiceOutput

CACHE_DIR = os.environ.get("VIEWPORT_DOCKER_CACHE", "/var/tmp/viewport-relay-docker")
CACHE_MAX_AGE_SECONDS = 7 * 24 * 3600
ENGINE_START_SECONDS = 30.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: What the Dockerfile needs of its base: python3 with venv/ensurepip (the official image has them too).
PYTHON_BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
_MMDEBSTRAP_OPTIONS = (
    "--variant=minbase",
    "--format=tar",
    # Without it usrmerge is pulled in, and with it perl.
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
)


def missing_tools() -> Optional[str]:
    """Why no private engine can be started here (None when it can)."""
    if os.geteuid() != 0:
        return "the private dockerd needs root"
    absent = [tool for tool in ("dockerd", "docker", "mmdebstrap") if shutil.which(tool) is None]
    if absent:
        return f"{', '.join(absent)} not installed (apt-get install docker.io mmdebstrap)"
    return None


def dockerfile_base_image(dockerfile: str = os.path.join(REPO_ROOT, "Dockerfile")) -> str:
    """The image of the Dockerfile's first ``FROM`` line."""
    with open(dockerfile, encoding="utf-8") as handle:
        for line in handle:
            if line.upper().startswith("FROM "):
                return line.split()[1]
    raise AssertionError("the Dockerfile has no FROM line")


def apt_sources() -> List[str]:
    """The machine's apt source files for bookworm (mmdebstrap reads them as its mirrors)."""
    candidates = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.sources")),
                  *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]
    found = []
    for path in candidates:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError:
            continue
        if "bookworm" in text and "debian" in text:
            found.append(path)
    return found or ["http://deb.debian.org/debian"]


class DockerEngine:
    """One dockerd under a temporary directory; ``docker`` runs the CLI against it."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="vpd-", dir="/tmp")
        self.socket = os.path.join(self.root, "docker.sock")
        self.log_path = os.path.join(self.root, "dockerd.log")
        # A CLI configuration of its own: no credential helpers, contexts or settings from the machine.
        self.env: Dict[str, str] = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}",
                                    "DOCKER_CONFIG": os.path.join(self.root, "cli")}
        self.env.pop("DOCKER_CONTEXT", None)
        self._process: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> "DockerEngine":
        """Start dockerd and wait until it answers."""
        argv = [
            "dockerd", "--data-root", os.path.join(self.root, "data"), "--exec-root", os.path.join(self.root, "exec"),
            "--pidfile", os.path.join(self.root, "dockerd.pid"), "-H", f"unix://{self.socket}",
            "--storage-driver", "overlay2", "--bridge=none", "--iptables=false", "--ip-forward=false",
        ]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + ENGINE_START_SECONDS
        while self.docker("version", "--format", "{{.Server.Version}}", check=False, timeout=10).returncode != 0:
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dockerd did not start: {self.log_tail()}")
            time.sleep(0.1)
        return self

    def log_tail(self, size: int = 3000) -> str:
        """The end of dockerd's own log."""
        try:
            with open(self.log_path, "rb") as handle:
                return handle.read()[-size:].decode("utf-8", "replace")
        except OSError:
            return ""

    def docker(self, *args: str, check: bool = True, timeout: float = 300) -> "subprocess.CompletedProcess[str]":
        """Run ``docker ARGS`` against this engine; its output as text (raises on failure when ``check``)."""
        result = subprocess.run(["docker", *args], env=self.env, capture_output=True, timeout=timeout, text=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args[:3])} ... failed ({result.returncode}): "
                               f"{result.stdout[-2000:]}{result.stderr[-3000:]}")
        return result

    def stop(self) -> None:
        """Remove every container, stop dockerd (by its pid) and delete its directory."""
        if self._process is not None and self._process.poll() is None:
            containers = self.docker("ps", "-aq", check=False, timeout=30).stdout.split()
            if containers:
                self.docker("rm", "-f", *containers, check=False, timeout=60)
            self.docker("network", "prune", "-f", check=False, timeout=30)
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._process = None
        self._unmount_leftovers()
        shutil.rmtree(self.root, ignore_errors=True)

    def _unmount_leftovers(self) -> None:
        try:
            with open("/proc/self/mounts", encoding="utf-8") as handle:
                mounts = [line.split()[1] for line in handle]
        except OSError:
            return
        for mount in sorted((m for m in mounts if m.startswith(self.root + "/")), key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)


def _cached(name: str, key_material: Sequence[str]) -> str:
    digest = hashlib.sha256("\0".join(key_material).encode()).hexdigest()[:16]
    return os.path.join(CACHE_DIR, f"{name}-{digest}.tar")


def _fresh(path: str) -> bool:
    try:
        young = time.time() - os.path.getmtime(path) < CACHE_MAX_AGE_SECONDS
        return os.path.isfile(path) and young and os.path.getsize(path) > 0
    except OSError:
        return False


def debian_rootfs(name: str, packages: Sequence[str], log: List[str]) -> str:
    """
    A tarball of Debian bookworm (minbase) with ``packages``, built by mmdebstrap from the machine's apt
    sources, or the cached one from an earlier run. ``log`` gets one line saying which.
    """
    sources = apt_sources()
    contents = []
    for source in sources:
        if os.path.isfile(source):
            with open(source, encoding="utf-8") as handle:
                contents.append(handle.read())
    options = [*_MMDEBSTRAP_OPTIONS, f"--include={','.join(packages)}"]
    path = _cached(name, [*options, *contents])
    if _fresh(path):
        log.append(f"{name}: cached {path}")
        return path
    os.makedirs(CACHE_DIR, exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial"
    started = time.monotonic()
    result = subprocess.run(["mmdebstrap", "--quiet", *options, "bookworm", partial, *sources],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        if os.path.exists(partial):
            os.unlink(partial)
        raise RuntimeError(f"mmdebstrap failed ({result.returncode}): {result.stderr[-3000:]}")
    os.replace(partial, path)
    for stale in glob.glob(os.path.join(CACHE_DIR, f"{name}-*.tar")):
        if stale != path:
            os.unlink(stale)
    log.append(f"{name}: mmdebstrap {time.monotonic() - started:.0f} s -> {path}")
    return path


def import_rootfs(engine: DockerEngine, tarball: str, tag: str) -> None:
    """``docker import`` a root filesystem as ``tag``, with the PATH an official image has."""
    engine.docker("import", "--change", f"ENV PATH={DEFAULT_PATH}", tarball, tag, timeout=300)


#: Stand-ins for the official images the compose files name, built from Debian's packages on the Debian base.
#: Each behaves like the official image for what the compose files use (command, environment, config path).
SERVICES_DOCKERFILE = """\
FROM {base}
RUN mkdir -p /etc/postgresql-common \\
    && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf \\
    && apt-get update -q && apt-get install -y -q --no-install-recommends redis-server postgresql haproxy \\
    && rm -rf /var/lib/apt/lists/*
"""
STAND_INS: Dict[str, Dict[str, str]] = {
    # Official redis images turn protected mode off at build time; Debian's binary keeps it on by default.
    "redis:7-alpine": {
        "entrypoint.sh": (
            '#!/bin/sh\nif [ "$1" = redis-server ]; then shift; set -- redis-server --protected-mode no "$@"; fi\n'
            'exec "$@"\n'
        ),
        "Dockerfile": (
            'FROM {services}\nCOPY entrypoint.sh /\nENTRYPOINT ["sh", "/entrypoint.sh"]\nCMD ["redis-server"]\n'
        ),
    },
    # The official postgres entrypoint: initdb (UTF8, as its en_US.utf8 locale gives) with POSTGRES_PASSWORD on first
    # start, listen on all addresses. Without -E UTF8 initdb would pick SQL_ASCII here, and psycopg reads bytes.
    "postgres:16-alpine": {
        "entrypoint.sh": (
            "#!/bin/sh\nset -e\nD=/var/lib/postgresql/data\nB=$(ls -d /usr/lib/postgresql/*/bin | tail -n1)\n"
            "mkdir -p \"$D\" /var/run/postgresql && chown postgres \"$D\" /var/run/postgresql\n"
            "if [ ! -s \"$D/PG_VERSION\" ]; then\n"
            "  printf '%s\\n' \"$POSTGRES_PASSWORD\" > /tmp/pwfile && chown postgres /tmp/pwfile\n"
            "  setpriv --reuid=postgres --regid=postgres --init-groups \"$B/initdb\" -D \"$D\" -U postgres "
            "--pwfile=/tmp/pwfile --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null\n"
            "  rm /tmp/pwfile\n  echo 'host all all all scram-sha-256' >> \"$D/pg_hba.conf\"\nfi\n"
            "exec setpriv --reuid=postgres --regid=postgres --init-groups \"$B/postgres\" -D \"$D\" "
            "-c listen_addresses='*' -c fsync=off\n"
        ),
        "Dockerfile": 'FROM {services}\nCOPY entrypoint.sh /\nENTRYPOINT ["sh", "/entrypoint.sh"]\n',
    },
    # The official haproxy image reads /usr/local/etc/haproxy/haproxy.cfg and stays in the foreground.
    "haproxy:2.6": {
        "Dockerfile": 'FROM {services}\nCMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]\n',
    },
}
SERVICES_IMAGE = "viewport-test/debian-services"


def build_from_text(engine: DockerEngine, tag: str, files: Mapping[str, str], network: str = "none") -> None:
    """``docker build`` a context made of ``files`` (name → text) as ``tag``."""
    context = tempfile.mkdtemp(prefix="vpd-context-")
    try:
        for name, text in files.items():
            with open(os.path.join(context, name), "w", encoding="utf-8") as handle:
                handle.write(text)
        engine.docker("build", "-q", "--network", network, "-t", tag, context, timeout=600)
    finally:
        shutil.rmtree(context, ignore_errors=True)


def build_stand_ins(engine: DockerEngine, base: str) -> None:
    """Debian's redis-server, PostgreSQL and HAProxy as ``redis:7-alpine``, ``postgres:16-alpine``, ``haproxy:2.6``."""
    # apt inside this build reaches Debian's mirror over the host's network (the base keeps its sources).
    build_from_text(engine, SERVICES_IMAGE, {"Dockerfile": SERVICES_DOCKERFILE.format(base=base)}, network="host")
    for tag, files in STAND_INS.items():
        build_from_text(engine, tag, {name: text.format(services=SERVICES_IMAGE) if name == "Dockerfile" else text
                                      for name, text in files.items()})


class Container:
    """A container started with ``docker run -d``; its logs also feed the suite's token scan (tests/conftest.py)."""

    def __init__(self, engine: DockerEngine, container_id: str, port: int = 0) -> None:
        self.engine = engine
        self.id = container_id
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.http_url = f"http://127.0.0.1:{port}"
        self._scanned = ServiceOutput()
        self._seen = (0, 0)

    def logs(self) -> str:
        """Everything the container wrote to stdout and stderr so far."""
        result = self.engine.docker("logs", self.id, check=False, timeout=60)
        out, err = result.stdout, result.stderr
        # Only what is new since the last call goes to the scan (tests/conftest.py reads it after each test).
        self._scanned.outReceived(out[self._seen[0]:].encode("utf-8"))
        self._scanned.errReceived(err[self._seen[1]:].encode("utf-8"))
        self._seen = (len(out), len(err))
        return out + err

    def inspect(self, template: str) -> str:
        """``docker inspect --format TEMPLATE``."""
        return self.engine.docker("inspect", "--format", template, self.id, timeout=30).stdout.strip()

    def state(self) -> Dict[str, object]:
        """The container's ``State`` (Status, ExitCode, Health, ...)."""
        return json.loads(self.inspect("{{json .State}}"))  # type: ignore[no-any-return]

    def wait_health(self, wanted: str = "healthy", timeout: float = 60.0) -> float:
        """Wait until the HEALTHCHECK reports ``wanted``; the seconds it took."""
        started = time.monotonic()
        while True:
            status = self.inspect("{{if .State.Health}}{{.State.Health.Status}}{{end}} {{.State.Status}}")
            if status.split()[0] == wanted:
                return time.monotonic() - started
            if "running" not in status or time.monotonic() - started > timeout:
                raise AssertionError(f"health {status!r} after {time.monotonic() - started:.0f} s, not {wanted}: "
                                     f"{self.inspect('{{json .State.Health}}')} {self.logs()[-2000:]}")
            time.sleep(0.2)

    def wait_listening(self, timeout: float = 30.0) -> None:
        """Wait until the service logged that it listens (relay_listening or bus_listening)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.logs()
            if '"relay_listening"' in text or '"bus_listening"' in text:
                return
            running = self.inspect("{{.State.Status}}")
            if running != "running" or time.monotonic() > deadline:
                raise AssertionError(f"container {running}, not listening: {text[-3000:]}")
            time.sleep(0.1)

    def remove(self) -> None:
        """Collect the logs one last time, then ``docker rm -f``."""
        self.logs()
        self.engine.docker("rm", "-f", self.id, check=False, timeout=60)
