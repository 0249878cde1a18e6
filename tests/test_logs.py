"""Tests for viewport.logs: JSON log lines, redaction and the ``/logs`` ring."""

from __future__ import annotations

import ast
import glob
import io
import json
import os
import re
from typing import Any, cast

from twisted.logger import (
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
)
from twisted.python.log import ILogObserver as ILegacyLogObserver
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.support import REPO_ROOT
from viewport.logs import JsonLineObserver, format_timestamp, redact

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class Harness:
    """An observer writing to a StringIO, and a Logger feeding it."""

    def __init__(self, max_logs: int = 400) -> None:
        """Create the stream, observer and logger."""
        self.stream = io.StringIO()
        self.observer = JsonLineObserver(self.stream, max_logs=max_logs, now=lambda: 0.0)
        self.log = Logger(namespace="viewport.test", observer=self.observer)

    def lines(self) -> list[dict[str, Any]]:
        """Return the printed lines, parsed."""
        text = self.stream.getvalue()
        assert text == "" or text.endswith("\n"), "every printed line is terminated"
        return [json.loads(line) for line in text.splitlines()]


class JsonLineObserverTests(SynchronousTestCase):
    """JsonLineObserver prints one JSON line per event and keeps a bounded ring."""

    def test_interface(self) -> None:
        """The observer provides ILogObserver."""
        self.assertTrue(verifyObject(ILogObserver, JsonLineObserver(io.StringIO(), max_logs=1)))

    def test_bad_max_logs(self) -> None:
        """A ring size below one is refused."""
        self.assertRaises(ValueError, JsonLineObserver, io.StringIO(), 0)

    def test_relay_event_line(self) -> None:
        """A relay event prints one line with ts, level, event and its keyword fields as details."""
        h = Harness()
        h.log.info(
            "client {clientId} connected",
            relay_event="client_connected",
            workspaceId="ws1",
            clientId="c1",
            ip="10.0.0.1",
        )
        [line] = h.lines()
        self.assertEqual(list(line), ["ts", "level", "event", "details"])
        self.assertRegex(line["ts"], TS)
        self.assertEqual(line["level"], "info")
        self.assertEqual(line["event"], "client_connected")
        self.assertEqual(line["details"], {"workspaceId": "ws1", "clientId": "c1", "ip": "10.0.0.1"})

    def test_levels(self) -> None:
        """Logger levels map to info, warn and error; debug folds into info, critical into error."""
        h = Harness()
        h.log.debug("d", relay_event="e_debug")
        h.log.info("i", relay_event="e_info")
        h.log.warn("w", relay_event="e_warn")
        h.log.error("e", relay_event="e_error")
        h.log.critical("c", relay_event="e_critical")
        self.assertEqual(
            [(line["event"], line["level"]) for line in h.lines()],
            [("e_debug", "info"), ("e_info", "info"), ("e_warn", "warn"), ("e_error", "error"),
             ("e_critical", "error")],
        )

    def test_timestamp_from_event(self) -> None:
        """``ts`` is the event's log_time as ISO-8601 UTC with milliseconds and Z."""
        h = Harness()
        h.observer({"log_time": 1700000000.1239, "log_level": LogLevel.info, "relay_event": "x"})
        h.observer({"log_level": LogLevel.info, "relay_event": "y"})
        self.assertEqual([line["ts"] for line in h.lines()],
                         ["2023-11-14T22:13:20.123Z", "1970-01-01T00:00:00.000Z"])

    def test_format_timestamp(self) -> None:
        """Milliseconds are truncated and zero-padded."""
        self.assertEqual(format_timestamp(0.5), "1970-01-01T00:00:00.500Z")
        self.assertEqual(format_timestamp(1.999), "1970-01-01T00:00:01.999Z")
        self.assertEqual(format_timestamp(1700000000.007), "2023-11-14T22:13:20.007Z")

    def test_redaction(self) -> None:
        """Sensitive keys are redacted at the top level, in nested dicts and in lists, in print and ring."""
        h = Harness()
        h.log.warn(
            "x",
            relay_event="admission_denied",
            token="t0k",
            Authorization="Bearer abc",
            workspaceId="ws1",
            nested={
                "ok": 1,
                "inner": {"Frame": {"a": 1}, "x-api-key": "k", "keep": [1, 2]},
                "items": [{"payload": "p", "id": 7}, {"clientMessageId": "m", "n": None}],
            },
            headers=[{"Cookie-Signature": "s", "host": "h"}],
        )
        expected = {
            "token": "[redacted]",
            "Authorization": "[redacted]",
            "workspaceId": "ws1",
            "nested": {
                "ok": 1,
                "inner": {"Frame": "[redacted]", "x-api-key": "[redacted]", "keep": [1, 2]},
                "items": [{"payload": "[redacted]", "id": 7},
                          {"clientMessageId": "[redacted]", "n": None}],
            },
            "headers": [{"Cookie-Signature": "[redacted]", "host": "h"}],
        }
        [line] = h.lines()
        self.assertEqual(line["details"], expected)
        self.assertEqual(h.observer.recent(verbose=True)[0]["details"], expected)
        for secret in ("t0k", "abc", '"k"', '"p"', '"s"'):
            self.assertNotIn(secret, h.stream.getvalue())

    def test_every_sensitive_marker(self) -> None:
        """Each marker of the contract redacts a key containing it, in any case."""
        markers = ["authorization", "credential", "token", "secret", "password", "api_key", "api-key",
                   "apikey", "private_key", "private-key", "privatekey", "signature", "payload", "body",
                   "content", "frame", "message"]
        details = {f"my_{marker.upper()}_x": "v" for marker in markers}
        details["workspaceId"] = "w"
        self.assertEqual(
            redact(details),
            {**{key: "[redacted]" for key in details if key != "workspaceId"}, "workspaceId": "w"},
        )

    def test_lines_stay_small_whatever_a_peer_sends(self) -> None:
        """A peer-chosen id of 200,000 characters (or a list of thousands) makes a line of a few KiB, not hundreds."""
        h = Harness()
        h.log.warn("{relay_event}", relay_event="pairing_response_owner_missing", requestId="r" * 200_000,
                   ids=["i" * 5000] * 5000)
        [line] = h.lines()
        self.assertLess(len(json.dumps(line)), 200_000 // 10)
        self.assertTrue(line["details"]["requestId"].endswith("…[198976 more characters]"))

    def test_credentials_in_text_are_scrubbed(self) -> None:
        """auth.<t>, Bearer <t>, token=<t> and JWTs inside free text (library messages, tracebacks) are hidden."""
        jwt_like = "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiY2xpZW50In0.c2lnbmF0dXJlLXRleHQ"
        h = Harness()
        h.log.info(f'duplicate protocol "auth.{jwt_like}"; Authorization: Bearer abcdef123456; /ws?token=qwerty123&x=1')
        text = h.lines()[0]["details"]["text"]
        for secret in (jwt_like, "abcdef123456", "qwerty123"):
            self.assertNotIn(secret, text)
        self.assertIn("x=1", text)

    def test_non_serialisable_values(self) -> None:
        """Values JSON cannot carry are converted with str; tuples become lists."""
        class Thing:
            def __str__(self) -> str:
                return "thing!"

        h = Harness()
        h.log.info("x", relay_event="e", obj=Thing(), raw=b"ab", nan=float("nan"), pair=(1, "a"),
                   keys={3: "three"})
        [line] = h.lines()
        self.assertEqual(
            line["details"],
            {"obj": "thing!", "raw": "b'ab'", "nan": "nan", "pair": [1, "a"], "keys": {"3": "three"}},
        )

    def test_ring_bounded(self) -> None:
        """The ring keeps only the newest max_logs entries, newest last; every event is printed."""
        h = Harness(max_logs=3)
        for index in range(5):
            h.log.info("x", relay_event=f"e{index}")
        self.assertEqual([entry["event"] for entry in h.observer.recent(verbose=False)],
                         ["e2", "e3", "e4"])
        self.assertEqual(len(h.lines()), 5)

    def test_recent_summary_and_verbose(self) -> None:
        """recent(False) gives {ts, level, event}; recent(True) gives the full entries."""
        h = Harness()
        h.log.warn("x", relay_event="ws_terminated", reason="idle timeout")
        [summary] = h.observer.recent(verbose=False)
        [full] = h.observer.recent(verbose=True)
        self.assertEqual(set(summary), {"ts", "level", "event"})
        self.assertEqual((summary["level"], summary["event"]), ("warn", "ws_terminated"))
        self.assertEqual(full, h.lines()[0])
        self.assertEqual(full["details"], {"reason": "idle timeout"})

    def test_twisted_event(self) -> None:
        """An event without relay_event is printed as event "twisted" with its formatted text."""
        h = Harness()
        h.log.info("Site starting on {port}", port=8080)
        [line] = h.lines()
        self.assertEqual(line["event"], "twisted")
        self.assertEqual(line["level"], "info")
        self.assertEqual(line["details"], {"text": "Site starting on 8080", "namespace": "viewport.test"})
        self.assertEqual(h.observer.recent(verbose=False)[0]["event"], "twisted")

    def test_relay_failure(self) -> None:
        """A failure logged with relay_event carries its traceback under details error, on one line."""
        h = Harness()
        try:
            1 // 0
        except ZeroDivisionError:
            h.log.failure("upgrade failed", relay_event="upgrade_error", ip="10.0.0.9")
        [line] = h.lines()
        self.assertEqual((line["level"], line["event"]), ("error", "upgrade_error"))
        self.assertEqual(line["details"]["ip"], "10.0.0.9")
        self.assertIn("Traceback", line["details"]["error"])
        self.assertIn("ZeroDivisionError", line["details"]["error"])
        self.assertEqual(h.stream.getvalue().count("\n"), 1)

    def test_twisted_failure(self) -> None:
        """A failure without relay_event keeps its text and traceback."""
        h = Harness()
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            h.log.failure("Unhandled error in {what}", what="loop")
        [line] = h.lines()
        self.assertEqual((line["level"], line["event"]), ("error", "twisted"))
        self.assertEqual(line["details"]["text"], "Unhandled error in loop")
        self.assertIn("RuntimeError: boom", line["details"]["error"])

    def test_legacy_keys_ignored(self) -> None:
        """Keys a legacy observer adds to a shared event do not appear in the details."""
        h = Harness()
        legacy_seen: list[LogEvent] = []
        legacy = LegacyLogObserverWrapper(cast(ILegacyLogObserver, legacy_seen.append))
        publisher = LogPublisher(legacy, h.observer)
        log = Logger(namespace="viewport.test", observer=publisher)
        try:
            raise ValueError("bad")
        except ValueError:
            log.failure("oops", relay_event="daemon_ws_error", workspaceId="ws1")
        [line] = h.lines()
        self.assertIn("isError", legacy_seen[0])
        self.assertEqual(set(line["details"]), {"workspaceId", "error"})

    def test_broken_stream(self) -> None:
        """A closed stream does not raise: the write is counted and the ring still gets the entry."""
        stream = io.StringIO()
        observer = JsonLineObserver(stream, max_logs=5)
        stream.close()
        event: LogEvent = {"log_level": LogLevel.info, "log_time": 0.0, "relay_event": "e"}
        observer(event)
        self.assertEqual(observer.write_errors, 1)
        self.assertEqual(observer.recent(verbose=False)[0]["event"], "e")


def _logger_calls() -> "list[tuple[str, int, ast.Call]]":
    """Every ``<...>_log.<level>(...)`` / ``log.<level>(...)`` call in the package, with where it is."""
    calls = []
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "viewport", "**", "*.py"), recursive=True)):
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), path)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in _LEVEL_METHODS:
                continue
            receiver = node.func.value
            name = receiver.attr if isinstance(receiver, ast.Attribute) else getattr(receiver, "id", "")
            if name in ("_log", "log"):
                calls.append((os.path.relpath(path, REPO_ROOT), node.lineno, node))
    return calls


_LEVEL_METHODS = {"debug", "info", "warn", "error", "critical", "failure", "emit"}


def test_every_log_call_names_its_event_and_reads_as_a_sentence() -> None:
    """
    One convention (viewport/logs.py): a Logger call carries ``relay_event=`` (the name the JSON line
    shows) and a format string for humans, never the bare ``"{relay_event}"``.
    """
    calls = _logger_calls()
    assert len(calls) > 40
    unnamed = [f"{path}:{line}" for path, line, call in calls
               if not any(keyword.arg == "relay_event" for keyword in call.keywords)]
    bare = [f"{path}:{line}" for path, line, call in calls
            if any(isinstance(arg, ast.Constant) and arg.value == "{relay_event}" for arg in call.args)]
    assert unnamed == [] and bare == []
