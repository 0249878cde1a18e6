"""Viewport relay: a WebSocket relay between Viewport daemons and browsers."""
