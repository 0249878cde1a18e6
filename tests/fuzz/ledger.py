"""What the harness sent (tokens and payload markers) and the scan of the relay's output for them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Set, Tuple

from tests.support import RelayProcess

MARKER = re.compile(r"fzm[0-9a-z]{12}")
_B64_RUN = re.compile(r"[A-Za-z0-9_-]{16,}")


def _b36(value: int, width: int) -> str:
    digits = ""
    while value or len(digits) < width:
        value, rest = divmod(value, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[rest] + digits
    return digits[-width:]


@dataclass
class Leak:
    """A secret or payload found in the relay's output."""

    kind: str  # "token", "token-signature", "payload" or "identifier" (a marked request/session/user id)
    what: str
    source: str
    line: str


class Ledger:
    """Every token the harness minted and every payload marker it sent, and where they turn up."""

    def __init__(self, seed: int) -> None:
        self._prefix = "fzm" + _b36(seed, 6)
        self._count = 0
        self.markers: Dict[str, str] = {}
        self.identifiers: Set[str] = set()
        self.tokens: Dict[str, str] = {}  # needle segment (signature, else payload) -> token
        self.labels: Dict[str, str] = {}  # token -> label
        self._lengths: Set[int] = set()

    def marker(self, what: str, identifier: bool = False) -> str:
        """
        A fresh 15-character marker (``fzm`` + seed + counter), remembered with what carried it;
        ``identifier`` marks one used as a request/session/user id, which the relay may log by design.
        """
        self._count += 1
        mark = self._prefix + _b36(self._count, 6)
        self.markers[mark] = what
        if identifier:
            self.identifiers.add(mark)
        return mark

    def token(self, token: str, label: str) -> str:
        """Remember a token the harness is about to send; return it."""
        parts = token.split(".")
        needle = parts[2] if len(parts) == 3 and len(parts[2]) >= 16 else (parts[1] if len(parts) > 1 else token)
        if len(needle) >= 16 and _B64_RUN.fullmatch(needle):
            self.tokens[needle] = token
            self._lengths.add(len(needle))
        self.labels[token] = label
        return token

    def find(self, text: str) -> Tuple[List[str], List[str]]:
        """The markers and token needles in ``text``."""
        markers = [m for m in MARKER.findall(text) if m in self.markers]
        needles: List[str] = []
        for run in _B64_RUN.findall(text):
            if run in self.tokens:
                needles.append(run)
                continue
            for size in self._lengths:
                if len(run) > size:
                    for part in (run[:size], run[-size:]):
                        if part in self.tokens:
                            needles.append(part)
        return markers, needles

    def scan(self, sources: Iterable[Tuple[str, str]]) -> List[Leak]:
        """Every marker, token and token signature found in ``(source, line)`` pairs."""
        leaks: List[Leak] = []
        for source, line in sources:
            if "fzm" not in line and len(line) < 16:
                continue
            markers, needles = self.find(line)
            for mark in markers:
                kind = "identifier" if mark in self.identifiers else "payload"
                leaks.append(Leak(kind, f"{mark} ({self.markers[mark]})", source, line))
            for needle in needles:
                token = self.tokens[needle]
                kind = "token" if token in line else "token-signature"
                leaks.append(Leak(kind, f"{self.labels.get(token, '?')}: …{needle[-10:]}", source, line))
        return leaks


def relay_output(relay: RelayProcess) -> List[Tuple[str, str]]:
    """Everything the relay wrote: its stdout lines and its stderr lines."""
    out = [("stdout", line) for line in relay.output.lines]
    out += [("stderr", line) for line in relay.output.stderr.decode("utf-8", "replace").splitlines()]
    return out
