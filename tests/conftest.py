"""Suite-wide checks on what the services a test started logged: no token, and no error the test did not expect."""

from __future__ import annotations

import json
import re
from typing import Any, Dict, Generator, List, Optional, Pattern, Set, Tuple

import pytest

from tests.support import MINTED_TOKENS, ServiceOutput

# Any JWT, or the start of one (a header and part of a payload, as a truncated message shows it).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}")
_TRACEBACK = "Traceback (most recent call last)"
#: The marker a test carries when its services are expected to log errors (registered in setup.cfg).
LOG_ERRORS_MARKER = "relay_log_errors"
_SCANNED: Dict[int, Tuple[int, int]] = {}
_TOTALS = {"lines": 0, "bytes": 0, "leaks": 0, "errors": 0, "expected": 0}
#: Marked tests whose patterns matched nothing in this run: ``nodeid -> patterns``.
_UNUSED: Dict[str, List[str]] = {}


def _new_text(output: ServiceOutput) -> Tuple[List[str], str]:
    """What ``output`` collected since it was last scanned: new stdout lines and new stderr."""
    lines_seen, stderr_seen = _SCANNED.get(id(output), (0, 0))
    lines = output.lines[lines_seen:]
    stderr = output.stderr[stderr_seen:].decode("utf-8", "replace")
    _SCANNED[id(output)] = (len(output.lines), len(output.stderr))
    return lines, stderr


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


def _is_error_line(line: str) -> bool:
    """An error-level JSON log entry, or any line carrying a Python traceback."""
    if _TRACEBACK in line:
        return True
    try:
        entry = json.loads(line)
    except ValueError:
        return False
    return isinstance(entry, dict) and entry.get("level") == "error"


def _errors(lines: List[str], stderr: str) -> List[str]:
    """The error entries among ``lines``, and the tracebacks written to stderr (each from its first line)."""
    found = [line for line in lines if _is_error_line(line)]
    start = stderr.find(_TRACEBACK)
    while start != -1:
        end = stderr.find(_TRACEBACK, start + 1)
        found.append("stderr: " + stderr[start:end if end != -1 else len(stderr)])
        start = end
    return found


def _expected_patterns(item: pytest.Item) -> List[Pattern[str]]:
    """The patterns of the test's ``relay_log_errors`` markers (each one matches the errors it expects)."""
    patterns: List[Pattern[str]] = []
    for marker in item.iter_markers(LOG_ERRORS_MARKER):
        if not marker.args or not all(isinstance(arg, str) for arg in marker.args) or marker.kwargs:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{LOG_ERRORS_MARKER} takes one or more regex strings")
        try:
            patterns.extend(re.compile(arg) for arg in marker.args)
        except re.error as error:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{LOG_ERRORS_MARKER}: {error}") from None
    return patterns


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    """A malformed ``relay_log_errors`` marker stops the run before any test starts."""
    for item in items:
        _expected_patterns(item)


def _check_service_logs(item: pytest.Item) -> List[str]:
    """
    Scan what every relay, bus and container logged since the last scan; return the problems:
    lines carrying a token, and error entries or tracebacks that no pattern of the test's
    ``relay_log_errors`` markers matches.
    """
    expected = _expected_patterns(item)
    used: Set[Pattern[str]] = set()
    leaks: List[str] = []
    unexpected: List[str] = []
    for output in list(ServiceOutput.instances):
        lines, stderr = _new_text(output)
        leaks += _leaks(lines + [stderr])
        for error in _errors(lines, stderr):
            _TOTALS["errors"] += 1
            matching = [pattern for pattern in expected if pattern.search(error)]
            if matching:
                _TOTALS["expected"] += 1
                used.update(matching)
            else:
                unexpected.append(error[:600])
    unused = [pattern.pattern for pattern in expected if pattern not in used]
    if unused:
        _UNUSED[item.nodeid] = unused
    problems = []
    if leaks:
        problems.append(f"{len(leaks)} logged line(s) carry a token: {leaks[:3]}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} error(s) logged by a service this test started, and no "
            f"@pytest.mark.{LOG_ERRORS_MARKER} pattern of the test expects them: {unexpected[:3]}"
        )
    return problems


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Generator[None, Any, Any]:
    """
    After each test and every fixture it finishes (module-scoped ones included), check what the
    services logged meanwhile; a token in a line, or an unexpected error, fails the test.
    """
    try:
        result = yield
    except BaseException:
        _check_service_logs(item)  # what the failed teardown left behind is not blamed on the next test
        raise
    problems = _check_service_logs(item)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
    return result


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say how much service output was scanned for tokens and errors, and which expected errors did not occur."""
    terminalreporter.write_line(
        f"token scan of service logs: {len(ServiceOutput.instances)} processes, {_TOTALS['lines']} lines, "
        f"{_TOTALS['bytes']} bytes, {len(MINTED_TOKENS)} tokens minted by helpers, {_TOTALS['leaks']} leaks"
    )
    terminalreporter.write_line(
        f"error scan of service logs: {_TOTALS['errors']} error entries or tracebacks, "
        f"{_TOTALS['expected']} expected by @pytest.mark.{LOG_ERRORS_MARKER}"
    )
    for nodeid, patterns in sorted(_UNUSED.items()):
        terminalreporter.write_line(f"  expected but not logged in {nodeid}: {patterns}")
