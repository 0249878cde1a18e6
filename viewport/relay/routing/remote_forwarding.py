"""Client frames whose daemon is not on this relay: presence lookup, redirect, bus forwarding."""

from __future__ import annotations

from collections import deque
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from viewport.relay import frames
from viewport.relay.config import RelayConfig
from viewport.relay.interfaces import BusFrame, IBackplane, Presence
from viewport.relay.metrics import RelayMetrics
from viewport.relay.redirects import redirect_url_allowed
from viewport.relay.registry import Connection
from viewport.relay.routing.delivery import Delivery
from viewport.relay.routing.events import Refusals, RoutingLog


class RemoteForwarding:
    """Sends a client's frames to the relay holding its daemon, in order, and tells clients about redirects."""

    def __init__(
        self,
        *,
        config: RelayConfig,
        backplane: IBackplane,
        metrics: RelayMetrics,
        events: RoutingLog,
        refusals: Refusals,
        delivery: Delivery,
        relay_id: str,
    ) -> None:
        self._config = config
        self._backplane = backplane
        self._m = metrics
        self._events = events
        self._refusals = refusals
        self._delivery = delivery
        self._relay_id = relay_id

    def no_local_daemon(self, conn: Connection, payload: bytes) -> None:
        """docs/protocol.md §4.4 step 10: look for the daemon on another relay, else say it is unavailable."""
        if conn.runtime_target_id is None:
            self._refusals.refuse(
                conn, self._m.relay_client_messages_dropped, event="client_message_dropped",
                reply=frames.runtime_target_required(conn.workspace_id), workspaceId=conn.workspace_id,
                clientId=conn.client_id, reason="missing_runtime_target",
            )
            return
        if not self._backplane.cross_relay:
            self._delivery.daemon_unavailable(conn)
            return
        if conn.bus_queue is not None:
            self.queue_behind_remote(conn, payload)
            return
        conn.bus_queue = deque()
        self._route_next(conn, payload)

    def queue_behind_remote(self, conn: Connection, payload: bytes) -> None:
        """Keep a frame behind the ones still on their way to another relay (bounded by max pending bytes)."""
        waiting = conn.bus_queue
        assert waiting is not None
        waiting.append(payload)
        if sum(len(p) for p in waiting) > self._config.limits.max_pending_bytes:
            waiting.clear()
            self._refusals.refuse(conn, self._m.relay_ws_slow_client_terminated, close="buffer overflow")

    def _route_next(self, conn: Connection, payload: bytes) -> None:
        """
        Resolve and publish the connection's waiting frames, one after another.

        Presence lookups are asynchronous: started side by side, a client's frames could reach
        the other relay out of order. The loop continues synchronously while lookups answer at
        once (a cached presence), and resumes from a callback only when one is really pending,
        so a long queue never nests calls. Publishes are not waited for: every backplane keeps
        one connection's (Redis) or one scope's (server) publishes in order. A presence the
        backplane already knows (the common case: one lookup, then a cached answer for every
        frame) is used without a Deferred.
        """
        backplane = self._backplane
        while True:
            known = backplane.known_presence(conn.workspace_id, conn.runtime_target_id)
            if known is not None:
                try:
                    self._route_to_remote(known, conn, payload)
                except Exception:
                    self._events.failure(Failure(), "client_route_error")
            else:
                d = backplane.resolve_presence(conn.workspace_id, conn.runtime_target_id)
                d.addCallback(self._route_to_remote, conn, payload)
                d.addErrback(self._events.failure, "client_route_error")
                finished: list[object] = []
                d.addBoth(finished.append)
                if not finished:
                    d.addCallback(self._route_done, conn)
                    return
            waiting = conn.bus_queue
            if not waiting:
                conn.bus_queue = None
                return
            payload = waiting.popleft()

    def _route_done(self, _: object, conn: Connection) -> None:
        waiting = conn.bus_queue
        if waiting:
            self._route_next(conn, waiting.popleft())
        else:
            conn.bus_queue = None

    def _route_to_remote(self, presence: Optional[Presence], conn: Connection, payload: bytes) -> None:
        scope = conn.scope
        local = scope.daemon_open() if scope is not None else None
        if local is not None:
            # The daemon connected here while this frame waited: deliver it locally, in order.
            self._delivery.to_daemon(local, payload)
            return
        if presence is None or not presence.daemon_connected or presence.relay_id == self._relay_id:
            if scope is not None:
                scope.remote_daemon_relay = None
            self._delivery.daemon_unavailable(conn)
            return
        if scope is not None:
            scope.remote_daemon_relay = presence.relay_id
        if (
            self._config.backplane.client_redirect_enabled
            and not conn.redirect_sent
            and self.redirect_allowed(presence.relay_ws_base_url)
        ):
            self.send_redirect(conn, presence.relay_ws_base_url, with_runtime_target=True)
        if not self._config.backplane.bus_enabled:
            self._delivery.daemon_unavailable(conn)
            return
        assert conn.runtime_target_id is not None
        frame = BusFrame(
            workspace_id=conn.workspace_id,
            runtime_target_id=conn.runtime_target_id,
            source_relay_id=self._relay_id,
            target_relay_id=presence.relay_id,
            direction="client_to_daemon",
            payload=payload.decode("utf-8"),
            machine_id=conn.machine_id,
        )

        def published(ok: bool) -> None:
            if ok:
                # Counted, not logged: this is the per-frame path of cross-relay traffic.
                self._m.relay_client_messages_routed_bus.inc()
            else:
                self._delivery.daemon_unavailable(conn)

        self._backplane.publish(frame).addCallback(published).addErrback(self._events.failure, "client_route_error")

    def redirect_allowed(self, url: str) -> bool:
        """Whether a presence's URL may be sent to a client as a redirect (docs/protocol.md §10)."""
        config = self._config
        return url != config.backplane.public_ws_base_url and redirect_url_allowed(
            url,
            relay_mode=config.relay_mode,
            allowed_hosts=config.backplane.redirect_allowed_hosts,
            own_public_url=config.backplane.public_ws_base_url,
            tls_host=config.tls.host,
        )

    def redirect_target(self, workspace_id: str, runtime_target_id: str) -> "Deferred[Optional[str]]":
        """The public URL of the relay holding this scope's daemon, when a client should move there."""

        def decide(presence: Optional[Presence]) -> Optional[str]:
            if presence is None or not presence.daemon_connected or presence.relay_id == self._relay_id:
                return None
            url = presence.relay_ws_base_url
            return url if self.redirect_allowed(url) else None

        def failed(failure: Any) -> None:
            self._events.failure(failure, "relay_presence_resolve_error")
            return None

        return self._backplane.resolve_presence(workspace_id, runtime_target_id).addCallbacks(decide, failed)

    def send_redirect(self, conn: Connection, url: str, with_runtime_target: bool) -> None:
        """Tell a client, once per connection, that its daemon is on the relay at ``url``."""
        if conn.redirect_sent:
            return
        conn.redirect_sent = True
        conn.peer.send_text(
            frames.relay_redirect(conn.workspace_id, url, conn.runtime_target_id if with_runtime_target else None)
        )
