"""The twistd service tree of one relay: the listening port, heartbeat and cleanup timers, shutdown."""

from __future__ import annotations

import gc
from typing import Any, Optional

from twisted.application.internet import TimerService
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger

from viewport.relay.core import HEARTBEAT_SLICES, Relay
from viewport.relay.protocol import RelayPortFactory
from viewport.service_support import JsonLoggingService, listen_now


class ListeningService(JsonLoggingService):
    """
    Binds the relay's port at privileged start (so a port it cannot bind stops startup), and on
    stop refuses new sockets before closing the open ones with 1001.
    """

    _log = Logger()

    def __init__(self, relay: Relay, endpoint: IStreamServerEndpoint, grace_seconds: float) -> None:
        super().__init__()
        self.relay = relay
        self._endpoint = endpoint
        self._grace_seconds = grace_seconds
        self.port: Optional[IListeningPort] = None
        for interval_ms, work in (
            (relay.config.ping_interval_ms / HEARTBEAT_SLICES, relay.heartbeat),
            (relay.config.cleanup_interval_ms, relay.cleanup),
        ):
            timer = TimerService(interval_ms / 1000.0, work)
            timer.clock = relay.clock
            timer.setServiceParent(self)

    def privilegedStartService(self) -> None:
        """Listen now; raise if the port cannot be bound."""
        self.port = listen_now(self._endpoint, RelayPortFactory(self.relay))
        super().privilegedStartService()

    def startService(self) -> None:
        """Start the backplane and timers, then announce where we listen."""
        if self.port is None:
            self.privilegedStartService()
        relay = self.relay
        config = relay.config
        assert self.port is not None
        address = self.port.getHost()
        # Everything imported and built so far lives as long as the process: keep it out of the
        # cyclic collector's scans, which otherwise stall traffic as connections pile up.
        gc.freeze()
        # Fewer, larger young collections and rarer full ones: with thousands of sockets each full
        # collection scans hundreds of thousands of objects. Measured with benchmarks/connections.py
        # (4000 sockets, 1 frame/s each): round trip p99 7.6 -> 2.4 ms, max 109 -> 18 ms.
        gc.set_threshold(10_000, 50, 100)
        d = relay.backplane.start(relay.deliver_bus_frame)
        d.addErrback(lambda f: self._log.failure("{relay_event}", f, relay_event="backplane_start_error"))  # type: ignore[attr-defined]
        super().startService()
        self._log.info(
            "{relay_event}",
            relay_event="relay_started",
            host=config.host,
            port=getattr(address, "port", config.port),
            relayId=config.relay_id,
            publicWsBaseUrl=config.public_ws_base_url,
            backplaneMode=config.backplane_mode,
            relayMode=config.relay_mode,
            admission=config.admission,
            clientRedirectEnabled=config.client_redirect_enabled,
            busEnabled=config.bus_enabled,
            tlsEnabled=config.tls_enabled,
            maxTotalConnections=config.max_total_connections,
            maxConnectionsPerIp=config.max_connections_per_ip,
            maxFrameBytes=config.max_frame_bytes,
            adminHttpEnabled=config.enable_admin_http,
        )
        scheme = "wss" if config.tls_enabled else "ws"
        host = getattr(address, "host", config.host)
        shown = f"[{host}]" if ":" in host else host
        self._log.info(
            "{relay_event}",
            relay_event="relay_listening",
            url=f"{scheme}://{shown}:{getattr(address, 'port', config.port)}/ws",
        )

    @inlineCallbacks
    def stopService(self) -> Any:
        """
        Stop accepting, withdraw this relay's daemon presence (so other relays stop routing here),
        close every WebSocket with 1001, then stop the backplane and timers.
        """
        self.relay.accepting = False
        port, self.port = self.port, None
        if port is not None:
            yield port.stopListening()
        yield self.relay.router.withdraw_presence()
        yield self.relay.shutdown(self._grace_seconds)
        yield self.relay.backplane.stop()
        yield super().stopService()
        self._log.info(
            "{relay_event}",
            relay_event="relay_stopped",
            relayId=self.relay.config.relay_id,
            # Name/value pairs, not an object: redaction hides keys naming frames or messages.
            counters=sorted(self.relay.metrics.counter_values().items()),
        )
