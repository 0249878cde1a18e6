"""In-memory fakes of the relay's interfaces (a peer socket, a backplane) for tests of code that uses them."""

from __future__ import annotations

from typing import Callable, Collection, Dict, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from viewport.relay.interfaces import BusFrame, IBackplane, IPeer, Presence, Side

ScopeKey = Tuple[str, Optional[str]]
WatchCall = Tuple[str, Optional[str], Side]


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


@implementer(IBackplane)
class RecordingBackplane:
    """
    An ``IBackplane`` that records every call and answers from memory, synchronously.

    ``resolve_presence`` answers from ``presence`` (keyed by workspace and runtime target), which
    ``announce_presence`` also updates, so a relay finds its own announcement as a real backplane
    would. Tests seed it with other relays' daemons. ``publish`` fires with ``publish_result``.
    """

    def __init__(self, relay_id: str = "relay-test", cross_relay: bool = True) -> None:
        self.relay_id = relay_id
        self.cross_relay = cross_relay
        self.healthy = True
        self.publish_result = True
        self.presence: Dict[ScopeKey, Presence] = {}
        self.announcements: List[Presence] = []
        self.resolved: List[ScopeKey] = []
        self.published: List[BusFrame] = []
        #: ``(workspace_id, runtime_target_id, side)`` of each call, in order.
        self.watch_calls: List[WatchCall] = []
        self.unwatch_calls: List[WatchCall] = []
        self.deliver: Optional[Callable[[BusFrame], None]] = None
        self.path_changed: Optional[Callable[[bool], None]] = None
        #: Relay ids ``dead_relays`` reports gone.
        self.dead: Set[str] = set()
        self.running = False

    def start(
        self, deliver: Callable[[BusFrame], None], path_changed: Optional[Callable[[bool], None]] = None
    ) -> "Deferred[None]":
        """Keep ``deliver`` (and ``path_changed``) so a test can hand frames and path changes to the relay."""
        self.deliver = deliver
        self.path_changed = path_changed
        self.running = True
        return succeed(None)

    def dead_relays(self, relay_ids: Collection[str]) -> "Deferred[frozenset[str]]":
        """The asked ids that are in ``dead``; their presences are forgotten."""
        gone = frozenset(relay_ids) & self.dead
        for key, presence in list(self.presence.items()):
            if presence.relay_id in gone:
                del self.presence[key]
        return succeed(gone)

    def stop(self) -> "Deferred[None]":
        """Stop delivering."""
        self.deliver = None
        self.running = False
        return succeed(None)

    def announce_presence(self, presence: Presence) -> "Deferred[None]":
        """Record the announcement and update the answer ``resolve_presence`` gives."""
        self.announcements.append(presence)
        key = (presence.workspace_id, presence.runtime_target_id)
        if presence.daemon_connected:
            self.presence[key] = presence
        else:
            current = self.presence.get(key)
            if current is not None and current.relay_id == presence.relay_id:
                del self.presence[key]
        return succeed(None)

    def resolve_presence(
        self, workspace_id: str, runtime_target_id: Optional[str]
    ) -> "Deferred[Optional[Presence]]":
        """Answer from ``presence``."""
        key = (workspace_id, runtime_target_id)
        self.resolved.append(key)
        return succeed(self.presence.get(key))

    def publish(self, frame: BusFrame) -> "Deferred[bool]":
        """Record the frame; fire with ``publish_result``."""
        self.published.append(frame)
        return succeed(self.publish_result)

    def watch_scope(self, workspace_id: str, runtime_target_id: Optional[str], side: Side) -> None:
        """Record the call."""
        self.watch_calls.append((workspace_id, runtime_target_id, side))

    def unwatch_scope(self, workspace_id: str, runtime_target_id: Optional[str], side: Side) -> None:
        """Record the call."""
        self.unwatch_calls.append((workspace_id, runtime_target_id, side))
