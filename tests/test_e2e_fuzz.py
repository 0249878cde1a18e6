"""End-to-end: a bounded fuzz run against a real relay process (heads, frames, then a scan of its output)."""

from __future__ import annotations

import os
from typing import Any, Dict, List

import pytest
import pytest_twisted
from twisted.internet.defer import inlineCallbacks

from tests.fuzz.driver import CRASHES_KINDS, Finding, FuzzDriver, fuzz_env, rss_kib, summary
from tests.support import RelayProcess, start_relays, stop_relays

SEED = int(os.environ.get("FUZZ_SEED", "20240611"))
HEADS = int(os.environ.get("FUZZ_HEADS", "600"))
FRAMES = int(os.environ.get("FUZZ_FRAMES", "3000"))
CRASHES = CRASHES_KINDS


@pytest.fixture(scope="module")
def run() -> Any:
    """One relay fuzzed once with SEED (FUZZ_SEED/FUZZ_HEADS/FUZZ_FRAMES override); the tests read the results."""
    relay = RelayProcess(fuzz_env())
    pytest_twisted.blockon(start_relays(relay))
    result: Dict[str, Any] = {"relay": relay}

    @inlineCallbacks
    def fuzz() -> Any:
        driver = FuzzDriver(relay, SEED)
        result["driver"] = driver
        result["rss_before"] = rss_kib(driver.pid)
        yield driver.heads(HEADS)
        result["health_after_heads"] = yield driver.check()
        yield driver.frames(FRAMES)
        yield driver.settle_slow()
        result["health"] = yield driver.check()
        result["rss_after"] = rss_kib(driver.pid)
        result["leaks"] = driver.scan()

    pytest_twisted.blockon(fuzz())
    driver = result["driver"]
    print(f"\nseed {SEED}: {summary(driver.total, driver.findings, result['leaks'])}\n"
          f"relay RSS {result['rss_before']} KiB before, {result['rss_after']} KiB after")
    yield result
    pytest_twisted.blockon(stop_relays(relay))


def _lines(items: List[Any]) -> str:
    return "\n".join(item.line() if isinstance(item, Finding) else f"{item.kind} {item.what} in {item.source}: {item.line[:600]}"
                     for item in items[:40])


def test_relay_survives_the_fuzz(run: Any) -> None:
    """After every head and frame the relay is still running, answers /health, and logged no traceback or error."""
    crashes = [f for f in run["driver"].findings if f.kind in CRASHES]
    for health in (run["health_after_heads"], run["health"]):
        assert health.alive and health.health_ok, _lines(crashes)
    assert crashes == [], _lines(crashes)


def test_no_token_or_payload_in_relay_output(run: Any) -> None:
    """
    No token the harness minted (nor its signature) and no payload it sent appears in the relay's stdout
    or stderr; request, session and user ids may (the relay logs them by design).
    """
    leaks = [leak for leak in run["leaks"] if leak.kind != "identifier"]
    assert leaks == [], f"{len(leaks)} found:\n" + _lines(leaks)


def test_relay_answers_as_the_protocol_says(run: Any) -> None:
    """Statuses, close codes, subprotocol echoes and routing of every fuzz case match docs/protocol.md."""
    others = [f for f in run["driver"].findings if f.kind not in CRASHES]
    assert others == [], f"{len(others)} findings:\n" + _lines(others)
