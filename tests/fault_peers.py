"""The two peers of the fault bench: a daemon and a client that write numbered e2ee envelopes and count what arrives."""

from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall

from tests.fault_ledger import Ledger
from tests.support import dumps, kex_init, kex_response, poll_until, token
from viewport.client import Frame, RelayConnection, connect

RATE = 200.0
#: The daemon reconnects this long after its connection closed (the failover delay of issue 8).
DAEMON_RECONNECT_DELAY = 1.0
#: The client waits this long after a DAEMON_UNAVAILABLE before its next key exchange attempt.
CLIENT_RETRY_DELAY = 0.1
#: A key exchange neither answered nor refused within this long is tried again.
KEX_TIMEOUT = 5.0
RUNTIME_TARGET = "rt1"


def now() -> float:
    """The bench's clock (both peers live in this process, so their times compare)."""
    return time.monotonic()


def numbered_envelope(session_id: str, number: int, sender: str) -> str:
    """An e2ee envelope numbered ``number`` (its seq), naming sender and number in the ciphertext too."""
    return dumps({"type": "e2ee", "version": 2, "profile": "noise-ik", "sessionId": session_id, "epoch": 1,
                  "seq": number, "iv": "i", "tag": "t", "ciphertext": f"{sender}:{number}"})


def session_for(request_id: str) -> str:
    """The session id the daemon gives the key exchange ``request_id``."""
    return f"s-{request_id}"


def _parse(frame: Frame) -> Dict[str, Any]:
    try:
        value = json.loads(frame.text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _number(message: Dict[str, Any], sender: str) -> Optional[int]:
    text = message.get("ciphertext")
    if isinstance(text, str) and text.startswith(sender + ":"):
        return int(text.split(":", 1)[1])
    return None


def _cancel(call: Optional[IDelayedCall]) -> None:
    if call is not None and call.active():
        call.cancel()


class TrafficDaemon:
    """
    The scope's daemon: answers every key exchange, writes numbered envelopes to the newest session of
    the traffic client, and counts the client's envelopes and key exchanges that reach it. After its
    connection closes it reconnects, ``DAEMON_RECONNECT_DELAY`` later, to ``failover_url`` (default: the same relay).
    """

    def __init__(self, url: str, workspace: str, rate: float, to_daemon: Ledger, to_client: Ledger) -> None:
        self.url = url
        self.failover_url = url
        self.workspace = workspace
        self.to_daemon = to_daemon
        self.to_client = to_client
        self.conn: Optional[RelayConnection] = None
        self.connections = 0
        self.opened_at: List[Tuple[float, str]] = []
        self.closed_at: List[float] = []
        self.session: Optional[str] = None
        self.sent = 0
        self.unsendable = 0
        self.kex_answered = 0
        self._rate = rate
        self._loop = LoopingCall.withCount(self._tick)
        self._retry: Optional[IDelayedCall] = None
        self._stopped = False

    @inlineCallbacks
    def connect(self) -> Any:
        """Open a connection to ``url`` and start handling its messages."""
        conn = yield connect(reactor, self.url, token=token("workspace-daemon", self.workspace, RUNTIME_TARGET),
                             role="workspace-daemon", workspace_id=self.workspace, runtime_target_id=RUNTIME_TARGET)
        if self._stopped:
            yield conn.abort()
            return conn
        self.conn = conn
        self.connections += 1
        self.opened_at.append((now(), self.url))
        conn.set_message_handler(self._message)
        conn.closed.addCallback(self._closed)
        return conn

    def start_sending(self) -> None:
        """Write ``rate`` envelopes a second from now on (catching up after a stall of the reactor)."""
        if self._rate > 0:
            self._loop.start(1.0 / self._rate, now=False)

    def stop_sending(self) -> None:
        """Stop writing envelopes."""
        if self._loop.running:
            self._loop.stop()

    def stop(self) -> "Deferred[Any]":
        """Stop for good: no more writes or reconnects; drop the connection."""
        self._stopped = True
        self.stop_sending()
        _cancel(self._retry)
        if self.conn is not None and self.conn.close_info is None:
            return self.conn.abort()
        return succeed(None)

    def _tick(self, count: int) -> None:
        for _ in range(count):
            conn = self.conn
            if conn is None or not conn.is_open or self.session is None:
                self.unsendable += 1
                continue
            self.sent += 1
            conn.send_text(numbered_envelope(self.session, self.sent, "daemon"))
            self.to_client.record_sent(f"e{self.sent}", "envelope", now(), self.session, self.connections)

    def _message(self, frame: Frame) -> None:
        message = _parse(frame)
        kind = message.get("type")
        if kind == "relay_key_exchange_init":
            request_id = str(message.get("requestId", ""))
            self.to_daemon.record_arrival(f"k{request_id}", now())
            session = session_for(request_id)
            if self.conn is not None:
                self.conn.send_text(kex_response(request_id, session))
            self.kex_answered += 1
            if request_id.startswith("traffic-"):
                self.session = session
        elif kind == "e2ee":
            number = _number(message, "client")
            if number is not None:
                self.to_daemon.record_arrival(f"e{number}", now())

    def _closed(self, _: Any) -> None:
        self.closed_at.append(now())
        self.conn = None
        if not self._stopped:
            self.url = self.failover_url
            self._retry = reactor.callLater(DAEMON_RECONNECT_DELAY, self._reconnect)  # type: ignore[attr-defined]

    def _reconnect(self) -> None:
        self._retry = None
        if self._stopped:
            return

        def failed(_: Any) -> None:
            if not self._stopped:
                self._retry = reactor.callLater(0.2, self._reconnect)  # type: ignore[attr-defined]

        self.connect().addErrback(failed)


class TrafficClient:
    """
    A browser-style client on relay B: it key-exchanges, writes numbered envelopes while it has a session,
    and, as a real client does, gives its session up and key-exchanges again after every
    ``DAEMON_UNAVAILABLE`` (``CLIENT_RETRY_DELAY`` later) or a key exchange left unanswered for
    ``KEX_TIMEOUT``. It records every relay status and close (the signals the ledger counts).
    An idle client (``rekey=False``, rate 0) only key-exchanges once and listens.
    """

    def __init__(self, url: str, workspace: str, rate: float, to_daemon: Ledger, to_client: Ledger,
                 name: str = "traffic", rekey: bool = True) -> None:
        self.url = url
        self.workspace = workspace
        self.name = name
        self.to_daemon = to_daemon
        self.to_client = to_client
        self.conn: Optional[RelayConnection] = None
        self.connections = 0
        self.session: Optional[str] = None
        self.pending: Optional[str] = None
        self.sent = 0
        self.kex_sent = 0
        self.kex_answered = 0
        self.stale_kex = 0
        self.refusals: List[float] = []
        self.signals: List[float] = []
        self.closes: List[Tuple[float, int]] = []
        self.abandoned: Dict[str, float] = {}
        """Sessions given up after a signal: the session held, or the one of the key exchange still pending."""
        self.statuses: Dict[str, int] = {}
        self._rate = rate
        self._rekey_on_signal = rekey
        self._loop = LoopingCall.withCount(self._tick)
        self._retry: Optional[IDelayedCall] = None
        self._kex_timer: Optional[IDelayedCall] = None
        self._stopped = False

    @inlineCallbacks
    def connect(self) -> Any:
        """Open a connection to relay B and start a key exchange."""
        conn = yield connect(reactor, self.url, token=token("client", self.workspace, RUNTIME_TARGET, clientId=self.name),
                             role="client", workspace_id=self.workspace, runtime_target_id=RUNTIME_TARGET)
        if self._stopped:
            yield conn.abort()
            return conn
        self.conn = conn
        self.connections += 1
        conn.set_message_handler(self._message)
        conn.closed.addCallback(self._closed, self.connections)
        self.rekey()
        return conn

    def keyed(self, timeout: float = 10.0) -> "Deferred[Any]":
        """Wait until the client holds a session."""
        return poll_until(lambda: self.session is not None, timeout, f"{self.name} keyed")

    def start_sending(self) -> None:
        """Write ``rate`` envelopes a second while keyed."""
        if self._rate > 0:
            self._loop.start(1.0 / self._rate, now=False)

    def stop_sending(self) -> None:
        """Stop writing envelopes (key exchanges stop too)."""
        if self._loop.running:
            self._loop.stop()
        self._rekey_on_signal = False
        _cancel(self._retry)
        _cancel(self._kex_timer)

    def stop(self) -> "Deferred[Any]":
        """Stop for good and drop the connection."""
        self._stopped = True
        self.stop_sending()
        if self.conn is not None and self.conn.close_info is None:
            return self.conn.abort()
        return succeed(None)

    def signal_after(self, moment: float) -> Optional[float]:
        """Seconds from ``moment`` to the first signal after it (None: none came)."""
        later = [at for at in self.signals if at >= moment]
        return min(later) - moment if later else None

    def rekey(self) -> None:
        """Send a new key exchange init; its answer (or a timeout) decides what follows."""
        self._retry = None
        _cancel(self._kex_timer)
        conn = self.conn
        if conn is None or not conn.is_open or self._stopped:
            return
        self.kex_sent += 1
        request_id = f"{self.name}-k{self.kex_sent}"
        self.pending = request_id
        conn.send_text(kex_init(request_id))
        self.to_daemon.record_sent(f"k{request_id}", "kex", now(), "", self.connections)
        if self._rekey_on_signal:
            self._kex_timer = reactor.callLater(KEX_TIMEOUT, self.rekey)  # type: ignore[attr-defined]

    def _tick(self, count: int) -> None:
        for _ in range(count):
            conn = self.conn
            if conn is None or not conn.is_open or self.session is None:
                continue
            self.sent += 1
            conn.send_text(numbered_envelope(self.session, self.sent, "client"))
            self.to_daemon.record_sent(f"e{self.sent}", "envelope", now(), self.session, self.connections)

    def _message(self, frame: Frame) -> None:
        at = now()
        message = _parse(frame)
        kind = message.get("type")
        if kind == "relay_status":
            code = str(message.get("code"))
            self.statuses[code] = self.statuses.get(code, 0) + 1
            if code == "DAEMON_UNAVAILABLE":
                self.refusals.append(at)
                self.signals.append(at)
                self._lost_daemon(at)
            elif code == "RELAY_REDIRECT":
                self.signals.append(at)
        elif kind == "relay_key_exchange_response":
            if message.get("requestId") == self.pending and self.pending is not None:
                self.session = str(message.get("sessionId"))
                self.abandoned.pop(self.session, None)  # taken up after all: its frames count again
                self.pending = None
                self.kex_answered += 1
                _cancel(self._retry)
                _cancel(self._kex_timer)
            else:
                self.stale_kex += 1
        elif kind == "e2ee":
            number = _number(message, "daemon")
            if number is not None:
                self.to_client.record_arrival(f"e{number}", at)

    def _lost_daemon(self, at: float) -> None:
        if self.session is not None:
            self.abandoned[self.session] = at
            self.session = None
        if self.pending is not None:
            self.abandoned.setdefault(session_for(self.pending), at)
        if self._rekey_on_signal and (self._retry is None or not self._retry.active()):
            _cancel(self._kex_timer)
            self._retry = reactor.callLater(CLIENT_RETRY_DELAY, self.rekey)  # type: ignore[attr-defined]

    def _closed(self, _: Any, connection: int) -> None:
        at = now()
        self.closes.append((at, connection))
        self.signals.append(at)
        self.conn = None
        self._lost_daemon(at)
        _cancel(self._retry)
        if not self._stopped and self._rekey_on_signal:
            self._retry = reactor.callLater(0.2, self._reconnect)  # type: ignore[attr-defined]

    def _reconnect(self) -> None:
        self._retry = None

        def failed(_: Any) -> None:
            if not self._stopped:
                self._retry = reactor.callLater(0.2, self._reconnect)  # type: ignore[attr-defined]

        self.connect().addErrback(failed)


__all__ = ["RATE", "RUNTIME_TARGET", "TrafficClient", "TrafficDaemon", "now", "numbered_envelope", "session_for"]
