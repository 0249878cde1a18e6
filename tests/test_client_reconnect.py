"""Tests for viewport.client's redirects and ReconnectingConnection: a Clock for the schedule, real sockets for the rest."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientProtocol, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.client_servers import TOKEN, Harness as ClientHarness, Server, failure_of, harness_fixture
from viewport.client import (
    DEFAULT_FATAL_CLOSE_REASONS,
    Backoff,
    CloseInfo,
    ConnectionClosed,
    ReconnectingConnection,
    RelayConnection,
    TooManyRedirects,
    UpgradeRefused,
    base_url_of,
    connect,
    is_fatal_close,
    is_fatal_refusal,
    parse_location,
    redirect_url,
    relay_redirect_url,
)

HOME = "ws://relay-a.test:7781/ws"
OTHER = "ws://relay-b.test:7781/ws"


def redirect_frame(url: str) -> str:
    """A RELAY_REDIRECT status frame as the relay sends it right after an upgrade (docs/protocol.md §5.1)."""
    return json.dumps(
        {
            "type": "relay_status",
            "code": "RELAY_REDIRECT",
            "message": "Workspace is assigned to a different relay instance",
            "workspaceId": "ws-1",
            "relayWsBaseUrl": url,
        }
    )


# -- pure helpers --------------------------------------------------------------------------------


class BackoffTests(SynchronousTestCase):
    """The delay formula: uniform(0, min(cap, base * 2**n)) with n reset on demand."""

    def test_ceilings_double_up_to_the_cap(self) -> None:
        """The ceiling doubles from the base and stays at the cap, even for huge attempt numbers."""
        backoff = Backoff(0.5, 30.0)
        self.assertEqual(
            [backoff.ceiling(n) for n in range(9)], [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
        )
        self.assertEqual(backoff.ceiling(10_000), 30.0)

    def test_full_jitter_with_a_seeded_random(self) -> None:
        """Each delay is drawn uniformly from [0, ceiling] by the injected random source, in order."""
        backoff = Backoff(0.5, 30.0, random.Random(42))
        reference = random.Random(42)
        expected = [reference.uniform(0, min(30.0, 0.5 * 2**n)) for n in range(10)]
        self.assertEqual([backoff.next_delay() for _ in range(10)], expected)
        self.assertEqual(backoff.attempts, 10)
        for n, delay in enumerate(expected):
            self.assertTrue(0 <= delay <= min(30.0, 0.5 * 2**n))

    def test_reset(self) -> None:
        """After reset the next ceiling is the base again."""
        backoff = Backoff(1.0, 8.0, _Top())
        self.assertEqual([backoff.next_delay() for _ in range(5)], [1.0, 2.0, 4.0, 8.0, 8.0])
        backoff.reset()
        self.assertEqual((backoff.attempts, backoff.next_delay()), (0, 1.0))

    def test_bad_parameters(self) -> None:
        """A non-positive base or a cap below the base is refused."""
        self.assertRaises(ValueError, Backoff, 0.0, 1.0)
        self.assertRaises(ValueError, Backoff, 2.0, 1.0)


class RetryPolicyTests(SynchronousTestCase):
    """One row per outcome of the retry table."""

    def test_fatal_upgrade_statuses(self) -> None:
        """401 and 403 refusals are final; 429, 503, a silent close and other errors are retried."""
        self.assertTrue(is_fatal_refusal(UpgradeRefused(401)))
        self.assertTrue(is_fatal_refusal(UpgradeRefused(403)))
        for status in (400, 429, 503, 307, None):
            self.assertFalse(is_fatal_refusal(UpgradeRefused(status)), status)
        self.assertFalse(is_fatal_refusal(ConnectionRefusedError()))
        self.assertTrue(is_fatal_refusal(UpgradeRefused(429), fatal_statuses={429}))

    def test_fatal_close_reasons(self) -> None:
        """The claim and generation 4008 reasons are final, each one only with code 4008."""
        for reason in (
            "missing workspace claim",
            "workspace claim mismatch",
            "runtime target claim mismatch",
            "invalid scope claim",
            "missing runtime target claim",
            "stale daemon generation",
        ):
            self.assertTrue(is_fatal_close(CloseInfo(4008, reason, True)), reason)
            self.assertFalse(is_fatal_close(CloseInfo(1000, reason, True)), reason)

    def test_retryable_close_reasons(self) -> None:
        """A second daemon, rate limits, back-pressure, shutdown and drops are retried."""
        for info in (
            CloseInfo(4008, "daemon already connected", True),
            CloseInfo(4008, "daemon rate limit exceeded", True),
            CloseInfo(4008, "buffer overflow", True),
            CloseInfo(1001, "relay shutting down", True),
            CloseInfo(1006, None, False),
        ):
            self.assertFalse(is_fatal_close(info), info)
        self.assertNotIn("daemon already connected", DEFAULT_FATAL_CLOSE_REASONS)

    def test_configurable_close_reasons(self) -> None:
        """The set of final reasons is a parameter."""
        info = CloseInfo(4008, "daemon already connected", True)
        self.assertTrue(is_fatal_close(info, {"daemon already connected"}))


class RedirectHelperTests(SynchronousTestCase):
    """Location parsing, redirect targets and in-band redirect frames."""

    def test_parse_location(self) -> None:
        """The Location header is found case-insensitively; a cut-off line or a missing header gives None."""
        head = b"HTTP/1.1 307 Temporary Redirect\r\nlocation:  ws://b:1/ws?x=1 \r\n\r\n"
        self.assertEqual(parse_location(head), "ws://b:1/ws?x=1")
        self.assertEqual(parse_location(b"HTTP/1.1 307 X\r\nLocation: ws://b:1/ws\r\n"), "ws://b:1/ws")
        self.assertIsNone(parse_location(b"HTTP/1.1 307 X\r\nLocation: ws://b:1/w"))
        self.assertIsNone(parse_location(b"HTTP/1.1 503 X\r\n\r\n"))
        self.assertIsNone(parse_location(b"HTTP/1.1 307 X\r\n\r\nLocation: ws://body/ws\r\n"))

    def test_redirect_url(self) -> None:
        """Relative and http(s) locations become ws(s) URLs; other schemes are not followed."""
        current = "ws://a:1/ws?role=client&workspaceId=w"
        self.assertEqual(redirect_url("ws://b:2/ws?q=1", current, token="t", token_via="header"), "ws://b:2/ws?q=1")
        self.assertEqual(redirect_url("/ws?q=1", current, token="t", token_via="header"), "ws://a:1/ws?q=1")
        self.assertEqual(redirect_url("https://b/ws", current, token="t", token_via="header"), "wss://b/ws")
        self.assertIsNone(redirect_url("ftp://b/ws", current, token="t", token_via="header"))
        self.assertIsNone(redirect_url("ws://b:99999/ws", current, token="t", token_via="header"))

    def test_redirect_url_keeps_a_query_token(self) -> None:
        """With the token in the query, the token is appended to the location unless it carries one."""
        current = "ws://a:1/ws?role=client&token=t%201"
        self.assertEqual(
            redirect_url("ws://b:2/ws?role=client", current, token="t 1", token_via="query"),
            "ws://b:2/ws?role=client&token=t%201",
        )
        self.assertEqual(
            redirect_url("ws://b:2/ws?token=x", current, token="t 1", token_via="query"), "ws://b:2/ws?token=x"
        )

    def test_relay_redirect_url(self) -> None:
        """Only a RELAY_REDIRECT status with a non-empty relayWsBaseUrl names a redirect."""
        self.assertEqual(relay_redirect_url(redirect_frame(OTHER)), OTHER)
        self.assertIsNone(relay_redirect_url(redirect_frame("")))
        self.assertIsNone(relay_redirect_url('{"type":"e2ee","note":"RELAY_REDIRECT"}'))
        self.assertIsNone(relay_redirect_url("RELAY_REDIRECT but not JSON"))
        self.assertIsNone(relay_redirect_url('{"type":"relay_status","code":"DAEMON_UNAVAILABLE"}'))

    def test_base_url_of(self) -> None:
        """The base URL drops the query and fragment only."""
        self.assertEqual(base_url_of("wss://h:1/ws?role=client#x"), "wss://h:1/ws")


# -- ReconnectingConnection against a Clock and a scripted connect ----------------------------------


class _Top:
    """A random source that always draws the top of the range, so delays equal the backoff ceilings."""

    def uniform(self, a: float, b: float) -> float:
        """Return ``b``."""
        return b


class StubProtocol:
    """The slice of an Autobahn client protocol that RelayConnection uses, recording what is sent."""

    def __init__(self) -> None:
        self.state = WebSocketProtocol.STATE_OPEN
        self.sent: list[str] = []
        self.close_sent: tuple[int | None, str | None] | None = None
        self.transport = None
        self.websocket_protocol_in_use = None

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
        """Record a sent message."""
        self.sent.append(payload.decode())

    def sendClose(self, code: int | None = None, reason: str | None = None) -> None:
        """Record the close and enter CLOSING, as Autobahn does."""
        self.close_sent = (code, reason)
        self.state = WebSocketProtocol.STATE_CLOSING


def open_connection(clock: Clock, url: str) -> tuple[RelayConnection, StubProtocol]:
    """A real RelayConnection over a StubProtocol."""
    proto = StubProtocol()
    return RelayConnection(cast(WebSocketClientProtocol, proto), clock, url), proto


def drop(conn: RelayConnection, proto: StubProtocol, code: int | None, reason: str | None = None) -> None:
    """Close ``conn`` as the protocol would report it."""
    proto.state = WebSocketProtocol.STATE_CLOSED
    conn._connection_closed(CloseInfo(code, reason, code != 1006))


@dataclass
class Call:
    """One call of the scripted connect function."""

    url: str
    token: str
    options: dict[str, Any]
    result: Deferred[RelayConnection] = field(init=False)
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.result = Deferred(self._cancel)

    def _cancel(self, d: Deferred[RelayConnection]) -> None:
        """Record the cancellation (the Deferred then fails with CancelledError)."""
        self.cancelled = True


class ScriptedConnect:
    """A connect function whose results the test decides; every call is recorded with its clock time."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[Call] = []
        self.times: list[float] = []
        self.auto: Callable[[Call], None] | None = None
        self.protocols: dict[int, StubProtocol] = {}

    def __call__(self, reactor: Any, url: str, *, token: str, **options: Any) -> Deferred[RelayConnection]:
        call = Call(url, token, options)
        self.calls.append(call)
        self.times.append(self.clock.seconds())
        if self.auto is not None:
            self.auto(call)
        return call.result

    def refuse_all(self, error: Exception) -> None:
        """Fail every later attempt with ``error``."""
        self.auto = lambda call: call.result.errback(error)

    def accept(self, call: Call | None = None) -> tuple[RelayConnection, StubProtocol]:
        """Open the latest (or given) attempt."""
        call = call if call is not None else self.calls[-1]
        conn, proto = open_connection(self.clock, call.url + "?role=workspace-daemon")
        self.protocols[id(conn)] = proto
        call.result.callback(conn)
        return conn, proto


class ReconnectScheduleTests(SynchronousTestCase):
    """ReconnectingConnection's timing, retry decisions, queue and stop, with no sockets at all."""

    def make(self, randomness: Any = None, **kwargs: Any) -> tuple[ReconnectingConnection, ScriptedConnect, Clock]:
        """A reconnector on a Clock with a scripted connect and a counting token factory."""
        clock = Clock()
        script = ScriptedConnect(clock)
        self.tokens = 0
        self.events: list[tuple[str, Any]] = []

        def token() -> str:
            self.tokens += 1
            return f"token-{self.tokens}"

        kwargs.setdefault("on_connected", lambda conn: self.events.append(("connected", conn.url)))
        kwargs.setdefault("on_disconnected", lambda info: self.events.append(("disconnected", info.code)))
        kwargs.setdefault("on_redirected", lambda url: self.events.append(("redirected", url)))
        kwargs.setdefault("on_message", lambda text: self.events.append(("message", text)))
        kwargs.setdefault("on_gave_up", lambda error: self.events.append(("gave up", error)))
        reconnector = ReconnectingConnection(
            cast(Any, object()),
            HOME,
            token_factory=token,
            role="workspace-daemon",
            workspace_id="ws-1",
            clock=clock,
            random=randomness if randomness is not None else _Top(),
            connect_function=script,
            **kwargs,
        )
        return reconnector, script, clock

    def finish(self, reconnector: ReconnectingConnection, clock: Clock, script: ScriptedConnect) -> None:
        """Stop (completing the closing handshake of an open connection) and check that nothing is left pending."""
        d = reconnector.stop()
        conn = reconnector.current
        if conn is not None:
            proto = script.protocols[id(conn)]
            self.assertEqual(proto.close_sent, (1000, None))
            drop(conn, proto, 1000)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_backoff_schedule_with_seeded_random(self) -> None:
        """Failed attempts are retried after full-jitter delays drawn from the injected random, capped at max_delay."""
        reconnector, script, clock = self.make(random.Random(1234), base_delay=0.5, max_delay=30.0)
        script.refuse_all(ConnectionRefusedError())
        reconnector.start()
        reference = random.Random(1234)
        expected_times = [0.0]
        for n in range(12):
            expected_times.append(expected_times[-1] + reference.uniform(0, min(30.0, 0.5 * 2**n)))
        for _ in range(12):
            clock.advance(reconnector_delay(clock))
        self.assertEqual(len(script.times), 13)
        for seen, expected in zip(script.times, expected_times):
            self.assertAlmostEqual(seen, expected, places=9)
        self.assertEqual(reconnector.attempts, 13)
        self.assertEqual(self.tokens, 13)
        self.finish(reconnector, clock, script)

    def test_first_attempt_is_immediate_and_uses_the_options(self) -> None:
        """start() connects at once with a fresh token and passes the connection options through."""
        reconnector, script, clock = self.make(runtime_target_id="rt-1", http_redirect=True)
        reconnector.start()
        [call] = script.calls
        self.assertEqual((call.url, call.token), (HOME, "token-1"))
        self.assertEqual(call.options["role"], "workspace-daemon")
        self.assertEqual(call.options["runtime_target_id"], "rt-1")
        self.assertTrue(call.options["http_redirect"])
        self.assertRaises(RuntimeError, reconnector.start)
        self.finish(reconnector, clock, script)

    def test_attempt_counter_resets_after_a_stable_connection(self) -> None:
        """A connection open for reset_after seconds resets the backoff; a shorter one does not."""
        reconnector, script, clock = self.make(reset_after=10.0)
        script.refuse_all(ConnectionRefusedError())
        reconnector.start()
        clock.advance(0.5)
        clock.advance(1.0)
        self.assertEqual((len(script.calls), reconnector.attempts), (3, 3))
        script.auto = None
        clock.advance(2.0)
        conn, proto = script.accept()
        self.assertTrue(reconnector.connected)
        clock.advance(9.0)
        drop(conn, proto, 1006)
        # Open for only 9 s: the next delay is the fourth ceiling (0.5 * 2**3).
        self.assertEqual(reconnector.attempts, 4)
        self.assertEqual(clock.getDelayedCalls()[0].getTime() - clock.seconds(), 4.0)
        clock.advance(4.0)
        conn, proto = script.accept()
        clock.advance(10.0)
        drop(conn, proto, 1001, "relay shutting down")
        self.assertEqual(reconnector.attempts, 1)
        self.assertEqual(clock.getDelayedCalls()[0].getTime() - clock.seconds(), 0.5)
        self.finish(reconnector, clock, script)

    def test_token_factory_may_return_a_deferred(self) -> None:
        """A Deferred token delays the attempt until it fires; a failing token factory is retried."""
        clock = Clock()
        script = ScriptedConnect(clock)
        tokens: list[Deferred[str]] = []

        def token() -> Deferred[str]:
            tokens.append(Deferred())
            return tokens[-1]

        reconnector = ReconnectingConnection(
            cast(Any, object()), HOME, token_factory=token, role="client", workspace_id="w",
            clock=clock, random=_Top(), connect_function=script,
        )
        reconnector.start()
        self.assertEqual(script.calls, [])
        tokens[0].errback(RuntimeError("platform down"))
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0.5)
        tokens[1].callback("fresh")
        self.assertEqual([call.token for call in script.calls], ["fresh"])
        self.finish(reconnector, clock, script)

    def test_no_retry_after_401(self) -> None:
        """An upgrade refused with 401 stops the reconnector and reports the refusal."""
        reconnector, script, clock = self.make()
        script.refuse_all(UpgradeRefused(401))
        reconnector.start()
        self.assertEqual(len(script.calls), 1)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertFalse(reconnector.running)
        [(kind, error)] = self.events
        self.assertEqual(kind, "gave up")
        self.assertIsInstance(error, UpgradeRefused)
        self.assertIs(reconnector.fatal_error, error)
        self.finish(reconnector, clock, script)

    def test_retry_after_429_and_503(self) -> None:
        """Rate-limit and capacity refusals are retried with backoff."""
        reconnector, script, clock = self.make()
        failures = [UpgradeRefused(429), UpgradeRefused(503)]
        script.auto = lambda call: call.result.errback(failures.pop(0)) if failures else None
        reconnector.start()
        clock.advance(0.5)
        clock.advance(1.0)
        self.assertEqual(len(script.calls), 3)
        self.assertTrue(reconnector.running)
        self.finish(reconnector, clock, script)

    def test_no_retry_after_a_non_retryable_4008(self) -> None:
        """A 4008 `stale daemon generation` close is final: no new attempt, on_gave_up gets ConnectionClosed."""
        reconnector, script, clock = self.make()
        reconnector.start()
        conn, proto = script.accept()
        drop(conn, proto, 4008, "stale daemon generation")
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(len(script.calls), 1)
        kind, error = self.events[-1]
        self.assertEqual(kind, "gave up")
        self.assertIsInstance(error, ConnectionClosed)
        self.assertEqual(error.info.reason, "stale daemon generation")
        self.finish(reconnector, clock, script)

    def test_daemon_already_connected_is_retried_with_backoff(self) -> None:
        """`daemon already connected` is retried, never at once, with growing delays while it persists."""
        reconnector, script, clock = self.make()
        reconnector.start()
        delays = []
        for _ in range(4):
            conn, proto = script.accept()
            drop(conn, proto, 4008, "daemon already connected")
            [pending] = clock.getDelayedCalls()
            delays.append(pending.getTime() - clock.seconds())
            clock.advance(delays[-1])
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0])
        self.assertEqual(len(script.calls), 5)
        self.finish(reconnector, clock, script)

    def test_in_band_redirect_reconnects_at_once(self) -> None:
        """A RELAY_REDIRECT closes the connection with 1000 and opens one to relayWsBaseUrl without delay."""
        reconnector, script, clock = self.make()
        reconnector.start()
        conn, proto = script.accept()
        conn._message_received(redirect_frame(OTHER).encode(), False)
        self.assertEqual(proto.close_sent, (1000, "relay redirect"))
        self.assertEqual(len(script.calls), 1)
        drop(conn, proto, 1000)
        clock.advance(0)
        self.assertEqual([call.url for call in script.calls], [HOME, OTHER])
        self.assertEqual(reconnector.url, OTHER)
        self.assertIn(("redirected", OTHER), self.events)
        self.assertEqual(self.events[1][0], "message")
        conn, proto = script.accept()
        # A redirect to the relay already in use is ignored.
        conn._message_received(redirect_frame(OTHER).encode(), False)
        self.assertIsNone(proto.close_sent)
        self.finish(reconnector, clock, script)

    def test_failed_redirect_target_falls_back_to_the_configured_url(self) -> None:
        """When the relay named by a redirect cannot be reached, the next attempt goes to the configured URL."""
        reconnector, script, clock = self.make()
        reconnector.start()
        conn, proto = script.accept()
        conn._message_received(redirect_frame(OTHER).encode(), False)
        drop(conn, proto, 1000)
        clock.advance(0)
        script.calls[-1].result.errback(ConnectionRefusedError())
        clock.advance(0.5)
        self.assertEqual([call.url for call in script.calls], [HOME, OTHER, HOME])
        self.finish(reconnector, clock, script)

    def test_redirect_loop_is_cut(self) -> None:
        """After max_redirects redirects in a row the advisory redirect is ignored and the connection kept."""
        reconnector, script, clock = self.make(max_redirects=2)
        reconnector.start()
        targets = [OTHER, HOME, OTHER]
        for target in targets:
            conn, proto = script.accept()
            conn._message_received(redirect_frame(target).encode(), False)
            if proto.close_sent is None:
                break
            drop(conn, proto, 1000)
            clock.advance(0)
        self.assertEqual([call.url for call in script.calls], [HOME, OTHER, HOME])
        self.assertTrue(reconnector.connected)
        self.finish(reconnector, clock, script)

    def test_http_redirect_moves_the_target(self) -> None:
        """A connection that connect() opened after a 307 makes its relay the target for later attempts."""
        reconnector, script, clock = self.make()
        reconnector.start()
        conn, proto = open_connection(clock, OTHER + "?role=workspace-daemon&redirect=http")
        conn.redirected_from = [HOME + "?role=workspace-daemon&redirect=http"]
        script.calls[-1].result.callback(conn)
        self.assertEqual(reconnector.url, OTHER)
        self.assertIn(("redirected", OTHER), self.events)
        drop(conn, proto, 1006)
        clock.advance(0.5)
        self.assertEqual(script.calls[-1].url, OTHER)
        self.finish(reconnector, clock, script)

    def test_queue_is_bounded_and_flushed_in_order(self) -> None:
        """While disconnected, sends are queued up to the limits (oldest dropped), then flushed in order."""
        reconnector, script, clock = self.make(max_queued_messages=3, max_queued_bytes=10)
        for text in ("m1", "m2", "m3", "m4"):
            self.assertFalse(reconnector.send_text(text))
        self.assertEqual((reconnector.queued, reconnector.dropped), (3, 1))
        self.assertFalse(reconnector.send_text("x" * 11))
        self.assertFalse(reconnector.send_text("abcdef"))
        # 6 + 2 + 2 = 10 bytes fit; m2 had to go as well.
        self.assertEqual((reconnector.queued, reconnector.dropped), (3, 3))
        reconnector.start()
        conn, proto = script.accept()
        self.assertEqual(proto.sent, ["m3", "m4", "abcdef"])
        self.assertEqual(self.events[0][0], "connected")
        self.assertTrue(reconnector.send_json({"a": 1}))
        self.assertEqual(proto.sent[-1], '{"a":1}')
        self.assertEqual(reconnector.queued, 0)
        self.finish(reconnector, clock, script)

    def test_messages_go_to_the_handler(self) -> None:
        """Received messages are handed to on_message in order, and not left in the connection's queue."""
        reconnector, script, clock = self.make()
        reconnector.start()
        conn, _ = script.accept()
        conn._message_received(b"one", False)
        conn._message_received(b"two", True)
        self.assertEqual([e for e in self.events if e[0] == "message"], [("message", "one"), ("message", "two")])
        self.assertEqual(conn.pending_messages(), [])
        self.finish(reconnector, clock, script)

    def test_callback_errors_do_not_stop_reconnecting(self) -> None:
        """An exception in an event callback is logged and the reconnector carries on."""
        reconnector, script, clock = self.make(on_disconnected=lambda info: 1 / 0)
        reconnector.start()
        conn, proto = script.accept()
        drop(conn, proto, 1006)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.finish(reconnector, clock, script)

    def test_stop_cancels_a_pending_retry(self) -> None:
        """stop() during a backoff cancels the timer and fires at once; nothing is attempted later."""
        reconnector, script, clock = self.make()
        script.refuse_all(ConnectionRefusedError())
        reconnector.start()
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.finish(reconnector, clock, script)
        clock.advance(100)
        self.assertEqual(len(script.calls), 1)

    def test_stop_cancels_an_attempt_in_flight(self) -> None:
        """stop() during an attempt cancels it and fires once the attempt has failed."""
        reconnector, script, clock = self.make()
        reconnector.start()
        d = reconnector.stop()
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(script.calls[0].cancelled)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_closes_the_connection(self) -> None:
        """stop() closes with 1000 and fires when the close completes (aborting after close_timeout)."""
        reconnector, script, clock = self.make(close_timeout=5.0)
        reconnector.start()
        conn, proto = script.accept()
        d = reconnector.stop()
        self.assertNoResult(d)
        self.assertEqual(proto.close_sent, (1000, None))
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(1)
        drop(conn, proto, 1000)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(self.events[-1], ("disconnected", 1000))
        self.assertFalse(reconnector.connected)
        self.assertEqual(len(script.calls), 1)


def reconnector_delay(clock: Clock) -> float:
    """The time until the single pending call on ``clock``."""
    [pending] = clock.getDelayedCalls()
    return pending.getTime() - clock.seconds()


# -- real sockets --------------------------------------------------------------------------------


class StubRelayProtocol(WebSocketServerProtocol):
    """A scriptable relay: records upgrades and messages, may refuse, redirect or act on open."""

    def onConnect(self, request: ConnectionRequest) -> None:
        """Record the request, then refuse if the server says so."""
        server: RelayServer = self.factory.server
        server.requests.append(request)
        if server.refuse is not None:
            raise ConnectionDeny(server.refuse)
        return None

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """Add the Location of a redirect, as the relay does."""
        location = self.factory.server.location
        if location is not None and code in (307, 308):
            responseHeaders = [("Location", location)]
        super().failHandshake(reason, code, responseHeaders)

    def onOpen(self) -> None:
        """Remember the connection and run the server's script for it."""
        server: RelayServer = self.factory.server
        server.opened.append(self)
        if server.on_open is not None:
            server.on_open(self, len(server.opened))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Record the message."""
        self.factory.server.messages.put(payload.decode())


@dataclass
class RelayServer(Server):
    """A scriptable relay: the status it refuses upgrades with and the Location of a redirect, a script run on each open."""

    messages: DeferredQueue[str] = field(default_factory=DeferredQueue)
    refuse: int | None = None
    location: str | None = None
    on_open: Callable[[StubRelayProtocol, int], None] | None = None


class Harness(ClientHarness):
    """Servers, clients and reconnectors of one test, all torn down afterwards."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self.reconnectors: list[ReconnectingConnection] = []

    def relay(self, **kwargs: Any) -> RelayServer:
        """A scriptable Autobahn server."""
        return self.websocket_server(RelayServer(self.reactor, **kwargs), StubRelayProtocol)

    def reconnecting(self, server: Server, **kwargs: Any) -> ReconnectingConnection:
        """A reconnector to ``server`` with fast, deterministic retries unless the test overrides them."""
        options: dict[str, Any] = {
            "token_factory": lambda: TOKEN,
            "role": "workspace-daemon",
            "workspace_id": "ws-1",
            "base_delay": 0.02,
            "max_delay": 0.1,
            "random": random.Random(7),
        }
        options.update(kwargs)
        reconnector = ReconnectingConnection(self.reactor, server.url, **options)
        self.reconnectors.append(reconnector)
        return reconnector

    async def cleanup(self) -> None:
        """Stop every reconnector first, then what every harness tears down."""
        for reconnector in self.reconnectors:
            await self.within(reconnector.stop())
        await super().cleanup()


harness = harness_fixture(Harness)


# -- connect() and HTTP redirects ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_307_from_a_raw_answer_is_followed(harness: Harness) -> None:
    """A bare 307 with Location is followed with the same header token; redirected_from records the first URL."""
    b = harness.relay()
    location = f"{b.url}?role=client&workspaceId=ws-1&redirect=http"
    a = harness.raw_server(f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\n\r\n".encode())
    conn = await harness.connect(a.url, http_redirect=True)
    assert conn.url == location
    assert conn.redirected_from == [f"{a.url}?role=client&workspaceId=ws-1&redirect=http"]
    [request] = b.requests
    assert request.params["redirect"] == ["http"]
    assert request.headers["authorization"] == f"Bearer {TOKEN}"


@pytest_twisted.ensureDeferred
async def test_307_from_autobahn_with_subprotocol_token(harness: Harness) -> None:
    """An Autobahn server's 307 is followed, offering the same auth.<token> subprotocol to the owner relay."""
    b = harness.relay()
    a = harness.relay(refuse=307, location=f"{b.url}?role=client&workspaceId=ws-1&redirect=http")
    conn = await harness.connect(a.url, token_via="subprotocol", http_redirect=True)
    assert len(conn.redirected_from) == 1
    assert a.requests[0].params["redirect"] == ["http"]
    assert b.requests[0].protocols == ["viewport-relay-v1", f"auth.{TOKEN}"]


@pytest_twisted.ensureDeferred
async def test_redirect_not_followed_when_disabled(harness: Harness) -> None:
    """With follow_redirects=False a 307 fails as UpgradeRefused carrying the location."""
    a = harness.relay(refuse=307, location="ws://127.0.0.1:1/ws?role=client")
    err = await failure_of(harness.connect(a.url, follow_redirects=False))
    assert isinstance(err, UpgradeRefused) and not isinstance(err, TooManyRedirects)
    assert (err.status, err.location) == (307, "ws://127.0.0.1:1/ws?role=client")


@pytest_twisted.ensureDeferred
async def test_too_many_redirects(harness: Harness) -> None:
    """A relay redirecting to itself fails after max_redirects hops with TooManyRedirects."""
    a = harness.relay(refuse=307)
    a.location = a.url + "?role=client&workspaceId=ws-1"
    err = await failure_of(harness.connect(a.url, max_redirects=2))
    assert isinstance(err, TooManyRedirects) and err.status == 307
    assert len(err.redirected_from) == 3
    assert len(a.requests) == 3


@pytest_twisted.ensureDeferred
async def test_refusal_without_redirect_has_no_location(harness: Harness) -> None:
    """A 503 refusal still fails at once, with no location."""
    a = harness.relay(refuse=503)
    err = await failure_of(harness.connect(a.url))
    assert isinstance(err, UpgradeRefused) and (err.status, err.location) == (503, None)


# -- ReconnectingConnection over real sockets ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reconnects_after_the_server_closes(harness: Harness) -> None:
    """When the relay closes the connection (1001 here), a new connection is opened with a new token."""
    tokens = iter(["first", "second", "third"])

    def close_first(proto: StubRelayProtocol, n: int) -> None:
        if n == 1:
            proto.sendCloseFrame(code=1001, reasonUtf8=b"relay shutting down")

    server = harness.relay(on_open=close_first)
    connected: DeferredQueue[RelayConnection] = DeferredQueue()
    closed: DeferredQueue[CloseInfo] = DeferredQueue()
    reconnector = harness.reconnecting(
        server, token_factory=lambda: next(tokens), on_connected=connected.put, on_disconnected=closed.put
    )
    reconnector.start()
    await harness.within(connected.get())
    assert (await harness.within(closed.get())).code == 1001
    await harness.within(connected.get())
    assert reconnector.connected and reconnector.connections == 2
    assert [r.headers["authorization"] for r in server.requests] == ["Bearer first", "Bearer second"]


@pytest_twisted.ensureDeferred
async def test_no_retry_after_401(harness: Harness) -> None:
    """A 401 at upgrade stops the reconnector after one attempt."""
    server = harness.relay(refuse=401)
    gave_up: Deferred[Exception] = Deferred()
    reconnector = harness.reconnecting(server, on_gave_up=gave_up.callback)
    reconnector.start()
    error = await harness.within(gave_up)
    assert isinstance(error, UpgradeRefused) and error.status == 401
    assert not reconnector.running and len(server.requests) == 1


@pytest_twisted.ensureDeferred
async def test_no_retry_after_a_claim_mismatch_close(harness: Harness) -> None:
    """A 4008 `workspace claim mismatch` close after the upgrade stops the reconnector."""
    server = harness.relay(on_open=lambda proto, n: proto.sendClose(4008, "workspace claim mismatch"))
    gave_up: Deferred[Exception] = Deferred()
    reconnector = harness.reconnecting(server, on_gave_up=gave_up.callback)
    reconnector.start()
    error = await harness.within(gave_up)
    assert isinstance(error, ConnectionClosed) and error.info.reason == "workspace claim mismatch"
    assert len(server.requests) == 1 and reconnector.current is None


@pytest_twisted.ensureDeferred
async def test_retry_after_daemon_already_connected(harness: Harness) -> None:
    """A newcomer closed with `daemon already connected` tries again after a backoff and gets in."""

    def reject_twice(proto: StubRelayProtocol, n: int) -> None:
        if n <= 2:
            proto.sendClose(4008, "daemon already connected")

    server = harness.relay(on_open=reject_twice)
    connected: DeferredQueue[RelayConnection] = DeferredQueue()
    reconnector = harness.reconnecting(server, on_connected=connected.put)
    reconnector.start()
    for _ in range(3):
        await harness.within(connected.get())
    assert len(server.requests) == 3 and reconnector.attempts == 2
    assert reconnector.connected


@pytest_twisted.ensureDeferred
async def test_in_band_redirect_to_a_second_server(harness: Harness) -> None:
    """A RELAY_REDIRECT frame moves the connection to the relay it names, at once."""
    b = harness.relay()
    a = harness.relay(on_open=lambda proto, n: proto.sendMessage(redirect_frame(b.url).encode()))
    redirected: Deferred[str] = Deferred()
    connected: DeferredQueue[RelayConnection] = DeferredQueue()
    messages: list[str] = []
    reconnector = harness.reconnecting(
        a, role="client", on_redirected=redirected.callback, on_connected=connected.put, on_message=messages.append
    )
    reconnector.start()
    first = await harness.within(connected.get())
    assert await harness.within(redirected) == b.url
    second = await harness.within(connected.get())
    assert first.url.startswith(a.url) and second.url.startswith(b.url)
    assert (a.opened[0].remoteCloseCode, a.opened[0].remoteCloseReason) == (1000, "relay redirect")
    assert reconnector.url == b.url and len(b.requests) == 1
    assert relay_redirect_url(messages[0]) == b.url
    reconnector.send_text("hello b")
    assert await harness.within(b.messages.get()) == "hello b"


@pytest_twisted.ensureDeferred
async def test_reconnector_follows_a_307(harness: Harness) -> None:
    """With http_redirect the reconnector asks for 307s, follows them and reports the new relay."""
    b = harness.relay()
    a = harness.relay(refuse=307, location=f"{b.url}?role=client&workspaceId=ws-1&redirect=http")
    connected: DeferredQueue[RelayConnection] = DeferredQueue()
    redirects: list[str] = []
    reconnector = harness.reconnecting(
        a, role="client", http_redirect=True, on_connected=connected.put, on_redirected=redirects.append
    )
    reconnector.start()
    conn = await harness.within(connected.get())
    assert conn.url.startswith(b.url) and redirects == [b.url] and reconnector.url == b.url


@pytest_twisted.ensureDeferred
async def test_queue_bounded_and_flushed_in_order(harness: Harness) -> None:
    """Messages sent before the connection exist are queued (oldest dropped past the limit) and arrive in order."""
    server = harness.relay()
    connected: Deferred[RelayConnection] = Deferred()
    reconnector = harness.reconnecting(server, max_queued_messages=3, on_connected=connected.callback)
    for n in range(5):
        assert not reconnector.send_text(f"m{n}")
    assert reconnector.dropped == 2
    reconnector.start()
    await harness.within(connected)
    assert reconnector.send_text("live")
    received = [await harness.within(server.messages.get()) for _ in range(4)]
    assert received == ["m2", "m3", "m4", "live"]


@pytest_twisted.ensureDeferred
async def test_stop_cancels_pending_reconnects(harness: Harness) -> None:
    """stop() during a long backoff cancels the retry; no timer of the reconnector is left in the reactor."""
    server = harness.relay(refuse=503)
    failed: Deferred[BaseException] = Deferred()
    reconnector = harness.reconnecting(
        server, base_delay=30.0, max_delay=30.0, random=_Top(), on_attempt_failed=failed.callback
    )
    # Other tests' idle HTTP connections may have long timers of their own in this reactor.
    others = set(harness.reactor.getDelayedCalls())
    reconnector.start()
    assert isinstance(await harness.within(failed), UpgradeRefused)
    ours = [call for call in harness.reactor.getDelayedCalls()
            if call not in others and call.getTime() - harness.reactor.seconds() > 25]
    assert len(ours) == 1
    await harness.within(reconnector.stop())
    assert not ours[0].active()
    assert len(server.requests) == 1


@pytest_twisted.ensureDeferred
async def test_stop_closes_an_open_connection(harness: Harness) -> None:
    """stop() on a connected reconnector closes with 1000 and does not reconnect."""
    server = harness.relay()
    connected: Deferred[RelayConnection] = Deferred()
    reconnector = harness.reconnecting(server, on_connected=connected.callback)
    reconnector.start()
    conn = await harness.within(connected)
    await harness.within(reconnector.stop())
    assert conn.close_info is not None and not reconnector.connected
    assert server.opened[0].remoteCloseCode == 1000
    assert len(server.requests) == 1


@pytest.mark.parametrize("url", ["http://h/ws", "relay:7781", ""])
def test_reconnector_refuses_a_non_websocket_url(url: str) -> None:
    """The configured URL must be ws:// or wss://."""
    with pytest.raises(ValueError):
        ReconnectingConnection(cast(Any, object()), url, token_factory=lambda: TOKEN, role="client", workspace_id="w")

