"""
The fuzz driver: batches of heads and frames against one relay process, the findings they turn up,
the liveness checks after each batch, and the scan of all the relay wrote.
"""

from __future__ import annotations

import base64
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults, inlineCallbacks
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.task import deferLater

from tests.fuzz.frames import CHANNEL, FrameCase, byte_cases, draw, encode_frame, frame_text, structured_frames
from tests.fuzz.heads import ALLOWED_ORIGINS, HEAD_TIMEOUT, HeadCase, expected_echo, head_cases
from tests.fuzz.ledger import MARKER, Leak, Ledger, relay_output
from tests.fuzz.scope import PeerSpec, Scope
from tests.fuzz.tokens import Tokens
from tests.fuzz.wire import OP_BINARY, OP_TEXT, RawPeer, build_head, connect_raw, ws_frame, ws_target
from tests.support import RelayProcess, e2e_env, fetch_metrics, http_request
from viewport.relay.frames import classify_client_frame, classify_daemon_frame, parse_frame

#: Every line the relay writes is shorter than this, whatever a peer sends (docs/protocol.md bounds each
#: logged string and one line's strings together; a traceback may be longer than the rest).
MAX_LOG_LINE = 20_000
RELAY_TYPES = ("relay_status", "viewport.session_events.", "viewport.session_viewer_presence_denied/v1",
               "viewport.worker_transport.response/v1")
#: Finding kinds that mean the relay broke (crashed, hung, raised, leaked its internals).
CRASHES_KINDS = ("crash", "health", "error-log", "hang", "internal-error", "5xx", "internals-in-response", "head-timeout")
#: Close codes a peer may legitimately get; 1011 means our code raised, 1006 no close frame at all.
ACCEPTABLE_CLOSES = frozenset({1000, 1001, 1002, 1007, 1009, 4008})


def fuzz_env(**overrides: str) -> Dict[str, str]:
    """The e2e environment with caps and rate limits out of the way, so only the inputs decide."""
    env = e2e_env(
        RELAY_MAX_CONNECTIONS_PER_IP="1000000", RELAY_MAX_TOTAL_CONNECTIONS="1000000",
        RELAY_MAX_CLIENTS_PER_WORKSPACE="1000000", RELAY_RUNTIME_RATE_PER_MINUTE="1000000000",
        RELAY_RUNTIME_RATE_PER_MINUTE_WORKSPACE="1000000000", RELAY_DAEMON_RUNTIME_RATE_PER_MINUTE="1000000000",
        RELAY_KEX_INIT_RATE_PER_MINUTE="100000000", RELAY_PAIRING_RATE_PER_MINUTE="100000000",
        RELAY_UPGRADE_RATE_PER_MINUTE="100000000", RELAY_ALLOWED_ORIGINS=ALLOWED_ORIGINS,
    )
    env.update(overrides)
    return env


def rss_kib(pid: int) -> int:
    """VmRSS of a process from /proc/<pid>/status (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def sleep(seconds: float) -> "Deferred[None]":
    """A Deferred that fires after ``seconds``."""
    return deferLater(reactor, seconds, lambda: None)


def _json_object(payload: bytes) -> Optional[Dict[str, Any]]:
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


@dataclass
class Finding:
    """Something the relay did that the spec (docs/protocol.md) does not allow, with a reproducer."""

    kind: str
    case: str
    detail: str
    reproducer: str = ""

    @property
    def group(self) -> str:
        """The kind and the case without its batch and index: findings of one cause share it."""
        return f"{self.kind} {re.sub(r'^[a-z]+#[0-9.]+ ', '', self.case)}"

    def line(self) -> str:
        """One printable line."""
        text = f"[{self.kind}] {self.case}: {self.detail}"
        return text + (f"\n    reproducer: {self.reproducer}" if self.reproducer else "")


@dataclass
class Stats:
    """What one batch (or a whole run) did."""

    heads: int = 0
    frames: int = 0
    wire_bytes: int = 0
    reconnects: int = 0
    statuses: Dict[str, int] = field(default_factory=dict)
    closes: Dict[str, int] = field(default_factory=dict)
    close_cases: Dict[str, int] = field(default_factory=dict)  # "<code> <case kind>" -> count
    delivered: Dict[str, int] = field(default_factory=dict)  # forwarded frames and relay replies by kind

    def add(self, other: "Stats") -> None:
        """Accumulate another batch."""
        self.heads += other.heads
        self.frames += other.frames
        self.wire_bytes += other.wire_bytes
        self.reconnects += other.reconnects
        for mine, theirs in ((self.statuses, other.statuses), (self.closes, other.closes),
                             (self.close_cases, other.close_cases), (self.delivered, other.delivered)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value


@dataclass
class Health:
    """The relay after a batch."""

    alive: bool
    health_ok: bool
    rss_kib: int
    error_lines: List[str]
    exit_code: Optional[int] = None
    connections: Optional[float] = None  # relay_connections_total once the batch's sockets are closed
    workspaces: Optional[float] = None  # relay_workspaces_total


class FuzzDriver:
    """
    Attacks one relay process with heads and frames derived from ``seed``; records findings.

    ``heads(n)`` and ``frames(n)`` run one batch each; ``check()`` verifies the relay is alive,
    answers ``/health`` and logged no crash; ``scan()`` looks for every token and marker sent.
    """

    def __init__(self, relay: RelayProcess, seed: int, concurrency: int = 16) -> None:
        self.relay = relay
        self.seed = seed
        self.ledger = Ledger(seed)
        self.findings: List[Finding] = []
        self.total = Stats()
        self.concurrency = concurrency
        host, port = relay.http_url.split("://", 1)[1].rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.pid: int = relay.transport.pid
        self.workspace = f"fz{seed}"
        self._batch = 0
        self._seen_lines = 0
        self._seen_stderr = 0
        self._slow: List[Deferred[Any]] = []

    def _finding(self, kind: str, case: str, detail: str, reproducer: str = "") -> None:
        self.findings.append(Finding(kind, case, detail, reproducer))

    # heads

    @inlineCallbacks
    def heads(self, count: int) -> Any:
        """``count`` upgrade attempts, ``concurrency`` at a time; slow ones (head timeout) go on in the background."""
        self._batch += 1
        rng = random.Random(f"{self.seed}:heads:{self._batch}")
        cases = head_cases(rng, Tokens(self.ledger, rng), self.workspace, "fzrt", count)
        stats = Stats(heads=len(cases))
        semaphore = DeferredSemaphore(self.concurrency)
        quick = []
        for index, case in enumerate(cases):
            name = f"heads#{self._batch}.{index} {case.name}"
            if case.slow:
                self._slow.append(self._head(case, name, stats))
            else:
                quick.append(semaphore.run(self._head, case, name, stats))
        yield gatherResults(quick, consumeErrors=True)
        self.total.add(stats)
        return stats

    @inlineCallbacks
    def settle_slow(self) -> Any:
        """Wait for the background slow heads (they end when the relay's head timeout fires)."""
        slow, self._slow = self._slow, []
        yield gatherResults(slow, consumeErrors=True)

    @inlineCallbacks
    def _head(self, case: HeadCase, name: str, stats: Stats) -> Any:
        try:
            peer = yield connect_raw(self.host, self.port)
        except Exception as error:
            self._finding("connect-failed", name, repr(error))
            return
        sent = b""
        for i, chunk in enumerate(case.chunks):
            if peer.lost:
                break
            peer.write(chunk)
            sent += chunk
            stats.wire_bytes += len(chunk)
            if case.gap and i < len(case.chunks) - 1:
                yield sleep(case.gap)
        try:
            yield peer.answered.addTimeout(case.wait, reactor)
        except DeferredTimeout:
            pass
        if not peer.answered.called or (peer.head is None and not peer.lost):
            outcome: Any = "open"
        elif peer.head is None:
            outcome = "drop"
        else:
            outcome = peer.status
        stats.statuses[str(outcome)] = stats.statuses.get(str(outcome), 0) + 1
        repro = f"{len(sent)} bytes in {len(case.chunks)} chunk(s): {sent[:160]!r}{'…' if len(sent) > 160 else ''}"
        if outcome == "open":
            held = time.monotonic() - peer.connected_at
            self._finding("hang", name, f"no answer and still open {held:.1f} s after connecting", repro)
        elif case.slow and outcome == "drop":
            took = peer.ended_at - peer.connected_at
            if took > HEAD_TIMEOUT + 2.5:
                self._finding("head-timeout", name, f"partial head dropped only after {took:.1f} s", repro)
        if isinstance(outcome, int) and 500 <= outcome and outcome not in (503, 505):
            self._finding("5xx", name, f"{peer.head!r}", repro)
        if case.expect is not None and outcome not in case.expect and outcome != "open" and not (
                isinstance(outcome, int) and outcome >= 500 and outcome not in (503, 505)):
            self._finding("unexpected-status", name, f"got {outcome}, expected {sorted(map(str, case.expect))}", repro)
        self._check_response(peer, case, name, repro)
        if outcome == 101:
            state = yield peer.sync(2.0)
            code = peer.close_code if state == "closed" else None
            if state == "closed" and code is None:
                code = 1006
            if code not in case.after and not (code == 4008 and peer.close_reason == b"daemon already connected"):
                self._finding("unexpected-close", name, f"after 101: close {code} {peer.close_reason!r}", repro)
            yield peer.close()
        peer.abort()

    def _check_response(self, peer: RawPeer, case: HeadCase, name: str, repro: str) -> None:
        # After a 101 only the head is the answer: frames that follow may carry other peers' payloads.
        response = (peer.head or b"" if peer.status == 101 else peer.received).decode("latin-1")
        for word in ("Traceback", "Exception", "Error:", "autobahn", "twisted", "File \""):
            if word in response:
                self._finding("internals-in-response", name, f"{word!r} in {response[:300]!r}", repro)
        markers, needles = self.ledger.find(response)
        if peer.status == 101 and case.offers is not None:
            echoed = re.search(r"(?im)^sec-websocket-protocol:\s*(.*?)\s*$", peer.head.decode("latin-1") if peer.head else "")
            want = expected_echo(case.offers)
            got = echoed.group(1) if echoed else None
            if got != want:
                self._finding("subprotocol-echo", name, f"echoed {got!r}, docs/protocol.md §2.7 wants {want!r}", repro)
            if want is not None and want.startswith("auth."):
                needles = [n for n in needles if n not in want]
        if markers or needles:
            head = (peer.head or peer.received[:300]).decode("latin-1")
            self._finding("reflected-secret", name, f"status {peer.status}: {head[:400]!r}", repro)

    # frames

    def _specs(self) -> Dict[str, PeerSpec]:
        w, t = self.workspace, "fzrt"
        grant = {"sessionChannels": [CHANNEL]}
        return {
            "daemon": PeerSpec("workspace-daemon", w, t, {"machineId": "fz-machine"}),
            "a": PeerSpec("client", w, t, {"clientId": "fz-a"}),
            "b": PeerSpec("client", w, t, {"clientId": "fz-b"}),
            "pairing": PeerSpec("client", w, t, {"scope": "pairing", "clientId": "fz-p"}),
            "s1": PeerSpec("client", w, t, {"scope": "session-events", "clientId": "fz-s1", **grant}),
            "s2": PeerSpec("client", w, t, {"scope": "session-events", "clientId": "fz-s2", **grant}),
            "worker": PeerSpec("worker", w, None, {}),
            "outsider": PeerSpec("client", w + "x", t, {"clientId": "fz-a"}),
            "sibling": PeerSpec("client", w, "fzrt2", {"clientId": "fz-a"}),
        }

    @inlineCallbacks
    def _open(self, scope: Scope, name: str, rng: random.Random) -> Any:
        spec = scope.specs[name]
        tokens = Tokens(self.ledger, rng)
        for attempt in range(20):
            tok = tokens.valid(spec.role, spec.workspace, spec.target, f"peer-{name}", **spec.claims)
            via = rng.choice(["header", "subprotocol", "both"])
            hdrs = []
            if via in ("header", "both"):
                hdrs.append(("Authorization", f"Bearer {tok}"))
            if via in ("subprotocol", "both"):
                hdrs.append(("Sec-WebSocket-Protocol", f"viewport-relay-v1, auth.{tok}"))
            head = build_head(ws_target(spec.role, spec.workspace, spec.target), hdrs,
                              key=base64.b64encode(bytes(rng.getrandbits(8) for _ in range(16))).decode())
            try:
                peer = yield connect_raw(self.host, self.port, head)
            except Exception as error:
                self._finding("connect-failed", f"open {name}", repr(error))
                return None
            try:
                yield peer.answered.addTimeout(5.0, reactor)
            except DeferredTimeout:
                peer.abort()
                self._finding("hang", f"open {name}", "no answer to a valid upgrade within 5 s", repr(head[:200]))
                return None
            if peer.status == 101:
                state = yield peer.sync(5.0)
                if state == "open":
                    scope.history.setdefault(name, []).append(peer)
                    scope.live[name] = peer
                    return peer
                if peer.close_reason == b"daemon already connected":
                    yield sleep(0.05)  # the previous daemon socket is still being torn down
                    continue
            self._finding("setup-refused", f"open {name}", f"status {peer.status}, close {peer.close_code} {peer.close_reason!r}",
                          repr(head[:200]))
            peer.abort()
            return None
        return None

    @inlineCallbacks
    def frames(self, count: int) -> Any:
        """``count`` frame cases over one scope's peers, then the scripted ownership and session-events checks."""
        self._batch += 1
        batch = self._batch
        rng = random.Random(f"{self.seed}:frames:{batch}")
        scope = Scope(self._specs(), self.ledger)
        stats = Stats()
        # Drawn 50 at a time: one draw of thousands blocks this reactor for seconds, which would
        # delay the head-timeout measurements of the slow heads still running.
        pool: List[Any] = []
        chunks = 0
        for name in scope.specs:
            yield self._open(scope, name, rng)
        for index in range(count):
            if self.relay.output.ended.called:
                break
            example = None
            if rng.random() < 0.55:
                if not pool:
                    chunks += 1
                    pool = draw(structured_frames(), (self.seed * 1009 + batch) * 1009 + chunks, 50)[::-1]
                    yield sleep(0)
                example = pool.pop() if pool else None
            if example is not None:
                label, text = encode_frame(example, self.ledger, rng)
                sender = self._sender_for(example[0], rng)
                data = text.encode("utf-8", "surrogatepass")
                opcode = OP_BINARY if rng.random() < 0.1 else OP_TEXT
                case = FrameCase(label, sender, ws_frame(data, opcode, key=rng.randbytes(4)), [(opcode, data)])
            else:
                sender = rng.choice(["daemon", "daemon", "a", "a", "b", "pairing", "s1", "s2", "worker", "outsider"])
                case = byte_cases(rng, self.ledger, lambda: scope.valid_text(sender, rng))
                case.sender = sender
            yield self._frame_case(scope, case, f"frames#{batch}.{index} {case.label}@{case.sender}", stats, rng)
        yield self._scenario_ownership(scope, rng, batch)
        yield self._scenario_session_events(scope, rng, batch)
        for peer in list(scope.live.values()):
            yield peer.sync(5.0)
        self._judge(scope, batch, stats)
        for peer in list(scope.live.values()):
            yield peer.close()
        self.total.add(stats)
        return stats

    def _sender_for(self, kind: str, rng: random.Random) -> str:
        if rng.random() < 0.2:
            return rng.choice(list(self._specs()))
        if kind in ("kexresp3", "kexresp2", "keyupdate", "offerresp", "redeemresp", "event"):
            return "daemon"
        if kind == "e2ee":
            return rng.choice(["daemon", "a", "b"])
        if kind in ("offer", "redeem"):
            return "pairing"
        if kind in ("subscribe", "unsubscribe", "presence"):
            return rng.choice(["s1", "s2"])
        if kind == "worker":
            return "worker"
        return rng.choice(["a", "b"])

    @inlineCallbacks
    def _frame_case(self, scope: Scope, case: FrameCase, name: str, stats: Stats, rng: random.Random) -> Any:
        daemon = scope.live.get("daemon")
        if case.sender != "daemon" and (daemon is None or not daemon.is_open):
            stats.reconnects += 1
            yield self._open(scope, "daemon", rng)  # client frames should find a daemon to go to
        peer = scope.live.get(case.sender)
        if peer is None or not peer.is_open:
            stats.reconnects += 1
            peer = yield self._open(scope, case.sender, rng)
            if peer is None:
                return
        scope.note_sent(case.sender, case.messages)
        peer.write(case.wire)
        stats.frames += 1
        stats.wire_bytes += len(case.wire)
        state = yield peer.sync(15.0 if len(case.wire) > 100_000 else 5.0)
        repro = f"{case.sender} sends {len(case.wire)} bytes: {case.wire[:200]!r}{'…' if len(case.wire) > 200 else ''}"
        if state == "timeout":
            self._finding("hang", name, "no pong within the deadline while the socket stayed open", repro)
            peer.abort()
            scope.live.pop(case.sender, None)
            return
        if state == "closed":
            code = peer.close_code if peer.close_code is not None else 1006
            key = f"{code}"
            stats.closes[key] = stats.closes.get(key, 0) + 1
            by_case = f"{code} {case.label.split('/')[0].rstrip('0123456789-')}"
            stats.close_cases[by_case] = stats.close_cases.get(by_case, 0) + 1
            if code == 1011:
                self._finding("internal-error", name, f"close 1011 {peer.close_reason!r}", repro)
            elif code not in case.closes and not (code in ACCEPTABLE_CLOSES and None in case.closes and code == 4008):
                self._finding("unexpected-close", name, f"close {code} {peer.close_reason!r}, expected {sorted(map(str, case.closes))}", repro)
            scope.live.pop(case.sender, None)
            yield peer.ended
        elif None not in case.closes:
            self._finding("unexpected-open", name, f"still open, expected close {sorted(map(str, case.closes))}", repro)

    @inlineCallbacks
    def _exchange(self, scope: Scope, sender: str, payload: bytes, rng: random.Random, *others: str) -> Any:
        """Send one text message, then sync the sender and ``others`` so everything it caused has arrived."""
        peer = scope.live.get(sender)
        if peer is None or not peer.is_open:
            peer = yield self._open(scope, sender, rng)
        if peer is None:
            return None
        scope.note_sent(sender, [(OP_TEXT, payload)])
        peer.write(ws_frame(payload, key=rng.randbytes(4)))
        for name in (sender,) + others:
            other = scope.live.get(name)
            if other is not None:
                yield other.sync(5.0)
        return peer

    @inlineCallbacks
    def _refused(self, scope: Scope, sender: str, payload: bytes, rng: random.Random, *others: str) -> Any:
        """``_exchange``, then whether the sender got an ``INVALID_FRAME`` status frame (None: no sender)."""
        peer = scope.live.get(sender)
        before = len(peer.messages) if peer is not None and peer.is_open else 0
        peer = yield self._exchange(scope, sender, payload, rng, *others)
        if peer is None:
            return None
        replies = [_json_object(p) or {} for _, p in peer.messages[before:]]
        return any(r.get("type") == "relay_status" and r.get("code") == "INVALID_FRAME" for r in replies)

    @inlineCallbacks
    def _scenario_ownership(self, scope: Scope, rng: random.Random, batch: int) -> Any:
        """docs/protocol.md §4.4/§4.6: a reused requestId and sessionId stay with their first live owner."""
        for name in ("daemon", "a", "b"):
            if scope.live.get(name) is None or not scope.live[name].is_open:
                yield self._open(scope, name, rng)
        if any(scope.live.get(n) is None for n in ("daemon", "a", "b")):
            return
        mark = scope.mark_counts
        rid, sid = self.ledger.marker("scenario-request", True), self.ledger.marker("scenario-session", True)
        everyone = ("daemon", "a", "b", "pairing", "s1", "s2", "outsider", "sibling")
        init_a = scope.kex_init(" " + rid)
        init_b = scope.kex_init(rid + " ")
        yield self._exchange(scope, "a", init_a, rng, "daemon")
        yield self._exchange(scope, "b", init_b, rng, "daemon")
        name = f"frames#{batch} scenario reused requestId {rid!r}"
        if mark(init_a) != {"daemon": 1}:
            self._finding("routing", name, f"A's kex init reached {mark(init_a)}, expected only the daemon")
        if mark(init_b):
            self._finding("routing", name, f"B's reuse of A's live requestId reached {mark(init_b)}, §4.4 refuses it")
        response = scope.kex_response(rid, sid)
        yield self._exchange(scope, "daemon", response, rng, *everyone)
        if mark(response) != {"a": 1}:
            self._finding("routing", name, f"kex response reached {mark(response)}, expected only A (the owner)")
        envelope = scope.envelope(sid)
        yield self._exchange(scope, "daemon", envelope, rng, *everyone)
        if mark(envelope) != {"a": 1}:
            self._finding("routing", name, f"daemon envelope for {sid} reached {mark(envelope)}, expected only A")
        stolen = scope.envelope(sid)
        refused = yield self._refused(scope, "b", stolen, rng, "daemon")
        if mark(stolen):
            self._finding("routing", name, f"B's envelope for A's session reached {mark(stolen)}, §4.4 refuses it")
        if refused is False:
            self._finding("refusal", name, "B's envelope for A's session got no INVALID_FRAME (§4.4)", stolen.decode())
        padded = scope.envelope(rng.choice([" ", "\t", "\u00a0"]) + sid)
        refused = yield self._refused(scope, "b", padded, rng, "daemon")
        if mark(padded):
            self._finding("routing", name, f"B's envelope for A's session with a padded sessionId reached {mark(padded)}: "
                          "ownership keys are trimmed (§4.6) but the envelope's sessionId is looked up untrimmed",
                          padded.decode())
        if refused is False:
            self._finding("refusal", name, "B's envelope for A's session with a padded sessionId got no INVALID_FRAME (§4.4)",
                          padded.decode())
        again = scope.kex_response(rid, self.ledger.marker("scenario-session", True))
        yield self._exchange(scope, "daemon", again, rng, *everyone)
        if mark(again):
            self._finding("routing", name, f"a second response to a used requestId reached {mark(again)}")

    @inlineCallbacks
    def _scenario_session_events(self, scope: Scope, rng: random.Random, batch: int) -> Any:
        """docs/protocol.md §4.7: presence goes to the other subscribers of the channel, session events to subscribers only."""
        for peer_name in ("s1", "s2"):  # fresh sockets: fuzz frames may have subscribed the old ones
            old = scope.live.pop(peer_name, None)
            if old is not None:
                yield old.close()
        for peer_name in ("daemon", "s1", "s2"):
            if scope.live.get(peer_name) is None or not scope.live[peer_name].is_open:
                yield self._open(scope, peer_name, rng)
        if any(scope.live.get(n) is None for n in ("daemon", "s1", "s2")):
            return
        mark = scope.mark_counts
        name = f"frames#{batch} scenario session events"
        everyone = ("daemon", "a", "b", "pairing", "s1", "s2", "outsider", "sibling")
        s1 = scope.live["s1"]
        before = len(s1.messages)
        yield self._exchange(scope, "s1", frame_text({"type": "viewport.session_events.subscribe/v1", "channel": CHANNEL}), rng)
        replies = [_json_object(p) or {} for _, p in s1.messages[before:]]
        if not any(r.get("type") == "viewport.session_events.subscribed/v1" for r in replies):
            self._finding("session-events", name, f"no subscribed reply: {replies}")
        presence = frame_text({"type": "viewport.session_viewer_presence/v1", "channel": CHANNEL, "action": "joined",
                               "userId": self.ledger.marker("presence-user", True), "displayName": self.ledger.marker("presence-name")})
        yield self._exchange(scope, "s2", presence, rng, *everyone)
        if mark(presence) != {"s1": 1}:
            self._finding("session-events", name, f"presence reached {mark(presence)}, expected only s1")
        event = frame_text({"schema": "viewport.session_event_relay_frame/v1", "channel": CHANNEL,
                            "event": {"sequence": 1, "kind": "message", "text": self.ledger.marker("session-event")}})
        yield self._exchange(scope, "daemon", event, rng, *everyone)
        if mark(event) != {"s1": 1}:
            self._finding("session-events", name, f"session event reached {mark(event)}, expected only s1")

    def _judge(self, scope: Scope, batch: int, stats: Stats) -> None:
        """Every message a peer received is relay-originated or exactly something another peer sent."""
        daemon_sent = scope.sent_by(lambda n: n == "daemon")
        client_sent = scope.sent_by(lambda n: n != "daemon")
        recipients: Dict[bytes, Set[str]] = {}
        for name, peers in scope.history.items():
            spec = scope.specs[name]
            for peer in peers:
                for problem in peer.problems:
                    self._finding("wire", f"frames#{batch} {name}", problem)
                for opcode, payload in peer.messages:
                    where = f"frames#{batch} received by {name}"
                    if opcode != OP_TEXT:
                        self._finding("wire", where, f"relay sent opcode {opcode} (everything it sends is text): {payload[:100]!r}")
                    frame = _json_object(payload)
                    kind = str(frame.get("type", "")) if frame else ""
                    what = (str(frame.get("code") or kind or frame.get("schema", "?")) if frame else "not-json")
                    what = ("to daemon: " if spec.role == "workspace-daemon" else "to clients: ") + what.rsplit(".", 1)[-1]
                    stats.delivered[what] = stats.delivered.get(what, 0) + 1
                    if frame is not None and kind.startswith(RELAY_TYPES) and payload not in daemon_sent | client_sent:
                        if spec.role == "workspace-daemon":
                            self._finding("routing", where, f"daemon got a relay frame: {payload[:200]!r}")
                        if frame.get("workspaceId", spec.workspace) != spec.workspace:
                            self._finding("isolation", where, f"relay frame names another workspace: {payload[:200]!r}")
                        continue
                    if name in ("outsider", "sibling") and MARKER.search(payload.decode("utf-8", "replace")):
                        self._finding("isolation", where, f"another scope's payload arrived: {payload[:200]!r}")
                    if spec.role == "workspace-daemon":
                        if payload not in client_sent:
                            self._finding("forwarding", where, f"not byte-identical to anything a client sent: {payload[:200]!r}")
                        elif classify_client_frame(parse_frame(payload) or {}) is None:
                            self._finding("forwarding", where, f"forwarded an invalid client frame: {payload[:200]!r}")
                        continue
                    if payload in daemon_sent:
                        parsed = parse_frame(payload)
                        if parsed is None or classify_daemon_frame(parsed) is None:
                            self._finding("forwarding", where, f"forwarded an invalid daemon frame: {payload[:200]!r}")
                        if MARKER.search(payload.decode("utf-8", "replace")) and not (parsed or {}).get("schema"):
                            recipients.setdefault(payload, set()).add(name)
                    elif payload not in client_sent:
                        self._finding("forwarding", where, f"unexplained message: {payload[:200]!r}")
        for payload, names in recipients.items():
            if len(names) > 1:
                self._finding("routing", f"frames#{batch}", f"one daemon frame reached {sorted(names)}: {payload[:160]!r}")

    # checks

    @inlineCallbacks
    def check(self) -> Any:
        """Alive, /health answers, no Traceback or error-level line and no line too long since the last check, RSS."""
        alive = not self.relay.output.ended.called
        health_ok = False
        if alive:
            try:
                status, _, body = yield http_request("GET", self.relay.http_url + "/health").addTimeout(10, reactor)
                health_ok = status == 200 and json.loads(body).get("ok") is True
            except Exception as error:
                self._finding("health", f"after batch {self._batch}", f"/health failed: {error!r}")
        lines = self.relay.output.lines[self._seen_lines:]
        self._seen_lines += len(lines)
        errors = [line for line in lines if "Traceback" in line or '"level":"error"' in line or not line.startswith("{")]
        stderr = self.relay.output.stderr[self._seen_stderr:]
        self._seen_stderr += len(stderr)
        if stderr.strip():
            errors.append("stderr: " + stderr.decode("utf-8", "replace")[-2000:])
        for line in errors:
            self._finding("error-log", f"after batch {self._batch}", line[:1500])
        written = [("", line) for line in lines]
        written += [("stderr: ", line) for line in stderr.decode("utf-8", "replace").splitlines()]
        for where, line in written:
            if len(line) >= MAX_LOG_LINE:
                self._finding("long-log-line", f"after batch {self._batch}", f"{where}{len(line)} characters: {line[:300]}…")
        exit_code: Optional[int] = self.relay.output.ended.result if self.relay.output.ended.called else None  # type: ignore[attr-defined,assignment]
        connections = workspaces = None
        if alive and health_ok:
            deadline = time.monotonic() + 10
            while True:  # every harness socket is closed: the registered count must drop to 0
                values = yield fetch_metrics(self.relay)
                connections, workspaces = values.get("relay_connections_total"), values.get("relay_workspaces_total")
                if not connections or time.monotonic() > deadline:
                    break
                yield sleep(0.2)
            if connections:
                self._finding("connection-leak", f"after batch {self._batch}",
                              f"relay_connections_total is {connections} 10 s after every socket closed")
        if not alive:
            self._finding("crash", f"after batch {self._batch}", f"relay exited with {exit_code}")
        elif not health_ok:
            self._finding("health", f"after batch {self._batch}", "/health did not answer 200 ok")
        return Health(alive, health_ok, rss_kib(self.pid), errors, exit_code, connections, workspaces)

    def scan(self) -> List[Leak]:
        """Every minted token (full or signature) and every payload marker in all the relay wrote."""
        return self.ledger.scan(relay_output(self.relay))


def summary(stats: Stats, findings: Sequence[Finding], leaks: Sequence[Leak]) -> str:
    """A printable account of a run."""
    lines = [f"heads sent {stats.heads}, frame cases sent {stats.frames}, {stats.wire_bytes} bytes on the wire, "
             f"{stats.reconnects} reconnects",
             f"upgrade outcomes: {dict(sorted(stats.statuses.items()))}",
             f"closes after frames: {dict(sorted(stats.closes.items()))}",
             f"findings: {len(findings)}"]
    groups: Dict[str, int] = {}
    for finding in findings:
        groups[finding.group] = groups.get(finding.group, 0) + 1
    lines += [f"  {n:>4} × {group[:160]}" for group, n in sorted(groups.items())]
    lines.append(f"delivered: {dict(sorted(stats.delivered.items()))}")
    found: Dict[str, int] = {"token": 0, "token-signature": 0, "payload": 0, "identifier": 0}
    for leak in leaks:
        found[leak.kind] += 1
    lines.append(f"found in relay output: {found['token']} full tokens, {found['token-signature']} token signatures, "
                 f"{found['payload']} payload markers ({found['identifier']} marked ids, logged by design)")
    return "\n".join(lines)
