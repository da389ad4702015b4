"""The queues of flow control: one band per priority, fairness among flows, ordering within.

A *flow* is the requests of one fairness id (header `x-gateway-inference-fairness-id`)
at one priority. A band holds all flows of its priority and answers `pop()` with the
next request to release:

- fairness `global-strict`: the band is one queue; the ordering policy alone decides,
  across all fairness ids (a flood from one id delays everyone behind it).
- fairness `round-robin`: each flow has its own queue; flows take turns, one request
  each, so a flood from one id cannot starve the others.
- ordering `fcfs`: arrival order. `earliest-deadline`: the request whose TTL ends first.

Every structure supports O(1) or O(log n) removal of a request that leaves early
(cancelled, expired), and structures that become empty are dropped at once, so a
cancelled request leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol

from epp.flowcontrol.settings import BandConfig
from epp.request import DEFAULT_FAIRNESS_ID


@dataclass(slots=True)
class AdmissionTicket:
    """What admission knows about one request (filled by the director)."""

    request_id: str
    priority: int = 0
    fairness_id: str = DEFAULT_FAIRNESS_ID
    size: int = 0
    """Body bytes, counted against the band's maxBytes."""
    ttl: float | None = None
    """Overrides the band's TTL for this request (seconds; 0 = no expiry)."""


QUEUED, DISPATCHED, EXPIRED, CANCELLED, CLOSED, REJECTED = range(6)
OUTCOMES = ("queued", "dispatched", "expired", "cancelled", "closed", "rejected")
"""Outcome label values of the queue-duration histogram, indexed by state."""


class QueueItem:
    """One waiting request. `future` resolves when it is released (or fails)."""

    __slots__ = ("ticket", "future", "enqueued", "deadline", "seq", "state", "heap_entry",
                 "expiry_entry")

    def __init__(self, ticket: AdmissionTicket, future: asyncio.Future[None], enqueued: float,
                 deadline: float, seq: int) -> None:
        self.ticket = ticket
        self.future = future
        self.enqueued = enqueued
        self.deadline = deadline
        self.seq = seq
        self.state = QUEUED
        self.heap_entry: list | None = None  # type: ignore[type-arg]
        self.expiry_entry: list | None = None  # type: ignore[type-arg]


class OrderingQueue(Protocol):
    def push(self, item: QueueItem) -> None: ...
    def pop(self) -> QueueItem: ...
    def remove(self, item: QueueItem) -> None: ...
    def __len__(self) -> int: ...


class FCFSQueue:
    """Arrival order; O(1) push, pop and removal."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: OrderedDict[int, QueueItem] = OrderedDict()

    def push(self, item: QueueItem) -> None:
        self._items[item.seq] = item

    def pop(self) -> QueueItem:
        return self._items.popitem(last=False)[1]

    def remove(self, item: QueueItem) -> None:
        self._items.pop(item.seq, None)

    def __len__(self) -> int:
        return len(self._items)


class LazyHeap:
    """A heap of `[key, seq, item]` entries with O(1) removal: a removed entry is blanked
    and skipped later; the heap is rebuilt when blanks outnumber live entries and
    cleared outright when nothing live is left, so removed items are never retained."""

    __slots__ = ("_heap", "_live")

    def __init__(self) -> None:
        self._heap: list[list] = []  # type: ignore[type-arg]
        self._live = 0

    def push(self, key: float, item: QueueItem) -> list:  # type: ignore[type-arg]
        entry = [key, item.seq, item]
        heapq.heappush(self._heap, entry)
        self._live += 1
        return entry

    def peek(self) -> list | None:  # type: ignore[type-arg]
        h = self._heap
        while h and h[0][2] is None:
            heapq.heappop(h)
        return h[0] if h else None

    def pop(self) -> QueueItem:
        h = self._heap
        while True:
            entry = heapq.heappop(h)
            if entry[2] is not None:
                item: QueueItem = entry[2]
                entry[2] = None
                self._live -= 1
                if not self._live:
                    h.clear()
                return item

    def discard(self, entry: list) -> None:  # type: ignore[type-arg]
        if entry[2] is None:
            return
        entry[2] = None
        self._live -= 1
        h = self._heap
        if not self._live:
            h.clear()
        elif len(h) > 64 and len(h) > 2 * self._live:
            self._heap = [e for e in h if e[2] is not None]
            heapq.heapify(self._heap)

    def __len__(self) -> int:
        return self._live

    @property
    def raw_size(self) -> int:
        """Entries held, blanks included (for residue checks)."""
        return len(self._heap)


class EDFQueue:
    """Earliest deadline first (ties: arrival order); O(log n) push/pop, O(1) removal."""

    __slots__ = ("_heap",)

    def __init__(self) -> None:
        self._heap = LazyHeap()

    def push(self, item: QueueItem) -> None:
        item.heap_entry = self._heap.push(item.deadline, item)

    def pop(self) -> QueueItem:
        item = self._heap.pop()
        item.heap_entry = None
        return item

    def remove(self, item: QueueItem) -> None:
        if item.heap_entry is not None:
            self._heap.discard(item.heap_entry)
            item.heap_entry = None

    def __len__(self) -> int:
        return len(self._heap)


ORDERINGS: dict[str, type[FCFSQueue] | type[EDFQueue]] = {
    "fcfs": FCFSQueue,
    "earliest-deadline": EDFQueue,
}


class GlobalStrictFairness:
    """All fairness ids share one queue: the ordering policy decides alone."""

    __slots__ = ("_queue",)

    def __init__(self, ordering: str) -> None:
        self._queue: OrderingQueue = ORDERINGS[ordering]()

    def push(self, item: QueueItem) -> None:
        self._queue.push(item)

    def pop(self) -> QueueItem:
        return self._queue.pop()

    def remove(self, item: QueueItem) -> None:
        self._queue.remove(item)

    def flows(self) -> int:
        return 1 if len(self._queue) else 0


class RoundRobinFairness:
    """One queue per fairness id; the ids with waiting requests take turns."""

    __slots__ = ("_ordering", "_flows", "_turns")

    def __init__(self, ordering: str) -> None:
        self._ordering = ORDERINGS[ordering]
        self._flows: dict[str, OrderingQueue] = {}
        self._turns: deque[str] = deque()

    def push(self, item: QueueItem) -> None:
        fid = item.ticket.fairness_id
        q = self._flows.get(fid)
        if q is None:
            q = self._flows[fid] = self._ordering()
            self._turns.append(fid)
        q.push(item)

    def pop(self) -> QueueItem:
        turns = self._turns
        fid = turns[0]
        q = self._flows[fid]
        item = q.pop()
        if len(q):
            turns.rotate(-1)
        else:
            turns.popleft()
            del self._flows[fid]
        return item

    def remove(self, item: QueueItem) -> None:
        fid = item.ticket.fairness_id
        q = self._flows.get(fid)
        if q is None:
            return
        q.remove(item)
        if not len(q):
            del self._flows[fid]
            self._turns.remove(fid)

    def flows(self) -> int:
        return len(self._flows)


FAIRNESS: dict[str, type[GlobalStrictFairness] | type[RoundRobinFairness]] = {
    "global-strict": GlobalStrictFairness,
    "round-robin": RoundRobinFairness,
}


class Band:
    """The queue of one priority, with its bounds and running totals."""

    __slots__ = ("config", "priority", "policy", "count", "bytes")

    def __init__(self, config: BandConfig) -> None:
        self.config = config
        self.priority = config.priority
        self.policy: GlobalStrictFairness | RoundRobinFairness = FAIRNESS[config.fairness](config.ordering)
        self.count = 0
        self.bytes = 0

    def fits(self, size: int) -> bool:
        c = self.config
        if c.max_requests and self.count + 1 > c.max_requests:
            return False
        return not (c.max_bytes and self.bytes + size > c.max_bytes)

    def push(self, item: QueueItem) -> None:
        self.policy.push(item)
        self.count += 1
        self.bytes += item.ticket.size

    def pop(self) -> QueueItem:
        item = self.policy.pop()
        self.count -= 1
        self.bytes -= item.ticket.size
        return item

    def remove(self, item: QueueItem) -> None:
        self.policy.remove(item)
        self.count -= 1
        self.bytes -= item.ticket.size

    @property
    def ceiling(self) -> float:
        return self.config.saturation_ceiling


def deadline_of(now: float, ttl: float) -> float:
    return now + ttl if ttl > 0 else math.inf
