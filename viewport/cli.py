"""The ``viewport-relay`` command: operator subcommands (``token`` mints a local relay token)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Mapping, Optional, Sequence

from viewport import __version__
from viewport.environment import ConfigError
from viewport.relay.config import by_variable, load_config
from viewport.tokens import load_or_create_secret, mint_token

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``1h`` or ``7d`` as whole seconds (> 0)."""
    match = _DURATION.match(text)
    if match is None or int(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}; use e.g. 90s, 15m, 1h, 7d")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _token_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = sub.add_parser(
        "token",
        help="mint a relay token signed with the relay's local key",
        description=(
            "Mint a relay token (JWT) for a daemon, client or worker. The key is the one the relay "
            "uses: RELAY_TOKEN_SECRET, else the embedded secret file (RELAY_TOKEN_SECRET_FILE, "
            "default ~/.viewport/relay-token-secret, created if missing), or --private-key for "
            "EdDSA/RS256 relays configured with RELAY_TOKEN_PUBLIC_KEY."
        ),
    )
    parser.add_argument("--role", required=True, choices=("workspace-daemon", "client", "worker"))
    parser.add_argument("--workspace", required=True, help="workspaceId claim")
    parser.add_argument("--runtime-target", help="runtimeTargetId claim")
    parser.add_argument("--scope", choices=("runtime", "pairing", "session-events"),
                        help="client scope (default runtime for clients)")
    parser.add_argument("--client-id", help="clientId claim")
    parser.add_argument("--machine-id", help="machineId claim")
    parser.add_argument("--e2ee-profile", choices=("noise-ik", "noise-ikpsk2"))
    parser.add_argument("--daemon-generation", type=int, help="daemonIssueGeneration claim")
    parser.add_argument("--session-channel", action="append", default=[],
                        help="sessionChannels entry (agent-session:...); repeatable")
    parser.add_argument("--managed-executor-id", help="managedExecutorId claim (workers)")
    parser.add_argument("--ttl", type=parse_duration, default=3600, help="lifetime, e.g. 1h (default 1h)")
    parser.add_argument("--private-key", help="PEM private key (EdDSA or RS256) instead of the HS256 secret")
    parser.add_argument("--algorithm", choices=("EdDSA", "RS256"), default="EdDSA",
                        help="algorithm for --private-key (default EdDSA)")
    parser.add_argument("--force", action="store_true",
                        help="mint even when the relay this environment configures would refuse the token")


def _check_config_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = sub.add_parser(
        "check-config",
        help="validate the environment as the relay's startup would, print the effective configuration",
        description=(
            "Validate the relay's environment variables exactly as 'twistd viewport-relay' does at startup and "
            "print the effective configuration as JSON, secrets masked. Exits 0 when valid, 2 with a "
            "one-line message naming the variable otherwise."
        ),
    )
    parser.add_argument("--host", help="as twistd's --host")
    parser.add_argument("--port", type=int, help="as twistd's --port")


def _probe_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = sub.add_parser(
        "probe",
        help="connect as a client and report admission, redirects and latency to the daemon",
        description=(
            "Connect to a relay's /ws URL as a browser-style client with the given token, follow "
            "redirects, send one key-exchange init and report, as JSON: admission (or the HTTP status "
            "of the refusal), redirects, connect time and the daemon's answer with its round trip. "
            "Exits 0 when admitted, 1 otherwise."
        ),
    )
    parser.add_argument("url", help="relay WebSocket URL, e.g. ws://127.0.0.1:7781/ws")
    parser.add_argument("--token", required=True, help="client relay token (see 'token')")
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--runtime-target")
    parser.add_argument("--http-redirect", action="store_true", help="ask for HTTP 307 redirects (redirect=http)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each step (default 5)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="viewport-relay",
        description="Operator commands of the Viewport relay. Run the relay itself with: twistd -n viewport-relay",
    )
    parser.add_argument("--version", action="version", version=f"viewport-relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _check_config_parser(sub)
    _token_parser(sub)
    _probe_parser(sub)
    return parser


def run_probe(args: argparse.Namespace) -> int:
    """Run one probe on a fresh reactor and print its report."""
    from twisted.internet import task

    from viewport.probe import probe

    outcome: dict[str, int] = {}

    def go(reactor: object) -> object:
        d = probe(
            reactor, args.url, token=args.token, workspace_id=args.workspace,
            runtime_target_id=args.runtime_target, http_redirect=args.http_redirect, timeout=args.timeout,
        )

        def show(report: object) -> None:
            print(json.dumps(report.to_json(), indent=2))  # type: ignore[attr-defined]
            outcome["code"] = 0 if report.ok else 1  # type: ignore[attr-defined]

        return d.addCallback(show)

    try:
        task.react(go)  # type: ignore[arg-type]
    except SystemExit as stop:
        if stop.code not in (0, None):
            return int(stop.code) if isinstance(stop.code, int) else 1
    return outcome.get("code", 1)


def run_check_config(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Print the masked effective configuration; ConfigError propagates to main's error line."""
    overrides: dict[str, object] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    config = load_config(environ, overrides, home=environ.get("HOME"))
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps(by_variable(config), indent=2))
    return 0


def token_claims(args: argparse.Namespace) -> dict[str, object]:
    """The camelCase claims a ``token`` invocation asks for."""
    claims: dict[str, object] = {"role": args.role, "workspaceId": args.workspace}
    optional = {
        "runtimeTargetId": args.runtime_target,
        "clientId": args.client_id,
        "machineId": args.machine_id,
        "e2eeProfile": args.e2ee_profile,
        "daemonIssueGeneration": args.daemon_generation,
        "managedExecutorId": args.managed_executor_id,
    }
    claims.update({k: v for k, v in optional.items() if v is not None})
    if args.role == "client":
        claims["scope"] = args.scope or "runtime"
    if args.session_channel:
        claims["sessionChannels"] = list(args.session_channel)
    return claims


def _token_mismatch(admission: str, private_key: bool) -> Optional[str]:
    """Why the relay this environment configures would refuse a token minted this way (None: it accepts it)."""
    if admission == "platform":
        return (
            "the relay this environment configures admits through the Viewport platform (admission: platform), "
            "so it would refuse a token minted here; set RELAY_TOKEN_SECRET (or RELAY_TOKEN_PUBLIC_KEY with "
            "--private-key), or HOST to a loopback address for the embedded secret"
        )
    if admission == "local_public_key" and not private_key:
        return "the relay verifies EdDSA/RS256 tokens with RELAY_TOKEN_PUBLIC_KEY: pass --private-key with its private key"
    if admission in ("local_secret", "embedded_secret_file") and private_key:
        return "the relay verifies HS256 tokens with its secret; --private-key tokens would be refused"
    return None


def run_token(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Print one freshly minted token on stdout, unless the relay configured here would refuse it."""
    config = load_config(environ, home=environ.get("HOME"))
    mismatch = _token_mismatch(config.admission.mode, bool(args.private_key))
    if mismatch is not None:
        if not args.force:
            print(f"viewport-relay token: {mismatch} (--force mints it anyway)", file=sys.stderr)
            return 2
        print(f"warning: {mismatch}", file=sys.stderr)
    if args.private_key:
        with open(args.private_key, "rb") as handle:
            key: str | bytes = handle.read()
        algorithm = args.algorithm
    elif config.admission.token_secret is not None:
        key, algorithm = config.admission.token_secret, "HS256"
    else:
        key, created = load_or_create_secret(config.admission.token_secret_file)
        algorithm = "HS256"
        if created:
            print(f"created token secret {config.admission.token_secret_file}", file=sys.stderr)
    token = mint_token(
        key=key,
        algorithm=algorithm,
        claims=token_claims(args),
        ttl_seconds=args.ttl,
        now=time.time(),
        issuer=config.admission.token_issuer,
        audience=config.admission.token_audience,
    )
    print(token)
    return 0


def main(argv: Optional[Sequence[str]] = None, environ: Optional[Mapping[str, str]] = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    env = environ if environ is not None else os.environ
    try:
        if args.command == "token":
            return run_token(args, env)
        if args.command == "check-config":
            return run_check_config(args, env)
        if args.command == "probe":
            return run_probe(args)
    except (ConfigError, ValueError, OSError) as error:
        print(f"viewport-relay {args.command}: {error}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
