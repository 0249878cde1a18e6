"""PUBLISH written straight onto a txredisapi connection: byte-exact, in order with txredisapi's own commands."""

from __future__ import annotations

import uuid
from typing import Any, List

import pytest
import pytest_twisted
import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.support import poll_until
from viewport.relay.backplane.publish_command import publish_on


class _Publishing:
    def publish(self, channel: str, message: str) -> "Deferred[Any]":
        return publish_on(self, b"PUBLISH", channel, message)


class HiredisCommands(_Publishing, txredisapi.RedisProtocol):  # type: ignore[misc]
    """txredisapi's default protocol (hiredis parses the replies) with our PUBLISH."""


class PythonCommands(_Publishing, txredisapi.BaseRedisProtocol):  # type: ignore[misc]
    """txredisapi's pure-Python reply parser with our PUBLISH."""


class Listener(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """Records every message it hears."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.heard: List[object] = []

    def messageReceived(self, pattern: object, channel: object, message: object) -> None:
        """One pub/sub message."""
        self.heard.append(message)


def _connect(proto: Any) -> "Deferred[Any]":
    proto.callLater = reactor.callLater
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", 6379, timeout=5), proto)


@pytest.mark.parametrize("flavour", [HiredisCommands, PythonCommands], ids=["hiredis", "python"])
@pytest_twisted.inlineCallbacks
def test_publishes_interleaved_with_other_commands_keep_their_answers(flavour: Any) -> Any:
    """
    PUBLISH between txredisapi's own commands, all in flight at once on the machine's Redis: each
    answer reaches its own command, and the subscriber hears every message byte for byte (non-ASCII
    text, a 200 KB message, an empty one).
    """
    channel = f"viewport:test:publish:{uuid.uuid4().hex}"
    key = f"{channel}:key"
    listener = yield _connect(Listener(charset="utf-8"))
    commands = yield _connect(flavour(charset="utf-8", convertNumbers=False))
    try:
        yield listener.subscribe(channel)
        messages = ["plain", "é€😀 \"quoted\" \\ \r\n", "x" * 200_000, ""]
        answers = yield Deferred.fromCoroutine(_all([
            commands.publish(channel, messages[0]),
            commands.set(key, "v1"),
            commands.publish(channel, messages[1]),
            commands.get(key),
            commands.publish(channel, messages[2]),
            commands.delete(key),
            commands.publish(channel, messages[3]),
        ]))
        assert answers == [1, "OK", 1, "v1", 1, 1, 1]
        yield poll_until(lambda: len(listener.heard) >= 4, 10.0, "all messages heard")
        assert listener.heard == messages
    finally:
        for proto in (listener, commands):
            proto.transport.loseConnection()


@pytest_twisted.inlineCallbacks
def test_an_error_answer_fails_only_its_command() -> Any:
    """An error reply (here a verb Redis does not know) fails that command; the next ones are answered."""
    commands = yield _connect(HiredisCommands(charset="utf-8", convertNumbers=False))
    try:
        wrong = publish_on(commands, b"NOSUCHVERB", "a", "b")
        after = commands.ping()
        with pytest.raises(txredisapi.ResponseError, match="NOSUCHVERB"):
            yield wrong
        assert (yield after) == "PONG"
    finally:
        commands.transport.loseConnection()


async def _all(waiting: List["Deferred[Any]"]) -> List[Any]:
    return [await d for d in waiting]


class PublishOnTests(SynchronousTestCase):
    """What goes on the wire, and what becomes of commands whose answer never comes or comes late."""

    def setUp(self) -> None:
        self.proto = HiredisCommands(charset="utf-8", convertNumbers=False)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def test_writes_one_resp_array_with_utf8_lengths(self) -> None:
        """Bulk lengths count UTF-8 bytes, not characters."""
        publish_on(self.proto, b"SPUBLISH", "ch{é}", "€")
        self.assertEqual(self.transport.value(), b"*3\r\n$8\r\nSPUBLISH\r\n$6\r\nch{\xc3\xa9}\r\n$3\r\n\xe2\x82\xac\r\n")

    def test_lost_connection_fails_what_waits(self) -> None:
        """Commands still waiting when the connection goes fail with txredisapi's ConnectionError."""
        waiting = [publish_on(self.proto, b"PUBLISH", "c", str(n)) for n in range(3)]
        self.proto.connectionLost(Failure(ConnectionDone()))
        for d in waiting:
            self.failureResultOf(d, txredisapi.ConnectionError)
        with self.assertRaises(txredisapi.ConnectionError):
            publish_on(self.proto, b"PUBLISH", "c", "after")

    def test_an_answer_after_cancel_is_dropped_and_the_next_pairs_right(self) -> None:
        """A command cancelled (timed out) keeps its place: its late answer is not given to the next one."""
        first = publish_on(self.proto, b"PUBLISH", "c", "1")
        second = publish_on(self.proto, b"PUBLISH", "c", "2")
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.proto.dataReceived(b":7\r\n:3\r\n")
        self.assertEqual(self.successResultOf(second), 3)

    def test_inside_multi_txredisapi_sends_it(self) -> None:
        """While txredisapi batches (MULTI), the command goes through its own machinery."""
        self.proto.inMulti = True
        publish_on(self.proto, b"PUBLISH", "c", "m")
        self.assertIn(b"PUBLISH", self.transport.value())
        self.assertEqual(len(self.proto.post_proc), 1)
