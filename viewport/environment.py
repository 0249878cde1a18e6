"""
What every service's configuration shares, in one pure module: the startup error that names its
variable, and what counts as a loopback (development) address.
"""

from __future__ import annotations

from urllib.parse import urlsplit

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class ConfigError(Exception):
    """A configuration value that stops startup; ``variable`` names the environment variable or option."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(variable, problem)
        self.variable = variable
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.variable}: {self.problem}"


def is_loopback_host(host: str) -> bool:
    """Whether a listen address is one of the loopback names ``127.0.0.1``, ``localhost`` or ``::1``."""
    return host.strip().lower() in _LOOPBACK_HOSTS


def looks_local(url: str) -> bool:
    """Whether a URL's host is ``localhost``, ``127.0.0.1``, ``::1`` or ends in ``.test``; unparsable is not local."""
    try:
        hostname = urlsplit(url.strip()).hostname or ""
    except ValueError:
        return False
    return hostname in _LOOPBACK_HOSTS or hostname.endswith(".test")
