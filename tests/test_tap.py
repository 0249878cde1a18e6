"""The twistd plugin, its options and the service tree it builds."""

from __future__ import annotations

import subprocess
import sys
import tempfile

from twisted.application.internet import TimerService
from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.support import REPO_ROOT
from viewport.relay.service import ListeningService
from viewport.relay.tap import Options, makeService

SECRET = "s" * 40


class PluginTests(SynchronousTestCase):
    """twistd finds one well-formed ``viewport-relay`` service maker."""

    def test_plugin_is_discovered(self) -> None:
        """getPlugins(IServiceMaker) lists viewport-relay, and it provides the interface."""
        makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "viewport-relay"]
        self.assertEqual(len(makers), 1)
        self.assertTrue(verifyObject(IServiceMaker, makers[0]))
        self.assertIsInstance(makers[0].options(), Options)


class OptionsTests(SynchronousTestCase):
    """Options override the environment, and bad values are usage errors naming the variable."""

    def test_port_and_host_override_environment(self) -> None:
        """--port and --host win over PORT and HOST."""
        options = Options({"PORT": "9000", "HOST": "127.0.0.1", "RELAY_TOKEN_SECRET": SECRET})
        options.parseOptions(["--port", "0", "--host", "localhost"])
        assert options.config is not None
        self.assertEqual((options.config.listen.host, options.config.listen.port), ("localhost", 0))

    def test_invalid_variable_is_a_usage_error(self) -> None:
        """An invalid enum value stops option parsing with a message naming the variable."""
        options = Options({"RELAY_BACKPLANE_MODE": "cluster"})
        error = self.assertRaises(usage.UsageError, options.parseOptions, [])
        self.assertIn("RELAY_BACKPLANE_MODE", str(error))


class ServiceTests(SynchronousTestCase):
    """makeService builds the listening service and its timers on the given reactor."""

    def test_service_listens_on_configured_address(self) -> None:
        """Starting the service listens on HOST:PORT and runs the heartbeat and cleanup timers on the reactor clock."""
        reactor = MemoryReactorClock()
        options = Options({"RELAY_TOKEN_SECRET": SECRET, "PORT": "7999", "HOME": tempfile.mkdtemp()})
        options.parseOptions([])
        service = makeService(options, reactor=reactor)
        self.assertIsInstance(service, ListeningService)
        timers = [s for s in service if isinstance(s, TimerService)]
        self.assertEqual(len(timers), 2)
        service.privilegedStartService()
        service.startService()
        self.assertEqual([(p[0], p[3]) for p in reactor.tcpServers], [(7999, "127.0.0.1")])
        self.assertTrue(all(t.clock is reactor for t in timers))
        service.stopService()


class CommandLineTests(SynchronousTestCase):
    """The real twistd command line."""

    def _twistd(self, env: dict, *args: str) -> subprocess.CompletedProcess:
        base = {"PYTHONPATH": REPO_ROOT, "HOME": tempfile.mkdtemp(), "PATH": "/usr/bin:/bin"}
        base.update(env)
        return subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "viewport-relay", *args],
            env=base, capture_output=True, text=True, timeout=60,
        )

    def test_help_documents_options(self) -> None:
        """twistd -n viewport-relay --help lists --host and --port."""
        result = self._twistd({}, "--help")
        self.assertEqual(result.returncode, 0)
        self.assertIn("--port", result.stdout)
        self.assertIn("--host", result.stdout)

    def test_bad_environment_stops_startup_naming_the_variable(self) -> None:
        """A misspelled boolean exits non-zero with one line naming the variable and the accepted values."""
        result = self._twistd({"RELAY_ENABLE_ADMIN_HTTP": "TRUE"})
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("RELAY_ENABLE_ADMIN_HTTP", result.stderr + result.stdout)
        self.assertNotIn("Traceback", result.stderr + result.stdout)
