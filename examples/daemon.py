"""Example Viewport daemon: answers key exchanges and echoes every e2ee envelope back to its session.

Real daemons encrypt; this one only shows the frame flow through the relay.

    python examples/daemon.py --token "$DAEMON_TOKEN" --workspace w1 --runtime-target rt1
"""

from __future__ import annotations

import argparse
import json
import secrets
from typing import Any

from twisted.internet import defer, task

from viewport.client import connect


@defer.inlineCallbacks
def run(reactor: Any, args: argparse.Namespace) -> Any:
    """Connect as the workspace daemon, then serve until the relay closes the socket."""
    daemon = yield connect(
        reactor, args.url, token=args.token, role="workspace-daemon",
        workspace_id=args.workspace, runtime_target_id=args.runtime_target,
    )
    print(f"daemon connected to {args.url}", flush=True)
    while daemon.is_open:
        try:
            frame = json.loads((yield daemon.next_message(timeout=None)))
        except Exception:
            break
        if frame.get("type") == "relay_key_exchange_init":
            session_id = "s-" + secrets.token_hex(4)
            daemon.send_json({
                "type": "relay_key_exchange_response", "version": 3, "profile": frame["profile"],
                "requestId": frame["requestId"], "daemonPublicKey": "demo", "daemonEphemeralPublicKey": "demo",
                "encryptedMetadata": "demo", "sessionId": session_id, "proof": "demo", "epoch": 1,
            })
            print(f"key exchange {frame['requestId']} -> session {session_id}", flush=True)
        elif frame.get("type") == "e2ee":
            daemon.send_json(frame)
            print(f"echoed envelope seq={frame['seq']} of session {frame['sessionId']}", flush=True)
        if args.once and frame.get("type") == "e2ee":
            break
    yield daemon.close()


def main() -> None:
    """Parse the command line and run until done."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:7781/ws")
    parser.add_argument("--token", required=True)
    parser.add_argument("--workspace", default="w1")
    parser.add_argument("--runtime-target", default="rt1")
    parser.add_argument("--once", action="store_true", help="exit after echoing one envelope")
    task.react(run, [parser.parse_args()])


if __name__ == "__main__":
    main()
