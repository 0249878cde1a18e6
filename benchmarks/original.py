"""
The original (TypeScript) relay as a black-box yardstick: start it next to ours, read its CPU, stop it.

``/work/shared/reference-relay`` holds the original relay, built (its README says how to run it; its code
is not read or copied here). A benchmark that wants a side-by-side ratio starts it with
:class:`OriginalRelay` in ``single``, ``redis`` or ``server`` mode, with the same raised rate limits as
ours (:data:`SHARED_LIMITS`), ``RELAY_MODE=dev`` and TLS off, and measures it exactly as it measures ours
(``/proc/<pid>/stat``: the node process, all its threads).

The original has no local token admission: every upgrade costs a ``POST {SERVER_URL}/api/runtime/internal/
relay/validate``. In ``server`` mode that is viewport-bus (it verifies our HS256 benchmark tokens with its
``RELAY_TOKEN_SECRET``); in ``single`` and ``redis`` mode it is :class:`FakePlatformResource`, a twisted.web
resource that decodes the token with PyJWT and answers ``{ok: true, claims}``. The measuring processes of
the benchmarks run no reactor, so :class:`FakePlatformChild` serves that resource from a tiny process of its
own (``python -m benchmarks.original --fake-platform``); code that has a reactor can serve it in-process with
:func:`listen_fake_platform`. Admission happens only at upgrade, so neither costs anything on the measured path.

This module imports Twisted only inside the fake platform's own functions, like ``harness``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Mapping, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import BENCH_SECRET, REPO_ROOT, UNLIMITED_RATES, proc_cpu_seconds  # noqa: E402
from tests.ports import free_port  # noqa: E402

REFERENCE_ROOT = "/work/shared/reference-relay"
#: The build with the cross-relay registry fix (the stock ``dist/`` never delivers daemon→client across relays).
ORIGINAL_ENTRY = os.path.join(REFERENCE_ROOT, "dist-patched", "index.js")
VALIDATE_PATH = "/api/runtime/internal/relay/validate"
MODES = ("single", "redis", "server")

#: Connection caps raised like the README's example (ours reads the same variables).
CONNECTION_LIMITS: Dict[str, str] = {
    "RELAY_MAX_CONNECTIONS_PER_IP": "100000",
    "RELAY_MAX_TOTAL_CONNECTIONS": "100000",
    "RELAY_MAX_CLIENTS_PER_WORKSPACE": "100000",
}
#: What both relays get in a side-by-side run, so no limiter of either closes a benchmark socket.
SHARED_LIMITS: Dict[str, str] = {**UNLIMITED_RATES, **CONNECTION_LIMITS}
#: RFC 7519 registered claims a platform answer must not carry (its claims follow the schema alone).
_REGISTERED_ONLY = ("exp", "iat", "nbf", "sub", "aud")


def wait_for_http(url: str, timeout: float, alive: Optional[Any] = None) -> None:
    """Poll ``url`` (GET) until any HTTP answer comes back; ``alive()`` False aborts early."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"process exited while waiting for {url}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as answer:
                answer.read()
            return
        except urllib.error.HTTPError:
            return  # it answered: listening
        except (OSError, ValueError) as error:
            last = str(error)
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s ({last})")


# -- the fake platform ------------------------------------------------------------------------------


def platform_claims(token: str, role: str, secret: str = BENCH_SECRET) -> Dict[str, Any]:
    """
    The claims a platform ``validate`` answers for one of our HS256 benchmark tokens: the payload
    without the RFC 7519 dates/subject/audience (the strict schema of a platform answer has no room for
    them). Raises ValueError for a bad token or a role claim other than ``role``.
    """
    import jwt

    try:
        payload = jwt.decode(token, secret, algorithms=["HS256"], options={"verify_aud": False})
    except jwt.PyJWTError as error:
        raise ValueError(f"INVALID_TOKEN: {error}") from error
    claims = {key: value for key, value in payload.items() if key not in _REGISTERED_ONLY}
    if claims.get("role") not in (None, role):
        raise ValueError("ROLE_CLAIM_MISMATCH")
    return claims


def fake_platform_resource(secret: str = BENCH_SECRET) -> Any:
    """A twisted.web resource answering ``POST .../relay/validate`` for tokens signed with ``secret``."""
    from twisted.web.resource import Resource

    class FakePlatformResource(Resource):
        """Platform admission for the original relay: ``{ok: true, claims}`` for a valid token, else 401."""

        isLeaf = True

        def __init__(self) -> None:
            super().__init__()
            self.validated = 0
            self.refused = 0

        def render_GET(self, request: Any) -> bytes:
            """``/health`` (any other path 404), so a starter can poll it."""
            request.setHeader(b"content-type", b"application/json")
            if request.path == b"/health":
                return b'{"ok":true}'
            request.setResponseCode(404)
            return b'{"ok":false,"reason":"NOT_FOUND"}'

        def render_POST(self, request: Any) -> bytes:
            """Validate the token in the JSON body against the requested role."""
            request.setHeader(b"content-type", b"application/json")
            if request.path.decode("latin-1") != VALIDATE_PATH:
                request.setResponseCode(404)
                return b'{"ok":false,"reason":"NOT_FOUND"}'
            try:
                body = json.loads(request.content.read())
                claims = platform_claims(str(body["relayToken"]), str(body.get("role", "")), secret)
            except (ValueError, KeyError, TypeError) as error:
                self.refused += 1
                request.setResponseCode(401)
                reason = str(error).split(":", 1)[0] or "INVALID_TOKEN"
                return json.dumps({"ok": False, "reason": reason}).encode()
            self.validated += 1
            return json.dumps({"ok": True, "claims": claims}, separators=(",", ":")).encode()

    return FakePlatformResource()


def listen_fake_platform(reactor: Any, port: int = 0, secret: str = BENCH_SECRET) -> "tuple[Any, str]":
    """Serve the fake platform on 127.0.0.1 in this process's reactor; ``(listening port, http URL)``."""
    from twisted.web.server import Site

    site = Site(fake_platform_resource(secret))
    site.noisy = False
    listening = reactor.listenTCP(port, site, interface="127.0.0.1")
    return listening, f"http://127.0.0.1:{listening.getHost().port}"


def serve_fake_platform() -> None:
    """Run the fake platform until SIGTERM; its URL is the first stdout line (JSON)."""
    from twisted.internet import reactor

    _, url = listen_fake_platform(reactor)
    sys.stdout.write(json.dumps({"url": url}) + "\n")
    sys.stdout.flush()
    reactor.run()  # type: ignore[attr-defined]


class FakePlatformChild:
    """The fake platform in a process of its own (the measuring processes run no reactor)."""

    def __init__(self) -> None:
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.url = ""

    def start(self, timeout: float = 15.0) -> str:
        """Spawn it and return its http URL once it answers ``/health``."""
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.original", "--fake-platform"],
            env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"fake platform exited with {self.process.wait()}")
        self.url = str(json.loads(line)["url"])
        wait_for_http(self.url + "/health", timeout, alive=lambda: self.process is not None and self.process.poll() is None)
        return self.url

    @property
    def pid(self) -> int:
        """Its process id."""
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 5 s."""
        _terminate(self.process, 5.0)


def _terminate(process: Optional["subprocess.Popen[bytes]"], timeout: float) -> Optional[int]:
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


# -- the original relay -----------------------------------------------------------------------------


class OriginalRelay:
    """
    ``node dist-patched/index.js`` on a free loopback port, in one of the three backplane modes.

    ``server_url`` is where admission (and in ``server`` mode the bus) lives: viewport-bus in server
    mode (give its ``internal_key``), a :class:`FakePlatformChild` otherwise. ``relay_id`` must differ
    between relays of one run; ``hmac_key`` must be the same on all of them.
    """

    def __init__(
        self,
        mode: str,
        *,
        server_url: str,
        relay_id: str,
        internal_key: Optional[str] = None,
        hmac_key: Optional[str] = None,
        redis_url: Optional[str] = None,
        redis_prefix: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        entry: str = ORIGINAL_ENTRY,
        node: str = "node",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        if mode == "redis" and not redis_url:
            raise ValueError("redis mode needs redis_url")
        self.mode = mode
        self.relay_id = relay_id
        self.workdir = tempfile.mkdtemp(prefix="original-relay-")
        self.log_path = os.path.join(self.workdir, "relay.log")
        self.port = free_port()
        self.argv = [shutil.which(node) or node, entry]
        self.env: Dict[str, str] = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": self.workdir,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "RELAY_MODE": "dev",
            "RELAY_TLS": "0",
            "RELAY_BACKPLANE_MODE": mode,
            "SERVER_URL": server_url,
            "RELAY_INTERNAL_KEY": internal_key or secrets.token_urlsafe(32),
            "RELAY_ID": relay_id,
            "RELAY_PUBLIC_WS_BASE_URL": f"ws://{relay_id}.test:{self.port}/ws",
            **SHARED_LIMITS,
        }
        if mode != "single":
            self.env.update(
                RELAY_BUS_ENABLED="1",
                RELAY_BUS_HMAC_KEY=hmac_key or secrets.token_urlsafe(32),
                RELAY_CLIENT_REDIRECT_ENABLED="0",
                RELAY_BUS_POLL_INTERVAL_MS="1",
            )
        if mode == "redis":
            assert redis_url is not None
            self.env["RELAY_REDIS_URL"] = redis_url
            if redis_prefix:
                self.env["RELAY_REDIS_KEY_PREFIX"] = redis_prefix
        if env:
            self.env.update(env)
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.url = ""

    @property
    def pid(self) -> int:
        """The node process's id."""
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 20.0) -> str:
        """Spawn node and return the relay's ws URL once ``/health`` answers."""
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.argv, env=self.env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        try:
            wait_for_http(f"http://127.0.0.1:{self.port}/health", timeout, alive=self.running)
        except RuntimeError as error:
            self.stop()
            raise RuntimeError(f"original relay did not start ({error}): {self.tail()}") from None
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        return self.url

    def running(self) -> bool:
        """Whether the process is still alive."""
        return self.process is not None and self.process.poll() is None

    def cpu_seconds(self) -> float:
        """utime + stime of the node process so far."""
        return proc_cpu_seconds(self.pid)

    def log_lines(self, contains: str) -> List[str]:
        """Log lines (one JSON event per line) containing ``contains``."""
        try:
            with open(self.log_path, "r", encoding="utf-8", errors="replace") as handle:
                return [line.rstrip("\n") for line in handle if contains in line]
        except FileNotFoundError:
            return []

    def tail(self, lines: int = 15) -> str:
        """The last lines of its output, for error messages."""
        try:
            with open(self.log_path, "rb") as handle:
                return b"".join(handle.readlines()[-lines:]).decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> Optional[int]:
        """SIGTERM (it closes every socket with 1001 and exits); SIGKILL after ``timeout``."""
        return _terminate(self.process, timeout)

    def cleanup(self) -> None:
        """Remove its working directory and log."""
        shutil.rmtree(self.workdir, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    """``--fake-platform``: serve the fake platform (what :class:`FakePlatformChild` runs)."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--fake-platform"]:
        serve_fake_platform()
        return 0
    print("usage: python -m benchmarks.original --fake-platform", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
