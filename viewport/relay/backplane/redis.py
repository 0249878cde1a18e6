"""The ``redis`` backplane: presence keys with a TTL and a signed pub/sub frame bus, over txredisapi."""

from __future__ import annotations

import json
import math
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Collection, Dict, List, Optional, Set, Tuple

import orjson
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from viewport.relay.backplane.presence_cache import PresenceCache
from viewport.relay.backplane.redis_connection import (
    RedisLink,
    backoff_delay,
    describe_failure,
    redis_endpoint,
)
from viewport.relay.backplane.redis_url import parse_redis_url
from viewport.relay.backplane.signing import FrameVerifier, Verdict, sign
from viewport.relay.backplane.stream_order import IN_ORDER, LATE, StreamNumbers, StreamOrder
from viewport.relay.frames import parse_frame
from viewport.relay.interfaces import BusFrame, IBackplane, Presence, Side
from viewport.logs import RepeatedWarning
from viewport.relay.metrics import RelayMetrics

DEFAULT_KEY_PREFIX = "viewport:relay"
_SIDE_OF: Dict[str, Side] = {"client_to_daemon": "daemon", "daemon_to_clients": "clients"}

#: Delete the presence key only while it still names this relay (``ARGV[1]``), so a relay whose
#: daemon left cannot erase the presence written by the relay the daemon moved to (docs/protocol.md §9, item 11).
COMPARE_AND_DELETE = """
local value = redis.call('GET', KEYS[1])
if not value then return 0 end
local ok, doc = pcall(cjson.decode, value)
if ok and type(doc) == 'table' and doc['relayId'] == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# -- names and wire formats (pure) ------------------------------------------------------------------


def bus_channel(prefix: str, side: Side, workspace_id: str, runtime_target_id: Optional[str]) -> str:
    """The pub/sub channel of one side of a scope; the workspace length keeps ids with ``:`` apart."""
    return f"{prefix}:bus:{side}:{len(workspace_id)}:{workspace_id}:{runtime_target_id or ''}"


def presence_key(prefix: str, workspace_id: str, runtime_target_id: Optional[str]) -> str:
    """The key holding the presence of one scope's daemon (length-prefixed like ``bus_channel``)."""
    return f"{prefix}:presence:{len(workspace_id)}:{workspace_id}:{runtime_target_id or ''}"


def liveness_key(prefix: str, relay_id: str) -> str:
    """The short-lived key that says a relay is alive (refreshed every second, expires in a few)."""
    return f"{prefix}:alive:{relay_id}"


@dataclass(frozen=True)
class Envelope:
    """A bus frame as published on a channel, with what proves it."""

    frame: BusFrame
    issued_at_ms: int
    nonce: Optional[str]
    signature: str
    deliver_by_ms: Optional[int] = None


def signed_nonce(nonce: str, deliver_by_ms: Optional[int]) -> str:
    """
    What the signature covers beyond the contract's fields: the random nonce and the deadline.

    The deadline rides inside the signed text, so a relay cannot be fooled into delivering a
    frame its sender already reported undeliverable.
    """
    return nonce if deliver_by_ms is None else f"{nonce}\n{deliver_by_ms}"


def encode_envelope(
    frame: BusFrame, issued_at_ms: int, nonce: str, signature: str, deliver_by_ms: Optional[int] = None
) -> str:
    """The JSON text published for ``frame`` (orjson: the text ``json.dumps`` gives, in a tenth of its time)."""
    doc: Dict[str, object] = {"workspaceId": frame.workspace_id, "runtimeTargetId": frame.runtime_target_id}
    if frame.machine_id is not None:
        doc["machineId"] = frame.machine_id
    doc.update(sourceRelayId=frame.source_relay_id, targetRelayId=frame.target_relay_id or None,
               direction=frame.direction, payload=frame.payload, issuedAtMs=issued_at_ms, nonce=nonce,
               signature=signature)
    if deliver_by_ms is not None:
        doc["deliverByMs"] = deliver_by_ms
    try:
        return orjson.dumps(doc).decode("utf-8")
    except orjson.JSONEncodeError:
        # A lone surrogate in an id: json writes it, and sending it fails as an encoding error
        # (counted and logged once per burst), as before orjson.
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def parse_envelope(raw: object) -> Optional[Envelope]:
    """Strictly parse a received envelope (types checked); None when it is not one."""
    doc = _json_object(raw)
    if doc is None:
        return None
    workspace_id = doc.get("workspaceId")
    runtime_target_id = doc.get("runtimeTargetId")
    machine_id = doc.get("machineId")
    source = doc.get("sourceRelayId")
    target = doc.get("targetRelayId")
    direction = doc.get("direction")
    payload = doc.get("payload")
    issued = doc.get("issuedAtMs")
    nonce = doc.get("nonce")
    signature = doc.get("signature")
    deliver_by = doc.get("deliverByMs")
    if isinstance(issued, float) and issued.is_integer():
        issued = int(issued)
    if not (
        isinstance(workspace_id, str)
        and isinstance(runtime_target_id, str)
        and runtime_target_id
        and (machine_id is None or isinstance(machine_id, str))
        and isinstance(source, str)
        and source
        and (target is None or isinstance(target, str))
        and direction in _SIDE_OF
        and isinstance(payload, str)
        and type(issued) is int
        and (nonce is None or isinstance(nonce, str))
        and isinstance(signature, str)
        and signature
        and (deliver_by is None or (type(deliver_by) is int and nonce is not None))
    ):
        return None
    frame = BusFrame(
        workspace_id=workspace_id,
        runtime_target_id=runtime_target_id,
        source_relay_id=source,
        target_relay_id=target or None,
        direction=direction,
        payload=payload,
        machine_id=machine_id,
    )
    return Envelope(frame, issued, nonce, signature, deliver_by)


def encode_presence(presence: Presence, updated_at_ms: int) -> str:
    """The JSON value stored under a presence key."""
    doc: Dict[str, object] = {
        "relayId": presence.relay_id, "relayWsBaseUrl": presence.relay_ws_base_url, "daemonConnected": True
    }
    if presence.runtime_target_id:
        doc["runtimeTargetId"] = presence.runtime_target_id
    if presence.machine_id:
        doc["machineId"] = presence.machine_id
    doc["updatedAtMs"] = updated_at_ms
    # This relay keeps a liveness record: readers may check it (an older relay's presence has none).
    doc["liveness"] = True
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def parse_presence(raw: object, workspace_id: str, runtime_target_id: Optional[str]) -> Optional[Presence]:
    """Strictly parse a stored presence; None unless it names a connected daemon."""
    doc = _json_object(raw)
    if doc is None:
        return None
    relay_id = doc.get("relayId")
    url = doc.get("relayWsBaseUrl")
    updated = doc.get("updatedAtMs")
    stored_target = doc.get("runtimeTargetId")
    machine_id = doc.get("machineId")
    if not (
        isinstance(relay_id, str)
        and relay_id
        and isinstance(url, str)
        and url
        and doc.get("daemonConnected") is True
        and isinstance(updated, (int, float))
        and not isinstance(updated, bool)
        and math.isfinite(updated)
        and (stored_target is None or isinstance(stored_target, str))
        and (machine_id is None or isinstance(machine_id, str))
    ):
        return None
    return Presence(
        workspace_id=workspace_id,
        runtime_target_id=stored_target or runtime_target_id,
        relay_id=relay_id,
        relay_ws_base_url=url,
        daemon_connected=True,
        machine_id=machine_id or None,
    )


def _json_object(raw: object) -> Optional[Dict[str, Any]]:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(raw, str):
        return None
    # The frames' parser: orjson's speed, json's accepted set (no NaN, no lone surrogates slip through).
    return parse_frame(raw)




def _utf8_size(text: str) -> Optional[int]:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


# -- the backplane ----------------------------------------------------------------------------------


@implementer(IBackplane)
class RedisBackplane:
    """
    Cross-relay backplane on Redis: one command connection and one pub/sub connection.

    Frames travel on a channel per scope and side (``bus_channel``): a relay subscribes to the
    ``daemon`` side of the scopes whose daemon it holds and to the ``clients`` side of the scopes
    where it has clients, so PUBLISH's receiver count tells the sender whether anyone listens.
    Every envelope is HMAC-signed with a random nonce; receivers check signature, clock skew and
    replays. Presence is a key per scope written with a TTL and refreshed every TTL/3 while this
    relay holds the daemon; clearing it is a compare-and-delete.

    While Redis is unreachable the backplane is *degraded* (``healthy`` false): every operation
    answers at once with False/None, and connections are retried with capped exponential
    backoff. On reconnection it subscribes again to every watched channel and re-announces every
    presence it holds.
    """

    cross_relay = True
    _log = Logger()

    def __init__(
        self,
        *,
        relay_id: str,
        redis_url: str,
        hmac_key: str,
        reactor: Any,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        presence_ttl_ms: int = 45000,
        command_timeout_ms: int = 2000,
        connect_timeout_ms: int = 5000,
        max_skew_ms: int = 15000,
        freshness_track_max: int = 20000,
        max_payload_bytes: int = 1048576,
        resolve_cache_ms: int = 2000,
        resolve_cache_max: int = 10000,
        retry_initial_ms: int = 250,
        retry_max_ms: int = 2000,
        liveness_ttl_ms: int = 3000,
        metrics: Optional[RelayMetrics] = None,
    ) -> None:
        """Parse the URL and prepare both connections; nothing connects before ``start``."""
        positive = dict(
            presence_ttl_ms=presence_ttl_ms, command_timeout_ms=command_timeout_ms, max_skew_ms=max_skew_ms,
            connect_timeout_ms=connect_timeout_ms, freshness_track_max=freshness_track_max,
            max_payload_bytes=max_payload_bytes, resolve_cache_max=resolve_cache_max,
            retry_initial_ms=retry_initial_ms, retry_max_ms=retry_max_ms, liveness_ttl_ms=liveness_ttl_ms,
        )
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive")
        if resolve_cache_ms < 0:
            raise ValueError("resolve_cache_ms must not be negative")
        if not relay_id or not hmac_key:
            raise ValueError("relay_id and hmac_key must not be empty")
        self.relay_id = relay_id
        self._target = parse_redis_url(redis_url)
        self._hmac_key = hmac_key
        self._reactor = reactor
        self._prefix = key_prefix
        self._ttl_ms = presence_ttl_ms
        self._liveness_ttl_ms = liveness_ttl_ms
        self._command_timeout_ms = command_timeout_ms
        self._presences_refreshed_ms = 0.0
        self._connect_timeout_s = connect_timeout_ms / 1000.0
        self._max_payload_bytes = max_payload_bytes
        self._cache_ms = min(resolve_cache_ms, presence_ttl_ms)
        self._cache_max = resolve_cache_max
        #: A private set when the caller keeps none (tests), so every count is a plain attribute call.
        self._metrics = metrics if metrics is not None else RelayMetrics()
        self._verdict_counters = {
            Verdict.INVALID: self._metrics.relay_bus_pull_invalid_signature,
            Verdict.STALE: self._metrics.relay_bus_pull_stale_signature,
            Verdict.REPLAYED: self._metrics.relay_bus_pull_replayed_signature,
        }
        self._verifier = FrameVerifier(hmac_key, max_skew_ms, freshness_track_max)
        self._stream_numbers = StreamNumbers()
        self._stream_order = StreamOrder()
        self._publish_warning = RepeatedWarning(self._log, reactor, "relay_bus_publish_error")
        self._random = random.Random()

        self._deliver: Optional[Callable[[BusFrame], None]] = None
        self._path_changed: Optional[Callable[[bool], None]] = None
        self._frames_missed: Optional[Callable[[BusFrame], None]] = None
        self._started = False
        self._stopped = False
        self._healthy = False
        self._synced = False
        self._start_waiters: List[Deferred[bool]] = []
        self._start_timer: Optional[IDelayedCall] = None
        self._stop_result: Optional[Deferred[Any]] = None
        self._stop_waiters: List[Deferred[None]] = []

        self._watched: Set[str] = set()
        self._pending_subscriptions: Set[Deferred[None]] = set()
        self._owned: Dict[str, Presence] = {}
        self._pending_clears: Set[str] = set()
        self._cache: PresenceCache[str] = PresenceCache(self._cache_ms, self._cache_max)
        self._cache_epoch = 0
        #: relay id -> (alive, until ms): liveness answers, kept for one refresh period.
        self._alive: OrderedDict[str, Tuple[bool, float]] = OrderedDict()
        #: Relays seen announcing a liveness record (only they can be judged dead by its absence).
        self._tracked: OrderedDict[str, None] = OrderedDict()

        self._retry_initial_s = retry_initial_ms / 1000.0
        self._retry_max_s = retry_max_ms / 1000.0
        self._connect(command_timeout_ms / 1000.0)
        self._refresher = LoopingCall(self._refresh)
        self._refresher.clock = reactor

    # -- connections: what a Redis Cluster backplane (``redis_cluster``) does its own way ----------

    def _retry_delay(self, attempt: int) -> float:
        """Seconds before reconnect ``attempt``: capped exponential backoff with jitter."""
        return backoff_delay(attempt, self._retry_initial_s, self._retry_max_s, 0.2, self._random.random)

    def _connect(self, timeout_s: float) -> None:
        """Prepare the connections (nothing connects yet): one for commands, one for pub/sub."""
        self._endpoint = redis_endpoint(self._target, self._reactor, self._connect_timeout_s)
        self._commands = RedisLink(
            "command", self._target, self._endpoint, self._reactor, timeout_s, self._retry_delay,
            self._commands_up, self._link_down,
        )
        self._subscriber = RedisLink(
            "subscriber", self._target, self._endpoint, self._reactor, timeout_s, self._retry_delay,
            self._subscriber_up, self._link_down, self._on_message,
        )

    def _start_connections(self) -> None:
        self._commands.start()
        self._subscriber.start()

    def _disconnect(self) -> "Deferred[Any]":
        """Close every connection, then the endpoint (Sentinel's connections)."""

        def close_endpoint(_: object) -> "Deferred[Any]":
            closer = getattr(self._endpoint, "close", None)
            return closer() if closer is not None else succeed(None)

        stopped = gatherResults([self._commands.stop(), self._subscriber.stop()], consumeErrors=True)
        return stopped.addBoth(close_endpoint)

    def _usable(self, key: str) -> bool:
        """A command on ``key`` can be sent now."""
        return self._commands.protocol is not None

    def _call(self, key: str, method: str, *args: Any) -> "Deferred[Any]":
        """Run a txredisapi command on ``key`` (the first key it names), with the command timeout."""
        return self._commands.call(method, *args)

    def _publish_on(self, channel: str, envelope: str) -> "Deferred[Any]":
        """PUBLISH; fires with the receiver count."""
        return self._commands.call("publish", channel, envelope)

    def _subscribe(self, channel: str) -> None:
        """SUBSCRIBE now if the pub/sub connection is up (else once it is)."""
        if self._subscriber.protocol is not None:
            self._subscription(self._subscriber, "subscribe", channel)

    def _unsubscribe(self, channel: str) -> "Deferred[Any]":
        """UNSUBSCRIBE if the pub/sub connection is up; never fails."""
        if self._subscriber.protocol is None:
            return succeed(None)
        return self._subscription(self._subscriber, "unsubscribe", channel)

    def _connections_healthy(self) -> bool:
        return bool(self._commands.protocol and self._subscriber.protocol and self._synced)

    def _ping_listeners(self) -> None:
        if self._subscriber.protocol is not None:
            self._subscriber.call("ping").addErrback(lambda _: None)

    def _channel(self, side: Side, workspace_id: str, runtime_target_id: Optional[str]) -> str:
        return bus_channel(self._prefix, side, workspace_id, runtime_target_id)

    def _presence_key(self, workspace_id: str, runtime_target_id: Optional[str]) -> str:
        return presence_key(self._prefix, workspace_id, runtime_target_id)

    # -- lifecycle ----------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """True while both connections are up and every watched channel is subscribed."""
        return self._healthy

    def start(
        self,
        deliver: Callable[[BusFrame], None],
        path_changed: Optional[Callable[[bool], None]] = None,
        frames_missed: Optional[Callable[[BusFrame], None]] = None,
    ) -> "Deferred[bool]":
        """
        Connect in the background. Fires True once both connections are usable, or False after
        the connect timeout (the relay then runs degraded while reconnecting goes on). Never fails.
        ``path_changed`` follows ``healthy``: False when it drops, True when it returns.
        ``frames_missed`` hears of a stream's frame that came after a later one (dropped) or after a gap.
        """
        if self._started or self._stopped:
            return succeed(self._healthy)
        self._started = True
        self._deliver = deliver
        self._path_changed = path_changed
        self._frames_missed = frames_missed
        waiter: Deferred[bool] = Deferred()
        self._start_waiters.append(waiter)
        self._start_timer = self._reactor.callLater(self._connect_timeout_s, self._start_timed_out)
        self._refresher.start(self._tick_seconds(), now=False).addErrback(
            lambda f: self._log.failure("presence refresh stopped", f, relay_event="relay_presence_refresh_error")
        )
        try:
            self._start_connections()
        except Exception:
            self._log.failure("redis connection start failed", relay_event="relay_redis_error")
        return waiter

    def _start_timed_out(self) -> None:
        self._start_timer = None
        if not self._healthy:
            self._log.warn(
                "redis unreachable at start; running degraded and retrying", relay_event="relay_redis_degraded"
            )
        self._fire_start_waiters(self._healthy)

    def _fire_start_waiters(self, value: bool) -> None:
        if self._start_timer is not None and self._start_timer.active():
            self._start_timer.cancel()
        self._start_timer = None
        waiters, self._start_waiters = self._start_waiters, []
        for waiter in waiters:
            waiter.callback(value)

    def stop(self) -> "Deferred[None]":
        """Clear the presences this relay owns, unsubscribe, disconnect and cancel timers."""
        waiter: Deferred[None] = Deferred()
        if self._stop_result is not None:
            if self._stop_result.called:
                return succeed(None)
            self._stop_waiters.append(waiter)
            return waiter
        self._stopped = True
        self._healthy = False
        self._fire_start_waiters(False)
        if self._refresher.running:
            self._refresher.stop()
        cleanups: List[Deferred[Any]] = []
        for key in sorted(set(self._owned) | self._pending_clears):
            if self._usable(key):
                cleanups.append(self._clear(key))
        alive = liveness_key(self._prefix, self.relay_id)
        if self._usable(alive):
            cleanups.append(self._call(alive, "delete", alive).addErrback(lambda _: None))
        for channel in sorted(self._watched):
            cleanups.append(self._unsubscribe(channel))
        self._owned.clear()
        self._pending_clears.clear()
        self._watched.clear()
        self._cache.clear()
        self._deliver = None
        self._path_changed = None
        self._publish_warning.cancel()

        def disconnect(_: object) -> "Deferred[Any]":
            return self._disconnect()

        def done(_: object) -> None:
            waiters, self._stop_waiters = self._stop_waiters, []
            for each in waiters:
                each.callback(None)

        self._stop_waiters.append(waiter)
        result = gatherResults(cleanups, consumeErrors=True)
        self._stop_result = result
        result.addBoth(disconnect).addBoth(done)
        return waiter

    # -- connection events --------------------------------------------------------------------------

    def _commands_up(self, link: RedisLink) -> None:
        """Commands work (again): write liveness, re-announce the owned presences, apply pending clears."""
        if self._stopped:
            return
        self._write_liveness()
        for key, presence in list(self._owned.items()):
            self._upsert(key, presence)
        clears, self._pending_clears = self._pending_clears, set()
        for key in sorted(clears):
            self._clear(key)
        self._update_health()

    def _subscriber_up(self, link: RedisLink) -> None:
        if self._stopped:
            return
        proto = link.protocol
        self._synced = False
        resubscribed = [self._subscription(link, "subscribe", channel) for channel in sorted(self._watched)]

        def synced(results: List[bool]) -> None:
            if link.protocol is proto and all(results):
                self._synced = True
                self._update_health()

        gatherResults(resubscribed).addCallback(synced)

    def _link_down(self, link: RedisLink) -> None:
        if link is self._subscriber:
            self._synced = False
        self._update_health()

    def _update_health(self) -> None:
        healthy = not self._stopped and self._connections_healthy()
        if healthy == self._healthy:
            return
        self._healthy = healthy
        if healthy:
            self._log.info("redis backplane connected", relay_event="relay_redis_connected")
            self._fire_start_waiters(True)
        else:
            self._log.warn("redis backplane degraded", relay_event="relay_redis_degraded")
        path_changed = self._path_changed
        if path_changed is not None:
            try:
                path_changed(healthy)
            except Exception:
                self._log.failure("path change handling failed", relay_event="relay_redis_error")

    def _tick_seconds(self) -> float:
        """The refresh period: a third of the liveness TTL (every second by default)."""
        return min(self._liveness_ttl_ms, self._ttl_ms) / 3000.0

    def _refresh(self) -> None:
        """
        Every tick: re-write this relay's liveness record and ping the subscriber connection (a
        stalled Redis is noticed within a tick plus the command timeout); every TTL/3 re-write
        the owned presences, machine id included.
        """
        try:
            self._write_liveness()
            now = self._now_ms()
            if now - self._presences_refreshed_ms >= self._ttl_ms / 3.0 - 1:
                self._presences_refreshed_ms = now
                for key, presence in list(self._owned.items()):
                    self._upsert(key, presence)
            self._ping_listeners()
        except Exception:
            self._log.failure("presence refresh failed", relay_event="relay_presence_refresh_error")

    def _write_liveness(self) -> None:
        key = liveness_key(self._prefix, self.relay_id)
        if self._usable(key):
            self._call(key, "set", key, "1", None, self._liveness_ttl_ms).addErrback(lambda _: None)

    # -- frames -------------------------------------------------------------------------------------

    def watch_scope(self, workspace_id: str, runtime_target_id: Optional[str], side: Side) -> None:
        """SUBSCRIBE to the scope's ``side`` channel (again after each reconnection). Idempotent."""
        channel = self._channel(side, workspace_id, runtime_target_id)
        if self._stopped or channel in self._watched:
            return
        self._watched.add(channel)
        self._subscribe(channel)

    def unwatch_scope(self, workspace_id: str, runtime_target_id: Optional[str], side: Side) -> None:
        """UNSUBSCRIBE from the scope's ``side`` channel. Idempotent."""
        channel = self._channel(side, workspace_id, runtime_target_id)
        if channel not in self._watched:
            return
        self._watched.discard(channel)
        self._stream_order.forget(channel)
        self._unsubscribe(channel)

    def subscriptions_settled(self) -> "Deferred[None]":
        """Fires once every SUBSCRIBE/UNSUBSCRIBE sent so far has been answered (or has failed)."""
        pending = list(self._pending_subscriptions)
        if not pending:
            return succeed(None)
        return gatherResults(pending).addCallback(lambda _: None)

    def _subscription(self, link: RedisLink, command: str, *args: Any) -> "Deferred[bool]":
        """Send a (un)subscribe on ``link``: True once answered, False (logged) on failure; tracked until then."""

        def failed(failure: Failure) -> bool:
            self._log.warn("redis {command} failed: {error}", relay_event="relay_redis_error", channel=link.name,
                           command=command, error=describe_failure(failure))
            return False

        return self._track(link.call(command, *args).addCallbacks(lambda _: True, failed))

    def _track(self, d: "Deferred[bool]") -> "Deferred[bool]":
        """Count ``d`` in ``subscriptions_settled`` until it fires."""
        if not d.called:
            self._pending_subscriptions.add(d)  # type: ignore[arg-type]

            def settled(result: bool) -> bool:
                self._pending_subscriptions.discard(d)
                return result

            d.addCallback(settled)
        return d

    def publish(self, frame: BusFrame) -> "Deferred[bool]":
        """PUBLISH a signed envelope; True when at least one relay is subscribed. Never fails."""
        try:
            return self._publish(frame)
        except Exception:
            self._log.failure("bus publish failed", relay_event="relay_bus_publish_error")
            self._metrics.relay_bus_publish_failed.inc()
            return succeed(False)

    def _publish(self, frame: BusFrame) -> "Deferred[bool]":
        side = _SIDE_OF.get(frame.direction)
        size = _utf8_size(frame.payload)
        reason = None
        if self._stopped or not self._started:
            reason = "not_running"
        elif not frame.runtime_target_id:
            reason = "missing_runtime_target"
        elif side is None:
            reason = "invalid_direction"
        elif size is None or size > self._max_payload_bytes:
            reason = "frame_too_large"
        channel = self._channel(side, frame.workspace_id, frame.runtime_target_id) if side is not None else ""
        if reason is not None or side is None or not self._usable(channel):
            self._metrics.relay_bus_publish_failed.inc()
            if reason is not None and reason != "not_running":
                self._log.warn("bus publish refused: {reason}", relay_event="relay_bus_publish_failed",
                               workspaceId=frame.workspace_id, direction=frame.direction, reason=reason)
            return succeed(False)
        issued_at_ms = int(self._now_ms())
        # Past the command timeout this publish is reported failed to the sender: a receiver must
        # not deliver it after that (a stalled Redis hands out what it held when it resumes).
        deliver_by_ms = issued_at_ms + self._command_timeout_ms
        nonce = self._stream_numbers.next_nonce(channel, frame.target_relay_id or "")
        signature = sign(self._hmac_key, frame, issued_at_ms, signed_nonce(nonce, deliver_by_ms))
        envelope = encode_envelope(frame, issued_at_ms, nonce, signature, deliver_by_ms)
        d: Deferred[bool] = self._publish_on(channel, envelope).addCallbacks(
            self._published, self._publish_failed, errbackArgs=(frame,)
        )
        return d

    def _published(self, receivers: object) -> bool:
        delivered = type(receivers) is int and receivers > 0
        (self._metrics.relay_bus_publish_ok if delivered else self._metrics.relay_bus_publish_failed).inc()
        return delivered

    def _publish_failed(self, failure: Failure, frame: BusFrame) -> bool:
        self._metrics.relay_bus_publish_failed.inc()
        # Once per burst with a count: an outage fails every frame of every scope.
        self._publish_warning.warn(workspaceId=frame.workspace_id, direction=frame.direction,
                                   error=describe_failure(failure))
        return False

    def _on_message(self, channel: object, message: object) -> None:
        try:
            self._receive(channel, message)
        except Exception:
            self._metrics.relay_bus_pull_failed.inc()
            self._log.failure("bus frame handling failed", relay_event="relay_bus_pull_error")

    def _receive(self, channel: object, message: object) -> None:
        deliver = self._deliver
        if deliver is None:
            return
        if isinstance(message, (str, bytes)) and len(message) > 6 * self._max_payload_bytes + 65536:
            self._metrics.relay_bus_pull_frame_too_large.inc()
            return
        envelope = parse_envelope(message)
        frame = envelope.frame if envelope is not None else None
        if envelope is None or frame is None or channel != self._channel(
            _SIDE_OF[frame.direction], frame.workspace_id, frame.runtime_target_id
        ):
            self._metrics.relay_bus_pull_failed.inc()
            self._log.warn("malformed bus envelope skipped", relay_event="relay_bus_frame_malformed")
            return
        if frame.source_relay_id == self.relay_id:
            return
        if (
            frame.target_relay_id
            and frame.target_relay_id != self.relay_id
            and frame.direction == "daemon_to_clients"
        ):
            # A client→daemon channel reaches only the relay holding the daemon now, even when the
            # sender's cached presence still names the relay the daemon just left.
            return
        size = _utf8_size(frame.payload)
        if size is None or size > self._max_payload_bytes:
            self._metrics.relay_bus_pull_frame_too_large.inc()
            return
        now_ms = self._now_ms()
        nonce = envelope.nonce if envelope.nonce is None else signed_nonce(envelope.nonce, envelope.deliver_by_ms)
        verdict = self._verifier.check(frame, envelope.issued_at_ms, envelope.signature, now_ms, nonce=nonce)
        if verdict != Verdict.ACCEPTED:
            self._verdict_counters.get(verdict, self._metrics.relay_bus_pull_failed).inc()
            return
        order, missing = self._stream_order.check(str(channel), frame.source_relay_id, frame.target_relay_id or "",
                                                  envelope.nonce)
        if order != IN_ORDER:
            self._stream_broken(frame, order, missing)
            if order == LATE:
                return
        if envelope.deliver_by_ms is not None and now_ms > envelope.deliver_by_ms:
            # Its sender has reported it undeliverable by now; delivering it would duplicate a retry.
            self._metrics.relay_bus_frames_expired.inc()
            return
        self._metrics.relay_bus_pull_ok.inc()
        deliver(frame)

    def _stream_broken(self, frame: BusFrame, order: str, missing: int) -> None:
        """Count a late frame (dropped) or a gap before ``frame``, and say so to the relay (which logs it)."""
        if order == LATE:
            self._metrics.relay_bus_frames_out_of_order.inc()
        else:
            self._metrics.relay_bus_frames_missing.inc(missing)
        frames_missed = self._frames_missed
        if frames_missed is not None:
            frames_missed(frame)

    # -- presence -----------------------------------------------------------------------------------

    def announce_presence(self, presence: Presence) -> "Deferred[None]":
        """SET (connected, remembered and refreshed) or compare-and-delete (disconnected). Never fails."""
        try:
            return self._announce(presence)
        except Exception:
            self._log.failure("presence upsert failed", relay_event="relay_presence_upsert_error")
            self._metrics.relay_presence_upsert_failed.inc()
            return succeed(None)

    def _announce(self, presence: Presence) -> "Deferred[None]":
        key = self._presence_key(presence.workspace_id, presence.runtime_target_id)
        self._cache.forget(key)
        self._cache_epoch += 1
        if self._stopped:
            return succeed(None)
        if presence.daemon_connected:
            self._owned[key] = presence
            self._pending_clears.discard(key)
            return self._upsert(key, presence)
        self._owned.pop(key, None)
        if not self._usable(key):
            # Applied once reconnected; the key expires anyway, as nothing refreshes it any more.
            self._pending_clears.add(key)
            self._metrics.relay_presence_upsert_failed.inc()
            return succeed(None)
        return self._clear(key)

    def _upsert(self, key: str, presence: Presence) -> "Deferred[None]":
        if not self._usable(key):
            self._metrics.relay_presence_upsert_failed.inc()
            return succeed(None)
        value = encode_presence(presence, int(self._now_ms()))
        d = self._call(key, "set", key, value, None, self._ttl_ms)
        return d.addCallbacks(self._presence_written, self._presence_failed, errbackArgs=(presence,))

    def _clear(self, key: str) -> "Deferred[None]":
        d = self._call(key, "eval", COMPARE_AND_DELETE, [key], [self.relay_id])
        return d.addCallbacks(self._presence_written, self._presence_failed, errbackArgs=(None,))

    def _presence_written(self, _: object) -> None:
        self._metrics.relay_presence_upsert_ok.inc()

    def _presence_failed(self, failure: Failure, presence: Optional[Presence]) -> None:
        self._metrics.relay_presence_upsert_failed.inc()
        self._log.warn("presence upsert failed: {error}", relay_event="relay_presence_upsert_error",
                       workspaceId=presence.workspace_id if presence is not None else None,
                       error=describe_failure(failure))

    def resolve_presence(
        self, workspace_id: str, runtime_target_id: Optional[str]
    ) -> "Deferred[Optional[Presence]]":
        """GET the scope's presence (positive answers cached briefly); None when absent. Never fails."""
        try:
            return self._resolve(workspace_id, runtime_target_id)
        except Exception:
            self._log.failure("presence resolve failed", relay_event="relay_presence_resolve_error")
            self._metrics.relay_presence_resolve_failed.inc()
            return succeed(None)

    def known_presence(self, workspace_id: str, runtime_target_id: Optional[str]) -> Optional[Presence]:
        """The scope's recent positive answer, while it is fresh."""
        try:
            return self._cache.get(self._presence_key(workspace_id, runtime_target_id), self._now_ms())
        except Exception:
            self._log.failure("presence lookup failed", relay_event="relay_presence_resolve_error")
            return None

    def forget_presence(self, workspace_id: str, runtime_target_id: Optional[str], relay_id: str) -> None:
        """Drop the cached answer for the scope when it names ``relay_id`` (which said its daemon left)."""
        self._cache.forget(self._presence_key(workspace_id, runtime_target_id), relay_id)

    def _resolve(self, workspace_id: str, runtime_target_id: Optional[str]) -> "Deferred[Optional[Presence]]":
        cached = self.known_presence(workspace_id, runtime_target_id)
        if cached is not None:
            return succeed(cached)
        key = self._presence_key(workspace_id, runtime_target_id)
        if self._stopped or not self._usable(key):
            self._metrics.relay_presence_resolve_failed.inc()
            return succeed(None)
        epoch = self._cache_epoch
        d: Deferred[Optional[Presence]] = self._call(key, "get", key).addCallbacks(
            self._resolved, self._resolve_failed,
            callbackArgs=(key, workspace_id, runtime_target_id, epoch), errbackArgs=(workspace_id,),
        )
        return d

    def _resolved(
        self, raw: object, key: str, workspace_id: str, runtime_target_id: Optional[str], epoch: int
    ) -> "Deferred[Optional[Presence]] | Optional[Presence]":
        presence = parse_presence(raw, workspace_id, runtime_target_id) if raw is not None else None
        if presence is None:
            self._cache.forget(key)
            return None
        doc = _json_object(raw)
        if presence.relay_id == self.relay_id or doc is None or doc.get("liveness") is not True:
            return self._keep_resolved(presence, key, epoch)
        self._tracked[presence.relay_id] = None
        self._tracked.move_to_end(presence.relay_id)
        while len(self._tracked) > self._cache_max:
            self._tracked.popitem(last=False)

        def checked(alive: bool) -> Optional[Presence]:
            if not alive:
                # A relay that died without a goodbye: its presence lingers until its TTL, unused.
                self._cache.forget(key)
                self._metrics.relay_presence_dead_relay.inc()
                return None
            return self._keep_resolved(presence, key, epoch)

        return self._relay_alive(presence.relay_id).addCallback(checked)

    def _keep_resolved(self, presence: Presence, key: str, epoch: int) -> Presence:
        self._metrics.relay_presence_resolve_ok.inc()
        # An own announcement made while the GET was in flight makes its answer stale.
        if epoch == self._cache_epoch and not self._stopped:
            self._cache.put(key, presence, self._now_ms())
        return presence

    def _relay_alive(self, relay_id: str, fresh: bool = False) -> "Deferred[bool]":
        """Whether a relay's liveness record exists (cached for a refresh period); True when unknown."""
        now = self._now_ms()
        known = self._alive.get(relay_id)
        if known is not None and known[1] > now and not fresh:
            return succeed(known[0])
        key = liveness_key(self._prefix, relay_id)
        if not self._usable(key):
            return succeed(True)

        def answered(exists: object) -> bool:
            alive = exists != 0
            self._alive[relay_id] = (alive, self._now_ms() + self._tick_seconds() * 1000.0)
            self._alive.move_to_end(relay_id)
            while len(self._alive) > self._cache_max:
                self._alive.popitem(last=False)
            return alive

        return self._call(key, "exists", key).addCallbacks(answered, lambda _: True)

    def dead_relays(self, relay_ids: Collection[str]) -> "Deferred[frozenset[str]]":
        """
        The relays among ``relay_ids`` whose liveness record is gone; cached presences naming
        them are dropped. Only relays that announced a liveness record are judged. Never fails.
        """
        tracked = [relay_id for relay_id in set(relay_ids) if relay_id != self.relay_id and relay_id in self._tracked]
        if self._stopped or not tracked:
            return succeed(frozenset())
        checks = [self._relay_alive(relay_id, fresh=True) for relay_id in tracked]

        def collect(results: List[bool]) -> frozenset[str]:
            gone = frozenset(relay_id for relay_id, alive in zip(tracked, results) if not alive)
            self._cache.forget_relays(gone)
            return gone

        return gatherResults(checks).addCallbacks(collect, lambda _: frozenset())

    def _resolve_failed(self, failure: Failure, workspace_id: str) -> None:
        self._metrics.relay_presence_resolve_failed.inc()
        self._log.warn("presence resolve failed: {error}", relay_event="relay_presence_resolve_error",
                       workspaceId=workspace_id, error=describe_failure(failure))

    # -- helpers ------------------------------------------------------------------------------------

    def _now_ms(self) -> float:
        return float(self._reactor.seconds()) * 1000.0

