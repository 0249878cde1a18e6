"""Tests for the claims schema and local token minting/verification (viewport.tokens)."""

from __future__ import annotations

import json

import os
import stat
import tempfile
from typing import Optional

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.trial.unittest import SynchronousTestCase

from viewport.tokens import (
    Claims,
    LocalTokenVerifier,
    TokenRejected,
    load_or_create_secret,
    mint_token,
    validate_claims,
)

NOW = 1_700_000_000.0
SECRET = "a" * 64

DAEMON_CLAIMS: dict[str, object] = {
    "workspaceId": "ws_1",
    "runtimeTargetId": "rt_1",
    "role": "workspace-daemon",
    "machineId": "machine-1",
    "installId": "install_1",
    "e2eeProfile": "noise-ikpsk2",
    "daemonIssueGeneration": 3,
}


def _private_pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_pem(key: object) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class ClaimsSchemaTests(SynchronousTestCase):
    """The strict claims schema (docs/protocol.md §2.5)."""

    def test_empty_object_passes(self) -> None:
        """An empty claims object is valid (later admission steps reject it)."""
        self.assertEqual(validate_claims({}), Claims())

    def test_not_an_object(self) -> None:
        """Arrays, null and strings are not claims."""
        values: list[object] = [[], None, "x", 1]
        for value in values:
            self.assertIsNone(validate_claims(value))

    def test_invalid_scope_value(self) -> None:
        """Enum values are case-sensitive: ``PAIRING`` is refused."""
        self.assertIsNone(validate_claims({"workspaceId": "ws", "scope": "PAIRING"}))
        self.assertEqual(validate_claims({"scope": "pairing"}), Claims(scope="pairing"))

    def test_unknown_key(self) -> None:
        """Any key outside the schema makes the claims invalid."""
        self.assertIsNone(validate_claims({"workspaceId": "ws", "isAdmin": True}))

    def test_daemon_claims(self) -> None:
        """Daemon claims with installId, e2eeProfile and daemonIssueGeneration are accepted and typed."""
        claims = validate_claims(DAEMON_CLAIMS)
        assert claims is not None
        self.assertEqual(claims.install_id, "install_1")
        self.assertEqual(claims.e2ee_profile, "noise-ikpsk2")
        self.assertEqual(claims.daemon_issue_generation, 3)
        self.assertEqual(claims.role, "workspace-daemon")

    def test_session_channels(self) -> None:
        """Session channels must be ``agent-session:`` plus at least one character, ≤255, ≤64 entries."""
        good = validate_claims({"scope": "session-events", "sessionChannels": ["agent-session:s1"]})
        assert good is not None
        self.assertEqual(good.session_channels, ("agent-session:s1",))
        self.assertIsNone(validate_claims({"sessionChannels": ["session:s1"]}))
        self.assertIsNone(validate_claims({"sessionChannels": ["agent-session:"]}))
        self.assertIsNone(validate_claims({"sessionChannels": ["agent-session:" + "x" * 242]}))
        self.assertIsNotNone(validate_claims({"sessionChannels": ["agent-session:" + "x" * 241]}))
        self.assertIsNone(validate_claims({"sessionChannels": [f"agent-session:{i}" for i in range(65)]}))
        self.assertIsNotNone(validate_claims({"sessionChannels": [f"agent-session:{i}" for i in range(64)]}))
        self.assertIsNone(validate_claims({"sessionChannels": "agent-session:s1"}))
        self.assertIsNone(validate_claims({"sessionChannels": [1]}))

    def test_string_lengths(self) -> None:
        """String limits are inclusive and counted in UTF-16 code units."""
        self.assertIsNotNone(validate_claims({"workspaceId": "w" * 128}))
        self.assertIsNone(validate_claims({"workspaceId": "w" * 129}))
        self.assertIsNone(validate_claims({"workspaceId": ""}))
        self.assertIsNotNone(validate_claims({"clientId": "\U0001f600" * 64}))
        self.assertIsNone(validate_claims({"clientId": "\U0001f600" * 65}))

    def test_machine_id_trimmed(self) -> None:
        """machineId is trimmed before its length check; blank is refused."""
        claims = validate_claims({"machineId": "  m-1 \n"})
        assert claims is not None
        self.assertEqual(claims.machine_id, "m-1")
        self.assertIsNone(validate_claims({"machineId": "   "}))

    def test_null_only_where_allowed(self) -> None:
        """daemonPublicKey, pairingSecret and relayWsBaseUrl may be null; other claims may not."""
        self.assertEqual(
            validate_claims({"daemonPublicKey": None, "pairingSecret": None, "relayWsBaseUrl": None}),
            Claims(),
        )
        self.assertIsNone(validate_claims({"workspaceId": None}))
        self.assertIsNone(validate_claims({"exp": None}))

    def test_integers(self) -> None:
        """Integers follow JS rules: no booleans, integral floats accepted, generation ≥ 0."""
        claims = validate_claims({"daemonIssueGeneration": 2.0, "exp": -5})
        assert claims is not None
        self.assertEqual(claims.daemon_issue_generation, 2)
        self.assertIsInstance(claims.daemon_issue_generation, int)
        self.assertIsNone(validate_claims({"daemonIssueGeneration": True}))
        self.assertIsNone(validate_claims({"daemonIssueGeneration": 2.5}))
        self.assertIsNone(validate_claims({"daemonIssueGeneration": -1}))
        self.assertIsNone(validate_claims({"iat": "1"}))
        self.assertIsNone(validate_claims({"iat": float("nan")}))

    def test_audience_forms(self) -> None:
        """aud is a string or an array of strings."""
        listed = validate_claims({"aud": ["a", "b"]})
        assert listed is not None
        self.assertEqual(listed.aud, ("a", "b"))
        self.assertIsNone(validate_claims({"aud": [""]}))
        self.assertIsNone(validate_claims({"aud": 5}))

    def test_to_json_round_trip(self) -> None:
        """to_json gives camelCase keys, lists for arrays, and omits absent claims."""
        source = dict(DAEMON_CLAIMS, sessionChannels=["agent-session:a"], aud=["x"])
        claims = validate_claims(source)
        assert claims is not None
        self.assertEqual(claims.to_json(), source)
        self.assertEqual(validate_claims(claims.to_json()), claims)


class LocalTokenTests(SynchronousTestCase):
    """Minting and verifying local relay tokens with an explicit clock."""

    def _mint(self, key: object = SECRET, algorithm: str = "HS256", **overrides: object) -> str:
        options: dict[str, object] = {
            "key": key,
            "algorithm": algorithm,
            "claims": DAEMON_CLAIMS,
            "ttl_seconds": 600,
            "now": NOW,
        }
        options.update(overrides)
        return mint_token(**options)  # type: ignore[arg-type]

    def _rejected(self, verifier: LocalTokenVerifier, token: str, now: float = NOW) -> str:
        with self.assertRaises(TokenRejected) as caught:
            verifier.verify(token, now)
        return caught.exception.reason

    def test_hs256_round_trip(self) -> None:
        """An HS256 token verifies and carries the claims plus iat/exp/jti."""
        claims = LocalTokenVerifier(SECRET, ["HS256"]).verify(self._mint(), NOW + 1)
        self.assertEqual(claims.workspace_id, "ws_1")
        self.assertEqual(claims.iat, int(NOW))
        self.assertEqual(claims.exp, int(NOW) + 600)
        assert claims.jti is not None
        self.assertEqual(len(claims.jti), 32)

    def test_jti_is_random(self) -> None:
        """Two tokens minted at the same instant differ by jti."""
        verifier = LocalTokenVerifier(SECRET, ["HS256"])
        first = verifier.verify(self._mint(), NOW)
        second = verifier.verify(self._mint(), NOW)
        self.assertNotEqual(first.jti, second.jti)

    def test_eddsa_round_trip(self) -> None:
        """An EdDSA token signed with an Ed25519 private key verifies with the public key."""
        key = ed25519.Ed25519PrivateKey.generate()
        token = self._mint(key=_private_pem(key).decode(), algorithm="EdDSA")
        claims = LocalTokenVerifier(_public_pem(key), ["EdDSA"]).verify(token, NOW)
        self.assertEqual(claims.daemon_issue_generation, 3)
        other = ed25519.Ed25519PrivateKey.generate()
        self.assertEqual(self._rejected(LocalTokenVerifier(_public_pem(other), ["EdDSA"]), token), "INVALID_SIGNATURE")

    def test_rs256_round_trip(self) -> None:
        """An RS256 token verifies with the RSA public key, and carries the kid header when asked."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        token = self._mint(key=_private_pem(key), algorithm="RS256", key_id="v1")
        self.assertEqual(jwt.get_unverified_header(token)["kid"], "v1")
        claims = LocalTokenVerifier(_public_pem(key).decode(), ["RS256"]).verify(token, NOW)
        self.assertEqual(claims.role, "workspace-daemon")

    def test_bad_signature(self) -> None:
        """A token signed with another secret is refused."""
        token = self._mint(key="b" * 64)
        self.assertEqual(self._rejected(LocalTokenVerifier(SECRET, ["HS256"]), token), "INVALID_SIGNATURE")

    def test_algorithm_not_allowed(self) -> None:
        """A token whose algorithm the verifier does not accept is refused."""
        key = ed25519.Ed25519PrivateKey.generate()
        verifier = LocalTokenVerifier(_public_pem(key), ["EdDSA"])
        self.assertEqual(self._rejected(verifier, self._mint()), "INVALID_ALGORITHM")

    def test_malformed(self) -> None:
        """Garbage is refused as malformed."""
        self.assertEqual(self._rejected(LocalTokenVerifier(SECRET, ["HS256"]), "not.a.jwt"), "MALFORMED_TOKEN")

    def test_expiry_with_leeway(self) -> None:
        """exp is enforced against ``now`` with the leeway."""
        verifier = LocalTokenVerifier(SECRET, ["HS256"], leeway_seconds=30)
        token = self._mint()
        verifier.verify(token, NOW + 600 + 29)
        self.assertEqual(self._rejected(verifier, token, NOW + 600 + 30), "TOKEN_EXPIRED")

    def test_exp_required(self) -> None:
        """A token without exp is refused."""
        token = jwt.encode({"workspaceId": "ws"}, SECRET, algorithm="HS256")
        self.assertEqual(self._rejected(LocalTokenVerifier(SECRET, ["HS256"]), token), "TOKEN_EXP_REQUIRED")

    def test_not_before(self) -> None:
        """A token whose nbf is beyond now + leeway is refused; within the leeway it passes."""
        verifier = LocalTokenVerifier(SECRET, ["HS256"], leeway_seconds=30)
        token = self._mint(claims=dict(DAEMON_CLAIMS, nbf=int(NOW) + 100))
        self.assertEqual(self._rejected(verifier, token), "TOKEN_NOT_YET_VALID")
        verifier.verify(token, NOW + 70)

    def test_issued_in_future(self) -> None:
        """A token issued beyond now + leeway is refused."""
        token = self._mint(now=NOW + 100)
        self.assertEqual(self._rejected(LocalTokenVerifier(SECRET, ["HS256"]), token), "TOKEN_ISSUED_IN_FUTURE")

    def test_issuer(self) -> None:
        """The issuer is checked only when configured."""
        token = self._mint(issuer="viewport-server")
        LocalTokenVerifier(SECRET, ["HS256"], issuer="viewport-server").verify(token, NOW)
        LocalTokenVerifier(SECRET, ["HS256"]).verify(token, NOW)
        self.assertEqual(
            self._rejected(LocalTokenVerifier(SECRET, ["HS256"], issuer="someone-else"), token), "INVALID_ISSUER"
        )
        self.assertEqual(
            self._rejected(LocalTokenVerifier(SECRET, ["HS256"], issuer="viewport-server"), self._mint()),
            "INVALID_ISSUER",
        )

    def test_audience(self) -> None:
        """The audience is checked only when configured; a list audience matches any entry."""
        token = self._mint(audience="viewport-relay")
        LocalTokenVerifier(SECRET, ["HS256"], audience="viewport-relay").verify(token, NOW)
        LocalTokenVerifier(SECRET, ["HS256"]).verify(token, NOW)
        self.assertEqual(
            self._rejected(LocalTokenVerifier(SECRET, ["HS256"], audience="other"), token), "INVALID_AUDIENCE"
        )
        listed = self._mint(claims=dict(DAEMON_CLAIMS, aud=["x", "viewport-relay"]))
        LocalTokenVerifier(SECRET, ["HS256"], audience="viewport-relay").verify(listed, NOW)

    def test_claims_schema_enforced(self) -> None:
        """A correctly signed token whose claims break the schema is refused."""
        token = jwt.encode({"exp": int(NOW) + 60, "admin": True}, SECRET, algorithm="HS256")
        self.assertEqual(self._rejected(LocalTokenVerifier(SECRET, ["HS256"]), token), "INVALID_CLAIMS")

    def test_registered_claims_are_accepted(self) -> None:
        """Every registered claim of RFC 7519 (sub included, NumericDates with fractions) is accepted in local tokens."""
        payload = dict(
            DAEMON_CLAIMS,
            iss="https://idp.example.com/tenant/" + "x" * 300,
            sub="auth0|5f7c8ec7c33c6c004bbafe82",
            aud=["viewport-relay", "https://api.example.com"],
            exp=NOW + 60.5,
            nbf=NOW - 10.25,
            iat=NOW - 10.25,
            jti="j" * 400,
        )
        token = jwt.encode(payload, SECRET, algorithm="HS256")
        claims = LocalTokenVerifier(
            SECRET, ["HS256"], issuer=payload["iss"], audience="viewport-relay"  # type: ignore[arg-type]
        ).verify(token, NOW)
        self.assertEqual(
            (claims.workspace_id, claims.exp, claims.nbf, claims.aud, claims.jti),
            ("ws_1", NOW + 60.5, NOW - 10.25, ("viewport-relay", "https://api.example.com"), "j" * 400),
        )
        self.assertEqual(self._rejected(LocalTokenVerifier(SECRET, ["HS256"]), token, NOW + 91), "TOKEN_EXPIRED")

    def test_registered_claims_keep_their_types(self) -> None:
        """A registered claim of the wrong type (or a non-finite date) is still INVALID_CLAIMS."""
        verifier = LocalTokenVerifier(SECRET, ["HS256"])
        for bad in ({"sub": 7}, {"exp": "soon"}, {"exp": True}, {"nbf": float("nan")}, {"aud": [1]}, {"iss": None},
                    {"exp": 10**400}, {"iat": -(10**20)}):
            body = dict(DAEMON_CLAIMS, exp=int(NOW) + 60)
            body.update(bad)
            # Signed as raw JSON: PyJWT's encoder refuses some of these wrong types itself.
            token = jwt.api_jws.PyJWS().encode(json.dumps(body).encode(), SECRET, algorithm="HS256")
            self.assertEqual(self._rejected(verifier, token), "INVALID_CLAIMS", bad)

    def test_contract_schema_stays_strict(self) -> None:
        """Unknown non-registered claims are refused in local tokens; the platform's claims schema refuses sub."""
        token = jwt.encode(dict(DAEMON_CLAIMS, exp=int(NOW) + 60, email="a@b.c"), SECRET, algorithm="HS256")
        self.assertEqual(self._rejected(LocalTokenVerifier(SECRET, ["HS256"]), token), "INVALID_CLAIMS")
        self.assertIsNone(validate_claims(dict(DAEMON_CLAIMS, sub="user-1")))

    def test_mint_refuses_invalid_claims(self) -> None:
        """Minting claims outside the schema raises ValueError naming the claim."""
        with self.assertRaises(ValueError) as caught:
            self._mint(claims={"scope": "PAIRING"})
        self.assertIn("scope", str(caught.exception))
        with self.assertRaises(ValueError):
            self._mint(ttl_seconds=0)

    def test_verifier_arguments(self) -> None:
        """The verifier refuses an empty or unsupported algorithm list."""
        with self.assertRaises(ValueError):
            LocalTokenVerifier(SECRET, [])
        with self.assertRaises(ValueError):
            LocalTokenVerifier(SECRET, ["none"])


class SecretFileTests(SynchronousTestCase):
    """The HS256 secret file."""

    def setUp(self) -> None:
        """Work in a fresh temporary directory."""
        self.directory = tempfile.mkdtemp()
        self.addCleanup(self._remove_tree, self.directory)

    @staticmethod
    def _remove_tree(path: str) -> None:
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files:
                os.unlink(os.path.join(root, name))
            for name in dirs:
                os.rmdir(os.path.join(root, name))
        os.rmdir(path)

    def test_created_with_mode_0600(self) -> None:
        """A missing secret is created (with its directories) as 64 hex characters, mode 0600."""
        path = os.path.join(self.directory, "nested", "dir", "relay.secret")
        secret, created = load_or_create_secret(path)
        self.assertTrue(created)
        self.assertEqual(len(secret), 64)
        int(secret, 16)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(os.path.dirname(path))), ["relay.secret"])

    def test_reused(self) -> None:
        """A second call returns the stored secret without creating a new one."""
        path = os.path.join(self.directory, "relay.secret")
        first, _ = load_or_create_secret(path)
        second, created = load_or_create_secret(path)
        self.assertEqual((second, created), (first, False))

    def test_existing_secret_read(self) -> None:
        """An operator-provided secret is read as is (surrounding whitespace dropped)."""
        path = os.path.join(self.directory, "relay.secret")
        with open(path, "w") as handle:
            handle.write("  my-own-secret\n")
        self.assertEqual(load_or_create_secret(path), ("my-own-secret", False))

    def test_empty_file_refused(self) -> None:
        """An empty secret file is an error, not a secret."""
        path = os.path.join(self.directory, "relay.secret")
        open(path, "w").close()
        with self.assertRaises(ValueError):
            load_or_create_secret(path)

    def test_minted_with_created_secret(self) -> None:
        """A created secret works for minting and verification."""
        secret, _ = load_or_create_secret(os.path.join(self.directory, "s"))
        token = mint_token(key=secret, algorithm="HS256", claims={"workspaceId": "w"}, ttl_seconds=60, now=NOW)
        verified: Optional[Claims] = LocalTokenVerifier(secret, ["HS256"]).verify(token, NOW)
        assert verified is not None
        self.assertEqual(verified.workspace_id, "w")
