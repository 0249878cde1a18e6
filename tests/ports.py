"""
Loopback ports for a process that must be told its port before it starts (Redis, PostgreSQL, a
balancer, the original relay).

Standard library only, so the benchmarks' measuring process (which runs no Twisted, see
``benchmarks/harness.py``) can import it as well as the tests.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


__all__ = ["free_port"]
