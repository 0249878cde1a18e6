"""``.ci/run`` runs the README's test command, word for word, after a fresh virtual environment."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command_in_a_fresh_venv() -> None:
    """The README's "Test it" command is the last line of .ci/run, right after the old .venv is removed."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Test it", 1)[1]
    command = re.search(r"```sh\n(.+?)\n```", section, re.S)
    assert command is not None
    lines = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines() if line.strip()]
    assert lines[-2:] == ["rm -rf .venv", command.group(1).strip()]
