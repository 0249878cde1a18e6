"""What the routing tests share: a router over a recording backplane, frames as peers send them, the fake behind a connection."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from viewport.relay.config import load_config
from viewport.relay.interfaces import BusFrame
from viewport.relay.limits import Limiters
from viewport.relay.metrics import RelayMetrics
from viewport.relay.registry import Connection, Registry
from viewport.relay.router import Router
from viewport.testing import FakePeer, RecordingBackplane
from viewport.tokens import Claims

WS = "ws1"
RT = "rt1"
MACHINE = "machine-1"
CHANNEL = "agent-session:one"
OTHER_CHANNEL = "agent-session:two"
PUBLIC_URL = "wss://relay-a.example/ws"
B_URL = "wss://relay-b.example/ws"
MINUTE = 60_000
#: A configuration with a cross-relay backplane and client redirects switched on.
REDIS_ENV = {
    "RELAY_BACKPLANE_MODE": "redis",
    "RELAY_CLIENT_REDIRECT_ENABLED": "1",
    "RELAY_REDIS_URL": "redis://127.0.0.1:6379",
    "RELAY_TOKEN_SECRET": "s" * 32,
    "RELAY_BUS_HMAC_KEY": "h" * 32,
}
SAME: Any = object()


def encode(**fields: object) -> bytes:
    """A compact JSON frame."""
    return json.dumps(fields, separators=(",", ":")).encode("utf-8")


def e2ee(session_id: str = "s1", profile: str = "noise-ik", seq: int = 1) -> bytes:
    """A valid E2EE envelope."""
    return encode(type="e2ee", version=2, profile=profile, sessionId=session_id, epoch=1, seq=seq,
                  iv="iv", tag="tag", ciphertext="ct")


def kex_init(request_id: str = "k1", profile: str = "noise-ik") -> bytes:
    """A valid v3 key exchange init."""
    extra = {"pairingPeerId": "peer"} if profile == "noise-ikpsk2" else {}
    return encode(type="relay_key_exchange_init", version=3, profile=profile, requestId=request_id,
                  clientEphemeralPublicKey="e", encryptedClientStatic="s", **extra)


def kex_response(request_id: str = "k1", session_id: str = "s1", profile: str = "noise-ik") -> bytes:
    """A valid v3 key exchange response."""
    return encode(type="relay_key_exchange_response", version=3, profile=profile, requestId=request_id,
                  daemonPublicKey="d", daemonEphemeralPublicKey="e", encryptedMetadata="m",
                  sessionId=session_id, proof="p", epoch=1)


def key_update(session_id: str = "s1") -> bytes:
    """A valid key update required frame."""
    return encode(type="relay_key_update_required", sessionId=session_id, nextEpoch=2)


def pairing_offer(request_id: str = "p1") -> bytes:
    """A valid pairing offer request."""
    return encode(type="relay_pairing_offer_request", requestId=request_id, clientChannelPublicKey="k")


def pairing_response(request_id: str = "p1") -> bytes:
    """A valid (refusing) pairing offer response."""
    return encode(type="relay_pairing_offer_response", requestId=request_id, ok=False, errorCode="E")


def subscribe(channel: str = CHANNEL, **extra: object) -> bytes:
    """A session-events subscribe frame."""
    return encode(type="viewport.session_events.subscribe/v1", channel=channel, **extra)


def unsubscribe(channel: str = CHANNEL) -> bytes:
    """A session-events unsubscribe frame."""
    return encode(type="viewport.session_events.unsubscribe/v1", channel=channel)


def viewer_presence(channel: str = CHANNEL, user: str = "u1") -> bytes:
    """A viewer presence frame."""
    return encode(type="viewport.session_viewer_presence/v1", channel=channel, action="joined", userId=user)


def session_event(channel: str = CHANNEL) -> bytes:
    """A session event relay frame."""
    return encode(schema="viewport.session_event_relay_frame/v1", channel=channel, event={"n": 1})


def worker_request(path: str) -> bytes:
    """A worker transport request."""
    return encode(type="viewport.worker_transport.request/v1", requestId="w1", method="GET", path=path)


def peer(conn: Connection) -> FakePeer:
    """The fake behind a connection."""
    assert isinstance(conn.peer, FakePeer)
    return conn.peer


class Harness:
    """A router over a recording backplane, fresh metrics and a config from ``env``."""

    def __init__(self, env: Optional[Dict[str, str]] = None, cross_relay: bool = True) -> None:
        base = {"RELAY_PUBLIC_WS_BASE_URL": PUBLIC_URL}
        if cross_relay:
            # The configuration of a relay whose backplane reaches others (nothing connects to this URL).
            base.update(RELAY_BACKPLANE_MODE="redis", RELAY_REDIS_URL="redis://127.0.0.1:6379")
        self.config = load_config({**base, **(env or {})}, home="/nonexistent-home")
        self.backplane = RecordingBackplane("relay-a", cross_relay)
        # No other relay is simulated: every publish counts as taken (tests set False for a failure).
        self.backplane.publish_result = True
        self.metrics = RelayMetrics()
        self.registry = Registry(self.config.limits.pairing_request_track_max, self.config.limits.session_owner_track_max)
        self.forwarded: List[tuple[Connection, dict, str]] = []
        self.router = Router(
            config=self.config,
            registry=self.registry,
            backplane=self.backplane,
            metrics=self.metrics,
            limiters=Limiters(self.config.limits),
            worker_forward=lambda conn, frame, path: self.forwarded.append((conn, frame, path)),
        )

    def connect(self, role: str, ws: str = WS, rt: Optional[str] = RT, query_rt: Any = SAME,
                ip: str = "10.0.0.1", now: float = 0, **claims: Any) -> Connection:
        """Open a connection whose claims name ``ws``/``rt`` (plus ``claims``) through the router."""
        conn = Connection(FakePeer(), role, ws, ip, Claims(workspace_id=ws, runtime_target_id=rt, role=role, **claims), now)
        self.router.open_connection(conn, rt if query_rt is SAME else query_rt, now)
        return conn

    def daemon(self, **kw: Any) -> Connection:
        """A daemon of ``ws1``/``rt1`` on machine ``machine-1``."""
        kw.setdefault("machine_id", MACHINE)
        return self.connect("workspace-daemon", **kw)

    def client(self, scope: str = "runtime", client_id: str = "c1", **kw: Any) -> Connection:
        """A client of ``ws1``/``rt1``."""
        if scope == "session-events":
            kw.setdefault("session_channels", (CHANNEL, OTHER_CHANNEL))
        return self.connect("client", scope=scope, client_id=client_id, **kw)

    def close(self, conn: Connection, now: float = 0) -> None:
        """The socket went away: tell the router."""
        peer(conn).lose()
        self.router.close_connection(conn, now)

    def count(self, name: str) -> float:
        """The value of a counter, by attribute name."""
        return float(getattr(self.metrics, name).value)

    def key_exchange(self, client: Connection, daemon: Connection, request_id: str = "k1",
                     session_id: str = "s1", now: float = 0) -> None:
        """Run a key exchange so ``client`` owns ``session_id``."""
        self.router.client_frame(client, kex_init(request_id), now)
        self.router.daemon_frame(daemon, kex_response(request_id, session_id), now)

    def bus(self, payload: bytes, direction: str = "client_to_daemon", source: str = "relay-b",
            rt: str = RT, now: float = 0) -> None:
        """Hand the router a frame from another relay."""
        self.router.bus_frame(
            BusFrame(WS, rt, source, "relay-a", direction, payload.decode("utf-8")),  # type: ignore[arg-type]
            now,
        )
