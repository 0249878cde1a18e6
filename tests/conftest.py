"""Suite-wide checks: no service a test started may write a token into its log."""

from __future__ import annotations

import re
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from tests.support import MINTED_TOKENS, ServiceOutput

# Any JWT, or the start of one (a header and part of a payload, as a truncated message shows it).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}")
_SCANNED: Dict[int, Tuple[int, int]] = {}
_TOTALS = {"lines": 0, "bytes": 0, "leaks": 0}


def _new_text(output: ServiceOutput) -> List[str]:
    """What ``output`` collected since it was last scanned: new stdout lines and new stderr."""
    lines_seen, stderr_seen = _SCANNED.get(id(output), (0, 0))
    texts = output.lines[lines_seen:]
    texts.append(output.stderr[stderr_seen:].decode("utf-8", "replace"))
    _SCANNED[id(output)] = (len(output.lines), len(output.stderr))
    return texts


def _leaks(texts: List[str]) -> List[str]:
    # The signature, or a stretch of the claims, of any token the helpers minted.
    signatures = {part for token in MINTED_TOKENS for part in (token.rsplit(".", 1)[1], token.split(".")[1][8:40])}
    found = []
    for text in texts:
        _TOTALS["lines"] += 1
        _TOTALS["bytes"] += len(text)
        if _JWT.search(text) or any(signature in text for signature in signatures):
            found.append(text[:300])
    _TOTALS["leaks"] += len(found)
    return found


@pytest.fixture(autouse=True)
def no_token_in_service_logs() -> Iterator[None]:
    """After every test, scan what every relay and bus process logged meanwhile for tokens; any hit fails the test."""
    yield
    found: List[str] = []
    for output in list(ServiceOutput.instances):
        found += _leaks(_new_text(output))
    if found:
        pytest.fail(f"{len(found)} logged line(s) carry a token: {found[:3]}", pytrace=False)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say how much service output was scanned for tokens, and how many leaks were found."""
    terminalreporter.write_line(
        f"token scan of service logs: {len(ServiceOutput.instances)} processes, {_TOTALS['lines']} lines, "
        f"{_TOTALS['bytes']} bytes, {len(MINTED_TOKENS)} tokens minted by helpers, {_TOTALS['leaks']} leaks"
    )
