"""Where a prompt that no endpoint holds should go: the least loaded endpoint, ties broken
the same way by every EPP replica.

A prompt no endpoint holds (a new or evicted prompt group) is a full prefill, the most
expensive request the pool gets, and where it lands decides where the rest of its group
will hit. Left to the weighted sum, such a miss is placed mostly by the KV-utilization
score (queue scores differ little at a few waiting requests), so misses bunch on pods that
already queue work; and two EPP replicas place the same new group on two pods (neither
sees the other's pick until the engine's events report the blocks stored), which halves
the group's hits and doubles its cache footprint. The precise prefix scorer therefore
names one endpoint for such a prompt (`least_loaded`): the least loaded candidate (the
scorer measures load as prefill work pending, `prefill.prefill_load`), and among equally
loaded ones the highest rendezvous hash of (the prompt's first unheld block, endpoint
name). Replicas see the same scraped loads and the same events, so they mostly agree
without talking; when they do not, nothing worse than today's spread happens.

Measured on the stale-prefix routing shape (benchmarks/RESULTS.md, "Cold placement").
"""

from __future__ import annotations

import numpy as np
import xxhash

from epp.scheduling.cycle import CycleState
from epp.scheduling.scorers import Load


def rendezvous(key: int, name: str) -> int:
    """The weight of endpoint `name` for prompt block `key` (highest wins)."""
    return xxhash.xxh64_intdigest(name.encode(), seed=key & 0xFFFF_FFFF_FFFF_FFFF)


def least_loaded(state: CycleState, candidates: np.ndarray, key: int, load: Load) -> int | None:
    """The position in `candidates` of the least loaded one (`load`, one per candidate),
    ties broken by `rendezvous(key, name)`; None when no candidate's load is known and
    fresh."""
    w, known = load
    if known is not None:
        if not known.any():
            return None
        w = np.where(known, w, np.inf)
    tied = np.flatnonzero(w == w.min())
    if len(tied) == 1:
        return int(tied[0])
    endpoints = state.snapshot.endpoints
    return int(max(tied, key=lambda j: rendezvous(key, endpoints[int(candidates[j])].name)))
