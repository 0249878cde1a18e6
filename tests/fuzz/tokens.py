"""Tokens for the fuzz: compact JWS of any header and payload, valid ones and forged ones."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import time
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

from tests.fuzz.ledger import Ledger
from tests.support import TEST_SECRET


def b64url(data: bytes) -> str:
    """Unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jws(header: Any, payload: Any, key: str = TEST_SECRET, alg: str = "HS256") -> str:
    """A compact JWS of any header and payload (dicts are JSON-encoded, str/bytes taken verbatim)."""

    def part(value: Any) -> str:
        raw = value if isinstance(value, bytes) else value.encode() if isinstance(value, str) else json.dumps(value).encode()
        return b64url(raw)

    signing = f"{part(header)}.{part(payload)}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}.get(alg)
    sig = b64url(hmac.new(key.encode(), signing.encode(), digest).digest()) if digest else ""
    return f"{signing}.{sig}"


class Tokens:
    """Valid and forged tokens for one workspace, each remembered by the ledger."""

    def __init__(self, ledger: Ledger, rng: random.Random) -> None:
        self.ledger = ledger
        self.rng = rng

    def claims(self, role: str, workspace: str, target: Optional[str], **extra: Any) -> Dict[str, Any]:
        """Claims as the relay's CLI mints them (iat/exp/jti included)."""
        now = int(time.time())
        body: Dict[str, Any] = {"role": role, "workspaceId": workspace, "iat": now, "exp": now + 3600,
                                "jti": self.ledger.marker("jti")}
        if target is not None:
            body["runtimeTargetId"] = target
        if role == "client":
            body["scope"] = "runtime"
        if role == "worker":
            body["managedExecutorId"] = "fzexec"
        body.update(extra)
        return {k: v for k, v in body.items() if v is not None}

    def valid(self, role: str, workspace: str, target: Optional[str], label: str = "valid", **extra: Any) -> str:
        """A token the relay accepts for ``role``."""
        return self.ledger.token(jws({"alg": "HS256", "typ": "JWT"}, self.claims(role, workspace, target, **extra)), label)

    def forged(self, role: str, workspace: str, target: str) -> Tuple[str, str, FrozenSet[int]]:
        """A (label, token, acceptable upgrade statuses) triple: mostly refused, some valid edge cases."""
        rng, now = self.rng, int(time.time())
        good = self.claims(role, workspace, target)
        head = {"alg": "HS256", "typ": "JWT"}
        mark = self.ledger.marker("garbage-token")
        choices: List[Tuple[str, Callable[[], str], FrozenSet[int]]] = [
            ("expired", lambda: jws(head, {**good, "iat": now - 7200, "exp": now - 120}), frozenset({401})),
            ("expired-within-leeway", lambda: jws(head, {**good, "exp": now - 5}), frozenset({101})),
            ("not-yet-valid", lambda: jws(head, {**good, "nbf": now + 600}), frozenset({401})),
            ("issued-in-future", lambda: jws(head, {**good, "iat": now + 600}), frozenset({401})),
            ("no-exp", lambda: jws(head, {k: v for k, v in good.items() if k != "exp"}), frozenset({401})),
            ("wrong-key", lambda: jws(head, good, key="not-the-secret-0123456789abcdefghij"), frozenset({401})),
            ("alg-none", lambda: jws({"alg": "none", "typ": "JWT"}, good, alg="none"), frozenset({401})),
            ("alg-HS512", lambda: jws({"alg": "HS512"}, good, alg="HS512"), frozenset({401})),
            ("alg-RS256-hmac", lambda: jws({"alg": "RS256"}, good), frozenset({401})),
            ("tampered-payload", lambda: self._swap_payload(jws(head, good), {**good, "workspaceId": "other"}), frozenset({401})),
            ("tampered-signature", lambda: self._flip(jws(head, good)), frozenset({401})),
            ("truncated", lambda: jws(head, good)[: -rng.randint(1, 30)], frozenset({401})),
            ("role-mismatch", lambda: jws(head, {**good, "role": "worker" if role != "worker" else "client"}), frozenset({401})),
            ("workspace-mismatch", lambda: jws(head, {**good, "workspaceId": "fz-elsewhere"}), frozenset({101})),
            ("unknown-claim", lambda: jws(head, {**good, "isAdmin": True}), frozenset({401})),
            ("wrong-type-claim", lambda: jws(head, {**good, rng.choice(["workspaceId", "clientId", "scope", "machineId",
                                                                       "daemonIssueGeneration", "sessionChannels"]): rng.choice([5, True, None, [], {}, "", -1])}),
             frozenset({101, 401})),
            ("registered-claims", lambda: jws(head, {**good, "sub": "user", "aud": ["a", "b"], "iss": "x", "nbf": now - 1.5}),
             frozenset({101})),
            ("exp-nonfinite", lambda: jws(head, json.dumps({**good, "exp": rng.choice([float("nan"), float("inf")])})),
             frozenset({401})),
            # A date claim no date can be (most are past a float's range): a refusal, never a 500.
            ("exp-huge", lambda: self._huge_date(head, good, "exp"), frozenset({401})),
            ("iat-huge", lambda: self._huge_date(head, good, "iat"), frozenset({401})),
            ("nbf-huge", lambda: self._huge_date(head, good, "nbf"), frozenset({401})),
            ("payload-not-object", lambda: jws(head, rng.choice(['[1,2]', '"x"', "null", "1", "{"])), frozenset({401})),
            ("payload-deep", lambda: jws(head, "[" * 2500 + "]" * 2500), frozenset({401})),
            ("header-deep", lambda: jws("[" * 2000 + "]" * 2000, good), frozenset({401})),
            ("header-crit", lambda: jws({"alg": "HS256", "crit": ["b64"], "b64": False}, good), frozenset({101, 401})),
            ("garbage", lambda: mark + "".join(rng.choice("abcXYZ09._-~+/=") for _ in range(rng.randint(0, 80))),
             frozenset({401})),
            ("too-short", lambda: "eyJ" + "a" * rng.randint(0, 6), frozenset({401})),
            ("too-long", lambda: jws(head, {**good, "userId": "u" * 128, "pad": mark}) + "A" * 4100, frozenset({401})),
        ]
        label, make, expect = rng.choice(choices)
        return label, self.ledger.token(make(), "forged-" + label), expect

    def _huge_date(self, head: Dict[str, Any], claims: Dict[str, Any], name: str) -> str:
        """``claims`` with the ``name`` claim (last, so it wins) an integer of 21 to 3001 digits, either sign."""
        digits = "1" + "0" * self.rng.randint(20, 3000)
        return jws(head, json.dumps(claims)[:-1] + f',"{name}":{self.rng.choice(["", "-"])}{digits}}}')

    def _swap_payload(self, token: str, payload: Dict[str, Any]) -> str:
        head, _, sig = token.split(".")
        return f"{head}.{b64url(json.dumps(payload).encode())}.{sig}"

    def _flip(self, token: str) -> str:
        head, payload, sig = token.split(".")
        index = self.rng.randrange(len(sig) - 1)
        swapped = "B" if sig[index] != "B" else "C"
        return f"{head}.{payload}.{sig[:index]}{swapped}{sig[index + 1:]}"
