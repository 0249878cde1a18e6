"""Which relay URLs a client may be sent to (docs/backplanes.md, How client redirect works), and the redirect target for a client."""

from __future__ import annotations

from typing import Optional, Sequence
from urllib.parse import urlencode, urlsplit


def redirect_url_allowed(
    url: str,
    *,
    relay_mode: str,
    allowed_hosts: Sequence[str],
    own_public_url: str,
    tls_host: str,
) -> bool:
    """
    True when ``url`` is an acceptable redirect target: an absolute ws/wss URL (wss only in
    prod) with a host and no credentials, query or fragment; its host on the allow-list when one
    is configured, else (prod only) this relay's own public host or TLS host.
    """
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return False
    schemes = ("wss",) if relay_mode == "prod" else ("ws", "wss")
    if parts.scheme not in schemes or not hostname:
        return False
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        return False
    host = hostname.lower()
    if allowed_hosts:
        return host in allowed_hosts
    if relay_mode == "prod":
        own = (urlsplit(own_public_url).hostname or "").lower()
        return host in (own, tls_host.lower())
    return True


def redirect_location(
    base_url: str, role: str, workspace_id: str, runtime_target_id: Optional[str], extra: Sequence[tuple[str, str]] = ()
) -> str:
    """The owner relay's upgrade URL with the client's own query (for an HTTP 307 redirect)."""
    query = [("role", role), ("workspaceId", workspace_id)]
    if runtime_target_id is not None:
        query.append(("runtimeTargetId", runtime_target_id))
    query.extend(extra)
    return f"{base_url}?{urlencode(query)}"
