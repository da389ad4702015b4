"""Blocks the EPP expects an endpoint to hold because it just sent it the prompt.

An engine stores a prompt's KV blocks (and publishes `BlockStored`) only when the prefill
ends, seconds later under load. Until then the precise scorer would see the prompt held
nowhere and spread a burst of one prompt group over the pool. So each pick is remembered
for a TTL, and a request matching it scores as if the blocks were stored.

Cost, chosen for the request path: a pick is one dict entry holding a reference to the
request's key list (no per-block work), filed under the group's first block key, one
entry per (group, endpoint): the latest pick there. Matching compares the request's keys
with each entry of its group; keys are chained hashes, so equal keys at position k mean
equal blocks 0..k, and the common run is found by bisection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

DEFAULT_MAX_PICKS = 200_000


def common_run(a: Sequence[int], b: Sequence[int]) -> int:
    """Leading positions where two chained key lists agree (bisection on one position:
    with chaining, agreeing at k means agreeing at every position before k)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class SpeculativePicks:
    """(group root key, endpoint) -> (expiry, keys) of the latest pick, until its TTL ends;
    at most `max_picks` live entries (the oldest expire early beyond that)."""

    def __init__(self, ttl: float, max_picks: int = DEFAULT_MAX_PICKS) -> None:
        self.ttl = ttl
        self.max_picks = max(1, max_picks)
        self._by_root: dict[int, dict[str, tuple[float, Sequence[int]]]] = {}
        self._queue: deque[tuple[float, int, str]] = deque()

    @property
    def size(self) -> int:
        """Live (group, endpoint) entries."""
        return sum(len(v) for v in self._by_root.values())

    def __bool__(self) -> bool:
        return bool(self._by_root)

    def record(self, name: str, keys: Sequence[int], now: float) -> None:
        if not keys or self.ttl <= 0:
            return
        root = keys[0]
        picks = self._by_root.get(root)
        if picks is None:
            picks = self._by_root[root] = {}
        until = now + self.ttl
        picks[name] = (until, keys)
        self._queue.append((until, root, name))
        if len(self._queue) > self.max_picks:
            self._drop(*self._queue.popleft(), until)

    def expire(self, now: float) -> None:
        q = self._queue
        while q and q[0][0] <= now:
            self._drop(*q.popleft(), now)

    def _drop(self, _until: float, root: int, name: str, now: float) -> None:
        """Drop (root, name) unless a later pick renewed it past `now`."""
        picks = self._by_root.get(root)
        if picks is None:
            return
        entry = picks.get(name)
        if entry is not None and entry[0] <= now:
            del picks[name]
            if not picks:
                del self._by_root[root]

    def match(self, keys: Sequence[int], now: float) -> dict[str, int]:
        """Per endpoint with a live pick of this group, the leading blocks it shares."""
        if not keys:
            return {}
        picks = self._by_root.get(keys[0])
        if not picks:
            return {}
        return {name: common_run(keys, held) for name, (until, held) in picks.items()
                if until > now}

    def forget(self, name: str) -> None:
        """An endpoint left the pool (rare: a scan of the live entries)."""
        for root in [r for r, picks in self._by_root.items() if name in picks]:
            picks = self._by_root[root]
            del picks[name]
            if not picks:
                del self._by_root[root]
