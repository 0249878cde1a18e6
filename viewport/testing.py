"""In-memory fakes of the relay's interfaces (a peer socket, a cross-relay backplane) for tests of code that uses them."""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Callable, Collection, Deque, Dict, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from viewport.relay.interfaces import BusFrame, IBackplane, IPeer, Presence, Side

ScopeKey = Tuple[str, Optional[str]]
WatchCall = Tuple[str, Optional[str], Side]

_SIDE_OF: Dict[str, Side] = {"client_to_daemon": "daemon", "daemon_to_clients": "clients"}
#: The largest payload the bus carries, as ``RELAY_MAX_FRAME_BYTES`` by default.
DEFAULT_MAX_PAYLOAD_BYTES = 1048576


@implementer(IPeer)
class FakePeer:
    """
    An ``IPeer`` that records what is sent to it and how it is closed.

    Like the real WebSocket protocol it drops frames once it is no longer open, and only the
    first close takes effect (a close moves it out of the open state).
    """

    def __init__(self) -> None:
        self.open = True
        #: Relay-originated frames (``send_text``), in order.
        self.texts: List[str] = []
        #: Forwarded peer frames (``send_payload``), in order.
        self.payloads: List[bytes] = []
        #: Every frame delivered, as text, in order (texts and payloads interleaved).
        self.frames: List[str] = []
        #: ``(code, reason)`` of each effective close.
        self.closes: List[Tuple[int, str]] = []
        #: The kind of every effective call in order: ``"text"``, ``"payload"`` or ``"close"``.
        self.history: List[str] = []

    def send_text(self, text: str) -> None:
        """Record a relay-originated frame while open."""
        if not self.open:
            return
        self.texts.append(text)
        self.frames.append(text)
        self.history.append("text")

    def send_payload(self, payload: bytes) -> None:
        """Record a forwarded frame while open."""
        if not self.open:
            return
        self.payloads.append(payload)
        self.frames.append(payload.decode("utf-8"))
        self.history.append("payload")

    def close(self, code: int, reason: str) -> None:
        """Record the close and stop accepting frames; later closes are ignored, like the real socket."""
        if not self.open:
            return
        self.open = False
        self.closes.append((code, reason))
        self.history.append("close")

    def can_send(self) -> bool:
        """True until closed or lost."""
        return self.open

    def lose(self) -> None:
        """Simulate the connection dropping without a close frame (it stops being open)."""
        self.open = False


def _scope(workspace_id: str, runtime_target_id: Optional[str]) -> ScopeKey:
    # An empty runtime target is no runtime target, as on Redis and the bus.
    return (workspace_id, runtime_target_id or None)


class InMemoryBus:
    """
    What several ``InMemoryBackplane`` relays share in place of Redis or viewport-bus.

    It holds the presence table (``presence``, one entry per scope naming the relay of its
    daemon), the relays' liveness (``gone``: relays that said goodbye or crashed) and, through
    its backplanes, who watches which side of which scope. Frames are delivered in publish order.
    Without a ``clock`` they are delivered before ``publish`` returns (but a frame published from
    inside ``deliver`` waits until the frame being delivered is done); with one, on the clock's
    next turn, as a real bus delivers after the publishing call has returned.
    """

    def __init__(self, clock: Optional[IReactorTime] = None, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self.clock = clock
        self.max_payload_bytes = max_payload_bytes
        #: Scope -> the connected daemon's presence (tests may seed other relays' daemons here).
        self.presence: Dict[ScopeKey, Presence] = {}
        #: Relays whose liveness record is gone: they said goodbye (``stop``) or died (``crash``).
        #: A relay named here never resolves; a relay the bus never heard of is not dead.
        self.gone: Set[str] = set()
        self._backplanes: List[InMemoryBackplane] = []
        self._queue: Deque[Tuple[InMemoryBackplane, BusFrame]] = deque()
        self._flushing = False
        self._scheduled: Optional[IDelayedCall] = None

    def attach(self, backplane: "InMemoryBackplane") -> None:
        """Let ``backplane`` receive from and publish on this bus (done by its constructor)."""
        self._backplanes.append(backplane)

    def publish(self, frame: BusFrame) -> bool:
        """
        Queue ``frame`` for every relay that takes it; True when there is one. A relay takes a
        frame when it receives (started, not stopped, reachable), watches the frame's side of its
        scope, is not its source, and is its target (an untargeted frame is for every such relay).
        """
        receivers = [backplane for backplane in self._backplanes if backplane.takes(frame)]
        for receiver in receivers:
            self._queue.append((receiver, frame))
        if receivers:
            self._schedule()
        return bool(receivers)

    def flush(self) -> None:
        """Deliver every queued frame, in order, including those published meanwhile."""
        if self._flushing:
            return
        self._flushing = True
        try:
            while self._queue:
                receiver, frame = self._queue.popleft()
                # Unwatched, stopped or cut off since the publish: dropped, as the bus's pull drops it.
                if receiver.takes(frame):
                    receiver.receive(frame)
        finally:
            self._flushing = False

    def _schedule(self) -> None:
        if self.clock is None:
            self.flush()
        elif self._scheduled is None or not self._scheduled.active():
            self._scheduled = self.clock.callLater(0, self._flush_later)

    def _flush_later(self) -> None:
        self._scheduled = None
        self.flush()

    def resolve(self, scope: ScopeKey) -> Optional[Presence]:
        """The scope's presence, unless its relay is gone."""
        presence = self.presence.get(scope)
        if presence is None or presence.relay_id in self.gone:
            return None
        return presence

    def forget(self, relay_ids: Collection[str]) -> None:
        """Drop the presences naming any of ``relay_ids`` (relays found dead)."""
        for scope, presence in list(self.presence.items()):
            if presence.relay_id in relay_ids:
                del self.presence[scope]

    def crash(self, relay_id: str) -> None:
        """``relay_id`` died without a goodbye: it stops receiving, its liveness record expires, its presences stay."""
        for backplane in self._backplanes:
            if backplane.relay_id == relay_id:
                backplane.crash()
        self.gone.add(relay_id)

    def outage(self) -> None:
        """The shared store goes away: every relay on the bus loses its path (``disconnect``)."""
        for backplane in list(self._backplanes):
            backplane.disconnect()

    def restore(self) -> None:
        """The store is back: every relay on the bus reconnects."""
        for backplane in list(self._backplanes):
            backplane.reconnect()


@implementer(IBackplane)
class InMemoryBackplane:
    """
    A cross-relay ``IBackplane`` on an ``InMemoryBus``, answering synchronously.

    Semantics are those of the Redis and server backplanes (the contract suite holds it to them):

    - frames go to the relays watching the frame's side of its scope, never back to their
      source; a targeted frame only to its target (on Redis a client→daemon frame would also
      reach a relay that took the daemon over: here the publish fails and the client retries),
      an untargeted one to all; ``publish`` fires True when some relay took it (as Redis'
      receiver count says), False when none, when the frame is invalid (no runtime target, an
      unknown direction, a payload over the bus's limit) or when this relay cannot reach the bus;
    - presence is one entry per scope; clearing it is a compare-and-delete (only the relay that
      holds it can clear it); a presence naming a relay that is gone never resolves;
    - ``start`` writes this relay's liveness record, ``stop`` withdraws its presences and says
      goodbye; ``dead_relays`` reports relays that said goodbye or crashed (``InMemoryBus.crash``),
      never an unknown one, and forgets their presences;
    - ``disconnect``/``reconnect`` simulate losing the store: ``healthy`` turns False and
      ``path_changed(False)`` is called, every call answers False/None, frames for this relay are
      refused to their senders; on reconnection presences announced meanwhile are written (and
      withdrawals applied) and ``path_changed(True)`` is called.

    Announcing, resolving, watching and publishing work before ``start`` (as in server mode);
    frames are received only between ``start`` and ``stop``.
    """

    cross_relay = True
    _log = Logger()

    def __init__(self, relay_id: str, bus: InMemoryBus) -> None:
        self.relay_id = relay_id
        self.bus = bus
        self.healthy = True
        self._deliver: Optional[Callable[[BusFrame], None]] = None
        self._path_changed: Optional[Callable[[bool], None]] = None
        self._started = False
        self._stopped = False
        self._connected = True
        self._watched: Set[WatchCall] = set()
        self._owned: Dict[ScopeKey, Presence] = {}
        self._pending_clears: Set[ScopeKey] = set()
        bus.attach(self)

    # -- IBackplane ---------------------------------------------------------------------------

    def start(
        self,
        deliver: Callable[[BusFrame], None],
        path_changed: Optional[Callable[[bool], None]] = None,
        frames_missed: Optional[Callable[[BusFrame], None]] = None,
    ) -> "Deferred[None]":
        """Receive from now on and write this relay's liveness record (a relay that said goodbye is alive again)."""
        if self._started or self._stopped:
            return succeed(None)
        self._started = True
        self._deliver = deliver
        self._path_changed = path_changed
        self.bus.gone.discard(self.relay_id)
        return succeed(None)

    def stop(self) -> "Deferred[None]":
        """Withdraw this relay's presences, say goodbye, stop receiving. Idempotent."""
        if self._stopped:
            return succeed(None)
        if self._connected:
            for scope in sorted(set(self._owned) | self._pending_clears, key=repr):
                self._clear(scope)
        self._halt()
        # Without a goodbye (unreachable bus) the liveness record expires: gone either way.
        self.bus.gone.add(self.relay_id)
        return succeed(None)

    def dead_relays(self, relay_ids: Collection[str]) -> "Deferred[frozenset[str]]":
        """The asked relays that said goodbye or crashed (never this one, never an unknown one); their presences are forgotten."""
        if not self._reachable():
            return succeed(frozenset())
        gone = frozenset(relay_id for relay_id in relay_ids if relay_id != self.relay_id and relay_id in self.bus.gone)
        self.bus.forget(gone)
        return succeed(gone)

    def announce_presence(self, presence: Presence) -> "Deferred[None]":
        """Write (connected) or compare-and-delete (disconnected) the scope's presence; kept for later while unreachable."""
        if self._stopped:
            return succeed(None)
        scope = _scope(presence.workspace_id, presence.runtime_target_id)
        if presence.daemon_connected:
            self._owned[scope] = presence
            self._pending_clears.discard(scope)
            if self._connected:
                self.bus.presence[scope] = presence
        else:
            self._owned.pop(scope, None)
            if self._connected:
                self._clear(scope)
            else:
                self._pending_clears.add(scope)
        return succeed(None)

    def resolve_presence(
        self, workspace_id: str, runtime_target_id: Optional[str]
    ) -> "Deferred[Optional[Presence]]":
        """The scope's presence on the bus, unless its relay is gone; None while unreachable or stopped."""
        if not self._reachable():
            return succeed(None)
        return succeed(self.bus.resolve(_scope(workspace_id, runtime_target_id)))

    def known_presence(self, workspace_id: str, runtime_target_id: Optional[str]) -> Optional[Presence]:
        """Nothing is cached: every resolve reads the bus."""
        return None

    def forget_presence(self, workspace_id: str, runtime_target_id: Optional[str], relay_id: str) -> None:
        """Nothing is cached: every resolve reads the bus."""

    def publish(self, frame: BusFrame) -> "Deferred[bool]":
        """Hand the frame to the relays that take it (its source is this relay); True when one did."""
        if not self._reachable() or not self._valid(frame):
            return succeed(False)
        if frame.source_relay_id != self.relay_id:
            frame = replace(frame, source_relay_id=self.relay_id)
        return succeed(self.bus.publish(frame))

    def watch_scope(self, workspace_id: str, runtime_target_id: Optional[str], side: Side) -> None:
        """Receive that side's frames of the scope. Idempotent."""
        if not self._stopped:
            self._watched.add((workspace_id, runtime_target_id or None, side))

    def unwatch_scope(self, workspace_id: str, runtime_target_id: Optional[str], side: Side) -> None:
        """Stop receiving that side's frames of the scope. Idempotent."""
        self._watched.discard((workspace_id, runtime_target_id or None, side))

    # -- what the bus and the tests drive -----------------------------------------------------

    def takes(self, frame: BusFrame) -> bool:
        """Whether this relay would receive ``frame`` now."""
        return (
            self._deliver is not None
            and self._connected
            and frame.source_relay_id != self.relay_id
            and (not frame.target_relay_id or frame.target_relay_id == self.relay_id)
            and (frame.workspace_id, frame.runtime_target_id or None, _SIDE_OF[frame.direction]) in self._watched
        )

    def receive(self, frame: BusFrame) -> None:
        """Hand one frame to ``deliver``; an exception there is logged, like the real backplanes do."""
        deliver = self._deliver
        if deliver is None:
            return
        try:
            deliver(frame)
        except Exception:
            self._log.failure("bus frame handling failed", relay_event="relay_bus_pull_error")

    def disconnect(self) -> None:
        """This relay loses the bus (the Redis connection drops, the pull fails): ``path_changed(False)``."""
        if self._stopped or not self._connected:
            return
        self._connected = False
        self.healthy = False
        self._tell_path(False)

    def reconnect(self) -> None:
        """The bus is reachable again: presences are written again, withdrawals applied, ``path_changed(True)``."""
        if self._stopped or self._connected:
            return
        self._connected = True
        self.healthy = True
        for scope, presence in self._owned.items():
            self.bus.presence[scope] = presence
        clears, self._pending_clears = self._pending_clears, set()
        for scope in clears:
            self._clear(scope)
        self._tell_path(True)

    def crash(self) -> None:
        """
        This relay's process died: it stops receiving and answering, without withdrawing
        anything (``InMemoryBus.crash`` also expires its liveness record).
        """
        self._halt()

    # -- helpers ------------------------------------------------------------------------------

    def _halt(self) -> None:
        self._stopped = True
        self.healthy = False
        self._deliver = None
        self._path_changed = None
        self._watched.clear()
        self._owned.clear()
        self._pending_clears.clear()

    def _reachable(self) -> bool:
        return self._connected and not self._stopped

    def _valid(self, frame: BusFrame) -> bool:
        if not frame.runtime_target_id or frame.direction not in _SIDE_OF:
            return False
        try:
            size = len(frame.payload.encode("utf-8"))
        except UnicodeEncodeError:
            return False
        return size <= self.bus.max_payload_bytes

    def _clear(self, scope: ScopeKey) -> None:
        current = self.bus.presence.get(scope)
        if current is not None and current.relay_id == self.relay_id:
            del self.bus.presence[scope]

    def _tell_path(self, working: bool) -> None:
        path_changed = self._path_changed
        if path_changed is None:
            return
        try:
            path_changed(working)
        except Exception:
            self._log.failure("path change handling failed", relay_event="relay_bus_path_change_error")


class RecordingBackplane(InMemoryBackplane):
    """
    An ``InMemoryBackplane`` that also records every call, for tests of one relay's router.

    By default it is a relay alone on its own bus, held to the IBackplane contract like any
    backplane. Tests seed other relays' daemons in ``presence`` and their deaths in ``dead`` (both
    the bus's), and set ``publish_result`` to answer every publish with True or False instead of
    the bus: the relays that would take the frames are not simulated (nothing is delivered then).
    After ``stop`` a publish fails whatever ``publish_result`` says.
    """

    def __init__(self, relay_id: str = "relay-test", cross_relay: bool = True, bus: Optional[InMemoryBus] = None) -> None:
        super().__init__(relay_id, bus if bus is not None else InMemoryBus())
        self.cross_relay = cross_relay
        #: None: the bus answers publishes; True/False: this answers them instead.
        self.publish_result: Optional[bool] = None
        self.announcements: List[Presence] = []
        self.resolved: List[ScopeKey] = []
        #: Scope -> what ``known_presence`` answers (a kept answer, as a cache would hold); empty: None.
        self.known: Dict[ScopeKey, Presence] = {}
        #: ``(workspace_id, runtime_target_id, relay_id)`` of each ``forget_presence``, in order.
        self.forgotten: List[Tuple[str, Optional[str], str]] = []
        self.published: List[BusFrame] = []
        #: ``(workspace_id, runtime_target_id, side)`` of each call, in order.
        self.watch_calls: List[WatchCall] = []
        self.unwatch_calls: List[WatchCall] = []

    @property
    def presence(self) -> Dict[ScopeKey, Presence]:
        """The bus's presence table: scope -> the connected daemon's presence."""
        return self.bus.presence

    @property
    def dead(self) -> Set[str]:
        """Relay ids the bus knows to be gone (``dead_relays`` reports them, their presences never resolve)."""
        return self.bus.gone

    @property
    def deliver(self) -> Optional[Callable[[BusFrame], None]]:
        """What ``start`` was given to hand frames to the relay (None before start and after stop)."""
        return self._deliver

    @property
    def path_changed(self) -> Optional[Callable[[bool], None]]:
        """What ``start`` was given to report path changes."""
        return self._path_changed

    @property
    def running(self) -> bool:
        """True between ``start`` and ``stop``."""
        return self._started and not self._stopped

    def announce_presence(self, presence: Presence) -> "Deferred[None]":
        """Record the announcement and write it to the bus."""
        self.announcements.append(presence)
        return super().announce_presence(presence)

    def resolve_presence(
        self, workspace_id: str, runtime_target_id: Optional[str]
    ) -> "Deferred[Optional[Presence]]":
        """Record the lookup and answer from the bus."""
        self.resolved.append((workspace_id, runtime_target_id))
        return super().resolve_presence(workspace_id, runtime_target_id)

    def known_presence(self, workspace_id: str, runtime_target_id: Optional[str]) -> Optional[Presence]:
        """What ``known`` holds for the scope."""
        return self.known.get(_scope(workspace_id, runtime_target_id))

    def forget_presence(self, workspace_id: str, runtime_target_id: Optional[str], relay_id: str) -> None:
        """Record the call."""
        self.forgotten.append((workspace_id, runtime_target_id, relay_id))
        self.known.pop(_scope(workspace_id, runtime_target_id), None)
        super().forget_presence(workspace_id, runtime_target_id, relay_id)

    def publish(self, frame: BusFrame) -> "Deferred[bool]":
        """Record the frame; fire with ``publish_result`` when set, else with the bus's answer."""
        self.published.append(frame)
        if self.publish_result is not None and not self._stopped:
            return succeed(self.publish_result)
        return super().publish(frame)

    def watch_scope(self, workspace_id: str, runtime_target_id: Optional[str], side: Side) -> None:
        """Record the call and watch."""
        self.watch_calls.append((workspace_id, runtime_target_id, side))
        super().watch_scope(workspace_id, runtime_target_id, side)

    def unwatch_scope(self, workspace_id: str, runtime_target_id: Optional[str], side: Side) -> None:
        """Record the call and unwatch."""
        self.unwatch_calls.append((workspace_id, runtime_target_id, side))
        super().unwatch_scope(workspace_id, runtime_target_id, side)
