"""Routing decisions handed from the routing filter's ext_proc stream to the stream that
follows the response (`epp envoy-config --response-path=observed`, see `extproc`)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from epp.director import RoutingDecision


class DecisionTickets:
    """Routing decisions in transit from the routing stream to the response stream.

    The response filters' streams claim theirs within milliseconds (Envoy opens them as
    the request leaves the routing filter); one never claimed (a request abandoned in
    between, or a config without the response filters) is finished as detached after
    `ttl`, as a stream that closed before any response is."""

    __slots__ = ("_held", "_seq", "_ttl", "_expire", "_handle")

    def __init__(self, expire: Callable[[RoutingDecision], None], ttl: float = 10.0) -> None:
        self._held: dict[str, tuple[float, RoutingDecision]] = {}
        self._seq = 0
        self._ttl = ttl
        self._expire = expire
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._held)

    def hand_over(self, decision: RoutingDecision) -> str:
        self._seq += 1
        ticket = str(self._seq)
        loop = asyncio.get_running_loop()
        self._held[ticket] = (loop.time() + self._ttl, decision)
        if self._handle is None:
            self._handle = loop.call_at(loop.time() + self._ttl, self._sweep)
        return ticket

    def claim(self, ticket: str) -> RoutingDecision | None:
        held = self._held.pop(ticket, None)
        return held[1] if held is not None else None

    def _sweep(self) -> None:
        self._handle = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._held:
            ticket, (deadline, decision) = next(iter(self._held.items()))
            if deadline > now:
                self._handle = loop.call_at(deadline, self._sweep)
                return
            del self._held[ticket]
            self._expire(decision)
