"""twistd plugin dropin: ``twistd -n viewport-relay`` (the relay itself loads lazily)."""

from twisted.application.service import ServiceMaker

viewport_relay = ServiceMaker(
    "Viewport relay",
    "viewport.relay.tap",
    "WebSocket relay between Viewport daemons and browsers.",
    "viewport-relay",
)
