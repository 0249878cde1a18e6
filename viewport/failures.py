"""How a failure is described in a log line or an error answer: short, and without what the failed call carried."""

from __future__ import annotations

from twisted.python.failure import Failure

MAX_DESCRIPTION_CHARS = 200


def describe_failure(failure: Failure) -> str:
    """The error's own message (else its type's name), cut at ``MAX_DESCRIPTION_CHARS``; never a traceback."""
    error = failure.value
    text = str(error).strip() or type(error).__name__
    return text[:MAX_DESCRIPTION_CHARS]
