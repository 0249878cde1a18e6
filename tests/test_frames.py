"""Tests for frame parsing, validation, scope rules and relay-originated frames."""

from __future__ import annotations

import json
import random

from twisted.trial.unittest import SynchronousTestCase

from viewport.relay.frames import (
    PROFILE_STRENGTH,
    SCOPE_ALLOWED,
    SCOPE_PAIRING_ONLY,
    SCOPE_RUNTIME_ONLY,
    SCOPE_SESSION_EVENTS_ONLY,
    SCOPE_SESSION_EVENTS_REQUIRED,
    WORKER_FORWARD_HEADERS,
    ClientKind,
    DaemonKind,
    ScopeAction,
    WorkerKind,
    allowed_channels,
    classify_client_frame,
    classify_daemon_frame,
    classify_worker_frame,
    client_profile_mismatch,
    client_scope_decision,
    daemon_profile_too_weak,
    daemon_unavailable,
    encode_uri_component,
    filter_worker_request_headers,
    filter_worker_response_headers,
    invalid_frame,
    is_integer,
    is_non_empty_string,
    is_number,
    is_worker_request,
    js_trim,
    _parse_strictly,
    parse_frame,
    relay_redirect,
    runtime_target_required,
    session_events_scope_only,
    subscribe_denied,
    subscribed,
    unsubscribe_denied,
    unsubscribed,
    utf16_len,
    viewer_presence_denied,
    worker_forward_failed,
    worker_path_allowed,
    worker_path_denied,
    worker_response,
)

Frame = dict[str, object]
_MISSING = object()
CHANNEL = "agent-session:abc"


def _with(frame: Frame, **changes: object) -> Frame:
    """Copy ``frame`` with fields replaced, or removed when the value is ``_MISSING``."""
    result = dict(frame)
    for key, value in changes.items():
        if value is _MISSING:
            result.pop(key, None)
        else:
            result[key] = value
    return result


E2EE: Frame = {
    "type": "e2ee",
    "version": 2,
    "profile": "noise-ik",
    "sessionId": "s1",
    "epoch": 1,
    "seq": 1,
    "iv": "aXY",
    "tag": "dGFn",
    "ciphertext": "Y2lwaGVy",
}
KEX_INIT_V3: Frame = {
    "type": "relay_key_exchange_init",
    "version": 3,
    "profile": "noise-ik",
    "requestId": "r1",
    "clientEphemeralPublicKey": "eph",
    "encryptedClientStatic": "static",
}
KEX_INIT_V2: Frame = {
    "type": "relay_key_exchange_init",
    "version": 2,
    "profile": "noise-ik",
    "requestId": "r1",
    "clientPublicKey": "pub",
    "clientNonce": "nonce",
    "clientProof": "proof",
}
PAIRING_OFFER_REQUEST: Frame = {
    "type": "relay_pairing_offer_request",
    "requestId": "r1",
    "clientChannelPublicKey": "pub",
}
PAIRING_REDEEM_REQUEST: Frame = {
    "type": "relay_pairing_redeem_request",
    "requestId": "r1",
    "offerId": "o1",
    "encIv": "iv",
    "encTag": "tag",
    "encCiphertext": "ct",
}
SUBSCRIBE: Frame = {"type": "viewport.session_events.subscribe/v1", "channel": CHANNEL}
UNSUBSCRIBE: Frame = {"type": "viewport.session_events.unsubscribe/v1", "channel": CHANNEL}
PRESENCE: Frame = {
    "type": "viewport.session_viewer_presence/v1",
    "channel": CHANNEL,
    "action": "joined",
    "userId": "u1",
}
KEY_UPDATE_REQUIRED: Frame = {
    "type": "relay_key_update_required",
    "sessionId": "s1",
    "nextEpoch": 2,
    "reason": "message_threshold",
}
KEX_RESPONSE_V3: Frame = {
    "type": "relay_key_exchange_response",
    "version": 3,
    "profile": "noise-ik",
    "requestId": "r1",
    "daemonPublicKey": "dpub",
    "daemonEphemeralPublicKey": "deph",
    "encryptedMetadata": "meta",
    "sessionId": "s1",
    "proof": "proof",
    "epoch": 1,
}
KEX_RESPONSE_V2: Frame = {
    "type": "relay_key_exchange_response",
    "version": 2,
    "profile": "noise-ik",
    "requestId": "r1",
    "daemonNonce": "nonce",
    "sessionId": "s1",
    "proof": "proof",
    "epoch": 1,
}
PAIRING_OFFER_RESPONSE: Frame = {
    "type": "relay_pairing_offer_response",
    "requestId": "r1",
    "ok": True,
    "daemonChannelPublicKey": "dpub",
    "encIv": "iv",
    "encTag": "tag",
    "encCiphertext": "ct",
}
PAIRING_REDEEM_RESPONSE: Frame = {
    "type": "relay_pairing_redeem_response",
    "requestId": "r1",
    "ok": True,
    "redeemed": {"peerId": "p"},
}
SESSION_EVENT: Frame = {
    "schema": "viewport.session_event_relay_frame/v1",
    "channel": CHANNEL,
    "event": {"sequence": 1},
}
WORKER_REQUEST: Frame = {
    "type": "viewport.worker_transport.request/v1",
    "requestId": "w1",
    "method": "GET",
    "path": "/api/runtime/workspaces/ws/managed-executors/ex/jobs",
}
TRUSTED_EDGE_COMMAND: Frame = {"type": "trusted-edge-plan-decrypt", "requestId": "r1", "plan": "x"}
CONTEXT_PREVIEW_COMMAND: Frame = {"type": "context-candidate-preview", "requestId": "r1"}
PLAINTEXT_ACK: Frame = {"type": "ack", "id": "m1"}


class ParseFrameTests(SynchronousTestCase):
    """``parse_frame`` follows JavaScript ``JSON.parse`` and keeps only objects."""

    def test_text_object(self) -> None:
        """A JSON object given as text parses to a dict."""
        self.assertEqual(parse_frame('{"type":"e2ee","n":1}'), {"type": "e2ee", "n": 1})

    def test_bytes_object(self) -> None:
        """A JSON object given as UTF-8 bytes (binary frame) parses like text."""
        self.assertEqual(parse_frame('{"name":"é😀"}'.encode()), {"name": "é😀"})

    def test_invalid_utf8_replaced(self) -> None:
        """Invalid UTF-8 bytes become U+FFFD instead of failing the frame."""
        self.assertEqual(parse_frame(b'{"a":"x\xffy"}'), {"a": "x\ufffdy"})
        self.assertEqual(parse_frame(b'{"a":"\xed\xa0\x80"}'), {"a": "\ufffd" * 3})
        self.assertEqual(parse_frame(b'{"a":"\xf0\x9f\x98"}'), {"a": "\ufffd"})

    def test_non_finite_constants_rejected(self) -> None:
        """NaN, Infinity and -Infinity are not JSON and reject the frame, wherever they appear."""
        for text in (
            '{"a":NaN}',
            '{"a":Infinity}',
            '{"a":-Infinity}',
            '{"a":[1,{"b":NaN}]}',
        ):
            with self.subTest(text=text):
                self.assertIsNone(parse_frame(text))

    def test_non_object_top_level_rejected(self) -> None:
        """Arrays, null, strings, numbers and booleans at the top level are rejected."""
        for text in ("[]", '[{"type":"e2ee"}]', "null", '"x"', "1", "2.5", "true", "false"):
            with self.subTest(text=text):
                self.assertIsNone(parse_frame(text))

    def test_malformed_rejected(self) -> None:
        """Syntax errors, empty input and trailing data are rejected."""
        for text in ("", " ", "{", '{"a":}', "{'a':1}", '{"a":1}x', '{"a":1}{}', '{"a":1,}', "{}}"):
            with self.subTest(text=text):
                self.assertIsNone(parse_frame(text))

    def test_json_whitespace_allowed(self) -> None:
        """JSON whitespace around the object is accepted."""
        self.assertEqual(parse_frame(' \t\r\n{"a":1} \n'), {"a": 1})
        self.assertEqual(parse_frame(b'\n{}\r\n'), {})

    def test_other_whitespace_rejected(self) -> None:
        """Whitespace that JSON does not allow (BOM, form feed, NBSP) rejects the frame."""
        for text in ("\ufeff{}", "\x0c{}", "{}\xa0", "\u00a0{}"):
            with self.subTest(text=repr(text)):
                self.assertIsNone(parse_frame(text))

    def test_duplicate_keys_last_wins(self) -> None:
        """A repeated key keeps its last value, as in JavaScript."""
        self.assertEqual(parse_frame('{"type":"ack","type":"e2ee"}'), {"type": "e2ee"})

    def test_deep_nesting_rejected(self) -> None:
        """Nesting deep enough to exhaust the recursion limit is rejected, not raised."""
        self.assertIsNone(parse_frame('{"a":' + "[" * 100000 + "]" * 100000 + "}"))

    def test_big_integers_are_read_as_javascript_reads_them(self) -> None:
        """Integers beyond 64 bits become floats (JSON.parse makes every number a double); smaller ones stay exact."""
        frame = parse_frame('{"a":123456789012345678901234567890,"b":9007199254740993,"c":1e400}')
        assert frame is not None
        self.assertEqual((type(frame["a"]), frame["b"], frame["c"]), (float, 9007199254740993, float("inf")))

    def test_integers_beyond_the_double_range_are_infinite(self) -> None:
        """An integer too large for a double is Infinity, as JSON.parse reads it, at any length (found by the fuzz run)."""
        for digits in (309, 400, 5000, 100000):
            for sign in ("", "-"):
                frame = parse_frame('{"seq":' + sign + "9" * digits + ',"type":"e2ee"}')
                assert frame is not None, (sign, digits)
                self.assertEqual(frame["seq"], float(sign + "inf"))
        frame = parse_frame('{"a":18446744073709551615,"b":18446744073709551616,"c":-9223372036854775809}')
        assert frame is not None
        self.assertEqual((frame["a"], type(frame["b"]), type(frame["c"])), (2**64 - 1, float, float))

    def test_fast_and_strict_parsers_agree(self) -> None:
        """
        orjson answers most frames; what it refuses goes to the json parser: for valid frames, mutated
        bytes and odd texts alike, the result is the strict parser's.
        """
        rng = random.Random(5)
        samples: list[bytes] = [
            b'{"a":"\\ud800"}', b'{"a":"\\udc00x"}', b'{"a":1e400}', b'{"a":-1e400}', b'{"a":1E+2}', b"{}",
            b'{"a":"\xed\xa0\x80"}', b'{"a":"\xff"}', b"\xef\xbb\xbf{}", b'{"a":' + b"[" * 1100 + b"]" * 1100 + b"}",
            b'{"a":0.1e-400}', b'{"a":-0}', b'{"a":-0.0}', b'{"":1}', b'{"a":"\\u0000"}', b'{"a"\x00:1}',
        ]
        valid = [json.dumps(_random_value(rng, 4)) for _ in range(300)]
        samples += [("{" + ",".join(f'"k{i}":{v}' for i, v in enumerate(valid[j:j + 3])) + "}").encode() for j in range(300)]
        for sample in list(samples):
            for _ in range(5):
                data = bytearray(sample)
                if data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
                samples.append(bytes(data))
        for sample in samples:
            with self.subTest(sample=sample[:60]):
                self.assertEqual(parse_frame(sample), _parse_strictly(sample))

    def test_number_types(self) -> None:
        """Integral JSON numbers written with a fraction parse as floats that still count as integers."""
        frame = parse_frame('{"a":2.0,"b":2,"c":true}')
        assert frame is not None
        self.assertTrue(is_integer(frame["a"]))
        self.assertTrue(is_integer(frame["b"]))
        self.assertFalse(is_number(frame["c"]))


class JsTypingTests(SynchronousTestCase):
    """The JavaScript typing helpers used by validation."""

    def test_is_number(self) -> None:
        """Numbers are ints and floats, never booleans or strings."""
        cases = ((1, True), (1.5, True), (0, True), (True, False), (False, False), ("1", False))
        for value, expected in cases:
            with self.subTest(value=value):
                self.assertEqual(is_number(value), expected)

    def test_is_integer(self) -> None:
        """Integers include integral floats and exclude booleans, fractions and infinity."""
        for value, expected in (
            (2, True),
            (2.0, True),
            (-3.0, True),
            (2.5, False),
            (True, False),
            (float("inf"), False),
            ("2", False),
        ):
            with self.subTest(value=value):
                self.assertEqual(is_integer(value), expected)

    def test_is_non_empty_string(self) -> None:
        """Strings that are blank after JavaScript trimming are empty."""
        for value, expected in (
            ("a", True),
            (" a ", True),
            ("", False),
            (" \t\n", False),
            ("\u00a0\ufeff\u3000\u2028", False),
            (1, False),
            (None, False),
        ):
            with self.subTest(value=value):
                self.assertEqual(is_non_empty_string(value), expected)

    def test_js_trim(self) -> None:
        """``js_trim`` strips JavaScript whitespace, including BOM and NBSP."""
        self.assertEqual(js_trim("\ufeff\u00a0 ab \n"), "ab")
        self.assertEqual(js_trim("\x1cab"), "\x1cab")

    def test_utf16_len(self) -> None:
        """Lengths count UTF-16 code units: astral characters count two, lone surrogates one."""
        for value, expected in (("", 0), ("abc", 3), ("é", 1), ("😀", 2), ("a😀b", 4), ("\ud800", 1)):
            with self.subTest(value=value):
                self.assertEqual(utf16_len(value), expected)


class ClientFrameTests(SynchronousTestCase):
    """``classify_client_frame`` applies the client table of docs/protocol.md §4.2."""

    def assertClient(self, frame: Frame, expected: ClientKind | None) -> None:
        """Assert the client classification of ``frame``."""
        self.assertIs(classify_client_frame(frame), expected)

    def test_valid_frames(self) -> None:
        """Each valid client frame is classified by its kind."""
        for frame, kind in (
            (E2EE, ClientKind.E2EE),
            (KEX_INIT_V3, ClientKind.KEX_INIT),
            (KEX_INIT_V2, ClientKind.KEX_INIT),
            (PAIRING_OFFER_REQUEST, ClientKind.PAIRING_OFFER_REQUEST),
            (PAIRING_REDEEM_REQUEST, ClientKind.PAIRING_REDEEM_REQUEST),
            (SUBSCRIBE, ClientKind.SESSION_SUBSCRIBE),
            (UNSUBSCRIBE, ClientKind.SESSION_UNSUBSCRIBE),
            (PRESENCE, ClientKind.VIEWER_PRESENCE),
        ):
            with self.subTest(kind=kind):
                self.assertClient(frame, kind)

    def test_type_required(self) -> None:
        """A missing, unknown or non-string ``type`` is invalid."""
        for value in (_MISSING, "E2EE", "relay_status", None, 1, ["e2ee"], {"e2ee": 1}):
            with self.subTest(type=value):
                self.assertClient(_with(E2EE, type=value), None)

    def test_daemon_only_frames_rejected(self) -> None:
        """Daemon→client frames are not valid client frames."""
        for frame in (
            KEY_UPDATE_REQUIRED,
            KEX_RESPONSE_V3,
            KEX_RESPONSE_V2,
            PAIRING_OFFER_RESPONSE,
            PAIRING_REDEEM_RESPONSE,
            SESSION_EVENT,
            WORKER_REQUEST,
        ):
            with self.subTest(frame=frame):
                self.assertClient(frame, None)

    def test_e2ee_fields(self) -> None:
        """Every field of the E2EE envelope is type- and range-checked."""
        cases: list[tuple[str, object, bool]] = [
            ("version", 2.0, True),
            ("version", 3, False),
            ("version", "2", False),
            ("version", _MISSING, False),
            ("profile", "noise-ikpsk2", True),
            ("profile", "noise-xx", False),
            ("profile", _MISSING, False),
            ("profile", ["noise-ik"], False),
            ("sessionId", " ", False),
            ("sessionId", 1, False),
            ("epoch", 2.0, True),
            ("epoch", 0, False),
            ("epoch", 1.5, False),
            ("epoch", "1", False),
            ("epoch", True, False),
            ("epoch", _MISSING, False),
            ("seq", 10**20, True),
            ("seq", 0, False),
            ("seq", -1, False),
            ("seq", 2.5, False),
            ("seq", True, False),
            ("ciphertext", 1, False),
            ("iv", _MISSING, False),
            ("extra", "preserved", True),
        ]
        for field, value, valid in cases:
            with self.subTest(field=field, value=value):
                self.assertClient(_with(E2EE, **{field: value}), ClientKind.E2EE if valid else None)

    def test_key_exchange_init_fields(self) -> None:
        """Key exchange init v2/v3 need their string fields; requestId may be empty."""
        cases: list[tuple[Frame, dict[str, object], bool]] = [
            (KEX_INIT_V3, {"requestId": ""}, True),
            (KEX_INIT_V3, {"previousSessionId": 7}, True),
            (KEX_INIT_V3, {"version": 3.0}, True),
            (KEX_INIT_V3, {"version": 4}, False),
            (KEX_INIT_V3, {"profile": "noise-xx"}, False),
            (KEX_INIT_V3, {"requestId": _MISSING}, False),
            (KEX_INIT_V3, {"requestId": 1}, False),
            (KEX_INIT_V3, {"clientEphemeralPublicKey": _MISSING}, False),
            (KEX_INIT_V3, {"encryptedClientStatic": None}, False),
            (KEX_INIT_V2, {"requestId": ""}, True),
            (KEX_INIT_V2, {"clientPublicKey": _MISSING}, False),
            (KEX_INIT_V2, {"clientNonce": 1}, False),
            (KEX_INIT_V2, {"clientProof": _MISSING}, False),
            (KEX_INIT_V2, {"profile": _MISSING}, False),
        ]
        for base, changes, valid in cases:
            with self.subTest(version=base["version"], changes=changes):
                self.assertClient(_with(base, **changes), ClientKind.KEX_INIT if valid else None)

    def test_key_exchange_init_psk_needs_pairing_peer(self) -> None:
        """With ``noise-ikpsk2`` both versions need a non-empty ``pairingPeerId``."""
        for base in (KEX_INIT_V3, KEX_INIT_V2):
            psk = _with(base, profile="noise-ikpsk2")
            with self.subTest(version=base["version"]):
                self.assertClient(psk, None)
                self.assertClient(_with(psk, pairingPeerId=" "), None)
                self.assertClient(_with(psk, pairingPeerId=1), None)
                self.assertClient(_with(psk, pairingPeerId="peer"), ClientKind.KEX_INIT)

    def test_pairing_offer_request_fields(self) -> None:
        """Offer requests need non-empty strings and an optional integer ttl in 30–3600."""
        cases: list[tuple[dict[str, object], bool]] = [
            ({"ttlSeconds": 30}, True),
            ({"ttlSeconds": 3600}, True),
            ({"ttlSeconds": 60.0}, True),
            ({"ttlSeconds": 29}, False),
            ({"ttlSeconds": 3601}, False),
            ({"ttlSeconds": 30.5}, False),
            ({"ttlSeconds": "60"}, False),
            ({"ttlSeconds": None}, False),
            ({"ttlSeconds": True}, False),
            ({"requestId": " "}, False),
            ({"requestId": _MISSING}, False),
            ({"clientChannelPublicKey": ""}, False),
            ({"clientChannelPublicKey": 5}, False),
        ]
        for changes, valid in cases:
            with self.subTest(changes=changes):
                expected = ClientKind.PAIRING_OFFER_REQUEST if valid else None
                self.assertClient(_with(PAIRING_OFFER_REQUEST, **changes), expected)

    def test_pairing_redeem_request_fields(self) -> None:
        """Every field of a redeem request must be a non-empty string."""
        for field in ("requestId", "offerId", "encIv", "encTag", "encCiphertext"):
            for value in (_MISSING, "", "\t", 1):
                with self.subTest(field=field, value=value):
                    self.assertClient(_with(PAIRING_REDEEM_REQUEST, **{field: value}), None)

    def test_channel_rule(self) -> None:
        """Subscribe, unsubscribe and presence need a non-empty channel starting ``agent-session:``."""
        for base in (SUBSCRIBE, UNSUBSCRIBE, PRESENCE):
            for value in (_MISSING, "", "session:abc", " agent-session:abc", "AGENT-SESSION:abc", 1, None):
                with self.subTest(type=base["type"], channel=value):
                    self.assertClient(_with(base, channel=value), None)

    def test_subscribe_after_sequence(self) -> None:
        """``afterSequence`` is absent or an integer ≥ 0."""
        cases: list[tuple[object, bool]] = [(0, True), (5.0, True), (-1, False), (1.5, False)]
        cases += [(None, False), ("1", False), (True, False), (False, False)]
        for value, valid in cases:
            with self.subTest(afterSequence=value):
                expected = ClientKind.SESSION_SUBSCRIBE if valid else None
                self.assertClient(_with(SUBSCRIBE, afterSequence=value), expected)

    def test_presence_lengths_count_utf16(self) -> None:
        """``userId`` ≤ 128 and ``displayName`` ≤ 255 are measured in UTF-16 code units."""
        self.assertClient(_with(PRESENCE, userId="😀" * 64), ClientKind.VIEWER_PRESENCE)
        self.assertClient(_with(PRESENCE, userId="😀" * 64 + "a"), None)
        self.assertClient(_with(PRESENCE, displayName="x" * 255), ClientKind.VIEWER_PRESENCE)
        self.assertClient(_with(PRESENCE, displayName="😀" * 128), None)
        self.assertClient(_with(PRESENCE, displayName=""), ClientKind.VIEWER_PRESENCE)


class DaemonFrameTests(SynchronousTestCase):
    """``classify_daemon_frame`` applies the daemon table of docs/protocol.md §4.2."""

    def assertDaemon(self, frame: Frame, expected: DaemonKind | None) -> None:
        """Assert the daemon classification of ``frame``."""
        self.assertIs(classify_daemon_frame(frame), expected)

    def test_valid_frames(self) -> None:
        """Each valid daemon frame is classified by its kind."""
        for frame, kind in (
            (E2EE, DaemonKind.E2EE),
            (KEY_UPDATE_REQUIRED, DaemonKind.KEY_UPDATE_REQUIRED),
            (KEX_RESPONSE_V3, DaemonKind.KEX_RESPONSE),
            (KEX_RESPONSE_V2, DaemonKind.KEX_RESPONSE),
            (PAIRING_OFFER_RESPONSE, DaemonKind.PAIRING_OFFER_RESPONSE),
            (PAIRING_REDEEM_RESPONSE, DaemonKind.PAIRING_REDEEM_RESPONSE),
            (SESSION_EVENT, DaemonKind.SESSION_EVENT),
        ):
            with self.subTest(kind=kind):
                self.assertDaemon(frame, kind)

    def test_client_only_frames_rejected(self) -> None:
        """Client requests and session-event control frames are not daemon frames."""
        for frame in (
            KEX_INIT_V3,
            KEX_INIT_V2,
            PAIRING_OFFER_REQUEST,
            PAIRING_REDEEM_REQUEST,
            SUBSCRIBE,
            UNSUBSCRIBE,
            PRESENCE,
            WORKER_REQUEST,
            {},
        ):
            with self.subTest(frame=frame):
                self.assertDaemon(frame, None)

    def test_key_update_required_fields(self) -> None:
        """``sessionId`` is any string and ``nextEpoch`` any number."""
        for changes, valid in (
            ({"nextEpoch": 2.5}, True),
            ({"sessionId": ""}, True),
            ({"reason": _MISSING}, True),
            ({"nextEpoch": "2"}, False),
            ({"nextEpoch": True}, False),
            ({"nextEpoch": _MISSING}, False),
            ({"sessionId": 1}, False),
            ({"sessionId": _MISSING}, False),
        ):
            with self.subTest(changes=changes):
                expected = DaemonKind.KEY_UPDATE_REQUIRED if valid else None
                self.assertDaemon(_with(KEY_UPDATE_REQUIRED, **changes), expected)

    def test_key_exchange_response_fields(self) -> None:
        """v3 needs an integer epoch ≥ 1 and its keys; v2 accepts any numeric epoch."""
        cases: list[tuple[Frame, dict[str, object], bool]] = [
            (KEX_RESPONSE_V3, {"epoch": 2.0}, True),
            (KEX_RESPONSE_V3, {"epoch": 0}, False),
            (KEX_RESPONSE_V3, {"epoch": 1.5}, False),
            (KEX_RESPONSE_V3, {"epoch": True}, False),
            (KEX_RESPONSE_V3, {"daemonPublicKey": _MISSING}, False),
            (KEX_RESPONSE_V3, {"daemonEphemeralPublicKey": 1}, False),
            (KEX_RESPONSE_V3, {"encryptedMetadata": _MISSING}, False),
            (KEX_RESPONSE_V3, {"proof": _MISSING}, False),
            (KEX_RESPONSE_V3, {"requestId": ""}, True),
            (KEX_RESPONSE_V3, {"profile": "noise-xx"}, False),
            (KEX_RESPONSE_V2, {"epoch": 0.5}, True),
            (KEX_RESPONSE_V2, {"epoch": -1}, True),
            (KEX_RESPONSE_V2, {"epoch": "1"}, False),
            (KEX_RESPONSE_V2, {"daemonNonce": _MISSING}, False),
            (KEX_RESPONSE_V2, {"sessionId": None}, False),
            (KEX_RESPONSE_V2, {"version": 1}, False),
        ]
        for base, changes, valid in cases:
            with self.subTest(version=base["version"], changes=changes):
                self.assertDaemon(_with(base, **changes), DaemonKind.KEX_RESPONSE if valid else None)

    def test_pairing_responses(self) -> None:
        """Pairing responses need a requestId and boolean ``ok``; failures need an errorCode."""
        failed = {"ok": False, "errorCode": "EXPIRED"}
        for base, kind in (
            (PAIRING_OFFER_RESPONSE, DaemonKind.PAIRING_OFFER_RESPONSE),
            (PAIRING_REDEEM_RESPONSE, DaemonKind.PAIRING_REDEEM_RESPONSE),
        ):
            for changes, valid in (
                (failed, True),
                ({"ok": False}, False),
                ({"ok": False, "errorCode": " "}, False),
                ({"ok": "true"}, False),
                ({"ok": 1}, False),
                ({"ok": _MISSING}, False),
                ({"requestId": " "}, False),
                ({"requestId": _MISSING}, False),
            ):
                with self.subTest(kind=kind, changes=changes):
                    self.assertDaemon(_with(base, **changes), kind if valid else None)
        for field in ("daemonChannelPublicKey", "encIv", "encTag", "encCiphertext"):
            with self.subTest(field=field):
                self.assertDaemon(_with(PAIRING_OFFER_RESPONSE, **{field: ""}), None)
        bare_redeem = _with(PAIRING_REDEEM_RESPONSE, redeemed=_MISSING)
        self.assertDaemon(bare_redeem, DaemonKind.PAIRING_REDEEM_RESPONSE)

    def test_session_event_frame(self) -> None:
        """The ``schema`` field discriminates; ``event`` must be an object, and null is refused."""
        for changes, valid in (
            ({"event": {}}, True),
            ({"type": "anything"}, True),
            ({"event": None}, False),
            ({"event": []}, False),
            ({"event": "x"}, False),
            ({"event": _MISSING}, False),
            ({"channel": "other:1"}, False),
            ({"channel": _MISSING}, False),
            ({"schema": "viewport.session_event_relay_frame/v2"}, False),
        ):
            with self.subTest(changes=changes):
                expected = DaemonKind.SESSION_EVENT if valid else None
                self.assertDaemon(_with(SESSION_EVENT, **changes), expected)

    def test_session_event_schema_on_typed_frame(self) -> None:
        """A frame whose ``type`` is invalid still classifies by a valid ``schema``."""
        self.assertDaemon(_with(SESSION_EVENT, type="e2ee"), DaemonKind.SESSION_EVENT)
        self.assertDaemon(_with(SESSION_EVENT, type=["x"]), DaemonKind.SESSION_EVENT)

    def test_session_event_not_a_client_frame(self) -> None:
        """Session event relay frames are never accepted from clients."""
        self.assertIsNone(classify_client_frame(SESSION_EVENT))


class WorkerFrameTests(SynchronousTestCase):
    """``is_worker_request`` applies the worker row of docs/protocol.md §4.2."""

    def test_valid(self) -> None:
        """GET, POST and PATCH requests with optional headers and body are valid."""
        cases: list[dict[str, object]] = [
            {},
            {"method": "POST", "body": "{}", "headers": {"accept": "x"}},
            {"method": "PATCH", "body": ""},
        ]
        for changes in cases:
            with self.subTest(changes=changes):
                frame = _with(WORKER_REQUEST, **changes)
                self.assertTrue(is_worker_request(frame))
                self.assertIs(classify_worker_frame(frame), WorkerKind.WORKER_REQUEST)

    def test_invalid(self) -> None:
        """Each violated rule of the worker request rejects it."""
        cases: tuple[dict[str, object], ...] = (
            {"type": "viewport.worker_transport.response/v1"},
            {"requestId": " "},
            {"requestId": _MISSING},
            {"method": "DELETE"},
            {"method": "get"},
            {"method": _MISSING},
            {"path": "/api/other"},
            {"path": "api/runtime/workspaces/ws"},
            {"path": 1},
            {"headers": None},
            {"headers": []},
            {"headers": "accept: x"},
            {"body": None},
            {"body": {}},
        )
        for changes in cases:
            with self.subTest(changes=changes):
                frame = _with(WORKER_REQUEST, **changes)
                self.assertFalse(is_worker_request(frame))
                self.assertIsNone(classify_worker_frame(frame))


class ReferenceFrameValidationScenarios(SynchronousTestCase):
    """The reference suite's relay-frame-validation scenarios (the reference description's test list)."""

    def test_e2ee_both_directions(self) -> None:
        """A valid E2EE envelope is accepted from clients and from daemons."""
        self.assertIs(classify_client_frame(E2EE), ClientKind.E2EE)
        self.assertIs(classify_daemon_frame(E2EE), DaemonKind.E2EE)

    def test_plaintext_rejected(self) -> None:
        """Plaintext trusted-edge commands and plaintext acks are rejected in both directions."""
        for frame in (TRUSTED_EDGE_COMMAND, CONTEXT_PREVIEW_COMMAND, PLAINTEXT_ACK):
            with self.subTest(frame=frame):
                self.assertIsNone(classify_client_frame(frame))
                self.assertIsNone(classify_daemon_frame(frame))

    def test_blank_envelope_fields(self) -> None:
        """An envelope with a blank sessionId, iv, tag or ciphertext is rejected."""
        for field in ("sessionId", "iv", "tag", "ciphertext"):
            with self.subTest(field=field):
                self.assertIsNone(classify_client_frame(_with(E2EE, **{field: "   "})))
                self.assertIsNone(classify_daemon_frame(_with(E2EE, **{field: ""})))

    def test_presence_actions(self) -> None:
        """Presence ``joined``, ``heartbeat`` and ``left`` are accepted, with or without optional fields."""
        for action in ("joined", "heartbeat", "left"):
            with self.subTest(action=action):
                minimal = _with(PRESENCE, action=action)
                full = _with(minimal, displayName="Ada", sentAt="2024-01-01T00:00:00Z")
                self.assertIs(classify_client_frame(minimal), ClientKind.VIEWER_PRESENCE)
                self.assertIs(classify_client_frame(full), ClientKind.VIEWER_PRESENCE)

    def test_presence_rejections(self) -> None:
        """Presence is rejected for each of the nine reference cases."""
        for changes in (
            {"action": "typing"},
            {"userId": _MISSING},
            {"userId": "  "},
            {"userId": "u" * 129},
            {"channel": "workspace:abc"},
            {"channel": _MISSING},
            {"displayName": 42},
            {"displayName": "d" * 256},
            {"sentAt": 1700000000},
        ):
            with self.subTest(changes=changes):
                self.assertIsNone(classify_client_frame(_with(PRESENCE, **changes)))

    def test_presence_never_daemon_frame(self) -> None:
        """Viewer presence is never a valid daemon frame."""
        self.assertIsNone(classify_daemon_frame(PRESENCE))

    def test_parsed_text_round_trip(self) -> None:
        """Frames arriving as JSON text (``2.0`` numbers, binary payloads) classify like dicts."""
        text = json.dumps(E2EE).replace('"epoch": 1', '"epoch": 1.0')
        text = text.replace('"version": 2', '"version": 2.0')
        frame = parse_frame(text.encode())
        assert frame is not None
        self.assertIs(classify_client_frame(frame), ClientKind.E2EE)


class ProfileTests(SynchronousTestCase):
    """Profile strength and the client/daemon profile checks of docs/protocol.md §4.4 and §4.5."""

    def test_strength(self) -> None:
        """``noise-ikpsk2`` is stronger than ``noise-ik``."""
        self.assertEqual(PROFILE_STRENGTH, {"noise-ik": 1, "noise-ikpsk2": 2})

    def test_client_mismatch(self) -> None:
        """A client frame's known profile must equal the claim; frames without a profile pass."""
        psk = _with(E2EE, profile="noise-ikpsk2")
        self.assertFalse(client_profile_mismatch(None, psk))
        self.assertFalse(client_profile_mismatch("noise-ikpsk2", psk))
        self.assertTrue(client_profile_mismatch("noise-ik", psk))
        self.assertTrue(client_profile_mismatch("noise-ikpsk2", E2EE))
        self.assertFalse(client_profile_mismatch("noise-ik", PAIRING_OFFER_REQUEST))
        self.assertFalse(client_profile_mismatch("noise-ik", _with(E2EE, profile="other")))

    def test_daemon_too_weak(self) -> None:
        """A daemon frame may be stronger than its claim but not weaker."""
        psk = _with(E2EE, profile="noise-ikpsk2")
        self.assertFalse(daemon_profile_too_weak("noise-ik", psk))
        self.assertFalse(daemon_profile_too_weak("noise-ik", E2EE))
        self.assertTrue(daemon_profile_too_weak("noise-ikpsk2", E2EE))
        self.assertFalse(daemon_profile_too_weak(None, E2EE))
        self.assertFalse(daemon_profile_too_weak("noise-ikpsk2", PAIRING_OFFER_RESPONSE))


class ScopeDecisionTests(SynchronousTestCase):
    """``client_scope_decision`` implements the table of docs/protocol.md §4.3 with the precedence of §4.4."""

    TABLE = {
        "runtime": {
            ClientKind.E2EE: SCOPE_ALLOWED,
            ClientKind.KEX_INIT: SCOPE_ALLOWED,
            ClientKind.PAIRING_OFFER_REQUEST: SCOPE_RUNTIME_ONLY,
            ClientKind.PAIRING_REDEEM_REQUEST: SCOPE_RUNTIME_ONLY,
            ClientKind.SESSION_SUBSCRIBE: SCOPE_SESSION_EVENTS_REQUIRED,
            ClientKind.SESSION_UNSUBSCRIBE: SCOPE_SESSION_EVENTS_REQUIRED,
            ClientKind.VIEWER_PRESENCE: SCOPE_SESSION_EVENTS_REQUIRED,
        },
        "pairing": {
            ClientKind.E2EE: SCOPE_PAIRING_ONLY,
            ClientKind.KEX_INIT: SCOPE_PAIRING_ONLY,
            ClientKind.PAIRING_OFFER_REQUEST: SCOPE_ALLOWED,
            ClientKind.PAIRING_REDEEM_REQUEST: SCOPE_ALLOWED,
            ClientKind.SESSION_SUBSCRIBE: SCOPE_SESSION_EVENTS_REQUIRED,
            ClientKind.SESSION_UNSUBSCRIBE: SCOPE_SESSION_EVENTS_REQUIRED,
            ClientKind.VIEWER_PRESENCE: SCOPE_SESSION_EVENTS_REQUIRED,
        },
        "session-events": {
            ClientKind.E2EE: SCOPE_SESSION_EVENTS_ONLY,
            ClientKind.KEX_INIT: SCOPE_SESSION_EVENTS_ONLY,
            ClientKind.PAIRING_OFFER_REQUEST: SCOPE_SESSION_EVENTS_ONLY,
            ClientKind.PAIRING_REDEEM_REQUEST: SCOPE_SESSION_EVENTS_ONLY,
            ClientKind.SESSION_SUBSCRIBE: SCOPE_ALLOWED,
            ClientKind.SESSION_UNSUBSCRIBE: SCOPE_ALLOWED,
            ClientKind.VIEWER_PRESENCE: SCOPE_ALLOWED,
        },
    }

    def test_every_row(self) -> None:
        """Every scope × kind pair gets the decision of the table."""
        for scope, row in self.TABLE.items():
            self.assertEqual(set(row), set(ClientKind))
            for kind, expected in row.items():
                with self.subTest(scope=scope, kind=kind):
                    self.assertIs(client_scope_decision(scope, kind), expected)

    def test_decision_fields(self) -> None:
        """Each refusal carries its close code, exact reason text and log reason."""
        self.assertTrue(SCOPE_ALLOWED.allowed)
        for decision, action, code, reason, log in (
            (
                SCOPE_RUNTIME_ONLY,
                ScopeAction.CLOSE,
                4008,
                "runtime scope only",
                "scope_mismatch_runtime_only",
            ),
            (
                SCOPE_PAIRING_ONLY,
                ScopeAction.CLOSE,
                4008,
                "pairing scope only",
                "scope_mismatch_pairing_only",
            ),
            (
                SCOPE_SESSION_EVENTS_REQUIRED,
                ScopeAction.CLOSE,
                4008,
                "session-events scope required",
                "scope_mismatch_runtime_or_pairing_only",
            ),
            (
                SCOPE_SESSION_EVENTS_ONLY,
                ScopeAction.REPLY_SESSION_EVENTS_SCOPE_ONLY,
                None,
                None,
                "scope_mismatch_session_events_only",
            ),
        ):
            with self.subTest(log=log):
                self.assertFalse(decision.allowed)
                self.assertEqual(
                    (decision.action, decision.close_code, decision.close_reason, decision.log_reason),
                    (action, code, reason, log),
                )

    def test_unknown_scope_is_runtime(self) -> None:
        """A scope other than pairing or session-events behaves as runtime (docs/protocol.md §1, Client scopes)."""
        for kind in ClientKind:
            with self.subTest(kind=kind):
                self.assertIs(client_scope_decision("other", kind), self.TABLE["runtime"][kind])


class RelayFrameTests(SynchronousTestCase):
    """Relay-originated frames have the exact text of docs/protocol.md §5."""

    def test_status_frames(self) -> None:
        """Each ``relay_status`` frame has its exact key order, message and optional keys."""
        for text, expected in (
            (
                runtime_target_required("ws1"),
                '{"type":"relay_status","code":"RUNTIME_TARGET_REQUIRED",'
                '"message":"Runtime client must specify a runtime target","workspaceId":"ws1",'
                '"retryable":false}',
            ),
            (
                daemon_unavailable("ws1"),
                '{"type":"relay_status","code":"DAEMON_UNAVAILABLE",'
                '"message":"No machine runtime is connected for this runtime target","workspaceId":"ws1",'
                '"retryable":true}',
            ),
            (
                daemon_unavailable("ws1", "rt1", "m1"),
                '{"type":"relay_status","code":"DAEMON_UNAVAILABLE",'
                '"message":"No machine runtime is connected for this runtime target","workspaceId":"ws1",'
                '"retryable":true,"runtimeTargetId":"rt1","machineId":"m1"}',
            ),
            (
                daemon_unavailable("ws1", machine_id="m1"),
                '{"type":"relay_status","code":"DAEMON_UNAVAILABLE",'
                '"message":"No machine runtime is connected for this runtime target","workspaceId":"ws1",'
                '"retryable":true,"machineId":"m1"}',
            ),
            (
                relay_redirect("ws1", "wss://r2.example/ws"),
                '{"type":"relay_status","code":"RELAY_REDIRECT",'
                '"message":"Workspace is assigned to a different relay instance","workspaceId":"ws1",'
                '"relayWsBaseUrl":"wss://r2.example/ws"}',
            ),
            (
                relay_redirect("ws1", "wss://r2.example/ws", "rt1"),
                '{"type":"relay_status","code":"RELAY_REDIRECT",'
                '"message":"Workspace is assigned to a different relay instance","workspaceId":"ws1",'
                '"runtimeTargetId":"rt1","relayWsBaseUrl":"wss://r2.example/ws"}',
            ),
            (
                invalid_frame("ws1"),
                '{"type":"relay_status","code":"INVALID_FRAME",'
                '"message":"client frame must be a valid runtime or pairing control frame",'
                '"workspaceId":"ws1"}',
            ),
            (
                session_events_scope_only("ws1"),
                '{"type":"relay_status","code":"SESSION_EVENTS_SCOPE_ONLY",'
                '"message":"session-events scoped clients can only subscribe to authorized '
                'session event channels",'
                '"workspaceId":"ws1"}',
            ),
        ):
            with self.subTest(expected=expected):
                self.assertEqual(text, expected)

    def test_session_event_frames(self) -> None:
        """Subscription replies have their exact text; unsubscribe denial has its own type."""
        for text, expected in (
            (
                subscribed(CHANNEL, 0),
                '{"type":"viewport.session_events.subscribed/v1","channel":"agent-session:abc",'
                '"afterSequence":0,"authoritativeSource":"session_events",'
                '"websocketRequiredForBackfill":false}',
            ),
            (
                subscribed(CHANNEL, 7.0),
                '{"type":"viewport.session_events.subscribed/v1","channel":"agent-session:abc",'
                '"afterSequence":7,"authoritativeSource":"session_events",'
                '"websocketRequiredForBackfill":false}',
            ),
            (
                unsubscribed(CHANNEL),
                '{"type":"viewport.session_events.unsubscribed/v1","channel":"agent-session:abc"}',
            ),
            (
                subscribe_denied(CHANNEL, "ws1"),
                '{"type":"viewport.session_events.subscribe_denied/v1","channel":"agent-session:abc",'
                '"reason":"CHANNEL_NOT_AUTHORIZED","workspaceId":"ws1"}',
            ),
            (
                unsubscribe_denied(CHANNEL, "ws1"),
                '{"type":"viewport.session_events.unsubscribe_denied/v1","channel":"agent-session:abc",'
                '"reason":"CHANNEL_NOT_AUTHORIZED","workspaceId":"ws1"}',
            ),
            (
                viewer_presence_denied(CHANNEL, "ws1"),
                '{"type":"viewport.session_viewer_presence_denied/v1","channel":"agent-session:abc",'
                '"reason":"CHANNEL_NOT_AUTHORIZED","workspaceId":"ws1"}',
            ),
        ):
            with self.subTest(expected=expected):
                self.assertEqual(text, expected)

    def test_worker_frames(self) -> None:
        """Worker responses, including the 403 and 502 refusals, have their exact text."""
        self.assertEqual(
            worker_response("w1", 200, {"content-type": "text/plain"}, "hi"),
            '{"type":"viewport.worker_transport.response/v1","requestId":"w1","status":200,'
            '"headers":{"content-type":"text/plain"},"body":"hi"}',
        )
        self.assertEqual(
            worker_path_denied("w1"),
            '{"type":"viewport.worker_transport.response/v1","requestId":"w1","status":403,'
            '"headers":{"content-type":"application/json"},'
            '"body":"{\\"ok\\":false,\\"reason\\":\\"WORKER_TRANSPORT_PATH_DENIED\\"}"}',
        )
        self.assertEqual(
            worker_forward_failed("w1"),
            '{"type":"viewport.worker_transport.response/v1","requestId":"w1","status":502,'
            '"headers":{"content-type":"application/json"},'
            '"body":"{\\"ok\\":false,\\"reason\\":\\"WORKER_TRANSPORT_FORWARD_FAILED\\"}"}',
        )

    def test_non_ascii_kept(self) -> None:
        """Non-ASCII text is written unescaped, as ``JSON.stringify`` does."""
        self.assertEqual(
            unsubscribed("agent-session:é😀"),
            '{"type":"viewport.session_events.unsubscribed/v1","channel":"agent-session:é😀"}',
        )

    def test_lone_surrogate_escaped(self) -> None:
        """A lone surrogate echoed from a peer is escaped so the text stays valid UTF-8."""
        text = subscribe_denied("agent-session:\ud800", "ws1")
        text.encode("utf-8")
        self.assertIn("\\ud800", text)
        self.assertEqual(json.loads(text)["channel"], "agent-session:\ud800")


PREFIX = "/api/runtime/workspaces/ws1/managed-executors/ex1"


class WorkerPathTests(SynchronousTestCase):
    """``worker_path_allowed`` confines a worker to its executor prefix (docs/protocol.md §9, item 3)."""

    def test_allowed(self) -> None:
        """The prefix itself and paths below it are forwarded; the fragment is dropped."""
        for path, forwarded in (
            (PREFIX, PREFIX),
            (PREFIX + "/", PREFIX + "/"),
            (PREFIX + "/jobs/1", PREFIX + "/jobs/1"),
            (PREFIX + "/jobs?after=1&x=../..", PREFIX + "/jobs?after=1&x=../.."),
            (PREFIX + "/jobs?a=%2F", PREFIX + "/jobs?a=%2F"),
            (PREFIX + "/jobs#frag/../..", PREFIX + "/jobs"),
            (PREFIX + "/jobs?q=1#f", PREFIX + "/jobs?q=1"),
            (PREFIX + "/a.b/..c/.d", PREFIX + "/a.b/..c/.d"),
            (PREFIX + "/a%20b", PREFIX + "/a%20b"),
        ):
            with self.subTest(path=path):
                self.assertEqual(worker_path_allowed(path, "ws1", "ex1"), forwarded)

    def test_denied(self) -> None:
        """Traversal, encoded separators, empty segments and prefix tricks are refused."""
        for path in (
            PREFIX + "/../../../other",
            PREFIX + "/jobs/../../ex2",
            PREFIX + "/..",
            PREFIX + "/.",
            PREFIX + "/./jobs",
            PREFIX + "/%2e%2e/%2e%2e/ex2",
            PREFIX + "/%2E%2E/ex2",
            PREFIX + "/.%2e/ex2",
            PREFIX + "%2F..%2Fex2",
            PREFIX + "/a%2fb",
            PREFIX + "/a%5cb",
            PREFIX + "/a%5C..%5Cb",
            PREFIX + "\\..\\ex2",
            PREFIX + "//jobs",
            PREFIX + "/jobs//x",
            PREFIX + "x",
            PREFIX + "1/jobs",
            PREFIX + ".evil",
            PREFIX + "/.\t./x",
            PREFIX + "/a\nb",
            PREFIX + "/a b",
            PREFIX + "/é",
            PREFIX + "/jobs?x=1\r\nHost: evil",
            PREFIX + "/jobs?x=a b",
            "/api/runtime/workspaces/ws1/managed-executors/ex2/jobs",
            "/api/runtime/workspaces/ws2/managed-executors/ex1",
            "/api/runtime/workspaces/ws1//managed-executors/ex1",
            "/api/runtime/workspaces/ws1/managed-executors",
            "api/runtime/workspaces/ws1/managed-executors/ex1",
            "",
            "?" + PREFIX,
        ):
            with self.subTest(path=path):
                self.assertIsNone(worker_path_allowed(path, "ws1", "ex1"))

    def test_missing_executor_claim(self) -> None:
        """Without a ``managedExecutorId`` claim every path is refused."""
        self.assertIsNone(worker_path_allowed(PREFIX, "ws1", None))
        self.assertIsNone(worker_path_allowed("/api/runtime/workspaces/ws1/managed-executors/", "ws1", ""))

    def test_prefix_uses_encode_uri_component(self) -> None:
        """Ids in the prefix are encoded like JavaScript's ``encodeURIComponent``."""
        self.assertEqual(encode_uri_component("a b/c!~*'()é"), "a%20b%2Fc!~*'()%C3%A9")
        prefix = "/api/runtime/workspaces/ws%201/managed-executors/ex!(1)"
        self.assertEqual(worker_path_allowed(prefix + "/jobs", "ws 1", "ex!(1)"), prefix + "/jobs")
        raw = "/api/runtime/workspaces/ws 1/managed-executors/ex!(1)"
        self.assertIsNone(worker_path_allowed(raw, "ws 1", "ex!(1)"))


class WorkerHeaderTests(SynchronousTestCase):
    """Header allow-lists for the worker transport (docs/protocol.md §4.8)."""

    def test_allow_list(self) -> None:
        """The forwarded request header names are exactly the eleven of docs/protocol.md §4.8 step 5."""
        self.assertEqual(len(WORKER_FORWARD_HEADERS), 11)
        self.assertIn("x-viewport-worker-body-sha256", WORKER_FORWARD_HEADERS)
        self.assertNotIn("cookie", WORKER_FORWARD_HEADERS)

    def test_request_headers(self) -> None:
        """Allowed names match case-insensitively, keep their spelling and need string values."""
        headers: dict[str, object] = {
            "Authorization": "Bearer t",
            "ACCEPT": "application/json",
            "X-Viewport-Run-Lease": "lease",
            "content-type": 5,
            "Cookie": "a=b",
            "Host": "evil",
            "x-viewport-server-id": "bad\r\nx-injected: 1",
        }
        self.assertEqual(
            filter_worker_request_headers(headers),
            {"Authorization": "Bearer t", "ACCEPT": "application/json", "X-Viewport-Run-Lease": "lease"},
        )

    def test_response_headers(self) -> None:
        """Upstream headers are lower-cased, repeats joined, credentials removed."""
        headers = [
            ("Content-Type", "application/json"),
            ("Set-Cookie", "a=b"),
            ("Cookie", "c=d"),
            ("Authorization", "Bearer t"),
            ("Vary", "Accept"),
            ("vary", "Origin"),
        ]
        self.assertEqual(
            filter_worker_response_headers(headers),
            {"content-type": "application/json", "vary": "Accept, Origin"},
        )


class AllowedChannelsTests(SynchronousTestCase):
    """``allowed_channels`` derives the channel set from the ``sessionChannels`` claim (docs/protocol.md §4.7)."""

    def test_absent(self) -> None:
        """No claim allows no channel."""
        self.assertEqual(allowed_channels(None), frozenset())
        self.assertEqual(allowed_channels([]), frozenset())

    def test_trim_and_filter(self) -> None:
        """Entries are trimmed and kept only when they start with ``agent-session:``."""
        self.assertEqual(
            allowed_channels([" agent-session:a ", "agent-session:b", "workspace:c", "", 7]),
            frozenset({"agent-session:a", "agent-session:b"}),
        )


def _random_value(rng: random.Random, depth: int) -> object:
    kind = rng.randrange(8 if depth else 5)
    if kind == 0:
        return rng.choice([0, 1, -1, 2**53 + 1, 2**63, 2**64 + 5, -(2**70), 10**30])
    if kind == 1:
        return rng.choice([0.5, -2.0, 1e300, 5e-324, 1.0])
    if kind == 2:
        return "".join(rng.choice(["a", "é", "😀", "\\", '"', "\n", "\u2028", "\x00", " "]) for _ in range(rng.randrange(6)))
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4:
        return ""
    if kind in (5, 6):
        return {f"k{rng.randrange(3)}": _random_value(rng, depth - 1) for _ in range(rng.randrange(4))}
    return [_random_value(rng, depth - 1) for _ in range(rng.randrange(4))]

