"""End-to-end: a real relay process, a daemon and a browser-style client exchanging frames."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted

from tests.support import RelayProcess, open_peer, stop_all


@pytest.fixture(scope="module")
def relay() -> Any:
    """One default relay shared by the tests of this module."""
    process = RelayProcess()
    pytest_twisted.blockon(process.start())
    yield process
    pytest_twisted.blockon(process.stop())


@pytest_twisted.inlineCallbacks
def test_key_exchange_then_e2ee_both_ways(relay: RelayProcess) -> Any:
    """A client's key exchange reaches the daemon, the response and later envelopes reach only that client."""
    daemon = yield open_peer(relay, "workspace-daemon", "w1", "rt1")
    client = yield open_peer(relay, "client", "w1", "rt1", clientId="c1")
    other = yield open_peer(relay, "client", "w1", "rt1", clientId="c2")
    try:
        init = {"type": "relay_key_exchange_init", "version": 3, "profile": "noise-ik", "requestId": "r1",
                "clientEphemeralPublicKey": "e", "encryptedClientStatic": "s"}
        client.send_json(init)
        received = yield daemon.next_message()
        assert json.loads(received) == init
        response = ('{"type":"relay_key_exchange_response","version":3,"profile":"noise-ik","requestId":"r1",'
                    '"daemonPublicKey":"d","daemonEphemeralPublicKey":"e","encryptedMetadata":"m",'
                    '"sessionId":"s1","proof":"p","epoch":1}')
        daemon.send_text(response)
        got = yield client.next_message()
        assert got == response
        envelope = ('{"type":"e2ee","version":2,"profile":"noise-ik","sessionId":"s1","epoch":1,"seq":1,'
                    '"iv":"i","tag":"t","ciphertext":"c"}')
        daemon.send_text(envelope)
        assert (yield client.next_message()) == envelope
        client.send_text(envelope)
        assert (yield daemon.next_message()) == envelope
        assert other.pending_messages() == []
    finally:
        yield stop_all(daemon, client, other)
