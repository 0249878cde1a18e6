"""
A rolling restart of two Redis-mode relays behind HAProxy loses no frame that was accepted for delivery.

A client C streams numbered E2EE envelopes (one every 3 ms) to its daemon D through HAProxy
(``deploy/haproxy/haproxy.cfg``) while the relay holding them, then the other one, is stopped with
SIGTERM and started again on the same port; each restart waits until the new process is ready and
HAProxy routes workspaces to it again. Two variants: ``restart-at-once`` starts the new process as
soon as the old one exited (the peers may come back to it), ``restart-after-failover`` first waits
until D and C reconnected to the other relay (so both restarts move them). The stream stops once
everything reconnected and D received more envelopes; the test waits until the running relays'
counters match what D received (at most 5 s), then stops the peers and every relay.

Definitions used by the assertions:

* A frame is **accepted for delivery** when a relay forwarded it toward the daemon: it is counted by
  ``relay_frames_client_to_daemon_total`` (written to a local daemon socket) or by
  ``relay_bus_frames_to_daemon_total`` (received over the bus and written to the local daemon). The
  number of accepted frames is the sum of both counters over every relay process that ran (the two
  restarted ones included), read from each process's ``relay_stopped`` log line; the relays still
  running at the end are stopped for that.
* **Delivered** frames are the key exchange inits and envelopes the daemon received.
* A frame the client sent that was **not accepted** must have been answered ``DAEMON_UNAVAILABLE``
  (``relay_client_messages_dropped_total``), dropped on the bus for want of a daemon
  (``relay_bus_frames_dropped_total``) or lost with the socket the relay closed. A relay reads what a
  client wrote before the client's close reply, so only envelopes written between the start of a
  restart and the client's ``on_disconnected`` can be lost with the close; the rest must be counted.
* A peer is **without a relay** from its ``on_disconnected`` to its next ``on_connected``
  (:class:`~viewport.client.ReconnectingConnection` callbacks).

Needs Debian's ``haproxy`` and the machine's Redis on 127.0.0.1:6379.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import LoopingCall

from tests.redis_server import free_port
from tests.relay_cluster import Backplane, ready_status, relay_id_of, stopped_counters, successor
from tests.support import RelayProcess, fetch_metrics, http_request, kex_init, poll_until, start_relays, token
from tests.test_e2e_balancer import Balancer, needs_haproxy
from viewport.client import CloseInfo, ReconnectingConnection, RelayConnection, is_status

RUNTIME_TARGET = "rt1"
SEND_INTERVAL_SECONDS = 0.003
FRAMES_AFTER_RECOVERY = 100
PROBE_WORKSPACES = [f"probe-{n}" for n in range(16)]
ACCEPTED = ("relay_frames_client_to_daemon_total", "relay_bus_frames_to_daemon_total")
REFUSED = ("relay_client_messages_dropped_total", "relay_bus_frames_dropped_total")
REPORTED = ACCEPTED + REFUSED + ("relay_client_messages_routed_bus_total",)
FAST_BACKOFF: Dict[str, Any] = {"base_delay": 0.02, "max_delay": 0.25, "reset_after": 1.0}


class Outages:
    """Connect and disconnect times of one ReconnectingConnection, paired into periods without a relay."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: List[Tuple[float, str]] = []

    def connected(self, conn: RelayConnection) -> None:
        """``on_connected``: a relay is back."""
        self.events.append((time.monotonic(), "up"))

    def disconnected(self, info: CloseInfo) -> None:
        """``on_disconnected``: the relay is gone."""
        self.events.append((time.monotonic(), "down"))

    def periods(self) -> List[Tuple[float, Optional[float]]]:
        """(disconnected at, reconnected at or None) for every disconnect."""
        found: List[Tuple[float, Optional[float]]] = []
        down: Optional[float] = None
        for at, kind in self.events:
            if kind == "down" and down is None:
                down = at
            elif kind == "up" and down is not None:
                found.append((down, at))
                down = None
        if down is not None:
            found.append((down, None))
        return found


class SequenceDaemon:
    """The daemon: answers key exchanges and records the ``seq`` of every envelope it receives (no echo)."""

    def __init__(self, url: str, workspace: str) -> None:
        self.seqs: List[int] = []
        self.kex_inits = 0
        self.outages = Outages("daemon D")
        self.connection = ReconnectingConnection(
            reactor, url, token_factory=lambda: token("workspace-daemon", workspace, RUNTIME_TARGET),
            role="workspace-daemon", workspace_id=workspace, runtime_target_id=RUNTIME_TARGET,
            on_message=self._message, on_connected=self.outages.connected,
            on_disconnected=self.outages.disconnected, **FAST_BACKOFF,
        )

    @property
    def delivered(self) -> int:
        """Client frames that reached the daemon (key exchange inits and envelopes)."""
        return self.kex_inits + len(self.seqs)

    def _message(self, text: str) -> None:
        frame = json.loads(text)
        if frame.get("type") == "relay_key_exchange_init":
            self.kex_inits += 1
            self.connection.send_json({
                "type": "relay_key_exchange_response", "version": 3, "profile": "noise-ik",
                "requestId": frame["requestId"], "daemonPublicKey": "d", "daemonEphemeralPublicKey": "e",
                "encryptedMetadata": "m", "sessionId": "s1", "proof": "p", "epoch": 1,
            })
        elif frame.get("type") == "e2ee":
            self.seqs.append(int(frame["seq"]))


class NumberedClient:
    """The browser client: one key exchange, then a numbered envelope every few milliseconds."""

    def __init__(self, url: str, workspace: str) -> None:
        self.session_id: Optional[str] = None
        self.unavailable_notices = 0
        self.seq = 0
        self.queued = 0
        self.sent_now_at: List[float] = []
        self.outages = Outages("client C")
        self.connection = ReconnectingConnection(
            reactor, url, token_factory=lambda: token("client", workspace, RUNTIME_TARGET), role="client",
            workspace_id=workspace, runtime_target_id=RUNTIME_TARGET, token_via="subprotocol",
            # Room for every frame of a slow restart: the queue must never drop one.
            max_queued_messages=100_000,
            on_message=self._message, on_connected=self.outages.connected,
            on_disconnected=self.outages.disconnected, **FAST_BACKOFF,
        )
        self._pacer = LoopingCall(self._send_next)
        self._pacer.clock = reactor

    def _message(self, text: str) -> None:
        frame = json.loads(text)
        if frame.get("type") == "relay_key_exchange_response":
            self.session_id = frame["sessionId"]
        elif is_status(frame, "DAEMON_UNAVAILABLE"):
            self.unavailable_notices += 1

    def start_stream(self) -> None:
        """Start sending envelopes ``seq`` 1, 2, ... every SEND_INTERVAL_SECONDS."""
        self._pacer.start(SEND_INTERVAL_SECONDS, now=True)

    def stop_stream(self) -> None:
        """Stop sending."""
        if self._pacer.running:
            self._pacer.stop()

    def _send_next(self) -> None:
        self.seq += 1
        sent_now = self.connection.send_json({
            "type": "e2ee", "version": 2, "profile": "noise-ik", "sessionId": self.session_id, "epoch": 1,
            "seq": self.seq, "iv": "i", "tag": "t", "ciphertext": f"c{self.seq}",
        })
        if sent_now:
            self.sent_now_at.append(time.monotonic())
        else:
            self.queued += 1

    def sent_into_closing_relays(self, restarts: List[Tuple[str, float]], end: float) -> int:
        """
        Envelopes written to an open socket after a restart began and before C saw that socket close
        (during that restart, which lasts until the next one begins or ``end``): the most the relay's
        close can have lost, as a relay reads what arrives before the client's close reply.
        """
        downs = [at for at, kind in self.outages.events if kind == "down"]
        count = 0
        for index, (_, began) in enumerate(restarts):
            until = restarts[index + 1][1] if index + 1 < len(restarts) else end
            closed = next((at for at in downs if began <= at < until), None)
            if closed is not None:
                count += sum(1 for at in self.sent_now_at if began <= at <= closed)
        return count


@inlineCallbacks
def balancer_choice(balancer: Balancer, workspace: str) -> Any:
    """The RELAY_ID of the relay HAProxy sends the workspace to right now (None when none answers)."""
    try:
        status, _, body = yield http_request("GET", f"http://127.0.0.1:{balancer.port}/health?workspaceId={workspace}")
    except Exception:
        return None
    return json.loads(body).get("relayId") if status == 200 else None


@inlineCallbacks
def back_in_rotation(relay: RelayProcess, balancer: Balancer) -> Any:
    """
    Wait until the relay is ready (backplane up) and HAProxy sends workspaces to it again: some of
    PROBE_WORKSPACES hash to each relay, and /health (verbose) names the relay that answered.
    """
    yield poll_until(lambda: ready_status(relay).addCallback(lambda status: status == 200), 15, "relay ready")

    @inlineCallbacks
    def routed_to_relay() -> Any:
        chosen = yield gatherResults([balancer_choice(balancer, probe) for probe in PROBE_WORKSPACES])
        return relay_id_of(relay) in chosen

    yield poll_until(routed_to_relay, 15, f"HAProxy routing to {relay_id_of(relay)}")


@inlineCallbacks
def accepted_so_far(stopped: List[RelayProcess], running: List[RelayProcess]) -> Any:
    """Frames accepted for delivery: stopped processes' relay_stopped counters plus running ones' /metrics."""
    total = sum(stopped_counters(relay).get(name, 0) for relay in stopped for name in ACCEPTED)
    for relay in running:
        values = yield fetch_metrics(relay)
        total += int(sum(values.get(name, 0.0) for name in ACCEPTED))
    return total


def make_relay(backplane: Backplane, name: str) -> RelayProcess:
    """A Redis-mode relay on a fixed free port whose verbose /health names it, with room for a fast stream."""
    # The default limits (240 runtime frames a minute per client) would close a client sending one
    # frame every few milliseconds; this test is about restarts, not rate limits.
    return backplane.relay(
        name,
        port=free_port(),
        RELAY_RUNTIME_RATE_PER_MINUTE="1000000",
        RELAY_RUNTIME_RATE_PER_MINUTE_WORKSPACE="1000000",
        RELAY_HEALTH_VERBOSE="1",
    )


def _phase_of(at: float, restarts: List[Tuple[str, float]]) -> str:
    """The restart under way at ``at``."""
    phase = "before the restarts"
    for name, started in restarts:
        if at >= started:
            phase = name
    return phase


def _ranges(numbers: List[int]) -> List[Tuple[int, int]]:
    """Sorted numbers as (first, last) runs of consecutive values."""
    runs: List[Tuple[int, int]] = []
    for number in numbers:
        if runs and runs[-1][1] == number - 1:
            runs[-1] = (runs[-1][0], number)
        else:
            runs.append((number, number))
    return runs


def holder(relays: Dict[str, RelayProcess], role: str, workspace: str) -> str:
    """Which running relay (by name) has the workspace's ``role`` ("daemon" or "client") connected, from its logs."""
    for name, relay in relays.items():
        joined = [e for e in relay.events(f"{role}_connected") if e["details"].get("workspaceId") == workspace]
        left = [e for e in relay.events(f"{role}_disconnected") if e["details"].get("workspaceId") == workspace]
        if len(joined) > len(left):
            return name
    return "none"


def both_connected(daemon: SequenceDaemon, client: NumberedClient) -> bool:
    """Whether D and C both have an open connection."""
    return daemon.connection.connected and client.connection.connected


def daemon_gets_frames(daemon: SequenceDaemon, more: int) -> "Deferred[Any]":
    """Wait until the daemon received ``more`` envelopes beyond what it has now."""
    wanted = len(daemon.seqs) + more
    return poll_until(lambda: len(daemon.seqs) >= wanted, 10, f"{more} more envelopes at the daemon")


@needs_haproxy
@pytest.mark.parametrize("failover", [False, True], ids=["restart-at-once", "restart-after-failover"])
@pytest_twisted.inlineCallbacks
def test_rolling_restart_loses_no_accepted_frame(failover: bool) -> Any:
    """Restarting both relays one after the other delivers every accepted frame exactly once; the rest is answered or closed."""
    test_started = time.monotonic()
    backplane = Backplane("redis")
    workspace = f"rolling-{uuid.uuid4().hex[:8]}"
    relays = {name: make_relay(backplane, name) for name in ("a", "b")}
    ran: List[RelayProcess] = list(relays.values())
    yield start_relays(*relays.values())
    balancer = Balancer(relays["a"], relays["b"])
    daemon = SequenceDaemon(balancer.url, workspace)
    client = NumberedClient(balancer.url, workspace)
    restarts: List[Tuple[str, float]] = []
    moves: List[str] = []
    try:
        daemon.connection.start()
        client.connection.start()
        yield poll_until(lambda: both_connected(daemon, client), 15, "D and C connected")
        client.connection.send_text(kex_init("rolling-kex"))
        yield poll_until(lambda: client.session_id is not None, 10, "key exchange")
        client.start_stream()
        yield daemon_gets_frames(daemon, FRAMES_AFTER_RECOVERY)
        first = holder(relays, "daemon", workspace)
        for name in (first, "b" if first == "a" else "a"):
            before = f"D on {holder(relays, 'daemon', workspace)}, C on {holder(relays, 'client', workspace)}"
            restarts.append((f"restart of {name}", time.monotonic()))
            old = relays[name]
            yield old.stop()
            if failover:
                # The peers reconnect to the other relay before this one comes back.
                yield poll_until(lambda: both_connected(daemon, client), 15, "D and C failed over")
            relays[name] = successor(old)
            ran.append(relays[name])
            yield start_relays(relays[name])
            yield back_in_rotation(relays[name], balancer)
            yield poll_until(lambda: both_connected(daemon, client), 15, "D and C reconnected")
            yield daemon_gets_frames(daemon, FRAMES_AFTER_RECOVERY)
            moves.append(f"restart of {name}: {before} before; D on {holder(relays, 'daemon', workspace)}, "
                         f"C on {holder(relays, 'client', workspace)} after")
        last_restart_done = time.monotonic()
        yield poll_until(lambda: client.connection.queued == 0, 10, "client queue flushed")
        client.stop_stream()
        running = list(relays.values())
        stopped = [relay for relay in ran if relay not in running]

        @inlineCallbacks
        def settled() -> Any:
            return (yield accepted_so_far(stopped, running)) == daemon.delivered

        try:
            yield poll_until(settled, 5, "every accepted frame delivered")
        except AssertionError:
            pass  # the exact comparison below says what is missing
    finally:
        stopping_at = time.monotonic()
        client.stop_stream()
        yield daemon.connection.stop()
        yield client.connection.stop()
        yield balancer.stop()
        for relay in ran:
            yield relay.stop()
    duration = time.monotonic() - test_started

    assert all(relay.events("relay_stopped") for relay in ran), "a relay stopped without its relay_stopped line"
    counters = [stopped_counters(relay) for relay in ran]
    accepted = sum(c.get(name, 0) for c in counters for name in ACCEPTED)
    by_counter = {name: sum(c.get(name, 0) for c in counters) for name in ACCEPTED + REFUSED}
    sent = client.seq + 1  # the envelopes and the one key exchange init
    refused = sum(by_counter[name] for name in REFUSED)
    duplicates = len(daemon.seqs) - len(set(daemon.seqs))
    missing = sorted(set(range(1, client.seq + 1)) - set(daemon.seqs))
    unaccounted = sent - accepted - refused
    at_close = client.sent_into_closing_relays(restarts, stopping_at)
    relay_errors = [entry for relay in ran for entry in map(json.loads, relay.output.lines)
                    if entry.get("level") in ("error", "critical")]
    outages = {peer.name: [(down, up) for down, up in peer.periods() if down < stopping_at]
               for peer in (daemon.outages, client.outages)}

    print(f"\nrolling restart ({'after failover' if failover else 'at once'}): {duration:.2f} s in all, "
          f"both relays restarted after {last_restart_done - test_started:.2f} s")
    for move in moves:
        print(f"  {move}")
    for peer_name, periods in outages.items():
        for down, up in periods:
            gap = f"{up - down:.3f} s" if up is not None else "never reconnected"
            print(f"  {peer_name} without a relay for {gap} ({_phase_of(down, restarts)})")
    print(f"  sent {sent} (1 key exchange + {client.seq} envelopes, {client.queued} queued while disconnected, "
          f"{client.connection.dropped} dropped by the queue)")
    print(f"  accepted {accepted} ({', '.join(f'{n}={by_counter[n]}' for n in ACCEPTED)}); "
          f"delivered {daemon.delivered} ({daemon.kex_inits} key exchange + {len(daemon.seqs)} envelopes)")
    print(f"  not accepted {sent - accepted}: DAEMON_UNAVAILABLE answers {by_counter[REFUSED[0]]} "
          f"({client.unavailable_notices} notices reached C), dropped on the bus {by_counter[REFUSED[1]]}, "
          f"neither ({unaccounted}; at most {at_close} can be lost with a closing socket)")
    print(f"  envelopes never delivered: {len(missing)} (seq runs {_ranges(missing)[:5]})")
    for relay in ran:
        moved = stopped_counters(relay)
        print(f"  {relay_id_of(relay)} :{relay.port}: {({name: moved[name] for name in REPORTED if name in moved})}")
    haproxy_said = balancer.protocol.output.decode("utf-8", "replace").strip()
    if haproxy_said:
        print("  HAProxy: " + haproxy_said.replace("\n", "\n  HAProxy: "))

    assert duplicates == 0, f"{duplicates} envelopes delivered twice"
    assert daemon.delivered == accepted, (
        f"accepted {accepted} frames but delivered {daemon.delivered}: {accepted - daemon.delivered} accepted frames lost"
    )
    assert client.connection.dropped == 0, "the client's queue dropped frames"
    assert client.queued > 0, "no frame was sent while the client was disconnected: the restart was not exercised"
    assert client.connection.queued == 0, "queued frames were never flushed"
    assert 0 <= unaccounted <= at_close, (
        f"{unaccounted} frames were neither accepted nor refused, but only {at_close} went to a closing relay; "
        f"relays logged {len(relay_errors)} errors: {[e['details'] for e in relay_errors][:2]}"
    )
    assert all(periods and all(up is not None for _, up in periods) for periods in outages.values()), outages
