"""Socket options every connection of ours gets: TCP_NODELAY on accepted and outbound sockets."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer


def set_no_delay(transport: Any) -> bool:
    """
    Turn Nagle's algorithm off on a TCP transport (a TLS transport passes it to its socket).

    The relay forwards small frames that peers answer in bursts (a daemon sends a snapshot, then an
    ack, a few milliseconds apart). With Nagle on, the second frame waits for the ACK of the first,
    which the receiver delays by up to 40 ms. Returns False where the option does not apply (Unix
    sockets, in-memory transports).
    """
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is None:
        return False
    try:
        setter(True)
    except OSError:
        return False
    return True


def _no_delay_on(protocol: IProtocol) -> IProtocol:
    set_no_delay(getattr(protocol, "transport", None))
    return protocol


@implementer(IStreamClientEndpoint)
class NoDelayEndpoint:
    """A client endpoint whose connections have TCP_NODELAY set before the protocol writes anything."""

    def __init__(self, wrapped: IStreamClientEndpoint) -> None:
        self._wrapped = wrapped

    def connect(self, protocolFactory: IProtocolFactory) -> "Deferred[IProtocol]":
        """Connect through the wrapped endpoint, then set the option on the new transport."""
        d: Deferred[IProtocol] = self._wrapped.connect(protocolFactory)
        return d.addCallback(_no_delay_on)


@implementer(IAgentEndpointFactory)
class NoDelayAgentEndpoints:
    """Endpoints for a twisted.web ``Agent``: TCP for http, TLS for https, both with TCP_NODELAY."""

    def __init__(self, reactor: Any, tls_policy: IPolicyForHTTPS, connect_timeout: Optional[float] = None) -> None:
        self._reactor = reactor
        self._tls_policy = tls_policy
        self._connect_timeout = connect_timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """The endpoint for one origin."""
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint
        if self._connect_timeout is None:
            endpoint = HostnameEndpoint(self._reactor, host, uri.port)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._connect_timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._tls_policy.creatorForNetloc(uri.host, uri.port), endpoint)
        elif uri.scheme != b"http":
            raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
        return NoDelayEndpoint(endpoint)
