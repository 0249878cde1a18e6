"""End-to-end: the operator's status page (/admin) in headless Chromium, against traffic the test makes."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import inlineCallbacks

from tests.browser import Chromium
from tests.support import (
    ADMIN_TOKEN,
    REPO_ROOT,
    RelayProcess,
    e2e_env,
    envelope,
    http_request,
    kex_init,
    kex_response,
    open_peer,
    poll_until,
    start_relays,
    stop_all,
    stop_relays,
)

#: Where the page's screenshot is kept (a test artefact; the directory is git-ignored).
ARTIFACTS = os.environ.get("VIEWPORT_TEST_ARTIFACTS", os.path.join(REPO_ROOT, "test-artifacts"))
FRAMES = 400


@pytest.fixture(scope="module")
def relay() -> Any:
    """A relay with admin HTTP on and rate limits the test's burst stays under."""
    process = RelayProcess(e2e_env(RELAY_RUNTIME_RATE_PER_MINUTE="100000", RELAY_RUNTIME_RATE_PER_MINUTE_WORKSPACE="100000",
                                   RELAY_DAEMON_RUNTIME_RATE_PER_MINUTE="100000"))
    pytest_twisted.blockon(start_relays(process))
    yield process
    pytest_twisted.blockon(stop_relays(process))


@pytest_twisted.inlineCallbacks
def test_status_page_needs_the_admin_token(relay: RelayProcess) -> Any:
    """/admin and /admin/status answer 401 with a Basic challenge without the token; Basic or Bearer with it are let in."""
    status, headers, _ = yield http_request("GET", relay.http_url + "/admin")
    assert status == 401 and headers["www-authenticate"].startswith("Basic realm=")
    basic = "Basic " + base64.b64encode(f"operator:{ADMIN_TOKEN}".encode()).decode()
    status, headers, body = yield http_request("GET", relay.http_url + "/admin", {"Authorization": basic})
    assert status == 200 and headers["content-type"].startswith("text/html") and b"viewport-relay" in body
    status, _, body = yield http_request("GET", relay.http_url + "/admin/status", {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 200 and json.loads(body)["backplane"]["mode"] == "single"
    wrong = "Basic " + base64.b64encode(b"operator:not-the-token").decode()
    status, _, _ = yield http_request("GET", relay.http_url + "/admin/status", {"Authorization": wrong})
    assert status == 401


@inlineCallbacks
def traffic(relay: RelayProcess) -> Any:
    """A daemon and a client of workspace ``status-ws`` exchange a key and FRAMES envelopes each way."""
    daemon = yield open_peer(relay, "workspace-daemon", "status-ws", "rt1")
    client = yield open_peer(relay, "client", "status-ws", "rt1")
    client.send_text(kex_init("r1"))
    yield daemon.next_message()
    daemon.send_text(kex_response("r1", "s1"))
    yield client.next_message()
    for seq in range(1, FRAMES + 1):
        client.send_text(envelope("s1", seq))
        daemon.send_text(envelope("s1", seq))
    for _ in range(FRAMES):
        yield daemon.next_message()
        yield client.next_message()
    return daemon, client


@pytest_twisted.inlineCallbacks
def test_status_page_shows_live_traffic_in_chromium(relay: RelayProcess) -> Any:
    """Chromium shows the relay's mode, its connections, the scope with its daemon and the traffic rate; a screenshot is kept."""
    browser = Chromium()
    yield browser.start()
    peers: Any = ()
    try:
        page = yield browser.open_page()
        yield page.devtools.call(
            "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Bearer {ADMIN_TOKEN}"}}, page.session_id
        )
        yield page.navigate(relay.http_url + "/admin")
        yield poll_until(lambda: page.evaluate("Number(document.body.dataset.updates || 0) >= 1"), 10.0,
                         "the first snapshot on the page")
        peers = yield traffic(relay)

        @inlineCallbacks
        def shown() -> Any:
            values = yield page.evaluate(
                "({mode: document.getElementById('mode').textContent,"
                " backplane: document.getElementById('backplane').textContent,"
                " daemons: document.getElementById('daemons').textContent,"
                " clients: document.getElementById('clients').textContent,"
                " rate: document.getElementById('c2dRate').textContent,"
                " scope: Array.from(document.querySelectorAll('#scopes tr')).map(r => r.textContent).join('|')})"
            )
            return values if values["daemons"] == "1" and values["rate"] not in ("–", "0.0") else None

        values = yield poll_until(shown, 15.0, "the traffic on the page")
        assert values["mode"] == "dev" and values["backplane"] == "single · healthy"
        assert (values["daemons"], values["clients"]) == ("1", "1")
        assert "status-wsrt1here1" in values["scope"], values
        assert float(values["rate"]) > 0
        shot = yield page.devtools.call("Page.captureScreenshot", {"format": "png"}, page.session_id)
        os.makedirs(ARTIFACTS, exist_ok=True)
        path = os.path.join(ARTIFACTS, "status-page.png")
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(shot["data"]))
        assert os.path.getsize(path) > 1000
        print(f"status page screenshot: {path}")
        yield page.close()
    finally:
        yield stop_all(*peers)
        yield browser.stop()
