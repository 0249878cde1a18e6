"""Example Viewport daemon: stays connected (reconnecting with backoff), answers key exchanges and
echoes every e2ee envelope back to its session.

Real daemons encrypt; this one only shows the frame flow through the relay.

    python examples/daemon.py --token "$DAEMON_TOKEN" --workspace w1 --runtime-target rt1
"""

from __future__ import annotations

import argparse
import json
import secrets
from typing import Any

from twisted.internet import defer, task

from viewport.client import RelayConnection, ReconnectingConnection


def run(reactor: Any, args: argparse.Namespace) -> "defer.Deferred[None]":
    """Keep a daemon connection alive until stopped (or, with --once, until one envelope was echoed)."""
    done: defer.Deferred[None] = defer.Deferred()

    def connected(conn: RelayConnection) -> None:
        print(f"daemon connected to {conn.url}", flush=True)

    def message(text: str) -> None:
        frame = json.loads(text)
        if frame.get("type") == "relay_key_exchange_init":
            session_id = "s-" + secrets.token_hex(4)
            daemon.send_json({
                "type": "relay_key_exchange_response", "version": 3, "profile": frame["profile"],
                "requestId": frame["requestId"], "daemonPublicKey": "demo", "daemonEphemeralPublicKey": "demo",
                "encryptedMetadata": "demo", "sessionId": session_id, "proof": "demo", "epoch": 1,
            })
            print(f"key exchange {frame['requestId']} -> session {session_id}", flush=True)
        elif frame.get("type") == "e2ee":
            daemon.send_text(text)
            print(f"echoed envelope seq={frame['seq']} of session {frame['sessionId']}", flush=True)
            if args.once:
                daemon.stop().chainDeferred(done)

    def gave_up(error: Exception) -> None:
        print(f"not retrying: {error}", flush=True)
        if not done.called:
            done.errback(error)

    daemon = ReconnectingConnection(
        reactor, args.url, token_factory=lambda: args.token, role="workspace-daemon",
        workspace_id=args.workspace, runtime_target_id=args.runtime_target,
        on_connected=connected, on_message=message, on_gave_up=gave_up,
    )
    daemon.start()
    return done


def main() -> None:
    """Parse the command line and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:7781/ws")
    parser.add_argument("--token", required=True)
    parser.add_argument("--workspace", default="w1")
    parser.add_argument("--runtime-target", default="rt1")
    parser.add_argument("--once", action="store_true", help="exit after echoing one envelope")
    task.react(run, [parser.parse_args()])


if __name__ == "__main__":
    main()
