"""Connections to a Redis Cluster: the slot map, a command and a sharded-subscriber link per master, routing by slot."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Dict, List, Optional, Set

from twisted.internet.defer import Deferred, ensureDeferred, fail, gatherResults, succeed
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from viewport.relay.backplane.cluster_protocol import ClusterRedirectError, MovedError
from viewport.relay.backplane.cluster_slots import Address, Redirect, SlotMap, key_slot
from viewport.relay.backplane.redis_connection import (
    ClusterCommandLinkProtocol,
    ClusterMapProtocol,
    RedisLink,
    RedisUnavailable,
    ShardSubscriberLinkProtocol,
    describe_failure,
    lost_cause,
    node_endpoint,
)
from viewport.relay.backplane.redis_url import RedisTarget

#: A redirected command is followed this many times at most (a slot bouncing between nodes is a fault).
MAX_REDIRECTS = 3
#: While something is broken the slot map is read again this often (a killed master's replica takes seconds).
BROKEN_REFRESH_S = 0.25
#: A publish that reached nobody reads the slot map again, at most this often (a demoted master counts 0).
NOBODY_REFRESH_S = 1.0


@lru_cache(maxsize=65536)
def _slot(key: str) -> int:
    """``key_slot``, remembered: CRC16 in Python costs several µs, and a scope's names recur with every frame."""
    return key_slot(key)


def _name(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


class ClusterLinks:
    """
    What the redis backplane needs from a Redis Cluster: commands routed to the master of their key's
    slot, and shard channels subscribed on the master of theirs.

    One command link and one shard-subscriber link (``RedisLink``) are kept per master of the slot map.
    The map is read (CLUSTER SHARDS, or SLOTS) from a reachable node, the one that just spoke first: at
    start, after a MOVED, when a link is lost, when Redis drops a subscription (a slot moved, a master
    was demoted), when a publish reached nobody, and periodically (every ``BROKEN_REFRESH_S`` while
    something is broken). Links to nodes that stopped being masters are closed; channels are moved to
    their slot's master. Subscribers sit on masters because SPUBLISH counts only the receivers on the
    node it ran on. ``healthy`` holds while the map covers every slot, every master's two links are up
    and every watched channel is confirmed on its master; ``on_change`` is called when it may have changed.
    """

    _log = Logger()

    def __init__(
        self,
        target: RedisTarget,
        reactor: Any,
        *,
        timeout_s: float,
        connect_timeout_s: float,
        retry_delay: Callable[[int], float],
        refresh_s: float,
        on_commands_up: Callable[[RedisLink], None],
        on_message: Callable[[object, object], None],
        on_change: Callable[[], None],
        track: Callable[["Deferred[bool]"], "Deferred[bool]"],
    ) -> None:
        """Nothing connects before ``start``; ``track`` counts a subscription until it is answered."""
        self._target = target
        self._reactor = reactor
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._retry_delay = retry_delay
        self._refresh_s = refresh_s
        self._on_commands_up = on_commands_up
        self._on_message = on_message
        self._on_change = on_change
        self._track = track
        self.map: Optional[SlotMap] = None
        self._commands: Dict[Address, RedisLink] = {}
        self._subscribers: Dict[Address, RedisLink] = {}
        self._wanted: Set[str] = set()
        #: channel -> the master that confirmed its SSUBSCRIBE; ``_missing``: wanted channels that were
        #: placed and lost (a new watch on its way is not a gap, as for SUBSCRIBE on one Redis).
        self._placed: Dict[str, Address] = {}
        self._missing: Set[str] = set()
        #: channel -> the connection its SSUBSCRIBE is on its way over.
        self._placing: Dict[str, Any] = {}
        #: Masters that dropped our subscriptions: no command goes there until a map read names them master
        #: again (a demoted master still takes SPUBLISH, counts 0 and relays it: a frame told lost, then delivered).
        self._suspect: Set[Address] = set()
        self._running = False
        self._timer: Optional[IDelayedCall] = None
        self._refreshing = False
        self._again: Optional[str] = None
        self._last_refresh = float("-inf")
        self._map_failing = False

    # -- life cycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Read the slot map from the seeds, then connect to every master."""
        self._running = True
        self.request_refresh("start")

    def stop(self) -> "Deferred[Any]":
        """Stop refreshing and close every link; fires once all are closed."""
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        links = list(self._commands.values()) + list(self._subscribers.values())
        self._commands.clear()
        self._subscribers.clear()
        return gatherResults([link.stop() for link in links], consumeErrors=True)

    @property
    def healthy(self) -> bool:
        """Every slot served, every master's links up, every watched channel confirmed on its master."""
        slots = self.map
        if slots is None or not slots.complete or self._missing or self._suspect:
            return False
        for address in slots.masters():
            command, subscriber = self._commands.get(address), self._subscribers.get(address)
            if command is None or command.protocol is None or subscriber is None or subscriber.protocol is None:
                return False
        return True

    # -- commands -----------------------------------------------------------------------------------

    def _master_of(self, key: str) -> Optional[Address]:
        return None if self.map is None else self.map.master_for(_slot(key))

    def _command_link(self, key: str) -> Optional[RedisLink]:
        address = self._master_of(key)
        return None if address is None or address in self._suspect else self._commands.get(address)

    def usable(self, key: str) -> bool:
        """The link to the master of ``key``'s slot is up (and that master did not just drop our subscriptions)."""
        link = self._command_link(key)
        return link is not None and link.protocol is not None

    def call(self, key: str, method: str, *args: Any) -> "Deferred[Any]":
        """Run a txredisapi command on the master of ``key``'s slot, following MOVED and ASK."""
        return self._call(key, method, args, MAX_REDIRECTS)

    def _call(self, key: str, method: str, args: Any, redirects: int) -> "Deferred[Any]":
        link = self._command_link(key)
        if link is None:
            return fail(RedisUnavailable(f"no usable master serves the slot of a {method} command"))
        d = link.call(method, *args)
        return d.addErrback(self._redirected, key, method, args, redirects)

    def _redirected(self, failure: Failure, key: str, method: str, args: Any, redirects: int) -> Any:
        error = failure.value
        if redirects <= 0 or not isinstance(error, ClusterRedirectError):
            return failure
        redirect: Redirect = error.redirect
        if isinstance(error, MovedError):
            self._moved(redirect)
            return self._call(key, method, args, redirects - 1)
        # ASK: this one command goes to the importing node, after ASKING on the same connection.
        link = self._commands.get(redirect.address)
        proto = link.protocol if link is not None else None
        if link is None or proto is None:
            return failure
        link.call_on(proto, "execute_command", "ASKING").addErrback(lambda _: None)
        return link.call_on(proto, method, *args).addErrback(self._redirected, key, method, args, redirects - 1)

    def _moved(self, redirect: Redirect) -> None:
        """A MOVED: patch the map at once (so the retry goes there) and read the whole map soon."""
        if self.map is not None and self.map.master_for(redirect.slot) != redirect.address:
            self._apply(self.map.moved(redirect))
        self.request_refresh("moved")

    def publish(self, channel: str, envelope: str) -> "Deferred[Any]":
        """SPUBLISH on the channel's master; fires with the receiver count there."""

        def counted(receivers: object) -> object:
            if receivers == 0 and self._reactor.seconds() - self._last_refresh >= NOBODY_REFRESH_S:
                self.request_refresh("publish reached nobody")
            return receivers

        return self.call(channel, "spublish", channel, envelope).addCallback(counted)

    # -- shard channels -----------------------------------------------------------------------------

    def watch(self, channel: str) -> None:
        """Keep ``channel`` subscribed on its slot's master (from now, and after every change)."""
        self._wanted.add(channel)
        self._place(channel)

    def unwatch(self, channel: str) -> "Deferred[Any]":
        """Stop wanting ``channel``: SUNSUBSCRIBE where it is placed. Never fails."""
        self._wanted.discard(channel)
        self._missing.discard(channel)
        address = self._placed.pop(channel, None)
        self._on_change()
        return self._drop(address, channel)

    def _drop(self, address: Optional[Address], channel: str) -> "Deferred[Any]":
        link = self._subscribers.get(address) if address is not None else None
        if link is None or link.protocol is None:
            return succeed(None)
        return self._track(link.call("sunsubscribe", [channel]).addCallbacks(lambda _: True, lambda _: False))

    def _place(self, channel: str) -> None:
        if not self._running or channel not in self._wanted:
            return
        address = self._master_of(channel)
        placed = self._placed.get(channel)
        if placed is not None and placed == address:
            return
        if placed is not None:
            # Its slot moved: frames published at the new master miss us until it is confirmed there.
            del self._placed[channel]
            self._missing.add(channel)
            self._drop(placed, channel)
        link = self._subscribers.get(address) if address is not None else None
        if channel in self._placing or link is None or link.protocol is None:
            return  # placed when the answer in flight arrives, or once the link is up
        proto = link.protocol
        self._placing[channel] = proto
        d: Deferred[bool] = link.call("ssubscribe", [channel]).addCallbacks(
            self._confirmed, self._refused, callbackArgs=(channel, address, proto), errbackArgs=(channel, proto)
        )
        self._track(d)

    def _settled(self, channel: str, proto: Any) -> None:
        if self._placing.get(channel) is proto:
            del self._placing[channel]

    def _confirmed(self, _: object, channel: str, address: Address, proto: Any) -> bool:
        self._settled(channel, proto)
        link = self._subscribers.get(address)
        current = link is not None and link.protocol is proto
        if current and channel in self._wanted and self._master_of(channel) == address:
            self._placed[channel] = address
            self._missing.discard(channel)
            if not self._missing:
                self._on_change()
            return True
        if current:
            self._drop(address, channel)  # unwatched, or its slot moved, while the SSUBSCRIBE was on its way
        self._place(channel)
        return True

    def _refused(self, failure: Failure, channel: str, proto: Any) -> bool:
        self._settled(channel, proto)
        error = failure.value
        if isinstance(error, MovedError):
            self._moved(error.redirect)
        elif proto.connected:  # a lost connection is handled (and logged) once, by the link
            self._log.warn("redis cluster ssubscribe failed: {error}", relay_event="relay_redis_error",
                           channel="subscriber", error=describe_failure(failure))
            self.request_refresh("ssubscribe failed", delay=BROKEN_REFRESH_S)
        return False

    def _channel_dropped(self, address: Address, channel: str) -> None:
        """Redis unsubscribed ``channel`` by itself: frames may be missed until it is placed again."""
        if self._placed.get(channel) == address:
            del self._placed[channel]
        if channel in self._wanted:
            self._missing.add(channel)
        self._suspect.add(address)
        self._on_change()
        # The node that dropped it knows why (it was demoted, or the slot moved): ask it first.
        self.request_refresh("subscription dropped", prefer=address)

    # -- links --------------------------------------------------------------------------------------

    def _link(self, address: Address, subscriber: bool) -> RedisLink:
        endpoint = node_endpoint(address[0], address[1], self._target.tls, self._reactor, self._connect_timeout_s)

        def down(link: RedisLink) -> None:
            self._link_down(address, link)

        if subscriber:
            return RedisLink(
                f"subscriber {_name(address)}", self._target, endpoint, self._reactor, self._timeout_s,
                self._retry_delay, lambda link: self._subscriber_up(address, link), down, self._on_message,
                ShardSubscriberLinkProtocol, lambda channel: self._channel_dropped(address, channel),
            )
        return RedisLink(
            f"command {_name(address)}", self._target, endpoint, self._reactor, self._timeout_s, self._retry_delay,
            self._command_up, down, protocol_class=ClusterCommandLinkProtocol,
        )

    def _command_up(self, link: RedisLink) -> None:
        self._on_commands_up(link)
        self._on_change()

    def _subscriber_up(self, address: Address, link: RedisLink) -> None:
        if self._subscribers.get(address) is not link:
            return
        for channel in sorted(self._wanted):
            if self._master_of(channel) == address:
                self._place(channel)
        self._on_change()

    def _link_down(self, address: Address, link: RedisLink) -> None:
        if self._subscribers.get(address) is link:
            for channel, placed in list(self._placed.items()):
                if placed == address:
                    del self._placed[channel]
                    self._missing.add(channel)
        self._on_change()
        self.request_refresh("connection lost")

    def _apply(self, slots: SlotMap) -> None:
        """Use ``slots``: links to new masters, none to former ones, every channel on its master."""
        self.map = slots
        masters = set(slots.masters())
        stale = [address for address in self._commands if address not in masters]
        self._suspect.intersection_update(masters)
        for address in stale:
            for links in (self._commands, self._subscribers):
                link = links.pop(address)
                link.stop().addErrback(lambda _: None)
        for channel, placed in list(self._placed.items()):
            if placed in stale:
                del self._placed[channel]
                if channel in self._wanted:
                    self._missing.add(channel)
        for address in sorted(masters - set(self._commands)):
            self._commands[address] = self._link(address, subscriber=False)
            self._subscribers[address] = self._link(address, subscriber=True)
            self._commands[address].start()
            self._subscribers[address].start()
        for channel in sorted(self._wanted):
            self._place(channel)
        self._on_change()

    def ping_subscribers(self) -> None:
        """PING every subscriber link (a stalled node is noticed within the command timeout)."""
        for link in list(self._subscribers.values()):
            if link.protocol is not None:
                link.call("ping").addErrback(lambda _: None)

    # -- the slot map -------------------------------------------------------------------------------

    def request_refresh(self, reason: str, prefer: Optional[Address] = None, delay: float = 0.0) -> None:
        """Read the slot map in ``delay`` seconds (or sooner if already due); requests coalesce."""
        if not self._running:
            return
        if self._refreshing:
            self._again = self._again or reason
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self._reactor.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self._reactor.callLater(delay, self._refresh, reason, prefer)

    def _refresh(self, reason: str, prefer: Optional[Address]) -> None:
        self._timer = None
        self._refreshing = True
        self._last_refresh = self._reactor.seconds()
        d = ensureDeferred(self._read_map(prefer))
        d.addCallbacks(self._read, self._unreadable, callbackArgs=(reason,))
        d.addBoth(self._refreshed)

    def _read(self, slots: SlotMap, reason: str) -> None:
        if not self._running:
            return
        changed = self.map is None or self.map.shards != slots.shards
        if self._map_failing or changed:
            self._log.info("redis cluster slot map read ({reason}): {masters} masters, complete: {complete}",
                           relay_event="relay_redis_cluster_map", reason=reason,
                           masters=len(slots.masters()), complete=slots.complete)
        self._map_failing = False
        self._suspect.difference_update(slots.masters())
        self._apply(slots)

    def _unreadable(self, failure: Failure) -> None:
        if self._running and not self._map_failing:
            self._map_failing = True
            self._log.warn("redis cluster slot map unavailable: {error}", relay_event="relay_redis_error",
                           channel="cluster", error=describe_failure(failure))

    def _refreshed(self, _: object) -> None:
        self._refreshing = False
        again, self._again = self._again, None
        if again is not None:
            self.request_refresh(again)
        else:
            self.request_refresh("periodic", delay=self._refresh_s if self.healthy else BROKEN_REFRESH_S)

    async def _read_map(self, prefer: Optional[Address]) -> SlotMap:
        """The map from the first node that answers: ``prefer``, connected masters, other known nodes, seeds."""
        candidates: List[Address] = [prefer] if prefer is not None else []
        candidates += [address for address, link in self._commands.items() if link.protocol is not None]
        if self.map is not None:
            for shard in self.map.shards:
                candidates += [node.address for node in ((shard.master,) if shard.master else ()) + shard.replicas]
        candidates += list(self._target.seeds)
        error: Optional[BaseException] = None
        for address in dict.fromkeys(candidates):
            try:
                return await self._map_from(address)
            except Exception as failed:
                error = failed
        raise error if error is not None else RedisUnavailable("no cluster node known")

    async def _map_from(self, address: Address) -> SlotMap:
        link = self._commands.get(address)
        if link is not None and link.protocol is not None:
            slots: SlotMap = await link.call("slot_map")
            return slots
        # A node we keep no link to (a seed, a replica): one short connection.
        proto = ClusterMapProtocol(charset="utf-8", convertNumbers=False)
        proto.callLater = self._reactor.callLater
        proto.tls = self._target.tls
        endpoint = node_endpoint(address[0], address[1], self._target.tls, self._reactor, self._connect_timeout_s)
        await connectProtocol(endpoint, proto)
        try:
            if self._target.password is not None:
                await proto.auth(self._target.password, self._target.username).addTimeout(
                    self._timeout_s, self._reactor)
            slots = await proto.slot_map().addTimeout(self._timeout_s, self._reactor)
            return slots
        except Exception:
            # The TLS handshake runs under the first command: say why it failed, not just "Lost connection".
            cause = lost_cause(Failure(), proto)
            if cause is proto.lost_reason:
                raise RedisUnavailable(f"{_name(address)}: {describe_failure(cause)}") from None
            raise
        finally:
            if proto.transport is not None:
                proto.transport.abortConnection()
