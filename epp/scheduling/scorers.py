"""Scorers: each maps candidates to scores in [0, 1] (higher is better), on whole arrays.

Algorithms and type names follow the upstream EPP. Every scorer gives an endpoint whose
metrics are stale or missing the worst score for its metric, so that an endpoint we know
nothing about is chosen only when nothing better is known.

Scorers must not modify the arrays they get from `CycleState`/`Derived` (shared, cached)
and return arrays they may share (the profile copies before adding).
"""

from __future__ import annotations

from itertools import repeat
from operator import contains as _contains
from typing import Any, Callable, Sequence

import numpy as np

from epp.datastore import Snapshot
from epp.observability import PREFIX_HIT_RATIO
from epp.plugins import NoParams, check_params, param_bool, param_int
from epp.scheduling import prefix as _prefix
from epp.scheduling.cycle import MISSING, CycleState


def _notnan(field: str) -> Any:
    def build(s: Snapshot) -> tuple[np.ndarray, bool]:
        ok = ~np.isnan(getattr(s, field))
        return ok, bool(ok.all())

    return build


_NOTNAN = {f: _notnan(f) for f in ("waiting", "running", "kv_usage")}


def spread_score(state: CycleState, field: str, values: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """(max - v) / (max - min) over the candidates with known, fresh values; others 0.

    All 1.0 when the known values are equal (nobody is better); all 0 when none is known.
    """
    v = state.take(values, cand)
    notnan, all_known = state.derived.get(("notnan", field), _NOTNAN[field])
    if all_known and state.all_fresh:
        lo = v.min()
        hi = v.max()
        if hi == lo:
            return np.ones(len(v))
        return (hi - v) / (hi - lo)
    good = state.take(
        state.memo(("good", field), lambda: state.fresh & notnan), cand
    )
    if not good.any():
        return np.zeros(len(v))
    vg = v[good]
    lo = vg.min()
    hi = vg.max()
    if hi == lo:
        return good.astype(np.float64)
    s = (hi - v) / (hi - lo)
    s[~good] = 0.0
    return s


class QueueScorer(NoParams):
    """Shorter queue is better: waiting requests (scraped + routed since the scrape)."""

    plugin_type = "queue-scorer"
    bounded = True

    def score(self, state: CycleState, candidates: np.ndarray) -> np.ndarray:
        return spread_score(state, "waiting", state.waiting, candidates)


class RunningRequestsSizeScorer(NoParams):
    """Fewer running requests is better, scaled like the queue scorer."""

    plugin_type = "running-requests-size-scorer"
    bounded = True

    def score(self, state: CycleState, candidates: np.ndarray) -> np.ndarray:
        return spread_score(state, "running", state.snapshot.running, candidates)


def _kv_score(s: Snapshot) -> np.ndarray:
    # fmax/fmin ignore NaN, so an unreported usage becomes the worst score, 0.
    return np.fmin(np.fmax(1.0 - s.kv_usage, 0.0), 1.0)


def _zero_stale(state: CycleState, scores: np.ndarray, cand: np.ndarray) -> np.ndarray:
    if state.all_fresh:
        return scores
    return scores * state.take(state.fresh, cand)


class KVCacheUtilizationScorer(NoParams):
    """More free KV cache is better: 1 - usage (usage in [0, 1])."""

    plugin_type = "kv-cache-utilization-scorer"
    bounded = True

    def score(self, state: CycleState, candidates: np.ndarray) -> np.ndarray:
        base = state.derived.get("kv_score", _kv_score)
        return _zero_stale(state, state.take(base, candidates), candidates)


def _adapter_counts(s: Snapshot) -> tuple[np.ndarray, bool]:
    """Adapters loaded or loading per endpoint, and whether any endpoint has one at all."""
    n = len(s)
    if not any(s.active_adapters) and not any(s.waiting_adapters):
        return np.zeros(n, np.int64), False
    loaded = np.fromiter(map(len, s.active_adapters), np.int64, n)
    loaded += np.fromiter(map(len, s.waiting_adapters), np.int64, n)
    return loaded, True


def lora_scores(s: Snapshot, model: str, counts: tuple[np.ndarray, bool] | None = None) -> np.ndarray:
    """Per endpoint: 1.0 adapter active, 0.8 room to load it, 0.6 waiting there, else 0.

    An endpoint whose server reports `model` as its base model scores 1.0: it needs no
    adapter for it. (So base-model requests are not confined to LoRA-enabled endpoints.)

    Built once per snapshot and model with C-level iteration (map/operator.contains), and
    without any per-endpoint work when no endpoint reports an adapter (the common case).
    """
    loaded, any_adapter = counts if counts is not None else _adapter_counts(s)
    n = len(s)
    out = np.zeros(n)
    out[loaded < s.max_lora] = 0.8
    if any_adapter:
        active = np.fromiter(map(_contains, s.active_adapters, repeat(model, n)), np.bool_, n)
        waiting = np.fromiter(map(_contains, s.waiting_adapters, repeat(model, n)), np.bool_, n)
        out[waiting & ~(loaded < s.max_lora)] = 0.6
        out[active] = 1.0
    if s.models and any(s.models):
        out[np.fromiter(map(_contains, s.models, repeat(model, n)), np.bool_, n)] = 1.0
    return out


def _same_block_sizes(old: Snapshot, new: Snapshot) -> bool:
    return old.block_size.tobytes() == new.block_size.tobytes()


def _same_adapters(old: Snapshot, new: Snapshot) -> bool:
    # Tuple compares run in C; equal frozensets compare by hash. Much cheaper than a rebuild.
    return (
        old.active_adapters == new.active_adapters
        and old.waiting_adapters == new.waiting_adapters
        and old.max_lora.tobytes() == new.max_lora.tobytes()
        and old.models == new.models
    )


def _lora(state: CycleState) -> np.ndarray:
    model = state.request.target_model
    d = state.derived
    key = ("lora", model)

    def build(s: Snapshot) -> np.ndarray:
        v = d.carried(key, _same_adapters)
        if v is not MISSING:
            return v
        return lora_scores(s, model, d.get("adapters", _adapter_counts))

    return d.get(key, build)


class LoraAffinityScorer(NoParams):
    """Prefer endpoints that already serve the requested adapter, then those that can load it."""

    plugin_type = "lora-affinity-scorer"
    bounded = True

    def score(self, state: CycleState, candidates: np.ndarray) -> np.ndarray:
        return _zero_stale(state, state.take(_lora(state), candidates), candidates)


class PrefixCacheScorer:
    """Leading prompt blocks probably cached on the endpoint / blocks in the prompt.

    Also the producer of the approximate prefix index: after each pick it records the
    prompt's blocks on the chosen endpoint (`post_pick`), and it forgets endpoints that leave
    the pool. Parameters (upstream names): `blockSizeTokens` (16) or `blockSize` in
    characters (64), `autoTune` (true: use the endpoint's scraped block size and GPU block
    count), `maxPrefixBlocksToMatch` (256), `lruCapacityPerServer` (31,250), and ours,
    `maxIndexedBlocks` (2,000,000 entries over all endpoints, bounding memory).
    """

    plugin_type = "prefix-cache-scorer"
    bounded = True
    PARAMS = (
        "blockSize",
        "blockSizeTokens",
        "autoTune",
        "maxPrefixBlocksToMatch",
        "lruCapacityPerServer",
        "maxIndexedBlocks",
    )

    def __init__(
        self,
        name: str = "prefix-cache-scorer",
        *,
        block_tokens: int = _prefix.DEFAULT_BLOCK_TOKENS,
        block_chars: int | None = None,
        auto_tune: bool = True,
        max_blocks: int = _prefix.DEFAULT_MAX_BLOCKS,
        lru_capacity: int = _prefix.DEFAULT_LRU_CAPACITY,
        max_indexed_blocks: int = _prefix.DEFAULT_MAX_INDEXED_BLOCKS,
    ) -> None:
        self.name = name
        self.default_chars = block_chars if block_chars else block_tokens * _prefix.CHARS_PER_TOKEN
        self.auto_tune = auto_tune
        self.max_blocks = max_blocks
        self.lru_capacity = lru_capacity
        self.index = _prefix.PrefixIndex(max_indexed_blocks)
        self.outbox: Callable[[str, str, int, list[int]], None] | None = None
        """Active-active state sync: told (scorer, endpoint, capacity, hashes) of each
        record, to share it with the other replicas (`epp.statesync`)."""

    @classmethod
    def from_params(cls, name: str, params: dict[str, Any]) -> "PrefixCacheScorer":
        check_params(params, cls.PARAMS)
        if "blockSize" in params and "blockSizeTokens" in params:
            raise ValueError("give either 'blockSize' (characters) or 'blockSizeTokens', not both")
        chars = param_int(params, "blockSize", 0, minimum=1) if "blockSize" in params else None
        return cls(
            name,
            block_tokens=param_int(params, "blockSizeTokens", _prefix.DEFAULT_BLOCK_TOKENS, minimum=1),
            block_chars=chars,
            auto_tune=param_bool(params, "autoTune", True),
            max_blocks=param_int(params, "maxPrefixBlocksToMatch", _prefix.DEFAULT_MAX_BLOCKS, minimum=1),
            lru_capacity=param_int(
                params, "lruCapacityPerServer", _prefix.DEFAULT_LRU_CAPACITY, minimum=1
            ),
            max_indexed_blocks=param_int(
                params, "maxIndexedBlocks", _prefix.DEFAULT_MAX_INDEXED_BLOCKS, minimum=1
            ),
        )

    # -- per snapshot ----------------------------------------------------------------

    def _chars(self, state: CycleState) -> tuple[np.ndarray, list[int]]:
        """Block size in characters per endpoint, and the distinct sizes."""

        d = state.derived
        key = ("prefix-chars", self.default_chars, self.auto_tune)

        def build(s: Snapshot) -> tuple[np.ndarray, list[int]]:
            v = d.carried(key, _same_block_sizes)
            if v is not MISSING:
                return v  # type: ignore[no-any-return]
            if self.auto_tune:
                chars = np.where(
                    s.block_size > 0, s.block_size * _prefix.CHARS_PER_TOKEN, self.default_chars
                ).astype(np.int64)
            else:
                chars = np.full(len(s), self.default_chars, np.int64)
            if len(chars) == 0 or chars.min() == chars.max():
                return chars, chars[:1].tolist()
            return chars, np.unique(chars).tolist()

        return d.get(key, build)  # type: ignore[no-any-return]

    # -- per cycle -------------------------------------------------------------------

    def hashes(self, state: CycleState, chars: int) -> list[int]:
        key = ("prefix-hashes", chars, self.max_blocks)
        return state.memo(
            key,
            lambda: _prefix.block_hashes(
                state.request.target_model, state.prompt, chars, self.max_blocks
            ),
        )

    def match(self, state: CycleState, chars: int) -> dict[str, int]:
        """Endpoint name -> leading blocks held, for this request's chain of `chars` blocks."""
        return state.memo(
            ("prefix-match", id(self.index), chars, self.max_blocks),
            lambda: self.index.match(self.hashes(state, chars)),
        )

    def match_scores(self, state: CycleState) -> np.ndarray | None:
        """Full-pool match ratios for this request, or None when nothing matches anywhere."""
        return state.memo(("prefix-scores", id(self)), lambda: self._match_scores(state))

    def _match_scores(self, state: CycleState) -> np.ndarray | None:
        chars_full, distinct = self._chars(state)
        by_name = state.snapshot.by_name
        out: np.ndarray | None = None
        for chars in distinct:
            hashes = self.hashes(state, chars)
            if not hashes:
                continue
            matched = self.match(state, chars)
            if not matched:
                continue
            if out is None:
                out = np.zeros(state.derived.n)
            total = len(hashes)
            for name, k in matched.items():
                i = by_name.get(name)
                if i is not None and (len(distinct) == 1 or chars_full[i] == chars):
                    out[i] = k / total
        return out

    def score(self, state: CycleState, candidates: np.ndarray) -> np.ndarray:
        full = self.match_scores(state)
        if full is None:
            return np.zeros(len(candidates))
        s = state.take(full, candidates)
        if not state.all_fresh:
            # A stale endpoint may have restarted with an empty cache; trust the index only
            # for fresh ones, unless nothing is fresh at all.
            fresh = state.take(state.fresh, candidates)
            if fresh.any():
                s = s * fresh
        return s

    # -- learning --------------------------------------------------------------------

    def post_pick(self, state: CycleState, index: int) -> None:
        chars_full, _ = self._chars(state)
        chars = int(chars_full[index])
        hashes = self.hashes(state, chars)
        if not hashes:
            return
        name = state.snapshot.endpoints[index].name
        held = self.match(state, chars).get(name, 0)
        PREFIX_HIT_RATIO.observe(held / len(hashes))
        cap = self.lru_capacity
        if self.auto_tune:
            gpu_blocks = int(state.snapshot.num_gpu_blocks[index])
            if gpu_blocks > 0:
                cap = gpu_blocks
        self.index.record(name, hashes, cap, held)
        if self.outbox is not None:
            self.outbox(self.name, name, cap, hashes)

    def learn_remote(self, endpoint: str, hashes: Sequence[int], capacity: int) -> None:
        """Another EPP replica routed this prompt to `endpoint` (state sync): its new
        blocks are added without refreshing the ones this replica already holds."""
        index = self.index
        index.record(endpoint, hashes, capacity, index.held(endpoint, hashes), refresh=False)

    def forget_endpoint(self, name: str) -> None:
        self.index.forget(name)

    def prune(self, snapshot: Snapshot) -> None:
        """Lazy forgetting when no datastore listener is attached: cheap unless the index
        holds more endpoints than the pool has."""
        if len(self.index) > len(snapshot):
            self.index.retain(snapshot.by_name)
