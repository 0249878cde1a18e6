"""Connecting the redis backplane: endpoints (TCP, TLS, unix, Sentinel) and self-healing links."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import txredisapi
from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from viewport.failures import describe_failure as describe_any_failure
from viewport.relay.backplane.cluster_protocol import ClusterCommandProtocol, ClusterCommandsMixin, ShardSubscriberMixin
from viewport.relay.backplane.publish_command import publish_on
from viewport.relay.backplane.redis_url import RedisTarget
from viewport.sockets import set_no_delay

def describe_failure(failure: Failure) -> str:
    """A short error text for logs; txredisapi's encoding errors quote the value, so they are not shown."""
    if failure.check(DeferredTimeoutError):
        return "no answer within the command timeout"
    if failure.check(txredisapi.InvalidData):
        return "a value could not be encoded"
    tls = tls_failure_text(failure.value)
    if tls is not None:
        return tls
    return describe_any_failure(failure)


def tls_failure_text(error: BaseException) -> Optional[str]:
    """
    What a failed TLS handshake means (a certificate no trusted CA signed, an expired one, one that does
    not name the host or address connected to), or None for any other error.
    """
    from OpenSSL import SSL
    from service_identity import VerificationError

    if isinstance(error, VerificationError):
        return "TLS certificate does not match the host or address connected to"
    if isinstance(error, SSL.Error):
        entries = error.args[0] if error.args and isinstance(error.args[0], list) else []
        reasons = [str(entry[-1]) for entry in entries if isinstance(entry, tuple) and entry and entry[-1]]
        return "TLS handshake failed: " + ("; ".join(reasons) or type(error).__name__)
    return None


def lost_cause(failure: Failure, proto: Any) -> Failure:
    """
    ``failure`` of a command on ``proto``, unless its connection was lost to a failed TLS handshake: then
    that (txredisapi fails what was pending with a bare "Lost connection", before anyone hears why).
    """
    reason = getattr(proto, "lost_reason", None)
    if isinstance(reason, Failure) and tls_failure_text(reason.value) is not None:
        return reason
    return failure


def backoff_delay(attempt: int, initial_s: float, max_s: float, jitter: float, rand: Callable[[], float]) -> float:
    """Seconds before reconnect ``attempt`` (1-based): ``initial_s`` doubling up to ``max_s``, ±``jitter``."""
    base = min(max_s, initial_s * 2 ** min(max(attempt, 1) - 1, 30))
    return max(0.0, min(max_s, base * (1 + jitter * (2 * rand() - 1))))


class RedisUnavailable(Exception):
    """The connection a command needs is not usable right now (fail fast instead of queueing)."""


class _LinkProtocol(txredisapi.RedisProtocol):
    """A txredisapi protocol that reports to its ``RedisLink`` when it connects, disconnects or hears a message."""

    link: "RedisLink"
    #: Why the connection closed (``lost_cause``), set before pending commands fail.
    lost_reason: Optional[Failure] = None

    def connectionMade(self) -> object:
        """Let txredisapi set up, then start our own setup (AUTH, SELECT, checks)."""
        result = super().connectionMade()
        self.link.connection_made(self)
        return result

    def connectionLost(self, reason: Failure) -> None:
        """Fail pending commands (txredisapi), then tell the link."""
        self.lost_reason = reason
        try:
            super().connectionLost(reason)
        finally:
            self.link.connection_lost(self, reason)

    def publish(self, channel: str, message: str) -> "Deferred[Any]":
        """``PUBLISH``, written at once (``publish_on``); fires with the receiver count."""
        return publish_on(self, b"PUBLISH", channel, message)


class _SubscriberLinkProtocol(_LinkProtocol, txredisapi.SubscriberProtocol):
    """The pub/sub connection: messages go to the link's handler, which never raises."""

    def messageReceived(self, pattern: object, channel: object, message: object) -> None:
        """One pub/sub message."""
        self.link.message_received(channel, message)


def tls_ports(reply: Any) -> Any:
    """
    A ``CLUSTER SHARDS`` reply whose nodes' ``port`` is their ``tls-port`` wherever they have one. A TLS
    cluster that keeps plain ports too reports both, ``port`` being the plain one; the slot map reads
    ``port`` first, and a TLS connection to a plain port fails its handshake.
    """
    if not isinstance(reply, list):
        return reply
    return [_shard_with_tls_ports(shard) for shard in reply]


def _shard_with_tls_ports(shard: Any) -> Any:
    if not isinstance(shard, list):
        return shard
    out = list(shard)
    for index in range(0, len(out) - 1, 2):
        if _key(out[index]) == "nodes" and isinstance(out[index + 1], list):
            out[index + 1] = [_node_with_tls_port(node) for node in out[index + 1]]
    return out


def _node_with_tls_port(node: Any) -> Any:
    if not isinstance(node, list):
        return node
    fields = {_key(key): value for key, value in zip(node[::2], node[1::2])}
    if "tls-port" not in fields:
        return node
    out = list(node)
    for index in range(0, len(out) - 1, 2):
        if _key(out[index]) == "port":
            out[index + 1] = fields["tls-port"]
    return out


def _key(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class ClusterCommandLinkProtocol(ClusterCommandsMixin, _LinkProtocol):
    """A link's command connection to one cluster node: SPUBLISH, slot maps, typed MOVED/ASK."""

    #: The connection is TLS: the slot map names the nodes' TLS ports (``tls_ports``).
    tls = False

    def cluster_shards(self) -> "Deferred[List[Any]]":
        """``CLUSTER SHARDS``, with the TLS ports as ``port`` on a TLS connection."""
        d = super().cluster_shards()
        return d.addCallback(tls_ports) if self.tls else d


class ClusterMapProtocol(ClusterCommandProtocol):
    """A short connection that reads the slot map from a node; remembers why it was lost (``lost_cause``)."""

    lost_reason: Optional[Failure] = None
    #: As ``ClusterCommandLinkProtocol.tls``.
    tls = False

    def cluster_shards(self) -> "Deferred[List[Any]]":
        """``CLUSTER SHARDS``, with the TLS ports as ``port`` on a TLS connection."""
        d = super().cluster_shards()
        return d.addCallback(tls_ports) if self.tls else d

    def connectionLost(self, reason: Failure) -> None:
        """Remember the reason, then fail pending commands (txredisapi)."""
        self.lost_reason = reason
        super().connectionLost(reason)


class ShardSubscriberLinkProtocol(ShardSubscriberMixin, _LinkProtocol):
    """A link's sharded pub/sub connection to one cluster node."""

    def shardMessageReceived(self, channel: str, message: object) -> None:
        """One ``smessage``: to the link's handler."""
        self.link.message_received(channel, message)

    def shardChannelUnsubscribed(self, channel: str) -> None:
        """Redis dropped ``channel`` (its slot moved, the node was demoted): tell the link."""
        self.link.channel_dropped(channel)


class _LinkFactory(Factory):
    """Builds protocols of one link, scheduling txredisapi's timers on our reactor."""

    noisy = False

    def __init__(self, link: "RedisLink", protocol_class: type, reactor: Any) -> None:
        self._link = link
        self._protocol_class = protocol_class
        self._reactor = reactor

    def buildProtocol(self, addr: object) -> Any:
        """A protocol without txredisapi's own AUTH/SELECT (the link does them, with timeouts)."""
        proto = self._protocol_class(charset="utf-8", convertNumbers=False)
        proto.factory = self
        proto.link = self._link
        proto.callLater = self._reactor.callLater
        proto.tls = self._link.tls
        return proto


class _CommandWatch:
    """
    The command timeout of one connection, with one timer instead of one per command.

    Redis answers a connection's commands in order, so the oldest command still waiting is the first
    to run out of time: one timer, set for the oldest's deadline, is moved on when it fires early (the
    oldest was answered meanwhile) and otherwise fails every waiting command with ``TimeoutError`` and
    aborts the connection (a server that stopped answering is as good as gone), as a ``READONLY``
    answer does (Sentinel demoted our server: reconnecting asks for the new master). Every command
    thus has its own deadline, however many answers come before it: a publish reported failed after
    the timeout is the one whose deliver-by deadline a receiver enforces. Per frame this is one
    callback instead of ``addTimeout``'s timer, canceller and two callbacks.
    """

    def __init__(self, reactor: Any, timeout_s: float, abort: Callable[[], None]) -> None:
        self._reactor = reactor
        self._timeout_s = timeout_s
        self._abort = abort
        #: Waiting commands, oldest first, with when each was sent.
        self._waiting: "dict[Deferred[Any], float]" = {}
        self._timer: Any = None
        self._timed_out = False

    def watch(self, d: "Deferred[Any]") -> "Deferred[Any]":
        """Time ``d`` out ``timeout_s`` after now (with the others of this connection); returns ``d``."""
        if d.called:
            return d.addErrback(self._failed)
        self._waiting[d] = self._reactor.seconds()
        if self._timer is None:
            # Otherwise a timer is set for an older command's deadline, which comes first.
            self._timer = self._reactor.callLater(self._timeout_s, self._check)
        return d.addBoth(self._settled, d)

    def _settled(self, result: Any, d: "Deferred[Any]") -> Any:
        self._waiting.pop(d, None)
        if isinstance(result, Failure):
            return self._failed(result)
        return result

    def _failed(self, failure: Failure) -> Failure:
        if self._timed_out and failure.check(CancelledError):
            return Failure(DeferredTimeoutError(self._timeout_s, "redis command"))
        if failure.check(txredisapi.ResponseError) and str(failure.value).startswith("READONLY"):
            self._abort()
        return failure

    def _check(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        oldest_sent_at = next(iter(self._waiting.values()))
        left = oldest_sent_at + self._timeout_s - self._reactor.seconds()
        if left > 0:
            self._timer = self._reactor.callLater(left, self._check)
            return
        self._timed_out = True
        waiting, self._waiting = list(self._waiting), {}
        for d in waiting:
            d.cancel()
        self._abort()


class RedisLink:
    """
    One Redis connection kept open by a ``ClientService``; ``protocol`` is set only while usable.

    A connection is usable once its setup (AUTH, SELECT, PING, Sentinel role check) succeeded. Commands go
    through ``call``, which fails at once while there is no usable connection and times out
    otherwise; a timeout aborts the connection, since a server that stopped answering is as good
    as gone (and a half-open TCP connection would otherwise hang forever).
    """

    _log = Logger()

    def __init__(
        self,
        name: str,
        target: RedisTarget,
        endpoint: Any,
        reactor: Any,
        timeout_s: float,
        retry_delay: Callable[[int], float],
        on_up: Callable[["RedisLink"], None],
        on_down: Callable[["RedisLink"], None],
        on_message: Optional[Callable[[object, object], None]] = None,
        protocol_class: Optional[type] = None,
        on_dropped: Optional[Callable[[str], None]] = None,
    ) -> None:
        """
        A pub/sub connection when ``on_message`` is given (called per message), else a command one;
        ``protocol_class`` replaces the protocol (the cluster's), ``on_dropped`` hears of a channel Redis unsubscribed.
        """
        self.name = name
        #: Its connections are TLS (``rediss://``, ``rediss+cluster://``).
        self.tls = target.tls
        self.protocol: Optional[Any] = None
        self._reactor = reactor
        self._timeout_s = timeout_s
        self._retry_delay = retry_delay
        self._target = target
        self._on_up = on_up
        self._on_down = on_down
        self._on_message = on_message
        self._on_dropped = on_dropped
        self._rejected = 0
        self._stopping = False
        self._service = ClientService(
            endpoint,
            _LinkFactory(self, protocol_class or (_LinkProtocol if on_message is None else _SubscriberLinkProtocol), reactor),
            retryPolicy=self._retry,
            clock=reactor,
        )

    def start(self) -> None:
        """Begin connecting (and reconnecting until stopped)."""
        self._service.startService()

    def stop(self) -> "Deferred[None]":
        """Stop reconnecting and close the connection; fires once it is closed."""
        self._stopping = True
        self.protocol = None
        return self._service.stopService()

    def call(self, method: str, *args: Any) -> "Deferred[Any]":
        """Run one txredisapi command on the usable connection, with the command timeout."""
        proto = self.protocol
        if proto is None:
            return fail(RedisUnavailable(self.name))
        return self.call_on(proto, method, *args)

    def call_on(self, proto: Any, method: str, *args: Any) -> "Deferred[Any]":
        """Like ``call`` on a given connection (used during setup, before it is usable)."""
        try:
            d: Deferred[Any] = getattr(proto, method)(*args)
        except Exception:
            return fail()
        watch: Optional[_CommandWatch] = getattr(proto, "command_watch", None)
        if watch is None:
            watch = proto.command_watch = _CommandWatch(self._reactor, self._timeout_s, lambda: self._abort(proto))
        return watch.watch(d)

    def _abort(self, proto: Any) -> None:
        transport = proto.transport
        if transport is not None and proto.connected and not getattr(proto, "aborted", False):
            proto.aborted = True
            transport.abortConnection()

    def _retry(self, attempt: int) -> float:
        # ClientService forgets failures once TCP connects; a server that accepts connections
        # but fails setup (wrong password, stopped process, a replica) must still back off.
        return self._retry_delay(max(attempt, self._rejected))

    def connection_made(self, proto: Any) -> None:
        """A TCP (or Unix) connection is up: run setup before anyone may use it."""
        transport = proto.transport
        if hasattr(transport, "setTcpKeepAlive"):
            transport.setTcpKeepAlive(1)
        set_no_delay(transport)
        d = ensureDeferred(self._setup(proto))
        d.addCallbacks(self._ready, self._refused, callbackArgs=(proto,), errbackArgs=(proto,))

    async def _setup(self, proto: Any) -> None:
        target = self._target
        if target.password is not None:
            await self.call_on(proto, "auth", target.password, target.username)
        if target.db is not None and self._on_message is None:
            await self.call_on(proto, "select", target.db)
        await self.call_on(proto, "ping")
        if target.scheme == "redis+sentinel":
            role = await self.call_on(proto, "role")
            if not isinstance(role, list) or not role or role[0] != "master":
                raise RedisUnavailable("the server Sentinel named is not a master")

    def _ready(self, _: object, proto: Any) -> None:
        if self._stopping or not proto.connected:
            return
        self._rejected = 0
        self.protocol = proto
        try:
            self._on_up(self)
        except Exception:
            self._log.failure("redis link setup failed", relay_event="relay_redis_error", channel=self.name)

    def _refused(self, failure: Failure, proto: Any) -> None:
        if self._stopping:
            return
        self._rejected += 1
        self._log.warn(
            "redis {channel} connection refused: {error}",
            relay_event="relay_redis_error",
            channel=self.name,
            error=describe_failure(lost_cause(failure, proto)),
        )
        self._abort(proto)

    def connection_lost(self, proto: Any, reason: Failure) -> None:
        """The connection closed: stop using it (ClientService reconnects)."""
        if self.protocol is not proto:
            return
        self.protocol = None
        if self._stopping:
            return
        self._log.warn(
            "redis {channel} connection lost: {error}",
            relay_event="relay_redis_error",
            channel=self.name,
            error=describe_failure(reason),
        )
        try:
            self._on_down(self)
        except Exception:
            self._log.failure("redis link teardown failed", relay_event="relay_redis_error", channel=self.name)

    def message_received(self, channel: object, message: object) -> None:
        """Hand one pub/sub message to the backplane (which never raises)."""
        if self._on_message is not None and not self._stopping:
            self._on_message(channel, message)

    def channel_dropped(self, channel: str) -> None:
        """Redis ended the subscription to ``channel`` by itself (a cluster slot moved)."""
        if self._on_dropped is not None and not self._stopping:
            self._on_dropped(channel)


@implementer(IStreamClientEndpoint)
class _SentinelMasterEndpoint:
    """Asks the Sentinels (txredisapi ``Sentinel``) for the current master before every connection."""

    def __init__(self, reactor: Any, sentinels: Tuple[Tuple[str, int], ...], service: str, timeout_s: float) -> None:
        self._reactor = reactor
        self._sentinels = sentinels
        self._service = service
        self._timeout_s = timeout_s
        self._manager: Optional[Any] = None

    def connect(self, protocolFactory: Any) -> "Deferred[Any]":
        """Discover the master, then connect to it."""
        if self._manager is None:
            self._manager = txredisapi.Sentinel(list(self._sentinels))
            self._manager.discovery_timeout = self._timeout_s
        d: Deferred[Any] = self._manager.discover_master(self._service)

        def connect_master(address: Tuple[str, int]) -> "Deferred[Any]":
            host, port = address
            return HostnameEndpoint(self._reactor, host, port, timeout=self._timeout_s).connect(protocolFactory)

        return d.addCallback(connect_master)

    def close(self) -> "Deferred[Any]":
        """Close the connections to the Sentinels."""
        manager, self._manager = self._manager, None
        if manager is None:
            return succeed(None)
        result: Deferred[Any] = manager.disconnect()
        return result


def redis_endpoint(target: RedisTarget, reactor: Any, timeout_s: float) -> Any:
    """The client endpoint for ``target``; Sentinel endpoints also have a ``close()``."""
    if target.scheme == "unix":
        assert target.path is not None
        return UNIXClientEndpoint(reactor, target.path, timeout=timeout_s)
    if target.scheme == "redis+sentinel":
        assert target.service is not None
        return _SentinelMasterEndpoint(reactor, target.sentinels, target.service, timeout_s)
    assert target.host is not None
    return node_endpoint(target.host, target.port, target.tls, reactor, timeout_s)


def node_endpoint(host: str, port: int, tls: bool, reactor: Any, timeout_s: float) -> Any:
    """A TCP client endpoint to one Redis server, TLS-wrapped (verifying ``host``) when ``tls``."""
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout_s)
    if tls:
        from twisted.internet.ssl import optionsForClientTLS

        return wrapClientTLS(optionsForClientTLS(host), endpoint)
    return endpoint
