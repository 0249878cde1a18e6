"""
The measuring side of the benchmarks: a relay child process, its /proc readings, a load generator
child driven over pipes, and the printed table; for cross-relay runs also a viewport-bus child, a
scratch PostgreSQL database, CPU meters over several processes and py-spy recording.

This module imports no Twisted: the measuring process only reads ``/proc`` and forwards commands,
so neither the relay nor the load generator shares a process (or a reactor) with it.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlsplit

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_SECRET = "bench-secret-0123456789abcdef0123456789abcdef"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: Rate limits raised far beyond what a benchmark sends, so no limiter closes a connection.
UNLIMITED_RATES: Dict[str, str] = {
    "RELAY_RUNTIME_RATE_PER_MINUTE": "1000000000",
    "RELAY_RUNTIME_RATE_PER_MINUTE_WORKSPACE": "1000000000",
    "RELAY_DAEMON_RUNTIME_RATE_PER_MINUTE": "1000000000",
    "RELAY_KEX_INIT_RATE_PER_MINUTE": "1000000",
    "RELAY_UPGRADE_RATE_PER_MINUTE": "1000000",
}


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit towards ``wanted`` (the hard limit too when allowed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
    except (ValueError, OSError):
        ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        data = handle.read()
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB, from ``/proc/<pid>/status``."""
    with open(f"/proc/{pid}/status", "rb") as handle:
        for line in handle:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RelayChild:
    """``twistd -n viewport-relay --port 0`` in its own temporary HOME and working directory."""

    def __init__(
        self,
        env: Optional[Mapping[str, str]] = None,
        args: Sequence[str] = (),
        nofile: Optional[int] = None,
    ) -> None:
        self.workdir = tempfile.mkdtemp(prefix="relay-bench-")
        self.log_path = os.path.join(self.workdir, "relay.log")
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": self.workdir,
            "PYTHONPATH": REPO_ROOT,
            "RELAY_TOKEN_SECRET": BENCH_SECRET,
            **UNLIMITED_RATES,
        }
        if env:
            self.env.update(env)
        self.args = list(args)
        self.nofile = nofile
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.url = ""

    @property
    def pid(self) -> int:
        """The relay's process id."""
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 20.0) -> str:
        """Spawn the relay and return its ws URL once it logs ``relay_listening``."""
        argv = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", *self.args, "viewport-relay", "--port", "0",
        ]
        nofile = self.nofile

        def limits() -> None:
            if nofile is not None:
                raise_nofile(nofile)

        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            argv, env=self.env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limits
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"relay exited with {self.process.returncode}: {self.tail()}")
            for event in self.events("relay_listening"):
                self.url = event["details"]["url"]
                return self.url
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"relay did not listen within {timeout}s: {self.tail()}")

    def cpu_seconds(self) -> float:
        """The relay's CPU time so far."""
        return proc_cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        """The relay's resident memory now."""
        return proc_rss_kib(self.pid)

    def events(self, name: str) -> List[Dict[str, Any]]:
        """Parsed JSON log lines with ``"event": name``."""
        found = []
        try:
            with open(self.log_path, "rb") as handle:
                for raw in handle:
                    if f'"{name}"'.encode() in raw:
                        try:
                            entry = json.loads(raw)
                        except ValueError:
                            continue
                        if entry.get("event") == name:
                            found.append(entry)
        except FileNotFoundError:
            pass
        return found

    def count_events(self, names: Sequence[str]) -> Dict[str, int]:
        """How many log lines carry each of ``names`` as their event."""
        counts = {name: 0 for name in names}
        with open(self.log_path, "rb") as handle:
            for raw in handle:
                for name in names:
                    if f'"event":"{name}"'.encode() in raw or f'"event": "{name}"'.encode() in raw:
                        counts[name] += 1
        return counts

    def tail(self, lines: int = 15) -> str:
        """The last lines of the relay's output, for error messages."""
        try:
            with open(self.log_path, "rb") as handle:
                return b"".join(handle.readlines()[-lines:]).decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> Optional[int]:
        """SIGTERM (SIGKILL after ``timeout``) and return the exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def cleanup(self) -> None:
        """Remove the working directory (keep it with ``keep=True`` at the call site)."""
        shutil.rmtree(self.workdir, ignore_errors=True)


class GeneratorChild:
    """The load generator: a child process reading one JSON command per line, answering one per line."""

    def __init__(self, module: str, args: Sequence[str] = ()) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "--generator", *args],
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    @property
    def pid(self) -> int:
        """The generator's process id."""
        return self.process.pid

    def call(self, command: str, **arguments: Any) -> Dict[str, Any]:
        """Send one command and wait for its answer (raises if the generator reports an error)."""
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps({"command": command, **arguments}).encode() + b"\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"generator exited ({self.process.wait()}) during {command!r}")
        reply: Dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"generator failed in {command!r}: {reply['error']}")
        return reply

    def close(self) -> None:
        """Ask the generator to quit; kill it if it does not."""
        try:
            self.call("quit")
        except Exception:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Meter:
    """CPU time of the relay (and of the generator, to show whether it kept up) across one phase."""

    def __init__(self, relay_pid: int, generator_pid: Optional[int] = None) -> None:
        self.relay_pid = relay_pid
        self.generator_pid = generator_pid

    def __enter__(self) -> "Meter":
        self.wall0 = time.perf_counter()
        self.relay0 = proc_cpu_seconds(self.relay_pid)
        self.generator0 = proc_cpu_seconds(self.generator_pid) if self.generator_pid else 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.relay_cpu = proc_cpu_seconds(self.relay_pid) - self.relay0
        self.generator_cpu = (
            proc_cpu_seconds(self.generator_pid) - self.generator0 if self.generator_pid else 0.0
        )

    @property
    def relay_busy(self) -> float:
        """Relay CPU as a percentage of one core over the phase."""
        return 100.0 * self.relay_cpu / self.wall if self.wall else 0.0

    @property
    def generator_busy(self) -> float:
        """Generator CPU as a percentage of one core over the phase."""
        return 100.0 * self.generator_cpu / self.wall if self.wall else 0.0


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending sequence (NaN when empty)."""
    if not ordered:
        return float("nan")
    rank = max(1, math.ceil(fraction * len(ordered) - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        line = "  ".join(
            cell.rjust(widths[i]) if _numeric(cell) else cell.ljust(widths[i]) for i, cell in enumerate(row)
        )
        lines.append(line.rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _numeric(cell: str) -> bool:
    try:
        float(cell.replace(",", ""))
    except ValueError:
        return cell == "-"
    return True


# -- cross-relay helpers: the bus, its database, Redis, several processes, py-spy ----------------------


class BusChild(RelayChild):
    """``twistd -r asyncio -n viewport-bus --port 0`` in its own directory, on ``BUS_DATABASE_URL``."""

    def start(self, timeout: float = 20.0) -> str:
        """Spawn the bus and return its http URL once it logs ``bus_listening``."""
        argv = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-r", "asyncio", "-n", "--pidfile=", *self.args, "viewport-bus", "--port", "0",
        ]
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(argv, env=self.env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bus exited with {self.process.returncode}: {self.tail()}")
            for event in self.events("bus_listening"):
                self.url = event["details"]["url"]
                return self.url
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"bus did not listen within {timeout}s: {self.tail()}")


class ScratchDatabase:
    """A database of its own on the PostgreSQL server at ``server_url``; ``drop`` removes it."""

    def __init__(self, server_url: str) -> None:
        import psycopg

        self._psycopg = psycopg
        self.server_url = server_url.rstrip("/")
        self.name = f"bench_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(f"{self.server_url}/postgres", autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.url = f"{self.server_url}/{self.name}"

    def backend_pids(self) -> List[int]:
        """Server processes connected to this database (the bus's pool and LISTEN connections)."""
        with self._psycopg.connect(f"{self.server_url}/postgres", autocommit=True, connect_timeout=5) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.name,)).fetchall()
        return [int(row[0]) for row in rows]

    def frame_count(self) -> int:
        """Rows in relay_bus_frames (0 before the migration)."""
        try:
            with self._psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                row = conn.execute("SELECT count(*) FROM relay_bus_frames").fetchone()
        except self._psycopg.Error:
            return 0
        return int(row[0]) if row is not None else 0

    def publish_stats(self, after_id: int) -> Tuple[int, int, int]:
        """
        ``(frames, publishes, highest id)`` of the frames stored after ``after_id``: a publish request is
        one transaction, and every row of a transaction has the same ``created_at`` (``now()``), so the
        distinct values count the requests. Zeros before the migration.
        """
        try:
            with self._psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                row = conn.execute(
                    "SELECT count(*), count(DISTINCT created_at), COALESCE(max(id), %s) FROM relay_bus_frames"
                    " WHERE id > %s",
                    (after_id, after_id),
                ).fetchone()
        except self._psycopg.Error:
            return 0, 0, after_id
        return (int(row[0]), int(row[1]), int(row[2])) if row is not None else (0, 0, after_id)

    def drop(self) -> None:
        """Drop the database, terminating its connections (PostgreSQL 13+)."""
        try:
            with self._psycopg.connect(f"{self.server_url}/postgres", autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        except self._psycopg.Error:
            pass


def redis_server_pid(url: str) -> Optional[int]:
    """``process_id`` from INFO server (a bare RESP exchange), None when it cannot be read."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=3) as sock:
            sock.sendall(b"INFO server\r\n")
            data = b""
            while not data.endswith(b"\r\n\r\n") and len(data) < 1 << 16:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if data.startswith(b"$"):
                    length = int(data[1 : data.index(b"\r\n")])
                    if len(data) >= data.index(b"\r\n") + 2 + length:
                        break
    except OSError:
        return None
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith("process_id:"):
            return int(line.split(":", 1)[1])
    return None


class CpuMeter:
    """
    CPU seconds of named processes across one phase. ``extra`` is ``(name, pids())``: a group of
    processes listed again at both ends and summed (a pid that appeared meanwhile counts in full).
    """

    def __init__(self, pids: Dict[str, int], extra: Optional[Tuple[str, Callable[[], List[int]]]] = None) -> None:
        self.pids = pids
        self.extra = extra
        self.cpu: Dict[str, float] = {}

    @staticmethod
    def _read(pid: int) -> Optional[float]:
        try:
            return proc_cpu_seconds(pid)
        except (OSError, ValueError, IndexError):
            return None

    def _extra_now(self) -> Dict[int, float]:
        if self.extra is None:
            return {}
        readings = {}
        for pid in self.extra[1]():
            value = self._read(pid)
            if value is not None:
                readings[pid] = value
        return readings

    def __enter__(self) -> "CpuMeter":
        self.wall0 = time.perf_counter()
        self._start = {name: self._read(pid) for name, pid in self.pids.items()}
        self._extra0 = self._extra_now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        for name, pid in self.pids.items():
            before, after = self._start[name], self._read(pid)
            self.cpu[name] = after - before if before is not None and after is not None else float("nan")
        if self.extra is not None:
            extra1 = self._extra_now()
            self.cpu[self.extra[0]] = sum(value - self._extra0.get(pid, 0.0) for pid, value in extra1.items())

    def per(self, name: str, count: int) -> str:
        """µs of ``name``'s CPU per unit of work, as a table cell."""
        value = self.cpu.get(name)
        if value is None or value != value or not count:
            return "-"
        return f"{value / count * 1e6:.0f}"

    def busy(self, name: str) -> str:
        """``name``'s CPU as a percentage of one core over the phase."""
        value = self.cpu.get(name)
        if value is None or value != value or not self.wall:
            return "-"
        return f"{100.0 * value / self.wall:.0f}"


class PySpyRecorder:
    """py-spy ``record`` of some processes during one phase (raw collapsed stacks, one file per process)."""

    def __init__(self, directory: Optional[str], label: str, pids: Dict[str, int]) -> None:
        self.directory = directory
        self.label = label
        self.pids = pids
        self.children: List[subprocess.Popen[bytes]] = []

    def __enter__(self) -> "PySpyRecorder":
        if not self.directory:
            return self
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        os.makedirs(self.directory, exist_ok=True)
        for name, pid in self.pids.items():
            out = os.path.join(self.directory, f"{self.label}-{name}.raw")
            self.children.append(
                subprocess.Popen(
                    [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--idle",
                     "--nonblocking", "-o", out],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        for child in self.children:
            child.send_signal(signal.SIGINT)
        for child in self.children:
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
