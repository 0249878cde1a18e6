"""Redis Cluster addressing: CRC16 key slots and hash tags, slot maps from CLUSTER SHARDS/SLOTS, MOVED/ASK."""

from __future__ import annotations

import random
import socket
import string
from typing import Any, Iterator, List

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.redis_cluster import RedisCluster, single_shard
from tests.redis_server import redis_command
from viewport.relay.backplane.cluster_slots import (
    SLOT_COUNT,
    Redirect,
    Shard,
    ShardNode,
    SlotMap,
    crc16,
    hash_tag,
    key_slot,
    parse_redirect,
)

# A CLUSTER SHARDS reply as redis-server 7.0.15 sends it (one shard's replica still "loading").
SHARDS_REPLY: List[Any] = [
    ["slots", [10923, 16383], "nodes", [
        ["id", "c" * 40, "port", 7002, "ip", "127.0.0.1", "endpoint", "127.0.0.1", "role", "master",
         "replication-offset", 98, "health", "online"],
        ["id", "f" * 40, "port", 7005, "ip", "127.0.0.1", "endpoint", "127.0.0.1", "role", "replica",
         "replication-offset", 0, "health", "loading"],
    ]],
    ["slots", [0, 5460], "nodes", [
        ["id", "a" * 40, "port", 7000, "ip", "127.0.0.1", "endpoint", "127.0.0.1", "role", "master",
         "replication-offset", 98, "health", "online"],
        ["id", "d" * 40, "port", 7003, "ip", "127.0.0.1", "endpoint", "127.0.0.1", "role", "replica",
         "replication-offset", 98, "health", "online"],
    ]],
    ["slots", [5461, 10922], "nodes", [
        ["id", "b" * 40, "port", 7001, "ip", "127.0.0.1", "endpoint", "127.0.0.1", "role", "master",
         "replication-offset", 98, "health", "online"],
        ["id", "e" * 40, "port", 7004, "ip", "127.0.0.1", "endpoint", "127.0.0.1", "role", "replica",
         "replication-offset", 98, "health", "failed"],
    ]],
]

# The same cluster through CLUSTER SLOTS (7.0 leaves out replicas that are failed or still at offset 0).
SLOTS_REPLY: List[Any] = [
    [0, 5460, ["127.0.0.1", 7000, "a" * 40, []], ["127.0.0.1", 7003, "d" * 40, []]],
    [5461, 10922, ["127.0.0.1", 7001, "b" * 40, []]],
    [10923, 16383, ["127.0.0.1", 7002, "c" * 40, []]],
]


class KeySlotTests(SynchronousTestCase):
    """The slot of a key: CRC16/XMODEM of the key (or its hash tag) modulo 16384."""

    def test_crc16_check_value(self) -> None:
        """The XMODEM check value: CRC16 of "123456789" is 0x31C3."""
        self.assertEqual(crc16(b"123456789"), 0x31C3)
        self.assertEqual(crc16(b""), 0)

    def test_known_slots(self) -> None:
        """Slots published in the Redis documentation and measured on redis-server 7.0.15."""
        self.assertEqual(key_slot("foo"), 12182)
        self.assertEqual(key_slot("somekey"), 11058)
        self.assertEqual(key_slot("foo{hash_tag}"), 2515)
        self.assertEqual(key_slot("123456789"), 12739)
        self.assertEqual(key_slot(""), 0)

    def test_hash_tags_share_a_slot(self) -> None:
        """Keys with the same ``{tag}`` land in the tag's slot."""
        self.assertEqual(key_slot("{user1000}.following"), 3443)
        self.assertEqual(key_slot("{user1000}.followers"), 3443)
        self.assertEqual(key_slot("{user1000}.following"), key_slot("user1000"))

    def test_hash_tag_rules(self) -> None:
        """First ``{`` to the first ``}`` after it; an empty or unclosed tag hashes the whole key."""
        self.assertEqual(hash_tag(b"foo{bar}{zap}"), b"bar")
        self.assertEqual(hash_tag(b"foo{}{bar}"), b"foo{}{bar}")
        self.assertEqual(hash_tag(b"foo{{bar}}zap"), b"{bar")
        self.assertEqual(hash_tag(b"foo{bar"), b"foo{bar")
        self.assertEqual(hash_tag(b"}foo{bar}"), b"bar")
        self.assertEqual(hash_tag(b"{}"), b"{}")
        self.assertEqual(hash_tag(b"plain"), b"plain")

    def test_text_is_hashed_as_utf8(self) -> None:
        """A str key has the slot of its UTF-8 bytes."""
        self.assertEqual(key_slot("café:{wörkspace}"), key_slot("café:{wörkspace}".encode("utf-8")))
        self.assertEqual(key_slot("x{wörkspace}y"), key_slot("wörkspace"))


class RedirectTests(SynchronousTestCase):
    """``MOVED``/``ASK`` error texts become ``Redirect`` values."""

    def test_moved(self) -> None:
        """``MOVED <slot> <host>:<port>``."""
        self.assertEqual(parse_redirect("MOVED 12182 127.0.0.1:7002"), Redirect("MOVED", 12182, "127.0.0.1", 7002))

    def test_ask(self) -> None:
        """``ASK <slot> <host>:<port>``, also with the leading ``-`` of the wire form."""
        self.assertEqual(parse_redirect("-ASK 3999 10.0.0.5:6381"), Redirect("ASK", 3999, "10.0.0.5", 6381))

    def test_ipv6_and_hostnames(self) -> None:
        """Redis does not bracket IPv6 endpoints: the port follows the last colon."""
        self.assertEqual(parse_redirect("MOVED 1 ::1:6380").address, ("::1", 6380))  # type: ignore[union-attr]
        self.assertEqual(parse_redirect("MOVED 1 [::1]:6380").address, ("::1", 6380))  # type: ignore[union-attr]
        self.assertEqual(parse_redirect("MOVED 1 redis-2.internal:6380").address,  # type: ignore[union-attr]
                         ("redis-2.internal", 6380))

    def test_unknown_endpoint_means_the_asked_host(self) -> None:
        """``MOVED 3999 :6380`` (unknown endpoint) and ``?:6380`` (no hostname set) name the host asked."""
        self.assertEqual(parse_redirect("MOVED 3999 :6380", asked_host="10.1.1.1"), Redirect("MOVED", 3999, "10.1.1.1", 6380))
        self.assertEqual(parse_redirect("MOVED 3999 ?:6380", asked_host="10.1.1.1"), Redirect("MOVED", 3999, "10.1.1.1", 6380))

    def test_not_a_redirect(self) -> None:
        """Other errors and malformed redirections give None."""
        for text in ("CROSSSLOT Keys in request don't hash to the same slot", "MOVED", "MOVED 1", "MOVED x 1.2.3.4:5",
                     "MOVED 16384 1.2.3.4:5", "MOVED 1 1.2.3.4", "MOVED 1 1.2.3.4:0", "MOVED 1 1.2.3.4:99999",
                     "ASK 1 2 3", "MOVED ² h:1", "CLUSTERDOWN The cluster is down", ""):
            self.assertIsNone(parse_redirect(text), text)


class SlotMapTests(SynchronousTestCase):
    """A ``SlotMap`` answers which master and replicas serve a slot."""

    def test_from_shards(self) -> None:
        """CLUSTER SHARDS: each range maps to its master; replicas failed or loading are left out by default."""
        slots = SlotMap.from_shards(SHARDS_REPLY)
        self.assertTrue(slots.complete)
        self.assertEqual(slots.uncovered(), ())
        self.assertEqual(slots.master_for(0), ("127.0.0.1", 7000))
        self.assertEqual(slots.master_for(5460), ("127.0.0.1", 7000))
        self.assertEqual(slots.master_for(5461), ("127.0.0.1", 7001))
        self.assertEqual(slots.master_for(key_slot("foo")), ("127.0.0.1", 7002))
        self.assertEqual(slots.replicas_for(0), (("127.0.0.1", 7003),))
        self.assertEqual(slots.replicas_for(6000), ())
        self.assertEqual(slots.replicas_for(6000, usable_only=False), (("127.0.0.1", 7004),))
        self.assertEqual(slots.replicas_for(16383), ())
        self.assertEqual(slots.masters(), (("127.0.0.1", 7000), ("127.0.0.1", 7001), ("127.0.0.1", 7002)))
        shard = slots.shard_for(100)
        assert shard is not None and shard.master is not None
        self.assertEqual((shard.master.node_id, shard.master.health, shard.ranges), ("a" * 40, "online", ((0, 5460),)))

    def test_from_slots_agrees(self) -> None:
        """CLUSTER SLOTS gives the same masters (and whatever replicas it lists)."""
        slots = SlotMap.from_slots(SLOTS_REPLY)
        shards = SlotMap.from_shards(SHARDS_REPLY)
        for slot in range(0, SLOT_COUNT, 97):
            self.assertEqual(slots.master_for(slot), shards.master_for(slot))
        self.assertEqual(slots.replicas_for(0), (("127.0.0.1", 7003),))
        shard = slots.shard_for(0)
        assert shard is not None and shard.master is not None
        self.assertEqual(shard.master.node_id, "a" * 40)

    def test_from_slots_merges_ranges_of_one_master(self) -> None:
        """Several CLUSTER SLOTS entries of one master form one shard with several ranges."""
        reply = [[0, 99, ["h", 1]], [200, 299, ["h", 1], ["r", 2]], [100, 199, ["g", 3]]]
        slots = SlotMap.from_slots(reply)
        self.assertEqual(len(slots.shards), 2)
        self.assertEqual(slots.shards[0].ranges, ((0, 99), (200, 299)))
        self.assertEqual(slots.replicas_for(50), (("r", 2),))
        self.assertEqual(slots.uncovered(), ((300, SLOT_COUNT - 1),))
        self.assertFalse(slots.complete)
        self.assertIsNone(slots.master_for(300))
        self.assertIsNone(slots.shard_for(300))
        self.assertEqual(slots.replicas_for(300), ())

    def test_unknown_endpoints(self) -> None:
        """SHARDS ``endpoint ""`` / SLOTS NULL mean the host asked; ``?`` falls back to the node's IP."""
        shards = [["slots", [0, 16383], "nodes", [
            ["id", "a" * 40, "port", 7000, "ip", "10.0.0.1", "endpoint", "", "role", "master", "health", "online"],
            ["id", "b" * 40, "port", 7001, "ip", "10.0.0.2", "endpoint", "?", "role", "replica", "health", "online"],
        ]]]
        slots = SlotMap.from_shards(shards, asked_host="lb.example")
        self.assertEqual(slots.master_for(0), ("lb.example", 7000))
        self.assertEqual(slots.replicas_for(0), (("10.0.0.2", 7001),))
        reply = [[0, 16383, [None, 7000, "a" * 40, ["ip", "10.0.0.1"]], ["?", 7001, "b" * 40, ["ip", "10.0.0.2"]]]]
        slots = SlotMap.from_slots(reply, asked_host="lb.example")
        self.assertEqual(slots.master_for(0), ("lb.example", 7000))
        self.assertEqual(slots.replicas_for(0), (("10.0.0.2", 7001),))

    def test_bytes_and_string_numbers(self) -> None:
        """Replies read without a charset (bytes) or with numbers as text parse the same."""
        shards = [[b"slots", [b"0", b"16383"], b"nodes", [
            [b"id", b"a" * 40, b"port", b"7000", b"ip", b"127.0.0.1", b"endpoint", b"127.0.0.1", b"role", b"master",
             b"health", b"online"],
        ]]]
        self.assertEqual(SlotMap.from_shards(shards).master_for(16383), ("127.0.0.1", 7000))

    def test_tls_port(self) -> None:
        """A node with only a ``tls-port`` is reached on it."""
        shards = [["slots", [0, 16383], "nodes", [["id", "a", "tls-port", 6390, "endpoint", "h", "role", "master"]]]]
        self.assertEqual(SlotMap.from_shards(shards).master_for(1), ("h", 6390))

    def test_shard_without_slots_or_master(self) -> None:
        """A shard with no slots serves nothing; a shard with no master serves nothing whatever it claims."""
        shards = [
            ["slots", [], "nodes", [["id", "a", "port", 1, "endpoint", "h", "role", "master", "health", "online"]]],
            ["slots", [0, 16383], "nodes", [["id", "b", "port", 2, "endpoint", "h", "role", "replica", "health", "online"]]],
        ]
        slots = SlotMap.from_shards(shards)
        self.assertEqual(slots.uncovered(), ((0, SLOT_COUNT - 1),))
        self.assertEqual(slots.masters(), ())

    def test_prefers_the_master_not_failed(self) -> None:
        """While a failover settles a shard may list two masters: the failed one is not chosen."""
        shards = [["slots", [0, 16383], "nodes", [
            ["id", "a", "port", 1, "endpoint", "h", "role", "master", "health", "failed"],
            ["id", "b", "port", 2, "endpoint", "h", "role", "master", "health", "online"],
        ]]]
        self.assertEqual(SlotMap.from_shards(shards).master_for(0), ("h", 2))

    def test_invalid_ranges(self) -> None:
        """A range outside 0–16383 or a slot claimed by two shards is refused."""
        master = ShardNode("a", "h", 1, "master")
        with self.assertRaises(ValueError):
            SlotMap([Shard(((0, SLOT_COUNT),), master)])
        with self.assertRaises(ValueError):
            SlotMap([Shard(((0, 10),), master), Shard(((10, 20),), ShardNode("b", "h", 2, "master"))])

    def test_moved_patches_one_slot(self) -> None:
        """After MOVED the slot belongs to the named master's shard; other slots stay; the map itself is unchanged."""
        slots = SlotMap.from_shards(SHARDS_REPLY)
        moved = slots.moved(Redirect("MOVED", 100, "127.0.0.1", 7001))
        self.assertEqual(moved.master_for(100), ("127.0.0.1", 7001))
        self.assertEqual(moved.replicas_for(100, usable_only=False), (("127.0.0.1", 7004),))
        self.assertEqual(moved.master_for(99), ("127.0.0.1", 7000))
        self.assertEqual(slots.master_for(100), ("127.0.0.1", 7000))
        shard = moved.shard_for(0)
        assert shard is not None
        self.assertEqual(shard.ranges, ((0, 99), (101, 5460)))

    def test_moved_to_an_unknown_master(self) -> None:
        """MOVED to a master the map does not know adds a shard for it (no replicas known)."""
        moved = SlotMap.from_shards(SHARDS_REPLY).moved(Redirect("MOVED", 5, "10.9.9.9", 7777))
        self.assertEqual(moved.master_for(5), ("10.9.9.9", 7777))
        self.assertEqual(moved.replicas_for(5), ())
        self.assertEqual(len(moved.shards), 4)
        self.assertTrue(moved.complete)

    def test_ask_changes_nothing(self) -> None:
        """ASK redirects one command: the map stays as it is."""
        slots = SlotMap.from_shards(SHARDS_REPLY)
        self.assertIs(slots.moved(Redirect("ASK", 5, "10.9.9.9", 7777)), slots)


# -- against a real (one-shard) cluster ---------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_cluster() -> Iterator[RedisCluster]:
    """A private one-master, one-replica cluster for this module."""
    cluster = single_shard(replica=True)
    try:
        yield cluster
    finally:
        cluster.stop()


def _keyslots(port: int, keys: List[str]) -> List[int]:
    """``CLUSTER KEYSLOT`` of every key, pipelined over one connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        request = bytearray()
        for key in keys:
            parts = [b"CLUSTER", b"KEYSLOT", key.encode("utf-8")]
            request += b"*3\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)
        conn.sendall(bytes(request))
        reader = conn.makefile("rb")
        replies = [reader.readline() for _ in keys]
    assert all(reply.startswith(b":") for reply in replies), replies[:3]
    return [int(reply[1:]) for reply in replies]


def test_key_slots_match_redis(shard_cluster: RedisCluster) -> None:
    """``key_slot`` agrees with ``CLUSTER KEYSLOT`` on 3000 keys: random, relay-shaped, hash-tagged, odd braces, non-ASCII."""
    rng = random.Random(20240607)
    alphabet = string.ascii_letters + string.digits + ":{}-_ é€"
    keys = ["", "{", "}", "{}", "{}{x}", "{{}}", "a{b}c{d}", "x{}y", "{ü}", "foo", "{user1000}.following"]
    keys += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(2500)]
    keys += [f"viewport:relay:bus:daemon:{n}:ws-{n}:rt-{rng.randint(0, 999)}" for n in range(300)]
    keys += [f"{{viewport:{n}}}:bus:clients" for n in range(189)]
    assert len(keys) == 3000
    assert [key_slot(key) for key in keys] == _keyslots(shard_cluster.ports[0], keys)


def test_slot_map_from_a_real_single_shard(shard_cluster: RedisCluster) -> None:
    """The one-shard cluster's SHARDS and SLOTS replies give one master owning every slot, with its replica."""
    master_port, replica_port = shard_cluster.masters()[0], shard_cluster.replicas_of(0)[0]
    for port in shard_cluster.ports:
        for slots in (SlotMap.from_shards(redis_command(port, "CLUSTER", "SHARDS")),  # type: ignore[arg-type]
                      SlotMap.from_slots(redis_command(port, "CLUSTER", "SLOTS"))):  # type: ignore[arg-type]
            assert slots.complete
            assert slots.masters() == (("127.0.0.1", master_port),)
            assert slots.replicas_for(0) == slots.replicas_for(SLOT_COUNT - 1) == (("127.0.0.1", replica_port),)
