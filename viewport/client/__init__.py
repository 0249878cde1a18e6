"""Python connections to a relay, as a daemon or as a browser-style client."""

from viewport.client.connection import CloseInfo, Frame, RelayConnection, parse_json_object
from viewport.client.errors import (
    ConnectionClosed,
    HandshakeFailed,
    MessageTimeout,
    OpenTimeout,
    RelayClientError,
    UpgradeRefused,
)
from viewport.client.protocol import connect, parse_status_line
from viewport.client.status import is_status
from viewport.client.url import DEFAULT_SUBPROTOCOL, Handshake, TokenVia, build_url, handshake_for

__all__ = [
    "DEFAULT_SUBPROTOCOL",
    "CloseInfo",
    "ConnectionClosed",
    "Frame",
    "Handshake",
    "HandshakeFailed",
    "MessageTimeout",
    "OpenTimeout",
    "RelayClientError",
    "RelayConnection",
    "TokenVia",
    "UpgradeRefused",
    "build_url",
    "connect",
    "handshake_for",
    "is_status",
    "parse_json_object",
    "parse_status_line",
]
