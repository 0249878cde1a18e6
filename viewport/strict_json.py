"""
JSON as the peers' ``JSON.parse`` reads it: Python's ``json`` would also accept ``NaN``, ``Infinity`` and
``-Infinity``, which are not JSON, so every parser of outside input here refuses them through this module.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn


def reject_constant(name: str) -> NoReturn:
    """``parse_constant`` for ``json``: ``NaN`` and the infinities are not JSON."""
    raise ValueError(f"{name} is not JSON")


def loads(text: str | bytes) -> Any:
    """``json.loads`` without the non-JSON constants; raises ``ValueError`` for anything that is not JSON."""
    return json.loads(text, parse_constant=reject_constant)
