"""When and how soon a relay client tries again: capped full-jitter backoff and the non-retryable outcomes."""

from __future__ import annotations

import random as _random
from collections.abc import Collection
from typing import Protocol

from viewport.client.connection import CloseInfo
from viewport.client.errors import UpgradeRefused

POLICY_CLOSE_CODE = 4008
"""The one application close code the relay uses for post-upgrade policy failures (docs/protocol.md §6)."""

DEFAULT_FATAL_STATUSES: frozenset[int] = frozenset({401, 403})
"""Upgrade answers that no retry can fix: authentication and authorisation failures."""

DEFAULT_FATAL_CLOSE_REASONS: frozenset[str] = frozenset(
    {
        "missing workspace claim",
        "workspace claim mismatch",
        "runtime target claim mismatch",
        "invalid scope claim",
        "missing runtime target claim",
        "stale daemon generation",
    }
)
"""Reasons of a 4008 close that mean the token or the configuration is wrong, so a retry would loop.

``daemon already connected`` is deliberately absent: the other daemon may go away, so it is retried with
backoff (the original daemon retried it at once, in a tight loop: docs/protocol.md §9, item 17).
"""

_MAX_EXPONENT = 64


class UniformSource(Protocol):
    """Where jitter comes from: anything with ``random.Random.uniform`` (inject a seeded one in tests)."""

    def uniform(self, a: float, b: float) -> float:
        """A number between ``a`` and ``b``."""


class Backoff:
    """Capped exponential backoff with full jitter.

    The ``n``-th consecutive retry (``n`` counted from 0) waits ``uniform(0, min(cap, base * 2**n))``
    seconds; :meth:`reset` starts counting again after a connection proved stable.
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0, random: UniformSource | None = None) -> None:
        if base <= 0:
            raise ValueError("base delay must be positive")
        if cap < base:
            raise ValueError("the delay cap must be at least the base delay")
        self.base = base
        self.cap = cap
        self._random: UniformSource = random if random is not None else _random.Random()
        self._attempts = 0

    @property
    def attempts(self) -> int:
        """How many delays were handed out since the last reset (the exponent of the next one)."""
        return self._attempts

    def ceiling(self, attempt: int) -> float:
        """The largest delay the ``attempt``-th retry (from 0) may wait: ``min(cap, base * 2**attempt)``."""
        if attempt >= _MAX_EXPONENT:
            return self.cap
        return min(self.cap, self.base * 2.0**attempt)

    def next_delay(self) -> float:
        """Draw the delay before the next retry and count the attempt."""
        delay = self._random.uniform(0.0, self.ceiling(self._attempts))
        self._attempts += 1
        return delay

    def reset(self) -> None:
        """Start again from the base delay."""
        self._attempts = 0


def is_fatal_refusal(error: BaseException, fatal_statuses: Collection[int] = DEFAULT_FATAL_STATUSES) -> bool:
    """Whether a failed connection attempt must not be retried: an upgrade refused with a fatal status."""
    return isinstance(error, UpgradeRefused) and error.status in fatal_statuses


def is_fatal_close(info: CloseInfo, fatal_close_reasons: Collection[str] = DEFAULT_FATAL_CLOSE_REASONS) -> bool:
    """Whether a closed connection must not be reopened: a 4008 close with one of the fatal reasons."""
    return info.code == POLICY_CLOSE_CODE and info.reason in fatal_close_reasons
