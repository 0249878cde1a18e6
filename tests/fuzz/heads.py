"""Upgrade heads: every kind of request head the relay reads, each with the outcomes the spec allows."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

from tests.fuzz.tokens import Tokens
from tests.fuzz.wire import build_head, ws_frame, ws_target

#: The relay's origin allow-list during a fuzz run (docs/protocol.md §2.8), and origins on either side of it.
ALLOWED_ORIGINS = "https://app.example,https://*.example.org,null"
GOOD_ORIGINS = ["https://app.example", "HTTPS://App.Example", "https://app.example:443", "https://a.example.org",
                "https://a.b.example.org:8443", "null"]
BAD_ORIGINS = ["https://example.org", "http://app.example", "https://app.example:444", "https://app.example.evil",
               "https://evilexample.org", "https://a.example.org.evil", "http://a.example.org", "file://",
               "https://evil.example"]
#: Origins with ``.example.org`` past the host (in a path, a query, a fragment, after a backslash):
#: ``https://*.example.org`` must not match them.
PAST_HOST_ORIGINS = ["https://evil.example/.example.org", "https://evil.example?.example.org",
                     "https://evil.example#.example.org", "https://evil.example\\.example.org"]
ODD_ORIGINS = ["", "\xff\xfe", "x" * 8000, "null, null", "http://[::1", "https://app.example/", "NULL", "https://app.example\x00"]
MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 10.0


def expected_echo(offers: Sequence[str]) -> Optional[str]:
    """The subprotocol §2.7 says the relay echoes for these offers (docs/protocol.md §2.7)."""
    entries = [o.strip() for o in offers if o.strip()]
    for entry in entries:
        if not entry.startswith("auth."):
            return entry
    return entries[0] if entries else None


@dataclass
class HeadCase:
    """One upgrade attempt: bytes in chunks, what outcomes are acceptable, how long to wait."""

    name: str
    chunks: List[bytes]
    expect: Optional[FrozenSet[Any]] = None  # statuses (int) or "drop"; None: anything but a 5xx
    gap: float = 0.0
    wait: float = 5.0
    slow: bool = False
    offers: Optional[List[str]] = None  # subprotocols offered, to check the echo of a 101
    after: FrozenSet[Optional[int]] = frozenset({None})  # close codes acceptable right after a 101


def _pad_headers(rng: random.Random, total: int) -> List[Tuple[str, str]]:
    pads: List[Tuple[str, str]] = []
    left = total
    while left > 0:
        size = min(left, rng.choice([100, 4000, 8000, 30000]))
        pads.append((f"X-Fz-Pad-{len(pads)}", "a" * size))
        left -= size + 16
    return pads


def head_cases(rng: random.Random, tokens: Tokens, workspace: str, target: str, count: int) -> List[HeadCase]:
    """``count`` upgrade attempts drawn by ``rng`` across every kind of head the relay reads."""
    gens: List[Tuple[int, Callable[[], HeadCase]]] = []

    def add(weight: int) -> Callable[[Callable[[], HeadCase]], Callable[[], HeadCase]]:
        def register(fn: Callable[[], HeadCase]) -> Callable[[], HeadCase]:
            gens.append((weight, fn))
            return fn
        return register

    role = lambda: rng.choice(["client", "workspace-daemon", "worker"])  # noqa: E731
    tgt = lambda r: ws_target(r, workspace, target, **({"probe": "1"} if rng.random() < 0.1 else {}))  # noqa: E731

    @add(6)
    def oversize() -> HeadCase:
        size = rng.randint(15 * 1024, 70 * 1024)
        r = role()
        head = build_head(tgt(r), [("Authorization", "Bearer " + tokens.valid(r, workspace, target, "oversize"))]
                          + _pad_headers(rng, size))
        pieces = rng.random() < 0.5
        chunks = [head]
        if pieces:
            cuts = sorted(rng.sample(range(1, len(head)), rng.randint(2, 12)))
            chunks = [head[a:b] for a, b in zip([0] + cuts, cuts + [len(head)])]
        if rng.random() < 0.3:  # never terminated
            chunks[-1] = chunks[-1][:-4]
        terminated = chunks[-1].endswith(b"\r\n\r\n")
        # Past 16 KiB the relay answers 431 and closes while more is still arriving: the client may
        # then see a reset before it reads the 431.
        expect = frozenset({431, "drop"}) if len(head) > MAX_HEAD else frozenset({101}) if terminated else frozenset({"drop"})
        return HeadCase(f"oversize-{len(head)}-{'pieces' if pieces else 'single'}{'' if terminated else '-unterminated'}",
                        chunks, expect, gap=0.002 if pieces else 0.0, slow=not terminated and len(head) <= MAX_HEAD,
                        wait=HEAD_TIMEOUT + 4 if not terminated else 5.0)

    @add(6)
    def request_line() -> HeadCase:
        r = role()
        auth = [("Authorization", "Bearer " + tokens.valid(r, workspace, target, "request-line"))]
        t = tgt(r)
        options: List[Tuple[str, Set[Any]]] = [
            (f"GET {t}", {400}), (f"GET  {t} HTTP/1.1", {400}), (f"GET {t} HTTP/1.1 x", {400}), ("", {400}),
            (f"GET {t} HTTP/1.0", {505}), (f"GET {t} HTTP/2.0", {505}), (f"GET {t} HTTP/1.1\x00", {400, 505}),
            (f"get {t} HTTP/1.1", {405}), (f"POST {t} HTTP/1.1", {405}), (f"HEAD {t} HTTP/1.1", {405}),
            (f"PUT {t} HTTP/1.1", {405}), (f"OPTIONS {t} HTTP/1.1", {405}), (f"CONNECT {t} HTTP/1.1", {405}),
            (f"{'G' * rng.randint(50, 3000)} {t} HTTP/1.1", {405}), (f"GET http://127.0.0.1{t} HTTP/1.1", {101, 400, "drop"}),
            (f"GET /WS{t[3:]} HTTP/1.1", {"drop"}), (f"GET /ws/{t[3:]} HTTP/1.1", {"drop"}), (f"GET //ws{t[3:]} HTTP/1.1", {"drop"}),
            (f"GET /ws%00{t[3:]} HTTP/1.1", {"drop"}), ("GET * HTTP/1.1", {"drop"}),
            (f"GET {t}#frag HTTP/1.1", {101, 400}), (f"GET {t}\xff\xfe HTTP/1.1", {101, 400}),
            ("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 x y", {400, "drop"}),
        ]
        line, expect = rng.choice(options)
        return HeadCase(f"request-line:{line[:40]!r}", [build_head(t, auth, request_line=line)], frozenset(expect))

    @add(6)
    def headers() -> HeadCase:
        r = role()
        tok = tokens.valid(r, workspace, target, "headers")
        t = tgt(r)
        auth = ("Authorization", "Bearer " + tok)
        options: List[Tuple[str, List[Tuple[str, str]], Any, Dict[str, Any]]] = [
            ("no-colon", [auth, ("X-Broken", "")], {400}, {"raw": "X-Broken-Without-Colon"}),
            ("obs-fold", [auth, ("X-Fold", "a\r\n\tcontinued")], {101, 400}, {}),
            ("nul-in-value", [auth, ("X-Nul", "a\x00b")], {101, 400}, {}),
            ("latin1-value", [auth, ("X-Bytes", "\xff\xfe\x85")], {101, 400}, {}),
            ("nel-separator", [("X-A", "a\x85Sec-WebSocket-Protocol: auth.x"), auth], {101, 400}, {}),
            ("vt-ff-separators", [("X-A", "a\x0b\x0cUpgrade: h2c"), auth], {101, 400}, {}),
            ("bare-cr", [("X-A", "a\rAuthorization: Bearer x"), auth], {101, 400, 401}, {}),
            ("space-before-colon", [("Authorization ", "Bearer " + tok)], {101, 400}, {}),
            ("empty-name", [(":", "x"), auth], {101, 400}, {}),
            ("many-headers", [auth] + [(f"X-{i}", "v") for i in range(rng.randint(100, 1400))], None, {}),
            ("no-host", [auth], {400}, {"drop_line": "Host"}),
            ("two-hosts", [auth, ("Host", "evil.example")], {101, 400}, {}),
            ("no-upgrade-value", [auth], {400, 404}, {"replace": ("Upgrade: websocket", "Upgrade: h2c")}),
            ("no-upgrade-header", [auth], {404}, {"drop_line": "Upgrade"}),
            ("connection-close", [auth], {400}, {"replace": ("Connection: Upgrade", "Connection: close")}),
            ("connection-list", [auth], {101}, {"replace": ("Connection: Upgrade", "Connection: keep-alive, Upgrade")}),
            ("two-upgrade", [auth, ("Upgrade", "websocket")], {101, 400}, {}),
            ("two-keys", [auth, ("Sec-WebSocket-Key", "AQIDBAUGBwgJCgsMDQ4PEA==")], {400}, {}),
            ("x-forwarded-for", [auth, ("X-Forwarded-For", rng.choice(["", ",", "1.2.3.4, 5.6.7.8", "::ffff:1.2.3.4", "x" * 3000, "\xff"]))], {101}, {}),
            ("compression-offer", [auth, ("Sec-WebSocket-Extensions", rng.choice(["permessage-deflate; client_max_window_bits", "permessage-deflate; server_max_window_bits=99", "x-webkit-deflate-frame", ";;;,=", "permessage-deflate; a=\"\xff\""]))], {101, 400}, {}),
            ("origin-allowed", [auth, ("Origin", rng.choice(GOOD_ORIGINS))], {101}, {}),
            ("origin-refused", [auth, ("Origin", rng.choice(BAD_ORIGINS))], {403}, {}),
            ("origin-odd", [auth, ("Origin", rng.choice(ODD_ORIGINS))], {101, 400, 403}, {}),
            ("origin-wildcard-past-host", [auth, ("Origin", rng.choice(PAST_HOST_ORIGINS))], {400, 403}, {}),
            ("origin-refused-no-token", [("Origin", rng.choice(BAD_ORIGINS))], {403}, {}),
            ("two-origins", [auth, ("Origin", "null"), ("Origin", "https://a.example.org")], {400, 403}, {}),
        ]
        name, hdrs, expect, how = rng.choice(options)
        head = build_head(t, hdrs).decode("latin-1")
        if "raw" in how:
            head = head.replace("X-Broken: ", how["raw"])
        if "drop_line" in how:
            head = "\r\n".join(l for l in head.split("\r\n") if not l.startswith(how["drop_line"] + ":"))
        if "replace" in how:
            head = head.replace(*how["replace"])
        if len(head) > MAX_HEAD:
            expect = {431}
        offers: Optional[List[str]] = [] if name != "nel-separator" else None
        return HeadCase(f"header:{name}", [head.encode("latin-1")], frozenset(expect) if expect else None, offers=offers)

    @add(6)
    def duplicates() -> HeadCase:
        r = "client"
        tok = tokens.valid(r, workspace, target, "duplicate")
        other = tokens.valid(r, workspace, target, "duplicate-other")
        t = tgt(r)
        options = [
            ("two-protocol-headers-same-auth", [("Sec-WebSocket-Protocol", f"auth.{tok}"), ("Sec-WebSocket-Protocol", f"auth.{tok}")], {400}),
            ("one-protocol-header-auth-twice", [("Sec-WebSocket-Protocol", f"auth.{tok}, auth.{tok}")], {400}),
            ("protocol-plain-twice", [("Sec-WebSocket-Protocol", f"viewport-relay-v1, viewport-relay-v1, auth.{tok}")], {400}),
            ("two-protocol-headers-different", [("Sec-WebSocket-Protocol", f"auth.{tok}"), ("Sec-WebSocket-Protocol", f"auth.{other}")], {101}),
            ("two-authorization-same", [("Authorization", f"Bearer {tok}"), ("Authorization", f"Bearer {tok}")], {401}),
            ("two-authorization-different", [("Authorization", f"Bearer {tok}"), ("Authorization", f"Bearer {other}")], {401}),
            ("two-versions", [("Authorization", f"Bearer {tok}"), ("Sec-WebSocket-Version", "13")], {400}),
            # Two empty entries are a duplicate "" to Autobahn (docs/protocol.md §2.3 step 8); a single one is skipped (§2.2).
            ("two-empty-protocol-entries", [("Sec-WebSocket-Protocol", f"viewport-relay-v1, , ,auth.{tok}")], {400}),
        ]
        name, hdrs, expect = rng.choice(options)
        offers = [o for n, v in hdrs if n == "Sec-WebSocket-Protocol" for o in v.split(",")]
        return HeadCase(f"duplicate:{name}", [build_head(t, hdrs)], frozenset(expect), offers=offers)

    @add(4)
    def key_version() -> HeadCase:
        r = role()
        auth = [("Authorization", "Bearer " + tokens.valid(r, workspace, target, "key-version"))]
        t = tgt(r)
        keys: List[Tuple[Optional[str], Any]] = [
            (None, {400}), ("", {400}), ("short", {400}), ("dGhlIHNhbXBsZSBub25jZQ", {400}), ("!" * 24, {400}),
            ("dGhlIHNhbXBsZSBub25jZQ==" * 3, {400}), ("AAAAAAAAAAAAAAAAAAAAAA==", {101}), (" dGhlIHNhbXBsZSBub25jZQ== ", {101, 400}),
        ]
        versions = [("0", {400}), ("12", {400}), ("14", {400}), ("8", {101}), ("13, 13", {400}), ("abc", {400}),
                    ("", {400}), ("-13", {400}), ("130000000000000000000", {400})]
        if rng.random() < 0.5:
            key, expect = rng.choice(keys)
            return HeadCase(f"key:{key!r}", [build_head(t, auth, key=key)], frozenset(expect))
        version, expect = rng.choice(versions)
        head = build_head(t, auth).replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: " + version.encode())
        return HeadCase(f"version:{version!r}", [head], frozenset(expect))

    @add(12)
    def token_sources() -> HeadCase:
        r = role()
        if rng.random() < 0.35:
            label, tok, expect = "valid", tokens.valid(r, workspace, target, "source"), frozenset({101})
        else:
            label, tok, expect = tokens.forged(r, workspace, target)
        after: FrozenSet[Optional[int]] = frozenset({4008}) if label == "workspace-mismatch" else frozenset({None})
        if label == "wrong-type-claim":
            after = frozenset({None, 4008})
        usable = 10 <= len(tok.strip()) <= 4096
        source = rng.choice(["bearer", "bearer-variant", "subprotocol", "subprotocol-with-plain", "query", "all-three"])
        hdrs: List[Tuple[str, str]] = []
        extra: Dict[str, str] = {}
        offers: List[str] = []
        if source == "bearer":
            hdrs.append(("Authorization", f"Bearer {tok}"))
        elif source == "bearer-variant":
            scheme = rng.choice(["bearer ", "BEARER\t", "Bearer   ", "Basic ", "Token ", "Bearer", "Bearer\x0b"])
            hdrs.append(("Authorization", scheme + tok))
            if not re.fullmatch(r"(?i)bearer\s+", scheme):
                expect = frozenset({401})
            if "\x0b" in scheme:  # Autobahn refuses a vertical tab in a header value
                expect = frozenset({400})
        elif source in ("subprotocol", "subprotocol-with-plain"):
            offers = [f"auth.{tok}"] if source == "subprotocol" else ["viewport-relay-v1", f"auth.{tok}"]
            if rng.random() < 0.3:
                offers.insert(rng.randint(0, len(offers)), rng.choice(["", " "]))
            hdrs.append(("Sec-WebSocket-Protocol", ",".join(offers)))
            if "," in tok or " " in tok:
                expect = frozenset({101, 400, 401})
        elif source == "query":
            extra["token"] = tok
        else:
            hdrs.append(("Authorization", f"Bearer {tok}"))
            offers = [f"auth.{tok}"]
            hdrs.append(("Sec-WebSocket-Protocol", offers[0]))
            extra["token"] = tok
        if not usable:
            expect = frozenset({401})
        if expect == frozenset({401}):
            after = frozenset({None})
        head = build_head(ws_target(r, workspace, target, **extra), hdrs)
        if len(head) > MAX_HEAD:
            expect, after = frozenset({431}), frozenset({None})
        return HeadCase(f"token:{label}@{source}", [head], expect, offers=offers, after=after)

    @add(5)
    def query() -> HeadCase:
        r = role()
        auth = [("Authorization", "Bearer " + tokens.valid(r, workspace, target, "query"))]
        options = [
            ("/ws", {400}), ("/ws?", {400}), ("/ws?role=client", {400}), (f"/ws?role=admin&workspaceId={workspace}", {400}),
            (f"/ws?role={r}&workspaceId=", {400}), (f"/ws?role={r}&workspaceId={'a' * 129}", {400}),
            (f"/ws?role={r}&workspaceId={workspace}&runtimeTargetId=", {400}),
            (f"/ws?role={r}&workspaceId=a%2Fb", {400}), (f"/ws?role={r}&workspaceId=%ff%fe", {400}),
            (f"/ws?role={r}&workspaceId={workspace}&workspaceId=other&runtimeTargetId={target}", {101}),
            (f"/ws?role={r}&role=client&workspaceId={workspace}&runtimeTargetId={target}", {101}),
            (f"/ws?workspaceId={workspace}&runtimeTargetId={target}&role={r}&" + "&".join(f"p{i}=x" for i in range(500)), {101}),
            (f"/ws?role={r}&workspaceId={workspace}&runtimeTargetId={target}&redirect=http", {101}),
            (f"/ws?role={r};workspaceId={workspace}", {400}), (f"/ws?role=%00&workspaceId={workspace}", {400}),
        ]
        path, expect = rng.choice(options)
        return HeadCase(f"query:{path[:50]}", [build_head(path, auth)], frozenset(expect))

    @add(3)
    def slowloris() -> HeadCase:
        r = role()
        head = build_head(tgt(r), [("Authorization", "Bearer " + tokens.valid(r, workspace, target, "slowloris"))])
        kind = rng.choice(["held", "trickle", "lf-only"])
        if kind == "held":
            chunks, gap = [head[: rng.randint(1, len(head) - 4)]], 0.0
        elif kind == "trickle":
            chunks, gap = [head[i: i + 8] for i in range(0, len(head), 8)], 0.6
        else:
            chunks, gap = [head.replace(b"\r\n", b"\n")], 0.0
        return HeadCase(f"slowloris:{kind}", chunks, frozenset({"drop"}), gap=gap, wait=HEAD_TIMEOUT + 4, slow=True)

    @add(3)
    def plain_http() -> HeadCase:
        tok = tokens.valid("client", workspace, target, "plain-http")
        options = [
            (f"GET /health?token={tok} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", {200}),
            (f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nConnection: close\r\n\r\n", {401}),
            (f"GET /logs HTTP/1.1\r\nHost: x\r\nX-Relay-Admin-Token: {tok}\r\nConnection: close\r\n\r\n", {401}),
            (f"POST /state?token={tok} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello", {404}),
            (f"GET /ws?role=client&workspaceId=w&token={tok} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", {404}),
            ("GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + build_head(ws_target("client", workspace, target), [("Authorization", f"Bearer {tok}")]).decode(), {200}),
        ]
        text, expect = rng.choice(options)
        return HeadCase(f"plain-http:{text[:30]!r}", [text.encode()], frozenset(expect), wait=2.0)

    @add(5)
    def random_head() -> HeadCase:
        r = role()
        tok = tokens.valid(r, workspace, target, "random-head")
        lines = build_head(tgt(r), [("Authorization", f"Bearer {tok}")]).split(b"\r\n")[:-2]
        kind = rng.choice(["bytes", "shuffle", "mutate", "pipelined"])
        if kind == "bytes":
            head = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000))) + b"\r\n\r\n"
        elif kind == "shuffle":
            rest = lines[1:]
            rng.shuffle(rest)
            head = b"\r\n".join([lines[0]] + rest) + b"\r\n\r\n"
        elif kind == "mutate":
            raw = bytearray(b"\r\n".join(lines) + b"\r\n\r\n")
            for _ in range(rng.randint(1, 8)):
                raw[rng.randrange(len(raw) - 4)] = rng.getrandbits(8)
            head = bytes(raw)
        else:
            frame = ws_frame(b'{"type":"e2ee","version":2,"profile":"noise-ik","sessionId":"s","epoch":1,"seq":1,'
                             b'"iv":"i","tag":"t","ciphertext":"' + tokens.ledger.marker("pipelined").encode() + b'"}')
            head = b"\r\n".join(lines) + b"\r\n\r\n" + frame * rng.randint(1, 3)
        return HeadCase(f"random-head:{kind}", [head], None)

    total = sum(w for w, _ in gens)
    cases: List[HeadCase] = []
    for _ in range(count):
        pick = rng.uniform(0, total)
        for weight, fn in gens:
            pick -= weight
            if pick <= 0:
                cases.append(fn())
                break
        else:
            cases.append(gens[-1][1]())
    return cases
