"""The peers of one frames batch: who each is, what each sent and received, and the frames scenarios send."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from tests.fuzz.frames import CHANNEL, frame_text
from tests.fuzz.ledger import Ledger
from tests.fuzz.wire import OP_BINARY, RawPeer


def _normal(opcode: int, payload: bytes) -> bytes:
    """What the relay forwards for a message: binary is read as UTF-8 with replacement."""
    return payload.decode("utf-8", "replace").encode("utf-8") if opcode == OP_BINARY else payload


@dataclass
class PeerSpec:
    """Who a scripted peer is: role, query, claims."""

    role: str
    workspace: str
    target: Optional[str]
    claims: Dict[str, Any] = field(default_factory=dict)


class Scope:
    """The peers of one frames batch, everything they sent and received."""

    def __init__(self, specs: Dict[str, PeerSpec], ledger: Ledger) -> None:
        self.specs = specs
        self.ledger = ledger
        self.live: Dict[str, RawPeer] = {}
        self.history: Dict[str, List[RawPeer]] = {}
        self.sent: Dict[str, Set[bytes]] = {}

    def note_sent(self, name: str, messages: Iterable[Tuple[int, bytes]]) -> None:
        """Remember what ``name`` sent, as the relay would forward it."""
        bucket = self.sent.setdefault(name, set())
        for opcode, payload in messages:
            bucket.add(_normal(opcode, payload))

    def sent_by(self, which: Callable[[str], bool]) -> Set[bytes]:
        """Everything the matching senders sent."""
        return set().union(*(v for k, v in self.sent.items() if which(k))) if self.sent else set()

    def mark_counts(self, payload: bytes) -> Dict[str, int]:
        """Which peers (all their connections this batch) received exactly ``payload``."""
        counts: Dict[str, int] = {}
        for name, peers in self.history.items():
            got = sum(1 for peer in peers for _, p in peer.messages if p == payload)
            if got:
                counts[name] = got
        return counts

    def kex_init(self, request_id: str) -> bytes:
        """A v3 key exchange init with marked keys."""
        m = self.ledger.marker
        return frame_text({"type": "relay_key_exchange_init", "version": 3, "profile": "noise-ik", "requestId": request_id,
                           "clientEphemeralPublicKey": m("kex-init"), "encryptedClientStatic": m("kex-init")})

    def kex_response(self, request_id: str, session_id: str) -> bytes:
        """A v3 key exchange response with marked keys."""
        m = self.ledger.marker
        return frame_text({"type": "relay_key_exchange_response", "version": 3, "profile": "noise-ik", "requestId": request_id,
                           "daemonPublicKey": m("kex-response"), "daemonEphemeralPublicKey": "e", "encryptedMetadata": m("kex-response"),
                           "sessionId": session_id, "proof": m("kex-response"), "epoch": 1})

    def envelope(self, session_id: str) -> bytes:
        """An E2EE envelope whose ciphertext is a marker."""
        m = self.ledger.marker
        return frame_text({"type": "e2ee", "version": 2, "profile": "noise-ik", "sessionId": session_id, "epoch": 1, "seq": 1,
                           "iv": m("iv"), "tag": m("tag"), "ciphertext": m("ciphertext")})

    def valid_text(self, sender: str, rng: random.Random) -> bytes:
        """A valid frame for ``sender``'s role, carrying markers (the base of the byte-level cases)."""
        if sender == "daemon":
            return rng.choice([self.envelope, lambda s: self.kex_response("r1", s)])(rng.choice(["s1", "s2"]))
        if sender in ("s1", "s2"):
            return frame_text({"type": "viewport.session_viewer_presence/v1", "channel": CHANNEL, "action": "heartbeat",
                               "userId": self.ledger.marker("presence-user", True)})
        if sender == "pairing":
            return frame_text({"type": "relay_pairing_redeem_request", "requestId": self.ledger.marker("pairing-request", True),
                               "offerId": "o", "encIv": "i", "encTag": "t", "encCiphertext": self.ledger.marker("pairing-ciphertext")})
        return rng.choice([self.envelope, self.kex_init])(rng.choice(["s1", "r1", self.ledger.marker("id", True)]))
