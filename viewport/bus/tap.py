"""``twistd -r asyncio -n viewport-bus``: options, configuration at the edge, the service tree."""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Mapping, Optional

from twisted.application.internet import TimerService
from twisted.application.service import IService
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from viewport.bus.api import BusApi, BusSite, max_body_bytes_for
from viewport.bus.config import BusConfig, load_bus_config
from viewport.bus.listener import NotificationListener
from viewport.bus.store import BusStore, DatabaseUnavailable, DatabaseUnsuitable
from viewport.bus.waiters import PullWaiters
from viewport.logs import JsonLineObserver, in_words
from viewport.service_support import log_stream, EnvironmentOptions, JsonLoggingService, listen_now, tcp_endpoint
from viewport.tokens import LocalTokenVerifier, load_or_create_secret

#: Log entries kept in memory by the JSON observer (the bus has no /logs endpoint).
_MAX_LOGS = 200
#: How long requests still running at shutdown may take before they are cancelled.
SHUTDOWN_GRACE_SECONDS = 2.0
_NOT_ASYNCIO = "viewport-bus needs the asyncio reactor: run `twistd -r asyncio -n viewport-bus`"

_log = Logger()


class Options(EnvironmentOptions):
    """Options override the environment; every other setting is an environment variable."""

    longdesc = (
        "Runs viewport-bus, the platform side of the relay's server backplane mode (validate, presence, "
        "frame bus) on PostgreSQL. Needs the asyncio reactor (twistd -r asyncio). Environment: "
        "BUS_DATABASE_URL, RELAY_INTERNAL_KEY (required), RELAY_TOKEN_SECRET / RELAY_TOKEN_PUBLIC_KEY / "
        "RELAY_TOKEN_SECRET_FILE, BUS_RETENTION_SECONDS, BUS_MAX_WAIT_MS, BUS_MAX_PAYLOAD_BYTES, "
        "BUS_MAX_BATCH_BYTES, BUS_PRESENCE_TTL_SECONDS, HOST, PORT."
    )
    optParameters = [
        ["host", None, None, "Listen address (overrides HOST; default 127.0.0.1)."],
        ["port", "p", None, "Listen port, 0 for any free port (overrides PORT; default 7790).", int],
    ]
    config: Optional[BusConfig]

    def load(self, environ: Mapping[str, str], overrides: Mapping[str, object]) -> BusConfig:
        """The bus's configuration."""
        return load_bus_config(environ, overrides)


def asyncio_loop_of(reactor: Any) -> asyncio.AbstractEventLoop:
    """The asyncio event loop under Twisted's asyncio reactor; SystemExit with a one-line message otherwise."""
    loop = getattr(reactor, "_asyncioEventloop", None)
    if not isinstance(loop, asyncio.AbstractEventLoop):
        raise SystemExit(_NOT_ASYNCIO)
    return loop


def build_verifier(config: BusConfig) -> LocalTokenVerifier:
    """The relay-token verifier for /validate, with the relay's key semantics."""
    if config.token_key == "secret":
        assert config.token_secret is not None
        return LocalTokenVerifier(config.token_secret, ["HS256"], config.token_issuer, config.token_audience)
    if config.token_key == "public_key":
        assert config.token_public_key_path is not None
        with open(config.token_public_key_path, "rb") as handle:
            public_key = handle.read()
        return LocalTokenVerifier(public_key, ["EdDSA", "RS256"], config.token_issuer, config.token_audience)
    secret, created = load_or_create_secret(config.token_secret_file)
    _log.info(
        "token secret created at {path}" if created else "token secret loaded from {path}",
        relay_event="token_secret_created" if created else "token_secret_loaded",
        path=config.token_secret_file,
    )
    return LocalTokenVerifier(secret, ["HS256"], config.token_issuer, config.token_audience)


def retention_interval_seconds(retention_seconds: float) -> float:
    """How often expired frames are deleted: a fifth of the retention age, between 0.1 s and 30 s."""
    return min(30.0, max(0.1, retention_seconds / 5.0))


class BusService(JsonLoggingService):
    """
    Listens at privileged start (a port it cannot bind stops startup), then migrates the database
    and opens the LISTEN connection in the background: requests answer 503 while PostgreSQL is
    unreachable and work again as soon as it is back.
    """

    _log = Logger()

    def __init__(
        self,
        *,
        config: BusConfig,
        clock: Any,
        store: BusStore,
        listener: NotificationListener,
        api: BusApi,
        site: BusSite,
        endpoint: IStreamServerEndpoint,
        shutdown_grace_seconds: float = SHUTDOWN_GRACE_SECONDS,
    ) -> None:
        super().__init__()
        self.config = config
        self.store = store
        self.listener = listener
        self.api = api
        self.site = site
        self._shutdown_grace_seconds = shutdown_grace_seconds
        self._said_unsuitable = False
        self._endpoint = endpoint
        self.port: Optional[IListeningPort] = None
        retention = TimerService(retention_interval_seconds(config.retention_seconds), self.expire)
        retention.clock = clock
        retention.setServiceParent(self)

    def privilegedStartService(self) -> None:
        """Listen now; raise if the port cannot be bound."""
        self.port = listen_now(self._endpoint, self.site)
        super().privilegedStartService()

    def startService(self) -> None:
        """Start migration, LISTEN and retention; announce where we listen."""
        if self.port is None:
            self.privilegedStartService()
        assert self.port is not None
        self.store.migrate().addErrback(self._database_down, "bus_migration_error")
        self.listener.start()
        super().startService()
        address = self.port.getHost()
        host = getattr(address, "host", self.config.host)
        shown = f"[{host}]" if ":" in host else host
        self._log.info(
            "bus listening at {url}",
            relay_event="bus_listening",
            url=f"http://{shown}:{getattr(address, 'port', self.config.port)}",
            retentionSeconds=self.config.retention_seconds,
            maxWaitMs=self.config.max_wait_ms,
            maxBatchBytes=self.config.max_batch_bytes,
            presenceTtlSeconds=self.config.presence_ttl_seconds,
            validateWith=self.config.token_key,
        )

    def _database_down(self, failure: Failure, event: str) -> None:
        if failure.check(DatabaseUnsuitable):
            # Not a passing outage: nothing works until the operator points the bus elsewhere. Said once.
            if not self._said_unsuitable:
                self._said_unsuitable = True
                self._log.error(in_words(event) + ": {error}", relay_event=event, error=str(failure.value))
        elif failure.check(DatabaseUnavailable):
            self._log.warn(in_words(event) + ": {error}", relay_event=event, error=str(failure.value))
        else:
            self._log.failure(in_words(event), failure, relay_event=event)

    def expire(self) -> "Deferred[None]":
        """Delete expired frames and presence; never raises (the timer must keep running)."""

        def done(deleted: int) -> None:
            if deleted:
                self._log.info("{count} expired frames deleted", relay_event="bus_frames_expired", count=deleted)

        d = self.store.expire(self.config.retention_seconds, self.config.presence_ttl_seconds)
        return d.addCallbacks(done, self._database_down, errbackArgs=("bus_retention_error",))

    @inlineCallbacks
    def stopService(self) -> Any:
        """Stop accepting, answer the requests in flight, stop LISTEN and retention, close the connections."""
        port, self.port = self.port, None
        if port is not None:
            yield port.stopListening()
        # Before the reactor cuts the connections: a request cut mid-query would otherwise leave
        # its database work to an event loop that is about to stop.
        yield self.api.stop(self._shutdown_grace_seconds)
        yield super().stopService()
        yield DeferredList([self.listener.stop(), self.store.close()], consumeErrors=True)


def makeService(options: Options, reactor: Any = None) -> IService:
    """The bus service tree for twistd (refuses any reactor but asyncio)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    loop = asyncio_loop_of(reactor)
    config = options.config
    if config is None:
        options.postOptions()
        config = options.config
    assert config is not None
    observer = JsonLineObserver(log_stream(sys.argv), _MAX_LOGS)
    store = BusStore(config.database_url, loop)
    waiters = PullWaiters(reactor, origin=store.origin)
    listener = NotificationListener(store.pool, loop, waiters.notify, waiters.wake_all)
    api = BusApi(
        store=store,
        waiters=waiters,
        clock=reactor,
        internal_key=config.internal_key,
        verifier=build_verifier(config),
        max_wait_ms=config.max_wait_ms,
        max_payload_bytes=config.max_payload_bytes,
        max_batch_bytes=config.max_batch_bytes,
        presence_ttl_seconds=config.presence_ttl_seconds,
    )
    endpoint = tcp_endpoint(reactor, config.host, config.port)
    service = BusService(
        config=config,
        clock=reactor,
        store=store,
        listener=listener,
        api=api,
        site=BusSite(api, max_body_bytes_for(config.max_payload_bytes, config.max_batch_bytes)),
        endpoint=endpoint,
    )
    service.log_observer = observer
    return service
