"""Process-wide rate limiters: a fixed window and a token bucket, both LRU-capped and swept by time."""

from __future__ import annotations

from collections import OrderedDict

from viewport.relay.config import LimitsConfig


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class FixedWindowLimiter:
    """At most ``limit`` requests per key in a window of ``window_ms`` starting at the key's first request."""

    __slots__ = ("_limit", "_window_ms", "_max_keys", "_entries")

    def __init__(self, limit: int, window_ms: int, max_keys: int) -> None:
        _check_positive("limit", limit)
        _check_positive("window_ms", window_ms)
        _check_positive("max_keys", max_keys)
        self._limit = limit
        self._window_ms = window_ms
        self._max_keys = max_keys
        # key -> [window start, requests allowed in this window]; order is least- to most-recently used.
        self._entries: OrderedDict[str, list[float]] = OrderedDict()

    def allow(self, key: str, now_ms: float) -> bool:
        """Count one request for ``key`` and say whether it is within the limit."""
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            if len(entries) >= self._max_keys:
                entries.popitem(last=False)
            entries[key] = [now_ms, 1]
            return True
        entries.move_to_end(key)
        if now_ms - entry[0] >= self._window_ms:
            entry[0] = now_ms
            entry[1] = 1
            return True
        if entry[1] >= self._limit:
            return False
        entry[1] += 1
        return True

    def sweep(self, now_ms: float) -> None:
        """Forget keys whose window started at least two windows before ``now_ms``."""
        horizon = 2 * self._window_ms
        stale = [key for key, entry in self._entries.items() if now_ms - entry[0] >= horizon]
        for key in stale:
            del self._entries[key]

    def __len__(self) -> int:
        """Return the number of tracked keys."""
        return len(self._entries)


class TokenBucketLimiter:
    """A bucket of ``capacity`` tokens per key, refilled continuously at ``capacity`` per ``period_ms``."""

    __slots__ = ("_capacity", "_period_ms", "_max_keys", "_entries")

    def __init__(self, capacity: int, period_ms: int, max_keys: int) -> None:
        _check_positive("capacity", capacity)
        _check_positive("period_ms", period_ms)
        _check_positive("max_keys", max_keys)
        self._capacity = capacity
        self._period_ms = period_ms
        self._max_keys = max_keys
        # key -> [tokens, last refill]; order is least- to most-recently used.
        self._entries: OrderedDict[str, list[float]] = OrderedDict()

    def allow(self, key: str, now_ms: float) -> bool:
        """Take one whole token from ``key``'s bucket if it has one."""
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            if len(entries) >= self._max_keys:
                entries.popitem(last=False)
            entries[key] = [self._capacity - 1, now_ms]
            return True
        entries.move_to_end(key)
        tokens = entry[0]
        elapsed = now_ms - entry[1]
        # A clock step backwards neither refills nor moves the refill mark back (which would mint tokens later).
        if elapsed > 0:
            # Multiply before dividing so whole-token refills come out exact.
            tokens = min(self._capacity, tokens + elapsed * self._capacity / self._period_ms)
            entry[1] = now_ms
        if tokens >= 1:
            entry[0] = tokens - 1
            return True
        entry[0] = tokens
        return False

    def sweep(self, now_ms: float) -> None:
        """Forget keys last refilled at least two periods before ``now_ms``."""
        horizon = 2 * self._period_ms
        stale = [key for key, entry in self._entries.items() if now_ms - entry[1] >= horizon]
        for key in stale:
            del self._entries[key]

    def __len__(self) -> int:
        """Return the number of tracked keys."""
        return len(self._entries)


WINDOW_MS = 60_000


class Limiters:
    """The process-wide rate limiters of the frame pipelines (state survives reconnects)."""

    def __init__(self, limits: LimitsConfig) -> None:
        self.kex = FixedWindowLimiter(
            limits.kex_init_rate_per_minute, WINDOW_MS, limits.kex_rate_limiter_max_keys
        )
        self.pairing = FixedWindowLimiter(
            limits.pairing_rate_per_minute, WINDOW_MS, limits.pairing_rate_limiter_max_keys
        )
        self.runtime_client = TokenBucketLimiter(
            limits.runtime_rate_per_minute, WINDOW_MS, limits.runtime_rate_limiter_max_keys
        )
        self.runtime_workspace = TokenBucketLimiter(
            limits.runtime_rate_per_minute_workspace,
            WINDOW_MS,
            limits.runtime_workspace_rate_limiter_max_keys,
        )
        self.daemon = TokenBucketLimiter(
            limits.daemon_runtime_rate_per_minute, WINDOW_MS, limits.daemon_rate_limiter_max_keys
        )

    def sweep(self, now_ms: float) -> None:
        """Forget keys idle for two windows."""
        for limiter in (
            self.kex,
            self.pairing,
            self.runtime_client,
            self.runtime_workspace,
            self.daemon,
        ):
            limiter.sweep(now_ms)
