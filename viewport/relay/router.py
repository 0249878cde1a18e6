"""The router: a small facade over the composed parts in ``viewport.relay.routing``."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred

from viewport.relay.config import RelayConfig
from viewport.relay.interfaces import BusFrame, IBackplane
from viewport.relay.limits import Limiters
from viewport.relay.metrics import RelayMetrics
from viewport.relay.registry import Connection, Registry
from viewport.relay.routing.bus_inbound import BusInbound
from viewport.relay.routing.client_pipeline import ClientPipeline
from viewport.relay.routing.daemon_pipeline import DaemonPipeline
from viewport.relay.routing.delivery import Delivery
from viewport.relay.routing.events import Refusals, RoutingLog
from viewport.relay.routing.lifecycle import ConnectionLifecycle
from viewport.relay.routing.remote_forwarding import RemoteForwarding
from viewport.relay.routing.remote_path import RemotePath
from viewport.relay.routing.upgrades import UpgradeDecisions, UpgradeOutcome
from viewport.relay.upgrade import UpgradeQuery
from viewport.tokens import Claims
from viewport.relay.routing.worker_pipeline import WorkerForward, WorkerPipeline

__all__ = ["Router", "WorkerForward"]


class Router:
    """
    Everything a relay decides about connections and frames, independent of sockets and timers.

    The protocol hands over each inbound payload with ``now_ms``; the router answers through the
    connections' ``IPeer`` and reaches other relays only through ``IBackplane``. Each method hands
    over to one of the parts built here, which get their collaborators explicitly.
    """

    def __init__(
        self,
        *,
        config: RelayConfig,
        registry: Registry,
        backplane: IBackplane,
        metrics: RelayMetrics,
        limiters: Limiters,
        worker_forward: Optional[WorkerForward] = None,
    ) -> None:
        relay_id: str = backplane.relay_id
        self._events = events = RoutingLog()
        refusals = Refusals(events)
        self._remote_path = RemotePath(registry=registry, backplane=backplane, metrics=metrics, events=events, relay_id=relay_id)
        delivery = Delivery(backplane=backplane, metrics=metrics, events=events, remote_path=self._remote_path, relay_id=relay_id)
        self._lifecycle = ConnectionLifecycle(
            config=config, registry=registry, backplane=backplane, metrics=metrics, events=events, refusals=refusals,
            delivery=delivery, relay_id=relay_id,
        )
        self._remote = RemoteForwarding(
            config=config, backplane=backplane, metrics=metrics, events=events, refusals=refusals, delivery=delivery,
            relay_id=relay_id,
        )
        self._clients = ClientPipeline(
            config=config, backplane=backplane, metrics=metrics, limiters=limiters, refusals=refusals,
            delivery=delivery, remote=self._remote,
        )
        self._daemons = DaemonPipeline(
            config=config, backplane=backplane, metrics=metrics, limiters=limiters, events=events, refusals=refusals,
            delivery=delivery,
        )
        self._bus = BusInbound(
            registry=registry, backplane=backplane, metrics=metrics, events=events, delivery=delivery,
            daemon_pipeline=self._daemons,
            client_pipeline=self._clients,
        )
        self._upgrades = UpgradeDecisions(
            config=config, backplane=backplane, metrics=metrics, lifecycle=self._lifecycle, remote=self._remote
        )
        self._workers = WorkerPipeline(
            config=config, metrics=metrics, limiters=limiters, refusals=refusals, forward=worker_forward
        )

    # -- connections ----------------------------------------------------------------------------

    def open_connection(self, conn: Connection, query_runtime_target_id: Optional[str], now_ms: float) -> bool:
        """Check an upgraded socket's claims and register it; False when it was closed instead."""
        return self._lifecycle.open_connection(conn, query_runtime_target_id, now_ms)

    def close_connection(self, conn: Connection, now_ms: float) -> None:
        """Forget a registered socket that closed; tell a scope's clients when its daemon left."""
        self._lifecycle.close_connection(conn, now_ms)

    def upgrade_outcome(self, query: UpgradeQuery, claims: Claims, http_redirect: bool) -> "Deferred[UpgradeOutcome]":
        """For an admitted upgrade: refuse (client cap), redirect over HTTP, or open (maybe with an in-band redirect)."""
        return self._upgrades.decide(query, claims, http_redirect)

    def client_cap_reached(self, workspace_id: str, runtime_target_id: Optional[str]) -> bool:
        """True when the scope already holds the maximum number of open clients (no side effect)."""
        return self._lifecycle.client_cap_reached(workspace_id, runtime_target_id)

    def withdraw_presence(self) -> "Deferred[Any]":
        """Before shutdown: presences withdrawn and daemon-gone notices published, whatever the sockets do."""
        return self._lifecycle.withdraw_presence()

    def evict_empty_scopes(self, now_ms: float) -> None:
        """Delete scopes that stayed empty for the configured TTL, then refresh the gauges."""
        self._lifecycle.evict_empty_scopes(now_ms)

    # -- frames -----------------------------------------------------------------------------------

    def client_frame(self, conn: Connection, payload: bytes, now_ms: float) -> None:
        """One frame from a browser client."""
        self._clients.frame(conn, payload, now_ms)

    def daemon_frame(self, conn: Connection, payload: bytes, now_ms: float) -> None:
        """One frame from a daemon."""
        self._daemons.frame(conn, payload, now_ms)

    def worker_frame(self, conn: Connection, payload: bytes, now_ms: float) -> None:
        """One worker transport request."""
        self._workers.frame(conn, payload, now_ms)

    def bus_frame(self, bus: BusFrame, now_ms: float) -> None:
        """One frame another relay published to this one."""
        self._bus.frame(bus, now_ms)

    # -- other relays ---------------------------------------------------------------------------

    def redirect_target(self, workspace_id: str, runtime_target_id: str) -> "Deferred[Optional[str]]":
        """The public URL of the relay holding this scope's daemon, when a client should move there."""
        return self._remote.redirect_target(workspace_id, runtime_target_id)

    def send_redirect(self, conn: Connection, url: str, with_runtime_target: bool) -> None:
        """Tell a client, once per connection, that its daemon is on the relay at ``url``."""
        self._remote.send_redirect(conn, url, with_runtime_target)

    def path_changed(self, working: bool, now_ms: float) -> None:
        """The backplane lost (False) or regained (True) the path bringing other relays' frames here."""
        self._remote_path.path_changed(working, now_ms)

    def frames_missed(self, frame: BusFrame, now_ms: float) -> None:
        """Frames of another relay's stream on a scope were lost or came out of order: tell who they were for."""
        self._remote_path.frames_missed(frame, now_ms)

    def check_remote_relays(self, now_ms: float) -> "Optional[Deferred[Any]]":
        """Periodic: tell clients whose daemon's relay died, and retry notices owed to other relays."""
        return self._remote_path.check_remote_relays(now_ms)

    # -- housekeeping ---------------------------------------------------------------------------

    def reset_log_budget(self) -> None:
        """Start a new warning budget; log how many warnings of each kind were held back."""
        self._events.reset_budget()
