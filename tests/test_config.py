"""Tests for parsing the relay's environment into a RelayConfig."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Mapping

from twisted.trial.unittest import SynchronousTestCase

from viewport.environment import ConfigError, is_loopback_host, looks_local
from viewport.relay.config import SECTIONS, RelayConfig, load_config, masked

HMAC = "bus-hmac-key-0123456789abcdef"
INTERNAL = "k3y-for-the-platform-0123456789"
SECRET = "s" * 32

#: Each integer variable: the RelayConfig field (section.field) that holds it, and its default.
INT_DEFAULTS = {
    "MAX_LOGS": ("http.max_logs", 400),
    "RELAY_ADMISSION_TIMEOUT_MS": ("admission.timeout_ms", 2000),
    "RELAY_ADMISSION_MAX_RESPONSE_BYTES": ("admission.max_response_bytes", 262144),
    "RELAY_INTERNAL_API_TIMEOUT_MS": ("platform.timeout_ms", 2000),
    "RELAY_INTERNAL_API_MAX_RESPONSE_BYTES": ("platform.max_response_bytes", 262144),
    "RELAY_MAX_TOTAL_CONNECTIONS": ("limits.max_total_connections", 2000),
    "RELAY_MAX_CONNECTIONS_PER_IP": ("limits.max_connections_per_ip", 50),
    "RELAY_MAX_CLIENTS_PER_WORKSPACE": ("limits.max_clients_per_workspace", 100),
    "RELAY_MAX_FRAME_BYTES": ("limits.max_frame_bytes", 1048576),
    "RELAY_MAX_PENDING_BYTES": ("limits.max_pending_bytes", 4194304),
    "RELAY_UPGRADE_RATE_PER_MINUTE": ("limits.upgrade_rate_per_minute", 120),
    "RELAY_UPGRADE_BUCKET_MAX": ("limits.upgrade_bucket_max", 50000),
    "RELAY_KEX_INIT_RATE_PER_MINUTE": ("limits.kex_init_rate_per_minute", 60),
    "RELAY_KEX_RATE_LIMITER_MAX_KEYS": ("limits.kex_rate_limiter_max_keys", 20000),
    "RELAY_RUNTIME_RATE_PER_MINUTE": ("limits.runtime_rate_per_minute", 240),
    "RELAY_RUNTIME_RATE_PER_MINUTE_WORKSPACE": ("limits.runtime_rate_per_minute_workspace", 1200),
    "RELAY_RUNTIME_RATE_LIMITER_MAX_KEYS": ("limits.runtime_rate_limiter_max_keys", 20000),
    "RELAY_RUNTIME_WORKSPACE_RATE_LIMITER_MAX_KEYS": ("limits.runtime_workspace_rate_limiter_max_keys", 10000),
    "RELAY_DAEMON_RUNTIME_RATE_PER_MINUTE": ("limits.daemon_runtime_rate_per_minute", 2400),
    "RELAY_DAEMON_RATE_LIMITER_MAX_KEYS": ("limits.daemon_rate_limiter_max_keys", 10000),
    "RELAY_PAIRING_RATE_PER_MINUTE": ("limits.pairing_rate_per_minute", 30),
    "RELAY_PAIRING_RATE_LIMITER_MAX_KEYS": ("limits.pairing_rate_limiter_max_keys", 20000),
    "RELAY_PAIRING_REQUEST_TRACK_MAX": ("limits.pairing_request_track_max", 2048),
    "RELAY_SESSION_OWNER_TRACK_MAX": ("limits.session_owner_track_max", 4096),
    "RELAY_PING_INTERVAL_MS": ("heartbeat.ping_interval_ms", 30000),
    "RELAY_PONG_TIMEOUT_MS": ("heartbeat.pong_timeout_ms", 10000),
    "RELAY_IDLE_TIMEOUT_MS": ("heartbeat.idle_timeout_ms", 300000),
    "RELAY_EMPTY_WORKSPACE_TTL_MS": ("heartbeat.empty_workspace_ttl_ms", 120000),
    "RELAY_CLEANUP_INTERVAL_MS": ("heartbeat.cleanup_interval_ms", 30000),
    "RELAY_SHUTDOWN_GRACE_MS": ("heartbeat.shutdown_grace_ms", 10000),
    "RELAY_REDIS_CONNECT_TIMEOUT_MS": ("backplane.redis_connect_timeout_ms", 5000),
    "RELAY_REDIS_PRESENCE_TTL_MS": ("backplane.redis_presence_ttl_ms", 45000),
    "RELAY_PRESENCE_SYNC_INTERVAL_MS": ("backplane.presence_sync_interval_ms", 20000),
    "RELAY_PRESENCE_RESOLVE_CACHE_MAX": ("backplane.presence_resolve_cache_max", 10000),
    "RELAY_BUS_PULL_LIMIT": ("backplane.bus_pull_limit", 200),
    "RELAY_BUS_PULL_WAIT_MS": ("backplane.bus_pull_wait_ms", 1000),
    "RELAY_BUS_SIGNATURE_MAX_SKEW_MS": ("backplane.bus_signature_max_skew_ms", 15000),
    "RELAY_BUS_FRESHNESS_TRACK_MAX": ("backplane.bus_freshness_track_max", 20000),
}


def field_value(config: RelayConfig, dotted: str) -> object:
    """The value of a ``section.field`` (or top-level ``field``) of a configuration."""
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def all_fields() -> set[str]:
    """Every leaf field of RelayConfig, as ``section.field`` (top-level fields unprefixed)."""
    names = set()
    for field in dataclasses.fields(RelayConfig):
        section = SECTIONS.get(field.name)
        if section is None:
            names.add(field.name)
        else:
            names.update(f"{field.name}.{inner.name}" for inner in dataclasses.fields(section))
    return names


class ConfigTestCase(SynchronousTestCase):
    """Helpers that load a configuration with a private home directory and a fixed relayId suffix."""

    def setUp(self) -> None:
        self.home = tempfile.mkdtemp(prefix="relay-config-")
        self.addCleanup(shutil.rmtree, self.home)

    def load(self, environ: Mapping[str, str], overrides: Mapping[str, object] | None = None) -> RelayConfig:
        """Load with the private home and a relayId suffix of ``a``s."""
        return load_config(environ, overrides, home=self.home, random_hex=lambda n: "a" * n,
                           hostname=lambda: "relay-host")

    def load_error(self, environ: Mapping[str, str], overrides: Mapping[str, object] | None = None) -> ConfigError:
        """The one-line ConfigError that loading raises; fails the test when loading succeeds."""
        try:
            config = self.load(environ, overrides)
        except ConfigError as error:
            self.assertNotIn("\n", str(error))
            self.assertTrue(str(error).startswith(error.variable + ": "), str(error))
            return error
        self.fail(f"no ConfigError for {dict(environ)!r} {overrides!r}; got {config!r}")

    def assertRejected(self, environ: Mapping[str, str], variable: str) -> ConfigError:
        """Assert that loading fails naming ``variable``."""
        error = self.load_error(environ)
        self.assertEqual(error.variable, variable, f"{dict(environ)!r}: {error}")
        return error

    def make_file(self, name: str, content: str = "x") -> str:
        """Create a file in the private home and return its path."""
        path = os.path.join(self.home, name)
        with open(path, "w") as handle:
            handle.write(content)
        return path


class DefaultTests(ConfigTestCase):
    """An empty environment gives the documented defaults."""

    def test_integer_defaults(self) -> None:
        """Every integer knob has the reference default when unset."""
        config = self.load({})
        for variable, (field, default) in INT_DEFAULTS.items():
            self.assertEqual(field_value(config, field), default, variable)

    def test_other_defaults(self) -> None:
        """An empty environment is a single-backplane dev relay on 127.0.0.1:7781 with embedded token admission."""
        config = self.load({})
        certs = os.path.join(self.home, ".viewport", "relay-certs")
        expected = {
            "listen.host": "127.0.0.1",
            "listen.port": 7781,
            "platform.url": "https://api.getviewport.com",
            "platform.url_explicit": False,
            "tls.mode": "auto",
            "tls.enabled": False,
            "tls.termination": "self",
            "tls.host": "relay.getviewport.com",
            "tls.cert_dir": certs,
            "tls.cert_path": os.path.join(certs, "relay.getviewport.com.crt"),
            "tls.key_path": os.path.join(certs, "relay.getviewport.com.key"),
            "http.admin_token_sha256": None,
            "http.enable_admin": False,
            "http.health_verbose": True,
            "http.state_include_client_ids": True,
            "admission.mode": "embedded_secret_file",
            "warnings": (),
            "admission.token_secret": None,
            "admission.token_public_key_path": None,
            "admission.token_secret_file": os.path.join(self.home, ".viewport", "relay-token-secret"),
            "admission.token_issuer": None,
            "admission.token_audience": None,
            "platform.tls_verify_mode": "auto",
            "platform.tls_verify": True,
            "platform.auth_mode": "mtls",
            "platform.ca_cert_path": None,
            "platform.mtls_enabled": False,
            "platform.client_cert_path": None,
            "platform.client_key_path": None,
            "platform.client_key_passphrase": None,
            "relay_id": "127.0.0.1:7781:aaaaaaaaaaaa",
            "backplane.public_ws_base_url": "ws://127.0.0.1:7781/ws",
            "platform.internal_key": None,
            "backplane.mode": "single",
            "backplane.redis_url": None,
            "backplane.redis_key_prefix": "viewport:relay",
            "backplane.presence_sync_enabled": False,
            "backplane.bus_enabled": False,
            "backplane.bus_hmac_key": None,
            "backplane.client_redirect_enabled": False,
            "backplane.redirect_allowed_hosts": (),
            "listen.trusted_proxies": (),
            "listen.allowed_origins": ("*",),
            "backplane.liveness_ttl_ms": 2000,
            "backplane.bus_queue_max_bytes": 4194304,
            "backplane.bus_queue_max_age_ms": 2000,
            "backplane.bus_publish_batch_max": 200,
            "relay_mode": "dev",
        }
        self.assertEqual({name: field_value(config, name) for name in expected}, expected)
        self.assertEqual(all_fields(), set(expected) | {field for field, _ in INT_DEFAULTS.values()})

    def test_default_relay_id_is_random_hex(self) -> None:
        """Without ``random_hex`` the relayId ends in 12 fresh lowercase hex characters."""
        first = load_config({}, home=self.home).relay_id
        second = load_config({}, home=self.home).relay_id
        prefix, _, suffix = first.rpartition(":")
        self.assertEqual(prefix, "127.0.0.1:7781")
        self.assertRegex(suffix, "^[0-9a-f]{12}$")
        self.assertNotEqual(first, second)

    def test_frozen(self) -> None:
        """The configuration cannot be changed after loading."""
        config = self.load({})
        with self.assertRaises(dataclasses.FrozenInstanceError):
            config.listen.port = 1  # type: ignore[misc]

    def test_empty_values_mean_unset(self) -> None:
        """Empty or blank strings and integers fall back to their defaults."""
        config = self.load({"HOST": " ", "PORT": "", "RELAY_ID": "  ", "RELAY_PING_INTERVAL_MS": " "})
        self.assertEqual((config.listen.host, config.listen.port), ("127.0.0.1", 7781))
        self.assertEqual(config.relay_id, "127.0.0.1:7781:aaaaaaaaaaaa")
        self.assertEqual(config.heartbeat.ping_interval_ms, 30000)


class ParseTests(ConfigTestCase):
    """Every variable is read under its name into the matching field."""

    def test_every_integer_knob(self) -> None:
        """Each integer variable sets its field; surrounding whitespace is allowed."""
        environ = {variable: f" {index + 1} " for index, variable in enumerate(INT_DEFAULTS)}
        config = self.load(environ)
        for index, (variable, (field, _)) in enumerate(INT_DEFAULTS.items()):
            self.assertEqual(field_value(config, field), index + 1, variable)

    def test_strings_and_flags(self) -> None:
        """Strings are trimmed, the admin token is stored as its SHA-256 and CSV lists are split."""
        config = self.load(
            {
                "HOST": " localhost ",
                "PORT": "9000",
                "RELAY_ADMIN_TOKEN": "  admin  ",
                "RELAY_ENABLE_ADMIN_HTTP": "yes",
                "RELAY_HEALTH_VERBOSE": "off",
                "RELAY_STATE_INCLUDE_CLIENT_IDS": "0",
                "RELAY_ID": " relay-a ",
                "RELAY_TLS_TERMINATION": "platform",
                "RELAY_SERVER_AUTH_MODE": "private_network_shared_secret",
                "RELAY_SERVER_CLIENT_KEY_PASSPHRASE": " pass ",
                "RELAY_REDIRECT_ALLOWED_HOSTS": " Relay-A.Example.com, ,relay-b.example.com,",
                "RELAY_TRUSTED_PROXIES": "10.0.0.1, 192.168.0.0/16,::1",
                "RELAY_TOKEN_ISSUER": " issuer ",
                "RELAY_TOKEN_AUDIENCE": "relay",
                "RELAY_TOKEN_SECRET_FILE": "/etc/relay/secret",
            }
        )
        self.assertEqual(config.listen.host, "localhost")
        self.assertEqual(config.listen.port, 9000)
        self.assertEqual(config.http.admin_token_sha256, hashlib.sha256(b"admin").hexdigest())
        self.assertEqual(
            (config.http.enable_admin, config.http.health_verbose, config.http.state_include_client_ids), (True, False, False)
        )
        self.assertEqual(config.relay_id, "relay-a")
        self.assertEqual(config.tls.termination, "platform")
        self.assertEqual(config.platform.auth_mode, "private_network_shared_secret")
        self.assertEqual(config.platform.client_key_passphrase, "pass")
        self.assertEqual(config.backplane.redirect_allowed_hosts, ("relay-a.example.com", "relay-b.example.com"))
        self.assertEqual(config.listen.trusted_proxies, ("10.0.0.1", "192.168.0.0/16", "::1"))
        self.assertEqual((config.admission.token_issuer, config.admission.token_audience), ("issuer", "relay"))
        self.assertEqual(config.admission.token_secret_file, "/etc/relay/secret")

    def test_boolish_spellings(self) -> None:
        """The eight boolish spellings map to true or false."""
        for spelling in ["1", "true", "yes", "on"]:
            self.assertTrue(self.load({"RELAY_ENABLE_ADMIN_HTTP": spelling}).http.enable_admin, spelling)
        for spelling in ["0", "false", "no", "off"]:
            self.assertFalse(self.load({"RELAY_HEALTH_VERBOSE": spelling}).http.health_verbose, spelling)

    def test_overrides_win(self) -> None:
        """The ``host`` and ``port`` overrides replace HOST and PORT, also in the default relayId."""
        config = self.load({"HOST": "127.0.0.1", "PORT": "8000"}, {"host": "localhost", "port": 9001, "other": 1})
        self.assertEqual((config.listen.host, config.listen.port), ("localhost", 9001))
        self.assertEqual(config.relay_id, "localhost:9001:aaaaaaaaaaaa")

    def test_none_overrides_are_ignored(self) -> None:
        """Overrides whose value is None leave HOST and PORT in charge."""
        config = self.load({"PORT": "8000"}, {"host": None, "port": None})
        self.assertEqual((config.listen.host, config.listen.port), ("127.0.0.1", 8000))

    def test_port_zero(self) -> None:
        """Port 0 (any free port) is accepted from PORT and from the override."""
        self.assertEqual(self.load({"PORT": "0"}).listen.port, 0)
        self.assertEqual(self.load({}, {"port": 0}).listen.port, 0)

    def test_server_url_path_discarded(self) -> None:
        """SERVER_URL keeps only scheme, host and port, because platform paths are absolute."""
        config = self.load({"SERVER_URL": " HTTPS://api.example.com:8443/base/?x=1 "})
        self.assertEqual(config.platform.url, "https://api.example.com:8443")
        self.assertTrue(config.platform.url_explicit)

    def test_tls_setting_is_case_insensitive(self) -> None:
        """RELAY_TLS is lower-cased before it is checked."""
        self.assertEqual(self.load({"RELAY_TLS": "AUTO"}).tls.mode, "auto")


class InvalidValueTests(ConfigTestCase):
    """Every invalid value stops startup with an error naming the variable."""

    def test_message_format(self) -> None:
        """The message is one line naming the variable, the value and what is accepted."""
        error = self.assertRejected({"RELAY_BACKPLANE_MODE": "foo"}, "RELAY_BACKPLANE_MODE")
        self.assertEqual(str(error), "RELAY_BACKPLANE_MODE: invalid value 'foo'; accepted: single, server, redis")

    def test_enums(self) -> None:
        """Enums are case-sensitive and an empty value is invalid."""
        for variable, value in [
            ("RELAY_MODE", "PROD"),
            ("RELAY_MODE", ""),
            ("RELAY_BACKPLANE_MODE", "Single"),
            ("RELAY_BACKPLANE_MODE", " single"),
            ("RELAY_TLS", ""),
            ("RELAY_TLS", "yes"),
            ("RELAY_TLS_TERMINATION", "edge"),
            ("RELAY_SERVER_TLS_VERIFY", "AUTO"),
            ("RELAY_SERVER_TLS_VERIFY", "true"),
            ("RELAY_SERVER_AUTH_MODE", "shared_secret"),
        ]:
            self.assertRejected({variable: value}, variable)

    def test_boolish(self) -> None:
        """Every boolish variable rejects other spellings, upper case and the empty string."""
        for variable in [
            "RELAY_ENABLE_ADMIN_HTTP",
            "RELAY_HEALTH_VERBOSE",
            "RELAY_STATE_INCLUDE_CLIENT_IDS",
            "RELAY_SERVER_MTLS",
            "RELAY_PRESENCE_SYNC_ENABLED",
            "RELAY_BUS_ENABLED",
            "RELAY_CLIENT_REDIRECT_ENABLED",
        ]:
            for value in ["TRUE", "", "2", "y", " on"]:
                error = self.assertRejected({variable: value}, variable)
                self.assertIn("accepted: 0 1 false true no yes off on", str(error))

    def test_integers(self) -> None:
        """Integers must be plain decimal digits greater than zero."""
        for variable in INT_DEFAULTS:
            for value in ["0", "-5", "abc", "1e3", "0x10", "1.5", "+3", "1 000"]:
                self.assertRejected({variable: value}, variable)

    def test_port(self) -> None:
        """PORT and the port override accept 0..65535 only."""
        for value in ["65536", "-1", "http", "80.0"]:
            self.assertRejected({"PORT": value}, "PORT")
        for override in [65536, -1, "x", True, 1.5]:
            self.assertEqual(self.load_error({}, {"port": override}).variable, "--port")
        self.assertEqual(self.load_error({}, {"host": ""}).variable, "--host")
        self.assertEqual(self.load_error({}, {"host": 5}).variable, "--host")

    def test_urls(self) -> None:
        """SERVER_URL must be http(s) with a host and RELAY_PUBLIC_WS_BASE_URL ws(s) with a host."""
        for value in ["ftp://api.example.com", "api.example.com", "https://", "https://api.example.com:99999"]:
            self.assertRejected({"SERVER_URL": value}, "SERVER_URL")
        for value in ["https://relay.example.com/ws", "wss://", "relay.example.com", "ws://[::1"]:
            self.assertRejected({"RELAY_PUBLIC_WS_BASE_URL": value}, "RELAY_PUBLIC_WS_BASE_URL")

    def test_trusted_proxies(self) -> None:
        """RELAY_TRUSTED_PROXIES entries must be IP addresses or CIDR ranges."""
        for value in ["10.0.0.1,proxy.local", "10.0.0.0/33", "loopback"]:
            self.assertRejected({"RELAY_TRUSTED_PROXIES": value}, "RELAY_TRUSTED_PROXIES")

    def test_allowed_origins(self) -> None:
        """RELAY_ALLOWED_ORIGINS takes origins, subdomain wildcards, null and *; paths or bare hosts are refused."""
        config = self.load({"RELAY_ALLOWED_ORIGINS": "https://app.example.com, https://*.example.com,null"})
        self.assertEqual(config.listen.allowed_origins, ("https://app.example.com", "https://*.example.com", "null"))
        for value in ["app.example.com", "https://app.example.com/path", "https://a*.example.com", "*.example.com"]:
            self.assertRejected({"RELAY_ALLOWED_ORIGINS": value}, "RELAY_ALLOWED_ORIGINS")

    def test_short_token_secret(self) -> None:
        """A token secret under 32 characters is refused without echoing it."""
        error = self.assertRejected({"RELAY_TOKEN_SECRET": "short-secret-value"}, "RELAY_TOKEN_SECRET")
        self.assertNotIn("short-secret-value", str(error))

    def test_url_credentials_not_echoed(self) -> None:
        """An invalid URL is shown with its credentials masked."""
        error = self.assertRejected({"SERVER_URL": "ftp://user:hunter2@api.example.com"}, "SERVER_URL")
        self.assertNotIn("hunter2", str(error))


class BackplaneTests(ConfigTestCase):
    """Backplane mode inference, its URLs, its requirements and the feature flags it implies."""

    def test_inference(self) -> None:
        """The internal key, bus or presence sync switch inference to server mode; otherwise single."""
        base = {"RELAY_BUS_HMAC_KEY": HMAC, "RELAY_INTERNAL_KEY": INTERNAL}
        self.assertEqual(self.load(base).backplane.mode, "server")
        self.assertEqual(self.load({**base, "RELAY_BUS_ENABLED": "1"}).backplane.mode, "server")
        self.assertEqual(self.load({**base, "RELAY_PRESENCE_SYNC_ENABLED": "on"}).backplane.mode, "server")
        self.assertEqual(
            self.load({"RELAY_PRESENCE_SYNC_ENABLED": "off", "RELAY_BUS_ENABLED": "0"}).backplane.mode, "single"
        )
        self.assertEqual(
            self.load({"RELAY_BACKPLANE_MODE": "single", "RELAY_INTERNAL_KEY": INTERNAL}).backplane.mode, "single"
        )

    def test_single_forces_features_off(self) -> None:
        """Single mode turns presence sync, the bus and redirects off whatever their variables say."""
        config = self.load(
            {
                "RELAY_BACKPLANE_MODE": "single",
                "RELAY_BUS_ENABLED": "1",
                "RELAY_PRESENCE_SYNC_ENABLED": "1",
                "RELAY_CLIENT_REDIRECT_ENABLED": "1",
            }
        )
        self.assertEqual(
            (config.backplane.presence_sync_enabled, config.backplane.bus_enabled, config.backplane.client_redirect_enabled), (False, False, False)
        )

    def test_server_feature_defaults(self) -> None:
        """Cross-relay modes default to presence sync and bus forwarding on, redirects off; each can be switched."""
        base = {"RELAY_INTERNAL_KEY": INTERNAL, "RELAY_BUS_HMAC_KEY": HMAC}
        config = self.load(base)
        self.assertEqual(
            (config.backplane.presence_sync_enabled, config.backplane.bus_enabled, config.backplane.client_redirect_enabled), (True, True, False)
        )
        config = self.load(
            {
                **base,
                "RELAY_PRESENCE_SYNC_ENABLED": "0",
                "RELAY_BUS_ENABLED": "0",
                "RELAY_CLIENT_REDIRECT_ENABLED": "1",
            }
        )
        self.assertEqual(
            (config.backplane.presence_sync_enabled, config.backplane.bus_enabled, config.backplane.client_redirect_enabled), (False, False, True)
        )

    def test_server_mode_requirements(self) -> None:
        """Outside prod, server mode starts without the internal or HMAC key, with a warning naming each."""
        config = self.load({"RELAY_BACKPLANE_MODE": "server"})
        self.assertEqual(config.backplane.mode, "server")
        self.assertEqual([w.split(":")[0] for w in config.warnings],
                         ["RELAY_INTERNAL_KEY", "RELAY_BUS_HMAC_KEY", "RELAY_PUBLIC_WS_BASE_URL"])
        self.assertIsNotNone(config.backplane.bus_hmac_key)
        config = self.load({"RELAY_INTERNAL_KEY": INTERNAL, "RELAY_BUS_HMAC_KEY": HMAC})
        self.assertEqual((config.backplane.mode, [w.split(":")[0] for w in config.warnings]),
                         ("server", ["RELAY_PUBLIC_WS_BASE_URL"]))

    def test_prod_backplane_requires_keys(self) -> None:
        """In prod a cross-relay backplane refuses to start without its internal and HMAC keys."""
        prod = {
            "RELAY_MODE": "prod", "RELAY_TLS_TERMINATION": "platform", "RELAY_SERVER_AUTH_MODE": "private_network_shared_secret",
            "SERVER_URL": "https://api.example.com", "RELAY_PUBLIC_WS_BASE_URL": "wss://relay.example.com/ws",
            "HOST": "0.0.0.0", "RELAY_BACKPLANE_MODE": "server",
        }
        self.assertRejected({**prod, "RELAY_BUS_HMAC_KEY": HMAC}, "RELAY_INTERNAL_KEY")
        self.assertRejected({**prod, "RELAY_INTERNAL_KEY": INTERNAL}, "RELAY_BUS_HMAC_KEY")

    def test_staging_backplane_requires_keys(self) -> None:
        """Outside dev, bus frames need a real HMAC key (the development key is public) and server mode its internal key."""
        staging = {"HOST": "0.0.0.0", "RELAY_TOKEN_SECRET": SECRET}
        redis = {**staging, "RELAY_BACKPLANE_MODE": "redis", "RELAY_BACKPLANE_URL": "redis://redis:6379/0"}
        server = {**staging, "RELAY_BACKPLANE_MODE": "server", "RELAY_BACKPLANE_URL": "https://api.example.com"}
        self.assertRejected(redis, "RELAY_BUS_HMAC_KEY")
        self.assertRejected({**redis, "RELAY_MODE": "staging", "HOST": "127.0.0.1"}, "RELAY_BUS_HMAC_KEY")
        self.assertEqual([w.split(":")[0] for w in self.load({**redis, "RELAY_BUS_HMAC_KEY": HMAC}).warnings],
                         ["RELAY_PUBLIC_WS_BASE_URL"])
        self.assertRejected({**server, "RELAY_BUS_HMAC_KEY": HMAC}, "RELAY_INTERNAL_KEY")
        self.assertRejected({**server, "RELAY_INTERNAL_KEY": INTERNAL}, "RELAY_BUS_HMAC_KEY")
        config = self.load({**server, "RELAY_INTERNAL_KEY": INTERNAL, "RELAY_BUS_HMAC_KEY": HMAC})
        self.assertEqual((config.relay_mode, config.backplane.mode), ("staging", "server"))
        self.assertEqual([w.split(":")[0] for w in config.warnings], ["RELAY_PUBLIC_WS_BASE_URL", "RELAY_MODE"])

    def test_redis_mode_requirements(self) -> None:
        """Redis mode needs a Redis URL and the HMAC key, and the internal key only with platform admission."""
        redis = {
            "RELAY_BACKPLANE_MODE": "redis",
            "RELAY_BACKPLANE_URL": "redis://127.0.0.1:6379/0",
            "RELAY_BUS_HMAC_KEY": HMAC,
        }
        self.assertEqual([w.split(":")[0] for w in self.load(redis).warnings],
                         ["RELAY_INTERNAL_KEY", "RELAY_PUBLIC_WS_BASE_URL"])
        config = self.load({**redis, "RELAY_TOKEN_SECRET": SECRET})
        self.assertEqual((config.backplane.mode, config.admission.mode), ("redis", "local_secret"))
        self.assertIsNone(config.platform.internal_key)
        self.assertEqual(config.backplane.redis_url, "redis://127.0.0.1:6379/0")
        self.assertEqual(config.backplane.presence_sync_enabled, True)
        without_url = {"RELAY_BACKPLANE_MODE": "redis", "RELAY_BUS_HMAC_KEY": HMAC, "RELAY_TOKEN_SECRET": SECRET}
        self.assertRejected(without_url, "RELAY_BACKPLANE_URL")
        blank_key = self.load({**redis, "RELAY_TOKEN_SECRET": SECRET, "RELAY_BUS_HMAC_KEY": " "})
        self.assertEqual([w.split(":")[0] for w in blank_key.warnings], ["RELAY_BUS_HMAC_KEY", "RELAY_PUBLIC_WS_BASE_URL"])

    def test_backplane_url_is_the_server_url_in_server_mode(self) -> None:
        """In server mode RELAY_BACKPLANE_URL is the platform URL and counts as set explicitly."""
        base = {"RELAY_INTERNAL_KEY": INTERNAL, "RELAY_BUS_HMAC_KEY": HMAC}
        config = self.load({**base, "RELAY_BACKPLANE_URL": "https://platform.example.com/"})
        self.assertEqual((config.platform.url, config.platform.url_explicit), ("https://platform.example.com", True))
        same = self.load(
            {
                **base,
                "RELAY_BACKPLANE_URL": "https://platform.example.com/",
                "SERVER_URL": "https://platform.example.com",
            }
        )
        self.assertEqual(same.platform.url, "https://platform.example.com")

    def test_old_and_new_names_must_agree(self) -> None:
        """SERVER_URL or RELAY_REDIS_URL differing from RELAY_BACKPLANE_URL is an error naming the new name."""
        server = {
            "RELAY_INTERNAL_KEY": INTERNAL,
            "RELAY_BUS_HMAC_KEY": HMAC,
            "SERVER_URL": "https://a.example.com",
            "RELAY_BACKPLANE_URL": "https://b.example.com",
        }
        self.assertRejected(server, "RELAY_BACKPLANE_URL")
        redis = {
            "RELAY_BACKPLANE_MODE": "redis",
            "RELAY_BUS_HMAC_KEY": HMAC,
            "RELAY_TOKEN_SECRET": SECRET,
            "RELAY_REDIS_URL": "redis://a:6379",
            "RELAY_BACKPLANE_URL": "redis://b:6379",
        }
        self.assertRejected(redis, "RELAY_BACKPLANE_URL")

    def test_reference_knobs_without_effect_warn(self) -> None:
        """RELAY_REDIS_QUEUE_MAX and RELAY_BUS_POLL_INTERVAL_MS are checked, and named in a warning, not ignored."""
        config = self.load({"RELAY_REDIS_QUEUE_MAX": "500", "RELAY_BUS_POLL_INTERVAL_MS": "100"})
        noted = [warning.partition(":")[0] for warning in config.warnings]
        self.assertEqual(noted, ["RELAY_REDIS_QUEUE_MAX", "RELAY_BUS_POLL_INTERVAL_MS"])
        self.assertIn("no effect", config.warnings[0])
        self.assertEqual(self.load({}).warnings, ())
        self.assertRejected({"RELAY_REDIS_QUEUE_MAX": "many"}, "RELAY_REDIS_QUEUE_MAX")

    def test_old_redis_name(self) -> None:
        """RELAY_REDIS_URL alone still configures redis mode, and may equal RELAY_BACKPLANE_URL."""
        base = {"RELAY_BACKPLANE_MODE": "redis", "RELAY_BUS_HMAC_KEY": HMAC, "RELAY_TOKEN_SECRET": SECRET}
        self.assertEqual(self.load({**base, "RELAY_REDIS_URL": "rediss://r:1"}).backplane.redis_url, "rediss://r:1")
        both = {**base, "RELAY_REDIS_URL": "redis://r", "RELAY_BACKPLANE_URL": " redis://r "}
        self.assertEqual(self.load(both).backplane.redis_url, "redis://r")

    def test_backplane_url_in_single_mode(self) -> None:
        """RELAY_BACKPLANE_URL without a server or redis backplane is refused."""
        self.assertRejected({"RELAY_BACKPLANE_URL": "https://platform.example.com"}, "RELAY_BACKPLANE_URL")

    def test_redis_url_schemes(self) -> None:
        """Redis URLs use redis, rediss, unix or redis+sentinel and must parse."""
        base = {"RELAY_BACKPLANE_MODE": "redis", "RELAY_BUS_HMAC_KEY": HMAC, "RELAY_TOKEN_SECRET": SECRET}
        for url in [
            "redis://h",
            "redis://:pw@h:6379/2",
            "rediss://h:6380",
            "unix:///run/redis.sock",
            "redis+sentinel://h:26379/mymaster",
        ]:
            self.assertEqual(self.load({**base, "RELAY_BACKPLANE_URL": url}).backplane.redis_url, url)
        for url in ["http://h", "redis://", "redis://h:port", "redis://h/db", "unix://", "h:6379"]:
            self.assertRejected({**base, "RELAY_BACKPLANE_URL": url}, "RELAY_BACKPLANE_URL")
            self.assertRejected({**base, "RELAY_REDIS_URL": url}, "RELAY_REDIS_URL")


class AdmissionTests(ConfigTestCase):
    """The admission method follows the token variables, the platform URL, the backplane and the host."""

    def test_choice(self) -> None:
        """Local secret, then public key, then platform when configured, then the embedded file on loopback."""
        key = self.make_file("key.pem", "-----BEGIN PUBLIC KEY-----\n")
        server = {"RELAY_INTERNAL_KEY": INTERNAL, "RELAY_BUS_HMAC_KEY": HMAC}
        cases: list[tuple[dict[str, str], str]] = [
            ({"RELAY_TOKEN_SECRET": SECRET}, "local_secret"),
            ({"RELAY_TOKEN_PUBLIC_KEY": key}, "local_public_key"),
            ({"SERVER_URL": "http://localhost:3000"}, "platform"),
            (server, "platform"),
            ({**server, "RELAY_TOKEN_SECRET": SECRET}, "local_secret"),
            ({}, "embedded_secret_file"),
            ({"HOST": "::1"}, "embedded_secret_file"),
            ({"HOST": "0.0.0.0"}, "platform"),
        ]
        for environ, admission in cases:
            self.assertEqual(self.load(environ).admission.mode, admission, environ)

    def test_secret_and_public_key_conflict(self) -> None:
        """Setting both a token secret and a public key is refused."""
        key = self.make_file("key.pem")
        self.assertRejected({"RELAY_TOKEN_SECRET": SECRET, "RELAY_TOKEN_PUBLIC_KEY": key}, "RELAY_TOKEN_PUBLIC_KEY")

    def test_public_key_must_exist(self) -> None:
        """A public key path that is not a file is refused."""
        self.assertRejected(
            {"RELAY_TOKEN_PUBLIC_KEY": os.path.join(self.home, "missing.pem")}, "RELAY_TOKEN_PUBLIC_KEY"
        )


class RelayModeTests(ConfigTestCase):
    """Relay mode inference, including the fix for HOST=0.0.0.0 without explicit URLs."""

    def test_loopback_is_dev(self) -> None:
        """A loopback HOST is dev even with explicit non-local URLs."""
        for host in ["127.0.0.1", "localhost", "::1"]:
            config = self.load({"HOST": host, "SERVER_URL": "https://api.example.com"})
            self.assertEqual(config.relay_mode, "dev", host)
            self.assertTrue(config.http.health_verbose)

    def test_any_address_without_urls_is_staging(self) -> None:
        """HOST=0.0.0.0 with neither URL set is staging: no verbose state, no prod hardening."""
        config = self.load({"HOST": "0.0.0.0"})
        self.assertEqual(config.relay_mode, "staging")
        self.assertEqual((config.http.health_verbose, config.http.state_include_client_ids), (False, False))
        self.assertEqual(self.load({}, {"host": "0.0.0.0"}).relay_mode, "staging")

    def test_any_address_with_url_is_staging_with_a_warning(self) -> None:
        """HOST=0.0.0.0 with SERVER_URL or the public URL set is staging (prod only when asked), with a warning."""
        base = {"HOST": "0.0.0.0", "RELAY_TOKEN_SECRET": SECRET}
        config = self.load({**base, "SERVER_URL": "https://api.example.com"})
        self.assertEqual(config.relay_mode, "staging")
        self.assertEqual([w.split(":")[0] for w in config.warnings], ["RELAY_MODE"])
        public = {**base, "RELAY_PUBLIC_WS_BASE_URL": "wss://relay.example.com/ws"}
        self.assertEqual(self.load(public).relay_mode, "staging")

    def test_explicit_mode_wins(self) -> None:
        """RELAY_MODE overrides inference, and verbose flags can still be set explicitly."""
        config = self.load({"RELAY_MODE": "staging", "RELAY_HEALTH_VERBOSE": "1"})
        self.assertEqual(
            (config.relay_mode, config.http.health_verbose, config.http.state_include_client_ids), ("staging", True, False)
        )
        self.assertEqual(self.load({"HOST": "0.0.0.0", "RELAY_MODE": "dev"}).relay_mode, "dev")

    def test_local_url_needs_loopback_host(self) -> None:
        """A local-looking platform or public URL is refused when HOST is not loopback."""
        self.assertRejected({"HOST": "0.0.0.0", "SERVER_URL": "http://localhost:3000"}, "SERVER_URL")
        self.assertRejected(
            {"HOST": "0.0.0.0", "RELAY_MODE": "dev", "RELAY_PUBLIC_WS_BASE_URL": "ws://relay.test/ws"},
            "RELAY_PUBLIC_WS_BASE_URL",
        )
        self.assertRejected({"HOST": "10.0.0.5", "RELAY_TLS_HOST": "relay.test"}, "RELAY_TLS_HOST")
        self.assertEqual(self.load({"SERVER_URL": "http://localhost:3000"}).relay_mode, "dev")


class ProdTests(ConfigTestCase):
    """Prod hardening checks, in order, with the variable named."""

    def prod_environ(self) -> dict[str, str]:
        """An environment that passes every prod hardening check."""
        return {
            "HOST": "0.0.0.0",
            "RELAY_MODE": "prod",
            "SERVER_URL": "https://api.example.com",
            "RELAY_TLS": "1",
            "RELAY_TLS_CERT_PATH": self.make_file("relay.crt"),
            "RELAY_TLS_KEY_PATH": self.make_file("relay.key"),
            "RELAY_INTERNAL_KEY": INTERNAL,
            "RELAY_BUS_HMAC_KEY": HMAC,
            "RELAY_SERVER_CLIENT_CERT_PATH": self.make_file("client.crt"),
            "RELAY_SERVER_CLIENT_KEY_PATH": self.make_file("client.key"),
            "RELAY_SERVER_TLS_VERIFY": "1",
        }

    def test_hardened_prod_loads(self) -> None:
        """A prod relay with TLS, a real internal key, platform mTLS and verification loads."""
        config = self.load(self.prod_environ())
        self.assertEqual(
            (config.relay_mode, config.backplane.mode, config.tls.enabled, config.platform.mtls_enabled),
            ("prod", "server", True, True),
        )
        self.assertEqual(config.backplane.public_ws_base_url, "wss://relay-host:7781/ws")

    def test_each_hardening_check(self) -> None:
        """Each missing hardening step is refused naming its variable."""
        environ = self.prod_environ()
        cases: list[tuple[dict[str, str | None], str]] = [
            ({"RELAY_TLS": None, "RELAY_TLS_CERT_PATH": None}, "RELAY_TLS"),
            ({"RELAY_TLS": "0"}, "RELAY_TLS"),
            ({"RELAY_INTERNAL_KEY": "change-me-change-me-change-me"}, "RELAY_INTERNAL_KEY"),
            ({"RELAY_INTERNAL_KEY": "an-EXAMPLE-key-0123456789"}, "RELAY_INTERNAL_KEY"),
            ({"RELAY_INTERNAL_KEY": "short-but-random-key"}, "RELAY_INTERNAL_KEY"),
            ({"RELAY_SERVER_CLIENT_CERT_PATH": None, "RELAY_SERVER_CLIENT_KEY_PATH": None}, "RELAY_SERVER_MTLS"),
            ({"RELAY_SERVER_TLS_VERIFY": None}, "RELAY_SERVER_TLS_VERIFY"),
        ]
        for changes, variable in cases:
            changed = {**environ, **changes}
            self.assertRejected({k: v for k, v in changed.items() if v is not None}, variable)

    def test_internal_key_required_with_platform_admission(self) -> None:
        """Platform admission in prod needs the internal key even on a single backplane."""
        environ = {**self.prod_environ(), "RELAY_BACKPLANE_MODE": "single"}
        del environ["RELAY_INTERNAL_KEY"]
        self.assertRejected(environ, "RELAY_INTERNAL_KEY")

    def test_tls_terminated_by_platform(self) -> None:
        """RELAY_TLS_TERMINATION=platform allows prod without relay TLS."""
        environ = {**self.prod_environ(), "RELAY_TLS": "0", "RELAY_TLS_TERMINATION": "platform"}
        self.assertEqual(self.load(environ).tls.enabled, False)

    def test_shared_secret_mode(self) -> None:
        """Shared-secret auth skips mTLS but refuses a local-looking platform URL."""
        environ = {
            **self.prod_environ(),
            "RELAY_SERVER_AUTH_MODE": "private_network_shared_secret",
            "RELAY_SERVER_TLS_VERIFY": "auto",
        }
        del environ["RELAY_SERVER_CLIENT_CERT_PATH"], environ["RELAY_SERVER_CLIENT_KEY_PATH"]
        self.assertEqual(self.load(environ).relay_mode, "prod")
        local = {**environ, "HOST": "127.0.0.1", "RELAY_MODE": "prod", "SERVER_URL": "https://platform.test"}
        self.assertRejected(local, "SERVER_URL")

    def test_local_admission_skips_platform_checks(self) -> None:
        """A prod relay with local token admission and no platform link needs only TLS."""
        environ = {
            "HOST": "0.0.0.0",
            "RELAY_MODE": "prod",
            "RELAY_PUBLIC_WS_BASE_URL": "wss://relay.example.com/ws",
            "RELAY_TLS_TERMINATION": "platform",
            "RELAY_TOKEN_SECRET": SECRET,
        }
        config = self.load(environ)
        self.assertEqual((config.relay_mode, config.admission.mode, config.platform.internal_key), ("prod", "local_secret", None))

    def test_staging_is_not_hardened(self) -> None:
        """Staging skips the hardening checks."""
        config = self.load({"HOST": "0.0.0.0", "RELAY_INTERNAL_KEY": "x", "RELAY_BUS_HMAC_KEY": HMAC})
        self.assertEqual((config.relay_mode, config.backplane.mode), ("staging", "server"))


class TlsTests(ConfigTestCase):
    """Relay TLS, platform mTLS and the CA file."""

    def test_auto_needs_both_files(self) -> None:
        """With RELAY_TLS=auto TLS is on only when both default files exist in the cert directory."""
        certs = os.path.join(self.home, ".viewport", "relay-certs")
        os.makedirs(certs)
        self.make_file(os.path.join(certs, "relay.example.com.crt"))
        environ = {"RELAY_TLS_HOST": "relay.example.com"}
        self.assertFalse(self.load(environ).tls.enabled)
        self.make_file(os.path.join(certs, "relay.example.com.key"))
        config = self.load(environ)
        self.assertTrue(config.tls.enabled)
        self.assertEqual(config.backplane.public_ws_base_url, "wss://relay.example.com:7781/ws")
        self.assertFalse(self.load({**environ, "RELAY_TLS": "0"}).tls.enabled)

    def test_cert_dir_and_paths(self) -> None:
        """RELAY_TLS_CERT_DIR moves the default files; explicit paths win."""
        config = self.load({"RELAY_TLS_CERT_DIR": "/srv/certs", "RELAY_TLS_HOST": "r.example.com"})
        self.assertEqual(
            (config.tls.cert_path, config.tls.key_path),
            ("/srv/certs/r.example.com.crt", "/srv/certs/r.example.com.key"),
        )
        cert, key = self.make_file("c.pem"), self.make_file("k.pem")
        config = self.load({"RELAY_TLS": "1", "RELAY_TLS_CERT_PATH": cert, "RELAY_TLS_KEY_PATH": key})
        self.assertEqual((config.tls.enabled, config.tls.cert_path, config.tls.key_path), (True, cert, key))

    def test_forced_tls_needs_files(self) -> None:
        """RELAY_TLS=1 with a missing certificate or key is refused."""
        cert = self.make_file("c.pem")
        self.assertRejected({"RELAY_TLS": "1"}, "RELAY_TLS_CERT_PATH")
        self.assertRejected({"RELAY_TLS": "1", "RELAY_TLS_CERT_PATH": cert}, "RELAY_TLS_KEY_PATH")

    def test_mtls_paths_required(self) -> None:
        """RELAY_SERVER_MTLS=1 needs both client paths, and both files must exist."""
        cert, key = self.make_file("c.pem"), self.make_file("k.pem")
        self.assertRejected({"RELAY_SERVER_MTLS": "1"}, "RELAY_SERVER_CLIENT_CERT_PATH")
        self.assertRejected(
            {"RELAY_SERVER_MTLS": "1", "RELAY_SERVER_CLIENT_CERT_PATH": cert}, "RELAY_SERVER_CLIENT_KEY_PATH"
        )
        missing = os.path.join(self.home, "missing.pem")
        self.assertRejected(
            {"RELAY_SERVER_CLIENT_CERT_PATH": missing, "RELAY_SERVER_CLIENT_KEY_PATH": key},
            "RELAY_SERVER_CLIENT_CERT_PATH",
        )
        self.assertRejected(
            {"RELAY_SERVER_CLIENT_CERT_PATH": cert, "RELAY_SERVER_CLIENT_KEY_PATH": missing},
            "RELAY_SERVER_CLIENT_KEY_PATH",
        )

    def test_mtls_derived_from_paths(self) -> None:
        """Both client paths set enable platform mTLS without RELAY_SERVER_MTLS; one alone does not."""
        cert, key = self.make_file("c.pem"), self.make_file("k.pem")
        both = self.load({"RELAY_SERVER_CLIENT_CERT_PATH": cert, "RELAY_SERVER_CLIENT_KEY_PATH": key})
        self.assertEqual(
            (both.platform.mtls_enabled, both.platform.client_cert_path, both.platform.client_key_path), (True, cert, key)
        )
        self.assertFalse(self.load({"RELAY_SERVER_CLIENT_CERT_PATH": cert}).platform.mtls_enabled)

    def test_ca_file_must_exist(self) -> None:
        """RELAY_SERVER_CA_CERT_PATH must name an existing file."""
        ca = self.make_file("ca.pem")
        self.assertEqual(self.load({"RELAY_SERVER_CA_CERT_PATH": ca}).platform.ca_cert_path, ca)
        self.assertRejected({"RELAY_SERVER_CA_CERT_PATH": ca + ".missing"}, "RELAY_SERVER_CA_CERT_PATH")

    def test_server_tls_verify(self) -> None:
        """``auto`` skips verification only for https URLs on localhost or ``.test`` hosts."""
        cases = [
            ("auto", "https://api.example.com", True),
            ("auto", "https://platform.test", False),
            ("auto", "https://localhost:3000", False),
            ("auto", "http://localhost:3000", True),
            ("0", "https://api.example.com", False),
            ("1", "https://platform.test", True),
        ]
        for mode, url, expected in cases:
            config = self.load({"RELAY_SERVER_TLS_VERIFY": mode, "SERVER_URL": url})
            self.assertEqual((config.platform.tls_verify_mode, config.platform.tls_verify), (mode, expected), url)


class PublicUrlTests(ConfigTestCase):
    """The advertised public WebSocket URL."""

    def test_derived(self) -> None:
        """Unset, the URL is where the relay listens: the TLS host name if set, else HOST, else (HOST=0.0.0.0) the host name."""
        self.assertEqual(self.load({}).backplane.public_ws_base_url, "ws://127.0.0.1:7781/ws")
        self.assertEqual(self.load({"PORT": "8000"}).backplane.public_ws_base_url, "ws://127.0.0.1:8000/ws")
        self.assertEqual(self.load({"HOST": "::1"}).backplane.public_ws_base_url, "ws://[::1]:7781/ws")
        self.assertEqual(
            self.load({"RELAY_TLS_HOST": "relay.example.com"}).backplane.public_ws_base_url, "ws://relay.example.com:7781/ws"
        )
        self.assertEqual(self.load({"HOST": "0.0.0.0"}).backplane.public_ws_base_url, "ws://relay-host:7781/ws")
        self.assertEqual(self.load({"HOST": "10.1.2.3", "PORT": "80"}).backplane.public_ws_base_url, "ws://10.1.2.3/ws")
        self.assertEqual(self.load({}, {"port": 9000}).backplane.public_ws_base_url, "ws://127.0.0.1:9000/ws")

    def test_cross_relay_modes_warn_when_it_is_derived(self) -> None:
        """Other relays and redirected browsers use this URL, so a cross-relay relay warns when it was not set."""
        redis = {"RELAY_BACKPLANE_MODE": "redis", "RELAY_BACKPLANE_URL": "redis://127.0.0.1:6379",
                 "RELAY_TOKEN_SECRET": SECRET, "RELAY_BUS_HMAC_KEY": HMAC}
        self.assertIn("RELAY_PUBLIC_WS_BASE_URL", [w.split(":")[0] for w in self.load(redis).warnings])
        explicit = self.load({**redis, "RELAY_PUBLIC_WS_BASE_URL": "ws://127.0.0.1:7781/ws"})
        self.assertNotIn("RELAY_PUBLIC_WS_BASE_URL", [w.split(":")[0] for w in explicit.warnings])

    def test_explicit(self) -> None:
        """An explicit public URL is kept as given after trimming."""
        config = self.load({"RELAY_PUBLIC_WS_BASE_URL": " wss://relay.example.com/ws "})
        self.assertEqual(config.backplane.public_ws_base_url, "wss://relay.example.com/ws")


class MaskedTests(ConfigTestCase):
    """The masked view used by check-config."""

    def test_secrets_hidden(self) -> None:
        """Secrets and URL credentials are replaced by ``***`` and the result is JSON."""
        environ = {
            "RELAY_ADMIN_TOKEN": "admin-token-value",
            "RELAY_INTERNAL_KEY": INTERNAL,
            "RELAY_BUS_HMAC_KEY": HMAC,
            "RELAY_TOKEN_SECRET": SECRET,
            "RELAY_SERVER_CLIENT_KEY_PASSPHRASE": "passphrase-value",
            "RELAY_BACKPLANE_MODE": "redis",
            "RELAY_BACKPLANE_URL": "redis://user:redis-password@redis.example.com:6379/0?password=query-password",
            "SERVER_URL": "https://svc:server-password@api.example.com",
        }
        config = self.load(environ)
        view = masked(config)
        text = json.dumps(view)
        for secret in [
            INTERNAL,
            HMAC,
            SECRET,
            "passphrase-value",
            "redis-password",
            "query-password",
            "server-password",
            hashlib.sha256(b"admin-token-value").hexdigest(),
        ]:
            self.assertNotIn(secret, text)
            self.assertNotIn(secret, repr(config))
        self.assertEqual(view["platform.internal_key"], "***")
        self.assertEqual(view["backplane.redis_url"], "redis://***@redis.example.com:6379/0?password=***")
        self.assertEqual(view["platform.url"], "https://***@api.example.com")
        self.assertEqual(view["listen.port"], 7781)

    def test_unset_secrets_stay_none(self) -> None:
        """Unset secrets show as None and lists as JSON arrays."""
        view = masked(self.load({"RELAY_TRUSTED_PROXIES": "10.0.0.1"}))
        self.assertIsNone(view["platform.internal_key"])
        self.assertEqual(view["listen.trusted_proxies"], ["10.0.0.1"])
        self.assertEqual(json.loads(json.dumps(view)), view)


class HelperTests(SynchronousTestCase):
    """The loopback and local-URL predicates."""

    def test_is_loopback_host(self) -> None:
        """Only 127.0.0.1, localhost and ::1 are loopback names."""
        self.assertEqual([is_loopback_host(h) for h in ["127.0.0.1", "localhost", "LOCALHOST", "::1"]], [True] * 4)
        self.assertEqual([is_loopback_host(h) for h in ["0.0.0.0", "127.0.0.2", "10.0.0.1", "::"]], [False] * 4)

    def test_looks_local(self) -> None:
        """Localhost, loopback literals and ``.test`` hosts look local; unparsable URLs do not."""
        local = ["http://localhost:3000", "https://127.0.0.1", "http://[::1]:80", "https://Platform.TEST/x"]
        remote = ["https://api.example.com", "https://test", "not a url", "http://[::1", ""]
        self.assertEqual([looks_local(u) for u in local], [True] * len(local))
        self.assertEqual([looks_local(u) for u in remote], [False] * len(remote))
