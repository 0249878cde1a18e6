"""Redis Cluster addressing, pure: key slots (CRC16/XMODEM, hash tags), slot maps, MOVED/ASK redirections."""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Literal, Mapping, Optional, Sequence, Tuple, Union

SLOT_COUNT = 16384
_NO_SHARD = -1

#: ``(host, port)`` of a cluster node.
Address = Tuple[str, int]
SlotRange = Tuple[int, int]


def _crc16_table() -> Tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC16_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC-16/XMODEM (polynomial 0x1021, initial 0, no reflection): ``crc16(b"123456789") == 0x31C3``."""
    crc = 0
    table = _CRC16_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFF00) ^ table[(crc >> 8) ^ byte]
    return crc


def hash_tag(key: bytes) -> bytes:
    """
    The part of ``key`` that decides its slot: what lies between the first ``{`` and the first ``}``
    after it, when that is not empty; otherwise the whole key.
    """
    start = key.find(b"{")
    if start < 0:
        return key
    end = key.find(b"}", start + 1)
    if end <= start + 1:  # no closing brace, or "{}"
        return key
    return key[start + 1 : end]


def key_slot(key: Union[str, bytes]) -> int:
    """The cluster slot (0–16383) of a key or shard channel name; text is hashed as UTF-8."""
    raw = key.encode("utf-8") if isinstance(key, str) else key
    return crc16(hash_tag(raw)) & (SLOT_COUNT - 1)


# -- redirections -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Redirect:
    """A ``-MOVED`` (the slot lives elsewhere now) or ``-ASK`` (this one command goes elsewhere) reply."""

    kind: Literal["MOVED", "ASK"]
    slot: int
    host: str
    port: int

    @property
    def address(self) -> Address:
        """Where to send the command."""
        return (self.host, self.port)


def parse_redirect(text: str, asked_host: str = "") -> Optional[Redirect]:
    """
    Parse ``MOVED <slot> <endpoint>:<port>`` or ``ASK …`` (an optional leading ``-`` is allowed).

    The port follows the last colon, so an IPv6 endpoint (Redis does not bracket it) keeps its own
    colons. An empty endpoint (``MOVED 3999 :6380``) or ``?`` (a hostname preferred but none set) means
    "the host you asked", which is ``asked_host``. None when ``text`` is not a well-formed redirection.
    """
    parts = text.lstrip("-").split(" ")
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    kind, slot_text, endpoint = parts
    host, colon, port_text = endpoint.rpartition(":")
    if not colon or not (slot_text + port_text).isascii() or not slot_text.isdigit() or not port_text.isdigit():
        return None
    slot, port = int(slot_text), int(port_text)
    if slot >= SLOT_COUNT or not 0 < port < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "?":
        host = ""
    return Redirect("MOVED" if kind == "MOVED" else "ASK", slot, host or asked_host, port)


# -- slot maps --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardNode:
    """One node of a shard: ``role`` is ``master`` or ``replica``; ``health`` ``online``, ``loading``, ``failed`` or ``""``."""

    node_id: str
    host: str
    port: int
    role: str
    health: str = ""

    @property
    def address(self) -> Address:
        """``(host, port)``."""
        return (self.host, self.port)

    @property
    def usable(self) -> bool:
        """Not known to be failed or still loading (CLUSTER SLOTS gives no health: then usable)."""
        return self.health in ("", "online")


@dataclass(frozen=True)
class Shard:
    """A master, its replicas, and the slot ranges (inclusive) they serve."""

    ranges: Tuple[SlotRange, ...]
    master: Optional[ShardNode]
    replicas: Tuple[ShardNode, ...] = ()


class SlotMap:
    """Which shard serves each of the 16384 slots; immutable (``moved`` returns a new map)."""

    def __init__(self, shards: Iterable[Shard]) -> None:
        """Index ``shards``; raises ``ValueError`` on a range outside 0–16383 or a slot claimed twice."""
        self._shards = tuple(shards)
        self._index = array("h", [_NO_SHARD]) * SLOT_COUNT
        for number, shard in enumerate(self._shards):
            if shard.master is None:
                continue  # a shard without a master serves nothing, whatever it claims
            for start, end in shard.ranges:
                if not 0 <= start <= end < SLOT_COUNT:
                    raise ValueError(f"slot range {start}-{end} outside 0-{SLOT_COUNT - 1}")
                for slot in range(start, end + 1):
                    if self._index[slot] != _NO_SHARD:
                        raise ValueError(f"slot {slot} is claimed by two shards")
                    self._index[slot] = number

    @classmethod
    def from_shards(cls, reply: Sequence[Any], asked_host: str = "") -> "SlotMap":
        """
        Build from a ``CLUSTER SHARDS`` reply (Redis 7+): per shard, ``slots`` (flat start/end pairs) and
        ``nodes`` (field/value lists: id, endpoint, ip, port or tls-port, role, health).

        An unknown endpoint (empty: the host that was asked, ``asked_host``; ``?``: the node's ``ip``)
        is resolved as Redis documents it.
        """
        shards = []
        for raw_shard in reply:
            shard = _fields(raw_shard)
            bounds = [int(value) for value in shard.get("slots") or []]
            ranges = tuple((bounds[i], bounds[i + 1]) for i in range(0, len(bounds) - 1, 2))
            nodes = [_shard_node(_fields(raw_node), asked_host) for raw_node in shard.get("nodes") or []]
            masters = [node for node in nodes if node.role == "master"]
            # While a failover settles two nodes may claim the role: prefer the one not failed.
            master = next((node for node in masters if node.health != "failed"), masters[0] if masters else None)
            replicas = tuple(node for node in nodes if node is not master and node.role != "master")
            shards.append(Shard(ranges, master, replicas))
        return cls(shards)

    @classmethod
    def from_slots(cls, reply: Sequence[Any], asked_host: str = "") -> "SlotMap":
        """
        Build from a ``CLUSTER SLOTS`` reply: per range ``[start, end, master, replica…]``, each node
        ``[endpoint, port, id?, metadata?]``. Ranges with the same master form one shard.
        """
        by_master: Dict[Address, Tuple[List[SlotRange], ShardNode, List[ShardNode]]] = {}
        for entry in reply:
            start, end = int(entry[0]), int(entry[1])
            nodes = [_slots_node(raw, "master" if i == 0 else "replica", asked_host) for i, raw in enumerate(entry[2:])]
            if not nodes:
                continue
            ranges, master, replicas = by_master.setdefault(nodes[0].address, ([], nodes[0], []))
            ranges.append((start, end))
            for replica in nodes[1:]:
                if replica.address not in [known.address for known in replicas]:
                    replicas.append(replica)
        return cls(Shard(tuple(ranges), master, tuple(replicas)) for ranges, master, replicas in by_master.values())

    @property
    def shards(self) -> Tuple[Shard, ...]:
        """The shards, in the order the reply listed them."""
        return self._shards

    def shard_for(self, slot: int) -> Optional[Shard]:
        """The shard serving ``slot``, or None."""
        number = self._index[slot]
        return None if number == _NO_SHARD else self._shards[number]

    def master_for(self, slot: int) -> Optional[Address]:
        """The address of the master serving ``slot``, or None when no shard does."""
        shard = self.shard_for(slot)
        return None if shard is None or shard.master is None else shard.master.address

    def replicas_for(self, slot: int, usable_only: bool = True) -> Tuple[Address, ...]:
        """The addresses of ``slot``'s replicas (by default only those not failed or loading)."""
        shard = self.shard_for(slot)
        if shard is None:
            return ()
        return tuple(node.address for node in shard.replicas if node.usable or not usable_only)

    def masters(self) -> Tuple[Address, ...]:
        """The addresses of the masters that serve at least one slot, in the order of their first slot."""
        serving = [number for number in dict.fromkeys(self._index) if number != _NO_SHARD]
        return tuple(self._shards[number].master.address for number in serving)  # type: ignore[union-attr]

    def uncovered(self) -> Tuple[SlotRange, ...]:
        """The slot ranges no master serves (empty for a healthy cluster)."""
        return tuple(_runs(slot for slot in range(SLOT_COUNT) if self._index[slot] == _NO_SHARD))

    @property
    def complete(self) -> bool:
        """Every slot has a master."""
        return _NO_SHARD not in self._index

    def moved(self, redirect: Redirect) -> "SlotMap":
        """
        The map after a ``MOVED``: the slot now belongs to the shard whose master is the redirection's
        address (a new shard with no known replicas if none is). Cheap patching until the next refresh.
        """
        if redirect.kind != "MOVED":
            return self  # ASK redirects one command and changes nothing
        index = array("h", self._index)
        shards = list(self._shards)
        target = next(
            (n for n, shard in enumerate(shards) if shard.master is not None and shard.master.address == redirect.address),
            None,
        )
        if target is None:
            shards.append(Shard((), ShardNode("", redirect.host, redirect.port, "master")))
            target = len(shards) - 1
        index[redirect.slot] = target
        rebuilt = []
        for number, shard in enumerate(shards):
            ranges = tuple(_runs(slot for slot in range(SLOT_COUNT) if index[slot] == number))
            rebuilt.append(Shard(ranges, shard.master, shard.replicas))
        return SlotMap(rebuilt)


def _fields(raw: Any) -> Mapping[str, Any]:
    """A RESP2 flat field/value list (or a RESP3 map) as a dict with text keys."""
    if isinstance(raw, Mapping):
        items: Iterable[Tuple[Any, Any]] = raw.items()
    else:
        items = zip(raw[::2], raw[1::2])
    return {_text(key): value for key, value in items}


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _endpoint(value: Any, asked_host: str, ip: Any = None) -> str:
    # Redis 7.0 with cluster-preferred-endpoint-type unknown-endpoint sends NULL (SLOTS) or "" (SHARDS,
    # MOVED): "the host you asked". "?" means a hostname was preferred but none configured: the IP, if given.
    text = "" if value is None else _text(value)
    if text == "?":
        text = "" if ip is None else _text(ip)
    return text or asked_host


def _shard_node(fields: Mapping[str, Any], asked_host: str) -> ShardNode:
    port = fields.get("port", fields.get("tls-port", 0))
    return ShardNode(
        node_id=_text(fields.get("id", "")),
        host=_endpoint(fields.get("endpoint"), asked_host, fields.get("ip")),
        port=int(port),
        role="master" if _text(fields.get("role", "")) == "master" else "replica",
        health=_text(fields.get("health", "")),
    )


def _slots_node(raw: Sequence[Any], role: str, asked_host: str) -> ShardNode:
    node_id = _text(raw[2]) if len(raw) > 2 and raw[2] is not None else ""
    metadata = _fields(raw[3]) if len(raw) > 3 and raw[3] else {}
    return ShardNode(node_id, _endpoint(raw[0], asked_host, metadata.get("ip")), int(raw[1]), role)


def _runs(slots: Iterable[int]) -> List[SlotRange]:
    runs: List[SlotRange] = []
    for slot in slots:
        if runs and runs[-1][1] == slot - 1:
            runs[-1] = (runs[-1][0], slot)
        else:
            runs.append((slot, slot))
    return runs
