"""Bus frame signatures (HMAC-SHA-256 over the contract's canonical string) and replay protection."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections import OrderedDict
from typing import Optional

from viewport.relay.interfaces import BusFrame


def canonical_string(frame: BusFrame, issued_at_ms: int, nonce: Optional[str] = None) -> str:
    """
    The signed text: eight contract fields joined by line feeds, payload last.

    Frames of our own Redis backplane carry a random ``nonce`` as a ninth line, so two identical
    frames published in the same millisecond still have different signatures.
    """
    parts = [
        frame.workspace_id,
        frame.runtime_target_id or "",
        frame.machine_id or "",
        frame.source_relay_id,
        frame.target_relay_id or "",
        frame.direction,
        str(issued_at_ms),
        frame.payload,
    ]
    if nonce is not None:
        parts.append(nonce)
    return "\n".join(parts)


def sign(key: str, frame: BusFrame, issued_at_ms: int, nonce: Optional[str] = None) -> str:
    """Unpadded base64url HMAC-SHA-256 of the canonical string (43 characters)."""
    digest = hmac.new(
        key.encode("utf-8"),
        canonical_string(frame, issued_at_ms, nonce).encode("utf-8"),
        hashlib.sha256,
    ).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def signature_matches(
    key: str, frame: BusFrame, issued_at_ms: int, signature: str, nonce: Optional[str] = None
) -> bool:
    """Constant-time comparison of a received signature with the expected one."""
    expected = sign(key, frame, issued_at_ms, nonce)
    return hmac.compare_digest(expected.encode("ascii"), signature.encode("utf-8", "replace"))


class Verdict:
    """Why an inbound bus frame was refused (or ``ACCEPTED``)."""

    ACCEPTED = "accepted"
    INVALID = "invalid"
    STALE = "stale"
    REPLAYED = "replayed"


class FrameVerifier:
    """
    Checks signature, clock skew and replays of inbound bus frames.

    Replays are recognised by the frame's signature, remembered for twice the skew window, in
    both backplanes: a bus that offers the same signed frame twice (under two ids, say) delivers
    it once. Redis envelopes sign a random nonce, so every publish has its own signature; a
    server-mode signature covers the contract's eight fields, so only a byte-identical frame
    from the same relay in the same millisecond looks like a replay. Unlike the reference relay
    (docs/protocol.md §9, item 18), a frame older than one already accepted from the same source is *not*
    dropped: concurrent publishes may arrive in any order.
    """

    def __init__(self, key: str, max_skew_ms: int, max_tracked: int) -> None:
        self._key = key
        self._max_skew_ms = max_skew_ms
        self._max_tracked = max_tracked
        self._seen: "OrderedDict[str, float]" = OrderedDict()

    def check(
        self,
        frame: BusFrame,
        issued_at_ms: object,
        signature: object,
        now_ms: float,
        nonce: Optional[str] = None,
    ) -> str:
        """Return a ``Verdict``; an accepted frame is remembered so it is never accepted twice."""
        if type(issued_at_ms) is not int or not isinstance(signature, str) or not signature:
            return Verdict.INVALID
        if abs(now_ms - issued_at_ms) > self._max_skew_ms:
            return Verdict.STALE
        if not signature_matches(self._key, frame, issued_at_ms, signature, nonce):
            return Verdict.INVALID
        self._forget_old(now_ms)
        if signature in self._seen:
            return Verdict.REPLAYED
        self._seen[signature] = now_ms
        while len(self._seen) > self._max_tracked:
            self._seen.popitem(last=False)
        return Verdict.ACCEPTED

    def _forget_old(self, now_ms: float) -> None:
        horizon = now_ms - 2 * self._max_skew_ms
        seen = self._seen
        while seen:
            oldest_key = next(iter(seen))
            if seen[oldest_key] >= horizon:
                break
            del seen[oldest_key]
