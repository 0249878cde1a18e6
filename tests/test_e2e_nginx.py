"""nginx (deploy/nginx/viewport-relay.conf.template) in front of two relays: sticky by workspace, failover on stop, per-IP limits per client.

Needs Debian's nginx (``apt-get install nginx-light``; ``.ci/run`` installs it). The helpers and
scenarios, shared with the HAProxy test, are in ``tests/balancers.py``.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted

from tests.balancers import Nginx, needs_nginx, per_source_limits, sticky_failover

#: nginx places the relays on its hash ring by their address, whose port is random here: with 16
#: workspaces the odds that all of them hash to one relay (which the scenario rejects) are 2**-15.
WORKSPACES = 16


@needs_nginx
@pytest_twisted.inlineCallbacks
def test_workspace_sticks_to_one_relay_and_fails_over_behind_nginx() -> Any:
    """Daemon and browser of a workspace meet on one relay through nginx and exchange envelopes; when it stops they move to the other."""
    resumed = yield sticky_failover(Nginx, workspace_count=WORKSPACES)
    print(f"\nnginx: traffic resumed {resumed:.2f} s after the workspace's relay stopped")


@needs_nginx
@pytest_twisted.inlineCallbacks
def test_per_ip_limits_count_each_client_address_behind_nginx() -> Any:
    """Behind nginx each client address meets its own connection cap and upgrade rate, and a forged X-Forwarded-For is replaced."""
    yield per_source_limits(Nginx)
