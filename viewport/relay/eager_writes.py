"""Frames written during one pass of the reactor go out at the start of the next, before it polls again."""

from __future__ import annotations

from typing import Any, Dict, Optional

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

_log = Logger()


def _socket_of(transport: Any) -> Optional[FileDescriptor]:
    """The TCP connection under ``transport`` (itself, or the one under a TLS wrapper), if any."""
    if isinstance(transport, FileDescriptor):
        return transport
    below = getattr(transport, "transport", None)
    return below if isinstance(below, FileDescriptor) else None


class EagerWrites:
    """
    Twisted's ``write`` only buffers: the bytes are sent when the reactor's next poll reports the
    socket writable and it dispatches that event. For a frame in strict ping-pong that extra
    poll and dispatch is a sizeable part of its time in the relay.

    ``wrote`` notes each socket written to and schedules one call for the start of the reactor's
    next pass (``callLater(0)`` runs before the next poll); that call gives each socket the write
    the reactor would have made (``doWrite``). Frames written to one socket during a pass still
    leave in one send. A socket that is closing is left to the reactor (its ``doWrite`` would
    finish the close, which only the reactor may act on); an error is left for the reactor to
    meet again on its own pass, where it closes the connection as usual.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._written: Dict[FileDescriptor, None] = {}
        self._pending: Optional[IDelayedCall] = None

    def wrote(self, transport: Any) -> None:
        """``transport`` was written to."""
        socket = _socket_of(transport)
        if socket is None:
            return
        self._written[socket] = None
        if self._pending is None:
            self._pending = self._clock.callLater(0, self._send)

    def _send(self) -> None:
        self._pending = None
        written, self._written = self._written, {}
        for socket in written:
            if (
                (socket.dataBuffer or socket._tempDataLen)
                and socket.connected
                and not socket.disconnecting
                and not socket._writeDisconnecting
            ):
                try:
                    socket.doWrite()
                except Exception:
                    # Left for the reactor, whose own doWrite of this socket meets it and closes it.
                    _log.failure("eager write failed", relay_event="relay_eager_write_error")
