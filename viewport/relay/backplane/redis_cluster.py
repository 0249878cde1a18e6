"""The ``redis`` backplane on a Redis Cluster: sharded pub/sub and presence keys, one hash tag per scope."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred
from zope.interface import implementer

from viewport.relay.backplane.cluster_links import ClusterLinks
from viewport.relay.backplane.redis import RedisBackplane
from viewport.relay.interfaces import IBackplane, Side


def scope_tag(workspace_id: str, runtime_target_id: Optional[str]) -> str:
    """
    The hash tag of a scope, ``{<len>:<workspace>:<target>}``: its channels and its presence key hash to
    one slot, so they live on one shard. (An id holding ``}`` ends the tag early, but alike for all of them.)
    """
    return f"{{{len(workspace_id)}:{workspace_id}:{runtime_target_id or ''}}}"


def cluster_bus_channel(prefix: str, side: Side, workspace_id: str, runtime_target_id: Optional[str]) -> str:
    """The shard channel of one side of a scope."""
    return f"{prefix}:bus:{side}:{scope_tag(workspace_id, runtime_target_id)}"


def cluster_presence_key(prefix: str, workspace_id: str, runtime_target_id: Optional[str]) -> str:
    """The key holding the presence of one scope's daemon, on the shard of the scope's channels."""
    return f"{prefix}:presence:{scope_tag(workspace_id, runtime_target_id)}"


@implementer(IBackplane)
class RedisClusterBackplane(RedisBackplane):
    """
    The redis backplane (``RedisBackplane``: signed envelopes, presence with a TTL, liveness records) on
    a Redis Cluster (``redis+cluster://`` seeds), through ``ClusterLinks``.

    Frames travel with SPUBLISH/SSUBSCRIBE, which keep a channel's traffic on the shard owning its slot
    (classic PUBLISH is broadcast to every node). SPUBLISH's receiver count keeps the "nobody received
    it" rule. Every command goes to the master of its key's slot; the compare-and-delete script runs there.

    When Redis drops a subscription (a slot moved, a master was demoted or killed), ``healthy`` turns
    False, so ``path_changed(False)`` tells the clients as for a lost subscription on one Redis, until
    every watched channel is confirmed on its new master; presences are re-announced when a master's
    connection comes up.
    """

    def __init__(self, *, slot_refresh_ms: int = 10000, **options: Any) -> None:
        """``options`` are ``RedisBackplane``'s; ``slot_refresh_ms`` is the period of slot map reads when all is well."""
        if slot_refresh_ms <= 0:
            raise ValueError("slot_refresh_ms must be positive")
        self._slot_refresh_s = slot_refresh_ms / 1000.0
        prefix = options.get("key_prefix", "")
        if "{" in prefix or "}" in prefix:
            raise ValueError("key_prefix must not contain braces: they would be the hash tag of every key")
        super().__init__(**options)

    def _connect(self, timeout_s: float) -> None:
        if not self._target.cluster:
            raise ValueError("RedisClusterBackplane needs a redis+cluster:// or rediss+cluster:// URL")
        self._links = ClusterLinks(
            self._target,
            self._reactor,
            timeout_s=timeout_s,
            connect_timeout_s=self._connect_timeout_s,
            retry_delay=self._retry_delay,
            refresh_s=self._slot_refresh_s,
            on_commands_up=self._commands_up,
            on_message=self._on_message,
            on_change=self._update_health,
            track=self._track,
        )

    def _start_connections(self) -> None:
        self._links.start()

    def _disconnect(self) -> "Deferred[Any]":
        return self._links.stop()

    def _usable(self, key: str) -> bool:
        return self._links.usable(key)

    def _call(self, key: str, method: str, *args: Any) -> "Deferred[Any]":
        return self._links.call(key, method, *args)

    def _publish_on(self, channel: str, envelope: str) -> "Deferred[Any]":
        return self._links.publish(channel, envelope)

    def _subscribe(self, channel: str) -> None:
        self._links.watch(channel)

    def _unsubscribe(self, channel: str) -> "Deferred[Any]":
        return self._links.unwatch(channel)

    def _connections_healthy(self) -> bool:
        return self._links.healthy

    def _ping_listeners(self) -> None:
        self._links.ping_subscribers()

    def _channel(self, side: Side, workspace_id: str, runtime_target_id: Optional[str]) -> str:
        return cluster_bus_channel(self._prefix, side, workspace_id, runtime_target_id)

    def _presence_key(self, workspace_id: str, runtime_target_id: Optional[str]) -> str:
        return cluster_presence_key(self._prefix, workspace_id, runtime_target_id)
