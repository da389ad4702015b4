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
from epp.plugins import NoParams, check_params, param_bool, param_float, param_int
from epp.scheduling import prefix as _prefix
from epp.scheduling.cycle import MISSING, CycleState


def _notnan(field: str) -> Any:
    def build(s: Snapshot) -> tuple[np.ndarray, bool]:
        ok = ~np.isnan(getattr(s, field))
        return ok, bool(ok.all())

    return build


_NOTNAN = {f: _notnan(f) for f in ("waiting", "running", "kv_usage")}


DEFAULT_QUEUE_SCALE = 32.0
"""Waiting requests that take the queue score from 1 to 0 while no candidate has more.

vLLM's /metrics has no `max_num_seqs` (its `cache_config_info` carries cache settings
only), so the scale of a queue cannot be read from the pod and is a parameter. 32 makes
one request worth 1/32 of the weight: a few requests never outweigh a clear KV-cache,
adapter or prefix difference, a burst of tens does."""

DEFAULT_RUNNING_SCALE = 256.0
"""Running requests that take the running-requests score from 1 to 0 (vLLM's default
`max_num_seqs`, the batch a pod runs at most)."""

NORMALIZATIONS = ("scaled", "minmax")


def spread_score(state: CycleState, field: str, values: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Upstream's min-max: (max - v) / (max - min) over the candidates with known, fresh
    values; others 0.

    All 1.0 when the known values are equal (nobody is better); all 0 when none is known.
    A difference of one request between the two extreme candidates is worth the full weight.
    """
    return _load_score(state, field, values, cand, None)


def scaled_score(
    state: CycleState, field: str, values: np.ndarray, cand: np.ndarray, scale: float
) -> np.ndarray:
    """1 - v / max(scale, highest known v): proportional to the load itself, not to the
    spread among the candidates.

    A request moves a score by 1/scale while every candidate is below `scale`, and by
    1/(highest load) above it, so two pods at 50 and 51 waiting differ by 2%, not by the
    whole weight. Candidates with unknown or stale values score 0, as in `spread_score`.
    """
    return _load_score(state, field, values, cand, scale)


def _load_score(
    state: CycleState, field: str, values: np.ndarray, cand: np.ndarray, scale: float | None
) -> np.ndarray:
    v = state.take(values, cand)
    notnan, all_known = state.derived.get(("notnan", field), _NOTNAN[field])
    if all_known and state.all_fresh:
        return _formula(v, v, scale)
    good = state.take(
        state.memo(("good", field), lambda: state.fresh & notnan), cand
    )
    if not good.any():
        return np.zeros(len(v))
    s = _formula(v, v[good], scale)
    s[~good] = 0.0
    return s


def _formula(v: np.ndarray, known: np.ndarray, scale: float | None) -> np.ndarray:
    hi = known.max()
    if scale is None:
        lo = known.min()
        if hi == lo:
            return np.ones(len(v))
        return (hi - v) / (hi - lo)
    # 1 - v / max(scale, hi), clipped to [0, 1]; in place on one new array (hot path).
    out = v * (-1.0 / max(scale, float(hi)))
    out += 1.0
    return np.clip(out, 0.0, 1.0, out=out)


def _load_params(params: dict[str, Any], default_scale: float) -> tuple[str, float]:
    check_params(params, ("normalization", "scale"))
    norm = params.get("normalization", "scaled")
    if norm not in NORMALIZATIONS:
        raise ValueError(
            f"parameter 'normalization' must be one of {', '.join(NORMALIZATIONS)}, got {norm!r}"
        )
    scale = param_float(params, "scale", default_scale, minimum=1.0)
    return norm, scale


class _LoadScorer:
    """Shared by the queue and running-requests scorers: `normalization` is `scaled` (ours,
    default) or `minmax` (upstream's formula, to reproduce its decisions)."""

    plugin_type = ""
    bounded = True
    FIELD = ""
    DEFAULT_SCALE = 1.0

    def __init__(
        self, name: str = "", *, normalization: str = "scaled", scale: float | None = None
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}")
        self.name = name or self.plugin_type
        self.normalization = normalization
        self.scale = float(scale) if scale is not None else self.DEFAULT_SCALE

    @classmethod
    def from_params(cls, name: str, params: dict[str, Any]) -> Any:
        norm, scale = _load_params(params, cls.DEFAULT_SCALE)
        return cls(name, normalization=norm, scale=scale)

    def values(self, state: CycleState) -> np.ndarray:
        raise NotImplementedError

    def score(self, state: CycleState, candidates: np.ndarray) -> np.ndarray:
        v = self.values(state)
        if self.normalization == "minmax":
            return spread_score(state, self.FIELD, v, candidates)
        return scaled_score(state, self.FIELD, v, candidates, self.scale)


class QueueScorer(_LoadScorer):
    """Shorter queue is better: waiting requests (scraped + routed since the scrape).

    Parameters: `normalization` (`scaled`, default, or upstream's `minmax`) and `scale`
    (waiting requests worth the whole weight, default 32; see `scaled_score`)."""

    plugin_type = "queue-scorer"
    FIELD = "waiting"
    DEFAULT_SCALE = DEFAULT_QUEUE_SCALE

    def values(self, state: CycleState) -> np.ndarray:
        return state.waiting


class RunningRequestsSizeScorer(_LoadScorer):
    """Fewer running requests is better; parameters as the queue scorer's (`scale`
    default 256, vLLM's default `max_num_seqs`)."""

    plugin_type = "running-requests-size-scorer"
    FIELD = "running"
    DEFAULT_SCALE = DEFAULT_RUNNING_SCALE

    def values(self, state: CycleState) -> np.ndarray:
        return state.snapshot.running


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


def lora_affinity(state: CycleState) -> np.ndarray:
    """`lora_scores` for the request's target model, per endpoint of the snapshot."""
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
        return _zero_stale(state, state.take(lora_affinity(state), candidates), candidates)


DEFAULT_HIT_QUEUE_WORTH = 8.0
"""Waiting requests, beyond the least loaded candidate's, that a full prefix-cache hit is
worth. On the benchmark's pods a 1,500-token prefix costs ~0.3 s to prefill and a queued
request ahead delays admission by ~25-40 ms, so a full hit pays for about 8 of them."""


AWAY_SHARE = 0.8
"""Share of the prefix score a holder other than the group's home gets (see
`prefix.PrefixHomes`): at equal load the home wins by 0.2 x the prefix weight, about
ten queued requests at the default weights, so a group drawn back from its spill pods
returns to one pod instead of rotating among every pod that ever held it."""


DEFAULT_RUNNING_WEIGHT = 0.125
"""Queued-request equivalents of one running request in the prefix score's load: a batch
of 8 more running sequences slows every step about as much as one more request waiting
to be admitted delays the next (measured on the simulator, benchmarks/RESULTS.md). The
queue alone misses a pod whose batch is full of short, cached requests: its queue stays
short while every step gets slower."""


Load = tuple[np.ndarray, "np.ndarray | None"]
"""A load per candidate, in queued-request units, and which candidates' loads are known
and fresh (None: all are, the common case)."""


def queued_load(state: CycleState, candidates: np.ndarray, running_weight: float,
                waiting: np.ndarray | None = None) -> Load:
    """Per candidate: waiting requests (scraped and routed since the scrape; or `waiting`,
    one per candidate, as `prefill.prefill_load` counts them) + `running_weight` x running
    requests, and which of them are known and fresh (None: all are, the common case)."""
    w = state.take(state.waiting, candidates) if waiting is None else waiting
    if running_weight > 0:
        w = w + running_weight * state.take(state.derived.get("running-or-0", _running_or_zero), candidates)
    _, all_known = state.derived.get(("notnan", "waiting"), _NOTNAN["waiting"])
    if all_known and state.all_fresh:
        return w, None
    known = ~np.isnan(w)
    if not state.all_fresh:
        known &= state.take(state.fresh, candidates)
    return w, known


def load_discount(load: Load, worth: float) -> np.ndarray:
    """Per candidate, 1 while excess <= worth / 2, falling linearly to 0 at excess = worth;
    excess = its load minus the least loaded candidate's; both prefix scorers pass
    `queued_load`: waiting requests (scraped and routed since the scrape) +
    `running_weight` x running requests.

    Multiplying the prefix score by this is a cost model in units of queued requests: a
    cached prefix saves its prefill, about `worth` queued requests' delay, so a pod whose
    load is that much above the best alternative's has nothing left to offer for
    holding it, and the request competes on load alone. Up to half of `worth` nothing is
    discounted, so the usual few requests of difference never move a group. A hot prompt
    group therefore spills to a second pod (which then caches it too) once its pod runs
    well ahead, and stops spilling when the load drains; a cold group's pod never runs
    ahead, so it stays sticky. Unknown or stale loads are not discounted (the other
    scorers already give them their worst score).
    """
    w, known = load
    if known is None:  # the common case: no mask to build
        excess = w - w.min()
    else:
        if not known.any():
            return np.ones(len(w))
        excess = np.where(known, w - w[known].min(), 0.0)
    # clip(2 (1 - excess / worth), 0, 1), in place
    excess *= -2.0 / worth
    excess += 2.0
    return np.clip(excess, 0.0, 1.0, out=excess)


def prefer_home(state: CycleState, candidates: np.ndarray, scores: np.ndarray,
                home: str | None) -> None:
    """Scale `scores` (one per candidate, a new array) by AWAY_SHARE for candidates other
    than the group's `home` endpoint; the home keeps its score."""
    i = state.snapshot.by_name.get(home) if home is not None else None
    if i is None:
        return
    if candidates is state.derived.all:
        kept = scores[i]
        scores *= AWAY_SHARE
        scores[i] = kept
    else:
        at_home = candidates == i
        scores[~at_home] *= AWAY_SHARE


def _running_or_zero(s: Snapshot) -> np.ndarray:
    return np.nan_to_num(s.running)


class PrefixCacheScorer:
    """Leading prompt blocks probably cached on the endpoint / blocks in the prompt.

    Also the producer of the approximate prefix index: after each pick it records the
    prompt's blocks on the chosen endpoint (`post_pick`), and it forgets endpoints that leave
    the pool. Parameters (upstream names): `blockSizeTokens` (16) or `blockSize` in
    characters (64), `autoTune` (true: use the endpoint's scraped block size and GPU block
    count), `maxPrefixBlocksToMatch` (256), `lruCapacityPerServer` (31,250), and ours:
    `maxIndexedBlocks` (2,000,000 entries over all endpoints, bounding memory),
    `cacheHitQueueWorth` (8; 0 = upstream's load-blind score) and `loadRunningWeight`
    (0.125), see `load_discount`.
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
        "cacheHitQueueWorth",
        "loadRunningWeight",
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
        hit_queue_worth: float = DEFAULT_HIT_QUEUE_WORTH,
        running_weight: float = DEFAULT_RUNNING_WEIGHT,
    ) -> None:
        if not hit_queue_worth >= 0:
            raise ValueError(f"cacheHitQueueWorth must be >= 0, got {hit_queue_worth!r}")
        self.name = name
        self.hit_queue_worth = float(hit_queue_worth)
        self.running_weight = float(running_weight)
        self.default_chars = block_chars if block_chars else block_tokens * _prefix.CHARS_PER_TOKEN
        self.auto_tune = auto_tune
        self.max_blocks = max_blocks
        self.lru_capacity = lru_capacity
        self.index = _prefix.PrefixIndex(max_indexed_blocks)
        self.homes = _prefix.PrefixHomes()
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
            hit_queue_worth=param_float(
                params, "cacheHitQueueWorth", DEFAULT_HIT_QUEUE_WORTH, minimum=0.0
            ),
            running_weight=param_float(
                params, "loadRunningWeight", DEFAULT_RUNNING_WEIGHT, minimum=0.0
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
        if self.hit_queue_worth > 0 and s.any():
            s = s * load_discount(queued_load(state, candidates, self.running_weight),
                                  self.hit_queue_worth)
            self._away_share(state, candidates, s)
        return s

    def _root(self, state: CycleState) -> int | None:
        """The request's group: the hash of its first block at the pool's first block size."""
        _, distinct = self._chars(state)
        if not distinct:
            return None
        hashes = self.hashes(state, distinct[0])
        return hashes[0] if hashes else None

    def _away_share(self, state: CycleState, candidates: np.ndarray, scores: np.ndarray) -> None:
        root = self._root(state)
        prefer_home(state, candidates, scores, self.homes.get(root) if root is not None else None)

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
        if self.hit_queue_worth > 0:
            root = self._root(state)
            if root is not None:
                _, distinct = self._chars(state)
                self.homes.settle(root, name, self.match(state, distinct[0]),
                                  state.request.request_id)
        if self.outbox is not None:
            self.outbox(self.name, name, cap, hashes)

    def learn_remote(self, endpoint: str, hashes: Sequence[int], capacity: int,
                     continues: bool = False) -> bool:
        """Another EPP replica routed this prompt to `endpoint` (state sync): its new
        blocks are added without refreshing the ones this replica already holds.
        `continues`: `hashes[0]` is a block sent earlier; when this replica does not hold
        it, the chain's head never arrived (or was evicted) and the record is dropped
        (False), keeping the endpoint's blocks prefix-closed."""
        index = self.index
        held = index.held(endpoint, hashes)
        if continues and not held:
            return False
        index.record(endpoint, hashes, capacity, held, refresh=False)
        return True

    def forget_endpoint(self, name: str) -> None:
        self.index.forget(name)

    def prune(self, snapshot: Snapshot) -> None:
        """Lazy forgetting when no datastore listener is attached: cheap unless the index
        holds more endpoints than the pool has."""
        if len(self.index) > len(snapshot):
            self.index.retain(snapshot.by_name)
