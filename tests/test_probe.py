"""``viewport-relay probe`` against a real relay."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest_twisted
from twisted.internet import reactor

from tests.support import RelayProcess, open_peer, stop_all, token
from viewport.probe import probe


@pytest_twisted.inlineCallbacks
def test_probe_reports_admission_daemon_and_refusal() -> Any:
    """The probe reports DAEMON_UNAVAILABLE without a daemon, a round trip with one, and the status of a refusal."""
    relay = RelayProcess()
    yield relay.start()
    daemon = None
    try:
        client_token = token("client", "w1", "rt1")
        alone = yield probe(reactor, relay.url, token=client_token, workspace_id="w1", runtime_target_id="rt1")
        assert (alone.ok, alone.daemon) == (True, "DAEMON_UNAVAILABLE")
        assert alone.daemon_round_trip_ms is not None
        daemon = yield open_peer(relay, "workspace-daemon", "w1", "rt1")
        with_daemon = probe(reactor, relay.url, token=client_token, workspace_id="w1", runtime_target_id="rt1")
        init = json.loads((yield daemon.next_message()))
        daemon.send_json({"type": "relay_key_exchange_response", "version": 3, "profile": "noise-ik",
                          "requestId": init["requestId"], "daemonPublicKey": "d", "daemonEphemeralPublicKey": "e",
                          "encryptedMetadata": "m", "sessionId": "s", "proof": "p", "epoch": 1})
        answered = yield with_daemon
        assert answered.daemon == "answered"
        refused = yield probe(reactor, relay.url, token="not-a-valid-token", workspace_id="w1", runtime_target_id="rt1")
        assert (refused.ok, refused.status) == (False, 401)
        result = subprocess.run(
            [sys.executable, "-m", "viewport.cli", "probe", relay.url, "--token", "not-a-valid-token",
             "--workspace", "w1", "--runtime-target", "rt1"],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 1 and json.loads(result.stdout)["status"] == 401
    finally:
        yield stop_all(daemon, relay)


@pytest_twisted.inlineCallbacks
def test_probe_reports_a_4008_close_as_a_failure() -> Any:
    """A client the relay closes with 4008 after the upgrade is reported ok=false with the code; the CLI exits 1."""
    relay = RelayProcess()
    yield relay.start()
    try:
        mismatched = token("client", "other-workspace", "rt1")
        report = yield probe(reactor, relay.url, token=mismatched, workspace_id="w1", runtime_target_id="rt1")
        assert (report.ok, report.close_code, report.close_reason) == (False, 4008, "workspace claim mismatch")
        assert report.error == "the relay closed the connection: code=4008 reason='workspace claim mismatch'"
        result = subprocess.run(
            [sys.executable, "-m", "viewport.cli", "probe", relay.url, "--token", mismatched,
             "--workspace", "w1", "--runtime-target", "rt1"],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 1 and json.loads(result.stdout)["close_code"] == 4008
    finally:
        yield stop_all(relay)
