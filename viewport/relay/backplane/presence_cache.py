"""The short-lived cache of positive presence answers that the redis and server backplanes keep."""

from __future__ import annotations

from collections import OrderedDict
from typing import Collection, Generic, Hashable, Optional, TypeVar

from viewport.relay.interfaces import Presence

__all__ = ["PresenceCache"]

K = TypeVar("K", bound=Hashable)


class PresenceCache(Generic[K]):
    """
    Presences by scope key, each kept for ``ttl`` after it was put, at most ``max_entries`` (the least
    recently used go first). ``ttl`` and every ``now`` share one unit, the caller's clock; a ``ttl`` of 0
    or less keeps nothing. Only answers naming a connected daemon belong here: a miss always asks the store.
    """

    def __init__(self, ttl: float, max_entries: int) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._entries: OrderedDict[K, tuple[Presence, float]] = OrderedDict()

    def get(self, key: K, now: float) -> Optional[Presence]:
        """The presence kept for ``key``, unless it expired (it is then dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: K, presence: Presence, now: float) -> None:
        """Keep ``presence`` for ``key`` until ``now + ttl``."""
        if self._ttl <= 0:
            return
        self._entries[key] = (presence, now + self._ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def forget(self, key: K, relay_id: Optional[str] = None) -> None:
        """Drop what is kept for ``key``; with ``relay_id``, only a presence naming that relay."""
        entry = self._entries.get(key)
        if entry is not None and (relay_id is None or entry[0].relay_id == relay_id):
            del self._entries[key]

    def forget_relays(self, relay_ids: Collection[str]) -> None:
        """Drop every presence naming one of ``relay_ids`` (relays known to be gone)."""
        if not relay_ids:
            return
        for key, (presence, _) in list(self._entries.items()):
            if presence.relay_id in relay_ids:
                del self._entries[key]

    def clear(self) -> None:
        """Drop everything."""
        self._entries.clear()

    def __len__(self) -> int:
        """How many presences are kept (expired ones included until they are looked up)."""
        return len(self._entries)
