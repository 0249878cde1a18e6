"""
The platform's HTTP API in memory (a twisted.web resource), for relay tests that reach ``SERVER_URL``:
over a real socket (``Site(platform)``) or through ``treq.testing.StubTreq(platform)``.

:class:`FakePlatform` records every call and answers it from a queue per path, or holds it (a long
poll, a platform that stalls) until the test answers it; :class:`AdmissionPlatform` adds the
validate endpoint of platform admission, answering per token, and a worker API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

#: The path of platform admission's validate call.
VALIDATE_PATH = "/api/runtime/internal/relay/validate"


@dataclass(frozen=True)
class PlatformCall:
    """One request the platform received."""

    method: str
    #: The path without the query.
    path: str
    #: The path with the query, as sent.
    uri: str
    #: Header names lower-cased, the first value of each.
    headers: Dict[str, str]
    #: The body as sent.
    text: str

    @classmethod
    def of(cls, request: Request) -> "PlatformCall":
        """The call ``request`` makes (its body is read)."""
        assert request.content is not None
        return cls(
            method=request.method.decode(),
            path=request.path.decode(),
            uri=request.uri.decode(),
            headers={k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()},
            text=request.content.read().decode(),
        )

    @property
    def body(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.text)

    @property
    def key(self) -> Optional[str]:
        """The ``X-Relay-Internal-Key`` the caller sent, if any."""
        return self.headers.get("x-relay-internal-key")


def json_answer(request: Request, status: int, document: Any, raw: Optional[bytes] = None) -> bytes:
    """Set ``status`` and a JSON content type on ``request``; the body: ``document`` as JSON, or ``raw``."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return raw if raw is not None else json.dumps(document).encode()


class FakePlatform(Resource):
    """
    The platform's API in memory: records every call (``calls``), answers it from the queue of its
    path (``queue``), else as :meth:`respond` says; by default it holds the call (``held``) until
    :meth:`answer`.
    """

    isLeaf = True

    def __init__(self, prefix: str = "") -> None:
        """``prefix`` is put before the paths given to :meth:`queue` and taken off by :meth:`paths`."""
        super().__init__()
        self.prefix = prefix
        self.calls: List[PlatformCall] = []
        self.queued: Dict[str, List[Tuple[int, Any]]] = {}
        self.held: List[Tuple[PlatformCall, Request]] = []

    def queue(self, path: str, status: int, document: Any) -> None:
        """The next call to ``path`` gets this answer."""
        self.queued.setdefault(self.prefix + path, []).append((status, document))

    def answer(self, status: int, document: Any) -> PlatformCall:
        """Answer the oldest held call; returns it."""
        call, request = self.held.pop(0)
        request.write(json_answer(request, status, document))
        request.finish()
        return call

    def paths(self) -> List[str]:
        """The paths called so far, without the prefix."""
        return [call.path[len(self.prefix):] for call in self.calls]

    def release(self) -> None:
        """Drop the connection of every call still held (for the cleanup of a real socket)."""
        for _, request in self.held:
            if request.channel is not None:
                request.channel.transport.abortConnection()  # type: ignore[union-attr]

    def render_GET(self, request: Request) -> Union[bytes, int]:  # noqa: N802 - twisted.web naming
        """Record, then answer."""
        return self._received(request)

    def render_POST(self, request: Request) -> Union[bytes, int]:  # noqa: N802 - twisted.web naming
        """Record, then answer."""
        return self._received(request)

    def render_PATCH(self, request: Request) -> Union[bytes, int]:  # noqa: N802 - twisted.web naming
        """Record, then answer."""
        return self._received(request)

    def respond(self, call: PlatformCall, request: Request) -> Union[bytes, int]:
        """The answer to a call nothing was queued for: here, hold it."""
        return self.hold(call, request)

    def hold(self, call: PlatformCall, request: Request) -> int:
        """Keep ``request`` open until :meth:`answer` (or :meth:`release`)."""
        self.held.append((call, request))
        return NOT_DONE_YET

    def _received(self, request: Request) -> Union[bytes, int]:
        call = PlatformCall.of(request)
        self.calls.append(call)
        queued = self.queued.get(call.path)
        if queued:
            status, document = queued.pop(0)
            return json_answer(request, status, document)
        return self.respond(call, request)


class AdmissionPlatform(FakePlatform):
    """
    Platform admission's validate endpoint, answering per token: ``grants`` maps a token to claims,
    or to ``deny``, ``not-json``, ``bad-claims``, ``huge-declared``, ``huge-raw`` or ``stall`` (any
    other token is denied); and a worker API answering every other call 201.
    """

    def __init__(self, max_response_bytes: int) -> None:
        """``max_response_bytes`` is the relay's admission cap: the huge answers are four times that."""
        super().__init__()
        self.max_response_bytes = max_response_bytes
        self.grants: Dict[str, Any] = {}

    @property
    def validations(self) -> List[PlatformCall]:
        """The validate calls so far."""
        return [call for call in self.calls if self._validates(call)]

    @property
    def worker_calls(self) -> List[PlatformCall]:
        """The worker calls so far."""
        return [call for call in self.calls if not self._validates(call)]

    def respond(self, call: PlatformCall, request: Request) -> Union[bytes, int]:
        """Validate as the token's grant says, or answer a worker call."""
        if not self._validates(call):
            return self._worker(call, request)
        grant = self.grants.get(call.body.get("relayToken"), "deny")
        if isinstance(grant, dict):
            return json_answer(request, 200, {"ok": True, "claims": grant})
        if grant == "deny":
            return json_answer(request, 403, {"ok": False, "reason": "TOKEN_REVOKED"})
        if grant == "not-json":
            return json_answer(request, 200, None, raw=b"<html>oops</html>")
        if grant == "bad-claims":
            return json_answer(request, 200, {"ok": True, "claims": {"workspaceId": "pw", "surprise": 1}})
        big = json.dumps({"ok": True, "claims": {"workspaceId": "pw"}, "pad": "x" * (4 * self.max_response_bytes)})
        if grant == "huge-declared":
            return json_answer(request, 200, None, raw=big.encode())
        if grant == "huge-raw":
            # Head and body in one write, without Content-Length: the case that crashed the original relay.
            raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + big.encode()
            request.channel.transport.write(raw)  # type: ignore[union-attr]
            request.channel.transport.loseConnection()  # type: ignore[union-attr]
            return NOT_DONE_YET
        return self.hold(call, request)

    @staticmethod
    def _validates(call: PlatformCall) -> bool:
        return call.method == "POST" and call.path == VALIDATE_PATH

    @staticmethod
    def _worker(call: PlatformCall, request: Request) -> bytes:
        request.setHeader(b"x-upstream", b"yes")
        request.setHeader(b"set-cookie", b"session=secret")
        request.setHeader(b"authorization", b"Bearer upstream")
        return json_answer(request, 201, {"ok": True, "seen": call.uri})
