"""Autobahn's per-socket debug dump of its options is formatted only when logged."""

from __future__ import annotations

from pprint import pformat
from typing import Any, List

import autobahn.websocket.protocol as autobahn_protocol
import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from viewport.relay import protocol as relay_protocol
from viewport.relay.protocol import LazyPrettyFormat, RelayWebSocketFactory


def test_autobahn_gets_the_lazy_formatter() -> None:
    """Importing the relay's protocol module hands Autobahn the lazy formatter."""
    assert autobahn_protocol.pformat is LazyPrettyFormat  # type: ignore[attr-defined]


def test_a_new_socket_formats_nothing_and_the_text_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a socket pretty-prints nothing; the deferred text, when asked for, is pformat's."""
    calls: List[Any] = []

    def counting(value: Any) -> str:
        calls.append(value)
        return pformat(value)

    monkeypatch.setattr(relay_protocol, "pformat", counting)
    factory = RelayWebSocketFactory(
        clock=Clock(), gate=None, admission=None, router=None, sockets=None,  # type: ignore[arg-type]
        metrics=None, max_frame_bytes=1 << 20, max_pending_bytes=1 << 20, admission_timeout_ms=5000,  # type: ignore[arg-type]
    )
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    assert calls == []
    options = [("maxFramePayloadSize", 1 << 20, "RelayWebSocketFactory")]
    assert str(LazyPrettyFormat(options)) == pformat(options)
    assert len(calls) == 1


def test_timings_still_print_as_text() -> None:
    """Autobahn's Timings, the module's one pformat whose result must be text, still gives a string."""
    timings = autobahn_protocol.Timings()
    timings.track("opened")
    text = str(timings)
    assert isinstance(text, str) and "opened" in text
