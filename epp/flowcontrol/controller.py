"""The flow-control dispatcher: hold requests while the pool is saturated, release the
most important first as load drains.

`FlowController.enqueue_and_wait(ticket)` is what a request awaits. If nothing of equal
or higher priority is waiting and the pool is below the band's ceiling it returns at
once; otherwise the request joins its band and the dispatcher releases it later.

The dispatcher (`run()`, one task) repeats a *cycle*: expire requests whose TTL passed
(503), read the pool saturation once, then walk the bands from the highest priority
down, releasing requests while saturation is below the band's ceiling, at most
`maxDispatchPerCycle` per cycle (default 1). Between cycles the dispatcher yields to the
event loop, so a released request reaches the scheduler and `lease.started()` before the
next saturation reading: with the `concurrency-detector` the pool never gets more than
its capacity. A metrics-based detector only sees released work after the next scrape, so
while its reading is stale the dispatcher keeps releasing (highest priority first).
Priority is strict: a band that still has requests waiting (because it is blocked) holds
back every lower band. Saturation is read for the whole pool (subset hints are not
considered here; the scheduler honours them after release). When it cannot release
anything it sleeps until something happens: a new request, `notify()` (a request
finished, so load may have drained), the next TTL deadline, or `dispatchPollInterval`
(metrics-based saturation changes without telling anyone).

Outcomes: overflow of a band's or the global maxRequests/maxBytes -> 429 at once; TTL
expiry -> 503; a waiter whose task is cancelled (its ext_proc stream went away) is
removed from its queue before the CancelledError propagates, so nothing is left behind.

The controller is synchronous inside (`submit`, `dispatch_cycle`, `expire`) with an
injectable clock, so tests drive it step by step without sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Callable

from epp.errors import EppError, ErrorCode
from epp.flowcontrol.queues import (
    CANCELLED,
    CLOSED,
    DISPATCHED,
    EXPIRED,
    OUTCOMES,
    QUEUED,
    REJECTED,
    AdmissionTicket,
    Band,
    LazyHeap,
    QueueItem,
    deadline_of,
)
from epp.flowcontrol.settings import FlowControlConfig
from epp.observability import (
    FLOW_DISPATCH_CYCLE,
    FLOW_POOL_SATURATION,
    FLOW_QUEUE_BYTES,
    FLOW_QUEUE_DURATION,
    FLOW_QUEUE_SIZE,
)
from epp.tasks import cancel_and_wait

log = logging.getLogger(__name__)

MSG_BAND_FULL = "flow control queue full for priority {priority}"
MSG_POOL_FULL = "flow control queues full"
MSG_EXPIRED = "request timed out waiting in the flow control queue"
MSG_CLOSED = "flow control is shutting down"


class _BandState:
    """A band plus its cached metric children (label lookups are slow on a hot path)."""

    __slots__ = ("band", "size_gauge", "bytes_gauge", "durations")

    def __init__(self, band: Band) -> None:
        p = str(band.priority)
        self.band = band
        self.size_gauge = FLOW_QUEUE_SIZE.labels(priority=p)
        self.bytes_gauge = FLOW_QUEUE_BYTES.labels(priority=p)
        self.durations = [FLOW_QUEUE_DURATION.labels(priority=p, outcome=o) for o in OUTCOMES]

    def publish(self) -> None:
        self.size_gauge.set(self.band.count)
        self.bytes_gauge.set(self.band.bytes)


class FlowController:
    """Bands of queued requests and the dispatcher that releases them (see module doc)."""

    def __init__(
        self,
        config: FlowControlConfig,
        saturation: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._saturation = saturation
        self.clock = clock
        self._bands: dict[int, _BandState] = {}
        self._order: list[_BandState] = []  # highest priority first
        self._expiry = LazyHeap()
        self._seq = 0
        self._queued = 0
        self._bytes = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.last_saturation = math.nan
        self._saturation_error: str | None = None
        self._cycle_error: str | None = None
        for prio in config.bands:
            self._band(prio)

    # -- request side ------------------------------------------------------------------

    async def enqueue_and_wait(self, ticket: AdmissionTicket) -> None:
        """Wait until the request may proceed. Raises `EppError` 429 (queue full) or 503
        (TTL expired, shutting down); on cancellation the request leaves its queue."""
        item = self.submit(ticket)
        if item is None:
            return
        try:
            await item.future
        except asyncio.CancelledError:
            if item.state == QUEUED:
                self._leave(item, CANCELLED, self.clock())
            raise

    def submit(self, ticket: AdmissionTicket, now: float | None = None) -> QueueItem | None:
        """Admit at once (None) or queue the request (its `QueueItem`); 429 if full."""
        if self._closed:
            raise EppError(ErrorCode.ServiceUnavailable, MSG_CLOSED)
        if now is None:
            now = self.clock()
        state = self._band(ticket.priority)
        band = state.band
        if not band.count and self._nothing_waiting_above(band.priority):
            sat = self._read_saturation()
            if sat < band.ceiling:
                return None
        if not band.fits(ticket.size):
            state.durations[REJECTED].observe(0.0)
            raise EppError(ErrorCode.ResourceExhausted, MSG_BAND_FULL.format(priority=band.priority))
        c = self.config
        if (c.max_requests and self._queued + 1 > c.max_requests) or (
            c.max_bytes and self._bytes + ticket.size > c.max_bytes
        ):
            state.durations[REJECTED].observe(0.0)
            raise EppError(ErrorCode.ResourceExhausted, MSG_POOL_FULL)
        ttl = band.config.ttl if ticket.ttl is None else ticket.ttl
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        item = QueueItem(ticket, fut, now, deadline_of(now, ttl), self._seq)
        self._seq += 1
        band.push(item)
        self._queued += 1
        self._bytes += ticket.size
        if item.deadline != math.inf:
            item.expiry_entry = self._expiry.push(item.deadline, item)
        state.publish()
        self.notify()
        return item

    def cancel(self, item: QueueItem) -> bool:
        """Take a queued request out (as a cancelled waiter does); False if it left already."""
        if item.state != QUEUED:
            return False
        self._leave(item, CANCELLED, self.clock())
        if not item.future.done():
            item.future.cancel()
        return True

    # -- dispatcher side ---------------------------------------------------------------

    def notify(self) -> None:
        """Something changed (a request arrived or finished): run a cycle soon."""
        if self._wake is not None:
            self._wake.set()

    def dispatch_cycle(self, now: float | None = None) -> int:
        """One cycle: expire, then release by priority while below ceilings. Returns the
        number released."""
        t0 = time.perf_counter()
        if now is None:
            now = self.clock()
        self.expire(now)
        released = 0
        if self._queued:
            sat = self._read_saturation()
            budget = self.config.max_dispatch_per_cycle
            for state in self._order:
                band = state.band
                if not band.count:
                    continue
                ceiling = band.ceiling
                n = 0
                while band.count and sat < ceiling and released < budget:
                    item = band.pop()
                    self._finish(item, DISPATCHED, now, state)
                    n += 1
                    released += 1
                if n:
                    state.publish()
                if band.count:
                    break  # strict priority: a waiting band holds back the lower ones
        FLOW_DISPATCH_CYCLE.observe(time.perf_counter() - t0)
        return released

    def expire(self, now: float) -> int:
        """Fail every queued request whose deadline has passed with 503."""
        n = 0
        heap = self._expiry
        while True:
            entry = heap.peek()
            if entry is None or entry[0] > now:
                return n
            item: QueueItem = heap.pop()
            item.expiry_entry = None
            if item.state == QUEUED:
                self._leave(item, EXPIRED, now)
                n += 1

    def next_deadline(self) -> float:
        entry = self._expiry.peek()
        return entry[0] if entry is not None else math.inf

    async def run(self) -> None:
        """The dispatcher loop; start it with `start()`."""
        wake = self._wake = asyncio.Event()
        poll = self.config.poll_interval
        while True:
            wake.clear()
            try:
                released = self.dispatch_cycle()
            except Exception as e:  # the dispatcher must never die: queued requests
                # (and their TTL expiry) depend on it. Log once per distinct failure.
                if repr(e) != self._cycle_error:
                    log.exception("flow-control dispatch cycle failed; retrying")
                    self._cycle_error = repr(e)
                await asyncio.sleep(poll)
                continue
            self._cycle_error = None
            if released >= self.config.max_dispatch_per_cycle:
                await asyncio.sleep(0)  # let released requests run, then go on
                continue
            if not self._queued:
                await wake.wait()
                continue
            timeout = min(poll, max(self.next_deadline() - self.clock(), 0.0))
            try:
                async with asyncio.timeout(timeout):
                    await wake.wait()
            except TimeoutError:
                pass

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._closed = False
            self._task = asyncio.get_running_loop().create_task(self.run(), name="flow-dispatcher")
        return self._task

    async def stop(self) -> None:
        """Stop the dispatcher and fail every queued request with 503."""
        self._closed = True
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self._wake = None
        now = self.clock()
        for state in self._order:
            while state.band.count:
                self._finish(state.band.pop(), CLOSED, now, state)
            state.publish()

    # -- introspection -----------------------------------------------------------------

    def queued(self, priority: int | None = None) -> int:
        if priority is None:
            return self._queued
        state = self._bands.get(priority)
        return state.band.count if state else 0

    def queued_bytes(self, priority: int | None = None) -> int:
        if priority is None:
            return self._bytes
        state = self._bands.get(priority)
        return state.band.bytes if state else 0

    def residue(self) -> dict[str, int]:
        """Sizes of every internal structure; all zero when nothing is queued (tests)."""
        flows = sum(s.band.policy.flows() for s in self._order)
        return {"queued": self._queued, "bytes": self._bytes, "flows": flows,
                "expiry_entries": self._expiry.raw_size}

    # -- internals ---------------------------------------------------------------------

    def _band(self, priority: int) -> _BandState:
        state = self._bands.get(priority)
        if state is None:
            state = self._bands[priority] = _BandState(Band(self.config.band(priority)))
            self._order = sorted(self._bands.values(), key=lambda s: -s.band.priority)
            state.publish()
        return state

    def _nothing_waiting_above(self, priority: int) -> bool:
        if not self._queued:
            return True
        for state in self._order:
            if state.band.priority <= priority:
                return True
            if state.band.count:
                return False
        return True

    def _read_saturation(self) -> float:
        try:
            sat = float(self._saturation())
            self._saturation_error = None
        except Exception as e:  # a broken detector must not crash the loop: hold requests
            if repr(e) != self._saturation_error:  # log once per distinct failure, not per cycle
                log.exception("saturation detector failed; treating the pool as saturated")
                self._saturation_error = repr(e)
            sat = math.inf
        if math.isnan(sat):
            sat = math.inf
        self.last_saturation = sat
        FLOW_POOL_SATURATION.set(sat if math.isfinite(sat) else 1.0)
        return sat

    def _leave(self, item: QueueItem, outcome: int, now: float) -> None:
        """Remove a still-queued request from its band (cancel/expiry paths)."""
        state = self._bands[item.ticket.priority]
        state.band.remove(item)
        self._finish(item, outcome, now, state)
        state.publish()

    def _finish(self, item: QueueItem, outcome: int, now: float, state: _BandState) -> None:
        """Account for a request that left its band (already popped/removed)."""
        item.state = outcome
        self._queued -= 1
        self._bytes -= item.ticket.size
        if item.expiry_entry is not None:
            self._expiry.discard(item.expiry_entry)
            item.expiry_entry = None
        state.durations[outcome].observe(max(now - item.enqueued, 0.0))
        fut = item.future
        if not fut.done():
            if outcome == DISPATCHED:
                fut.set_result(None)
            elif outcome == EXPIRED:
                fut.set_exception(EppError(ErrorCode.ServiceUnavailable, MSG_EXPIRED))
            elif outcome == CLOSED:
                fut.set_exception(EppError(ErrorCode.ServiceUnavailable, MSG_CLOSED))
        if outcome != DISPATCHED:
            self.notify()  # room freed; lower bands may move on
