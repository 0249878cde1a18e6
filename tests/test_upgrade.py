"""Tests for the pure upgrade decisions: client IP, query, token sources, subprotocol and refusals."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from twisted.trial.unittest import SynchronousTestCase

from viewport.relay.limits import FixedWindowLimiter
from viewport.relay.upgrade import (
    TokenExtraction,
    TrustedProxies,
    UpgradeAccepted,
    UpgradePrecheck,
    UpgradeQuery,
    UpgradeRefusal,
    UpgradeRefused,
    bare_refusal_bytes,
    client_cap_exceeded,
    client_ip,
    extract_token,
    parse_query,
    precheck_upgrade,
    role_claim_matches,
    select_subprotocol,
    OriginPolicy,
)

TOKEN = "tok-0123456789"


def _params(query: str) -> dict[str, list[str]]:
    return parse_qs(query, keep_blank_values=True)


class TrustedProxiesTests(SynchronousTestCase):
    """Tests for L{TrustedProxies}."""

    def test_single_ips_and_cidrs(self) -> None:
        """Single IPs and CIDRs of both families match the addresses they cover and nothing else."""
        trusted = TrustedProxies(["10.0.0.0/8", "192.168.1.7", "2001:db8::/32", "::1"])
        for ip in ("10.1.2.3", "192.168.1.7", "2001:db8::5", "::1"):
            self.assertTrue(trusted.contains(ip), ip)
        for ip in ("11.0.0.1", "192.168.1.8", "2001:db9::1", "::2"):
            self.assertFalse(trusted.contains(ip), ip)

    def test_ipv4_mapped_addresses_and_entries(self) -> None:
        """The ``::ffff:`` prefix is stripped from both the entries and the address tested."""
        trusted = TrustedProxies(["::ffff:127.0.0.1", " 172.16.0.0/12 "])
        self.assertTrue(trusted.contains("127.0.0.1"))
        self.assertTrue(trusted.contains("::ffff:172.20.0.1"))

    def test_invalid_entries_ignored(self) -> None:
        """Garbage, empty entries and out-of-range prefixes are dropped without affecting valid ones."""
        trusted = TrustedProxies(["nonsense", "", "10.0.0.0/33", "::/129", "300.1.1.1", "10.0.0.1"])
        self.assertEqual(len(trusted), 1)
        self.assertTrue(trusted.contains("10.0.0.1"))
        self.assertFalse(trusted.contains("nonsense"))

    def test_invalid_address_not_contained(self) -> None:
        """An address that does not parse is never trusted."""
        self.assertFalse(TrustedProxies(["0.0.0.0/0", "::/0"]).contains("unknown"))


class ClientIpTests(SynchronousTestCase):
    """Tests for L{client_ip}."""

    trusted = TrustedProxies(["10.0.0.0/8", "fd00::/8"])

    def test_forwarded_for_from_trusted_proxy(self) -> None:
        """A trusted peer's first X-Forwarded-For entry, trimmed, is the client IP."""
        self.assertEqual(client_ip("10.0.0.2", " 203.0.113.9 , 10.0.0.3", self.trusted), "203.0.113.9")
        self.assertEqual(client_ip("fd00::1", "2001:db8::9", self.trusted), "2001:db8::9")

    def test_forwarded_for_from_untrusted_peer_ignored(self) -> None:
        """An untrusted peer's X-Forwarded-For is ignored."""
        self.assertEqual(client_ip("198.51.100.1", "203.0.113.9", self.trusted), "198.51.100.1")

    def test_ipv4_mapped_normalised(self) -> None:
        """The ``::ffff:`` prefix is stripped from the peer and from the forwarded address."""
        self.assertEqual(client_ip("::ffff:198.51.100.1", None, self.trusted), "198.51.100.1")
        self.assertEqual(client_ip("::ffff:10.0.0.2", "::ffff:203.0.113.9", self.trusted), "203.0.113.9")

    def test_empty_forwarded_for_uses_peer(self) -> None:
        """A missing, empty or blank-first X-Forwarded-For leaves the peer address."""
        for header in (None, "", " , 1.2.3.4"):
            self.assertEqual(client_ip("10.0.0.2", header, self.trusted), "10.0.0.2")

    def test_unknown_peer(self) -> None:
        """No peer address gives ``unknown``, whatever the headers say."""
        self.assertEqual(client_ip(None, "203.0.113.9", self.trusted), "unknown")
        self.assertEqual(client_ip("", None, self.trusted), "unknown")


class ParseQueryTests(SynchronousTestCase):
    """Tests for L{parse_query}."""

    def test_valid_query(self) -> None:
        """Role, ids and the raw token are returned; other parameters are ignored."""
        query = parse_query(_params("role=client&workspaceId=ws_1&runtimeTargetId=rt:a.b-c&token=x&z=1"))
        self.assertEqual(query, UpgradeQuery("client", "ws_1", "rt:a.b-c", "x"))

    def test_optional_params_absent(self) -> None:
        """Without runtimeTargetId and token both are None."""
        self.assertEqual(
            parse_query(_params("role=workspace-daemon&workspaceId=w")),
            UpgradeQuery("workspace-daemon", "w", None, None),
        )

    def test_roles(self) -> None:
        """Only the three known roles, spelled exactly, are accepted."""
        for role in ("workspace-daemon", "client", "worker"):
            self.assertIsNotNone(parse_query(_params(f"role={role}&workspaceId=w")))
        for role in ("", "role=&", "role=Client&", "role=admin&"):
            self.assertIsNone(parse_query(_params(f"{role}workspaceId=w")), role)

    def test_first_occurrence_wins(self) -> None:
        """A repeated parameter takes its first value, whether that is valid or not."""
        query = parse_query(_params("role=client&role=bogus&workspaceId=a&workspaceId=b&token=t1&token=t2"))
        self.assertEqual(query, UpgradeQuery("client", "a", None, "t1"))
        self.assertIsNone(parse_query(_params("role=client&workspaceId=bad!&workspaceId=good")))

    def test_id_characters(self) -> None:
        """Ids allow only ASCII letters, digits and ``. _ : -``."""
        self.assertIsNotNone(parse_query({"role": ["client"], "workspaceId": ["AZaz09._:-"]}))
        for bad in ("a b", "a/b", "a%b", "é", "a\n", "a+b"):
            self.assertIsNone(parse_query({"role": ["client"], "workspaceId": [bad]}), bad)
            self.assertIsNone(
                parse_query({"role": ["client"], "workspaceId": ["w"], "runtimeTargetId": [bad]}), bad
            )

    def test_id_lengths(self) -> None:
        """Ids are 1 to 128 characters long."""
        self.assertIsNotNone(parse_query({"role": ["client"], "workspaceId": ["w" * 128]}))
        self.assertIsNone(parse_query({"role": ["client"], "workspaceId": ["w" * 129]}))
        self.assertIsNone(parse_query(_params("role=client&workspaceId=")))
        self.assertIsNone(parse_query({"role": ["client"], "workspaceId": ["w"], "runtimeTargetId": ["r" * 129]}))

    def test_empty_runtime_target_invalid(self) -> None:
        """A present but empty runtimeTargetId makes the query invalid."""
        self.assertIsNone(parse_query(_params("role=client&workspaceId=w&runtimeTargetId=")))

    def test_empty_token_kept(self) -> None:
        """An empty token parameter is passed on as an empty string for token extraction to refuse."""
        query = parse_query(_params("role=client&workspaceId=w&token="))
        self.assertEqual(query, UpgradeQuery("client", "w", None, ""))


class ExtractTokenTests(SynchronousTestCase):
    """Tests for L{extract_token}."""

    def test_bearer_header(self) -> None:
        """A Bearer header supplies the trimmed token, scheme matched case-insensitively."""
        for header in (f"Bearer {TOKEN}", f"bearer   {TOKEN}  ", f"BEARER\t{TOKEN}"):
            self.assertEqual(extract_token(header, None, None, "prod"), TokenExtraction(TOKEN, "header", None))

    def test_bearer_needs_whitespace_and_scheme(self) -> None:
        """A header without the Bearer scheme and a space is not a token source."""
        for header in (f"Bearer{TOKEN}", f"Basic {TOKEN}", TOKEN):
            self.assertEqual(extract_token(header, None, None, "prod").refusal, "MISSING_AUTH_TOKEN")

    def test_bad_length_bearer_falls_through(self) -> None:
        """A too-short or too-long Bearer token is ignored and the subprotocol is used."""
        for bad in ("short", "x" * 4097):
            found = extract_token(f"Bearer {bad}", f"auth.{TOKEN}", None, "prod")
            self.assertEqual(found, TokenExtraction(TOKEN, "subprotocol", None))

    def test_token_length_bounds(self) -> None:
        """Tokens of exactly 10 and 4096 characters are valid."""
        for token in ("x" * 10, "x" * 4096):
            self.assertEqual(extract_token(f"Bearer {token}", None, None, "prod").token, token)

    def test_header_wins_over_other_sources(self) -> None:
        """A valid Bearer header wins over the subprotocol and query sources."""
        found = extract_token(f"Bearer {TOKEN}", "auth.other-token-1", "query-token-1", "dev")
        self.assertEqual(found, TokenExtraction(TOKEN, "header", None))

    def test_subprotocol_token(self) -> None:
        """The first ``auth.`` entry with a valid-length remainder supplies the token."""
        offered = f" viewport-relay-v1 ,, auth.short , auth.{TOKEN}, auth.second-token"
        found = extract_token(None, offered, None, "prod")
        self.assertEqual(found, TokenExtraction(TOKEN, "subprotocol", None))

    def test_subprotocol_without_auth_entry(self) -> None:
        """Subprotocols without a valid ``auth.`` entry supply nothing."""
        found = extract_token(None, f"viewport-relay-v1, Auth.{TOKEN}, auth.", None, "prod")
        self.assertEqual(found, TokenExtraction(None, None, "MISSING_AUTH_TOKEN"))

    def test_subprotocol_wins_over_query(self) -> None:
        """A subprotocol token wins over a query token."""
        found = extract_token(None, f"auth.{TOKEN}", "query-token-1", "dev")
        self.assertEqual(found, TokenExtraction(TOKEN, "subprotocol", None))

    def test_query_token_in_dev(self) -> None:
        """In dev mode the trimmed query token is accepted."""
        found = extract_token(None, None, f"  {TOKEN} ", "dev")
        self.assertEqual(found, TokenExtraction(TOKEN, "query", None))

    def test_query_token_outside_dev(self) -> None:
        """Outside dev mode a non-empty query token is refused as not allowed."""
        for mode in ("staging", "prod"):
            found = extract_token(None, None, TOKEN, mode)
            self.assertEqual(found, TokenExtraction(None, None, "QUERY_TOKEN_NOT_ALLOWED"))

    def test_empty_query_token(self) -> None:
        """An empty or blank query token is refused as missing, in any mode."""
        for mode in ("dev", "prod"):
            for token in ("", "   "):
                self.assertEqual(extract_token(None, None, token, mode).refusal, "MISSING_AUTH_TOKEN")

    def test_bad_length_query_token(self) -> None:
        """A query token of invalid length is refused as missing in dev mode."""
        self.assertEqual(extract_token(None, None, "short", "dev").refusal, "MISSING_AUTH_TOKEN")

    def test_no_source(self) -> None:
        """With no source at all the token is missing."""
        self.assertEqual(extract_token(None, None, None, "dev"), TokenExtraction(None, None, "MISSING_AUTH_TOKEN"))


class SelectSubprotocolTests(SynchronousTestCase):
    """Tests for L{select_subprotocol}."""

    def test_first_plain_protocol(self) -> None:
        """The first non-empty offer that is not an ``auth.`` entry is selected, trimmed."""
        offered = ["", f"auth.{TOKEN}", " viewport-relay-v1 ", "other"]
        self.assertEqual(select_subprotocol(offered), "viewport-relay-v1")

    def test_only_auth_offers_echo_the_first(self) -> None:
        """When only ``auth.`` entries are offered the first is echoed (browsers need an echo); none offered: none."""
        self.assertEqual(select_subprotocol([f"auth.{TOKEN}"]), f"auth.{TOKEN}")
        self.assertEqual(select_subprotocol([" ", f" auth.{TOKEN}", "auth.other-token"]), f"auth.{TOKEN}")
        self.assertIsNone(select_subprotocol([]))
        self.assertIsNone(select_subprotocol(["", " "]))


class RoleClaimTests(SynchronousTestCase):
    """Tests for L{role_claim_matches}."""

    def test_absent_claim(self) -> None:
        """A token without a role claim matches any requested role."""
        self.assertTrue(role_claim_matches("client", None))

    def test_claim_must_equal_requested_role(self) -> None:
        """A role claim matches only the identical requested role."""
        self.assertTrue(role_claim_matches("workspace-daemon", "workspace-daemon"))
        self.assertFalse(role_claim_matches("workspace-daemon", "client"))
        self.assertFalse(role_claim_matches("client", "Client"))


class OriginPolicyTests(SynchronousTestCase):
    """Tests for L{OriginPolicy}: exact origins, subdomain wildcards, null and *."""

    def test_any(self) -> None:
        """``*`` allows every origin, ``null`` included; no Origin header is always allowed."""
        policy = OriginPolicy(["*"])
        self.assertTrue(all(policy.allows(o) for o in ("https://a.example", "null", "http://127.0.0.1:9", None)))
        self.assertTrue(OriginPolicy(["https://app.example.com"]).allows(None))

    def test_exact_origins_compare_normalized(self) -> None:
        """Exact entries match case-insensitively, with or without the default port; other origins do not."""
        policy = OriginPolicy([" https://App.Example.com/ ", "http://localhost:8080"])
        for allowed in ("https://app.example.com", "HTTPS://APP.EXAMPLE.COM:443", "http://localhost:8080"):
            self.assertTrue(policy.allows(allowed), allowed)
        for refused in ("https://app.example.com:8443", "http://app.example.com", "https://evil.example.com",
                        "null", "http://localhost:8081", "https://app.example.com.evil.net"):
            self.assertFalse(policy.allows(refused), refused)

    def test_subdomain_wildcard_and_null(self) -> None:
        """``scheme://*.domain`` allows every subdomain (not the domain itself); ``null`` must be listed to pass."""
        policy = OriginPolicy(["https://*.example.com", "null"])
        self.assertTrue(policy.allows("https://a.b.example.com"))
        self.assertTrue(policy.allows("https://a.example.com:8443"))
        self.assertTrue(policy.allows("null"))
        self.assertFalse(policy.allows("https://example.com"))
        self.assertFalse(policy.allows("https://badexample.com"))
        self.assertFalse(policy.allows("http://a.example.com"))
        for forged in ("https://evil.example/.example.com", "https://evil.example?.example.com",
                       "https://user@evil.example#.example.com"):
            self.assertFalse(policy.allows(forged), forged)


class RefusalTableTests(SynchronousTestCase):
    """Tests for L{UpgradeRefusal}, L{bare_refusal_bytes} and L{client_cap_exceeded}."""

    def test_table(self) -> None:
        """Every refusal carries its HTTP status and counter name."""
        table = {refusal: (refusal.status, refusal.counter) for refusal in UpgradeRefusal}
        self.assertEqual(
            table,
            {
                UpgradeRefusal.RATE_LIMITED: (429, "relay_upgrade_rate_limited_total"),
                UpgradeRefusal.TOTAL_CONNECTIONS: (503, "relay_upgrade_rejected_total_connections_total"),
                UpgradeRefusal.IP_CONNECTIONS: (429, "relay_upgrade_rejected_ip_connections_total"),
                UpgradeRefusal.WRONG_PATH: (None, None),
                UpgradeRefusal.ORIGIN_NOT_ALLOWED: (403, "relay_upgrade_rejected_origin_total"),
                UpgradeRefusal.INVALID_QUERY: (400, "relay_upgrade_invalid_query_total"),
                UpgradeRefusal.MISSING_AUTH: (401, "relay_upgrade_missing_auth_total"),
                UpgradeRefusal.WORKSPACE_CLIENTS: (429, "relay_upgrade_rejected_workspace_clients_total"),
                UpgradeRefusal.ADMISSION_DENIED: (401, "relay_admission_denied_total"),
            },
        )

    def test_bare_refusal_bytes(self) -> None:
        """A refusal is a bare status line with the standard reason and an empty header block."""
        self.assertEqual(bare_refusal_bytes(429), b"HTTP/1.1 429 Too Many Requests\r\n\r\n")
        self.assertEqual(bare_refusal_bytes(400), b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.assertEqual(bare_refusal_bytes(401), b"HTTP/1.1 401 Unauthorized\r\n\r\n")
        self.assertEqual(bare_refusal_bytes(503), b"HTTP/1.1 503 Service Unavailable\r\n\r\n")

    def test_client_cap(self) -> None:
        """The per-scope client cap is reached when the scope holds the maximum."""
        self.assertFalse(client_cap_exceeded(99, 100))
        self.assertTrue(client_cap_exceeded(100, 100))


class PrecheckTests(SynchronousTestCase):
    """Tests for L{precheck_upgrade}, one per refusal row in pipeline order."""

    def setUp(self) -> None:
        """Build a generous upgrade limiter."""
        self.limiter = FixedWindowLimiter(100, 60_000, 100)

    def _precheck(self, **overrides: Any) -> UpgradePrecheck:
        arguments: dict[str, Any] = dict(
            path="/ws",
            params=_params("role=client&workspaceId=w&runtimeTargetId=r"),
            authorization=f"Bearer {TOKEN}",
            websocket_protocol=None,
            relay_mode="prod",
            ip="203.0.113.9",
            now_ms=0,
            upgrade_limiter=self.limiter,
            registered_connections=0,
            max_total_connections=10,
            ip_connections=0,
            max_connections_per_ip=5,
        )
        arguments.update(overrides)
        return precheck_upgrade(**arguments)

    def test_accepted(self) -> None:
        """A request passing every check yields the query, token and token source."""
        result = self._precheck(registered_connections=9, ip_connections=4)
        self.assertEqual(
            result, UpgradeAccepted(UpgradeQuery("client", "w", "r", None), TOKEN, "header")
        )

    def test_rate_limited_counts_every_attempt(self) -> None:
        """Attempts refused by later checks still use up the per-IP upgrade allowance."""
        self.limiter = FixedWindowLimiter(2, 60_000, 100)
        self.assertEqual(self._precheck(path="/nope"), UpgradeRefused(UpgradeRefusal.WRONG_PATH))
        missing = UpgradeRefused(UpgradeRefusal.MISSING_AUTH, "MISSING_AUTH_TOKEN")
        self.assertEqual(self._precheck(authorization=None), missing)
        self.assertEqual(self._precheck(), UpgradeRefused(UpgradeRefusal.RATE_LIMITED))
        self.assertIsInstance(self._precheck(ip="198.51.100.1"), UpgradeAccepted)

    def test_total_connections(self) -> None:
        """At the total connection cap the upgrade is refused before the per-IP, path and query checks."""
        result = self._precheck(registered_connections=10, ip_connections=5, path="/x", params={})
        self.assertEqual(result, UpgradeRefused(UpgradeRefusal.TOTAL_CONNECTIONS))

    def test_ip_connections(self) -> None:
        """At the per-IP connection cap the upgrade is refused before the path and query checks."""
        result = self._precheck(ip_connections=5, path="/x", params={})
        self.assertEqual(result, UpgradeRefused(UpgradeRefusal.IP_CONNECTIONS))

    def test_wrong_path(self) -> None:
        """Any path other than exactly ``/ws`` is refused silently, before the query check."""
        for path in ("/", "/ws/", "/WS", "//ws", "/ws/x"):
            self.assertEqual(self._precheck(path=path, params={}), UpgradeRefused(UpgradeRefusal.WRONG_PATH))
        self.assertIsNone(UpgradeRefusal.WRONG_PATH.status)

    def test_invalid_query(self) -> None:
        """An invalid query is refused before the token is looked at."""
        result = self._precheck(params=_params("role=client&workspaceId=w&runtimeTargetId="), authorization=None)
        self.assertEqual(result, UpgradeRefused(UpgradeRefusal.INVALID_QUERY))

    def test_missing_auth(self) -> None:
        """Without a usable token the upgrade is refused, keeping the internal reason."""
        result = self._precheck(authorization=None)
        self.assertEqual(result, UpgradeRefused(UpgradeRefusal.MISSING_AUTH, "MISSING_AUTH_TOKEN"))

    def test_query_token_not_allowed(self) -> None:
        """A query token outside dev mode is a MISSING_AUTH refusal with the not-allowed reason."""
        result = self._precheck(authorization=None, params=_params(f"role=worker&workspaceId=w&token={TOKEN}"))
        self.assertEqual(result, UpgradeRefused(UpgradeRefusal.MISSING_AUTH, "QUERY_TOKEN_NOT_ALLOWED"))

    def test_query_token_in_dev(self) -> None:
        """In dev mode the query's token is used."""
        result = self._precheck(
            authorization=None, relay_mode="dev", params=_params(f"role=worker&workspaceId=w&token={TOKEN}")
        )
        self.assertEqual(result, UpgradeAccepted(UpgradeQuery("worker", "w", None, TOKEN), TOKEN, "query"))
