"""The README quickstart: minted tokens, the example daemon and client, through a real relay."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.utils import getProcessOutputAndValue

from tests.support import REPO_ROOT, RelayProcess


def _cli(env: dict, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "viewport.cli", *args], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest_twisted.inlineCallbacks
def test_quickstart_daemon_and_client_exchange_an_envelope() -> Any:
    """Tokens minted by the CLI from the embedded secret admit the example daemon and client, which complete an e2ee round trip."""
    relay = RelayProcess()
    del relay.env["RELAY_TOKEN_SECRET"]
    yield relay.start()
    try:
        env = dict(relay.env)
        daemon_token = _cli(env, "token", "--role", "workspace-daemon", "--workspace", "w1", "--runtime-target", "rt1")
        client_token = _cli(env, "token", "--role", "client", "--workspace", "w1", "--runtime-target", "rt1")
        daemon = getProcessOutputAndValue(
            sys.executable,
            [os.path.join(REPO_ROOT, "examples", "daemon.py"), "--url", relay.url, "--token", daemon_token, "--once"],
            env=env, reactor=reactor,
        )
        deadline = reactor.seconds() + 15
        while not relay.events("daemon_connected"):
            assert reactor.seconds() < deadline, "example daemon did not connect"
            yield task.deferLater(reactor, 0.05, lambda: None)
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            [os.path.join(REPO_ROOT, "examples", "client.py"), "--url", relay.url, "--token", client_token],
            env=env, reactor=reactor,
        )
        assert code == 0, err
        assert b"e2ee envelope echoed by the daemon" in out
        d_out, d_err, d_code = yield daemon
        assert d_code == 0, d_err
        assert b"echoed envelope seq=1" in d_out
    finally:
        yield relay.stop()
