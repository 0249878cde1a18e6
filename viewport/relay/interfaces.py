"""The interfaces the router talks through: the cross-relay backplane and a peer connection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Collection, Literal, Optional

from zope.interface import Attribute, Interface

from viewport.tokens import Claims

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

Direction = Literal["client_to_daemon", "daemon_to_clients"]
Side = Literal["daemon", "clients"]


@dataclass(frozen=True)
class Presence:
    """Where the daemon of one runtime target is connected."""

    workspace_id: str
    runtime_target_id: Optional[str]
    relay_id: str
    relay_ws_base_url: str
    daemon_connected: bool
    machine_id: Optional[str] = None


@dataclass(frozen=True)
class BusFrame:
    """One frame travelling between relays; ``payload`` is the exact text a peer sent."""

    workspace_id: str
    runtime_target_id: str
    source_relay_id: str
    target_relay_id: Optional[str]
    direction: Direction
    payload: str
    machine_id: Optional[str] = None


class IBackplane(Interface):
    """
    The path between relays: presence (which relay holds a daemon) and a frame bus.

    The router calls only this interface for anything that crosses relays, so single, Redis and
    server mode are interchangeable. No method raises: failures are reported through the Deferred
    result (``None``/``False``) and logged by the provider.
    """

    relay_id = Attribute("This relay's identity on the backplane (str).")
    cross_relay = Attribute("True when other relays can be reached through this backplane (bool).")
    healthy = Attribute(
        "False while the backplane cannot reach its store (Redis or the platform): the relay is "
        "then 'degraded' and answers /ready with 503 (bool)."
    )

    def start(
        deliver: Callable[[BusFrame], None],
        path_changed: Optional[Callable[[bool], None]] = None,
        frames_missed: Optional[Callable[[BusFrame], None]] = None,
    ) -> "Deferred[Any]":
        """
        Begin receiving frames addressed to this relay and keep this relay's liveness record
        fresh; ``deliver`` is called once per accepted frame, in arrival order.

        ``path_changed(False)`` is called as soon as frames addressed to this relay may be
        missed (the Redis subscription or the bus pull is lost), ``path_changed(True)`` when they
        arrive again. ``frames_missed(frame)`` is called when one relay's frames on a scope came out
        of order (``frame`` arrived after a later one and was dropped) or with a gap before ``frame``
        (frames lost on the way, e.g. in a Redis Cluster failover): the relay then tells the clients. Returns a Deferred that fires when the backplane is usable (it may keep
        reconnecting in the background afterwards).
        """

    def stop() -> "Deferred[None]":
        """
        Say goodbye (withdraw this relay's presences and its liveness record), stop receiving,
        release connections. Returns a Deferred that fires when done.
        """

    def dead_relays(relay_ids: Collection[str]) -> "Deferred[frozenset[str]]":
        """
        Returns a Deferred firing with the subset of ``relay_ids`` known to be gone: relays whose
        liveness record expired (they died without a goodbye) or that said goodbye. Presences of
        such relays are forgotten (``resolve_presence`` never names them). Unknown or unreachable:
        not reported dead. Never fails.
        """

    def announce_presence(presence: Presence) -> "Deferred[None]":
        """
        Record (``daemon_connected`` true) or clear (false) this relay's daemon for a runtime
        target. Returns a Deferred firing with None; never fails.
        """

    def resolve_presence(workspace_id: str, runtime_target_id: Optional[str]) -> "Deferred[Optional[Presence]]":
        """
        Returns a Deferred firing with the connected daemon's ``Presence`` (on any relay whose
        liveness record is fresh), or None when no live relay reports one.
        """

    def known_presence(workspace_id: str, runtime_target_id: Optional[str]) -> Optional[Presence]:
        """
        The answer ``resolve_presence`` would give now without asking anyone (one kept here), or None:
        then ask ``resolve_presence``. Lets the per-frame path skip a Deferred. Never fails.
        """

    def forget_presence(workspace_id: str, runtime_target_id: Optional[str], relay_id: str) -> None:
        """
        The router received ``relay_id``'s notice that the scope's daemon left: forget any
        presence of the scope naming ``relay_id`` that is kept here (a cached answer), so the
        next ``resolve_presence`` asks the store. Idempotent; never fails.
        """

    def publish(frame: BusFrame) -> "Deferred[bool]":
        """
        Send a frame to another relay. Returns a Deferred firing with True when at least one
        relay accepted it for delivery, False when it could not be delivered.
        """

    def watch_scope(workspace_id: str, runtime_target_id: Optional[str], side: Side) -> None:
        """
        This relay now holds the scope's daemon (``side="daemon"``: receive client→daemon frames)
        or some of its clients (``side="clients"``: receive daemon→clients frames). Idempotent.
        """

    def unwatch_scope(workspace_id: str, runtime_target_id: Optional[str], side: Side) -> None:
        """This relay no longer holds that side of the scope. Idempotent."""


class IPeer(Interface):
    """The router's view of one WebSocket connection: it can be sent text and closed."""

    def send_text(text: str) -> None:
        """Queue one relay-originated text frame; dropped when the connection is not open."""

    def send_payload(payload: bytes) -> None:
        """Forward a peer's frame: ``payload`` is UTF-8 text sent as a text frame, unchanged."""

    def close(code: int, reason: str) -> None:
        """Close the WebSocket with an application close code."""

    def can_send() -> bool:
        """True while frames can be sent."""


@dataclass(frozen=True)
class AdmissionResult:
    """The outcome of one admission: claims on success, else a status and a reason (logged only)."""

    claims: Optional[Claims]
    status: Optional[int]
    reason: Optional[str]

    @property
    def ok(self) -> bool:
        """True when the connection is admitted."""
        return self.claims is not None and self.reason is None


class IAdmission(Interface):
    """Decides whether an upgrade's token admits it, before the WebSocket handshake completes."""

    def admit(
        token: str, role: str, workspace_id: str, runtime_target_id: Optional[str]
    ) -> "Deferred[AdmissionResult]":
        """
        Check ``token`` for a peer asking for ``role`` in the given workspace/runtime target.

        Returns a Deferred that fires with an AdmissionResult and never fails; cancelling it
        abandons the check (it then fails with CancelledError).
        """
