"""End-to-end: the relay's own TLS listener as real TLS clients see it (curl, OpenSSL with an ALPN offer)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import tempfile
from typing import Any, Dict

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.certs import make_certificates
from tests.support import RelayProcess, e2e_env, start_relays, stop_relays


@pytest.fixture(scope="module")
def relay() -> Any:
    """A dev relay serving wss:// with a certificate from a private CA."""
    certs = make_certificates(tempfile.mkdtemp(prefix="relay-tls-"))
    process = RelayProcess(e2e_env(RELAY_TLS="1", RELAY_TLS_CERT_PATH=certs.cert_path, RELAY_TLS_KEY_PATH=certs.key_path))
    pytest_twisted.blockon(start_relays(process))
    yield process, certs
    pytest_twisted.blockon(stop_relays(process))


def _port(process: RelayProcess) -> int:
    return int(process.url.rsplit(":", 1)[1].split("/", 1)[0])


def _alpn_handshake(port: int, ca_path: str, offer: list[str]) -> Dict[str, Any]:
    context = ssl.create_default_context(cafile=ca_path)
    context.set_alpn_protocols(offer)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
            return {"alpn": tls.selected_alpn_protocol(), "status": answer.split(b"\r\n", 1)[0].decode()}


@pytest_twisted.inlineCallbacks
def test_browser_like_alpn_offer_gets_http_1_1(relay: Any) -> Any:
    """An OpenSSL client offering h2 and http/1.1 (as browsers do) completes the handshake with http/1.1 selected."""
    process, certs = relay
    result = yield threads.deferToThread(_alpn_handshake, _port(process), certs.ca_path, ["h2", "http/1.1"])
    assert result == {"alpn": "http/1.1", "status": "HTTP/1.1 200 OK"}


@pytest_twisted.inlineCallbacks
def test_curl_reaches_health_over_tls(relay: Any) -> Any:
    """curl (which offers ALPN h2 and http/1.1) verifies the certificate against the CA and gets /health."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    process, certs = relay
    url = f"https://127.0.0.1:{_port(process)}/health"
    done = yield threads.deferToThread(
        subprocess.run, ["curl", "-sS", "--cacert", certs.ca_path, "-o", "-", "-w", "\n%{http_code}", url],
        capture_output=True, timeout=15,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().rsplit("\n", 1)[1] == "200"
