"""Admission of a WebSocket upgrade: the platform validate call, or local token verification."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from typing import Any, Optional, Union
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    KeyPair,
    PrivateCertificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from viewport import strict_json
from viewport.platform_api import VALIDATE_PATH
from viewport.sockets import NoDelayAgentEndpoints
from viewport.relay.interfaces import AdmissionResult, IAdmission
from viewport.relay.httpcall import HttpAnswer, HttpCallFailed, bounded_request
from viewport.tokens import Claims, LocalTokenVerifier, TokenRejected, validate_claims

__all__ = [
    "AdmissionResult",
    "IAdmission",
    "LocalAdmission",
    "PlatformAdmission",
    "make_http_client",
    "platform_tls_policy",
]


RESPONSE_TOO_LARGE = "ADMISSION_RESPONSE_TOO_LARGE"
INVALID_JSON = "INVALID_JSON"
INVALID_CLAIMS = "INVALID_CLAIMS"
VALIDATION_FAILED = "VALIDATION_FAILED"
ROLE_CLAIM_MISMATCH = "ROLE_CLAIM_MISMATCH"
INTERNAL_ERROR = "ADMISSION_INTERNAL_ERROR"

# Status recorded for our own role check (the platform's answer itself was fine).
_ROLE_MISMATCH_STATUS = 403
# The platform's reason text ends up in logs: keep it bounded.
_MAX_REASON_CHARS = 200

_log = Logger()


def _denied(status: Optional[int], reason: str) -> AdmissionResult:
    return AdmissionResult(claims=None, status=status, reason=reason)


def _role_mismatch(claims: Claims, role: str) -> bool:
    # The original relay trusted the platform to compare roles (docs/protocol.md §9, item 9); we check as well.
    return claims.role is not None and claims.role != role




def _reason_text(value: object) -> Optional[str]:
    if isinstance(value, str) and value.strip():
        return value[:_MAX_REASON_CHARS]
    return None


def _interpret(status: int, body: bytes, role: str) -> AdmissionResult:
    """Map the platform's answer to a result (docs/protocol.md §2.4)."""
    try:
        document = strict_json.loads(body.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return _denied(status, INVALID_JSON)
    answer: dict[Any, Any] = document if isinstance(document, dict) else {}
    if not 200 <= status < 300 or answer.get("ok") is not True:
        reason = _reason_text(answer.get("reason")) or _reason_text(answer.get("error"))
        return _denied(status, reason or VALIDATION_FAILED)
    claims = validate_claims(answer.get("claims"))
    if claims is None:
        return _denied(status, INVALID_CLAIMS)
    if _role_mismatch(claims, role):
        return _denied(_ROLE_MISMATCH_STATUS, ROLE_CLAIM_MISMATCH)
    return AdmissionResult(claims=claims, status=status, reason=None)


@implementer(IAdmission)
class PlatformAdmission:
    """Admission by the platform: ``POST /api/runtime/internal/relay/validate`` (docs/protocol.md §2.4)."""

    def __init__(
        self,
        http_client: HTTPClient,
        clock: IReactorTime,
        server_url: str,
        internal_key: Optional[str],
        timeout_ms: int,
        max_response_bytes: int,
    ) -> None:
        """Only the origin of ``server_url`` is used; its path, query and credentials are dropped."""
        parts = urlsplit(server_url)
        host = parts.netloc.rpartition("@")[2]
        if parts.scheme not in ("http", "https") or not host:
            raise ValueError("server_url must be an absolute http(s) URL")
        if timeout_ms <= 0 or max_response_bytes <= 0:
            raise ValueError("timeout_ms and max_response_bytes must be positive")
        self._http = http_client
        self._clock = clock
        self._url = f"{parts.scheme}://{host}{VALIDATE_PATH}"
        self._internal_key = internal_key or None
        self._timeout_ms = timeout_ms
        self._max_response_bytes = max_response_bytes

    def admit(
        self, token: str, role: str, workspace_id: str, runtime_target_id: Optional[str]
    ) -> Deferred[AdmissionResult]:
        """Ask the platform; the Deferred always fires with a result (failures included)."""
        body: dict[str, str] = {"relayToken": token, "role": role, "workspaceId": workspace_id}
        if runtime_target_id is not None:
            body["runtimeTargetId"] = runtime_target_id
        headers: dict[Union[str, bytes], Union[str, bytes]] = {"content-type": "application/json"}
        if self._internal_key is not None:
            headers["x-relay-internal-key"] = self._internal_key
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        timeout_ms = self._timeout_ms
        call = bounded_request(
            self._http,
            self._clock,
            "POST",
            self._url,
            data=payload,
            headers=headers,
            timeout_ms=timeout_ms,
            max_response_bytes=self._max_response_bytes,
        )

        def answered(answer: HttpAnswer) -> AdmissionResult:
            return _interpret(answer.status, answer.body, role)

        def failed(failure: Failure) -> AdmissionResult:
            failure.trap(HttpCallFailed)
            error = failure.value
            if error.kind == "too_large":
                return _denied(502, RESPONSE_TOO_LARGE)
            if error.kind == "timeout":
                return _denied(504, f"admission request timed out after {timeout_ms}ms")
            return _denied(504, f"admission {error.detail}")

        def bug(failure: Failure) -> Union[Failure, AdmissionResult]:
            if failure.check(CancelledError):
                return failure
            _log.failure("admission call failed unexpectedly", failure, relay_event="admission_error")
            return _denied(502, INTERNAL_ERROR)

        result: Deferred[AdmissionResult] = call.addCallbacks(answered, failed)
        result.addErrback(bug)
        return result


@implementer(IAdmission)
class LocalAdmission:
    """Admission by verifying the token locally (no platform involved)."""

    def __init__(self, verifier: LocalTokenVerifier, clock: IReactorTime) -> None:
        """``clock`` supplies the time tokens are checked against."""
        self._verifier = verifier
        self._clock = clock

    def admit(
        self, token: str, role: str, workspace_id: str, runtime_target_id: Optional[str]
    ) -> Deferred[AdmissionResult]:
        """Verify the token now; a rejection carries status 401 and the verifier's reason."""
        try:
            claims = self._verifier.verify(token, self._clock.seconds())
        except TokenRejected as rejected:
            return succeed(_denied(401, rejected.reason))
        if _role_mismatch(claims, role):
            return succeed(_denied(_ROLE_MISMATCH_STATUS, ROLE_CLAIM_MISMATCH))
        return succeed(AdmissionResult(claims=claims, status=200, reason=None))


# --- HTTPS toward the platform -------------------------------------------------------------


@dataclass(frozen=True)
class _TLSMaterial:
    """Certificates loaded from the configured files."""

    trust_root: Optional[Any]
    client_certificate: Optional[PrivateCertificate]
    client_chain: tuple[crypto.X509, ...]


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {error.strerror}") from None


def _load_certificates(path: str, what: str) -> list[crypto.X509]:
    try:
        loaded = x509.load_pem_x509_certificates(_read(path, what))
    except ValueError as error:
        if str(error).startswith("cannot read"):
            raise
        raise ValueError(f"{what} {path} holds no valid PEM certificate") from None
    return [crypto.X509.from_cryptography(certificate) for certificate in loaded]


def _load_private_key(path: str, passphrase: Optional[str]) -> crypto.PKey:
    data = _read(path, "client key")
    password = passphrase.encode("utf-8") if passphrase else None
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError:
        # Raised for a missing passphrase on an encrypted key, or one given for a plain key.
        raise ValueError(f"client key {path}: passphrase missing or not expected") from None
    except ValueError:
        raise ValueError(f"client key {path} cannot be decoded (bad PEM or wrong passphrase)") from None
    return crypto.PKey.from_cryptography_key(key)  # type: ignore[arg-type]


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedCreator:
    """TLS toward the platform without certificate checks (still sends SNI and any client cert)."""

    def __init__(self, hostname: str, context: SSL.Context) -> None:
        self._hostname = hostname
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """Create the client-side OpenSSL connection."""
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if not (isIPAddress(self._hostname) or isIPv6Address(self._hostname)):
            connection.set_tlsext_host_name(self._hostname.encode("ascii"))
        return connection


@implementer(IPolicyForHTTPS)
class _PlatformTLSPolicy:
    """TLS settings for platform calls; certificate files are re-read when they change on disk."""

    def __init__(
        self,
        verify: bool,
        ca_cert_path: Optional[str],
        client_cert_path: Optional[str],
        client_key_path: Optional[str],
        client_key_passphrase: Optional[str],
    ) -> None:
        if bool(client_cert_path) != bool(client_key_path):
            raise ValueError("a client certificate needs both a certificate and a key path")
        self._verify = verify
        self._ca_cert_path = ca_cert_path or None
        self._client_cert_path = client_cert_path or None
        self._client_key_path = client_key_path or None
        self._passphrase = client_key_passphrase
        self._stamp = self._file_stamp()
        self._material = self._load()
        self._creators: dict[tuple[bytes, int], IOpenSSLClientConnectionCreator] = {}

    def _paths(self) -> list[str]:
        paths = [self._client_cert_path, self._client_key_path]
        if self._verify:
            paths.append(self._ca_cert_path)
        return [path for path in paths if path]

    def _file_stamp(self) -> tuple[tuple[str, int, int], ...]:
        stamp = []
        for path in self._paths():
            try:
                info = os.stat(path)
            except OSError:
                stamp.append((path, -1, -1))
            else:
                stamp.append((path, info.st_mtime_ns, info.st_size))
        return tuple(stamp)

    def _load(self) -> _TLSMaterial:
        trust_root = None
        if self._verify and self._ca_cert_path:
            # Like Node's `ca` option in the original relay: the file replaces the platform roots.
            authorities = _load_certificates(self._ca_cert_path, "CA certificate file")
            trust_root = trustRootFromCertificates([Certificate(cert) for cert in authorities])
        client_certificate = None
        chain: tuple[crypto.X509, ...] = ()
        if self._client_cert_path and self._client_key_path:
            leaf, *rest = _load_certificates(self._client_cert_path, "client certificate")
            key = _load_private_key(self._client_key_path, self._passphrase)
            client_certificate = PrivateCertificate.fromCertificateAndKeyPair(Certificate(leaf), KeyPair(key))
            chain = tuple(rest)
        return _TLSMaterial(trust_root, client_certificate, chain)

    def _current(self) -> _TLSMaterial:
        stamp = self._file_stamp()
        if stamp != self._stamp:
            self._material = self._load()
            self._stamp = stamp
            self._creators = {}
        return self._material

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """The connection creator for one platform host (raises when a certificate file is unusable)."""
        material = self._current()
        creator = self._creators.get((hostname, port))
        if creator is None:
            creator = self._build(hostname.decode("ascii"), material)
            self._creators[(hostname, port)] = creator
        return creator

    def _build(self, host: str, material: _TLSMaterial) -> IOpenSSLClientConnectionCreator:
        if self._verify:
            extra: dict[str, Any] = {}
            if material.client_chain:
                extra["extraCertChain"] = list(material.client_chain)
            return optionsForClientTLS(
                host,
                trustRoot=material.trust_root,
                clientCertificate=material.client_certificate,
                extraCertificateOptions=extra or None,
            )
        options: dict[str, Any] = {"verify": False}
        if material.client_certificate is not None:
            options["privateKey"] = material.client_certificate.privateKey.original
            options["certificate"] = material.client_certificate.original
            options["extraCertChain"] = list(material.client_chain)
        return _UnverifiedCreator(host, CertificateOptions(**options).getContext())


def platform_tls_policy(
    *,
    verify: bool,
    ca_cert_path: Optional[str],
    client_cert_path: Optional[str],
    client_key_path: Optional[str],
    client_key_passphrase: Optional[str],
) -> IPolicyForHTTPS:
    """
    The HTTPS policy for platform calls (docs/protocol.md §2.4): verification on/off, a CA file, an mTLS client cert.

    With ``verify`` the certificate chain and host name are checked against the CA file when
    one is given (it then replaces the platform trust roots), else against the platform roots.
    Files are read now (a bad file raises ValueError) and again whenever they change.
    """
    return _PlatformTLSPolicy(verify, ca_cert_path, client_cert_path, client_key_path, client_key_passphrase)


#: Idle connections kept per platform host by ``make_http_client``'s default pool.
PERSISTENT_PER_HOST = 64


def make_http_client(
    reactor: Any, tls_policy: IPolicyForHTTPS, *, pool: Optional[HTTPConnectionPool] = None
) -> HTTPClient:
    """
    A treq client over an ``Agent`` with persistent TCP_NODELAY connections; it never stores cookies.

    The default pool keeps up to ``PERSISTENT_PER_HOST`` idle connections to the platform (Twisted's
    default is 2): a burst of upgrades admits many sockets at once, and with 2 kept every call
    beyond them paid a TCP connect and a close.
    """
    if pool is None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = PERSISTENT_PER_HOST
    agent = Agent.usingEndpointFactory(reactor, NoDelayAgentEndpoints(reactor, tls_policy), pool=pool)
    no_cookies = IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return HTTPClient(agent, cookiejar=no_cookies)

