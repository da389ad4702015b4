"""Per-snapshot and per-cycle state that plugins read.

Values that depend only on the snapshot (for example 1 - KV usage, or the LoRA scores of
one model) are computed once per snapshot version and shared by every cycle that reads the
same snapshot (`Derived`); values that depend on the request or the clock are computed at
most once per cycle (`CycleState`). Plugins must not modify the arrays they get here.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from epp.datastore import Snapshot
from epp.scheduling import prefix as _prefix
from epp.scheduling.inflight import InFlightTracker
from epp.scheduling.interface import SchedulingRequest

MISSING: Any = object()
"""A memo miss (None can be a value)."""


class Derived:
    """Arrays derived from one snapshot only, shared by all cycles on that snapshot."""

    __slots__ = ("snapshot", "prev", "n", "all", "all_true", "fresh_until", "_cache")

    MAX_ENTRIES = 256

    def __init__(self, snapshot: Snapshot, prev: "Derived | None" = None) -> None:
        self.snapshot = snapshot
        self.prev = prev
        """The previous snapshot's values, for builders that can reuse them when their
        inputs did not change (a scrape usually changes numbers, not adapters)."""
        self.n = len(snapshot)
        self.all: np.ndarray
        self.all_true: np.ndarray
        if prev is not None and prev.n == self.n:
            self.all, self.all_true = prev.all, prev.all_true  # read-only by convention
        else:
            self.all = np.arange(self.n, dtype=np.int64)
            self.all_true = np.ones(self.n, np.bool_)
        # Until this time every endpoint is fresh, so cycles skip the staleness test.
        scraped = snapshot.scraped_at
        if self.n and not np.isnan(scraped).any():
            self.fresh_until = float(scraped.min()) + snapshot.staleness_threshold
        else:
            self.fresh_until = -math.inf
        self._cache: dict[Any, Any] = {}

    def carried(self, key: Any, same_inputs: Callable[[Snapshot, Snapshot], bool]) -> Any:
        """The previous snapshot's value for `key` when `same_inputs(old, new)`, else MISSING."""
        prev = self.prev
        if prev is None:
            return MISSING
        v = prev._cache.get(key, MISSING)
        if v is MISSING:
            return v
        same = self._cache.get(("same-inputs", same_inputs), MISSING)
        if same is MISSING:
            same = self._cache[("same-inputs", same_inputs)] = same_inputs(prev.snapshot, self.snapshot)
        return v if same else MISSING

    def get(self, key: Any, build: Callable[[Snapshot], Any]) -> Any:
        """The value for `key`, built from the snapshot on first use.

        Some keys come from requests (LoRA scores per target model), and a snapshot can
        live for long (a pool whose scrapes all fail changes nothing): past
        `MAX_ENTRIES` values are built per call and not kept, so memory stays bounded.
        """
        v = self._cache.get(key, MISSING)
        if v is MISSING:
            v = build(self.snapshot)
            if len(self._cache) < self.MAX_ENTRIES:
                self._cache[key] = v
        return v




class CycleState:
    """Inputs and memoised intermediate values of one scheduling cycle."""

    __slots__ = (
        "snapshot",
        "derived",
        "request",
        "now",
        "inflight",
        "_fresh",
        "_all_fresh",
        "_waiting",
        "_prompt",
        "_prefix",
    )

    def __init__(
        self,
        derived: Derived,
        request: SchedulingRequest,
        now: float,
        inflight: InFlightTracker | None,
    ) -> None:
        self.snapshot = derived.snapshot
        self.derived = derived
        self.request = request
        self.now = now
        self.inflight = inflight
        self._fresh: np.ndarray | None = None
        self._all_fresh = False
        self._waiting: np.ndarray | None = None
        self._prompt: bytes | None = None
        self._prefix: dict[Any, Any] = {}

    def take(self, arr: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """`arr[candidates]`, without a copy when the candidates are the whole pool."""
        return arr if candidates is self.derived.all else arr[candidates]

    @property
    def fresh(self) -> np.ndarray:
        """Per snapshot index: metrics are recent enough to trust."""
        if self._fresh is None:
            if self.now <= self.derived.fresh_until:
                self._fresh = self.derived.all_true
                self._all_fresh = True
            else:
                self._fresh = ~self.snapshot.stale(self.now)
                self._all_fresh = bool(self._fresh.all())
        return self._fresh

    @property
    def all_fresh(self) -> bool:
        self.fresh  # noqa: B018 - computes the flag
        return self._all_fresh

    @property
    def waiting(self) -> np.ndarray:
        """Scraped waiting requests plus those routed since the last scrape (NaN = unknown)."""
        if self._waiting is None:
            w = self.snapshot.waiting
            if self.inflight is not None:
                extra = self.inflight.extra_waiting(self.snapshot, self.now)
                if extra is not None:
                    w = w + extra
            self._waiting = w
        return self._waiting

    @property
    def prompt(self) -> bytes:
        if self._prompt is None:
            self._prompt = _prefix.prompt_bytes(self.request.prompt())
        return self._prompt

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """Per-cycle memo shared by plugins (e.g. prefix hashes used by a filter and a scorer)."""
        v = self._prefix.get(key, MISSING)
        if v is MISSING:
            v = self._prefix[key] = build()
        return v
