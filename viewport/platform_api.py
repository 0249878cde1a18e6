"""
The paths of the platform's internal relay API (docs/protocol.md, "Platform API"): the relay calls them
(admission, and the server backplane), and viewport-bus serves them, so both read them from here.
"""

from __future__ import annotations

__all__ = [
    "ALIVE_PATH",
    "API_PREFIX",
    "HEARTBEAT_PATH",
    "PUBLISH_PATH",
    "PULL_PATH",
    "RESOLVE_PATH",
    "UPSERT_PATH",
    "VALIDATE_PATH",
]

API_PREFIX = "/api/runtime/internal/relay"
VALIDATE_PATH = API_PREFIX + "/validate"
UPSERT_PATH = API_PREFIX + "/presence/upsert"
RESOLVE_PATH = API_PREFIX + "/presence/resolve"
PUBLISH_PATH = API_PREFIX + "/bus/publish"
PULL_PATH = API_PREFIX + "/bus/pull"
HEARTBEAT_PATH = API_PREFIX + "/relays/heartbeat"
ALIVE_PATH = API_PREFIX + "/relays/alive"
