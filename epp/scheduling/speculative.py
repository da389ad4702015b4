"""Blocks the EPP expects an endpoint to hold because it just sent it the prompt.

An engine stores a prompt's KV blocks (and publishes `BlockStored`) only when the prefill
ends, seconds later under load. Until then the precise scorer would see the prompt held
nowhere and spread a burst of one prompt group over the pool. So each pick is remembered
for a TTL, and a request matching it scores as if the blocks were stored.

A pick stands only until the engine's events settle it: once the index shows the
endpoint holding the pick's last block, the index is the truth for that endpoint (the
entry is "confirmed"), and a confirmed entry whose last block the index no longer shows
was evicted, so it is dropped: a pick must not claim blocks the engine has reported
evicted. Confirmation is checked when events that stored blocks on the endpoint are
applied (`settle`, called by the event intake), not only when the group is next read: on
a pod whose cache turns over in seconds, a cold group's blocks are often stored *and*
evicted between two of its requests, and a pick confirmed only on reading would still
claim them for the rest of its TTL (the routing benchmark's stale-prefix shape: cold
groups sent on that claim alone to a pod that had evicted them, queueing a full prefill
there; benchmarks/RESULTS.md, "One EPP: stale speculative picks").

Cost, chosen for the request path: a pick is one dict entry holding a reference to the
request's key list (no per-block work), filed under the group's first block key, one
entry per (group, endpoint): the latest pick there. Unconfirmed picks are also filed per
endpoint, so `settle` looks only at that endpoint's picks not yet stored (about its
queued and prefilling requests), one index lookup each. Matching compares the request's
keys with each entry of its group; keys are chained hashes, so equal keys at position k mean
equal blocks 0..k, and the common run is found by bisection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

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


Holds = Callable[[str, int], bool]
"""Whether the index shows an endpoint holding a block key."""


class _Pick:
    __slots__ = ("until", "keys", "confirmed")

    def __init__(self, until: float, keys: Sequence[int]) -> None:
        self.until = until
        self.keys = keys
        self.confirmed = False


class SpeculativePicks:
    """(group root key, endpoint) -> the latest pick (expiry, keys), until its TTL ends or
    the engine's events settle it; at most `max_picks` live entries (the oldest expire
    early beyond that)."""

    def __init__(self, ttl: float, max_picks: int = DEFAULT_MAX_PICKS) -> None:
        self.ttl = ttl
        self.max_picks = max(1, max_picks)
        self._by_root: dict[int, dict[str, _Pick]] = {}
        self._pending: dict[str, dict[int, _Pick]] = {}
        """Endpoint -> group root -> its live pick there not confirmed yet."""
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
        pick = picks[name] = _Pick(until, keys)
        pending = self._pending.get(name)
        if pending is None:
            pending = self._pending[name] = {}
        pending[root] = pick
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
        if entry is not None and entry.until <= now:
            del picks[name]
            if not picks:
                del self._by_root[root]
            self._unpend(name, root, entry)

    def _unpend(self, name: str, root: int, entry: _Pick) -> None:
        pending = self._pending.get(name)
        if pending is not None and pending.get(root) is entry:
            del pending[root]
            if not pending:
                del self._pending[name]

    def settle(self, name: str, holds: Holds) -> None:
        """The index has just applied events that stored blocks on `name`: confirm the
        picks there whose last block it now shows (from then on the index speaks for
        them, and their eviction ends them)."""
        pending = self._pending.get(name)
        if not pending:
            return
        done = [root for root, p in pending.items() if holds(name, p.keys[-1])]
        for root in done:
            pending.pop(root).confirmed = True
        if not pending:
            del self._pending[name]

    def match(self, keys: Sequence[int], now: float, holds: Holds | None = None) -> dict[str, int]:
        """Per endpoint with a live, unsettled pick of this group, the leading blocks it
        shares with `keys`. `holds` reads the index (see the module docstring); without
        it every live pick counts until its TTL."""
        if not keys:
            return {}
        picks = self._by_root.get(keys[0])
        if not picks:
            return {}
        out: dict[str, int] = {}
        evicted: list[str] = []
        for name, p in picks.items():
            if p.until <= now:
                continue
            if holds is not None:
                if holds(name, p.keys[-1]):
                    if not p.confirmed:  # stored: the index speaks for this endpoint now
                        p.confirmed = True
                        self._unpend(name, keys[0], p)
                    continue
                if p.confirmed:
                    evicted.append(name)
                    continue
            out[name] = common_run(keys, p.keys)
        for name in evicted:
            del picks[name]
        if not picks:
            del self._by_root[keys[0]]
        return out

    def forget(self, name: str) -> None:
        """An endpoint left the pool (rare: a scan of the live entries)."""
        self._pending.pop(name, None)
        for root in [r for r, picks in self._by_root.items() if name in picks]:
            picks = self._by_root[root]
            del picks[name]
            if not picks:
                del self._by_root[root]
