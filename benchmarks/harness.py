"""
The measuring side of the benchmarks: a relay child process, its /proc readings, a load generator
child driven over pipes, and the printed table.

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
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

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
