"""The package type-checks with mypy (zope plugin, untyped definitions disallowed)."""

from __future__ import annotations

import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests.support import REPO_ROOT


class TypingTests(SynchronousTestCase):
    """mypy runs clean over ``viewport/`` with the configuration in setup.cfg."""

    def test_mypy_clean(self) -> None:
        """mypy reports no issue in the package."""
        result = subprocess.run(
            [sys.executable, "-m", "mypy", "--cache-dir", "/dev/null"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
