"""The private Redis Cluster test helper: one-shard clusters start, answer, and leave nothing behind."""

from __future__ import annotations

import os
import socket

import pytest

from tests.redis_cluster import SLOT_COUNT, RedisCluster, parse_cluster_nodes, single_shard
from tests.redis_server import redis_command


def _gone(cluster: RedisCluster) -> bool:
    """No node answers and the directory is removed."""
    for port in cluster.ports:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return False
        except OSError:
            pass
    return not os.path.exists(cluster.directory)


def test_single_shard_serves_every_slot() -> None:
    """A one-master cluster (no replica) is healthy, owns all slots, and ``stop()`` (twice) removes it."""
    cluster = single_shard()
    try:
        info = redis_command(cluster.ports[0], "CLUSTER", "INFO")
        assert isinstance(info, str) and "cluster_state:ok" in info and f"cluster_slots_ok:{SLOT_COUNT}" in info
        assert cluster.masters() == cluster.ports
        assert cluster.replicas_of(0) == cluster.replicas_of(SLOT_COUNT - 1) == []
        assert cluster.url == f"redis+cluster://127.0.0.1:{cluster.ports[0]}"
        assert cluster.key_slot("foo") == 12182
    finally:
        cluster.stop()
    cluster.stop()
    assert _gone(cluster)


def test_a_failed_start_stops_what_it_started() -> None:
    """A node that cannot bind its port fails ``start()`` with its log, and the other nodes are killed."""
    cluster = RedisCluster(masters=1, replicas=1)
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", cluster.nodes[1].port))
    blocker.listen()
    try:
        with pytest.raises(RuntimeError, match="exited with"):
            cluster.start()
    finally:
        blocker.close()
    assert not any(node.alive for node in cluster.nodes)
    assert _gone(cluster)


def test_context_manager_stops_on_error() -> None:
    """Leaving the ``with`` block by an exception still stops the cluster."""
    with pytest.raises(ZeroDivisionError):
        with RedisCluster(masters=1, replicas=0) as cluster:
            assert cluster.healthy()
            1 / 0
    assert _gone(cluster)


def test_parse_cluster_nodes() -> None:
    """CLUSTER NODES lines: address, flags, master, plain slot ranges (migration markers skipped)."""
    text = (
        "07c3 127.0.0.1:30004@31004 slave e7d1 0 1426238317239 4 connected\n"
        "e7d1 127.0.0.1:30001@31001,host myself,master - 0 0 1 connected 0-5460 7000 [5461->-292f]\n"
    )
    replica, master = parse_cluster_nodes(text)
    assert (replica.port, replica.is_master, replica.master_id, replica.slots) == (30004, False, "e7d1", ())
    assert (master.port, master.is_master, master.master_id) == (30001, True, None)
    assert master.slots == ((0, 5460), (7000, 7000)) and not master.failed
