"""Errors raised (as Deferred failures) by relay client connections."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from viewport.client.connection import CloseInfo


class RelayClientError(Exception):
    """Base class for every error the relay client reports."""


class HandshakeFailed(RelayClientError):
    """The WebSocket opening handshake did not complete."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpgradeRefused(HandshakeFailed):
    """The relay refused the upgrade with a non-101 HTTP status, or answered nothing at all.

    ``status`` is the HTTP status code, or ``None`` when the socket closed before a status line arrived.
    ``location`` is the ``Location`` header of the answer (kept for any status; meaningful for a 3xx), or
    ``None`` when the answer had none.
    """

    def __init__(self, status: int | None, reason: str | None = None, *, location: str | None = None) -> None:
        if reason is None:
            reason = (
                "connection closed before an upgrade response"
                if status is None
                else f"upgrade refused with HTTP {status}"
            )
        super().__init__(reason)
        self.status = status
        self.location = location

    def __repr__(self) -> str:
        """Show the status (and a redirect's location), which is what callers assert on."""
        if self.location is None:
            return f"UpgradeRefused(status={self.status!r})"
        return f"UpgradeRefused(status={self.status!r}, location={self.location!r})"


class TooManyRedirects(UpgradeRefused):
    """A redirect answer arrived after ``max_redirects`` redirects had already been followed.

    ``redirected_from`` lists the URLs that answered with a redirect, in the order they were tried; the last
    refusal's ``status`` and ``location`` are kept.
    """

    def __init__(self, status: int, location: str, redirected_from: list[str]) -> None:
        super().__init__(
            status, f"more than {len(redirected_from) - 1} redirects (last HTTP {status})", location=location
        )
        self.redirected_from = redirected_from


class OpenTimeout(RelayClientError, TimeoutError):
    """The connection was not OPEN within ``open_timeout`` seconds."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"relay connection not open after {timeout} s")
        self.timeout = timeout


class MessageTimeout(RelayClientError, TimeoutError):
    """No message arrived within the timeout given to ``next_message``."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"no message within {timeout} s")
        self.timeout = timeout


class ConnectionClosed(RelayClientError):
    """The connection closed while a message was awaited and none was left in the queue."""

    def __init__(self, info: CloseInfo) -> None:
        super().__init__(f"connection closed: code={info.code} reason={info.reason!r}")
        self.info = info
