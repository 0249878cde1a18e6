"""twistd plugin dropin: ``twistd -r asyncio -n viewport-bus`` (the bus itself loads lazily)."""

from twisted.application.service import ServiceMaker

viewport_bus = ServiceMaker(
    "Viewport bus",
    "viewport.bus.tap",
    "Self-hosted platform side of the relay's server mode: validate, presence and frame bus on PostgreSQL.",
    "viewport-bus",
)
