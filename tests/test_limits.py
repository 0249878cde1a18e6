"""Tests for the fixed-window and token-bucket rate limiters."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from viewport.relay.limits import FixedWindowLimiter, TokenBucketLimiter

MINUTE = 60_000


class FixedWindowTests(SynchronousTestCase):
    """Tests for L{FixedWindowLimiter}."""

    def test_allows_limit_then_denies(self) -> None:
        """Up to ``limit`` requests in one window are allowed and the next ones denied."""
        limiter = FixedWindowLimiter(3, MINUTE, 10)
        self.assertEqual([limiter.allow("ip", t) for t in (0, 1, 2, 3, 4)], [True, True, True, False, False])

    def test_window_starts_at_first_request(self) -> None:
        """The window runs from the key's first request, not from a clock boundary."""
        limiter = FixedWindowLimiter(1, MINUTE, 10)
        self.assertTrue(limiter.allow("ip", 30_000))
        self.assertFalse(limiter.allow("ip", 30_000 + MINUTE - 1))
        self.assertTrue(limiter.allow("ip", 30_000 + MINUTE))

    def test_new_window_resets_count(self) -> None:
        """The first request after the window starts a new window with a fresh allowance."""
        limiter = FixedWindowLimiter(2, MINUTE, 10)
        for t in (0, 1, 2):
            limiter.allow("ip", t)
        self.assertEqual([limiter.allow("ip", t) for t in (70_000, 70_001, 70_002)], [True, True, False])
        self.assertFalse(limiter.allow("ip", 70_000 + MINUTE - 1))

    def test_keys_are_independent(self) -> None:
        """Each key has its own window."""
        limiter = FixedWindowLimiter(1, MINUTE, 10)
        self.assertTrue(limiter.allow("a", 0))
        self.assertFalse(limiter.allow("a", 1))
        self.assertTrue(limiter.allow("b", 1))

    def test_sweep_deletes_windows_two_windows_old(self) -> None:
        """Sweeping deletes keys whose window started at least two windows ago and keeps younger ones."""
        limiter = FixedWindowLimiter(1, MINUTE, 10)
        limiter.allow("old", 0)
        limiter.allow("young", MINUTE + 1)
        limiter.sweep(2 * MINUTE)
        self.assertEqual(len(limiter), 1)
        self.assertFalse(limiter.allow("young", 2 * MINUTE))

    def test_denied_requests_do_not_extend_window(self) -> None:
        """Denied requests keep the original window start, so a hammering key is still swept."""
        limiter = FixedWindowLimiter(1, MINUTE, 10)
        limiter.allow("ip", 0)
        limiter.allow("ip", MINUTE - 1)
        limiter.sweep(2 * MINUTE)
        self.assertEqual(len(limiter), 0)

    def test_key_cap_evicts_least_recently_used(self) -> None:
        """Past ``max_keys`` the least recently used key is evicted and starts fresh."""
        limiter = FixedWindowLimiter(1, MINUTE, 2)
        limiter.allow("a", 0)
        limiter.allow("b", 1)
        limiter.allow("c", 2)
        self.assertEqual(len(limiter), 2)
        self.assertFalse(limiter.allow("b", 3))
        self.assertTrue(limiter.allow("a", 4))

    def test_denied_request_touches_key(self) -> None:
        """Every request, even a denied one, makes its key the most recently used."""
        limiter = FixedWindowLimiter(1, MINUTE, 2)
        limiter.allow("a", 0)
        limiter.allow("b", 1)
        self.assertFalse(limiter.allow("a", 2))
        limiter.allow("c", 3)
        self.assertFalse(limiter.allow("a", 4))
        self.assertTrue(limiter.allow("b", 5))

    def test_rejects_non_positive_settings(self) -> None:
        """Zero or negative settings are refused at construction."""
        for args in ((0, MINUTE, 1), (1, 0, 1), (1, MINUTE, 0)):
            self.assertRaises(ValueError, FixedWindowLimiter, *args)


class TokenBucketTests(SynchronousTestCase):
    """Tests for L{TokenBucketLimiter}."""

    def test_new_key_allows_full_burst(self) -> None:
        """A new key starts full: ``capacity`` requests at once are allowed, the next denied."""
        limiter = TokenBucketLimiter(4, MINUTE, 10)
        self.assertEqual([limiter.allow("w", 0) for _ in range(5)], [True] * 4 + [False])

    def test_refill_is_continuous_and_fractional(self) -> None:
        """Tokens refill at ``capacity`` per period and fractions accumulate across denied requests."""
        limiter = TokenBucketLimiter(60, MINUTE, 10)
        for _ in range(60):
            limiter.allow("w", 0)
        self.assertFalse(limiter.allow("w", 500))
        self.assertTrue(limiter.allow("w", 1000))
        self.assertFalse(limiter.allow("w", 1000))
        self.assertFalse(limiter.allow("w", 1999))
        self.assertTrue(limiter.allow("w", 2000))

    def test_needs_a_whole_token(self) -> None:
        """Less than one whole token is not enough for a request."""
        limiter = TokenBucketLimiter(2, MINUTE, 10)
        limiter.allow("w", 0)
        limiter.allow("w", 0)
        self.assertFalse(limiter.allow("w", MINUTE / 2 - 1))
        self.assertTrue(limiter.allow("w", MINUTE / 2))

    def test_refill_capped_at_capacity(self) -> None:
        """A long idle period refills to ``capacity`` and no further."""
        limiter = TokenBucketLimiter(3, MINUTE, 10)
        limiter.allow("w", 0)
        results = [limiter.allow("w", 10 * MINUTE) for _ in range(4)]
        self.assertEqual(results, [True, True, True, False])

    def test_clock_going_back_mints_nothing(self) -> None:
        """A timestamp earlier than the last refill neither refills nor moves the refill mark back."""
        limiter = TokenBucketLimiter(1, MINUTE, 10)
        limiter.allow("w", MINUTE)
        self.assertFalse(limiter.allow("w", 0))
        self.assertFalse(limiter.allow("w", 2 * MINUTE - 1))
        self.assertTrue(limiter.allow("w", 2 * MINUTE))

    def test_sweep_deletes_buckets_two_periods_idle(self) -> None:
        """Sweeping deletes keys last refilled at least two periods ago and keeps younger ones."""
        limiter = TokenBucketLimiter(1, MINUTE, 10)
        limiter.allow("old", 0)
        limiter.allow("young", 0)
        limiter.allow("young", 1)
        limiter.sweep(2 * MINUTE)
        self.assertEqual(len(limiter), 1)
        limiter.sweep(2 * MINUTE + 1)
        self.assertEqual(len(limiter), 0)

    def test_key_cap_evicts_least_recently_used(self) -> None:
        """Past ``max_keys`` the least recently used key is evicted and starts full again."""
        limiter = TokenBucketLimiter(1, MINUTE, 2)
        limiter.allow("a", 0)
        limiter.allow("b", 0)
        self.assertFalse(limiter.allow("a", 1))
        limiter.allow("c", 2)
        self.assertEqual(len(limiter), 2)
        self.assertFalse(limiter.allow("a", 3))
        self.assertTrue(limiter.allow("b", 4))

    def test_rejects_non_positive_settings(self) -> None:
        """Zero or negative settings are refused at construction."""
        for args in ((0, MINUTE, 1), (1, 0, 1), (1, MINUTE, 0)):
            self.assertRaises(ValueError, TokenBucketLimiter, *args)
