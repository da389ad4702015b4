"""Filters: each returns the subset of candidates worth scoring (order kept).

Type names and rules follow the upstream EPP. Endpoints with stale or missing metrics count
as the worst for that metric: they survive a metric filter only when no candidate has a
known, fresh value.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from epp.plugins import NoParams, check_params, param_float
from epp.scheduling.cycle import CycleState
from epp.scheduling.scorers import PrefixCacheScorer, lora_affinity


def _known(state: CycleState, field: str, cand: np.ndarray) -> np.ndarray:
    full = state.memo(
        ("good", field), lambda: state.fresh & ~np.isnan(getattr(state.snapshot, field))
    )
    return state.take(full, cand)


def _least(state: CycleState, field: str, values: np.ndarray, cand: np.ndarray, integer: bool) -> np.ndarray:
    """Keep candidates within the lowest 1/n of the value range (the upstream rule)."""
    good = _known(state, field, cand)
    if not good.any():
        return cand
    v = state.take(values, cand)[good]
    c = cand[good]
    lo = v.min()
    hi = v.max()
    n = len(cand)
    step = (hi - lo) // n if integer else (hi - lo) / n
    return c[v <= lo + step]


class LeastQueueFilter(NoParams):
    """Keep the endpoints whose waiting queue is within [min, min + (max - min) / n]."""

    plugin_type = "least-queue"

    def filter(self, state: CycleState, candidates: np.ndarray) -> np.ndarray:
        return _least(state, "waiting", state.waiting, candidates, integer=True)


class LeastKVCacheFilter(NoParams):
    """Keep the endpoints whose KV usage is within [min, min + (max - min) / n]."""

    plugin_type = "least-kv-cache"

    def filter(self, state: CycleState, candidates: np.ndarray) -> np.ndarray:
        return _least(state, "kv_usage", state.snapshot.kv_usage, candidates, integer=False)


class LowQueueFilter:
    """Keep endpoints with at most `threshold` waiting requests (upstream default 128).

    May return nothing: then the profile has no candidate left (503), as upstream.
    """

    plugin_type = "low-queue"

    def __init__(self, name: str = "low-queue", threshold: float = 128) -> None:
        self.name = name
        self.threshold = threshold

    @classmethod
    def from_params(cls, name: str, params: dict[str, Any]) -> "LowQueueFilter":
        check_params(params, ("threshold", "queueingThresholdLoRA"))
        key = "queueingThresholdLoRA" if "queueingThresholdLoRA" in params else "threshold"
        return cls(name, param_float(params, key, 128, minimum=0))

    def filter(self, state: CycleState, candidates: np.ndarray) -> np.ndarray:
        good = _known(state, "waiting", candidates)
        v = state.take(state.waiting, candidates)
        with np.errstate(invalid="ignore"):
            return candidates[good & (v <= self.threshold)]


class LoraAffinityFilter(NoParams):
    """Keep endpoints with the requested adapter active; else those with room to load it.

    When neither exists every candidate is kept (one of them will have to swap adapters),
    rather than failing the request. Stale endpoints never count as having the adapter.
    """

    plugin_type = "lora-affinity"

    def filter(self, state: CycleState, candidates: np.ndarray) -> np.ndarray:
        s = state.take(lora_affinity(state), candidates)
        if not state.all_fresh:
            s = s * state.take(state.fresh, candidates)
        active = candidates[s == 1.0]
        if len(active):
            return active
        room = candidates[s == 0.8]
        return room if len(room) else candidates


class PrefixCacheAffinityFilter:
    """Keep endpoints whose prefix match ratio is at least `affinityThreshold`, if any.

    It reads the prefix index of a `prefix-cache-scorer` (named by `prefixScorerName`, or
    the only one in the config; the config loader links it). Without one, it keeps its own
    index; the scheduler finds any plugin's `producer` and lets it record picks.
    """

    plugin_type = "prefix-cache-affinity-filter"

    def __init__(self, name: str = "prefix-cache-affinity-filter", threshold: float = 0.8) -> None:
        self.name = name
        self.threshold = threshold
        self.producer_name: str | None = None
        self.producer = PrefixCacheScorer(f"{name}/index")

    @classmethod
    def from_params(cls, name: str, params: dict[str, Any]) -> "PrefixCacheAffinityFilter":
        check_params(params, ("affinityThreshold", "prefixScorerName"))
        f = cls(name, param_float(params, "affinityThreshold", 0.8, minimum=0.0, maximum=1.0))
        ref = params.get("prefixScorerName")
        if ref is not None and not (isinstance(ref, str) and ref):
            raise ValueError(f"parameter 'prefixScorerName' must be a plugin name, got {ref!r}")
        f.producer_name = ref
        return f

    def link(self, producer: PrefixCacheScorer) -> None:
        """Share a scorer's prefix index (and let it do the recording)."""
        self.producer = producer

    def filter(self, state: CycleState, candidates: np.ndarray) -> np.ndarray:
        s = self.producer.score(state, candidates)
        keep = candidates[s >= self.threshold]
        return keep if len(keep) else candidates


ALIASES = {
    "least-queue-filter": LeastQueueFilter,
    "least-kv-cache-filter": LeastKVCacheFilter,
    "low-queue-filter": LowQueueFilter,
    "lora-affinity-filter": LoraAffinityFilter,
    "prefix-cache-affinity": PrefixCacheAffinityFilter,
}
"""Type names with (or without) the "-filter" suffix that some upstream configs use."""
