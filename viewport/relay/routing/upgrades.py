"""What happens to an admitted upgrade before it opens: the client cap, and a redirect to the daemon's relay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from twisted.internet.defer import Deferred, succeed

from viewport.relay.claims_check import effective_runtime_target
from viewport.relay.config import RelayConfig
from viewport.relay.interfaces import IBackplane
from viewport.relay.metrics import RelayMetrics
from viewport.relay.redirects import redirect_location
from viewport.relay.routing.lifecycle import ConnectionLifecycle
from viewport.relay.routing.remote_forwarding import RemoteForwarding
from viewport.relay.upgrade import UpgradeQuery
from viewport.tokens import Claims


@dataclass(frozen=True)
class UpgradeOutcome:
    """Refuse with an HTTP status, answer a 307 to ``location``, or open (with an in-band redirect to send)."""

    refuse_status: Optional[int] = None
    location: Optional[str] = None
    in_band_redirect: Optional[str] = None


OPEN = UpgradeOutcome()


class UpgradeDecisions:
    """docs/protocol.md §2.3 steps 10–11: the per-scope client cap, then (redirect on) where the daemon is."""

    def __init__(
        self,
        *,
        config: RelayConfig,
        backplane: IBackplane,
        metrics: RelayMetrics,
        lifecycle: ConnectionLifecycle,
        remote: RemoteForwarding,
    ) -> None:
        self._config = config
        self._backplane = backplane
        self._m = metrics
        self._lifecycle = lifecycle
        self._remote = remote

    def decide(self, query: UpgradeQuery, claims: Claims, http_redirect: bool) -> "Deferred[UpgradeOutcome]":
        """The outcome for an upgrade whose token admitted ``claims``."""
        if query.role != "client":
            return succeed(OPEN)
        target = effective_runtime_target(claims, query.runtime_target_id)
        if self._lifecycle.client_cap_reached(query.workspace_id, target):
            self._m.relay_upgrade_rejected_workspace_clients.inc()
            return succeed(UpgradeOutcome(refuse_status=429))
        if target is None or not self._config.backplane.client_redirect_enabled or not self._backplane.cross_relay:
            return succeed(OPEN)

        def decided(url: Optional[str]) -> UpgradeOutcome:
            if url is None:
                return OPEN
            self._m.relay_client_redirect.inc()
            if http_redirect:
                location = redirect_location(
                    url, query.role, query.workspace_id, query.runtime_target_id, [("redirect", "http")]
                )
                return UpgradeOutcome(location=location)
            return UpgradeOutcome(in_band_redirect=url)

        return self._remote.redirect_target(query.workspace_id, target).addCallback(decided)
