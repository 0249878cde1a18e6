"""txredisapi protocols for Redis Cluster: MOVED/ASK as typed errors, SPUBLISH, slot maps and sharded pub/sub."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Deque, FrozenSet, List, Optional, Sequence, Set

import txredisapi
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from viewport.relay.backplane.cluster_slots import Address, Redirect, SlotMap, parse_redirect
from viewport.relay.backplane.publish_command import publish_on

if TYPE_CHECKING:
    # The mixins below sit in front of a txredisapi protocol class, which is untyped.
    _TxRedisProtocol = Any
else:
    _TxRedisProtocol = object


class ClusterRedirectError(txredisapi.ResponseError):
    """A ``-MOVED``/``-ASK`` reply: the command's slot is served elsewhere (still a ``ResponseError``)."""

    def __init__(self, redirect: Redirect, text: str) -> None:
        super().__init__(text)
        self.redirect = redirect

    @property
    def slot(self) -> int:
        """The slot of the command's key or shard channel."""
        return self.redirect.slot

    @property
    def address(self) -> Address:
        """``(host, port)`` of the node to ask instead."""
        return self.redirect.address


class MovedError(ClusterRedirectError):
    """``-MOVED``: another master serves the slot now; refresh the slot map and resend there."""


class AskError(ClusterRedirectError):
    """``-ASK``: the slot is migrating; send this one command (after ``ASKING``) to the named node."""


def typed_error(reply: object, asked_host: str = "") -> object:
    """``reply``, with a ``ResponseError`` that carries a redirection replaced by a ``MovedError``/``AskError``."""
    if isinstance(reply, txredisapi.ResponseError) and not isinstance(reply, ClusterRedirectError):
        text = str(reply)
        redirect = parse_redirect(text, asked_host)
        if redirect is not None:
            return (MovedError if redirect.kind == "MOVED" else AskError)(redirect, text)
    return reply


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class ClusterRedirectsMixin(_TxRedisProtocol):
    """
    In front of a txredisapi protocol class: a command answered ``-MOVED``/``-ASK`` fails with
    ``MovedError``/``AskError`` instead of a bare ``ResponseError``.

    txredisapi turns every ``-`` reply into ``ResponseError(text)`` (``BaseRedisProtocol.lineReceived``,
    or hiredis' ``replyError``) and hands it to ``replyReceived``; this is the one place to type it.
    """

    def replyReceived(self, reply: object) -> None:
        """Type redirections, then queue the reply for the waiting command (txredisapi)."""
        if isinstance(reply, txredisapi.ResponseError):
            # Only errors are looked at: the peer lookup would cost every SPUBLISH reply a few µs.
            reply = typed_error(reply, self.asked_host())
        super().replyReceived(reply)

    def asked_host(self) -> str:
        """The host this connection reached: a redirection with an empty endpoint means this host."""
        transport = getattr(self, "transport", None)
        peer = transport.getPeer() if transport is not None else None
        return str(getattr(peer, "host", "") or "")


class ClusterCommandsMixin(ClusterRedirectsMixin):
    """Cluster commands txredisapi 1.6 lacks: SPUBLISH, CLUSTER SHARDS/SLOTS and a ``SlotMap`` from them."""

    def spublish(self, channel: str, message: str) -> "Deferred[int]":
        """``SPUBLISH``: fires with the number of receivers *on this node* (replicas' subscribers not counted)."""
        d: Deferred[int] = publish_on(self, b"SPUBLISH", channel, message)
        return d

    def cluster_shards(self) -> "Deferred[List[Any]]":
        """The raw ``CLUSTER SHARDS`` reply (Redis 7+)."""
        d: Deferred[List[Any]] = self.execute_command("CLUSTER", "SHARDS")
        return d

    def cluster_slots(self) -> "Deferred[List[Any]]":
        """The raw ``CLUSTER SLOTS`` reply."""
        d: Deferred[List[Any]] = self.execute_command("CLUSTER", "SLOTS")
        return d

    def slot_map(self) -> "Deferred[SlotMap]":
        """
        The cluster's ``SlotMap`` as this node sees it: from ``CLUSTER SHARDS``, or from ``CLUSTER SLOTS``
        when the server does not know SHARDS (before 7.0). Fails on any other error.
        """
        host = self.asked_host()

        def fall_back(failure: Failure) -> "Deferred[SlotMap]":
            failure.trap(txredisapi.ResponseError)
            if isinstance(failure.value, ClusterRedirectError) or "unknown subcommand" not in str(failure.value).lower():
                return failure  # type: ignore[return-value]
            return self.cluster_slots().addCallback(SlotMap.from_slots, host)

        shards = self.cluster_shards().addCallback(SlotMap.from_shards, host)
        return shards.addErrback(fall_back)


@dataclass
class _Outstanding:
    """A command sent and not yet answered; SSUBSCRIBE/SUNSUBSCRIBE expect a confirmation per channel."""

    command: str
    channels: Optional[List[str]]  # None: SUNSUBSCRIBE of every channel (ends when the count reaches 0)
    confirmed: int = 0


_SHARD_COMMANDS = ("SSUBSCRIBE", "SUNSUBSCRIBE")


class ShardSubscriberMixin(ClusterRedirectsMixin):
    """
    Sharded pub/sub (Redis 7 ``SSUBSCRIBE``/``SUNSUBSCRIBE``, ``smessage`` pushes) for a txredisapi protocol.

    txredisapi 1.6's ``SubscriberProtocol.replyReceived`` knows only ``message``/``pmessage`` pushes and
    ``(p)(un)subscribe`` confirmations: an ``smessage`` or an ``ssubscribe`` confirmation would be queued
    as the reply of whatever command waits next, and a ``sunsubscribe`` Redis sends by itself (slot moved,
    master demoted) would answer a later command. So this mixin tracks every command it sends, in order,
    and tells replies from pushes: an SSUBSCRIBE or SUNSUBSCRIBE command's Deferred fires once Redis confirmed
    every channel, with the number of shard channels the connection holds afterwards (or fails, e.g. with
    ``MovedError`` or ``CROSSSLOT``: all channels of one SSUBSCRIBE must share a slot).

    Override ``shardMessageReceived`` and ``shardChannelUnsubscribed``; both are guarded (a bug is
    logged, the connection goes on). Only PING, QUIT, RESET and sharded (un)subscriptions are allowed on
    a subscribed connection (Redis' rule), and classic SUBSCRIBE is not handled here.
    """

    _log = Logger()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._outstanding: Deque[_Outstanding] = deque()
        self._shard_channels: Set[str] = set()

    @property
    def shard_channels(self) -> FrozenSet[str]:
        """The shard channels Redis confirmed and has not dropped."""
        return frozenset(self._shard_channels)

    def ssubscribe(self, channels: Sequence[str]) -> "Deferred[int]":
        """``SSUBSCRIBE`` channels of one slot; fires with the connection's shard channel count."""
        d: Deferred[int] = self.execute_command("SSUBSCRIBE", *channels)
        return d

    def sunsubscribe(self, channels: Sequence[str] = ()) -> "Deferred[int]":
        """``SUNSUBSCRIBE`` the channels (all when none given); fires with the count left (Redis checks their slot too)."""
        d: Deferred[int] = self.execute_command("SUNSUBSCRIBE", *channels)
        return d

    def ping(self) -> "Deferred[Any]":
        """``PING``; a subscribed connection's ``["pong", ""]`` answer is reported as ``"PONG"`` too."""
        d: Deferred[Any] = super().ping()

        def normalise(reply: Any) -> Any:
            if isinstance(reply, list) and reply and _text(reply[0]).lower() == "pong":
                return "PONG"
            return reply

        return d.addCallback(normalise)

    def shardMessageReceived(self, channel: str, message: object) -> None:
        """An ``smessage`` push: ``message`` was published on ``channel``."""

    def shardChannelUnsubscribed(self, channel: str) -> None:
        """Redis dropped ``channel`` on its own (its slot moved, or this node stopped serving it): subscribe again elsewhere."""

    # -- txredisapi hooks -------------------------------------------------------------------------

    def execute_command(self, *args: Any, **kwargs: Any) -> "Deferred[Any]":
        """Send a command (txredisapi), remembering what its reply will look like."""
        command = _text(args[0]).upper() if args else ""
        channels = [_text(channel) for channel in args[1:]] if command in _SHARD_COMMANDS else []
        entry = _Outstanding(command, None if command == "SUNSUBSCRIBE" and not channels else channels)
        self._outstanding.append(entry)
        try:
            d: Deferred[Any] = super().execute_command(*args, **kwargs)
        except BaseException:
            self._outstanding.remove(entry)  # not sent ("Not connected"): no reply will come
            raise
        return d

    def replyReceived(self, reply: object) -> None:
        """Hand pushes to the callbacks; count confirmations; queue every other reply for its command."""
        if isinstance(reply, list) and len(reply) == 3 and self._subscribed():
            kind = _text(reply[0]).lower()
            if kind == "smessage":
                self._guarded(self.shardMessageReceived, _text(reply[1]), reply[2])
                return
            if kind in ("ssubscribe", "sunsubscribe"):
                self._confirmation(kind, None if reply[1] is None else _text(reply[1]), reply[2])
                return
        if self._outstanding:
            self._outstanding.popleft()
        super().replyReceived(reply)

    def connectionLost(self, why: Failure) -> None:
        """Fail the waiting commands (txredisapi), then forget the subscriptions: they died with the connection."""
        try:
            super().connectionLost(why)
        finally:
            self._outstanding.clear()
            self._shard_channels.clear()

    # -- internals --------------------------------------------------------------------------------

    def _subscribed(self) -> bool:
        # Outside pub/sub mode a list reply is just a reply (an LRANGE may well start with "smessage").
        return bool(self._shard_channels) or bool(self._outstanding and self._outstanding[0].command in _SHARD_COMMANDS)

    def _confirmation(self, kind: str, channel: Optional[str], count: object) -> None:
        head = self._outstanding[0] if self._outstanding else None
        expected = head is not None and head.command == kind.upper() and (
            head.channels is None or (head.confirmed < len(head.channels) and head.channels[head.confirmed] == channel)
        )
        if channel is not None:
            if kind == "ssubscribe":
                self._shard_channels.add(channel)
            else:
                self._shard_channels.discard(channel)
        if not expected or head is None:
            if kind == "sunsubscribe" and channel is not None:
                self._guarded(self.shardChannelUnsubscribed, channel)
            else:
                self._log.warn(
                    "unexpected {kind} confirmation from redis", relay_event="relay_redis_unexpected_confirmation", kind=kind
                )
            return
        head.confirmed += 1
        done = int(count) == 0 if head.channels is None else head.confirmed == len(head.channels)  # type: ignore[call-overload]
        if done:
            self._outstanding.popleft()
            super().replyReceived(int(count))  # type: ignore[call-overload]

    def _guarded(self, callback: Any, *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            self._log.failure("sharded pub/sub callback failed", relay_event="relay_redis_error")


class ClusterCommandProtocol(ClusterCommandsMixin, txredisapi.RedisProtocol):
    """A command connection to one cluster node: every txredisapi command plus SPUBLISH and slot maps."""


class ShardSubscriberProtocol(ShardSubscriberMixin, txredisapi.RedisProtocol):
    """A sharded pub/sub connection to one cluster node (its master or a replica)."""
