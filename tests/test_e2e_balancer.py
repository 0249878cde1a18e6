"""HAProxy (deploy/haproxy/haproxy.cfg) in front of two relays: sticky by workspace, failover on stop, per-IP limits per client.

Needs Debian's ``haproxy`` (``apt-get install haproxy``; ``.ci/run`` installs it). The helpers and
scenarios, shared with the nginx test, are in ``tests/balancers.py``.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted

from tests.balancers import (
    LIMITED_RELAY_ENV,
    Balancer,
    SourceClients,
    needs_haproxy,
    per_source_limits,
    relay_address,
    sticky_failover,
)
from tests.support import RelayProcess, e2e_env, start_relays, stop_relays

__all__ = ["Balancer", "needs_haproxy"]  # tests/test_e2e_rolling_restart.py imports them from here


@needs_haproxy
@pytest_twisted.inlineCallbacks
def test_workspace_sticks_to_one_relay_and_fails_over() -> Any:
    """Daemon and browsers of a workspace land on the same relay; when it stops they reconnect through HAProxy and traffic resumes."""
    resumed = yield sticky_failover(Balancer, workspace_count=6)
    print(f"\nHAProxy: traffic resumed {resumed:.2f} s after the workspace's relay stopped")


@needs_haproxy
@pytest_twisted.inlineCallbacks
def test_per_ip_limits_count_each_client_address_behind_haproxy() -> Any:
    """Behind HAProxy each client address meets its own connection cap and upgrade rate, and a forged X-Forwarded-For is replaced."""
    yield per_source_limits(Balancer)


@pytest_twisted.inlineCallbacks
def test_forwarded_for_counts_only_from_a_trusted_proxy() -> Any:
    """A relay counts the first X-Forwarded-For entry of a trusted peer, and the socket's own address of any other peer."""
    relay = RelayProcess(e2e_env(**LIMITED_RELAY_ENV))
    yield start_relays(relay)
    clients = SourceClients([relay], "direct")
    port = int(relay_address(relay).rsplit(":", 1)[1])
    untrusted = "127.0.0.5"
    try:
        assert (yield clients.open("127.0.0.1", port, "proxied", forwarded_for="198.51.100.7, 127.0.0.9")) == 101
        assert clients.ip_of("proxied") == "198.51.100.7"
        assert (yield clients.open(untrusted, port, "d1", forwarded_for="198.51.100.7")) == 101
        assert clients.ip_of("d1") == untrusted, f"an untrusted peer was counted as {clients.ip_of('d1')}"
        assert (yield clients.open(untrusted, port, "d2", forwarded_for="198.51.100.8")) == 101
        third = yield clients.open(untrusted, port, "d3", forwarded_for="198.51.100.9")
        assert third == 429, f"a forged X-Forwarded-For lifted an untrusted peer's cap of 2 ({third})"
    finally:
        clients.close_all()
        yield stop_relays(relay)
