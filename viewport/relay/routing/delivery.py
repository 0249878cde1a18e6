"""Delivering frames: to a daemon, to the owner of a request or session (here or on another relay), to subscribers."""

from __future__ import annotations

from typing import Optional


from viewport.relay import frames
from viewport.relay.interfaces import BusFrame, IBackplane
from viewport.relay.metrics import EventCount, RelayMetrics
from viewport.relay.registry import Connection, Owner, ScopeState
from viewport.relay.routing.events import RoutingLog
from viewport.relay.routing.remote_path import RemotePath


class Delivery:
    """Every way a frame leaves the router, so that each is written once."""

    def __init__(
        self, *, backplane: IBackplane, metrics: RelayMetrics, events: RoutingLog, remote_path: RemotePath, relay_id: str
    ) -> None:
        self._backplane = backplane
        self._m = metrics
        self._events = events
        self._remote_path = remote_path
        self._relay_id = relay_id

    def to_daemon(self, daemon: Connection, payload: bytes) -> None:
        """A client's frame to the scope's local daemon, unchanged, counted."""
        daemon.peer.send_payload(payload)
        self._m.relay_frames_client_to_daemon.inc()
        self._m.relay_bytes_client_to_daemon.inc(len(payload))

    def to_owner(
        self, scope: ScopeState, owner: Owner, payload: bytes, now_ms: float, routed_local: EventCount, routed_bus: EventCount
    ) -> bool:
        """
        A daemon frame to whoever owns its request or session: an open local client, or another
        relay over the bus (targeted at it, and owed a notice if the publish fails). False when
        the owner cannot be reached (the caller counts the drop).
        """
        target = owner.connection
        if target is not None:
            if target.peer.can_send():
                target.peer.send_payload(payload)
                routed_local.inc()
                return True
            return False
        if owner.source_relay_id is not None and scope.runtime_target_id is not None:
            self.publish_to_clients(scope, owner.source_relay_id, payload, lost_at_ms=now_ms)
            routed_bus.inc()
            return True
        return False

    def to_subscribers(self, scope: ScopeState, channel: str, payload: bytes, exclude: Optional[Connection] = None) -> int:
        """A channel's frame to every open local subscriber but ``exclude``; how many got it."""
        delivered = 0
        for member in scope.subscribers.get(channel, ()):
            if member is not exclude and member.peer.can_send():
                member.peer.send_payload(payload)
                delivered += 1
        return delivered

    def to_clients(self, scope: ScopeState, text: str) -> int:
        """A relay-originated frame to every open local client of the scope; how many got it."""
        sent = 0
        for client in scope.clients:
            if client.peer.can_send():
                client.peer.send_text(text)
                sent += 1
        return sent

    def publish_to_clients(
        self, scope: ScopeState, target_relay_id: Optional[str], payload: bytes, lost_at_ms: Optional[float] = None
    ) -> None:
        """
        Publish a daemon→clients frame (to one relay, or to every relay with ``None``). With
        ``lost_at_ms`` (frames owned by another relay's client, and the daemon-gone notice) a
        failed publish is counted as a lost frame and the clients it was for are owed a
        ``DAEMON_UNAVAILABLE`` once the path works again.
        """
        assert scope.runtime_target_id is not None
        frame = BusFrame(
            workspace_id=scope.workspace_id,
            runtime_target_id=scope.runtime_target_id,
            source_relay_id=self._relay_id,
            target_relay_id=target_relay_id,
            direction="daemon_to_clients",
            payload=payload.decode("utf-8"),
        )
        d = self._backplane.publish(frame)
        if lost_at_ms is not None:

            def published(ok: bool) -> None:
                if not ok:
                    self._remote_path.publish_failed(scope, target_relay_id, lost_at_ms)

            d.addCallback(published)
        d.addErrback(self._events.failure, "relay_bus_publish_error")

    def daemon_unavailable(self, conn: Connection) -> None:
        """No daemon can take a client's frame: count, warn, and say so to the client (retryable)."""
        self._m.relay_client_messages_dropped.inc()
        self._events.warn(
            "client_message_dropped", workspaceId=conn.workspace_id, clientId=conn.client_id, reason="daemon_unavailable"
        )
        conn.peer.send_text(frames.daemon_unavailable(conn.workspace_id, conn.runtime_target_id, conn.machine_id))
