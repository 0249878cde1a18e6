"""``viewport-relay probe``: connect to a relay as a client and report admission, redirects and latency."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

from twisted.internet.defer import inlineCallbacks

from viewport.client import ConnectionClosed, MessageTimeout, RelayConnection, UpgradeRefused, connect


@dataclass
class ProbeReport:
    """What one probe found; ``ok`` when the relay admitted the client and kept it open through the probe."""

    url: str
    ok: bool = False
    status: Optional[int] = None
    close_code: Optional[int] = None
    close_reason: Optional[str] = None
    error: Optional[str] = None
    connect_ms: Optional[float] = None
    redirected_from: List[str] = field(default_factory=list)
    subprotocol: Optional[str] = None
    in_band_redirect: Optional[str] = None
    daemon: str = "unknown"
    daemon_round_trip_ms: Optional[float] = None

    def to_json(self) -> dict:
        """The report as JSON-able data."""
        return {k: v for k, v in self.__dict__.items() if v is not None and v != []}


def _key_exchange_probe(request_id: str) -> dict:
    return {
        "type": "relay_key_exchange_init", "version": 3, "profile": "noise-ik", "requestId": request_id,
        "clientEphemeralPublicKey": "probe", "encryptedClientStatic": "probe",
    }


@inlineCallbacks
def probe(
    reactor: Any,
    url: str,
    *,
    token: str,
    workspace_id: str,
    runtime_target_id: Optional[str],
    http_redirect: bool = False,
    timeout: float = 5.0,
) -> Any:
    """
    Connect (following redirects), then send one key-exchange init and time the answer.

    A ``relay_key_exchange_response`` means a daemon answered (``daemon: "answered"``);
    ``DAEMON_UNAVAILABLE`` means no relay holds the daemon; silence until ``timeout`` means a
    daemon is connected but ignored the probe's dummy keys (real daemons do).
    """
    report = ProbeReport(url=url)
    started = time.perf_counter()
    try:
        conn: RelayConnection = yield connect(
            reactor, url, token=token, role="client", workspace_id=workspace_id,
            runtime_target_id=runtime_target_id, http_redirect=http_redirect, open_timeout=timeout,
        )
    except UpgradeRefused as refused:
        report.status, report.error = refused.status, str(refused)
        return report
    except Exception as error:  # noqa: BLE001 - a probe reports every failure
        report.error = f"{type(error).__name__}: {error}"
        return report
    report.ok = True
    report.connect_ms = round((time.perf_counter() - started) * 1000, 2)
    report.redirected_from = list(conn.redirected_from)
    report.subprotocol = conn.subprotocol
    sent = time.perf_counter()
    conn.send_json(_key_exchange_probe("probe-" + secrets.token_hex(6)))
    deadline = sent + timeout
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            report.daemon = "connected, no answer to the probe"
            break
        try:
            text = yield conn.next_message(timeout=remaining)
        except MessageTimeout:
            continue
        except ConnectionClosed as closed:
            info = closed.info
            report.ok = False
            report.close_code, report.close_reason = info.code, info.reason
            report.error = f"the relay closed the connection: code={info.code} reason={info.reason!r}"
            report.daemon = "unknown"
            break
        except Exception as error:  # noqa: BLE001
            report.ok = False
            report.error = f"{type(error).__name__}: {error}"
            break
        frame = json.loads(text)
        if frame.get("code") == "RELAY_REDIRECT":
            report.in_band_redirect = frame.get("relayWsBaseUrl")
            continue
        report.daemon_round_trip_ms = round((time.perf_counter() - sent) * 1000, 2)
        if frame.get("type") == "relay_key_exchange_response":
            report.daemon = "answered"
        else:
            report.daemon = str(frame.get("code") or frame.get("type"))
        break
    if conn.is_open:
        yield conn.close()
    return report
