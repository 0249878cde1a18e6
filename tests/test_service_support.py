"""Where the relay's and the bus's JSON log lines go, by twistd's own command-line options."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from tests.support import REPO_ROOT, TEST_SECRET
from viewport.service_support import twistd_log_target


def test_log_target_follows_twistd_options() -> None:
    """--nodaemon logs to stdout, --logfile to that file, a daemonized twistd to twistd.log, '-' to stdout."""
    cases = {
        ("twistd", "-n", "viewport-relay"): None,
        ("twistd", "--nodaemon", "--pidfile=", "viewport-relay", "--port", "0"): None,
        ("twistd", "--logfile=relay.log", "viewport-relay"): "relay.log",
        ("twistd", "-l", "relay.log", "-n", "viewport-relay"): "relay.log",
        ("twistd", "-lrelay.log", "viewport-relay"): "relay.log",
        ("twistd", "--pidfile", "relay.pid", "viewport-relay"): "twistd.log",
        ("twistd", "-n", "--logfile=-", "viewport-relay"): None,
        ("twistd", "-n", "viewport-relay", "--logfile=plugin-option"): None,
    }
    for argv, expected in cases.items():
        assert twistd_log_target(argv) == expected, argv


def test_daemonized_relay_writes_its_log_file() -> None:
    """twistd --logfile=FILE viewport-relay (daemonized, without -n) writes its JSON lines to FILE."""
    workdir = tempfile.mkdtemp(prefix="relay-daemon-")
    logfile = os.path.join(workdir, "relay.log")
    pidfile = os.path.join(workdir, "relay.pid")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": workdir, "PYTHONPATH": REPO_ROOT, "RELAY_TOKEN_SECRET": TEST_SECRET}
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", f"--logfile={logfile}",
            f"--pidfile={pidfile}", "viewport-relay", "--port", "0"]
    subprocess.run(argv, env=env, cwd=workdir, check=True, timeout=30)
    deadline = time.monotonic() + 20
    try:
        while not (os.path.exists(logfile) and '"relay_listening"' in open(logfile).read()):
            assert time.monotonic() < deadline, "the daemonized relay wrote no relay_listening line"
            time.sleep(0.05)
        lines = [json.loads(line) for line in open(logfile) if line.strip()]
        assert {"relay_started", "relay_listening"} <= {line["event"] for line in lines}
    finally:
        if os.path.exists(pidfile):
            os.kill(int(open(pidfile).read()), signal.SIGTERM)


def test_a_port_in_use_is_one_line_and_exit_status_2() -> None:
    """A relay whose port is taken exits 2 with one error line naming the address, and no traceback."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        workdir = tempfile.mkdtemp(prefix="relay-port-")
        env = {"PATH": os.environ.get("PATH", ""), "HOME": workdir, "PYTHONPATH": REPO_ROOT,
               "RELAY_TOKEN_SECRET": TEST_SECRET}
        done = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "viewport-relay", "--port", str(port)],
            env=env, cwd=workdir, capture_output=True, text=True, timeout=30,
        )
    output = done.stdout + done.stderr
    errors = [json.loads(line) for line in done.stdout.splitlines() if '"level":"error"' in line]
    assert done.returncode == 2, output
    assert [e["event"] for e in errors] == ["listen_failed"]
    assert errors[0]["details"]["address"] == f"127.0.0.1:{port}"
    assert "Traceback" not in output
