"""Frames after the upgrade: Hypothesis for structured frames, ``random`` for byte-level abuse."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings, strategies as st

from tests.fuzz.ledger import Ledger
from tests.fuzz.wire import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, ws_frame

MAX_FRAME = 1024 * 1024
CHANNEL = "agent-session:fz"
OTHER_CHANNEL = "agent-session:not-granted"


def frame_text(frame: Dict[str, Any]) -> bytes:
    """A frame as compact JSON text."""
    return json.dumps(frame, separators=(",", ":")).encode()


class Lit(str):
    """JSON text inserted verbatim (NaN, 1e999, deep nesting, ...)."""


class Mark:
    """A string field whose value carries a fresh payload marker."""

    def __init__(self, prefix: str = "", suffix: str = "", identifier: bool = False) -> None:
        self.prefix, self.suffix, self.identifier = prefix, suffix, identifier


DROP = Lit("")
WEIRD_LITERALS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "-0", "0.0", "1.0", "2.0", "1E+2", "0.5",
                  "9" * 400, "1" + "0" * 5000, "-" + "9" * 30, "1.7976931348623157e309", "5e-324", "true", "false",
                  "null", "[]", "{}", '"\\ud800"', '"\\u0000"', '"\\udfff\\ud800"', '"agent-session:\\ud83d"',
                  '" e2ee "', '"E2EE"', "[1,", '"\\x"', "01", "+1", ".5", "0x10"]
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def _weird() -> Any:
    return st.one_of(
        st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from(WEIRD_LITERALS).map(Lit), st.text(max_size=12),
        st.sampled_from(["", " ", "\t\n", "\u00a0", "\ufeff", "\u2028", "a" * 300]),
        st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
        st.integers(1, 3000).map(lambda n: Lit("[" * n + "]" * n)),
    )


def _blob() -> Any:
    return st.builds(Mark, st.text(alphabet=_B64, max_size=8), st.sampled_from(["", "==", " "]))


def _positive() -> Any:
    return st.one_of(st.integers(1, 2 ** 53), st.sampled_from([Lit("1.0"), Lit("3e2")]))


_REQUEST_IDS = ["r1", " r1", "r1 ", "r2", "", " ", "r\u00a0", "r" * 300]
_SESSION_IDS = ["s1", " s1 ", "s2", "s3", "", "\u2028"]
_CHANNELS = [CHANNEL, " " + CHANNEL + " ", OTHER_CHANNEL, "agent-session:", "agent-session: ", "x" + CHANNEL, CHANNEL + "\n"]


def _kinds() -> Dict[str, Dict[str, Any]]:
    rid = st.one_of(st.sampled_from(_REQUEST_IDS), st.builds(Mark, st.just("r-"), st.just(""), st.just(True)))
    sid = st.one_of(st.sampled_from(_SESSION_IDS), st.builds(Mark, st.just("s-"), st.just(""), st.just(True)))
    prof = st.sampled_from(["noise-ik", "noise-ikpsk2"])
    chan = st.sampled_from(_CHANNELS)
    blob = _blob()
    return {
        "e2ee": {"type": st.just("e2ee"), "version": st.just(2), "profile": prof, "sessionId": sid, "epoch": _positive(),
                 "seq": _positive(), "iv": blob, "tag": blob, "ciphertext": blob},
        "kex3": {"type": st.just("relay_key_exchange_init"), "version": st.just(3), "profile": prof, "requestId": rid,
                 "clientEphemeralPublicKey": blob, "encryptedClientStatic": blob, "pairingPeerId": blob, "previousSessionId": sid},
        "kex2": {"type": st.just("relay_key_exchange_init"), "version": st.just(2), "profile": prof, "requestId": rid,
                 "clientPublicKey": blob, "clientNonce": blob, "clientProof": blob, "pairingPeerId": blob},
        "offer": {"type": st.just("relay_pairing_offer_request"), "requestId": rid, "clientChannelPublicKey": blob,
                  "ttlSeconds": st.integers(0, 4000)},
        "redeem": {"type": st.just("relay_pairing_redeem_request"), "requestId": rid, "offerId": blob, "encIv": blob,
                   "encTag": blob, "encCiphertext": blob},
        "subscribe": {"type": st.just("viewport.session_events.subscribe/v1"), "channel": chan,
                      "afterSequence": st.integers(-1, 2 ** 64)},
        "unsubscribe": {"type": st.just("viewport.session_events.unsubscribe/v1"), "channel": chan},
        "presence": {"type": st.just("viewport.session_viewer_presence/v1"), "channel": chan,
                     "action": st.sampled_from(["joined", "left", "heartbeat", "kicked"]),
                     "userId": st.builds(Mark, st.just("u-"), st.just(""), st.just(True)), "displayName": blob, "sentAt": st.just("2024-01-01T00:00:00Z")},
        "worker": {"type": st.just("viewport.worker_transport.request/v1"), "requestId": rid,
                   "method": st.sampled_from(["GET", "POST", "PATCH", "DELETE", "get"]),
                   "path": st.sampled_from(["/api/runtime/workspaces/fz/managed-executors/fzexec/x",
                                            "/api/runtime/workspaces/fz/managed-executors/fzexec/../../other",
                                            "/api/runtime/workspaces/fz/managed-executors/fzexec%2f..", "/etc/passwd",
                                            "/api/runtime/workspaces/fz/managed-executors/fzexec/\u00e9",
                                            "/api/runtime/workspaces/fz/managed-executors/fzexec\\x"]),
                   "headers": st.dictionaries(st.sampled_from(["authorization", "cookie", "x-viewport-run-lease", "host"]),
                                              st.one_of(blob, st.sampled_from(["a\r\nb", 5, None])), max_size=3),
                   "body": blob},
        "kexresp3": {"type": st.just("relay_key_exchange_response"), "version": st.just(3), "profile": prof,
                     "requestId": rid, "daemonPublicKey": blob, "daemonEphemeralPublicKey": blob, "encryptedMetadata": blob,
                     "sessionId": sid, "proof": blob, "epoch": _positive()},
        "kexresp2": {"type": st.just("relay_key_exchange_response"), "version": st.just(2), "profile": prof,
                     "requestId": rid, "daemonNonce": blob, "sessionId": sid, "proof": blob, "epoch": st.floats(0, 10)},
        "keyupdate": {"type": st.just("relay_key_update_required"), "sessionId": sid, "nextEpoch": _positive()},
        "offerresp": {"type": st.just("relay_pairing_offer_response"), "requestId": rid, "ok": st.booleans(),
                      "errorCode": blob, "daemonChannelPublicKey": blob, "encIv": blob, "encTag": blob, "encCiphertext": blob},
        "redeemresp": {"type": st.just("relay_pairing_redeem_response"), "requestId": rid, "ok": st.booleans(), "errorCode": blob},
        "event": {"schema": st.just("viewport.session_event_relay_frame/v1"), "channel": chan,
                  "event": st.fixed_dictionaries({"sequence": st.integers(0, 9), "kind": st.just("message"), "text": blob})},
    }


CLIENT_KINDS = ["e2ee", "kex3", "kex2", "offer", "redeem", "subscribe", "unsubscribe", "presence", "worker"]
DAEMON_KINDS = ["e2ee", "kexresp3", "kexresp2", "keyupdate", "offerresp", "redeemresp", "event"]


def structured_frames() -> Any:
    """A Hypothesis strategy of (kind, fields, mutations, style): a frame to encode with ``encode_frame``."""
    kinds = _kinds()

    def for_kind(kind: str) -> Any:
        fields = kinds[kind]
        names = sorted(fields) + ["__extra__"]
        mutation = st.tuples(st.sampled_from(names), st.one_of(st.just(DROP), _weird()))
        return st.tuples(st.just(kind), st.fixed_dictionaries(fields),
                         st.one_of(st.just([]), st.lists(mutation, min_size=1, max_size=3)),
                         st.sampled_from(["compact", "spaced", "dup-last-wins", "dup-first", "padded", "ascii"]))

    return st.sampled_from(sorted(kinds)).flatmap(for_kind)


def draw(strategy: Any, seed: int, count: int) -> List[Any]:
    """``count`` examples of ``strategy``, the same ones for the same seed (Hypothesis ``@seed``, no database)."""
    out: List[Any] = []

    @hypothesis_seed(seed)
    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example: Any) -> None:
        out.append(example)

    collect()
    return out


def encode_frame(example: Any, ledger: Ledger, rng: random.Random) -> Tuple[str, str]:
    """The (label, JSON text) of a drawn frame, markers filled in; the text may be invalid JSON on purpose."""
    kind, fields, mutations, style = example
    pairs: List[Tuple[str, Any]] = list(fields.items())
    for name, value in mutations:
        if name == "__extra__":
            pairs.append((rng.choice(["extra", "__proto__", "constructor", "type", ""]), value))
        elif value is DROP:
            pairs = [(k, v) for k, v in pairs if k != name]
        else:
            pairs = [(k, value if k == name else v) for k, v in pairs]
    if style.startswith("dup") and pairs:
        name, value = rng.choice(pairs)
        extra = (name, Lit(rng.choice(['"x"', "null", "0", "[]"])))
        pairs = [extra] + pairs if style == "dup-last-wins" else pairs + [extra]
    sep = (", ", ": ") if style == "spaced" else (",", ":")

    def enc(value: Any) -> str:
        if isinstance(value, Lit):
            return str(value)
        if isinstance(value, Mark):
            return json.dumps(value.prefix + ledger.marker(kind, value.identifier) + value.suffix)
        if isinstance(value, dict):
            return "{" + sep[0].join(json.dumps(k) + sep[1] + enc(v) for k, v in value.items()) + "}"
        if isinstance(value, list):
            return "[" + sep[0].join(enc(v) for v in value) + "]"
        return json.dumps(value, ensure_ascii=style == "ascii")

    text = "{" + sep[0].join(json.dumps(k) + sep[1] + enc(v) for k, v in pairs) + "}"
    if style == "padded":
        text = rng.choice([" ", "\n", "\t\r\n"]) + text + rng.choice([" ", "\n\n", "\t"])
    label = f"{kind}/{style}" + ("" if not mutations else "/" + ",".join(n for n, _ in mutations))
    return label, text


@dataclass
class FrameCase:
    """Wire bytes for one sender, the complete messages they carry, and the acceptable close codes."""

    label: str
    sender: str
    wire: bytes
    messages: List[Tuple[int, bytes]]
    closes: FrozenSet[Optional[int]] = frozenset({None, 4008})


def byte_cases(rng: random.Random, ledger: Ledger, valid_text: Callable[[], bytes]) -> FrameCase:
    """One byte-level case (sender filled in by the caller): protocol abuse, encodings, sizes."""
    key = lambda: bytes(rng.getrandbits(8) for _ in range(4))  # noqa: E731
    frame = lambda payload, op=OP_TEXT, **kw: ws_frame(payload, op, key=key(), **kw)  # noqa: E731
    mark = lambda what: ledger.marker(what).encode()  # noqa: E731
    text = valid_text()
    choice = rng.randrange(31)
    P, U, N = frozenset({1002}), frozenset({1007}), frozenset({None, 4008})
    # An invalid close frame makes Autobahn drop the TCP connection (RST) without a close frame of its own.
    BAD_CLOSE = frozenset({1002, 1006})
    if choice == 0:
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 2000)))
        return FrameCase("random-bytes-text", "", frame(data), [(OP_TEXT, data)], frozenset({None, 1007, 4008}))
    if choice == 1:
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 2000)))
        return FrameCase("random-bytes-binary", "", frame(data, OP_BINARY), [(OP_BINARY, data)], N)
    if choice == 2:
        cut = text[: rng.randrange(1, len(text))]
        return FrameCase("truncated-json", "", frame(cut), [(OP_TEXT, cut)], frozenset({None, 1007, 4008}))
    if choice == 3:
        depth = rng.choice([100, 1000, 5000, 100000, 400000])
        opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        data = opener * depth + b"1" + closer * depth
        return FrameCase(f"deep-nesting-{depth}", "", frame(data), [(OP_TEXT, data)], N if len(data) <= MAX_FRAME else frozenset({1009}))
    if choice == 4:
        bad = rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80"])
        at = rng.randrange(len(text))
        data = text[:at] + bad + text[at:]
        return FrameCase(f"invalid-utf8-{bad.hex()}", "", frame(data), [(OP_TEXT, data)], U)
    if choice == 5:  # valid UTF-8 split across fragments
        data = text[:-2] + "\u00e9\u20ac".encode() + text[-2:]
        at = len(text) - 1
        wire = frame(data[:at], fin=False) + frame(data[at:], OP_CONT)
        return FrameCase("utf8-split-fragments", "", wire, [(OP_TEXT, data)], N)
    if choice == 6:
        size = MAX_FRAME + rng.randint(1, 4096)
        return FrameCase(f"oversize-{size}", "", frame(b"x" * size), [], frozenset({1009}))
    if choice == 7:
        part = MAX_FRAME // 2 + 10
        wire = frame(b"[" * part, fin=False) + frame(b"]" * part, OP_CONT)
        return FrameCase("oversize-fragmented", "", wire, [], frozenset({1009}))
    if choice == 8:
        data = b"\xff" * rng.randint(350_000, 400_000)
        return FrameCase("binary-grows-past-limit", "", frame(data, OP_BINARY), [(OP_BINARY, data)], frozenset({1009}))
    if choice == 9:
        return FrameCase("binary-valid-frame", "", frame(text, OP_BINARY), [(OP_BINARY, text)], N)
    if choice == 10:
        parts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(2, 6))))
        pieces = [text[a:b] for a, b in zip([0] + parts, parts + [len(text)])]
        wire = b""
        for i, piece in enumerate(pieces):
            wire += frame(piece, OP_TEXT if i == 0 else OP_CONT, fin=i == len(pieces) - 1)
            if rng.random() < 0.5 and i < len(pieces) - 1:
                wire += frame(mark("ping-between-fragments"), OP_PING)
        return FrameCase(f"fragmented-{len(pieces)}", "", wire, [(OP_TEXT, text)], N)
    if choice == 11:
        return FrameCase("continuation-without-start", "", frame(text, OP_CONT), [], P)
    if choice == 12:
        return FrameCase("data-during-fragmented", "", frame(text[:5], fin=False) + frame(text), [], P)
    if choice == 13:
        return FrameCase("fragmented-ping", "", frame(b"p", OP_PING, fin=False), [], P)
    if choice == 14:
        return FrameCase("ping-too-long", "", frame(b"p" * rng.randint(126, 400), OP_PING), [], P)
    if choice == 15:
        return FrameCase("ping-marker", "", frame(mark("ping"), OP_PING), [], N)
    if choice == 16:
        return FrameCase("unsolicited-pong", "", frame(mark("pong") + b"\xff\x00", OP_PONG), [], N)
    if choice == 17:
        code = rng.choice([0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
        return FrameCase(f"close-invalid-code-{code}", "", frame(code.to_bytes(2, "big") + mark("close-reason"), OP_CLOSE), [], BAD_CLOSE)
    if choice == 18:
        code = rng.choice([1000, 1001, 3000, 4000, 4999])
        return FrameCase(f"close-{code}-marker-reason", "", frame(code.to_bytes(2, "big") + mark("close-reason"), OP_CLOSE), [],
                         frozenset({code, 1000}))
    if choice == 19:
        return FrameCase("close-one-byte", "", frame(b"\x03", OP_CLOSE), [], BAD_CLOSE)
    if choice == 20:
        return FrameCase("close-bad-utf8-reason", "", frame(b"\x03\xe8\xff\xfe" + mark("close-reason"), OP_CLOSE), [],
                         BAD_CLOSE | {1007})
    if choice == 21:
        return FrameCase("close-too-long", "", frame(b"\x03\xe8" + b"r" * 200, OP_CLOSE), [], BAD_CLOSE)
    if choice == 22:
        rsv = rng.randint(1, 7)
        return FrameCase(f"rsv-{rsv}", "", frame(text, rsv=rsv), [], P)
    if choice == 23:
        op = rng.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
        return FrameCase(f"reserved-opcode-{op:#x}", "", frame(text, op), [], P)
    if choice == 24:
        return FrameCase("unmasked", "", ws_frame(text, masked=False), [], P)
    if choice == 25:
        return FrameCase("length-msb-set", "", ws_frame(b"x", length=2 ** 63 + 5, key=key()), [], frozenset({1002, 1009}))
    if choice == 26:
        return FrameCase("empty-text", "", frame(b""), [(OP_TEXT, b"")], N)
    if choice == 27:
        data = rng.choice([b"[]", b'"e2ee"', b"1", b"null", b"\xef\xbb\xbf{}", b"{} {}", b"{}\x00", b"{\"type\":\"e2ee\"}x"])
        return FrameCase(f"not-an-object-{data[:8]!r}", "", frame(data), [(OP_TEXT, data)], N)
    if choice == 28:
        burst = [valid_text() for _ in range(rng.randint(10, 100))]
        return FrameCase(f"burst-{len(burst)}", "", b"".join(frame(t) for t in burst), [(OP_TEXT, t) for t in burst], N)
    if choice == 30:  # a huge id in an otherwise valid frame: it must not be copied into a log line whole
        huge = ledger.marker("huge-id", True) + "i" * rng.randint(5_000, 200_000)
        data = rng.choice([
            frame_text({"type": "relay_key_exchange_response", "version": 3, "profile": "noise-ik", "requestId": huge,
                        "daemonPublicKey": "d", "daemonEphemeralPublicKey": "e", "encryptedMetadata": "m", "sessionId": huge,
                        "proof": "p", "epoch": 1}),
            frame_text({"type": "relay_pairing_offer_response", "requestId": huge, "ok": False, "errorCode": huge}),
            frame_text({"type": "relay_key_exchange_init", "version": 3, "profile": "noise-ik", "requestId": huge,
                        "clientEphemeralPublicKey": "e", "encryptedClientStatic": "s"}),
            frame_text({"type": "e2ee", "version": 2, "profile": "noise-ik", "sessionId": huge, "epoch": 1, "seq": 1,
                        "iv": "i", "tag": "t", "ciphertext": "c"}),
            frame_text({"type": "viewport.session_events.subscribe/v1", "channel": CHANNEL + huge}),
        ])
        return FrameCase(f"huge-id-{len(huge)}", "", frame(data), [(OP_TEXT, data)], N)
    big = b'{"type":"e2ee","version":2,"profile":"noise-ik","sessionId":"s1","epoch":1,"seq":1,"iv":"i","tag":"t","ciphertext":"'
    pad = MAX_FRAME - len(big) - 2 - 15
    data = big + mark("max-size-ciphertext") + b"A" * pad + b'"}'
    return FrameCase("envelope-exactly-max", "", frame(data), [(OP_TEXT, data)], N)
