"""
The image's pinned dependencies: the runtime closure of viewport-relay as installed in this venv.

``deploy/image-constraints.txt`` is generated from it (``.venv/bin/python -m tests.image_constraints >
deploy/image-constraints.txt``): every distribution ``pip install .`` pulls in, with the extras the
requirements ask for, pinned to the version installed here, and nothing that only the tests need.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Dict, Iterable, List, Set, Tuple, cast

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "viewport-relay"
CONSTRAINTS_PATH = os.path.join("deploy", "image-constraints.txt")
HEADER = f"""\
# Pinned runtime dependencies of the Docker image (Dockerfile: pip wheel --constraint).
# Generated from a working venv: .venv/bin/python -m tests.image_constraints > {CONSTRAINTS_PATH}
# tests/test_image.py checks that every runtime dependency is pinned here.
"""


def _wanted(requirement: Requirement, extras: Iterable[str]) -> bool:
    if requirement.marker is None:
        return True
    environment = cast(Dict[str, str], dict(default_environment()))
    return any(requirement.marker.evaluate({**environment, "extra": extra}) for extra in (*extras, ""))


def runtime_closure(project: str = PROJECT) -> Dict[str, str]:
    """Canonical name → installed version of every distribution ``project`` needs at run time (itself excluded)."""
    found: Dict[str, str] = {}
    pending: List[Tuple[str, Tuple[str, ...]]] = [(project, ())]
    seen: Set[Tuple[str, Tuple[str, ...]]] = set()
    while pending:
        name, extras = pending.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        distribution = metadata.distribution(name)
        if canonicalize_name(name) != canonicalize_name(project):
            found[canonicalize_name(name)] = distribution.version
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if _wanted(requirement, extras):
                pending.append((requirement.name, tuple(sorted(requirement.extras))))
    return dict(sorted(found.items()))


def pinned(path: str) -> Dict[str, str]:
    """Canonical name → version of each ``name==version`` line of a constraints file."""
    pins: Dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            text = line.split("#", 1)[0].strip()
            if text:
                name, _, version = text.partition("==")
                pins[canonicalize_name(name.strip())] = version.strip()
    return pins


def render(closure: Dict[str, str]) -> str:
    """The constraints file for ``closure``."""
    return HEADER + "".join(f"{name}=={version}\n" for name, version in closure.items())


if __name__ == "__main__":
    sys.stdout.write(render(runtime_closure()))
