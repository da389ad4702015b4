"""In-flight load the other replicas reported, expiring with their heartbeats.

Each replica publishes, per endpoint, the requests it routed after its own last scrape of
that endpoint and has not seen finish (`InFlightTracker.local_extra_waiting`): exactly the
part of the load that scraped queue lengths do not show yet. A replica sends its counts
with every batch and at least once per heartbeat; the receiver keeps only each peer's
latest counts (absolute values, so a lost or repeated batch cannot skew them) and drops a
peer that has been silent for `ttl` seconds of the receiver's own clock: a replica that
dies or is cut off leaves no phantom load behind.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epp.datastore import Snapshot


@dataclass(slots=True)
class _Peer:
    seen: float
    counts: dict[str, int]


class RemoteLoad:
    """Per peer replica, its latest in-flight counts by endpoint name (event loop only)."""

    def __init__(self, ttl: float) -> None:
        if not ttl > 0:
            raise ValueError(f"state-sync TTL must be > 0, got {ttl!r}")
        self.ttl = float(ttl)
        self._peers: dict[str, _Peer] = {}
        self._version = 0
        self._cache_key: tuple[int, int] = (-1, -1)
        self._cache: np.ndarray | None = None

    def update(self, replica: str, counts: dict[str, int] | None, now: float) -> None:
        """A batch from `replica` arrived at `now`; `counts` None means heartbeat only."""
        peer = self._peers.get(replica)
        if peer is None:
            self._peers[replica] = _Peer(now, counts or {})
            self._version += 1
            return
        peer.seen = now
        if counts is not None and counts != peer.counts:
            peer.counts = counts
            self._version += 1

    def expire(self, now: float) -> list[str]:
        """Drop peers silent for longer than the TTL; returns their ids."""
        gone = [r for r, p in self._peers.items() if now - p.seen > self.ttl]
        for r in gone:
            del self._peers[r]
        if gone:
            self._version += 1
        return gone

    def clear(self) -> None:
        if self._peers:
            self._peers.clear()
            self._version += 1

    @property
    def peers(self) -> list[str]:
        return list(self._peers)

    def total(self, endpoint: str) -> int:
        return sum(p.counts.get(endpoint, 0) for p in self._peers.values())

    def extra_waiting(self, snapshot: Snapshot) -> np.ndarray | None:
        """Per snapshot index, the peers' requests; None when they report none (cached
        until the snapshot or the peers' counts change)."""
        key = (snapshot.version, self._version)
        if key == self._cache_key:
            return self._cache
        out: np.ndarray | None = None
        by_name = snapshot.by_name
        for p in self._peers.values():
            for name, n in p.counts.items():
                i = by_name.get(name)
                if i is None or n <= 0:
                    continue
                if out is None:
                    out = np.zeros(len(snapshot), np.int64)
                out[i] += n
        self._cache_key, self._cache = key, out
        return out
