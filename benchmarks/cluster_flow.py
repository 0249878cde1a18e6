"""
The redis backplane on a Redis Cluster of 1 shard and of N shards (``cross_relay.py --cluster``).

For each shard count a private cluster is started (masters only: replicas would only copy the load), relays A
and B join it with ``RELAY_BACKPLANE_URL=redis+cluster://…``, and ``cross_flow``'s figure runs: many workspaces
(daemons on A, clients on B), ``--flow-window`` envelopes in flight each, one direction at a time. Per shard
count it prints frames/s and CPU µs per frame (relays, all nodes), and per node its CPU and its share of the
commands it processed (``total_commands_processed`` from ``INFO stats``), with the workspaces whose hash tag
it owns: how evenly the scopes spread. Prints numbers; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any, Dict, List

from benchmarks.cross_flow import DIRECTIONS, figures, run_flow
from benchmarks.harness import table


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``--cluster`` on ``cross_relay.py``'s command line."""
    group = parser.add_argument_group("Redis Cluster figure (--cluster)")
    group.add_argument("--cluster", action="store_true",
                       help="the cross-relay figure on private Redis Clusters (1 shard, then --cluster-shards)")
    group.add_argument("--cluster-shards", default="1,3", help="comma-separated shard counts to compare")


def _commands_processed(port: int) -> int:
    from tests.redis_server import redis_command

    text = str(redis_command(port, "INFO", "stats"))
    for line in text.splitlines():
        if line.startswith("total_commands_processed:"):
            return int(line.split(":", 1)[1])
    return 0


def _workspaces_per_node(cluster: Any, count: int, run_prefix: str) -> Dict[int, int]:
    """How many of the generator's workspaces (``rawws.Pair`` names) hash to each master."""
    from viewport.relay.backplane.cluster_slots import key_slot
    from viewport.relay.backplane.redis_cluster import scope_tag

    owners: Dict[int, int] = {}
    for index in range(count):
        slot = key_slot(scope_tag(f"{run_prefix}-w{index}", f"{run_prefix}-rt{index}"))
        port = cluster.master_of(slot)
        owners[port] = owners.get(port, 0) + 1
    return owners


def run_shards(shards: int, args: argparse.Namespace) -> Dict[str, Any]:
    """One cluster of ``shards`` masters: the flow figure, CPU per node, commands per node."""
    from tests.redis_cluster import RedisCluster

    cluster = RedisCluster(masters=shards, replicas=0).start()
    try:
        ports = cluster.masters()
        nodes = {f"node {port}": cluster.node(port) for port in ports}
        node_pids = {name: node._process.pid for name, node in nodes.items() if node._process is not None}
        options = copy.copy(args)
        options.redis_url = cluster.url
        before = {port: _commands_processed(port) for port in ports}
        run = run_flow("ours", "redis", options, f"{shards} shard{'s' if shards > 1 else ''}", node_pids=node_pids)
        commands = {port: _commands_processed(port) - before[port] for port in ports}
        run["shards"] = shards
        run["commands"] = commands
        run["node_cpu"] = {
            name: sum(run["directions"][d]["cpu"].get(name, 0.0) for d in DIRECTIONS) for name in node_pids
        }
        label = run["label"]
        run["spread"] = _workspaces_per_node(cluster, args.flow_workspaces, run["prefix"])
        print(f"[{label}] commands per node: {commands}", flush=True)
        return run
    finally:
        cluster.stop()


def report(runs: List[Dict[str, Any]]) -> None:
    """Frames/s and CPU per frame per shard count and direction; then each node's load."""
    rows = []
    for run in runs:
        for direction in DIRECTIONS:
            f = figures(run, direction, None)
            rows.append([run["shards"], direction, f"{f['frames_s']:,.0f}", f"{f['p50_ms']:.2f}", f"{f['p99_ms']:.2f}",
                         f"{f['A_us']:.1f}", f"{f['B_us']:.1f}", f"{f['backplane_us']:.1f}", int(f["lost"])])
    print()
    print(table(["shards", "direction", "frames/s", "p50 ms", "p99 ms", "A µs/frame", "B µs/frame",
                 "all nodes µs/frame", "lost"], rows))
    node_rows = []
    for run in runs:
        total = sum(run["commands"].values()) or 1
        for port, count in sorted(run["commands"].items()):
            cpu = run["node_cpu"].get(f"node {port}", float("nan"))
            node_rows.append([run["shards"], port, run["spread"].get(port, "-"), f"{count:,}",
                              f"{100.0 * count / total:.1f} %", f"{cpu:.2f}"])
    print()
    print(table(["shards", "node", "workspaces owned", "commands", "share", "CPU s (both directions)"], node_rows))
    print()
    print("frames/s: delivered while sending (both relays are single Python processes: with one shard Redis is not "
          "the limit, so more shards mostly spread the nodes' load; they add capacity once Redis is the bottleneck).")


def measure_cluster(args: argparse.Namespace) -> int:
    """Run the figure for each shard count and print the tables."""
    counts = [int(text) for text in args.cluster_shards.split(",") if text.strip()]
    runs: List[Dict[str, Any]] = []
    for shards in counts:
        runs.append(run_shards(shards, args))
    report(runs)
    return 0


__all__ = ["add_cluster_arguments", "measure_cluster", "run_shards"]
