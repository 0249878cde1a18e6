"""The Docker image, without a Docker engine: hadolint, and the image's exact command in a fresh venv built the same way."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Dict, List

import pytest

from tests.support import REPO_ROOT

DOCKERFILE = os.path.join(REPO_ROOT, "Dockerfile")


def _dockerfile() -> str:
    with open(DOCKERFILE) as handle:
        return handle.read()


def _json_array(instruction: str) -> List[str]:
    """The exec-form arguments of the last ``instruction`` line (CMD or HEALTHCHECK ... CMD)."""
    text = _dockerfile().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.startswith(instruction)]
    return json.loads(lines[-1][lines[-1].index("["):])


def _image_env() -> Dict[str, str]:
    text = _dockerfile().replace("\\\n", " ")
    env: Dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_hadolint_clean() -> None:
    """hadolint finds nothing at warning level or above in the Dockerfile."""
    hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "warning", DOCKERFILE], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def image_venv() -> str:
    """A fresh virtual environment installed like the image: wheels built from the project, then installed offline."""
    root = tempfile.mkdtemp(prefix="image-")
    source, wheels, venv = (os.path.join(root, name) for name in ("src", "wheels", "venv"))
    os.makedirs(source)
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(os.path.join(REPO_ROOT, name), source)
    for name in ("viewport", "twisted"):
        shutil.copytree(os.path.join(REPO_ROOT, name), os.path.join(source, name),
                        ignore=shutil.ignore_patterns("__pycache__", "dropin.cache"))
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = os.path.join(venv, "bin", "pip")
    subprocess.run([pip, "wheel", "-q", "--no-cache-dir", "--wheel-dir", wheels, "."], cwd=source, check=True)
    built = [os.path.join(wheels, n) for n in os.listdir(wheels) if n.endswith(".whl")]
    subprocess.run([pip, "install", "-q", "--no-cache-dir", "--no-index", "--find-links", wheels, *built], check=True)
    yield venv
    shutil.rmtree(root, ignore_errors=True)


class Served:
    """A process started from the image venv, healthy on ``port``."""

    def __init__(self, image_venv: str, command: List[str], extra_env: Dict[str, str]) -> None:
        bin_dir = os.path.join(image_venv, "bin")
        self.port = _free_port()
        self.home = tempfile.mkdtemp()
        self.env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": self.home, **_image_env(), "PORT": str(self.port),
                    **extra_env}
        self.process = subprocess.Popen(command, env=self.env, cwd=self.home, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
        self.output = ""

    def health(self) -> Dict[str, object]:
        """Poll /health until it answers (30 s deadline); its JSON body."""
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as answer:
                    return json.loads(answer.read())  # type: ignore[no-any-return]
            except (urllib.error.URLError, ConnectionError):
                assert self.process.poll() is None, self.process.stdout.read().decode()  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "did not become healthy"
                time.sleep(0.1)

    def stop(self) -> int:
        """SIGTERM; the exit status (twistd re-raises the signal after a clean shutdown: -15)."""
        self.process.terminate()
        self.output = self.process.communicate(timeout=30)[0].decode()
        return int(self.process.returncode)


def test_image_command_serves_with_safe_defaults(image_venv: str) -> None:
    """The image's CMD and ENV start a relay on 0.0.0.0 in staging mode: healthy, query tokens refused, healthcheck passes."""
    served = Served(image_venv, _json_array("CMD"), {"RELAY_BACKPLANE_MODE": "single"})
    port = served.port
    try:
        body = served.health()
        assert body["ok"] is True and "relayMode" not in body
        healthcheck = _json_array("HEALTHCHECK")
        checked = subprocess.run(healthcheck, env=served.env, timeout=10)
        assert checked.returncode == 0
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(
                b"GET /ws?role=client&workspaceId=w1&token=abcdefghijklmnop HTTP/1.1\r\nHost: x\r\n"
                b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            assert raw.recv(64).startswith(b"HTTP/1.1 401")
    finally:
        code = served.stop()
    assert code in (0, -15), served.output
    assert "Server Shut Down." in served.output
    assert '"relayMode":"staging"' in served.output


@pytest.mark.parametrize(
    "documented_env",
    [
        {"RELAY_BACKPLANE_MODE": "server", "RELAY_BACKPLANE_URL": "https://api.example.com",
         "RELAY_INTERNAL_KEY": "image-test-internal-key-0123456789", "RELAY_BUS_HMAC_KEY": "b" * 64},
        {"RELAY_BACKPLANE_MODE": "redis", "RELAY_BACKPLANE_URL": "redis://redis:6379/0",
         "RELAY_INTERNAL_KEY": "image-test-internal-key-0123456789", "RELAY_BUS_HMAC_KEY": "b" * 64},
        {"RELAY_BACKPLANE_MODE": "redis", "RELAY_BACKPLANE_URL": "redis://redis:6379/0",
         "RELAY_INTERNAL_KEY": "image-test-internal-key-0123456789", "RELAY_BUS_HMAC_KEY": "b" * 64,
         "RELAY_CLIENT_REDIRECT_ENABLED": "1", "RELAY_PUBLIC_WS_BASE_URL": "ws://relay-a.example.com:7781/ws"},
    ],
    ids=["server", "redis", "redirect"],
)
def test_documented_docker_run_lines_start(image_venv: str, documented_env: Dict[str, str]) -> None:
    """Each documented ``docker run -e ...`` line starts a healthy relay (a backplane it cannot reach is reported, not fatal)."""
    served = Served(image_venv, _json_array("CMD"), documented_env)
    try:
        assert served.health()["ok"] is True
    finally:
        code = served.stop()
    assert code in (0, -15), served.output
    mode = documented_env.get("RELAY_BACKPLANE_MODE", "single")
    assert f'"backplaneMode":"{mode}"' in served.output
    assert "Traceback" not in served.output


@pytest.mark.parametrize("mode,missing", [("redis", "RELAY_BUS_HMAC_KEY"), ("server", "RELAY_INTERNAL_KEY")])
def test_cross_relay_image_refuses_to_start_without_its_keys(image_venv: str, mode: str, missing: str) -> None:
    """Outside dev (the image's 0.0.0.0 is staging) a cross-relay mode without its keys exits naming the variable."""
    documented = {"RELAY_BACKPLANE_MODE": mode, "RELAY_INTERNAL_KEY": "image-test-internal-key-0123456789",
                  "RELAY_BUS_HMAC_KEY": "b" * 64,
                  "RELAY_BACKPLANE_URL": "redis://redis:6379/0" if mode == "redis" else "https://api.example.com"}
    del documented[missing]
    served = Served(image_venv, _json_array("CMD"), documented)
    output = served.process.communicate(timeout=30)[0].decode()
    assert served.process.returncode != 0
    assert missing in output and "Traceback" not in output


def test_image_runs_viewport_bus(image_venv: str) -> None:
    """The same image runs viewport-bus with another command, on PostgreSQL."""
    from tests.pg_server import ScratchDatabase

    database = ScratchDatabase()
    command = ["twistd", "--reactor=asyncio", "--nodaemon", "--pidfile=", "viewport-bus"]
    served = Served(image_venv, command, {"BUS_DATABASE_URL": database.url,
                                          "RELAY_INTERNAL_KEY": "image-test-internal-key-0123456789"})
    try:
        assert served.health()["ok"] is True
    finally:
        code = served.stop()
        database.drop()
    assert code in (0, -15), served.output
