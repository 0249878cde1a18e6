"""Python connections to a viewport relay, as a daemon, a browser-style client or a worker.

:func:`connect` opens one WebSocket and fires with a :class:`RelayConnection` (send, await messages in
order, observe the close); refusals arrive as :class:`UpgradeRefused` with the HTTP status (and a redirect's
``Location``), and 307/308 redirects are followed. :class:`ReconnectingConnection` keeps a connection alive
the way a daemon should: capped full-jitter backoff, no retries after authentication or claim failures,
in-band ``RELAY_REDIRECT`` followed at once, a fresh token per attempt and a bounded outbound queue.

One connection::

    from twisted.internet import defer, task
    from viewport.client import connect

    async def main(reactor):
        conn = await connect(reactor, "ws://127.0.0.1:7781/ws", token=TOKEN, role="client",
                             workspace_id="w1", runtime_target_id="rt1", token_via="subprotocol")
        conn.send_json({"type": "relay_key_exchange_init", ...})
        print(await conn.next_json(timeout=10))
        await conn.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))

A daemon that stays connected::

    from viewport.client import ReconnectingConnection

    daemon = ReconnectingConnection(
        reactor, "wss://relay.example.com/ws", token_factory=issue_relay_token,  # str or Deferred[str]
        role="workspace-daemon", workspace_id="w1", runtime_target_id="rt1",
        on_message=handle_frame, on_gave_up=report_fatal,
    )
    daemon.start()
    daemon.send_json({...})   # sent now, or queued until the next connection
    ...
    await daemon.stop()
"""

from viewport.client.connection import CloseInfo, Frame, RelayConnection, parse_json_object
from viewport.client.errors import (
    ConnectionClosed,
    HandshakeFailed,
    MessageTimeout,
    OpenTimeout,
    RelayClientError,
    TooManyRedirects,
    UpgradeRefused,
)
from viewport.client.protocol import FOLLOWED_REDIRECT_STATUSES, connect, parse_location, parse_status_line
from viewport.client.reconnect import ConnectFunction, ReconnectingConnection, TokenFactory
from viewport.client.retry import (
    DEFAULT_FATAL_CLOSE_REASONS,
    DEFAULT_FATAL_STATUSES,
    Backoff,
    UniformSource,
    is_fatal_close,
    is_fatal_refusal,
)
from viewport.client.status import is_status, relay_redirect_url
from viewport.client.url import (
    DEFAULT_SUBPROTOCOL,
    Handshake,
    TokenVia,
    base_url_of,
    build_url,
    handshake_for,
    is_relay_base_url,
    redirect_url,
)

__all__ = [
    "DEFAULT_FATAL_CLOSE_REASONS",
    "DEFAULT_FATAL_STATUSES",
    "DEFAULT_SUBPROTOCOL",
    "FOLLOWED_REDIRECT_STATUSES",
    "Backoff",
    "CloseInfo",
    "ConnectFunction",
    "ConnectionClosed",
    "Frame",
    "Handshake",
    "HandshakeFailed",
    "MessageTimeout",
    "OpenTimeout",
    "ReconnectingConnection",
    "RelayClientError",
    "RelayConnection",
    "TokenFactory",
    "TokenVia",
    "TooManyRedirects",
    "UniformSource",
    "UpgradeRefused",
    "base_url_of",
    "build_url",
    "connect",
    "handshake_for",
    "is_fatal_close",
    "is_fatal_refusal",
    "is_relay_base_url",
    "is_status",
    "parse_json_object",
    "parse_location",
    "parse_status_line",
    "redirect_url",
    "relay_redirect_url",
]
