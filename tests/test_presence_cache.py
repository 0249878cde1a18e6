"""The presence cache both cross-relay backplanes keep: expiry, LRU bound, forgetting by relay."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from viewport.relay.backplane.presence_cache import PresenceCache
from viewport.relay.interfaces import Presence


def _presence(relay_id: str, workspace: str = "w") -> Presence:
    return Presence(workspace, "t", relay_id, f"ws://{relay_id}/ws", True)


class PresenceCacheTests(SynchronousTestCase):
    """What is kept, for how long, and what is dropped."""

    def test_an_answer_is_kept_until_its_ttl_ends(self) -> None:
        cache: PresenceCache[str] = PresenceCache(ttl=2.0, max_entries=10)
        cache.put("k", _presence("a"), now=10.0)
        self.assertEqual(cache.get("k", now=11.9), _presence("a"))
        self.assertIsNone(cache.get("k", now=12.0))
        self.assertEqual(len(cache), 0, "an expired entry is dropped when looked up")

    def test_no_ttl_keeps_nothing(self) -> None:
        cache: PresenceCache[str] = PresenceCache(ttl=0, max_entries=10)
        cache.put("k", _presence("a"), now=0)
        self.assertIsNone(cache.get("k", now=0))

    def test_the_least_recently_used_goes_first(self) -> None:
        cache: PresenceCache[str] = PresenceCache(ttl=100, max_entries=2)
        cache.put("a", _presence("a"), now=0)
        cache.put("b", _presence("b"), now=0)
        cache.get("a", now=1)
        cache.put("c", _presence("c"), now=1)
        self.assertEqual([cache.get(k, now=2) is not None for k in "abc"], [True, False, True])

    def test_forget_by_key_by_relay_and_by_gone_relays(self) -> None:
        cache: PresenceCache[str] = PresenceCache(ttl=100, max_entries=10)
        for key, relay in (("1", "a"), ("2", "b"), ("3", "b"), ("4", "c")):
            cache.put(key, _presence(relay), now=0)
        cache.forget("1", relay_id="z")
        self.assertIsNotNone(cache.get("1", now=0), "a presence naming another relay stays")
        cache.forget("1", relay_id="a")
        cache.forget_relays({"b"})
        cache.forget("4")
        self.assertEqual(len(cache), 0)
        cache.put("5", _presence("d"), now=0)
        cache.clear()
        self.assertIsNone(cache.get("5", now=0))
