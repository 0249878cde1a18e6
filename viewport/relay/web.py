"""The relay's plain HTTP routes: /health, and the admin-gated /state, /logs and /metrics."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Dict, Optional

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from viewport import __version__
from viewport.relay.status import status_page, status_snapshot
from viewport.relay.upgrade import SERVER_HEADER

if TYPE_CHECKING:
    from viewport.relay.core import Relay

JSON_TYPE = b"application/json"


def admin_authorized(expected_sha256: Optional[str], authorization: Optional[str], header_token: Optional[str]) -> bool:
    """
    True when the request carries the admin token: ``Authorization: Bearer <token>`` or ``Basic``
    with the token as password (what a browser sends after its login prompt, for the status page)
    first, else ``X-Relay-Admin-Token``; compared as SHA-256 hex digests in constant time.
    """
    if not expected_sha256:
        return False
    provided: Optional[str] = None
    if authorization:
        scheme, _, rest = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and rest.strip():
            provided = rest.strip()
        elif scheme.lower() == "basic" and rest.strip():
            try:
                provided = base64.b64decode(rest.strip(), validate=True).decode("utf-8").partition(":")[2] or None
            except (ValueError, UnicodeDecodeError):
                provided = None
    if provided is None and header_token:
        provided = header_token.strip()
    if not provided:
        return False
    digest = hashlib.sha256(provided.encode("utf-8")).hexdigest()
    return hmac.compare_digest(digest, expected_sha256)


def iso_ms(ms: float) -> str:
    """Milliseconds since the epoch as ISO-8601 UTC with milliseconds."""
    stamp = datetime.fromtimestamp(ms / 1000.0, tz=timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ms % 1000):03d}Z"


def _json(request: Request, status: int, body: Dict[str, Any]) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_TYPE)
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


class RelayRoot(Resource):
    """Routes by exact path and method; everything else is 404 ``NOT_FOUND``."""

    isLeaf = True

    def __init__(self, relay: "Relay") -> None:
        super().__init__()
        self._relay = relay

    def render(self, request: Request) -> bytes:
        """Dispatch one request."""
        request.setHeader(b"server", SERVER_HEADER.encode("ascii"))
        path = request.path
        if request.method == b"GET":
            if path == b"/health":
                return self._health(request)
            if path == b"/ready":
                return self._ready(request)
            if path in (b"/state", b"/logs", b"/metrics", b"/admin", b"/admin/status"):
                denied = self._admin_gate(request)
                if denied is not None:
                    return denied
                if path == b"/state":
                    return self._state(request)
                if path == b"/logs":
                    return self._logs(request)
                if path == b"/admin":
                    return self._status_page(request)
                if path == b"/admin/status":
                    return _json(request, 200, status_snapshot(self._relay))
                return self._metrics(request)
        return _json(request, 404, {"ok": False, "reason": "NOT_FOUND"})

    def _admin_gate(self, request: Request) -> Optional[bytes]:
        relay = self._relay
        if not relay.config.http.enable_admin:
            return _json(request, 404, {"ok": False, "reason": "ADMIN_ENDPOINTS_DISABLED"})
        authorization = request.getHeader("authorization")
        header_token = request.getHeader("x-relay-admin-token")
        if admin_authorized(relay.config.http.admin_token_sha256, authorization, header_token):
            return None
        relay.metrics.relay_admin_unauthorized.inc()
        # A browser opening /admin then asks for the token (as the password) and sends it along.
        request.setHeader(b"www-authenticate", b'Basic realm="viewport-relay admin", charset="UTF-8"')
        return _json(request, 401, {"ok": False, "reason": "ADMIN_UNAUTHORIZED"})

    def _status_page(self, request: Request) -> bytes:
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
        )
        return status_page()

    def _health(self, request: Request) -> bytes:
        relay = self._relay
        config = relay.config
        body: Dict[str, Any] = {
            "ok": True,
            "service": "relay",
            "uptimeMs": int(relay.now_ms() - relay.started_at_ms),
        }
        if config.http.health_verbose:
            body.update(
                tlsEnabled=config.tls.enabled,
                relayMode=config.relay_mode,
                relayId=config.relay_id,
                version=__version__,
            )
        return _json(request, 200, body)

    def _ready(self, request: Request) -> bytes:
        """200 while the relay accepts upgrades and its backplane works; 503 otherwise (for load balancers)."""
        relay = self._relay
        if not relay.accepting:
            return _json(request, 503, {"ok": False, "ready": False, "reason": "SHUTTING_DOWN"})
        if not relay.backplane.healthy:
            return _json(
                request,
                503,
                {"ok": False, "ready": False, "reason": "BACKPLANE_DEGRADED", "backplaneMode": relay.config.backplane.mode},
            )
        return _json(request, 200, {"ok": True, "ready": True, "backplaneMode": relay.config.backplane.mode})

    def _state(self, request: Request) -> bytes:
        relay = self._relay
        config = relay.config
        body: Dict[str, Any] = {
            "ok": True,
            "service": "relay",
            "relayMode": config.relay_mode,
            "relayId": config.relay_id,
            "backplaneMode": config.backplane.mode,
            "busEnabled": config.backplane.bus_enabled,
            "clientRedirectEnabled": config.backplane.client_redirect_enabled,
        }
        if config.http.health_verbose:
            body.update(
                serverUrl=config.platform.url,
                tlsEnabled=config.tls.enabled,
                tlsHost=config.tls.host,
                wsBaseUrl=config.backplane.public_ws_base_url,
            )
        workspaces = []
        for scope in relay.registry:
            entry: Dict[str, Any] = {"workspaceId": scope.workspace_id}
            if scope.runtime_target_id is not None:
                entry["runtimeTargetId"] = scope.runtime_target_id
            entry["daemonConnected"] = scope.daemon_open() is not None
            entry["clientCount"] = scope.open_client_count()
            if config.http.state_include_client_ids:
                entry["clientIds"] = [c.client_id for c in scope.clients]
            entry["lastActivityAt"] = iso_ms(scope.last_activity_ms)
            workspaces.append(entry)
        body["workspaces"] = workspaces
        return _json(request, 200, body)

    def _logs(self, request: Request) -> bytes:
        observer = self._relay.log_observer
        logs = observer.recent(self._relay.config.http.health_verbose) if observer is not None else []
        return _json(request, 200, {"ok": True, "logs": logs})

    def _metrics(self, request: Request) -> bytes:
        from viewport.relay.metrics import CONTENT_TYPE

        request.setResponseCode(200)
        request.setHeader(b"content-type", CONTENT_TYPE.encode("ascii"))
        return self._relay.metrics.render()


def make_site(relay: "Relay") -> Site:
    """The twisted.web site for the relay's HTTP routes (no access log: the relay logs JSON)."""
    site = Site(RelayRoot(relay), reactor=relay.clock)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
