"""``twistd viewport-relay``: command-line options, configuration at the edge, the service tree."""

from __future__ import annotations

import sys
from typing import Any, Mapping, Optional

from twisted.application.service import IService
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from cryptography import x509
from OpenSSL import crypto
from OpenSSL.crypto import FILETYPE_PEM
from twisted.internet.ssl import CertificateOptions, KeyPair
from twisted.logger import Logger

from viewport.relay.admission import (
    LocalAdmission,
    PlatformAdmission,
    make_http_client,
    platform_tls_policy,
)
from viewport.relay.backplane.single import SingleBackplane
from viewport.relay.config import (
    AdmissionConfig,
    BackplaneConfig,
    ListenConfig,
    PlatformConfig,
    RelayConfig,
    TlsConfig,
    load_config,
)
from viewport.relay.core import Relay
from viewport.relay.interfaces import IAdmission, IBackplane
from viewport.logs import JsonLineObserver
from viewport.relay.metrics import RelayMetrics
from viewport.relay.service import ListeningService
from viewport.relay.web import make_site
from viewport.relay.worker import WorkerForwarder
from viewport.service_support import log_stream, EnvironmentOptions, tcp_endpoint
from viewport.tokens import LocalTokenVerifier, load_or_create_secret

_log = Logger()


class Options(EnvironmentOptions):
    """Options override the environment; every other setting is an environment variable."""

    longdesc = (
        "Runs the Viewport relay. Configuration comes from environment variables (see README.md: "
        "RELAY_BACKPLANE_MODE, RELAY_BACKPLANE_URL, RELAY_TOKEN_SECRET, RELAY_ENABLE_ADMIN_HTTP, "
        "...); the options below override HOST and PORT. Invalid values stop startup with a "
        "message naming the variable."
    )
    optParameters = [
        ["host", None, None, "Listen address (overrides HOST; default 127.0.0.1)."],
        ["port", "p", None, "Listen port, 0 for any free port (overrides PORT; default 7781).", int],
    ]
    config: Optional[RelayConfig]

    def load(self, environ: Mapping[str, str], overrides: Mapping[str, object]) -> RelayConfig:
        """The relay's configuration."""
        return load_config(environ, overrides, home=environ.get("HOME"))


#: ALPN protocols the TLS listener offers. A browser offers ``h2`` and ``http/1.1``; without a list,
#: the installed Twisted answers the offer with an empty selection, which OpenSSL turns into a fatal
#: alert (``net::ERR_SSL_PROTOCOL_ERROR``). The relay speaks HTTP/1.1, the only protocol WebSockets
#: upgrade from.
TLS_ALPN_PROTOCOLS = (b"http/1.1",)


def tls_options(cert_path: str, key_path: str) -> CertificateOptions:
    """
    TLS server options from a PEM certificate file (the leaf first, then any intermediates, as in a
    ``fullchain.pem``) and a PEM key, offering HTTP/1.1 over ALPN.
    """
    with open(cert_path, "rb") as cert_file, open(key_path, "rb") as key_file:
        certificates = x509.load_pem_x509_certificates(cert_file.read())
        key = KeyPair.load(key_file.read(), FILETYPE_PEM)
    leaf, *chain = (crypto.X509.from_cryptography(certificate) for certificate in certificates)
    return CertificateOptions(
        privateKey=key.original,
        certificate=leaf,
        extraCertChain=chain,
        acceptableProtocols=list(TLS_ALPN_PROTOCOLS),
    )


def listening_endpoint(reactor: Any, listen: ListenConfig, tls: TlsConfig) -> IStreamServerEndpoint:
    """TCP (IPv4 or IPv6 by the host's form) or TLS with the configured certificate and key."""
    if tls.enabled:
        options = tls_options(tls.cert_path, tls.key_path)
        return SSL4ServerEndpoint(reactor, listen.port, options, interface=listen.host)
    return tcp_endpoint(reactor, listen.host, listen.port)


def platform_policy(platform: PlatformConfig) -> Any:
    """TLS toward the platform: verification mode, extra CA, client certificate when mTLS is on."""
    return platform_tls_policy(
        verify=platform.tls_verify,
        ca_cert_path=platform.ca_cert_path,
        client_cert_path=platform.client_cert_path if platform.mtls_enabled else None,
        client_key_path=platform.client_key_path if platform.mtls_enabled else None,
        client_key_passphrase=platform.client_key_passphrase,
    )


def build_admission(admission: AdmissionConfig, platform: PlatformConfig, reactor: Any) -> IAdmission:
    """Local token verification when a key is configured (or embedded), else the platform call."""
    if admission.mode == "local_secret":
        assert admission.token_secret is not None
        verifier = LocalTokenVerifier(
            admission.token_secret, ["HS256"], admission.token_issuer, admission.token_audience
        )
        return LocalAdmission(verifier, reactor)
    if admission.mode == "local_public_key":
        assert admission.token_public_key_path is not None
        with open(admission.token_public_key_path, "rb") as handle:
            public_key = handle.read()
        verifier = LocalTokenVerifier(
            public_key, ["EdDSA", "RS256"], admission.token_issuer, admission.token_audience
        )
        return LocalAdmission(verifier, reactor)
    if admission.mode == "embedded_secret_file":
        secret, created = load_or_create_secret(admission.token_secret_file)
        _log.info(
            "token secret {path} " + ("created" if created else "loaded"),
            relay_event="token_secret_created" if created else "token_secret_loaded",
            path=admission.token_secret_file,
        )
        verifier = LocalTokenVerifier(secret, ["HS256"], admission.token_issuer, admission.token_audience)
        return LocalAdmission(verifier, reactor)
    return PlatformAdmission(
        make_http_client(reactor, platform_policy(platform)),
        reactor,
        platform.url,
        platform.internal_key,
        admission.timeout_ms,
        admission.max_response_bytes,
    )


def build_backplane(
    *,
    relay_id: str,
    backplane: BackplaneConfig,
    platform: PlatformConfig,
    max_frame_bytes: int,
    reactor: Any,
    metrics: RelayMetrics,
) -> IBackplane:
    """The configured backplane: nothing (single), Redis pub/sub, or the platform's HTTP bus."""
    if backplane.mode == "redis":
        from viewport.relay.backplane.redis import RedisBackplane
        from viewport.relay.backplane.redis_cluster import RedisClusterBackplane
        from viewport.relay.backplane.redis_url import parse_redis_url

        assert backplane.redis_url is not None and backplane.bus_hmac_key is not None
        # redis+cluster:// (seed nodes of a Redis Cluster) takes the sharded variant of the same backplane.
        kind = RedisClusterBackplane if parse_redis_url(backplane.redis_url).cluster else RedisBackplane
        return kind(
            relay_id=relay_id,
            redis_url=backplane.redis_url,
            hmac_key=backplane.bus_hmac_key,
            reactor=reactor,
            key_prefix=backplane.redis_key_prefix,
            presence_ttl_ms=backplane.redis_presence_ttl_ms,
            connect_timeout_ms=backplane.redis_connect_timeout_ms,
            max_skew_ms=backplane.bus_signature_max_skew_ms,
            freshness_track_max=backplane.bus_freshness_track_max,
            max_payload_bytes=max_frame_bytes,
            resolve_cache_max=backplane.presence_resolve_cache_max,
            liveness_ttl_ms=backplane.liveness_ttl_ms,
            metrics=metrics,
        )
    if backplane.mode == "server":
        from twisted.web.client import HTTPConnectionPool

        from viewport.relay.backplane.server import ServerBackplane

        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 16
        return ServerBackplane(
            relay_id=relay_id,
            public_ws_base_url=backplane.public_ws_base_url,
            server_url=platform.url,
            internal_key=platform.internal_key,
            hmac_key=backplane.bus_hmac_key,
            http_client=make_http_client(reactor, platform_policy(platform), pool=pool),
            clock=reactor,
            timeout_ms=platform.timeout_ms,
            max_response_bytes=platform.max_response_bytes,
            pull_limit=backplane.bus_pull_limit,
            pull_wait_ms=backplane.bus_pull_wait_ms,
            max_skew_ms=backplane.bus_signature_max_skew_ms,
            freshness_track_max=backplane.bus_freshness_track_max,
            max_payload_bytes=max_frame_bytes,
            resolve_cache_max=backplane.presence_resolve_cache_max,
            presence_refresh_ms=backplane.presence_sync_interval_ms,
            liveness_ttl_ms=backplane.liveness_ttl_ms,
            max_batch=backplane.bus_publish_batch_max,
            queue_max_bytes=backplane.bus_queue_max_bytes,
            queue_max_age_ms=backplane.bus_queue_max_age_ms,
            metrics=metrics,
        )
    return SingleBackplane(relay_id)


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    The relay's service tree for twistd. Without a ``reactor`` (twistd's own call) this is the
    process's entry point, and the service also tunes the garbage collector for a long-lived relay.
    """
    process_entry = reactor is None
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    config = options.config
    if config is None:
        options.postOptions()
        config = options.config
    assert config is not None
    observer = JsonLineObserver(log_stream(sys.argv), config.http.max_logs)
    for warning in config.warnings:
        _log.warn("configuration: {warning}", relay_event="config_warning", warning=warning)
    metrics = RelayMetrics()
    worker_forward = WorkerForwarder(
        http_client=make_http_client(reactor, platform_policy(config.platform)),
        clock=reactor,
        server_url=config.platform.url,
        metrics=metrics,
        max_response_bytes=config.limits.max_frame_bytes,
    )
    relay = Relay(
        config=config,
        clock=reactor,
        backplane=build_backplane(
            relay_id=config.relay_id, backplane=config.backplane, platform=config.platform,
            max_frame_bytes=config.limits.max_frame_bytes, reactor=reactor, metrics=metrics,
        ),
        admission=build_admission(config.admission, config.platform, reactor),
        metrics=metrics,
        log_observer=observer,
        worker_forward=worker_forward,
    )
    service = ListeningService(
        relay, listening_endpoint(reactor, config.listen, config.tls), config.heartbeat.shutdown_grace_ms / 1000.0, make_site(relay),
        tune_gc=process_entry,
    )
    service.log_observer = observer
    return service
