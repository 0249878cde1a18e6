"""PUBLISH and SPUBLISH written straight onto a txredisapi connection: the one command sent per frame."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from txredisapi import ConnectionError as NotConnected


class _Answer:
    """
    Waits in txredisapi's reply queue in place of a ``Deferred``: the queue calls ``callback`` with the
    reply, in order, or with ``ConnectionError`` when the connection is lost. An answer that comes after
    ``deferred`` was settled (timed out and cancelled) is ignored, as txredisapi does for its own.
    """

    __slots__ = ("deferred",)

    def __init__(self, deferred: "Deferred[Any]") -> None:
        self.deferred = deferred

    def callback(self, reply: object) -> None:
        """The reply for this command (an ``Exception`` instance for an error reply)."""
        d = self.deferred
        if d.called:
            return
        if isinstance(reply, Exception):
            d.errback(Failure(reply))
        else:
            d.callback(reply)


def publish_on(proto: Any, verb: bytes, channel: str, message: str) -> "Deferred[Any]":
    """
    Send ``verb`` (``PUBLISH`` or ``SPUBLISH``) on ``proto``; fires with the receiver count.

    txredisapi builds each command from its arguments and answers it through two Deferreds and a
    reply queue entry; for the one command sent per forwarded frame that is a sizeable share of a
    relay's CPU. This writes the RESP array at once and queues one small waiter, so replies still
    pair with commands in order. While txredisapi batches commands (a pipeline or MULTI) it sends
    them itself. Raises as ``execute_command`` does: ``ConnectionError`` when not connected,
    ``UnicodeEncodeError`` for text that is not encodable.
    """
    if proto.pipelining or proto.inMulti:
        d: Deferred[Any] = proto.execute_command(verb.decode(), channel, message)
        return d
    if not proto.connected:
        raise NotConnected("Not connected")
    name = channel.encode("utf-8")
    body = message.encode("utf-8")
    proto.transport.write(
        b"*3\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(verb), verb, len(name), name, len(body), body)
    )
    result: Deferred[Any] = Deferred()
    queue = proto.replyQueue
    if queue.pending:
        # As DeferredQueue.get: a reply that came with nobody waiting is handed to the next command.
        _Answer(result).callback(queue.pending.pop(0))
    else:
        queue.waiting.append(_Answer(result))
    return result
