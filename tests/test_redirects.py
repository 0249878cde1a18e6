"""The redirect URL policy (docs/backplanes.md, How client redirect works) and the 307 Location."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from viewport.relay.redirects import redirect_location, redirect_url_allowed


def _allowed(url: str, mode: str = "dev", hosts: tuple = (), own: str = "wss://relay.example.com/ws") -> bool:
    return redirect_url_allowed(url, relay_mode=mode, allowed_hosts=hosts, own_public_url=own, tls_host="relay.example.com")


class RedirectPolicyTests(SynchronousTestCase):
    """One test per rule of the policy."""

    def test_dev_allows_ws_and_wss(self) -> None:
        """Outside prod, plain ws and wss URLs to any host are allowed."""
        self.assertTrue(_allowed("ws://10.0.0.2:7781/ws"))
        self.assertTrue(_allowed("wss://other.example/ws"))

    def test_non_websocket_schemes_refused(self) -> None:
        """https and relative URLs are never redirect targets."""
        self.assertFalse(_allowed("https://relay.example.com/ws"))
        self.assertFalse(_allowed("/ws"))

    def test_credentials_query_fragment_refused(self) -> None:
        """User info, a query or a fragment make a URL unusable."""
        for url in ("ws://u:p@h/ws", "ws://u@h/ws", "ws://h/ws?x=1", "ws://h/ws#f", "ws://h:99999/ws"):
            self.assertFalse(_allowed(url), url)

    def test_prod_requires_wss_and_known_host(self) -> None:
        """In prod only wss to this relay's public host or TLS host is allowed without a list."""
        self.assertTrue(_allowed("wss://relay.example.com:8443/ws", mode="prod"))
        self.assertFalse(_allowed("ws://relay.example.com/ws", mode="prod"))
        self.assertFalse(_allowed("wss://evil.example/ws", mode="prod"))

    def test_allow_list_decides_when_set(self) -> None:
        """With an allow-list, exactly the listed host names pass (port ignored)."""
        hosts = ("relay-b.example",)
        self.assertTrue(_allowed("wss://RELAY-B.example:9/ws", mode="prod", hosts=hosts))
        self.assertFalse(_allowed("wss://relay.example.com/ws", mode="prod", hosts=hosts))

    def test_location_keeps_query(self) -> None:
        """The 307 Location is the owner's URL with the client's role, workspace and target."""
        self.assertEqual(
            redirect_location("ws://b:1/ws", "client", "w:1", "rt 1", [("redirect", "http")]),
            "ws://b:1/ws?role=client&workspaceId=w%3A1&runtimeTargetId=rt+1&redirect=http",
        )
