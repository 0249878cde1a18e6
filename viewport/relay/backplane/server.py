"""The ``server`` backplane: presence and the frame bus through the platform's internal HTTP API (§6.2, §6.4)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Collection, Optional
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from viewport.relay.backplane.batching import OrderedBatcher
from viewport.platform_api import ALIVE_PATH, HEARTBEAT_PATH, PUBLISH_PATH, RESOLVE_PATH, UPSERT_PATH
from viewport.relay.backplane.bus_http import BusCalls, describe, ok_document
from viewport.relay.backplane.bus_pull import (
    MAX_PULL_WAIT_MS,
    PULL_RETRY_FIRST_S,
    PULL_RETRY_MAX_S,
    UNHEALTHY_AFTER_FAILURES,
    PullLoop,
)
from viewport.relay.backplane.presence_cache import PresenceCache
from viewport.relay.backplane.signing import FrameVerifier, sign
from viewport.relay.httpcall import HttpAnswer
from viewport.relay.metrics import RelayMetrics
from viewport.relay.interfaces import BusFrame, IBackplane, Presence, Side
from viewport.logs import RepeatedWarning

__all__ = ["MAX_PULL_WAIT_MS", "PULL_RETRY_FIRST_S", "PULL_RETRY_MAX_S", "ServerBackplane", "UNHEALTHY_AFTER_FAILURES"]

#: What a bus may say it can do (in its pull answers): take several frames per publish, and keep
#: relay liveness records. The Viewport platform has neither: one frame per call, no liveness.
CAPABILITY_BATCH = "batch"
CAPABILITY_LIVENESS = "liveness"


#: The first pause before a failed presence upsert is sent again (seconds); it doubles up to the refresh period.
UPSERT_RETRY_FIRST_S = 0.25


def _presence_key(presence: Presence) -> tuple[str, Optional[str]]:
    return (presence.workspace_id, presence.runtime_target_id or None)


def _text(value: object) -> Optional[str]:
    return value if isinstance(value, str) and value else None


@implementer(IBackplane)
class ServerBackplane:
    """
    Cross-relay presence and frames through ``<server_url>/api/runtime/internal/relay/...``.

    Talks to the Viewport platform or to viewport-bus. Frames are pulled by one continuous
    long-poll loop that runs while a scope is watched; it starts at the bus head (frames older
    than this backplane are never delivered) and checks every frame (§6.4, §6.6) before handing
    it to ``deliver``. Only frames for a watched (scope, side) are delivered.
    """

    cross_relay = True
    _log = Logger()

    def __init__(
        self,
        *,
        relay_id: str,
        public_ws_base_url: str,
        server_url: str,
        internal_key: Optional[str],
        hmac_key: Optional[str],
        http_client: HTTPClient,
        clock: IReactorTime,
        timeout_ms: int = 2000,
        max_response_bytes: int = 262144,
        pull_limit: int = 200,
        pull_wait_ms: int = 1000,
        max_skew_ms: int = 15000,
        freshness_track_max: int = 20000,
        max_payload_bytes: int = 1048576,
        resolve_cache_ms: int = 2000,
        resolve_cache_max: int = 10000,
        presence_refresh_ms: int = 20000,
        liveness_ttl_ms: int = 3000,
        max_batch: int = 200,
        queue_max_bytes: int = 4 * 1024 * 1024,
        queue_max_age_ms: int = 2000,
        metrics: Optional[RelayMetrics] = None,
    ) -> None:
        """
        ``server_url``: only its origin is used. ``hmac_key`` signs published frames and is
        required of pulled ones (None disables both, for platforms without signing).
        ``pull_wait_ms`` is clamped to 0..2000; a pull's HTTP timeout is that wait plus
        ``timeout_ms``, and its response cap is large enough for one frame of
        ``max_payload_bytes`` even when ``max_response_bytes`` is smaller. Publishes of one scope
        and direction go one request at a time, with up to ``max_batch`` frames per request when the
        bus takes batches; at most ``queue_max_bytes`` wait per scope and direction, for at most
        ``queue_max_age_ms`` (beyond either, the frame is refused: the caller tells its peer).
        """
        parts = urlsplit(server_url)
        host = parts.netloc.rpartition("@")[2]
        if parts.scheme not in ("http", "https") or not host:
            raise ValueError("server_url must be an absolute http(s) URL")
        if not relay_id:
            raise ValueError("relay_id must not be empty")
        for name, value in (
            ("timeout_ms", timeout_ms),
            ("max_response_bytes", max_response_bytes),
            ("pull_limit", pull_limit),
            ("max_payload_bytes", max_payload_bytes),
            ("resolve_cache_max", resolve_cache_max),
            ("presence_refresh_ms", presence_refresh_ms),
            ("freshness_track_max", freshness_track_max),
            ("liveness_ttl_ms", liveness_ttl_ms),
            ("max_batch", max_batch),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive")
        self.relay_id = relay_id
        self._public_ws_base_url = public_ws_base_url
        # Without a key (allowed outside prod, with a startup warning) calls carry no key header.
        self._calls = BusCalls(
            origin=f"{parts.scheme}://{host}",
            internal_key=internal_key,
            http_client=http_client,
            clock=clock,
            timeout_ms=timeout_ms,
            max_response_bytes=max_response_bytes,
        )
        self._post = self._calls.post
        self._hmac_key = hmac_key or None
        self._clock = clock
        self._resolve_cache_s = max(0, resolve_cache_ms) / 1000.0
        self._presence_refresh_s = presence_refresh_ms / 1000.0
        self._metrics = metrics if metrics is not None else RelayMetrics()
        self._path_changed: Optional[Callable[[bool], None]] = None
        self._capabilities: frozenset[str] = frozenset()
        self._liveness_ttl_ms = liveness_ttl_ms
        self._liveness: Optional[LoopingCall] = None
        self._publish_warning = RepeatedWarning(self._log, clock, "relay_bus_publish_error")
        self._batcher: OrderedBatcher[dict[str, Any]] = OrderedBatcher(
            clock,
            self._send_batch,
            max_batch=lambda: max_batch if CAPABILITY_BATCH in self._capabilities else 1,
            max_queue_bytes=queue_max_bytes,
            max_age_ms=queue_max_age_ms,
            refused=self._queue_refused,
        )
        self._started = False
        self._stopped = False
        self._watched: set[tuple[str, Optional[str], Side]] = set()
        self._presences: dict[tuple[str, Optional[str]], Presence] = {}
        self._resolved: PresenceCache[tuple[str, Optional[str]]] = PresenceCache(self._resolve_cache_s, resolve_cache_max)
        self._refresh: Optional[LoopingCall] = None
        #: Scope -> the pending retry of its failed upsert and the delay it waited.
        self._upsert_retries: dict[tuple[str, Optional[str]], tuple[IDelayedCall, float]] = {}
        self._puller = PullLoop(
            relay_id=relay_id,
            post=self._post,
            clock=clock,
            watched=self._watched,
            verifier=(
                FrameVerifier(self._hmac_key, max_skew_ms, max(4 * freshness_track_max, 100000))
                if self._hmac_key is not None
                else None
            ),
            pull_limit=pull_limit,
            pull_wait_ms=pull_wait_ms,
            timeout_ms=timeout_ms,
            # A payload may grow sixfold as a JSON string; the bus adds frames up to a byte budget.
            max_response_bytes=max(max_response_bytes, 8 * max_payload_bytes + 65536),
            max_payload_bytes=max_payload_bytes,
            metrics=self._metrics,
            noted=self._note_capabilities,
            path_changed=self._tell_path,
        )

    # --- IBackplane --------------------------------------------------------------------------

    def start(
        self,
        deliver: Callable[[BusFrame], None],
        path_changed: Optional[Callable[[bool], None]] = None,
        frames_missed: Optional[Callable[[BusFrame], None]] = None,
    ) -> "Deferred[None]":
        """
        Find the bus head (so only new frames are delivered) and what the bus can do, then start
        the presence refresh and, on a bus with liveness records, this relay's heartbeat.
        ``path_changed`` follows ``healthy``. ``frames_missed`` is never called: the bus numbers every
        frame itself, and the pull's cursor never skips or repeats one.
        """
        if self._started:
            return succeed(None)
        self._started = True
        self._path_changed = path_changed
        refresh = LoopingCall(self._refresh_presences)
        refresh.clock = self._clock
        refresh.start(self._presence_refresh_s, now=False).addErrback(
            lambda f: self._log.failure("presence refresh stopped", f, relay_event="relay_presence_refresh_error")
        )
        self._refresh = refresh

        def synced(_: bool) -> None:
            self._start_liveness()
            self._puller.resume()

        return self._puller.start(deliver).addCallback(synced)

    def stop(self) -> "Deferred[None]":
        """Withdraw presences, let publishes under way finish, stop the pull loop and the refresh timer."""
        if self._stopped:
            return succeed(None)
        if self._refresh is not None and self._refresh.running:
            self._refresh.stop()
        self._refresh = None
        for retry, _ in self._upsert_retries.values():
            if retry.active():
                retry.cancel()
        self._upsert_retries.clear()
        withdrawals = [
            self._upsert(replace(presence, daemon_connected=False)) for presence in self._presences.values()
        ]
        if self._liveness is not None and self._liveness.running:
            self._liveness.stop()
        self._liveness = None
        if CAPABILITY_LIVENESS in self._capabilities:
            withdrawals.append(self._heartbeat(gone=True))
        self._presences.clear()
        self._resolved.clear()
        self._stopped = True
        self._watched.clear()
        loop_done = self._puller.stop()
        # Publishes already queued or under way (e.g. the notice that a daemon left, sent as the
        # relay closes its sockets) still reach the platform before the process exits.
        self._publish_warning.cancel()
        waits: list[Deferred[Any]] = list(withdrawals) + [self._batcher.drain()]
        if loop_done is not None:
            waits.append(loop_done)
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    @property
    def healthy(self) -> bool:
        """False after several consecutive failed pulls, until one succeeds."""
        return self._puller.healthy

    def _tell_path(self, working: bool) -> None:
        path_changed = self._path_changed
        if path_changed is None:
            return
        try:
            path_changed(working)
        except Exception:
            self._log.failure("path change handling failed", relay_event="relay_bus_path_change_error")

    def dead_relays(self, relay_ids: Collection[str]) -> "Deferred[frozenset[str]]":
        """
        The relays among ``relay_ids`` whose liveness record on the bus expired (or that said
        goodbye); cached presences naming them are dropped. Empty on a bus without liveness
        records, or when the bus cannot be asked. Never fails.
        """
        asked = sorted({relay_id for relay_id in relay_ids if relay_id and relay_id != self.relay_id})
        if self._stopped or not asked or CAPABILITY_LIVENESS not in self._capabilities:
            return succeed(frozenset())

        def answered(answer: HttpAnswer) -> frozenset[str]:
            document = ok_document(answer)
            dead = document.get("dead") if document is not None else None
            if not isinstance(dead, list):
                return frozenset()
            gone = frozenset(relay_id for relay_id in dead if isinstance(relay_id, str) and relay_id in asked)
            self._resolved.forget_relays(gone)
            return gone

        return self._post(ALIVE_PATH, {"relayIds": asked}).addCallbacks(answered, lambda _: frozenset())

    def announce_presence(self, presence: Presence) -> "Deferred[None]":
        """Upsert now (never fails); a connected presence is also re-sent every refresh period."""
        if self._stopped:
            return succeed(None)
        key = _presence_key(presence)
        if presence.daemon_connected:
            self._presences[key] = presence
        else:
            self._presences.pop(key, None)
            self._resolved.forget(key)
        return self._upsert(presence)

    def known_presence(self, workspace_id: str, runtime_target_id: Optional[str]) -> Optional[Presence]:
        """The platform's recent positive answer for the scope, while it is fresh."""
        if self._stopped:
            return None
        return self._resolved.get((workspace_id, runtime_target_id or None), self._clock.seconds())

    def resolve_presence(
        self, workspace_id: str, runtime_target_id: Optional[str]
    ) -> "Deferred[Optional[Presence]]":
        """The connected daemon's presence from the platform (positive answers cached briefly)."""
        if self._stopped:
            return succeed(None)
        cached = self.known_presence(workspace_id, runtime_target_id)
        if cached is not None:
            return succeed(cached)
        key = (workspace_id, runtime_target_id or None)
        body: dict[str, Any] = {"workspaceId": workspace_id}
        if runtime_target_id:
            body["runtimeTargetId"] = runtime_target_id

        def answered(answer: HttpAnswer) -> Optional[Presence]:
            document = ok_document(answer)
            if document is None:
                self._metrics.relay_presence_resolve_failed.inc()
                return None
            relay_id = _text(document.get("relayId"))
            url = _text(document.get("relayWsBaseUrl"))
            if document.get("daemonConnected") is not True or relay_id is None or url is None:
                self._resolved.forget(key)
                return None
            presence = Presence(
                workspace_id=workspace_id,
                runtime_target_id=_text(document.get("runtimeTargetId")) or runtime_target_id,
                relay_id=relay_id,
                relay_ws_base_url=url,
                daemon_connected=True,
                machine_id=_text(document.get("machineId")),
            )
            self._metrics.relay_presence_resolve_ok.inc()
            self._resolved.put(key, presence, self._clock.seconds())
            return presence

        def failed(failure: Failure) -> None:
            self._metrics.relay_presence_resolve_failed.inc()
            self._log.warn(
                "presence resolve for {workspaceId} failed: {error}",
                relay_event="relay_presence_resolve_error",
                workspaceId=workspace_id,
                error=describe(failure),
            )
            return None

        return self._post(RESOLVE_PATH, body).addCallbacks(answered, failed)

    def publish(self, frame: BusFrame) -> "Deferred[bool]":
        """Sign and post the frame; True only for a 2xx answer with ``ok:true``."""
        if self._stopped:
            return succeed(False)
        if not frame.runtime_target_id:
            self._metrics.relay_bus_publish_failed.inc()
            self._log.warn(
                "bus publish for {workspaceId} refused: {reason}",
                relay_event="relay_bus_publish_failed",
                workspaceId=frame.workspace_id,
                direction=frame.direction,
                reason="missing_runtime_target",
            )
            return succeed(False)
        if frame.source_relay_id != self.relay_id:
            frame = replace(frame, source_relay_id=self.relay_id)
        target: Optional[str] = frame.target_relay_id
        if target is None and frame.direction == "client_to_daemon":
            target = ""
        body: dict[str, Any] = {
            "workspaceId": frame.workspace_id,
            "runtimeTargetId": frame.runtime_target_id,
            "sourceRelayId": frame.source_relay_id,
            "targetRelayId": target,
            "direction": frame.direction,
            "payload": frame.payload,
        }
        if frame.machine_id is not None:
            body["machineId"] = frame.machine_id
        if self._hmac_key is not None:
            issued_at_ms = int(self._clock.seconds() * 1000)
            body["issuedAtMs"] = issued_at_ms
            body["signature"] = sign(self._hmac_key, frame, issued_at_ms)

        size = len(frame.payload)
        stream = (frame.workspace_id, frame.runtime_target_id, frame.direction)
        # Counted per request (_send_batch) or refusal (_queue_refused): no callback per frame.
        return self._batcher.submit(stream, body, size)

    def _send_batch(self, bodies: list[dict[str, Any]]) -> "Deferred[bool]":
        """One publish request: the frame itself, or ``{"frames": [...]}`` to a bus that takes batches."""
        document: dict[str, Any] = bodies[0] if len(bodies) == 1 and CAPABILITY_BATCH not in self._capabilities else {
            "frames": bodies
        }
        first = bodies[0]

        def answered(answer: HttpAnswer) -> bool:
            if ok_document(answer) is not None:
                self._metrics.relay_bus_publish_ok.inc(len(bodies))
                return True
            self._metrics.relay_bus_publish_failed.inc(len(bodies))
            self._publish_warning.warn(
                workspaceId=first["workspaceId"], direction=first["direction"], frames=len(bodies),
                status=answer.status,
            )
            return False

        def failed(failure: Failure) -> bool:
            self._metrics.relay_bus_publish_failed.inc(len(bodies))
            self._publish_warning.warn(
                workspaceId=first["workspaceId"], direction=first["direction"], frames=len(bodies),
                error=describe(failure),
            )
            return False

        return self._post(PUBLISH_PATH, document).addCallbacks(answered, failed)

    def _queue_refused(self, reason: str, count: int) -> None:
        self._metrics.relay_bus_publish_failed.inc(count)
        self._publish_warning.warn(reason=reason, frames=count)

    def watch_scope(self, workspace_id: str, runtime_target_id: Optional[str], side: Side) -> None:
        """Deliver that side's frames of the scope; the pull loop runs while anything is watched."""
        if self._stopped:
            return
        self._watched.add((workspace_id, runtime_target_id or None, side))
        self._puller.resume()

    def unwatch_scope(self, workspace_id: str, runtime_target_id: Optional[str], side: Side) -> None:
        """Stop delivering that side's frames of the scope."""
        self._watched.discard((workspace_id, runtime_target_id or None, side))

    # --- liveness ----------------------------------------------------------------------------

    def _start_liveness(self) -> None:
        """On a bus that keeps liveness records, refresh ours every third of its TTL."""
        if self._stopped or self._liveness is not None or CAPABILITY_LIVENESS not in self._capabilities:
            return
        beat = LoopingCall(self._heartbeat)
        beat.clock = self._clock
        beat.start(self._liveness_ttl_ms / 3000.0, now=True).addErrback(
            lambda f: self._log.failure("bus heartbeat stopped", f, relay_event="relay_bus_heartbeat_error")
        )
        self._liveness = beat

    def _heartbeat(self, gone: bool = False) -> "Deferred[None]":
        body: dict[str, Any] = {"relayId": self.relay_id}
        if gone:
            body["gone"] = True
        else:
            body["ttlMs"] = self._liveness_ttl_ms

        def answered(answer: HttpAnswer) -> None:
            if answer.status == 404:
                # Not our bus after all: carry on without liveness records.
                self._capabilities = self._capabilities - {CAPABILITY_LIVENESS}
                if self._liveness is not None and self._liveness.running:
                    self._liveness.stop()
                self._liveness = None

        return self._post(HEARTBEAT_PATH, body).addCallbacks(answered, lambda _: None)

    def _note_capabilities(self, document: dict[str, Any]) -> None:
        offered = document.get("capabilities")
        if isinstance(offered, list):
            known = frozenset(name for name in offered if name in (CAPABILITY_BATCH, CAPABILITY_LIVENESS))
            if known != self._capabilities:
                self._capabilities = known
                self._start_liveness()


    # --- presence ----------------------------------------------------------------------------

    def _upsert(self, presence: Presence) -> "Deferred[None]":
        body: dict[str, Any] = {
            "workspaceId": presence.workspace_id,
            "relayId": self.relay_id,
            "relayWsBaseUrl": presence.relay_ws_base_url or self._public_ws_base_url,
            "daemonConnected": presence.daemon_connected,
        }
        if presence.runtime_target_id:
            body["runtimeTargetId"] = presence.runtime_target_id
        if presence.machine_id:
            body["machineId"] = presence.machine_id

        def answered(answer: HttpAnswer) -> None:
            if ok_document(answer) is not None:
                self._metrics.relay_presence_upsert_ok.inc()
                self._upsert_retries.pop(_presence_key(presence), None)
                return
            self._metrics.relay_presence_upsert_failed.inc()
            self._log.warn(
                "presence upsert for {workspaceId} failed with status {status}",
                relay_event="relay_presence_upsert_failed",
                workspaceId=presence.workspace_id,
                status=answer.status,
            )
            if answer.status >= 500:
                self._retry_upsert(presence)

        def failed(failure: Failure) -> None:
            self._metrics.relay_presence_upsert_failed.inc()
            self._log.warn(
                "presence upsert for {workspaceId} failed: {error}",
                relay_event="relay_presence_upsert_error",
                workspaceId=presence.workspace_id,
                error=describe(failure),
            )
            self._retry_upsert(presence)

        return self._post(UPSERT_PATH, body).addCallbacks(answered, failed)

    def _retry_upsert(self, presence: Presence) -> None:
        """
        Send a failed upsert again soon (doubling from ``UPSERT_RETRY_FIRST_S`` up to the refresh period),
        rather than leaving other relays without the daemon until the next refresh; only while the
        presence is still what this relay holds for its scope, and never after ``stop``.
        """
        key = _presence_key(presence)
        if self._stopped:
            return
        previous = self._upsert_retries.get(key)
        if previous is not None and previous[0].active():
            return
        delay = UPSERT_RETRY_FIRST_S if previous is None else min(previous[1] * 2, self._presence_refresh_s)

        def again() -> None:
            current = self._presences.get(key)
            still_held = current is presence if presence.daemon_connected else current is None
            if self._stopped or not still_held:
                self._upsert_retries.pop(key, None)
                return
            self._upsert(presence)

        self._upsert_retries[key] = (self._clock.callLater(delay, again), delay)

    def _refresh_presences(self) -> None:
        """Re-send every connected presence, machine id included (never raises)."""
        try:
            for presence in list(self._presences.values()):
                self._upsert(presence)
        except Exception:
            self._log.failure("presence refresh failed", relay_event="relay_presence_refresh_error")

    # --- pulled frames -------------------------------------------------------------------

    def forget_presence(self, workspace_id: str, runtime_target_id: Optional[str], relay_id: str) -> None:
        """
        Drop a cached presence naming ``relay_id``: that relay said the daemon left, and a publish
        to it would still be accepted by the platform and then dropped without telling the client.
        """
        self._resolved.forget((workspace_id, runtime_target_id or None), relay_id)
