"""Recognising the relay's own ``relay_status`` frames (docs/protocol.md §5.1)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from viewport.client.connection import parse_json_object

RUNTIME_TARGET_REQUIRED = "RUNTIME_TARGET_REQUIRED"
DAEMON_UNAVAILABLE = "DAEMON_UNAVAILABLE"
RELAY_REDIRECT = "RELAY_REDIRECT"
INVALID_FRAME = "INVALID_FRAME"
SESSION_EVENTS_SCOPE_ONLY = "SESSION_EVENTS_SCOPE_ONLY"


def is_status(msg: Mapping[str, Any], code: str) -> bool:
    """Whether ``msg`` is a ``relay_status`` frame carrying ``code``."""
    return msg.get("type") == "relay_status" and msg.get("code") == code


def relay_redirect_url(text: str) -> str | None:
    """The ``relayWsBaseUrl`` of a ``RELAY_REDIRECT`` status message, or None for any other message."""
    if RELAY_REDIRECT not in text:
        return None
    try:
        msg = parse_json_object(text)
    except (ValueError, RecursionError):
        return None
    url = msg.get("relayWsBaseUrl")
    if not is_status(msg, RELAY_REDIRECT) or not isinstance(url, str) or not url:
        return None
    return url
