"""Structured JSON log lines and the ``/logs`` ring, fed by twisted.logger events.

Convention for callers: every event of the contract is one ``twisted.logger.Logger`` call whose
level is the contract's level, with the contract's event name under ``relay_event`` and the detail
fields as keyword arguments::

    self._log.info("client {clientId} connected", relay_event="client_connected",
                   workspaceId=workspace_id, clientId=client_id, ip=ip)
    self._log.warn("bus pull failed", relay_event="relay_bus_pull_error", error=str(reason))
    self._log.failure("upgrade failed", relay_event="upgrade_error", ip=ip)  # inside ``except``

The format string is for humans reading Twisted's own log (a sentence; emitters that log events by
name, such as the router's budgeted log, use ``in_words(name)``); ``JsonLineObserver`` writes only the
event name and the (redacted) details. Detail keys must not start with ``log_`` and must not be
one of Twisted's legacy keys (``message``, ``time``, ``system``, ``format``, ``isError``,
``failure``, ``why``), which a legacy observer may add to the shared event.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import deque
from typing import Any, Callable, Optional, TextIO

from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent
from zope.interface import implementer

#: The event key naming the contract event (``client_connected``, ...).
RELAY_EVENT = "relay_event"

#: Event name used for events that do not carry ``relay_event`` (Twisted's own messages).
TWISTED_EVENT = "twisted"

REDACTED = "[redacted]"

#: Lower-cased substrings that mark a detail key as sensitive (docs/protocol.md §8).
SENSITIVE_KEY_PARTS: tuple[str, ...] = (
    "authorization",
    "credential",
    "token",
    "secret",
    "password",
    "api_key",
    "api-key",
    "apikey",
    "private_key",
    "private-key",
    "privatekey",
    "signature",
    "payload",
    "body",
    "content",
    "frame",
    "message",
)

# Keys twisted.logger's legacy bridge writes into an event (in place) besides its log_* keys.
_LEGACY_KEYS = frozenset({"message", "time", "system", "format", "isError", "failure", "why"})

# The contract knows three levels; Twisted's debug and critical fold into the nearest one.
_LEVELS: dict[LogLevel, str] = {
    LogLevel.debug: "info",
    LogLevel.info: "info",
    LogLevel.warn: "warn",
    LogLevel.error: "error",
    LogLevel.critical: "error",
}

# Deeper structures are stringified rather than walked (guards against cycles).
_MAX_DEPTH = 16
# Longer lists are cut: each item is bounded, the list must be too.
_MAX_ITEMS = 128


# Credentials as they appear inside text (a library's message, a traceback, a header value): the
# token of an ``auth.`` subprotocol, a bearer token, a ``token=`` query parameter, and any JWT.
_CREDENTIALS_IN_TEXT = re.compile(
    r"(?P<auth>auth\.)[^\s,;\"'\\]+"
    r"|(?P<bearer>\bbearer\s+)[^\s,;\"'\\]+"
    r"|(?P<query>\btoken=)[^\s&,;\"'\\]+"
    r"|\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*",
    re.IGNORECASE,
)


def _hide_credential(match: "re.Match[str]") -> str:
    prefix = match.group("auth") or match.group("bearer") or match.group("query") or ""
    return prefix + REDACTED


def scrub_text(text: str) -> str:
    """Replace credentials found inside free text (``auth.<t>``, ``Bearer <t>``, ``token=<t>``, JWTs)."""
    return _CREDENTIALS_IN_TEXT.sub(_hide_credential, text)


def is_sensitive_key(key: str) -> bool:
    """Return True when a detail key names a secret or a payload and its value must be hidden."""
    lowered = key.lower()
    return any(part in lowered for part in SENSITIVE_KEY_PARTS)


#: Longest logged string (ids a peer chose, library messages); a traceback (``error``) may be longer.
MAX_LOGGED_TEXT = 1024
MAX_LOGGED_TRACEBACK = 16384
#: Characters all the strings of one event may use together: however many ids or list items a peer
#: crams into something the relay logs, the line stays a few KiB.
MAX_LOGGED_EVENT_TEXT = 8192


class _TextBudget:
    """What is left of one event's character budget."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left

    def cut(self, text: str, limit: int) -> str:
        allowed = max(0, min(limit, self.left))
        self.left -= min(len(text), allowed)
        if len(text) > allowed:
            return f"{text[:allowed]}…[{len(text) - allowed} more characters]"
        return text


def bounded_text(text: str, limit: int = MAX_LOGGED_TEXT) -> str:
    """``text`` cut to ``limit`` characters (saying how many were cut) and scrubbed of credentials."""
    return scrub_text(_TextBudget(limit).cut(text, limit))


def redact(value: object, depth: int = 0, limit: int = MAX_LOGGED_TEXT, budget: Optional[_TextBudget] = None) -> Any:
    """
    Return a JSON-ready copy of ``value`` with sensitive keys redacted at every depth, credentials
    scrubbed out of every string, every string cut to ``limit`` characters and all of them
    together to ``MAX_LOGGED_EVENT_TEXT`` (a peer chooses the ids that end up in log lines; the
    line must stay small whatever it sends).

    Dicts and lists/tuples are walked; values JSON cannot represent (including non-finite
    floats and bytes) become ``str(value)``. A sensitive key holding a number, a boolean or
    null keeps it: a count or a size (``maxFrameBytes``) is neither a secret nor a payload.
    """
    if budget is None:
        budget = _TextBudget(MAX_LOGGED_EVENT_TEXT)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, str):
        return scrub_text(budget.cut(value, limit))
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth >= _MAX_DEPTH:
        return scrub_text(budget.cut(str(value), limit))
    if isinstance(value, dict):
        cleaned: dict[str, Any] = {}
        for key, item in value.items():
            name = key if isinstance(key, str) else str(key)
            if is_sensitive_key(name) and not (item is None or isinstance(item, (bool, int, float))):
                cleaned[name] = REDACTED
            elif name == "error" and isinstance(item, str):
                # A traceback has its own, larger allowance.
                cleaned[name] = bounded_text(item, MAX_LOGGED_TRACEBACK)
            else:
                cleaned[name] = redact(item, depth + 1, limit, budget)
        return cleaned
    if isinstance(value, (list, tuple)):
        return [redact(item, depth + 1, limit, budget) for item in value[:_MAX_ITEMS]]
    return scrub_text(budget.cut(str(value), limit))


def format_timestamp(seconds: float) -> str:
    """Format a POSIX time as ISO-8601 UTC with milliseconds and a ``Z`` suffix."""
    whole, millis = divmod(math.floor(seconds * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + ".%03dZ" % millis



def in_words(event_name: str) -> str:
    """A human format string for an event logged by name: ``client_frame_rejected`` → "client frame rejected"."""
    return event_name.replace("_", " ").replace("{", "{{").replace("}", "}}")

@implementer(ILogObserver)
class JsonLineObserver:
    """
    Writes each log event as one JSON line and keeps the newest ``max_logs`` entries for ``/logs``.

    An entry is ``{"ts", "level", "event", "details"}``. Events carrying ``relay_event`` use it as
    ``event`` and their keyword fields as ``details``; any other event (Twisted's own messages)
    becomes event ``"twisted"`` with details ``{"text", "namespace"}``. A failure's traceback goes
    under details ``error``. Details are redacted before they are printed or stored.
    """

    def __init__(
        self,
        stream: TextIO,
        max_logs: int,
        now: Callable[[], float] = time.time,
    ) -> None:
        """Write to ``stream``; ``now`` dates events that lack ``log_time``."""
        if max_logs < 1:
            raise ValueError("max_logs must be a positive integer")
        self._stream = stream
        self._now = now
        self._ring: deque[dict[str, Any]] = deque(maxlen=max_logs)
        #: Lines that could not be written (closed or broken stream); the ring still has them.
        self.write_errors = 0

    def __call__(self, event: LogEvent) -> None:
        """Record one event; never raises for an unwritable stream."""
        entry = self.entry(event)
        self._ring.append(entry)
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        try:
            self._stream.write(line)
            self._stream.flush()
        except (OSError, ValueError):
            # A log sink cannot report its own failure anywhere useful; count it instead.
            self.write_errors += 1

    def entry(self, event: LogEvent) -> dict[str, Any]:
        """Build the redacted ``{ts, level, event, details}`` entry for one event."""
        log_time = event.get("log_time")
        ts = format_timestamp(log_time if isinstance(log_time, (int, float)) else self._now())
        level = _LEVELS.get(event.get("log_level", LogLevel.info), "info")
        name = event.get(RELAY_EVENT)
        details: dict[str, Any]
        if isinstance(name, str) and name:
            details = {
                key: value
                for key, value in event.items()
                if not key.startswith("log_") and key != RELAY_EVENT and key not in _LEGACY_KEYS
            }
        else:
            name = TWISTED_EVENT
            # "text", not "message": the contract redacts any key containing "message".
            details = {"text": formatEvent(event), "namespace": event.get("log_namespace")}
        failure = event.get("log_failure")
        if failure is not None:
            details["error"] = _traceback(failure)
        return {"ts": ts, "level": level, "event": name, "details": redact(details)}

    def recent(self, verbose: bool) -> list[dict[str, Any]]:
        """Return the ring, oldest first: full entries when ``verbose``, else ``{ts, level, event}``."""
        if verbose:
            return [dict(entry) for entry in self._ring]
        return [
            {"ts": entry["ts"], "level": entry["level"], "event": entry["event"]}
            for entry in self._ring
        ]


def _traceback(failure: object) -> str:
    """Return a failure's traceback text, or its ``str`` when it is not a Twisted ``Failure``."""
    get_traceback: Optional[Callable[[], str]] = getattr(failure, "getTraceback", None)
    if get_traceback is None:
        return str(failure)
    try:
        return get_traceback()
    except Exception:
        return str(failure)


class RepeatedWarning:
    """
    One warning event that may fire in bursts (every frame of an outage): the first occurrence is
    logged at once, the rest are counted and logged as one line with ``repeated=<n>`` at most
    every ``interval_s`` — an outage costs a few log lines, not one per frame.
    """

    def __init__(self, log: Any, clock: Any, event: str, interval_s: float = 10.0) -> None:
        self._log = log
        self._clock = clock
        self._event = event
        self._interval_s = interval_s
        self._held = 0
        self._last: dict[str, Any] = {}
        self._timer: Any = None

    def warn(self, **details: Any) -> None:
        """Log now if this is the first of a burst, else count it (the latest details are kept)."""
        if self._timer is None:
            self._log.warn(in_words(self._event), relay_event=self._event, **details)
            self._timer = self._clock.callLater(self._interval_s, self._flush)
            return
        self._held += 1
        self._last = details

    def _flush(self) -> None:
        self._timer = None
        if self._held:
            held, self._held = self._held, 0
            self._log.warn(in_words(self._event) + " ({repeated} more)", relay_event=self._event, repeated=held, **self._last)
            self._timer = self._clock.callLater(self._interval_s, self._flush)

    def cancel(self) -> None:
        """Log what is held and stop the timer (shutdown)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._held:
            held, self._held = self._held, 0
            self._log.warn(in_words(self._event) + " ({repeated} more)", relay_event=self._event, repeated=held, **self._last)
