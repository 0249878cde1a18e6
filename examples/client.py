"""Example browser-style client: key exchange with the daemon, then one e2ee envelope and its echo.

    python examples/client.py --token "$CLIENT_TOKEN" --workspace w1 --runtime-target rt1
"""

from __future__ import annotations

import argparse
import secrets
import time
from typing import Any

from twisted.internet import defer, task

from viewport.client import connect


@defer.inlineCallbacks
def run(reactor: Any, args: argparse.Namespace) -> Any:
    """Connect as a client (token in the subprotocol, as browsers do), exchange keys, send one envelope."""
    client = yield connect(
        reactor, args.url, token=args.token, role="client", workspace_id=args.workspace,
        runtime_target_id=args.runtime_target, token_via="subprotocol",
    )
    request_id = "req-" + secrets.token_hex(4)
    client.send_json({
        "type": "relay_key_exchange_init", "version": 3, "profile": "noise-ik", "requestId": request_id,
        "clientEphemeralPublicKey": "demo", "encryptedClientStatic": "demo",
    })
    response = yield client.next_json(timeout=10)
    if response.get("type") != "relay_key_exchange_response":
        raise SystemExit(f"unexpected answer: {response}")
    session_id = response["sessionId"]
    print(f"session {session_id} established", flush=True)
    started = time.perf_counter()
    client.send_json({
        "type": "e2ee", "version": 2, "profile": "noise-ik", "sessionId": session_id, "epoch": 1, "seq": 1,
        "iv": "aXY", "tag": "dGFn", "ciphertext": "aGVsbG8gZnJvbSB0aGUgYnJvd3Nlcg",
    })
    echo = yield client.next_json(timeout=10)
    elapsed_ms = (time.perf_counter() - started) * 1000
    print(f"e2ee envelope echoed by the daemon in {elapsed_ms:.1f} ms: seq={echo['seq']}", flush=True)
    yield client.close()


def main() -> None:
    """Parse the command line and run once."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:7781/ws")
    parser.add_argument("--token", required=True)
    parser.add_argument("--workspace", default="w1")
    parser.add_argument("--runtime-target", default="rt1")
    task.react(run, [parser.parse_args()])


if __name__ == "__main__":
    main()
