"""What the relay's and the bus's twistd plugins share: host/port options, binding, JSON logging."""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping, Optional, Sequence, TextIO

from twisted.application.service import MultiService
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from viewport.environment import ConfigError


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


#: Exit status when the listening address cannot be bound (a usage problem, as for a bad variable).
EXIT_CANNOT_LISTEN = 2


def listen_now(endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> IListeningPort:
    """
    Bind at once (TCP/TLS endpoints listen synchronously). A port that cannot be bound (in use,
    not permitted, no such address) stops the process with one line naming the address and why,
    exit status 2 — not a traceback.
    """
    outcome: list[Any] = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome:
        raise RuntimeError("listening did not complete synchronously")
    if isinstance(outcome[0], Failure):
        failure = outcome[0]
        error = failure.value
        if isinstance(error, CannotListenError):
            reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
            _log.error("cannot listen on {address}: {error}", relay_event="listen_failed",
                       address=f"{error.interface or '*'}:{error.port}", error=reason)
            raise SystemExit(EXIT_CANNOT_LISTEN)
        failure.raiseException()
    port: IListeningPort = outcome[0]
    return port


_log = Logger()

#: twistd's own default log file when it daemonizes without ``--logfile``.
TWISTD_DEFAULT_LOGFILE = "twistd.log"
# twistd options written with their value as the next argument (``--pidfile twistd.pid``).
_TWISTD_OPTIONS_WITH_VALUES = frozenset({
    "--pidfile", "-r", "--reactor", "--umask", "-d", "--rundir", "-u", "--uid", "-g", "--gid", "--prefix",
    "--logger", "-p", "--profile", "--profiler", "--chroot", "--syslog-prefix", "-f", "--file", "-y", "--python",
    "-s", "--source",
})

def twistd_log_target(argv: Sequence[str]) -> Optional[str]:
    """
    Where twistd was told to log, read from its command line (the options before the plugin name):
    None for standard output (``--nodaemon`` without ``--logfile``, or ``--logfile=-``), else the
    file (``--logfile``, or ``twistd.log`` when it daemonizes). Our JSON observer replaces twistd's
    own, so it has to honour these options itself.
    """
    logfile: Optional[str] = None
    nodaemon = False
    args = list(argv[1:])
    index = 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("-"):
            break  # the plugin name: what follows are the plugin's options
        if arg in ("-n", "--nodaemon"):
            nodaemon = True
        elif arg in ("-l", "--logfile") and index + 1 < len(args):
            index += 1
            logfile = args[index]
        elif arg.startswith("--logfile="):
            logfile = arg[len("--logfile="):]
        elif arg.startswith("-l") and len(arg) > 2:
            logfile = arg[2:]
        elif arg in _TWISTD_OPTIONS_WITH_VALUES:
            index += 1
        index += 1
    if logfile == "-" or (logfile is None and nodaemon):
        return None
    return logfile or TWISTD_DEFAULT_LOGFILE


def log_stream(argv: Sequence[str]) -> TextIO:
    """The stream JSON log lines go to: standard output, or twistd's log file (opened for appending)."""
    target = twistd_log_target(argv)
    if target is None:
        return sys.stdout
    return open(target, "a", encoding="utf-8", buffering=1)


class JsonLoggingService(MultiService):
    """A service tree whose ``log_observer``, under twistd, becomes the application's log observer."""

    log_observer: Optional[ILogObserver] = None

    def setServiceParent(self, parent: Any) -> Any:
        """Under twistd the parent is the application: install our JSON observer on it."""
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)
