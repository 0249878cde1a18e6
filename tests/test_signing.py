"""Bus frame signatures and replay protection."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from viewport.relay.backplane.signing import FrameVerifier, Verdict, sign
from viewport.relay.interfaces import BusFrame

KEY = "bus-signing-key"


def _frame(**changes: object) -> BusFrame:
    fields: dict = dict(
        workspace_id="workspace_demo",
        runtime_target_id="binding_demo",
        source_relay_id="relay-a",
        target_relay_id="relay-b",
        direction="client_to_daemon",
        payload='{"type":"e2ee"}',
    )
    fields.update(changes)
    return BusFrame(**fields)


class SignatureVectorTests(SynchronousTestCase):
    """Signatures match the contract's test vectors, so other relays and platforms agree."""

    def test_vector_client_to_daemon(self) -> None:
        """No machine id, targeted client→daemon frame."""
        self.assertEqual(sign(KEY, _frame(), 1700000000000), "0tj8t8d3L5OeHtapEsUWTmMMTzKa2xIiUNiIOhjr0vE")

    def test_vector_daemon_to_clients(self) -> None:
        """Machine id, untargeted daemon→clients frame."""
        frame = _frame(machine_id="machine_demo", target_relay_id=None, direction="daemon_to_clients")
        self.assertEqual(sign(KEY, frame, 1700000000000), "iFxmWvrWktBtXPSwRuKY66vAykGGrP39rAuCs89gopk")

    def test_nonce_changes_signature(self) -> None:
        """Two identical frames with different nonces sign differently."""
        self.assertNotEqual(sign(KEY, _frame(), 1, "a"), sign(KEY, _frame(), 1, "b"))


class VerifierTests(SynchronousTestCase):
    """Skew, tampering and replays are refused; concurrent publishes are not."""

    def setUp(self) -> None:
        self.verifier = FrameVerifier(KEY, max_skew_ms=15_000, max_tracked=1000)
        self.now = 1_700_000_000_000

    def test_valid_frame_accepted_once(self) -> None:
        """A fresh, correctly signed frame is accepted, and the same frame again is a replay."""
        frame = _frame()
        signature = sign(KEY, frame, self.now)
        self.assertEqual(self.verifier.check(frame, self.now, signature, self.now), Verdict.ACCEPTED)
        self.assertEqual(self.verifier.check(frame, self.now, signature, self.now + 5), Verdict.REPLAYED)

    def test_tampered_payload_invalid(self) -> None:
        """A payload that differs from what was signed is invalid."""
        signature = sign(KEY, _frame(), self.now)
        self.assertEqual(self.verifier.check(_frame(payload="{}"), self.now, signature, self.now), Verdict.INVALID)

    def test_missing_signature_or_time_invalid(self) -> None:
        """Frames without an integer issuedAtMs or a signature are invalid."""
        self.assertEqual(self.verifier.check(_frame(), None, "x", self.now), Verdict.INVALID)
        self.assertEqual(self.verifier.check(_frame(), self.now, "", self.now), Verdict.INVALID)
        self.assertEqual(self.verifier.check(_frame(), float(self.now), "x", self.now), Verdict.INVALID)

    def test_skew_both_directions_stale(self) -> None:
        """Frames issued too far in the past or future are stale."""
        for issued in (self.now - 15_001, self.now + 15_001):
            signature = sign(KEY, _frame(), issued)
            self.assertEqual(self.verifier.check(_frame(), issued, signature, self.now), Verdict.STALE)

    def test_older_frame_after_newer_is_accepted(self) -> None:
        """Concurrent publishes may arrive out of order: an older frame is still delivered (docs/protocol.md §9, item 18)."""
        newer, older = _frame(payload='{"n":2}'), _frame(payload='{"n":1}')
        self.assertEqual(
            self.verifier.check(newer, self.now, sign(KEY, newer, self.now), self.now), Verdict.ACCEPTED
        )
        self.assertEqual(
            self.verifier.check(older, self.now - 3, sign(KEY, older, self.now - 3), self.now), Verdict.ACCEPTED
        )

    def test_same_signature_is_a_replay(self) -> None:
        """A frame whose signature was accepted before is a replay, however it is offered again."""
        frame = _frame()
        signature = sign(KEY, frame, self.now)
        self.assertEqual(self.verifier.check(frame, self.now, signature, self.now), Verdict.ACCEPTED)
        self.assertEqual(self.verifier.check(frame, self.now, signature, self.now + 5), Verdict.REPLAYED)
