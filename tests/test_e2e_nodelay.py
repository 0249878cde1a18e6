"""
End-to-end: a daemon's reply in two frames a few ms apart, over ws:// and wss://, arrives whole and in order,
and the second frame is not held back by Nagle's algorithm: without TCP_NODELAY it waits for the client's
delayed ACK, about 40 ms. The check is on that stall, not on speed: the median wait beyond the daemon's own
3 ms must stay under half of it, and a relay started with setting TCP_NODELAY disabled (tests/nagle/) must
show it, which proves the check can fail. That the accepted sockets have the option is asserted in
tests/test_sockets.py, on the socket itself.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any, Dict, List

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.ssl import Certificate, optionsForClientTLS

from tests.certs import make_certificates
from tests.support import (
    REPO_ROOT,
    RelayProcess,
    e2e_env,
    envelope,
    kex_init,
    kex_response,
    start_relays,
    stop_all,
    stop_relays,
    token,
)
from viewport.client import Frame, RelayConnection, connect, parse_json_object

ROUNDS = 30
SECOND_FRAME_DELAY_S = 0.003
#: Delayed ACK holds a Nagle-delayed write about 40 ms on Linux; a median beyond the daemon's delay under half of it is no stall.
NAGLE_STALL_MS = 40.0


@pytest.fixture(scope="module")
def relays() -> Any:
    """A plain relay and a TLS relay (certificate from a private CA)."""
    certs = make_certificates(tempfile.mkdtemp(prefix="relay-certs-"))
    procs: Dict[str, Any] = {
        "plain": RelayProcess(e2e_env()),
        "tls": RelayProcess(e2e_env(RELAY_TLS="1", RELAY_TLS_CERT_PATH=certs.cert_path, RELAY_TLS_KEY_PATH=certs.key_path)),
        "nagle": RelayProcess(e2e_env(PYTHONPATH=os.pathsep.join((os.path.join(REPO_ROOT, "tests", "nagle"), REPO_ROOT)))),
    }
    pytest_twisted.blockon(start_relays(*procs.values()))
    procs["certs"] = certs
    yield procs
    pytest_twisted.blockon(stop_relays(procs["plain"], procs["tls"], procs["nagle"]))


class TwoFrameDaemon:
    """Answers a key exchange at once, and each envelope with two envelopes 3 ms apart (a snapshot, then an ack)."""

    def __init__(self, conn: RelayConnection) -> None:
        self.conn = conn
        conn.set_message_handler(self._received)

    def _received(self, frame: Frame) -> None:
        message = parse_json_object(frame.text)
        if message.get("type") == "relay_key_exchange_init":
            self.conn.send_text(kex_response(message["requestId"], "s-nodelay"))
            return
        seq = int(message["seq"])
        self.conn.send_text(envelope("s-nodelay", seq * 2))
        reactor.callLater(SECOND_FRAME_DELAY_S, self.conn.send_text, envelope("s-nodelay", seq * 2 + 1))  # type: ignore[attr-defined]


def _open(relay: RelayProcess, role: str, tls_options: Any) -> "Deferred[RelayConnection]":
    return connect(
        reactor,
        relay.url,
        token=token(role, "nodelay", "rt1"),
        role=role,
        workspace_id="nodelay",
        runtime_target_id="rt1",
        tls_options=tls_options,
    )


@inlineCallbacks
def second_frame_round_trips(relay: RelayProcess, tls_options: Any = None) -> Any:
    """Milliseconds from each client envelope to the second frame of the daemon's reply, ROUNDS times."""
    daemon = yield _open(relay, "workspace-daemon", tls_options)
    client = yield _open(relay, "client", tls_options)
    try:
        TwoFrameDaemon(daemon)
        client.send_text(kex_init("r-nodelay"))
        yield client.next_json()
        times: List[float] = []
        for seq in range(1, ROUNDS + 1):
            started = time.perf_counter()
            client.send_text(envelope("s-nodelay", seq))
            first = yield client.next_json()
            second = yield client.next_json()
            times.append((time.perf_counter() - started) * 1000.0)
            assert (first["seq"], second["seq"]) == (seq * 2, seq * 2 + 1)
        return times
    finally:
        yield stop_all(client, daemon)


def _stall_ms(times: List[float]) -> float:
    """The median round trip to the second frame beyond the daemon's own delay, printed."""
    assert len(times) == ROUNDS
    median = statistics.median(times)
    print(f"second frame round trip: median {median:.2f} ms, max {max(times):.2f} ms over {len(times)} rounds")
    return median - SECOND_FRAME_DELAY_S * 1000.0


@pytest_twisted.inlineCallbacks
def test_second_frame_of_a_reply_is_not_delayed(relays: Any) -> Any:
    """Over ws://, both frames of every two-frame reply reach the client, in order."""
    times = yield second_frame_round_trips(relays["plain"])
    assert _stall_ms(times) < NAGLE_STALL_MS / 2, "the second frame waited for a delayed ACK (Nagle)"


@pytest_twisted.inlineCallbacks
def test_second_frame_of_a_reply_is_not_delayed_over_tls(relays: Any) -> Any:
    """Over wss://, the same."""
    trust = Certificate.loadPEM(relays["certs"].ca_pem())
    times = yield second_frame_round_trips(relays["tls"], optionsForClientTLS("127.0.0.1", trustRoot=trust))
    assert _stall_ms(times) < NAGLE_STALL_MS / 2, "the second frame waited for a delayed ACK (Nagle)"


@pytest_twisted.inlineCallbacks
def test_the_check_sees_the_stall_of_a_relay_without_nodelay(relays: Any) -> Any:
    """A relay whose TCP_NODELAY is disabled shows the delayed-ACK stall the two tests above check for."""
    times = yield second_frame_round_trips(relays["nagle"])
    assert _stall_ms(times) >= NAGLE_STALL_MS / 2, "without TCP_NODELAY the second frame should wait for a delayed ACK"

