"""ServerBackplane: its platform calls against an in-memory platform, and recovery with a real bus and PostgreSQL."""

from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Optional

import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface.verify import verifyObject

from tests.pg_server import (
    INTERNAL_KEY,
    BusProcess,
    PrivateCluster,
    ScratchDatabase,
    free_port,
    http_client,
    server_backplane,
)
from viewport.relay.backplane.server import PULL_RETRY_MAX_S, ServerBackplane
from viewport.relay.backplane.signing import sign, signature_matches
from viewport.relay.interfaces import BusFrame, IBackplane, Presence
from viewport.relay.metrics import RelayMetrics

API = "/api/runtime/internal/relay"
NOW = 1_700_000_000.0


class FakePlatform(Resource):
    """
    The platform's internal API in memory: records every call; answers from a per-path queue of
    ``(status, document)``, or holds the request (a long poll) until ``answer`` is called.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[Dict[str, Any]] = []
        self.queued: Dict[str, List[Any]] = {}
        self.held: List[Any] = []

    def queue(self, path: str, status: int, document: Any) -> None:
        """The next call to ``path`` gets this answer."""
        self.queued.setdefault(API + path, []).append((status, document))

    def render_POST(self, request: Request) -> Any:
        """Record, then answer now or hold."""
        assert request.content is not None
        call = {
            "path": request.path.decode(),
            "body": json.loads(request.content.read()),
            "key": request.getHeader(b"x-relay-internal-key"),
        }
        self.calls.append(call)
        queued = self.queued.get(call["path"])
        if queued:
            status, document = queued.pop(0)
            request.setResponseCode(status)
            return json.dumps(document).encode()
        self.held.append((call, request))
        return NOT_DONE_YET

    def answer(self, status: int, document: Any) -> Dict[str, Any]:
        """Answer the oldest held request; returns its call record."""
        call, request = self.held.pop(0)
        request.setResponseCode(status)
        request.write(json.dumps(document).encode())
        request.finish()
        return call

    def paths(self) -> List[str]:
        """The API paths called so far, without the common prefix."""
        return [call["path"][len(API):] for call in self.calls]


class _Harness:
    def __init__(self, **overrides: Any) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.platform = FakePlatform()
        self.stub = StubTreq(self.platform)
        self.metrics = RelayMetrics()
        self.received: List[BusFrame] = []
        settings: Dict[str, Any] = {
            "relay_id": "relay-a",
            "public_ws_base_url": "ws://a.test/ws",
            "server_url": "http://platform.test/ignored/path",
            "internal_key": "internal-key",
            "hmac_key": "bus-key",
            "http_client": self.stub,
            "clock": self.clock,
            "pull_wait_ms": 5000,
            "max_payload_bytes": 100,
            "metrics": self.metrics,
        }
        settings.update(overrides)
        self.backplane = ServerBackplane(**settings)

    def flush(self) -> None:
        """Run what is due now (publishes leave at the end of a reactor turn) and answer what can be."""
        for _ in range(3):
            self.clock.advance(0)
            self.stub.flush()

    def start(self, head: Optional[int] = 10) -> None:
        """Start; answer the head pull."""
        self.backplane.start(self.received.append)
        self.flush()
        document: Dict[str, Any] = {"ok": True, "frames": [self.frame(3)]}
        if head is not None:
            document["headId"] = head
        self.platform.answer(200, document)
        self.flush()

    def frame(self, frame_id: int, **fields: Any) -> Dict[str, Any]:
        """A correctly signed daemon→clients frame from relay-b, as the platform returns it."""
        raw: Dict[str, Any] = {
            "id": frame_id,
            "workspaceId": "w",
            "runtimeTargetId": "t",
            "sourceRelayId": "relay-b",
            "targetRelayId": "relay-a",
            "direction": "daemon_to_clients",
            "payload": f'{{"n":{frame_id}}}',
            "issuedAtMs": int(self.clock.seconds() * 1000),
        }
        raw.update(fields)
        frame = BusFrame(raw["workspaceId"], raw["runtimeTargetId"], raw["sourceRelayId"], raw["targetRelayId"],
                         raw["direction"], raw["payload"], raw.get("machineId"))
        if "signature" not in fields:
            raw["signature"] = sign("bus-key", frame, raw["issuedAtMs"])
        return raw

    def counter(self, name: str) -> float:
        return float(getattr(self.metrics, name).value)


class ServerBackplaneUnitTests(SynchronousTestCase):
    """The platform calls of §6.2/§6.4, driven by a Clock against an in-memory platform."""

    def test_provides_interface(self) -> None:
        """ServerBackplane fully provides IBackplane and is cross-relay."""
        harness = _Harness()
        self.assertTrue(verifyObject(IBackplane, harness.backplane))
        self.assertTrue(harness.backplane.cross_relay)

    def test_publish_body_is_signed_without_nonce(self) -> None:
        """Publish posts the contract body with issuedAtMs and a signature the reference relay verifies."""
        harness = _Harness()
        harness.platform.queue("/bus/publish", 200, {"ok": True, "id": 1})
        results: List[bool] = []
        frame = BusFrame("w", "t", "relay-a", None, "client_to_daemon", '{"type":"e2ee"}', machine_id="m")
        harness.backplane.publish(frame).addCallback(results.append)
        harness.flush()
        self.assertEqual(results, [True])
        call = harness.platform.calls[0]
        self.assertEqual((call["path"], call["key"]), (API + "/bus/publish", b"internal-key"))
        body = call["body"]
        self.assertEqual(
            {k: v for k, v in body.items() if k != "signature"},
            {"workspaceId": "w", "runtimeTargetId": "t", "machineId": "m", "sourceRelayId": "relay-a",
             "targetRelayId": "", "direction": "client_to_daemon", "payload": '{"type":"e2ee"}',
             "issuedAtMs": int(NOW * 1000)},
        )
        self.assertTrue(signature_matches("bus-key", frame, body["issuedAtMs"], body["signature"]))
        self.assertEqual(harness.counter("relay_bus_publish_ok"), 1)

    def test_publish_failures_are_false(self) -> None:
        """A non-2xx answer, ok:false, or a missing runtime target make publish fire False."""
        harness = _Harness()
        harness.platform.queue("/bus/publish", 500, {"ok": True})
        harness.platform.queue("/bus/publish", 200, {"ok": False})
        results: List[bool] = []
        frame = BusFrame("w", "t", "relay-a", "relay-b", "daemon_to_clients", "{}")
        harness.backplane.publish(frame).addCallback(results.append)
        harness.backplane.publish(frame).addCallback(results.append)
        harness.backplane.publish(BusFrame("w", "", "relay-a", None, "client_to_daemon", "{}")).addCallback(
            results.append
        )
        harness.flush()
        self.assertEqual(results, [False, False, False])
        self.assertEqual(len(harness.platform.calls), 2)
        self.assertEqual(harness.counter("relay_bus_publish_failed"), 3)

    def test_presence_is_refreshed_with_machine_id(self) -> None:
        """A connected presence is re-upserted every presence_refresh_ms with its machineId until withdrawn."""
        harness = _Harness(presence_refresh_ms=20000)
        harness.start()
        for _ in range(3):
            harness.platform.queue("/presence/upsert", 200, {"ok": True})
        harness.backplane.announce_presence(Presence("w", "t", "relay-a", "ws://a.test/ws", True, machine_id="m"))
        harness.clock.advance(20)
        harness.flush()
        upserts = [c["body"] for c in harness.platform.calls if c["path"].endswith("/presence/upsert")]
        self.assertEqual(len(upserts), 2)
        self.assertEqual(upserts[0], upserts[1])
        self.assertEqual(
            upserts[1],
            {"workspaceId": "w", "runtimeTargetId": "t", "machineId": "m", "relayId": "relay-a",
             "relayWsBaseUrl": "ws://a.test/ws", "daemonConnected": True},
        )
        harness.backplane.announce_presence(Presence("w", "t", "relay-a", "ws://a.test/ws", False, machine_id="m"))
        harness.clock.advance(60)
        harness.flush()
        upserts = [c["body"] for c in harness.platform.calls if c["path"].endswith("/presence/upsert")]
        self.assertEqual([u["daemonConnected"] for u in upserts], [True, True, False])
        self.assertEqual(harness.counter("relay_presence_upsert_ok"), 3)

    def test_resolve_caches_positive_answers(self) -> None:
        """A connected answer is reused for resolve_cache_ms; a not-connected answer is not cached."""
        harness = _Harness(resolve_cache_ms=2000)
        connected = {"ok": True, "daemonConnected": True, "relayId": "relay-b", "relayWsBaseUrl": "ws://b/ws",
                     "runtimeTargetId": "t", "machineId": "m"}
        harness.platform.queue("/presence/resolve", 200, connected)
        harness.platform.queue("/presence/resolve", 200, {"ok": True, "daemonConnected": False})
        harness.platform.queue("/presence/resolve", 503, {"ok": False})
        found: List[Any] = []
        for advance in (0, 1.5, 1.0, 0):
            harness.clock.advance(advance)
            harness.backplane.resolve_presence("w", "t").addCallback(found.append)
            harness.flush()
        self.assertEqual(found[0], Presence("w", "t", "relay-b", "ws://b/ws", True, machine_id="m"))
        self.assertIs(found[1], found[0])
        self.assertEqual(found[2:], [None, None])
        self.assertEqual(harness.platform.paths().count("/presence/resolve"), 3)
        self.assertEqual(harness.platform.calls[0]["body"], {"workspaceId": "w", "runtimeTargetId": "t"})
        self.assertEqual((harness.counter("relay_presence_resolve_ok"), harness.counter("relay_presence_resolve_failed")),
                         (1, 1))

    def test_a_failed_upsert_is_sent_again_soon_while_the_presence_holds(self) -> None:
        """
        A 503 or a transport failure on upsert is retried after 0.25 s, doubling, not left to the next
        refresh (60 s here); a 4xx is not retried, and a presence withdrawn meanwhile is not sent again.
        """
        harness = _Harness(presence_refresh_ms=60000)
        harness.start()
        for status in (503, 503, 200):
            harness.platform.queue("/presence/upsert", status, {"ok": status == 200})
        harness.backplane.announce_presence(Presence("w", "t", "relay-a", "ws://a.test/ws", True))
        harness.flush()

        def upserts() -> List[bool]:
            return [c["body"]["daemonConnected"] for c in harness.platform.calls if c["path"].endswith("/presence/upsert")]

        self.assertEqual(upserts(), [True])
        harness.clock.advance(0.25)
        harness.flush()
        self.assertEqual(upserts(), [True, True])
        harness.clock.advance(0.25)
        harness.flush()
        self.assertEqual(upserts(), [True, True], "the second retry waits twice as long")
        harness.clock.advance(0.25)
        harness.flush()
        self.assertEqual(upserts(), [True, True, True])
        harness.clock.advance(10)
        harness.flush()
        self.assertEqual(upserts(), [True, True, True], "after a success nothing is retried")
        self.assertEqual((harness.counter("relay_presence_upsert_failed"), harness.counter("relay_presence_upsert_ok")), (2, 1))

        harness.platform.queue("/presence/upsert", 503, {"ok": False})
        harness.platform.queue("/presence/upsert", 200, {"ok": True})
        harness.backplane.announce_presence(Presence("w", "u", "relay-a", "ws://a.test/ws", True))
        harness.flush()
        harness.backplane.announce_presence(Presence("w", "u", "relay-a", "ws://a.test/ws", False))
        harness.flush()
        harness.clock.advance(5)
        harness.flush()
        self.assertEqual(upserts(), [True, True, True, True, False], "a withdrawn presence is not sent again")

        harness.platform.queue("/presence/upsert", 400, {"ok": False})
        harness.backplane.announce_presence(Presence("w", "v", "relay-a", "ws://a.test/ws", True))
        harness.flush()
        harness.clock.advance(5)
        harness.flush()
        self.assertEqual(len(upserts()), 6, "a refused upsert is not retried before the refresh")

    def test_forget_presence_drops_the_cached_answer_naming_that_relay(self) -> None:
        """After forget_presence for the relay a cached answer names, the next resolve asks the platform; another relay's is kept."""
        harness = _Harness(resolve_cache_ms=60000)
        connected = {"ok": True, "daemonConnected": True, "relayId": "relay-b", "relayWsBaseUrl": "ws://b/ws",
                     "runtimeTargetId": "t"}
        harness.platform.queue("/presence/resolve", 200, connected)
        harness.platform.queue("/presence/resolve", 200, {"ok": True, "daemonConnected": False})
        found: List[Any] = []
        harness.backplane.resolve_presence("w", "t").addCallback(found.append)
        harness.flush()
        harness.backplane.forget_presence("w", "t", "relay-c")
        harness.backplane.resolve_presence("w", "t").addCallback(found.append)
        harness.flush()
        self.assertIs(found[1], found[0], "an answer naming another relay stays cached")
        harness.backplane.forget_presence("w", "t", "relay-b")
        harness.backplane.resolve_presence("w", "t").addCallback(found.append)
        harness.flush()
        self.assertIsNone(found[2])
        self.assertEqual(harness.platform.paths().count("/presence/resolve"), 2)

    def test_starts_at_head_and_checks_every_frame(self) -> None:
        """Frames before the head are dropped; each pulled frame passes the §6.4 checks before delivery."""
        harness = _Harness()
        harness.start(head=10)
        self.assertEqual(harness.platform.calls[0]["body"], {"relayId": "relay-a", "sinceId": 0, "limit": 200, "waitMs": 0})
        self.assertEqual(harness.received, [])
        self.assertEqual(harness.platform.held, [])
        harness.backplane.watch_scope("w", "t", "clients")
        harness.flush()
        pull = harness.platform.held[0][0]["body"]
        self.assertEqual(pull, {"relayId": "relay-a", "sinceId": 10, "limit": 200, "waitMs": 2000})
        now_ms = int(NOW * 1000)
        frames = [
            harness.frame(11),
            harness.frame(0),
            harness.frame(12, sourceRelayId="relay-a"),
            harness.frame(13, targetRelayId="relay-c"),
            harness.frame(14, payload="x" * 101),
            harness.frame(15, direction="sideways"),
            harness.frame(16, signature="forged"),
            harness.frame(17, issuedAtMs=now_ms - 60000),
            harness.frame(11),
            harness.frame(18, runtimeTargetId="other"),
            harness.frame(19, direction="client_to_daemon"),
            harness.frame(20, targetRelayId=None, machineId="m"),
        ]
        harness.platform.answer(200, {"ok": True, "frames": frames, "headId": 20, "more": False})
        harness.flush()
        self.assertEqual([f.payload for f in harness.received], ['{"n":11}', '{"n":20}'])
        self.assertEqual(harness.received[1].machine_id, "m")
        for name, value in (
            ("relay_bus_pull_ok", 1),
            ("relay_bus_pull_frame_too_large", 1),
            ("relay_bus_pull_invalid_signature", 1),
            ("relay_bus_pull_stale_signature", 1),
            ("relay_bus_pull_replayed_signature", 1),
        ):
            self.assertEqual(harness.counter(name), value, name)
        next_pull = harness.platform.held[0][0]["body"]
        self.assertEqual(next_pull["sinceId"], 20)

    def test_the_same_signed_frame_under_two_bus_ids_is_delivered_once(self) -> None:
        """A bus offering one signed frame twice (two ids, same signature) delivers it once, counted as a replay."""
        harness = _Harness()
        harness.start(head=10)
        harness.backplane.watch_scope("w", "t", "clients")
        harness.flush()
        original = harness.frame(11)
        replayed = dict(original, id=12)
        other = harness.frame(13)
        harness.platform.answer(200, {"ok": True, "frames": [original, replayed, other], "headId": 13})
        harness.flush()
        self.assertEqual([f.payload for f in harness.received], ['{"n":11}', '{"n":13}'])
        self.assertEqual(harness.counter("relay_bus_pull_replayed_signature"), 1)

    def test_without_head_frames_are_kept_but_skew_checked(self) -> None:
        """A platform without headId: old frames are offered; only fresh ones of watched scopes are delivered."""
        harness = _Harness()
        harness.backplane.watch_scope("w", "t", "clients")
        harness.backplane.start(harness.received.append)
        harness.flush()
        stale = harness.frame(1, issuedAtMs=int(NOW * 1000) - 3600_000)
        harness.platform.answer(200, {"ok": True, "frames": [stale, harness.frame(2)]})
        harness.flush()
        self.assertEqual([f.payload for f in harness.received], ['{"n":2}'])
        self.assertEqual(harness.platform.held[0][0]["body"]["sinceId"], 2)

    def test_pull_failures_back_off_and_mark_unhealthy(self) -> None:
        """Consecutive failed pulls make the backplane unhealthy and back off; one success restores it."""
        harness = _Harness()
        harness.start()
        harness.backplane.watch_scope("w", "t", "clients")
        harness.flush()
        for _ in range(4):
            harness.platform.answer(503, {"ok": False, "reason": "DATABASE_UNAVAILABLE"})
            harness.flush()
            self.assertEqual(harness.platform.held, [], "the next pull waits for the back-off")
            harness.clock.advance(PULL_RETRY_MAX_S)
            harness.flush()
        self.assertFalse(harness.backplane.healthy)
        harness.platform.answer(200, {"ok": True, "frames": []})
        harness.flush()
        self.assertTrue(harness.backplane.healthy)
        self.assertEqual(harness.counter("relay_bus_pull_failed"), 4)

    def test_unhealthy_until_the_bus_first_answers_even_with_nothing_watched(self) -> None:
        """A relay started while its bus is down is not ready: the head is asked again, with back-off, until it answers."""
        harness = _Harness()
        harness.backplane.start(harness.received.append)
        harness.flush()
        self.assertFalse(harness.backplane.healthy)
        harness.platform.answer(503, {"ok": False, "reason": "DATABASE_UNAVAILABLE"})
        harness.flush()
        self.assertFalse(harness.backplane.healthy)
        self.assertEqual(harness.platform.held, [], "the next attempt waits for the back-off")
        harness.clock.advance(PULL_RETRY_MAX_S)
        harness.flush()
        self.assertEqual(harness.platform.held[0][0]["body"]["waitMs"], 0)
        harness.platform.answer(200, {"ok": True, "frames": [], "headId": 7})
        harness.flush()
        self.assertTrue(harness.backplane.healthy)
        harness.clock.advance(PULL_RETRY_MAX_S * 4)
        harness.flush()
        self.assertEqual(harness.platform.held, [], "nothing watched: no pull after the head")

    def test_pull_timeout_exceeds_the_wait(self) -> None:
        """A long poll is not cut by the HTTP timeout before the platform's wait ends."""
        harness = _Harness(timeout_ms=500, pull_wait_ms=2000)
        harness.start()
        harness.backplane.watch_scope("w", "t", "clients")
        harness.flush()
        harness.clock.advance(2.4)
        harness.flush()
        self.assertEqual(len(harness.platform.held), 1)
        harness.platform.answer(200, {"ok": True, "frames": []})
        harness.flush()
        self.assertTrue(harness.backplane.healthy)
        self.assertEqual(harness.counter("relay_bus_pull_failed"), 0)

    def test_loop_runs_only_while_watching(self) -> None:
        """Without watched scopes no pull is outstanding; the loop ends after the last unwatch."""
        harness = _Harness()
        harness.start()
        self.assertEqual(harness.platform.held, [])
        harness.backplane.watch_scope("w", "t", "daemon")
        harness.flush()
        self.assertEqual(len(harness.platform.held), 1)
        harness.backplane.unwatch_scope("w", "t", "daemon")
        harness.platform.answer(200, {"ok": True, "frames": [harness.frame(11, direction="client_to_daemon")]})
        harness.flush()
        self.assertEqual(harness.platform.held, [])
        self.assertEqual(harness.received, [])

    def test_stop_withdraws_presence_and_leaves_no_timers(self) -> None:
        """stop() clears this relay's presences, cancels the pull and every timer; publish then fires False."""
        harness = _Harness()
        harness.start()
        harness.platform.queue("/presence/upsert", 200, {"ok": True})
        harness.platform.queue("/presence/upsert", 200, {"ok": True})
        harness.backplane.announce_presence(Presence("w", "t", "relay-a", "ws://a.test/ws", True, machine_id="m"))
        harness.backplane.watch_scope("w", "t", "daemon")
        harness.flush()
        stopped: List[object] = []
        harness.backplane.stop().addCallback(stopped.append)
        harness.flush()
        self.assertEqual(stopped, [None])
        self.assertFalse(harness.platform.calls[-1]["body"]["daemonConnected"])
        self.assertEqual(harness.clock.getDelayedCalls(), [])
        results: List[bool] = []
        harness.backplane.publish(BusFrame("w", "t", "relay-a", None, "client_to_daemon", "{}")).addCallback(
            results.append
        )
        self.assertEqual(results, [False])


class BusCallTests(SynchronousTestCase):
    """How a bus call leaves the relay."""

    def test_the_body_is_written_at_once_behind_the_headers(self) -> None:
        """A call's body is its own producer: headers and body are written in the same turn, with a length."""
        from twisted.internet.testing import MemoryReactorClock, StringTransport
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        from viewport.platform_api import PULL_PATH
        from viewport.relay.backplane.bus_http import BusCalls

        reactor = MemoryReactorClock()
        client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        calls = BusCalls(origin="http://127.0.0.1:7790", internal_key="k" * 24, http_client=client, clock=reactor,
                         timeout_ms=2000, max_response_bytes=65536)
        calls.post(PULL_PATH, {"relayId": "relay-a", "sinceId": 0})
        host, port, factory, _, _ = reactor.tcpClients[0]
        self.assertEqual((host, port), ("127.0.0.1", 7790))
        transport = StringTransport()
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(transport)
        written = transport.value()
        head, _, body = written.partition(b"\r\n\r\n")
        self.assertEqual(json.loads(body), {"relayId": "relay-a", "sinceId": 0})
        self.assertIn(b"Content-Length: %d" % len(body), head)
        self.assertIn(b"X-Relay-Internal-Key: " + b"k" * 24, head)
        self.assertEqual(reactor.getDelayedCalls()[0].getTime(), 2.0)  # only the call's deadline: no Cooperator turn
        self.assertEqual(len(reactor.getDelayedCalls()), 1)


class ServerBackplaneBatchAndLivenessTests(SynchronousTestCase):
    """Batched, bounded publishing and relay liveness, on a bus that says it can do them (and without them on one that does not)."""

    def start(self, capabilities: List[str], **options: Any) -> _Harness:
        harness = _Harness(**options)
        harness.backplane.start(harness.received.append)
        harness.flush()
        harness.platform.answer(200, {"ok": True, "frames": [], "headId": 0, "capabilities": capabilities})
        harness.flush()
        return harness

    def publish(self, harness: _Harness, n: int, results: List[bool]) -> None:
        frame = BusFrame("w", "t", "relay-a", "relay-b", "daemon_to_clients", f'{{"n":{n}}}')
        harness.backplane.publish(frame).addCallback(results.append)

    def test_frames_queued_behind_a_publish_go_in_one_batch_in_order(self) -> None:
        """Frames of one reactor turn go in one request; those queued while it is in flight go in the next, in order."""
        harness = self.start(["batch"])
        results: List[bool] = []
        for n in range(3):
            self.publish(harness, n, results)
        harness.flush()
        for n in range(3, 6):
            self.publish(harness, n, results)
        harness.flush()
        first = harness.platform.answer(200, {"ok": True, "ids": [1, 2, 3]})
        harness.flush()
        second = harness.platform.answer(200, {"ok": True, "ids": [4, 5, 6]})
        harness.flush()
        self.assertEqual([json.loads(f["payload"])["n"] for f in first["body"]["frames"]], [0, 1, 2])
        self.assertEqual([json.loads(f["payload"])["n"] for f in second["body"]["frames"]], [3, 4, 5])
        self.assertEqual(results, [True] * 6)
        self.assertEqual(harness.counter("relay_bus_publish_ok"), 6)

    def test_a_platform_without_batches_gets_one_frame_per_call(self) -> None:
        """Without the batch capability every publish is the contract's single-frame body, still one at a time, in order."""
        harness = self.start([])
        results: List[bool] = []
        for n in range(3):
            self.publish(harness, n, results)
        harness.flush()
        bodies = []
        for _ in range(3):
            bodies.append(harness.platform.answer(200, {"ok": True, "id": 1})["body"])
            harness.flush()
        self.assertEqual([json.loads(b["payload"])["n"] for b in bodies], [0, 1, 2])
        self.assertEqual(results, [True] * 3)
        self.assertNotIn("/relays/heartbeat", harness.platform.paths())

    def test_the_queue_is_bounded_by_bytes_and_age(self) -> None:
        """Frames beyond the queue's bytes are refused at once; frames that waited too long are refused, not sent."""
        harness = self.start(["batch"], queue_max_bytes=20, queue_max_age_ms=500)
        results: List[bool] = []
        self.publish(harness, 0, results)
        harness.flush()
        for n in range(1, 4):
            self.publish(harness, n, results)
        harness.flush()
        self.assertEqual(results, [False])  # frames 1 and 2 wait (14 bytes), frame 3 would pass 20 bytes
        harness.clock.advance(1.0)
        harness.platform.answer(200, {"ok": True, "ids": [1]})
        harness.flush()
        self.assertEqual(results, [False, True, False, False])
        self.assertEqual(len([p for p in harness.platform.paths() if p == "/bus/publish"]), 1)
        self.assertEqual(harness.counter("relay_bus_publish_failed"), 3)

    def test_liveness_heartbeat_goodbye_and_dead_relays(self) -> None:
        """On a bus with liveness the relay heartbeats every second, asks which relays are dead, and says goodbye on stop."""
        harness = self.start(["liveness"])
        harness.platform.answer(200, {"ok": True})
        harness.flush()
        harness.clock.advance(1.0)
        harness.flush()
        beats = [c["body"] for c in harness.platform.calls if c["path"].endswith("/relays/heartbeat")]
        self.assertEqual(beats[0], {"relayId": "relay-a", "ttlMs": 3000})
        self.assertEqual(len(beats), 2)
        harness.platform.answer(200, {"ok": True})
        dead: List[Any] = []
        harness.backplane.dead_relays(["relay-b", "relay-c", "relay-a"]).addCallback(dead.append)
        harness.flush()
        call = harness.platform.answer(200, {"ok": True, "alive": ["relay-c"], "dead": ["relay-b"], "unknown": []})
        harness.flush()
        self.assertEqual((call["body"], dead), ({"relayIds": ["relay-b", "relay-c"]}, [frozenset({"relay-b"})]))
        harness.platform.queue("/relays/heartbeat", 200, {"ok": True})
        stopped: List[object] = []
        harness.backplane.stop().addCallback(stopped.append)
        harness.flush()
        self.assertEqual(harness.platform.calls[-1]["body"], {"relayId": "relay-a", "gone": True})
        self.assertEqual(stopped, [None])
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_failed_pulls_report_the_lost_path_and_its_return(self) -> None:
        """path_changed hears False when the pull loop turns unhealthy and True when a pull succeeds again."""
        harness = _Harness()
        changes: List[bool] = []
        harness.backplane.start(harness.received.append, changes.append)
        harness.flush()
        harness.platform.answer(200, {"ok": True, "frames": [], "headId": 0})
        harness.backplane.watch_scope("w", "t", "clients")
        harness.flush()
        for _ in range(3):
            harness.platform.answer(503, {"ok": False})
            harness.flush()
            harness.clock.advance(2.0)
            harness.flush()
        self.assertEqual(changes, [False])
        harness.platform.answer(200, {"ok": True, "frames": [], "headId": 0})
        harness.flush()
        self.assertEqual(changes, [False, True])


# --- real bus, real PostgreSQL ---------------------------------------------------------------------


def _eventually(check: Any, timeout: float = 20.0, step: float = 0.1) -> Any:
    """Repeat ``check`` (a Deferred of bool, or a bool) until true, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout

    @inlineCallbacks
    def attempt() -> Any:
        while True:
            done = yield check()
            if done:
                return
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            yield task.deferLater(reactor, step, lambda: None)

    return attempt()


def _frame(payload: str, source: str = "relay-a", target: Optional[str] = "relay-b") -> BusFrame:
    return BusFrame("w", "t", source, target, "client_to_daemon", payload)


@inlineCallbacks
def _post(client: Any, url: str, body: Any) -> Any:
    response = yield client.post(
        url, data=json.dumps(body).encode(), headers={"x-relay-internal-key": INTERNAL_KEY}
    )
    content = yield response.content()
    return response.code, json.loads(content)


@pytest_twisted.inlineCallbacks
def test_postgres_restart_gives_503_then_recovers() -> Any:
    """With PostgreSQL down the bus answers 503 quickly; after it returns, bus and backplane recover."""
    cluster = PrivateCluster()
    cluster.start()
    database = ScratchDatabase(cluster.url)
    bus = BusProcess(database.url)
    client, pool = http_client()
    a = b = None
    try:
        yield bus.start()
        received: List[BusFrame] = []
        a = server_backplane(bus.url, "relay-a", client, pull_wait_ms=500)
        b = server_backplane(bus.url, "relay-b", client, pull_wait_ms=500)
        yield a.start(lambda frame: None)
        yield b.start(received.append)
        b.watch_scope("w", "t", "daemon")
        ok = yield a.publish(_frame('{"n":1}'))
        assert ok is True
        yield _eventually(lambda: len(received) == 1)

        cluster.stop()
        started = time.monotonic()
        status, answer = yield _post(client, bus.url + API + "/bus/publish",
                                     {"workspaceId": "w", "runtimeTargetId": "t", "sourceRelayId": "x",
                                      "direction": "client_to_daemon", "payload": "{}"})
        assert (status, answer) == (503, {"ok": False, "reason": "DATABASE_UNAVAILABLE"})
        assert time.monotonic() - started < 8.0
        response = yield client.get(bus.url + "/health")
        assert response.code == 503
        yield response.content()
        ok = yield a.publish(_frame('{"n":"lost"}'))
        assert ok is False
        yield _eventually(lambda: not b.healthy)

        cluster.start()

        @inlineCallbacks
        def publishes() -> Any:
            ok = yield a.publish(_frame('{"n":2}'))
            return ok

        yield _eventually(publishes)
        yield _eventually(lambda: len(received) == 2)
        assert [f.payload for f in received] == ['{"n":1}', '{"n":2}']
        assert b.healthy
        # The LISTEN connection reconnects on its own schedule: frames may flow (pulls poll) before it is back.
        yield _eventually(lambda: bool(bus.events("bus_listen_recovered")))
    finally:
        for backplane in (a, b):
            if backplane is not None:
                yield backplane.stop()
        yield pool.closeCachedConnections()
        yield bus.stop()
        database.drop()
        cluster.destroy()


@pytest_twisted.inlineCallbacks
def test_bus_restart_backplane_reconnects() -> Any:
    """When viewport-bus restarts on the same port, the pull loop reconnects and delivers new frames."""
    database = ScratchDatabase()
    bus = BusProcess(database.url, port=free_port())
    client, pool = http_client()
    a = b = None
    try:
        yield bus.start()
        received: List[BusFrame] = []
        a = server_backplane(bus.url, "relay-a", client, pull_wait_ms=500)
        b = server_backplane(bus.url, "relay-b", client, pull_wait_ms=500)
        yield a.start(lambda frame: None)
        yield b.start(received.append)
        b.watch_scope("w", "t", "daemon")
        yield a.publish(_frame('{"n":1}'))
        yield _eventually(lambda: len(received) == 1)

        yield bus.stop()
        ok = yield a.publish(_frame('{"n":"lost"}'))
        assert ok is False
        yield _eventually(lambda: not b.healthy)
        yield bus.start()

        @inlineCallbacks
        def publishes() -> Any:
            ok = yield a.publish(_frame('{"n":2}'))
            return ok

        yield _eventually(publishes)
        yield _eventually(lambda: len(received) == 2)
        assert [f.payload for f in received] == ['{"n":1}', '{"n":2}']
        assert b.healthy
    finally:
        for backplane in (a, b):
            if backplane is not None:
                yield backplane.stop()
        yield pool.closeCachedConnections()
        yield bus.stop()
        database.drop()


@pytest_twisted.inlineCallbacks
def test_presence_cache_and_refresh_with_real_bus() -> Any:
    """Against the real bus: resolve is cached for resolve_cache_ms, and stop() withdraws presence."""
    database = ScratchDatabase()
    bus = BusProcess(database.url)
    client, pool = http_client()
    try:
        yield bus.start()
        a = server_backplane(bus.url, "relay-a", client)
        b = server_backplane(bus.url, "relay-b", client, resolve_cache_ms=60000)
        yield a.start(lambda frame: None)
        yield b.start(lambda frame: None)
        yield a.announce_presence(Presence("w", "t", "relay-a", "ws://a.test/ws", True, machine_id="m"))
        found = yield b.resolve_presence("w", "t")
        assert (found.relay_id, found.machine_id) == ("relay-a", "m")
        yield a.stop()
        cached = yield b.resolve_presence("w", "t")
        assert cached is found
        status, answer = yield _post(client, bus.url + API + "/presence/resolve",
                                     {"workspaceId": "w", "runtimeTargetId": "t"})
        assert answer == {"ok": True, "daemonConnected": False}
        yield b.stop()
    finally:
        yield pool.closeCachedConnections()
        yield bus.stop()
        database.drop()

