"""The server backplane's pull loop: one long-poll at a time from the bus head, every frame checked (§6.4, §6.6)."""

from __future__ import annotations

from typing import Any, Callable, Generator, Optional

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from viewport.platform_api import PULL_PATH
from viewport.relay.backplane.bus_http import describe, ok_document
from viewport.relay.backplane.signing import FrameVerifier, Verdict
from viewport.relay.httpcall import HttpAnswer, HttpCallFailed
from viewport.relay.metrics import RelayMetrics
from viewport.relay.interfaces import BusFrame, Direction, Side
from viewport.tokens import as_json_integer

__all__ = ["MAX_PULL_WAIT_MS", "PULL_RETRY_FIRST_S", "PULL_RETRY_MAX_S", "PullLoop", "UNHEALTHY_AFTER_FAILURES"]

#: The longest long-poll the contract allows (§6.4).
MAX_PULL_WAIT_MS = 2000
#: Consecutive failed pulls after which ``healthy`` turns False (until a pull succeeds).
UNHEALTHY_AFTER_FAILURES = 3
#: Pause after a failed pull: doubling from the first value up to the second (seconds).
PULL_RETRY_FIRST_S = 0.05
PULL_RETRY_MAX_S = 2.0
# A failed pull is logged on the first failure of a streak and then every this many failures.
_LOG_EVERY_FAILURES = 30

_DIRECTIONS: frozenset[str] = frozenset(("client_to_daemon", "daemon_to_clients"))
_SIDE_OF_DIRECTION: dict[str, Side] = {"client_to_daemon": "daemon", "daemon_to_clients": "clients"}

Post = Callable[..., "Deferred[HttpAnswer]"]
Watched = set[tuple[str, Optional[str], Side]]


class PullLoop:
    """
    Pulls this relay's frames: first once without waiting to learn the bus head (frames older than
    the relay are never delivered), then continuously while anything is watched, one request at a
    time. Failed pulls are retried after a pause that doubles; after several in a row ``healthy``
    turns False (``path_changed(False)``) until a pull succeeds again. Only frames for a watched
    (scope, side), correctly signed and fresh, reach ``deliver``, in bus order.
    """

    _log = Logger()

    def __init__(
        self,
        *,
        relay_id: str,
        post: Post,
        clock: IReactorTime,
        watched: Watched,
        verifier: Optional[FrameVerifier],
        pull_limit: int,
        pull_wait_ms: int,
        timeout_ms: int,
        max_response_bytes: int,
        max_payload_bytes: int,
        metrics: RelayMetrics,
        noted: Callable[[dict[str, Any]], None],
        path_changed: Callable[[bool], None],
    ) -> None:
        """
        ``watched`` is the backplane's own set (read, never changed here); ``noted(document)`` sees
        every good pull answer (its capabilities); ``metrics`` counts pulls and refused frames.
        """
        self.relay_id = relay_id
        self._post = post
        self._clock = clock
        self._watched = watched
        self._verifier = verifier
        self._pull_limit = pull_limit
        self._pull_wait_ms = max(0, min(pull_wait_ms, MAX_PULL_WAIT_MS))
        self._pull_timeout_ms = self._pull_wait_ms + timeout_ms
        self._max_response_bytes = max_response_bytes
        self._max_payload_bytes = max_payload_bytes
        self._metrics = metrics
        self._refusals = {
            Verdict.INVALID: metrics.relay_bus_pull_invalid_signature,
            Verdict.STALE: metrics.relay_bus_pull_stale_signature,
            Verdict.REPLAYED: metrics.relay_bus_pull_replayed_signature,
        }
        self._noted = noted
        self._path_changed = path_changed
        self._deliver: Optional[Callable[[BusFrame], None]] = None
        self._started = False
        self._stopped = False
        self._cursor: Optional[int] = None
        self._looping = False
        self._syncing = False
        self._loop_done: Optional[Deferred[None]] = None
        self._in_flight: Optional[Deferred[Any]] = None
        self._pause: Optional[IDelayedCall] = None
        self._pause_d: Optional[Deferred[None]] = None
        self._sync_retry: Optional[IDelayedCall] = None
        self._failures = 0
        self._limit_now = pull_limit

    @property
    def healthy(self) -> bool:
        """False until the bus first answered, and after several consecutive failed pulls until one succeeds."""
        return self._cursor is not None and self._failures < UNHEALTHY_AFTER_FAILURES

    def start(self, deliver: Callable[[BusFrame], None]) -> "Deferred[bool]":
        """
        Learn the bus head (and what the bus can do); fires True when it answered, False when it did not
        (the head is then asked again, with the loop's back-off, until it answers). Loops only after ``resume``.
        """
        self._started = True
        self._deliver = deliver
        return self._sync_until_answered(0)

    def _sync_until_answered(self, failures: int) -> "Deferred[bool]":
        self._syncing = True

        def synced(ok: bool) -> bool:
            self._syncing = False
            if not ok and not self._stopped and self._cursor is None:
                delay = min(PULL_RETRY_FIRST_S * 2 ** failures, PULL_RETRY_MAX_S)
                self._sync_retry = self._clock.callLater(delay, self._sync_again, failures + 1)
            elif ok:
                self.resume()
            return ok

        return self._sync_head().addCallback(synced)

    def _sync_again(self, failures: int) -> None:
        self._sync_retry = None
        # The loop learns the head itself when it runs (something was watched meanwhile).
        if not self._stopped and self._cursor is None and not self._looping and not self._syncing:
            self._sync_until_answered(failures)

    def resume(self) -> None:
        """Run the loop if anything is watched and it is not running yet."""
        if self._looping or self._syncing or self._stopped or not self._started or not self._watched:
            return
        self._looping = True
        done: Deferred[None] = self._run_loop()
        self._loop_done = done

    def stop(self) -> "Optional[Deferred[None]]":
        """Abandon the pull under way and stop looping; the loop's end, if it ran."""
        self._stopped = True
        if self._sync_retry is not None and self._sync_retry.active():
            self._sync_retry.cancel()
        if self._in_flight is not None:
            self._in_flight.cancel()
        self._wake()
        return self._loop_done

    def _sync_head(self) -> "Deferred[bool]":
        """Pull once without waiting to learn ``headId``; its frames predate us and are dropped."""
        body = {"relayId": self.relay_id, "sinceId": 0, "limit": self._limit_now, "waitMs": 0}
        d = self._post(PULL_PATH, body, max_response_bytes=self._max_response_bytes)
        self._in_flight = d

        def answered(answer: HttpAnswer) -> bool:
            document = ok_document(answer)
            if document is None:
                self._metrics.relay_bus_pull_failed.inc()
                self._log_failure(f"status {answer.status}")
                return False
            self._noted(document)
            head = as_json_integer(document.get("headId"))
            if head is not None and head >= 0:
                self._cursor = head
            else:
                # No head from this platform: start from what it offers; the skew check
                # keeps frames older than our start from being delivered.
                self._cursor = 0
                self._accept_page(document)
            return True

        def failed(failure: Failure) -> bool:
            if failure.check(CancelledError):
                return False
            self._metrics.relay_bus_pull_failed.inc()
            self._log_failure(describe(failure))
            return False

        def settled(ok: bool) -> bool:
            if self._in_flight is d:
                self._in_flight = None
            return ok

        return d.addCallbacks(answered, failed).addCallback(settled)

    @inlineCallbacks
    def _run_loop(self) -> Generator[Any, Any, None]:
        try:
            while self._watched and not self._stopped:
                if self._cursor is None:
                    ok = yield self._sync_head()
                else:
                    ok = yield self._pull_once()
                if self._stopped:
                    break
                if ok:
                    if self._failures >= UNHEALTHY_AFTER_FAILURES:
                        self._log.info("bus pull recovered", relay_event="relay_bus_pull_recovered")
                        self._failures = 0
                        self._path_changed(True)
                    self._failures = 0
                    continue
                self._failures += 1
                if self._failures == UNHEALTHY_AFTER_FAILURES:
                    self._path_changed(False)
                yield self._sleep(min(PULL_RETRY_FIRST_S * 2 ** (self._failures - 1), PULL_RETRY_MAX_S))
        except Exception:
            self._log.failure("bus pull loop failed", relay_event="relay_bus_pull_error")
        finally:
            self._looping = False
        # Something may have been watched again while the last pull was finishing.
        if not self._stopped and self._watched and not self._looping:
            self.resume()

    def _sleep(self, seconds: float) -> "Deferred[None]":
        d: Deferred[None] = Deferred()
        self._pause_d = d
        self._pause = self._clock.callLater(seconds, self._wake)
        return d

    def _wake(self) -> None:
        pause, self._pause = self._pause, None
        if pause is not None and pause.active():
            pause.cancel()
        d, self._pause_d = self._pause_d, None
        if d is not None and not d.called:
            d.callback(None)

    def _pull_once(self) -> "Deferred[bool]":
        assert self._cursor is not None
        body = {
            "relayId": self.relay_id,
            "sinceId": self._cursor,
            "limit": self._limit_now,
            "waitMs": self._pull_wait_ms,
        }
        d = self._post(PULL_PATH, body, timeout_ms=self._pull_timeout_ms, max_response_bytes=self._max_response_bytes)
        self._in_flight = d

        def answered(answer: HttpAnswer) -> bool:
            document = ok_document(answer)
            if document is None:
                self._metrics.relay_bus_pull_failed.inc()
                self._log_failure(f"status {answer.status}")
                return False
            self._limit_now = self._pull_limit
            self._noted(document)
            accepted = self._accept_page(document)
            if accepted:
                self._metrics.relay_bus_pull_ok.inc()
            return True

        def failed(failure: Failure) -> bool:
            if failure.check(CancelledError):
                return False
            self._metrics.relay_bus_pull_failed.inc()
            if failure.check(HttpCallFailed) and failure.value.kind == "too_large":
                # Fewer frames per answer until one fits again.
                self._limit_now = max(1, self._limit_now // 4)
            self._log_failure(describe(failure))
            return False

        def settled(ok: bool) -> bool:
            if self._in_flight is d:
                self._in_flight = None
            return ok

        return d.addCallbacks(answered, failed).addCallback(settled)

    def _log_failure(self, error: str) -> None:
        if self._failures % _LOG_EVERY_FAILURES == 0:
            self._log.warn(
                "bus pull failed: {error}",
                relay_event="relay_bus_pull_error",
                error=error,
                consecutiveFailures=self._failures + 1,
            )

    def _accept_page(self, document: dict[str, Any]) -> int:
        """Check and deliver a pull's frames in order; returns how many were accepted."""
        frames = document.get("frames")
        if not isinstance(frames, list):
            frames = []
        accepted = 0
        now_ms = self._clock.seconds() * 1000.0
        for raw in frames:
            if self._stopped:
                break
            if isinstance(raw, dict) and self._accept_frame(raw, now_ms):
                accepted += 1
        head = as_json_integer(document.get("headId"))
        if head is not None and 0 <= head < (self._cursor or 0):
            # The bus holds nothing above our cursor (its frames expired, or it was reset).
            self._cursor = head
        elif document.get("more") is False and head is not None:
            # Our bus says the answer was complete: nothing for us lies at or below its head.
            self._cursor = max(self._cursor or 0, head)
        return accepted

    def _accept_frame(self, raw: dict[str, Any], now_ms: float) -> bool:
        frame_id = as_json_integer(raw.get("id"))
        if frame_id is None or frame_id <= 0:
            return False
        self._cursor = max(self._cursor or 0, frame_id)
        source = raw.get("sourceRelayId")
        if source == self.relay_id:
            return False
        workspace_id = raw.get("workspaceId")
        runtime_target_id = raw.get("runtimeTargetId")
        payload = raw.get("payload")
        if not (
            isinstance(workspace_id, str)
            and isinstance(runtime_target_id, str)
            and runtime_target_id
            and isinstance(source, str)
            and isinstance(payload, str)
        ):
            return False
        target = raw.get("targetRelayId")
        if isinstance(target, str) and target and target != self.relay_id:
            return False
        # A code point takes at most four bytes: only a payload that might be too large is encoded.
        if len(payload) * 4 > self._max_payload_bytes and (
            len(payload.encode("utf-8", "surrogatepass")) > self._max_payload_bytes
        ):
            self._metrics.relay_bus_pull_frame_too_large.inc()
            return False
        direction = raw.get("direction")
        if direction not in _DIRECTIONS:
            return False
        if (workspace_id, runtime_target_id, _SIDE_OF_DIRECTION[direction]) not in self._watched:
            return False
        machine_id = raw.get("machineId")
        frame = BusFrame(
            workspace_id=workspace_id,
            runtime_target_id=runtime_target_id,
            source_relay_id=source,
            target_relay_id=target if isinstance(target, str) else None,
            direction=_direction(direction),
            payload=payload,
            machine_id=machine_id if isinstance(machine_id, str) else None,
        )
        if self._verifier is not None:
            verdict = self._verifier.check(
                frame, raw.get("issuedAtMs"), raw.get("signature"), now_ms
            )
            if verdict != Verdict.ACCEPTED:
                self._refusals[verdict].inc()
                return False
        deliver = self._deliver
        if deliver is None:
            return False
        try:
            deliver(frame)
        except Exception:
            self._log.failure("bus frame delivery failed", relay_event="bus_frame_delivery_error")
            return False
        return True


def _direction(value: str) -> Direction:
    return "client_to_daemon" if value == "client_to_daemon" else "daemon_to_clients"
