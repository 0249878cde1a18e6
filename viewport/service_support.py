"""What the relay's and the bus's twistd plugins share: host/port options, binding, JSON logging."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from twisted.application.service import MultiService
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from viewport.relay.config import ConfigError


class EnvironmentOptions(usage.Options):
    """
    ``--host``/``--port`` override the environment; everything else is an environment variable.

    Subclasses declare ``optParameters`` (with their default port in the help) and ``load``; the
    configuration is built in ``postOptions``, so a bad value is a usage error naming the variable.
    """

    synopsis = "[--host HOST] [--port PORT]"

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        super().__init__()
        self._environ = environ if environ is not None else os.environ
        self.config: Any = None

    def load(self, environ: Mapping[str, str], overrides: Mapping[str, object]) -> Any:
        """Build the configuration object (raises ConfigError)."""
        raise NotImplementedError

    def postOptions(self) -> None:
        """Build the configuration now."""
        overrides: dict[str, object] = {}
        if self["host"] is not None:
            overrides["host"] = self["host"]
        if self["port"] is not None:
            overrides["port"] = self["port"]
        try:
            self.config = self.load(self._environ, overrides)
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None


def tcp_endpoint(reactor: Any, host: str, port: int) -> IStreamServerEndpoint:
    """A TCP listening endpoint, IPv6 when the host is an IPv6 address."""
    if ":" in host:
        return TCP6ServerEndpoint(reactor, port, interface=host)
    return TCP4ServerEndpoint(reactor, port, interface=host)


def listen_now(endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> IListeningPort:
    """Bind at once (TCP/TLS endpoints listen synchronously); raise if the port cannot be bound."""
    outcome: list[Any] = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome:
        raise RuntimeError("listening did not complete synchronously")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    port: IListeningPort = outcome[0]
    return port


class JsonLoggingService(MultiService):
    """A service tree whose ``log_observer``, under twistd, becomes the application's log observer."""

    log_observer: Optional[ILogObserver] = None

    def setServiceParent(self, parent: Any) -> Any:
        """Under twistd the parent is the application: install our JSON observer on it."""
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)
