"""
Sequence numbers on Redis bus envelopes, so that a receiver notices a frame that comes late or never.

One Redis keeps a publisher's messages on a channel in order. A Redis Cluster does not always:
while a shard fails over, a relay publishes to the old master (which hands the message on through
the cluster bus) and then to the new one (which delivers at once), and the later frame can arrive
first; a message published to a master that dies before handing it on is lost although SPUBLISH
counted a receiver. The relay cannot prevent either, but it must not deliver e2ee frames out of
order nor lose them in silence: each envelope carries its stream's sequence number, and the
receiver drops a frame older than one it already delivered and reports both cases, so that the
clients (or the other relay's clients) are told ``DAEMON_UNAVAILABLE`` and re-key.

A stream is one publisher's frames on one channel for one target relay (frames for another target
are skipped unread by the receivers they are not for, so they must not count as missing). The
number rides in the envelope's signed ``nonce`` as ``<epoch>.<seq>``: relays that do not know
it still treat the nonce as opaque, and a forged number fails the signature.
"""

from __future__ import annotations

import re
import secrets
from collections import OrderedDict
from typing import Callable, Dict, Optional, Tuple

__all__ = ["GAP", "IN_ORDER", "LATE", "StreamNumbers", "StreamOrder", "parse_stream_nonce"]

#: The frame is the next of its stream (or the first this receiver sees).
IN_ORDER = "in_order"
#: Frames of the stream before this one never arrived; this one is delivered.
GAP = "gap"
#: A later frame of the stream was already delivered; this one is dropped.
LATE = "late"

_NONCE = re.compile(r"\A([A-Za-z0-9_-]{8,32})\.([1-9][0-9]{0,17})\Z")
#: Streams remembered by either side before the least recently used is forgotten.
DEFAULT_MAX_STREAMS = 65536


def parse_stream_nonce(nonce: Optional[str]) -> Optional[Tuple[str, int]]:
    """``(epoch, seq)`` of a numbered nonce; None for any other nonce (an older relay's random one)."""
    if nonce is None:
        return None
    match = _NONCE.match(nonce)
    if match is None:
        return None
    return match.group(1), int(match.group(2))


class StreamNumbers:
    """
    The publisher's side: the next nonce of each (channel, target) stream.

    A stream forgotten (least recently used, past ``max_streams``) starts again under a new random
    epoch, never at a number its receivers would take for an old one.
    """

    def __init__(self, max_streams: int = DEFAULT_MAX_STREAMS,
                 new_epoch: Callable[[], str] = lambda: secrets.token_urlsafe(12)) -> None:
        self._max_streams = max_streams
        self._new_epoch = new_epoch
        self._streams: "OrderedDict[Tuple[str, str], Tuple[str, int]]" = OrderedDict()

    def next_nonce(self, channel: str, target: str) -> str:
        """The nonce of the stream's next frame."""
        key = (channel, target)
        stream = self._streams.get(key)
        if stream is None:
            epoch, seq = self._new_epoch(), 1
            if len(self._streams) >= self._max_streams:
                self._streams.popitem(last=False)
        else:
            epoch, seq = stream[0], stream[1] + 1
            self._streams.move_to_end(key)
        self._streams[key] = (epoch, seq)
        return f"{epoch}.{seq}"


class StreamOrder:
    """
    The receiver's side: the last number delivered per stream, by channel.

    ``forget(channel)`` is for a channel this relay unsubscribed from: frames published while it
    was not listening are not missing. A new epoch (the publisher restarted or forgot the stream)
    starts the stream afresh.
    """

    def __init__(self, max_channels: int = DEFAULT_MAX_STREAMS) -> None:
        self._max_channels = max_channels
        self._channels: "OrderedDict[str, Dict[Tuple[str, str], Tuple[str, int]]]" = OrderedDict()

    def check(self, channel: str, source: str, target: str, nonce: Optional[str]) -> Tuple[str, int]:
        """
        ``(verdict, missing)`` for a frame whose signature was checked: ``IN_ORDER``, ``GAP`` with how
        many numbers were skipped, or ``LATE`` (missing 0). Frames without a numbered nonce are in order.
        """
        numbered = parse_stream_nonce(nonce)
        if numbered is None:
            return IN_ORDER, 0
        epoch, seq = numbered
        streams = self._channels.get(channel)
        if streams is None:
            if len(self._channels) >= self._max_channels:
                self._channels.popitem(last=False)
            streams = self._channels[channel] = {}
        else:
            self._channels.move_to_end(channel)
        key = (source, target)
        last = streams.get(key)
        if last is None or last[0] != epoch:
            streams[key] = (epoch, seq)
            return IN_ORDER, 0
        if seq <= last[1]:
            return LATE, 0
        streams[key] = (epoch, seq)
        if seq == last[1] + 1:
            return IN_ORDER, 0
        return GAP, seq - last[1] - 1

    def forget(self, channel: str) -> None:
        """Stop expecting anything on ``channel`` (unsubscribed)."""
        self._channels.pop(channel, None)

    def __len__(self) -> int:
        return len(self._channels)
