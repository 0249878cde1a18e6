"""Tests for upgrade admission (viewport.relay.admission) against real local HTTP(S) servers."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Union, cast

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import reactor as _global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface.verify import verifyObject

from viewport.relay.admission import (
    AdmissionResult,
    IAdmission,
    LocalAdmission,
    PlatformAdmission,
    make_http_client,
    platform_tls_policy,
)
from viewport.tokens import LocalTokenVerifier, mint_token

reactor: Any = _global_reactor

VALIDATE_PATH = b"/api/runtime/internal/relay/validate"
GOOD_CLAIMS = {"workspaceId": "ws_1", "runtimeTargetId": "rt_1", "role": "workspace-daemon"}
SECRET = "s" * 64

Answer = Callable[[Request], Union[bytes, int]]


def _port_number(port: IListeningPort) -> int:
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    return address.port


def json_answer(document: object, status: int = 200) -> Answer:
    """An answer writing ``document`` as JSON with ``status``."""

    def answer(request: Request) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(document).encode()

    return answer


class ScriptedPlatform(Resource):
    """The platform's validate endpoint: records each request and replies with the scripted answer."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answer: Answer = json_answer({"ok": True, "claims": GOOD_CLAIMS})
        self.requests: list[tuple[bytes, dict[bytes, list[bytes]], bytes]] = []

    def render_POST(self, request: Request) -> Union[bytes, int]:
        """Record the request and play the current answer."""
        assert request.content is not None
        headers = {name.lower(): values for name, values in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((request.uri, headers, request.content.read()))
        return self.answer(request)


@dataclass
class Platform:
    """A running scripted platform and a client pool to reach it."""

    resource: ScriptedPlatform
    port: IListeningPort
    pools: list[HTTPConnectionPool] = field(default_factory=list)
    extra_ports: list[IListeningPort] = field(default_factory=list)

    def client(self, **tls: Any) -> HTTPClient:
        """A client with its own connection pool (a pool must not be shared across TLS policies)."""
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.pools.append(pool)
        return make_http_client(reactor, platform_tls_policy(**dict(NO_TLS, **tls)), pool=pool)

    @property
    def url(self) -> str:
        """Base URL (with a path that admission must discard)."""
        return f"http://127.0.0.1:{_port_number(self.port)}/ignored/base?x=1"

    def admission(self, **overrides: Any) -> PlatformAdmission:
        """A PlatformAdmission on the real reactor aimed at this platform."""
        options: dict[str, Any] = {
            "http_client": self.client(),
            "clock": reactor,
            "server_url": self.url,
            "internal_key": None,
            "timeout_ms": 2000,
            "max_response_bytes": 4096,
        }
        options.update(overrides)
        return PlatformAdmission(**options)


NO_TLS: dict[str, Any] = {
    "verify": True,
    "ca_cert_path": None,
    "client_cert_path": None,
    "client_key_path": None,
    "client_key_passphrase": None,
}


@pytest_twisted.async_yield_fixture
async def platform() -> AsyncIterator[Platform]:
    """A scripted platform on 127.0.0.1, torn down with its client connections."""
    resource = ScriptedPlatform()
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    running = Platform(resource, port)
    yield running
    for pool in running.pools:
        await pool.closeCachedConnections()
    for listening in [port, *running.extra_ports]:
        await listening.stopListening()


def _raw_server(running: Platform, response: bytes, close: bool) -> str:
    """Start a raw TCP server answering any request with ``response`` in ONE write; return its URL."""

    class OneWrite(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.received = getattr(self, "received", b"") + data
            head, sep, body = self.received.partition(b"\r\n\r\n")
            if sep and len(body) >= int(_header(head, b"content-length") or 0):
                assert self.transport is not None
                self.transport.write(response)
                if close:
                    self.transport.loseConnection()

    port = reactor.listenTCP(0, Factory.forProtocol(OneWrite), interface="127.0.0.1")
    running.extra_ports.append(port)
    return f"http://127.0.0.1:{_port_number(port)}"


def _header(head: bytes, name: bytes) -> Optional[bytes]:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


async def _admit(admission: PlatformAdmission, runtime_target_id: Optional[str] = "rt_1") -> AdmissionResult:
    return await admission.admit("the-token", "workspace-daemon", "ws_1", runtime_target_id)


# --- platform admission ---------------------------------------------------------------------


def test_interface() -> None:
    """Both admission kinds provide IAdmission."""
    client = make_http_client(reactor, platform_tls_policy(**NO_TLS))
    verifyObject(IAdmission, PlatformAdmission(client, Clock(), "http://x", None, 1, 1))
    verifyObject(IAdmission, LocalAdmission(LocalTokenVerifier(SECRET, ["HS256"]), Clock()))


def test_server_url_must_be_http() -> None:
    """A server URL without http(s) scheme and host is refused at construction."""
    client = make_http_client(reactor, platform_tls_policy(**NO_TLS))
    with pytest.raises(ValueError):
        PlatformAdmission(client, Clock(), "ftp://x", None, 1, 1)
    with pytest.raises(ValueError):
        PlatformAdmission(client, Clock(), "api.example", None, 1, 1)


@pytest_twisted.ensureDeferred
async def test_ok_claims(platform: Platform) -> None:
    """A 2xx ``{ok:true, claims}`` answer admits with the validated claims."""
    result = await _admit(platform.admission())
    assert result.ok
    assert result.status == 200 and result.reason is None
    assert result.claims is not None and result.claims.workspace_id == "ws_1"


@pytest_twisted.ensureDeferred
async def test_request_shape(platform: Platform) -> None:
    """The call POSTs the JSON body to the fixed path on the server origin, without an internal key."""
    await _admit(platform.admission())
    await _admit(platform.admission(), runtime_target_id=None)
    (uri, headers, body), (_, _, body_without_target) = platform.resource.requests
    assert uri == VALIDATE_PATH
    assert headers[b"content-type"] == [b"application/json"]
    assert headers[b"content-length"] == [str(len(body)).encode()]
    assert b"x-relay-internal-key" not in headers
    assert json.loads(body) == {
        "relayToken": "the-token",
        "role": "workspace-daemon",
        "workspaceId": "ws_1",
        "runtimeTargetId": "rt_1",
    }
    assert json.loads(body_without_target) == {
        "relayToken": "the-token",
        "role": "workspace-daemon",
        "workspaceId": "ws_1",
    }


@pytest_twisted.ensureDeferred
async def test_internal_key_sent(platform: Platform) -> None:
    """``x-relay-internal-key`` carries the configured key."""
    await _admit(platform.admission(internal_key="k3y"))
    _, headers, _ = platform.resource.requests[0]
    assert headers[b"x-relay-internal-key"] == [b"k3y"]


@pytest_twisted.ensureDeferred
async def test_denial_with_reason(platform: Platform) -> None:
    """A denial reports the platform's status and reason, else its error, else VALIDATION_FAILED."""
    admission = platform.admission()
    platform.resource.answer = json_answer({"ok": False, "reason": "TOKEN_REVOKED"}, status=403)
    assert (await _admit(admission)) == AdmissionResult(None, 403, "TOKEN_REVOKED")
    platform.resource.answer = json_answer({"ok": False, "error": "boom"}, status=500)
    assert (await _admit(admission)) == AdmissionResult(None, 500, "boom")
    platform.resource.answer = json_answer({"ok": False})
    assert (await _admit(admission)) == AdmissionResult(None, 200, "VALIDATION_FAILED")
    platform.resource.answer = json_answer({"ok": True, "claims": GOOD_CLAIMS}, status=401)
    assert (await _admit(admission)) == AdmissionResult(None, 401, "VALIDATION_FAILED")
    platform.resource.answer = json_answer({"ok": "true", "claims": GOOD_CLAIMS})
    assert (await _admit(admission)).reason == "VALIDATION_FAILED"


@pytest_twisted.ensureDeferred
async def test_non_json(platform: Platform) -> None:
    """A body that is not JSON (NaN included) gives INVALID_JSON with the HTTP status."""
    admission = platform.admission()
    platform.resource.answer = lambda request: b"<html>oops</html>"
    assert (await _admit(admission)) == AdmissionResult(None, 200, "INVALID_JSON")
    platform.resource.answer = lambda request: b'{"ok": true, "claims": {"exp": NaN}}'
    assert (await _admit(admission)).reason == "INVALID_JSON"


@pytest_twisted.ensureDeferred
async def test_invalid_claims(platform: Platform) -> None:
    """Claims failing the schema, an unknown claim key, or missing claims give INVALID_CLAIMS."""
    admission = platform.admission()
    for answer in (
        {"ok": True, "claims": {"workspaceId": "ws_1", "scope": "PAIRING"}},
        {"ok": True, "claims": {"workspaceId": "ws_1", "superuser": True}},
        {"ok": True},
    ):
        platform.resource.answer = json_answer(answer)
        assert (await _admit(admission)) == AdmissionResult(None, 200, "INVALID_CLAIMS")


@pytest_twisted.ensureDeferred
async def test_role_claim_mismatch(platform: Platform) -> None:
    """Claims naming another role than the requested one are refused (docs/protocol.md §9, item 9)."""
    admission = platform.admission()
    platform.resource.answer = json_answer({"ok": True, "claims": dict(GOOD_CLAIMS, role="client")})
    result = await _admit(admission)
    assert not result.ok and result.reason == "ROLE_CLAIM_MISMATCH"
    platform.resource.answer = json_answer({"ok": True, "claims": {"workspaceId": "ws_1"}})
    assert (await _admit(admission)).ok


@pytest_twisted.ensureDeferred
async def test_stalled_platform_times_out(platform: Platform) -> None:
    """A platform that never answers gives 504 "timed out" after the configured timeout."""
    platform.resource.answer = lambda request: NOT_DONE_YET
    started = reactor.seconds()
    result = await _admit(platform.admission(timeout_ms=200))
    assert result.status == 504
    assert result.reason is not None and "timed out" in result.reason
    assert 0.15 <= reactor.seconds() - started < 1.5


@pytest_twisted.ensureDeferred
async def test_stalled_body_times_out(platform: Platform) -> None:
    """A platform that sends headers and then stalls mid-body also times out."""

    def headers_only(request: Request) -> int:
        request.setHeader(b"content-length", b"100")
        request.write(b'{"ok": ')
        return NOT_DONE_YET

    platform.resource.answer = headers_only
    result = await _admit(platform.admission(timeout_ms=200))
    assert result.status == 504 and result.reason is not None and "timed out" in result.reason


@pytest_twisted.ensureDeferred
async def test_unreachable_platform(platform: Platform) -> None:
    """A refused connection becomes a 504 result, not an error."""
    closed = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    url = f"http://127.0.0.1:{_port_number(closed)}"
    await closed.stopListening()
    result = await _admit(platform.admission(server_url=url))
    assert result.status == 504 and result.reason is not None and "failed" in result.reason


def _single_write_response(body: bytes, content_length: bool) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    head += b"content-length: %d\r\n" % len(body) if content_length else b"connection: close\r\n"
    return head + b"\r\n" + body


@pytest.mark.parametrize("content_length", [True, False])
@pytest_twisted.ensureDeferred
async def test_oversized_single_write(platform: Platform, content_length: bool) -> None:
    """An oversized answer arriving in one write gives 502 TOO_LARGE, and admission keeps working (docs/protocol.md §9, item 21)."""
    padding = "x" * 8000
    body = json.dumps({"ok": True, "claims": GOOD_CLAIMS, "padding": padding}).encode()
    url = _raw_server(platform, _single_write_response(body, content_length), close=not content_length)
    result = await _admit(platform.admission(server_url=url, max_response_bytes=1024))
    assert result == AdmissionResult(None, 502, "ADMISSION_RESPONSE_TOO_LARGE")
    # The same process (and connection pool) still admits.
    assert (await _admit(platform.admission())).ok
    small = json.dumps({"ok": True, "claims": GOOD_CLAIMS}).encode()
    small_url = _raw_server(platform, _single_write_response(small, content_length), close=not content_length)
    assert (await _admit(platform.admission(server_url=small_url, max_response_bytes=1024))).ok


@pytest_twisted.ensureDeferred
async def test_oversized_chunked_stream(platform: Platform) -> None:
    """A chunked answer that keeps streaming past the cap is cut off with 502 TOO_LARGE."""
    sent: list[int] = []

    def stream(request: Request) -> int:
        request.setHeader(b"content-type", b"application/json")
        request.write(b'{"ok": true, "padding": "')

        def more() -> None:
            if request.finished or request.channel is None or len(sent) > 200:
                return
            sent.append(1)
            request.write(b"y" * 512)
            reactor.callLater(0.001, more)

        more()
        return NOT_DONE_YET

    platform.resource.answer = stream
    result = await _admit(platform.admission(max_response_bytes=4096))
    assert result == AdmissionResult(None, 502, "ADMISSION_RESPONSE_TOO_LARGE")
    assert len(sent) < 200
    platform.resource.answer = json_answer({"ok": True, "claims": GOOD_CLAIMS})
    assert (await _admit(platform.admission())).ok


@pytest_twisted.ensureDeferred
async def test_body_at_cap_accepted(platform: Platform) -> None:
    """An answer of exactly the cap is accepted."""
    document = json.dumps({"ok": True, "claims": GOOD_CLAIMS}).encode()
    platform.resource.answer = lambda request: document
    assert (await _admit(platform.admission(max_response_bytes=len(document)))).ok
    assert not (await _admit(platform.admission(max_response_bytes=len(document) - 1))).ok


@pytest_twisted.ensureDeferred
async def test_cancel(platform: Platform) -> None:
    """Cancelling an admission abandons the request and fails with CancelledError."""
    platform.resource.answer = lambda request: NOT_DONE_YET
    pending = platform.admission().admit("t", "client", "ws_1", None)
    pending.cancel()
    with pytest.raises(Exception) as caught:
        await pending
    assert type(caught.value).__name__ == "CancelledError"


# --- HTTPS toward the platform ----------------------------------------------------------------


@dataclass
class PKI:
    """A throwaway CA with a server certificate for 127.0.0.1 and a client certificate, as files."""

    directory: str
    ca: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    server: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
    client: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]

    def path(self, name: str) -> str:
        """Path of a file in the PKI directory."""
        return os.path.join(self.directory, name)


def _certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: Optional[tuple[x509.Certificate, ec.EllipticCurvePrivateKey]],
    *,
    ca: bool = False,
    ip: Optional[str] = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


@pytest.fixture
def pki() -> PKI:
    """Generate the CA, server and client certificates into a temporary directory."""
    directory = tempfile.mkdtemp()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("test CA", ca_key, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate("platform", server_key, (ca, ca_key), ip="127.0.0.1")
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate("relay", client_key, (ca, ca_key))
    pem = serialization.Encoding.PEM
    files = {
        "ca.crt": ca.public_bytes(pem),
        "client.crt": client.public_bytes(pem),
        "client.key": client_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pass phrase")
        ),
    }
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as handle:
            handle.write(data)
    return PKI(directory, ca, ca_key, (server, server_key), (client, client_key))


def _listen_https(running: Platform, pki: PKI, require_client_certificate: bool) -> str:
    server, server_key = pki.server
    options: dict[str, Any] = {
        "privateKey": crypto.PKey.from_cryptography_key(server_key),
        "certificate": crypto.X509.from_cryptography(server),
    }
    if require_client_certificate:
        options.update(verify=True, requireCertificate=True, caCerts=[crypto.X509.from_cryptography(pki.ca)])
    port = reactor.listenSSL(0, Site(running.resource), CertificateOptions(**options), interface="127.0.0.1")
    running.extra_ports.append(port)
    return f"https://127.0.0.1:{_port_number(port)}"


def _https_admission(running: Platform, url: str, **tls: Any) -> PlatformAdmission:
    return running.admission(http_client=running.client(**tls), server_url=url)


@pytest_twisted.ensureDeferred
async def test_https_verification(platform: Platform, pki: PKI) -> None:
    """HTTPS: verify off accepts a private CA; verify on needs the CA file and then passes."""
    url = _listen_https(platform, pki, require_client_certificate=False)
    assert (await _admit(_https_admission(platform, url, verify=False))).ok
    assert (await _admit(_https_admission(platform, url, ca_cert_path=pki.path("ca.crt")))).ok
    untrusted = await _admit(_https_admission(platform, url))
    assert untrusted.status == 504 and not untrusted.ok


@pytest_twisted.ensureDeferred
async def test_https_client_certificate(platform: Platform, pki: PKI) -> None:
    """mTLS: the client certificate (passphrase-protected key) is presented; without it the call fails."""
    url = _listen_https(platform, pki, require_client_certificate=True)
    mtls = {
        "client_cert_path": pki.path("client.crt"),
        "client_key_path": pki.path("client.key"),
        "client_key_passphrase": "pass phrase",
    }
    assert (await _admit(_https_admission(platform, url, ca_cert_path=pki.path("ca.crt"), **mtls))).ok
    assert (await _admit(_https_admission(platform, url, verify=False, **mtls))).ok
    without = await _admit(_https_admission(platform, url, ca_cert_path=pki.path("ca.crt")))
    assert without.status == 504 and not without.ok


def test_tls_policy_configuration_errors(pki: PKI) -> None:
    """Bad TLS settings fail when the policy is built, with a message naming the file."""
    with pytest.raises(ValueError, match="both"):
        platform_tls_policy(**dict(NO_TLS, client_cert_path=pki.path("client.crt")))
    with pytest.raises(ValueError, match="missing.crt"):
        platform_tls_policy(**dict(NO_TLS, ca_cert_path=pki.path("missing.crt")))
    with pytest.raises(ValueError, match="passphrase"):
        platform_tls_policy(
            **dict(NO_TLS, client_cert_path=pki.path("client.crt"), client_key_path=pki.path("client.key"))
        )
    with pytest.raises(ValueError, match="no valid PEM"):
        platform_tls_policy(**dict(NO_TLS, ca_cert_path=pki.path("client.key")))


# --- local admission ------------------------------------------------------------------------


class LocalAdmissionTests(SynchronousTestCase):
    """Admission by local token verification, on a fake clock."""

    def setUp(self) -> None:
        """A verifier for HS256 tokens and a clock at a fixed time."""
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.admission = LocalAdmission(LocalTokenVerifier(SECRET, ["HS256"], audience="viewport-relay"), self.clock)

    def _token(self, **claims: object) -> str:
        return mint_token(
            key=SECRET,
            algorithm="HS256",
            claims=dict(GOOD_CLAIMS, **claims),
            ttl_seconds=60,
            now=self.clock.seconds(),
            audience="viewport-relay",
        )

    def _admit(self, token: str, role: str = "workspace-daemon") -> AdmissionResult:
        result: AdmissionResult = self.successResultOf(self.admission.admit(token, role, "ws_1", None))
        return result

    def test_valid_token(self) -> None:
        """A valid token admits with its claims."""
        result = self._admit(self._token())
        self.assertTrue(result.ok)
        assert result.claims is not None
        self.assertEqual(result.claims.runtime_target_id, "rt_1")

    def test_expired_token(self) -> None:
        """An expired token is refused with 401 and the verifier's reason, using the injected clock."""
        token = self._token()
        self.clock.advance(60 + 30)
        self.assertEqual(self._admit(token), AdmissionResult(None, 401, "TOKEN_EXPIRED"))

    def test_bad_token(self) -> None:
        """A token signed with another key is refused."""
        token = mint_token(key="other" * 10, algorithm="HS256", claims=GOOD_CLAIMS, ttl_seconds=60, now=0)
        self.assertEqual(self._admit(token), AdmissionResult(None, 401, "INVALID_SIGNATURE"))

    def test_role_claim_mismatch(self) -> None:
        """A token for another role is refused; no role claim is left to the later checks."""
        self.assertEqual(self._admit(self._token(), role="client").reason, "ROLE_CLAIM_MISMATCH")
        token = mint_token(
            key=SECRET,
            algorithm="HS256",
            claims={"workspaceId": "ws_1"},
            ttl_seconds=60,
            now=self.clock.seconds(),
            audience="viewport-relay",
        )
        self.assertTrue(self._admit(token, role="client").ok)


class ClockDrivenTests(SynchronousTestCase):
    """The deadline runs on the injected clock (treq's in-memory StubTreq stands in for the network)."""

    def _admission(self, resource: ScriptedPlatform, clock: Clock) -> tuple[PlatformAdmission, StubTreq]:
        stub = StubTreq(resource)
        admission = PlatformAdmission(cast(HTTPClient, stub), clock, "http://platform.test", None, 2000, 4096)
        return admission, stub

    def test_deadline_on_injected_clock(self) -> None:
        """Nothing happens before the timeout; at the timeout the result is 504 and no call stays pending."""
        clock = Clock()
        resource = ScriptedPlatform()
        resource.answer = lambda request: NOT_DONE_YET
        admission, stub = self._admission(resource, clock)
        pending = admission.admit("t", "client", "ws_1", None)
        stub.flush()
        clock.advance(1.999)
        self.assertNoResult(pending)
        clock.advance(0.001)
        result = self.successResultOf(pending)
        self.assertEqual(result, AdmissionResult(None, 504, "admission request timed out after 2000ms"))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_answer_cancels_deadline(self) -> None:
        """A timely answer leaves no deadline behind."""
        clock = Clock()
        admission, stub = self._admission(ScriptedPlatform(), clock)
        pending = admission.admit("t", "workspace-daemon", "ws_1", None)
        stub.flush()
        self.assertTrue(self.successResultOf(pending).ok)
        self.assertEqual(clock.getDelayedCalls(), [])
