"""TCP_NODELAY on the sockets the relay accepts (plain and TLS) and on its outbound connections: the platform/bus HTTP client and Redis."""

from __future__ import annotations

import socket
import tempfile
from typing import Any, Iterator, List

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.web.client import URI
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from tests.certs import make_certificates
from tests.redis_server import SHARED_REDIS_URL
from tests.support import TEST_SECRET, poll_until
from tests.test_backplane_redis import KEY
from viewport.relay.admission import LocalAdmission
from viewport.relay.backplane.redis import RedisBackplane
from viewport.relay.backplane.single import SingleBackplane
from viewport.relay.config import load_config
from viewport.relay.core import Relay
from viewport.relay.protocol import RelayPortFactory
from viewport.relay.web import make_site
from viewport.sockets import NoDelayAgentEndpoints, set_no_delay
from viewport.tokens import LocalTokenVerifier


def _no_delay(transport: Any) -> int:
    handle = transport.getHandle()
    if not isinstance(handle, socket.socket):
        # TLS: the wrapper's handle is the TLS connection; its own transport holds the socket.
        handle = transport.transport.getHandle()
    return int(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


@implementer(IPolicyForHTTPS)
class _TrustPolicy:
    def __init__(self, ca_pem: bytes) -> None:
        self._trust = Certificate.loadPEM(ca_pem)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust)


@pytest.fixture
def listener() -> Iterator[Any]:
    """A plain and a TLS listener on loopback that accept and hold connections."""
    certs = make_certificates(tempfile.mkdtemp(prefix="sockets-certs-"))
    with open(certs.cert_path, "rb") as cert, open(certs.key_path, "rb") as key:
        server_options = PrivateCertificate.loadPEM(cert.read() + key.read()).options()
    factory = Factory.forProtocol(Protocol)
    plain = pytest_twisted.blockon(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory))
    tls = pytest_twisted.blockon(SSL4ServerEndpoint(reactor, 0, server_options, interface="127.0.0.1").listen(factory))
    yield plain.getHost().port, tls.getHost().port, certs
    pytest_twisted.blockon(plain.stopListening())
    pytest_twisted.blockon(tls.stopListening())


@pytest_twisted.inlineCallbacks
def test_http_client_connections_have_nodelay(listener: Any) -> Any:
    """Endpoints the platform/bus HTTP client connects through set TCP_NODELAY, over http and https alike."""
    plain_port, tls_port, certs = listener
    endpoints = NoDelayAgentEndpoints(reactor, _TrustPolicy(certs.ca_pem()))
    for url in (f"http://127.0.0.1:{plain_port}/", f"https://127.0.0.1:{tls_port}/"):
        protocol = yield endpoints.endpointForURI(URI.fromBytes(url.encode())).connect(Factory.forProtocol(Protocol))
        try:
            assert _no_delay(protocol.transport) == 1, url
        finally:
            protocol.transport.abortConnection()


def test_transports_without_the_option_are_left_alone() -> None:
    """An in-memory (or Unix) transport has no TCP_NODELAY: the helper says so instead of raising."""
    assert set_no_delay(StringTransport()) is False
    assert set_no_delay(None) is False


@pytest_twisted.inlineCallbacks
def test_redis_connections_have_nodelay() -> Any:
    """Both connections of the redis backplane (commands and pub/sub) to the machine's Redis set TCP_NODELAY."""
    backplane = RedisBackplane(
        relay_id="nodelay", redis_url=SHARED_REDIS_URL, hmac_key=KEY, reactor=reactor, key_prefix="viewport-test"
    )
    try:
        yield backplane.start(lambda frame: None)
        for link in (backplane._commands, backplane._subscriber):
            assert link.protocol is not None, link.name
            assert _no_delay(link.protocol.transport) == 1, link.name
    finally:
        yield backplane.stop()


@pytest_twisted.inlineCallbacks
def test_accepted_relay_sockets_have_nodelay(listener: Any) -> Any:
    """
    Every socket the relay accepts, plain and TLS, has TCP_NODELAY from its first byte on: without it
    the second of two frames written a few ms apart waits for the peer's delayed ACK (about 40 ms).
    """
    _, _, certs = listener
    config = load_config({"RELAY_TOKEN_SECRET": TEST_SECRET}, home=tempfile.mkdtemp(prefix="sockets-home-"))
    relay = Relay(config=config, clock=reactor, backplane=SingleBackplane("relay-nodelay"),
                  admission=LocalAdmission(LocalTokenVerifier(TEST_SECRET, ["HS256"]), reactor))
    factory = RelayPortFactory(relay, make_site(relay))
    accepted: List[Any] = []
    build = factory.buildProtocol

    def recording(addr: Any) -> Any:
        protocol = build(addr)
        accepted.append(protocol)
        return protocol

    factory.buildProtocol = recording  # type: ignore[method-assign]
    with open(certs.cert_path, "rb") as cert, open(certs.key_path, "rb") as key:
        server_options = PrivateCertificate.loadPEM(cert.read() + key.read()).options()
    ports = [
        (yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)),
        (yield SSL4ServerEndpoint(reactor, 0, server_options, interface="127.0.0.1").listen(factory)),
    ]
    clients = []
    try:
        for port in ports:
            client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
                Factory.forProtocol(Protocol))
            clients.append(client)
        yield poll_until(lambda: len(accepted) == 2 and all(p.transport is not None for p in accepted),
                         what="both sockets accepted")
        assert [_no_delay(protocol.transport) for protocol in accepted] == [1, 1]
    finally:
        for client in clients:
            client.transport.abortConnection()
        for port in ports:
            yield port.stopListening()
