"""In-flight accounting: requests routed since an endpoint's last scrape.

The director owns the tracker (it records `started`/`finished`); the scheduler only reads
`extra_waiting` through `CycleState.waiting`.

Scraped queue lengths lag reality by up to one scrape interval. A burst that arrives between
two scrapes would otherwise see the same "idle" numbers for every request and pile onto one
endpoint. So the director records what it has routed and not yet seen finish, and the
queue scorer adds, per endpoint, the requests routed *after* that endpoint's last scrape
(earlier ones are already in the scraped numbers) to the scraped waiting count.

Events are O(1): `started` appends a record to preallocated numpy arrays, `finished` sets
its start time to -inf (so that it can never count again). Reading (`extra_waiting`) is one
vectorised pass over the records.
Records that a scrape has since covered, that finished, or that timed out are dropped when
the arrays fill up (amortised O(1)).
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from epp.datastore import Datastore, Endpoint, Snapshot, departed

class RemoteLoadReader(Protocol):
    """Load other replicas reported (`epp.statesync.remote.RemoteLoad`)."""

    def extra_waiting(self, snapshot: Snapshot) -> np.ndarray | None: ...


DEFAULT_TIMEOUT = 300.0
"""Seconds after which an unfinished request stops counting (a lost `finished` call)."""


class InFlightTracker:
    """Requests the EPP routed and has not yet seen finish, by endpoint name."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, capacity: int = 1024) -> None:
        if not timeout > 0:
            raise ValueError(f"in-flight timeout must be > 0, got {timeout!r}")
        self.timeout = float(timeout)
        cap = max(16, int(capacity))
        self._slot_of: dict[str, int] = {}
        self._free_slots: list[int] = []  # of endpoints forgotten; reused so pod churn stays bounded
        self._nslots = 0
        self._ep_slot = np.zeros(cap, np.int64)
        self._start = np.full(cap, -math.inf)  # -inf: finished (or unused)
        # Start times as recorded, never cleared: in time order (while `_ordered`), so that
        # a read can skip the records every endpoint's last scrape already covers.
        self._stamp = np.full(cap, -math.inf)
        self._last = -math.inf
        self._ordered = True
        self._min_scraped = -math.inf
        self._rids: list[str | None] = []
        self._pos: dict[str, int] = {}
        self._n = 0
        # Per snapshot version: slot of each snapshot index, and scrape time per slot.
        self._snap_version = -1
        self._snap_slots = np.zeros(0, np.int64)
        self._snap_endpoints: tuple[Endpoint, ...] = ()
        self._scraped_by_slot = np.zeros(0, np.float64)
        self.remote: RemoteLoadReader | None = None
        """Other EPP replicas' load (active-active state sync), added to `extra_waiting`."""

    def __len__(self) -> int:
        """Requests started and not finished (timed-out ones included until compaction)."""
        return len(self._pos)

    def started(self, request_id: str, endpoint_name: str, now: float) -> None:
        """A request was routed to `endpoint_name` at `now` (time.monotonic())."""
        if request_id in self._pos:
            self.finished(request_id)
        slot = self._slot_of.get(endpoint_name)
        if slot is None:
            slot = self._new_slot(endpoint_name)
        if self._n == len(self._start):
            self._compact(now)
        i = self._n
        self._ep_slot[i] = slot
        self._start[i] = now
        self._stamp[i] = now
        if now < self._last:
            self._ordered = False
        else:
            self._last = now
        self._rids.append(request_id)
        self._pos[request_id] = i
        self._n = i + 1

    def finished(self, request_id: str) -> None:
        """The request's response ended or its stream closed; unknown ids are ignored."""
        i = self._pos.pop(request_id, None)
        if i is not None:
            self._start[i] = -math.inf
            self._rids[i] = None

    def open_by_endpoint(self) -> dict[str, int]:
        """Requests started and not finished, per endpoint name (for the status page)."""
        n = self._n
        slots = self._ep_slot[:n][self._start[:n] > -math.inf]
        counts = np.bincount(slots, minlength=self._nslots)
        return {name: int(counts[s]) for name, s in self._slot_of.items() if counts[s]}

    def endpoint_of(self, request_id: str) -> str | None:
        i = self._pos.get(request_id)
        if i is None:
            return None
        slot = int(self._ep_slot[i])
        for name, s in self._slot_of.items():
            if s == slot:
                return name
        return None

    def extra_waiting(self, snapshot: Snapshot, now: float) -> np.ndarray | None:
        """Per snapshot index, requests routed after that endpoint's last scrape and still
        open, by this replica and (with state sync) by the others.

        None when there is nothing to add (the common idle case costs nothing).
        """
        local = self.local_extra_waiting(snapshot, now)
        if self.remote is None:
            return local
        remote = self.remote.extra_waiting(snapshot)
        if remote is None:
            return local
        return remote if local is None else local + remote

    def local_extra_waiting(self, snapshot: Snapshot, now: float) -> np.ndarray | None:
        """`extra_waiting` of this replica's own requests only (what state sync publishes)."""
        if not self._pos:
            return None
        self._sync_snapshot(snapshot)
        n = self._n
        floor = now - self.timeout
        lo = 0
        if self._ordered:
            # Records up to the oldest scrape of the pool (or the timeout) cannot count: with
            # 50 ms scrapes that leaves the last few dozen of up to `capacity` records.
            lo = int(self._stamp[:n].searchsorted(max(self._min_scraped, floor), side="right"))
        slots = self._ep_slot[lo:n]
        # Counts when routed after the endpoint's last scrape and within the timeout.
        since = np.maximum(self._scraped_by_slot[slots], floor)
        counts = np.bincount(slots[self._start[lo:n] > since], minlength=len(self._scraped_by_slot))
        return counts[self._snap_slots]

    def _sync_snapshot(self, snapshot: Snapshot) -> None:
        if snapshot.version == self._snap_version and len(self._scraped_by_slot) == (
            self._nslots
        ):
            return
        slot_of = self._slot_of
        if snapshot.endpoints == self._snap_endpoints:
            # Same endpoints (the usual case: only metrics changed). The tuple compare is a
            # C loop with an identity shortcut, as the datastore reuses Endpoint objects.
            snap_slots = self._snap_slots
        else:
            for e in snapshot.endpoints:
                if e.name not in slot_of:
                    self._new_slot(e.name)
            snap_slots = np.fromiter(
                (slot_of[e.name] for e in snapshot.endpoints), np.int64, len(snapshot)
            )
            self._snap_endpoints = snapshot.endpoints
        scraped = np.full(self._nslots, math.inf)  # endpoints not in the snapshot: never count
        # Never scraped (NaN): everything routed there counts.
        scraped[snap_slots] = np.fmax(snapshot.scraped_at, -math.inf)  # fmax drops NaN
        self._snap_slots = snap_slots
        self._scraped_by_slot = scraped
        self._min_scraped = float(scraped[snap_slots].min()) if len(snap_slots) else math.inf
        self._snap_version = snapshot.version

    def _compact(self, now: float) -> None:
        """Drop records that no longer count; grow the arrays when most still do."""
        n = self._n
        keep = self._start[:n] > now - self.timeout
        known = len(self._scraped_by_slot)
        if known:
            slots = self._ep_slot[:n]
            covered = np.zeros(n, np.bool_)
            in_range = slots < known
            covered[in_range] = self._start[:n][in_range] <= self._scraped_by_slot[slots[in_range]]
            keep &= ~covered
        idx = np.flatnonzero(keep)
        cap = len(self._start)
        if len(idx) * 2 > cap:
            cap *= 2
        ep_slot = np.zeros(cap, np.int64)
        start = np.full(cap, -math.inf)
        stamp = np.full(cap, -math.inf)
        m = len(idx)
        ep_slot[:m] = self._ep_slot[idx]
        start[:m] = self._start[idx]
        stamp[:m] = self._stamp[idx]
        old_rids = self._rids
        rids: list[str | None] = [old_rids[i] for i in idx.tolist()]
        pos: dict[str, int] = {}
        for j, rid in enumerate(rids):
            if rid is not None:
                pos[rid] = j
        self._ep_slot, self._start, self._stamp = ep_slot, start, stamp
        self._rids, self._pos, self._n = rids, pos, m

    def _new_slot(self, name: str) -> int:
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot = self._nslots
            self._nslots += 1
        self._slot_of[name] = slot
        return slot

    def attach(self, datastore: Datastore) -> None:
        """Forget the records of endpoints that leave `datastore`'s pool."""
        datastore.add_listener(self._on_endpoints_changed)

    def _on_endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for name in departed(added, removed):
            self.forget_endpoint(name)

    def forget_endpoint(self, name: str) -> None:
        """Stop counting requests routed to an endpoint that left the pool."""
        slot = self._slot_of.get(name)
        if slot is None:
            return
        n = self._n
        hit = np.flatnonzero((self._ep_slot[:n] == slot) & (self._start[:n] > -math.inf))
        for i in hit.tolist():
            rid = self._rids[i]
            if rid is not None:
                self._pos.pop(rid, None)
                self._rids[i] = None
        self._start[hit] = -math.inf
        # Its records can never count again, so the slot can serve a new endpoint.
        del self._slot_of[name]
        self._free_slots.append(slot)
        self._snap_version = -1
        self._snap_endpoints = ()
