"""Upgrade URL, token placement and redirect targets for a relay connection (docs/protocol.md §2.1, §2.2, §5.1)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, quote, urlencode, urljoin, urlsplit, urlunsplit

TokenVia = Literal["header", "subprotocol", "query"]
"""Where the token travels: ``Authorization: Bearer`` (daemons), ``auth.<token>`` subprotocol
(browsers) or the ``token`` query parameter (dev mode only)."""

DEFAULT_SUBPROTOCOL = "viewport-relay-v1"
"""The plain subprotocol a browser-style client offers before ``auth.<token>``."""


def build_url(
    base_url: str,
    *,
    role: str,
    workspace_id: str,
    runtime_target_id: str | None = None,
    token: str | None = None,
    extra_query: Mapping[str, str] | None = None,
) -> str:
    """Append the relay query to ``base_url`` (a ``ws(s)://host:port/ws`` URL), every value URL-encoded.

    The order is ``role``, ``workspaceId``, ``runtimeTargetId`` (only if given), ``extra_query``, ``token``
    (only if given).
    """
    params: list[tuple[str, str]] = [("role", role), ("workspaceId", workspace_id)]
    if runtime_target_id is not None:
        params.append(("runtimeTargetId", runtime_target_id))
    if extra_query:
        params.extend(extra_query.items())
    if token is not None:
        params.append(("token", token))
    query = urlencode(params, quote_via=quote, safe="")
    separator = "&" if "?" in base_url else "?"
    return base_url + separator + query


@dataclass(frozen=True)
class Handshake:
    """What the opening handshake carries: the full URL, extra headers and offered subprotocols."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    protocols: list[str] = field(default_factory=list)


def handshake_for(
    base_url: str,
    *,
    token: str,
    role: str,
    workspace_id: str,
    runtime_target_id: str | None = None,
    token_via: TokenVia = "header",
    subprotocol: str | None = DEFAULT_SUBPROTOCOL,
    extra_query: Mapping[str, str] | None = None,
) -> Handshake:
    """Place the token as ``token_via`` says and build the URL.

    With ``token_via="subprotocol"`` the offer is ``[subprotocol, "auth.<token>"]``, or only
    ``["auth.<token>"]`` when ``subprotocol`` is None. The other modes offer no subprotocol.
    """
    headers: dict[str, str] = {}
    protocols: list[str] = []
    query_token: str | None = None
    if token_via == "header":
        headers["Authorization"] = f"Bearer {token}"
    elif token_via == "subprotocol":
        if subprotocol is not None:
            protocols.append(subprotocol)
        protocols.append(f"auth.{token}")
    elif token_via == "query":
        query_token = token
    else:
        raise ValueError(f"token_via must be header, subprotocol or query, not {token_via!r}")
    url = build_url(
        base_url,
        role=role,
        workspace_id=workspace_id,
        runtime_target_id=runtime_target_id,
        token=query_token,
        extra_query=extra_query,
    )
    return Handshake(url=url, headers=headers, protocols=protocols)


_REDIRECT_SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}


def base_url_of(url: str) -> str:
    """``url`` without its query and fragment: the ``ws(s)://host:port/ws`` base a relay query is added to."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def is_relay_base_url(url: str) -> bool:
    """Whether ``url`` is an absolute ``ws://`` or ``wss://`` URL with a host (what ``relayWsBaseUrl`` must be)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return False
    return parts.scheme in ("ws", "wss") and bool(parts.hostname)


def redirect_url(location: str, current_url: str, *, token: str, token_via: TokenVia) -> str | None:
    """The URL to open next for a redirect answer's ``location``, or None if it cannot be followed.

    A relative ``location`` is resolved against ``current_url``; ``http``/``https`` map to ``ws``/``wss``; any
    other scheme is refused. The query the relay wrote is kept as it is; with ``token_via="query"`` the token is
    appended unless the location already carries one (header and subprotocol tokens travel as before).
    """
    absolute = urljoin(current_url, location.strip())
    try:
        parts = urlsplit(absolute)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return None
    scheme = _REDIRECT_SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        return None
    query = parts.query
    if token_via == "query" and "token" not in dict(parse_qsl(query, keep_blank_values=True)):
        extra = urlencode([("token", token)], quote_via=quote, safe="")
        query = f"{query}&{extra}" if query else extra
    return urlunsplit((scheme, parts.netloc, parts.path, query, ""))
