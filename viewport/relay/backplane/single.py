"""The ``single`` backplane: one relay, nothing to reach, every cross-relay call a cheap no-op."""

from __future__ import annotations

from typing import Callable, Collection, Optional

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from viewport.relay.interfaces import BusFrame, IBackplane, Presence, Side


@implementer(IBackplane)
class SingleBackplane:
    """No other relay exists: presence resolves to nothing and publishing reaches no one."""

    cross_relay = False

    def __init__(self, relay_id: str) -> None:
        self.relay_id = relay_id

    def start(
        self,
        deliver: Callable[[BusFrame], None],
        path_changed: Optional[Callable[[bool], None]] = None,
        frames_missed: Optional[Callable[[BusFrame], None]] = None,
    ) -> "Deferred[None]":
        """Nothing to connect to."""
        return succeed(None)

    def dead_relays(self, relay_ids: Collection[str]) -> "Deferred[frozenset[str]]":
        """No other relay is known."""
        return succeed(frozenset())

    def stop(self) -> "Deferred[None]":
        """Nothing to release."""
        return succeed(None)

    @property
    def healthy(self) -> bool:
        """Always usable."""
        return True

    def announce_presence(self, presence: Presence) -> "Deferred[None]":
        """Presence is only needed between relays."""
        return succeed(None)

    def resolve_presence(
        self, workspace_id: str, runtime_target_id: Optional[str]
    ) -> "Deferred[Optional[Presence]]":
        """No other relay can hold the daemon."""
        return succeed(None)

    def known_presence(self, workspace_id: str, runtime_target_id: Optional[str]) -> Optional[Presence]:
        """Nothing is kept."""
        return None

    def forget_presence(self, workspace_id: str, runtime_target_id: Optional[str], relay_id: str) -> None:
        """Nothing is kept."""

    def publish(self, frame: BusFrame) -> "Deferred[bool]":
        """No relay receives it."""
        return succeed(False)

    def watch_scope(self, workspace_id: str, runtime_target_id: Optional[str], side: Side) -> None:
        """Nothing to subscribe to."""

    def unwatch_scope(self, workspace_id: str, runtime_target_id: Optional[str], side: Side) -> None:
        """Nothing to unsubscribe from."""
