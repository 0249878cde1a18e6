"""
Loaded (through PYTHONPATH) by a relay that tests/test_e2e_nodelay.py starts as the relay was before
issue 13: setting TCP_NODELAY does nothing, so Nagle's algorithm holds small writes back.
"""

import socket

_setsockopt = socket.socket.setsockopt


def _without_nodelay(self, level, option, *args):  # type: ignore[no-untyped-def]
    if level == socket.IPPROTO_TCP and option == socket.TCP_NODELAY:
        return None
    return _setsockopt(self, level, option, *args)


socket.socket.setsockopt = _without_nodelay  # type: ignore[method-assign]
