"""Python connections to a relay, as a daemon or as a browser-style client."""
