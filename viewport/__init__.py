"""Viewport relay: a WebSocket relay between Viewport daemons and browsers."""

#: The one place the version is written (setup.cfg reads it, the relay reports it).
__version__ = "0.2.0"
