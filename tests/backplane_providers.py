"""Factories of backplane pairs for the IBackplane contract suite (one entry per provider)."""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Dict, List

from twisted.internet.defer import Deferred, succeed

from viewport.relay.backplane.single import SingleBackplane
from viewport.relay.interfaces import BusFrame


class BackplaneHarness:
    """Three relays' backplanes (``a``, ``b``, ``c``) and what each received."""

    cross_relay = False
    confirms_delivery = True

    def __init__(self, a: Any, b: Any, c: Any) -> None:
        self.a, self.b, self.c = a, b, c
        self.received_a: List[BusFrame] = []
        self.received_b: List[BusFrame] = []
        self.received_c: List[BusFrame] = []

    def start(self) -> "Deferred[BackplaneHarness]":
        """Start all three, each delivering into its own list."""
        from twisted.internet.defer import gatherResults

        return gatherResults(
            [
                self.a.start(self.received_a.append),
                self.b.start(self.received_b.append),
                self.c.start(self.received_c.append),
            ]
        ).addCallback(lambda _: self)

    def ready(self) -> "Deferred[None]":
        """Fires once watch/unwatch calls made so far took effect (e.g. Redis SUBSCRIBE acknowledged)."""
        return succeed(None)

    def close(self) -> "Deferred[Any]":
        """Stop all three and release shared infrastructure."""
        from twisted.internet.defer import gatherResults

        return gatherResults([self.a.stop(), self.b.stop(), self.c.stop()])


def _single() -> "Deferred[BackplaneHarness]":
    return BackplaneHarness(
        SingleBackplane("relay-a"), SingleBackplane("relay-b"), SingleBackplane("relay-c")
    ).start()


PROVIDERS: Dict[str, Callable[[], "Deferred[BackplaneHarness]"]] = {"single": _single}
