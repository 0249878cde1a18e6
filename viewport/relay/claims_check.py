"""The checks of an upgraded socket's claims against its query, before it is registered (docs/protocol.md §3.1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from viewport.tokens import Claims

CLIENT_SCOPES = ("runtime", "pairing", "session-events")


@dataclass(frozen=True)
class ConnectionRejection:
    """Why an upgraded socket is refused after admission: 4008 reason, log fields, status first."""

    close_reason: str
    log_event: str
    log_reason: str
    send_runtime_target_required: bool = False


def effective_runtime_target(claims: Claims, query_runtime_target_id: Optional[str]) -> Optional[str]:
    """The runtime target a connection serves: its trimmed claim, else the query's (docs/protocol.md §3.1)."""
    return (claims.runtime_target_id or "").strip() or query_runtime_target_id


def check_connection_claims(
    role: str,
    query_workspace_id: str,
    query_runtime_target_id: Optional[str],
    claims: Claims,
) -> tuple[Optional[str], Optional[ConnectionRejection]]:
    """
    The claims-versus-query checks of an upgraded socket, in contract order.

    Returns the effective runtime target (claim, else query) and no rejection, or the rejection.
    """
    claimed_workspace = (claims.workspace_id or "").strip()
    if not claimed_workspace:
        return None, ConnectionRejection(
            "missing workspace claim", "connection_rejected", "missing_workspace_claim"
        )
    if claimed_workspace != query_workspace_id:
        return None, ConnectionRejection(
            "workspace claim mismatch", "connection_rejected", "workspace_claim_mismatch"
        )
    claimed_target = (claims.runtime_target_id or "").strip() or None
    if query_runtime_target_id is not None and claimed_target != query_runtime_target_id:
        return None, ConnectionRejection(
            "runtime target claim mismatch",
            "connection_rejected",
            "runtime_target_claim_mismatch",
        )
    if role == "client" and claims.scope not in CLIENT_SCOPES:
        return None, ConnectionRejection(
            "invalid scope claim", "client_connection_rejected", "invalid_scope_claim"
        )
    runtime_target = effective_runtime_target(claims, query_runtime_target_id)
    needs_target = role == "workspace-daemon" or (
        role == "client" and claims.scope in ("runtime", "session-events")
    )
    if needs_target and runtime_target is None:
        return None, ConnectionRejection(
            "missing runtime target claim",
            "connection_rejected",
            "missing_runtime_target_claim",
            send_runtime_target_required=True,
        )
    return runtime_target, None
