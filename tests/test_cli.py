"""The ``viewport-relay`` operator command: token and check-config."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from viewport.cli import main, parse_duration
from viewport.tokens import LocalTokenVerifier

SECRET = "cli-secret-0123456789abcdef0123456789"


def _run(argv: list, env: dict) -> tuple:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv, env)
    return code, out.getvalue(), err.getvalue()


class TokenCommandTests(SynchronousTestCase):
    """Tokens minted by the CLI are accepted by the relay's verifier with the claims asked for."""

    def test_token_with_configured_secret(self) -> None:
        """--role/--workspace/--runtime-target/--scope/--client-id end up as claims of a valid HS256 token."""
        code, out, _ = _run(
            ["token", "--role", "client", "--workspace", "w1", "--runtime-target", "rt1", "--scope", "pairing",
             "--client-id", "c1", "--ttl", "15m"],
            {"RELAY_TOKEN_SECRET": SECRET, "HOME": tempfile.mkdtemp()},
        )
        self.assertEqual(code, 0)
        claims = LocalTokenVerifier(SECRET, ["HS256"]).verify(out.strip(), time.time())
        self.assertEqual((claims.role, claims.workspace_id, claims.runtime_target_id, claims.scope, claims.client_id),
                         ("client", "w1", "rt1", "pairing", "c1"))
        self.assertEqual(claims.exp - claims.iat, 900)  # type: ignore[operator]

    def test_token_creates_embedded_secret(self) -> None:
        """Without a configured key the CLI uses (and creates) the same secret file as the relay."""
        home = tempfile.mkdtemp()
        code, out, err = _run(["token", "--role", "workspace-daemon", "--workspace", "w1", "--runtime-target", "rt1"],
                              {"HOME": home})
        self.assertEqual(code, 0, err)
        path = os.path.join(home, ".viewport", "relay-token-secret")
        with open(path) as handle:
            secret = handle.read().strip()
        self.assertEqual(LocalTokenVerifier(secret, ["HS256"]).verify(out.strip(), time.time()).role, "workspace-daemon")

    def test_durations(self) -> None:
        """Durations accept s/m/h/d suffixes and refuse zero."""
        self.assertEqual([parse_duration(t) for t in ("90", "90s", "15m", "1h", "2d")], [90, 90, 900, 3600, 172800])
        self.assertRaises(Exception, parse_duration, "0h")


class CheckConfigTests(SynchronousTestCase):
    """check-config validates like startup and masks secrets."""

    def test_valid_environment_prints_masked_configuration(self) -> None:
        """A valid environment prints JSON with secrets masked and exits 0."""
        code, out, _ = _run(["check-config"], {"RELAY_TOKEN_SECRET": SECRET, "RELAY_ADMIN_TOKEN": "admin-token-value"})
        self.assertEqual(code, 0)
        shown = json.loads(out)
        self.assertEqual(shown["settings"]["RELAY_TOKEN_SECRET"], "***")
        self.assertEqual(shown["settings"]["RELAY_ADMIN_TOKEN"], "***")
        self.assertNotIn(SECRET, out)
        self.assertNotIn("admin-token-value", out)
        self.assertEqual(shown["settings"]["RELAY_BACKPLANE_MODE"], "single")
        self.assertEqual(shown["derived"]["admission.mode"], "local_secret")
        self.assertTrue(all(name.isupper() for name in shown["settings"]), "environment variable names only")

    def test_version(self) -> None:
        """viewport-relay --version prints the package version."""
        from viewport import __version__

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            with self.assertRaises(SystemExit) as stop:
                main(["--version"], {})
        self.assertEqual((stop.exception.code, out.getvalue().strip()), (0, f"viewport-relay {__version__}"))

    def test_invalid_environment_names_variable(self) -> None:
        """An invalid value exits 2 with one line naming the variable."""
        code, out, err = _run(["check-config"], {"RELAY_MAX_FRAME_BYTES": "lots"})
        self.assertEqual(code, 2)
        self.assertIn("RELAY_MAX_FRAME_BYTES", err)
        self.assertEqual(len(err.strip().splitlines()), 1)


class TokenMismatchTests(SynchronousTestCase):
    """token refuses to mint what the relay configured by the same environment would refuse."""

    def test_platform_admission_refuses(self) -> None:
        """HOST=0.0.0.0 without a token key means platform admission: token exits 2 saying why, unless --force."""
        code, out, err = _run(["token", "--role", "client", "--workspace", "w1"], {"HOST": "0.0.0.0"})
        self.assertEqual((code, out), (2, ""))
        self.assertIn("admission: platform", err)
        code, out, err = _run(["token", "--role", "client", "--workspace", "w1", "--force"], {"HOST": "0.0.0.0"})
        self.assertEqual(code, 0)
        self.assertEqual(out.count("."), 2)
        self.assertIn("warning:", err)

    def test_check_config_warns_when_the_host_changed_admission(self) -> None:
        """check-config shows the admission mode and warns that HOST=0.0.0.0 switched it to the platform."""
        code, out, err = _run(["check-config"], {"HOST": "0.0.0.0"})
        self.assertEqual((code, json.loads(out)["derived"]["admission.mode"]), (0, "platform"))
        self.assertIn("HOST: '0.0.0.0' is not a loopback address", err)


class HelpTests(SynchronousTestCase):
    """Every operator subcommand documents itself."""

    def test_each_subcommand_has_help(self) -> None:
        """check-config, token and probe answer --help with a usage text and exit 0."""
        for command, expected in (("check-config", "--port"), ("token", "--role"), ("probe", "--token")):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                with self.assertRaises(SystemExit) as stop:
                    main([command, "--help"], {})
            self.assertEqual(stop.exception.code, 0, command)
            self.assertIn(expected, out.getvalue(), command)
