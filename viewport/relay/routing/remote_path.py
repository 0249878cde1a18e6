"""Telling clients whose daemon is on another relay that their path broke: outages, dead relays, lost frames."""

from __future__ import annotations

from typing import Any, Dict, Optional, Set, Tuple

from twisted.internet.defer import Deferred

from viewport.relay import frames
from viewport.relay.interfaces import BusFrame, IBackplane
from viewport.relay.metrics import RelayMetrics
from viewport.relay.registry import Registry, ScopeKey, ScopeState
from viewport.relay.routing.events import RoutingLog

#: How long a notice owed to another relay's clients is retried before it is given up.
OWED_NOTICE_TTL_MS = 60_000
#: At most one notice per scope, direction and relay this often for frames lost or out of order.
MISSED_NOTICE_INTERVAL_MS = 1000
_MISSED_NOTICES_TRACKED = 4096


class RemotePath:
    """
    The promise of the backplanes is that a frame is delivered or somebody is told. This object
    keeps the "somebody is told" half for frames that cross relays:

    - while this relay cannot receive (its Redis subscription or bus pull is lost), every local
      client of a scope whose daemon is elsewhere gets ``DAEMON_UNAVAILABLE`` at once, so it
      re-keys instead of waiting for frames that will not come;
    - a relay named as a scope's daemon holder that dies without a goodbye is noticed by the
      periodic liveness check, and its scopes' local clients are told the same way;
    - a daemon→clients frame that could not be published is counted, and the clients of the
      relay it was for are owed a ``DAEMON_UNAVAILABLE``: it is published once the path works
      again (retried every check for a minute);
    - frames of another relay that came out of order or with a gap (``frames_missed``): for
      daemon→clients frames this relay's clients of the scope are told, for client→daemon frames
      the sending relay's clients are owed the notice (at most one per second each way).
    """

    def __init__(
        self,
        *,
        registry: Registry,
        backplane: IBackplane,
        metrics: RelayMetrics,
        events: RoutingLog,
        relay_id: str,
    ) -> None:
        self._registry = registry
        self._backplane = backplane
        self._m = metrics
        self._events = events
        self._relay_id = relay_id
        self._path_working = True
        #: (scope key, target relay id or None) -> when the notice became owed.
        self._owed: Dict[Tuple[ScopeKey, Optional[str]], float] = {}
        self._checking = False
        #: (scope key, direction, relay id) -> when frames_missed last told someone.
        self._missed_told: Dict[Tuple[ScopeKey, str, str], float] = {}

    # -- the inbound path ------------------------------------------------------------------------

    def path_changed(self, working: bool, now_ms: float) -> None:
        """The backplane lost (False) or regained (True) the path that brings frames to this relay."""
        was_working, self._path_working = self._path_working, working
        if not working and was_working:
            told = 0
            for scope in self._registry:
                if scope.clients and scope.daemon_open() is None:
                    told += self._tell_clients(scope)
                    scope.remote_daemon_relay = None
            self._events.warn("relay_bus_path_lost", clientsTold=told)
        elif working and not was_working:
            self._events.info("relay_bus_path_restored", noticesOwed=len(self._owed))
            self.flush_owed(now_ms)

    def frames_missed(self, frame: BusFrame, now_ms: float) -> None:
        """Another relay's frames on a scope were lost or reordered on the way: tell the clients they concern."""
        key: ScopeKey = (frame.workspace_id, frame.runtime_target_id)
        told = (key, frame.direction, frame.source_relay_id)
        if now_ms - self._missed_told.get(told, -MISSED_NOTICE_INTERVAL_MS) < MISSED_NOTICE_INTERVAL_MS:
            return
        if len(self._missed_told) >= _MISSED_NOTICES_TRACKED:
            self._missed_told = {k: at for k, at in self._missed_told.items()
                                 if now_ms - at < MISSED_NOTICE_INTERVAL_MS}
        self._missed_told[told] = now_ms
        told_here = 0
        if frame.direction == "client_to_daemon":
            # The clients that sent them are on the source relay: owe them the notice.
            self._owed.setdefault((key, frame.source_relay_id), now_ms)
            self.flush_owed(now_ms)
        else:
            scope = self._registry.scopes.get(key)
            if scope is not None and scope.daemon_open() is None:
                told_here = self._tell_clients(scope)
        self._events.warn("relay_bus_frames_missed", workspaceId=frame.workspace_id, direction=frame.direction,
                          sourceRelayId=frame.source_relay_id, clientsTold=told_here)

    # -- relays that died ------------------------------------------------------------------------

    def check_remote_relays(self, now_ms: float) -> Optional["Deferred[Any]"]:
        """
        Ask the backplane which of the relays holding our clients' daemons are gone, and tell
        those scopes' clients; also retry owed notices. Returns the check's Deferred (None when
        there was nothing to ask, or a check is still under way).
        """
        self.flush_owed(now_ms)
        if self._checking:
            return None
        holders: Dict[str, Set[ScopeKey]] = {}
        for scope in self._registry:
            relay_id = scope.remote_daemon_relay
            if relay_id is not None and scope.clients and scope.daemon_open() is None:
                holders.setdefault(relay_id, set()).add(scope.key)
        if not holders:
            return None
        self._checking = True
        d = self._backplane.dead_relays(list(holders))

        def judged(dead: Any) -> None:
            self._checking = False
            for relay_id in dead:
                self._relay_gone(relay_id, holders.get(relay_id, set()))

        def failed(_: object) -> None:
            self._checking = False

        return d.addCallbacks(judged, failed)

    def _relay_gone(self, relay_id: str, keys: Set[ScopeKey]) -> None:
        told = 0
        for key in keys:
            scope = self._registry.scopes.get(key)
            if scope is None or scope.remote_daemon_relay != relay_id or scope.daemon_open() is not None:
                continue
            scope.remote_daemon_relay = None
            told += self._tell_clients(scope)
        self._m.relay_remote_relay_dead.inc()
        self._events.warn("relay_remote_relay_dead", deadRelayId=relay_id, clientsTold=told)

    # -- frames that could not be published ------------------------------------------------------

    def publish_failed(self, scope: ScopeState, target_relay_id: Optional[str], now_ms: float) -> None:
        """A daemon→clients frame for ``target_relay_id``'s clients (None: every relay's) was lost."""
        self._m.relay_bus_daemon_frames_lost.inc()
        self._owed.setdefault((scope.key, target_relay_id), now_ms)

    def flush_owed(self, now_ms: float) -> None:
        """Publish owed notices; the ones that fail again stay owed until they expire."""
        if not self._owed:
            return
        for (key, target), since in list(self._owed.items()):
            if now_ms - since > OWED_NOTICE_TTL_MS:
                del self._owed[(key, target)]
                continue
            workspace_id, runtime_target_id = key
            if runtime_target_id is None:
                del self._owed[(key, target)]
                continue
            notice = frames.daemon_unavailable(workspace_id, runtime_target_id)
            frame = BusFrame(workspace_id, runtime_target_id, self._relay_id, target, "daemon_to_clients", notice)
            self._backplane.publish(frame).addCallback(self._owed_sent, (key, target))

    def _owed_sent(self, ok: bool, owed: Tuple[ScopeKey, Optional[str]]) -> None:
        if ok and self._owed.pop(owed, None) is not None:
            self._m.relay_bus_loss_notices_sent.inc()

    @property
    def owed(self) -> int:
        """How many notices are waiting for the path to work."""
        return len(self._owed)

    def _tell_clients(self, scope: ScopeState) -> int:
        notice = frames.daemon_unavailable(scope.workspace_id, scope.runtime_target_id)
        told = 0
        for client in scope.clients:
            if client.peer.can_send():
                client.peer.send_text(notice)
                told += 1
        return told
