"""Each built-in plugin on small, known metric tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from epp import registry
from epp.datastore import Datastore, Endpoint, EndpointMetrics, Snapshot
from epp.scheduling import CycleState, Derived, Profile, Scheduler, SchedulingRequest
from epp.scheduling.inflight import InFlightTracker
from epp.scheduling.filters import (
    LeastKVCacheFilter,
    LeastQueueFilter,
    LoraAffinityFilter,
    LowQueueFilter,
    PrefixCacheAffinityFilter,
)
from epp.scheduling.pickers import MaxScorePicker, RandomPicker, WeightedRandomPicker
from epp.scheduling.scorers import (
    KVCacheUtilizationScorer,
    LoraAffinityScorer,
    PrefixCacheScorer,
    QueueScorer,
    RunningRequestsSizeScorer,
)

NOW = 1000.0


def snapshot(**rows: dict | None) -> Snapshot:
    """A pool whose endpoints are the keyword names; None = never scraped."""
    ds = Datastore(staleness_threshold=2.0)
    ds.set_endpoints([Endpoint(n, f"10.0.0.{i + 1}", 8000) for i, n in enumerate(rows)])
    for n, m in rows.items():
        if m is not None:
            ds.update_metrics(n, EndpointMetrics(**{"scraped_at": NOW, **m}))
    return ds.snapshot()


def state(snap: Snapshot, model: str = "m", prompt: str = "", inflight=None) -> CycleState:
    return CycleState(Derived(snap), SchedulingRequest("r", model, prompt), NOW, inflight)


def scores(plugin, snap: Snapshot, **kw) -> list[float]:
    st = state(snap, **kw)
    return [round(float(x), 6) for x in plugin.score(st, st.derived.all)]


def survivors(plugin, snap: Snapshot, **kw) -> list[str]:
    st = state(snap, **kw)
    return [snap.endpoints[i].name for i in plugin.filter(st, st.derived.all).tolist()]


# -- scorers -------------------------------------------------------------------------


MINMAX = {"normalization": "minmax"}


def test_queue_scorer_is_proportional_to_the_queue_not_to_the_spread() -> None:
    # Below the scale (32 by default) one waiting request costs 1/32 of the score.
    snap = snapshot(a=dict(waiting=0), b=dict(waiting=1), c=dict(waiting=8))
    assert scores(QueueScorer(), snap) == [1.0, 0.96875, 0.75]
    assert scores(QueueScorer(scale=4), snap) == [1.0, 0.875, 0.0]  # c beyond the scale
    # Above it, relative to the longest queue: 50 and 51 waiting differ by 2%, not 100%.
    busy = snapshot(a=dict(waiting=50), b=dict(waiting=51), c=dict(waiting=100))
    assert scores(QueueScorer(), busy) == [0.5, 0.49, 0.0]
    assert scores(QueueScorer(), snapshot(a=dict(waiting=3), b=dict(waiting=3))) == [
        0.90625, 0.90625]


def test_queue_scorer_minmax_reproduces_upstream() -> None:
    upstream = registry.create("queue-scorer", "q", MINMAX)
    snap = snapshot(a=dict(waiting=0), b=dict(waiting=5), c=dict(waiting=10))
    assert scores(upstream, snap) == [1.0, 0.5, 0.0]
    assert scores(upstream, snapshot(a=dict(waiting=3), b=dict(waiting=3))) == [1.0, 1.0]
    # One request of difference is the whole weight there.
    assert scores(upstream, snapshot(a=dict(waiting=2), b=dict(waiting=3))) == [1.0, 0.0]


@pytest.mark.parametrize("params", [{}, MINMAX])
def test_queue_scorer_gives_stale_and_missing_the_worst_score(params) -> None:
    snap = snapshot(
        a=dict(waiting=4),
        b=dict(waiting=2),
        stale=dict(waiting=0, scraped_at=NOW - 10),
        never=None,
        unreported=dict(kv_usage=0.1),  # scraped, but no queue metric
    )
    got = scores(registry.create("queue-scorer", "q", params), snap)
    assert got[2:] == [0.0, 0.0, 0.0] and got[1] == 1.0 - (2 / 32 if not params else 0)
    assert got[0] < got[1]


def test_queue_scorer_adds_requests_routed_since_the_scrape() -> None:
    snap = snapshot(a=dict(waiting=1), b=dict(waiting=2))
    t = InFlightTracker()
    q = QueueScorer(scale=8)
    assert scores(q, snap, inflight=t) == [0.875, 0.75]
    for i in range(3):
        t.started(f"r{i}", "a", NOW + 0.1)
    assert scores(q, snap, inflight=t) == [0.5, 0.75]  # 4 vs 2


def test_load_scorer_parameters() -> None:
    q = registry.create("queue-scorer", "q", {"scale": 5})
    assert (q.normalization, q.scale) == ("scaled", 5.0)
    r = registry.create("running-requests-size-scorer", "r", {})
    assert (r.normalization, r.scale) == ("scaled", 256.0)
    for bad in ({"normalization": "zscore"}, {"scale": 0}, {"scale": "big"}, {"weight": 1}):
        with pytest.raises(ValueError):
            registry.create("queue-scorer", "q", bad)


def test_running_requests_scorer() -> None:
    snap = snapshot(a=dict(running=8), b=dict(running=0), c=dict(running=4))
    assert scores(RunningRequestsSizeScorer(), snap) == [0.96875, 1.0, 0.984375]
    upstream = registry.create("running-requests-size-scorer", "r", MINMAX)
    assert scores(upstream, snap) == [0.0, 1.0, 0.5]


def test_kv_cache_scorer_is_one_minus_usage_and_worst_when_unknown() -> None:
    snap = snapshot(a=dict(kv_usage=0.25), b=dict(kv_usage=1.0), c=dict(waiting=0), d=None)
    assert scores(KVCacheUtilizationScorer(), snap) == [0.75, 0.0, 0.0, 0.0]


def test_lora_affinity_scorer_levels() -> None:
    snap = snapshot(
        active=dict(active_adapters=frozenset({"sql"}), max_lora=2),
        room=dict(active_adapters=frozenset({"x"}), max_lora=2),
        waiting=dict(
            active_adapters=frozenset({"x"}), waiting_adapters=frozenset({"sql"}), max_lora=2
        ),
        full=dict(active_adapters=frozenset({"x", "y"}), max_lora=2),
        stale=dict(active_adapters=frozenset({"sql"}), max_lora=2, scraped_at=NOW - 10),
    )
    assert scores(LoraAffinityScorer(), snap, model="sql") == [1.0, 0.8, 0.6, 0.0, 0.0]


def test_per_model_values_of_a_long_lived_snapshot_stay_bounded() -> None:
    # The target model comes from the client. While the snapshot does not change (every
    # scrape failing, say), a flood of distinct model names must not grow memory.
    snap = snapshot(a=dict(active_adapters=frozenset({"sql"}), max_lora=2, kv_usage=0.5),
                    b=dict(max_lora=1, active_adapters=frozenset({"x"}), kv_usage=0.1))
    d = Derived(snap)
    scorer = LoraAffinityScorer()
    for k in range(3 * Derived.MAX_ENTRIES):
        st = CycleState(d, SchedulingRequest(f"r{k}", f"model-{k}"), NOW, None)
        assert scorer.score(st, d.all).tolist() == [0.8, 0.0]
    assert len(d._cache) <= Derived.MAX_ENTRIES
    # Past the bound, values are still computed correctly, just not kept.
    st = CycleState(d, SchedulingRequest("r", "sql"), NOW, None)
    assert scorer.score(st, d.all).tolist() == [1.0, 0.0]


def test_prefix_cache_scorer_learns_from_picks() -> None:
    snap = snapshot(a=dict(waiting=0), b=dict(waiting=0))
    scorer = PrefixCacheScorer()
    prompt = "system prompt " * 40  # 560 chars: 8 blocks of 64
    assert scores(scorer, snap, prompt=prompt) == [0.0, 0.0]
    st = state(snap, prompt=prompt)
    scorer.post_pick(st, 1)
    assert scores(scorer, snap, prompt=prompt) == [0.0, 1.0]
    # Same first half, different second half: half the blocks match.
    other = prompt[:256] + "x" * 256
    assert scores(scorer, snap, prompt=other) == [0.0, 0.5]
    assert scores(scorer, snap, prompt=prompt, model="another-model") == [0.0, 0.0]
    scorer.forget_endpoint("b")
    assert scores(scorer, snap, prompt=prompt) == [0.0, 0.0]


def test_prefix_cache_scorer_uses_the_endpoints_block_size() -> None:
    snap = snapshot(a=dict(block_size=32), b=dict(block_size=0))
    scorer = PrefixCacheScorer(hit_queue_worth=0)  # the match alone
    st = state(snap, prompt="p" * 512)
    chars, distinct = scorer._chars(st)
    assert chars.tolist() == [128, 64] and distinct == [64, 128]
    scorer.post_pick(st, 0)
    scorer.post_pick(st, 1)
    assert scores(scorer, snap, prompt="p" * 512) == [1.0, 1.0]
    assert scorer.index.blocks_of("a") == 4 and scorer.index.blocks_of("b") == 8
    fixed = PrefixCacheScorer.from_params("p", {"autoTune": False, "blockSizeTokens": 8})
    assert fixed._chars(st)[0].tolist() == [32, 32]


def test_prefix_cache_scorer_distrusts_stale_endpoints_only_when_others_are_fresh() -> None:
    prompt = "q" * 640
    fresh = snapshot(a=dict(waiting=0), b=dict(waiting=0))
    scorer = PrefixCacheScorer()
    scorer.post_pick(state(fresh, prompt=prompt), 0)
    mixed = snapshot(a=dict(waiting=0, scraped_at=NOW - 10), b=dict(waiting=0))
    assert scores(scorer, mixed, prompt=prompt) == [0.0, 0.0]
    all_stale = snapshot(a=dict(waiting=0, scraped_at=NOW - 10), b=None)
    assert scores(scorer, all_stale, prompt=prompt) == [1.0, 0.0]


def test_prefix_cache_scorer_parameters() -> None:
    p = registry.create("prefix-cache-scorer", "p", {"blockSize": 128, "maxPrefixBlocksToMatch": 4,
                                                    "lruCapacityPerServer": 10})
    assert (p.default_chars, p.max_blocks, p.lru_capacity) == (128, 4, 10)
    for bad in ({"blockSize": 0}, {"maxPrefixBlocksToMatch": "many"}, {"autoTune": "yes"},
                {"blockSize": 64, "blockSizeTokens": 16}, {"lruCapacity": 3}):
        with pytest.raises(ValueError):
            registry.create("prefix-cache-scorer", "p", bad)


# -- filters -------------------------------------------------------------------------


def test_least_queue_filter_keeps_the_lowest_band() -> None:
    snap = snapshot(a=dict(waiting=0), b=dict(waiting=1), c=dict(waiting=9), d=dict(waiting=3))
    # band: 0 + (9 - 0) // 4 = 2
    assert survivors(LeastQueueFilter(), snap) == ["a", "b"]
    stale = snapshot(a=dict(waiting=0, scraped_at=NOW - 10), b=dict(waiting=5))
    assert survivors(LeastQueueFilter(), stale) == ["b"]
    assert survivors(LeastQueueFilter(), snapshot(a=None, b=None)) == ["a", "b"]


def test_least_kv_cache_filter() -> None:
    snap = snapshot(a=dict(kv_usage=0.1), b=dict(kv_usage=0.2), c=dict(kv_usage=0.9))
    # band: 0.1 + 0.8 / 3 = 0.3667
    assert survivors(LeastKVCacheFilter(), snap) == ["a", "b"]


def test_low_queue_filter_threshold() -> None:
    snap = snapshot(a=dict(waiting=3), b=dict(waiting=4), c=None)
    f = registry.create("low-queue", "lq", {"threshold": 3})
    assert survivors(f, snap) == ["a"]
    assert survivors(LowQueueFilter(threshold=2), snap) == []
    with pytest.raises(ValueError):
        registry.create("low-queue", "lq", {"threshold": -1})


def test_lora_affinity_filter_prefers_active_then_room() -> None:
    snap = snapshot(
        active=dict(active_adapters=frozenset({"sql"}), max_lora=1),
        room=dict(max_lora=1),
        full=dict(active_adapters=frozenset({"x"}), max_lora=1),
    )
    assert survivors(LoraAffinityFilter(), snap, model="sql") == ["active"]
    assert survivors(LoraAffinityFilter(), snap, model="chat") == ["room"]
    nowhere = snapshot(full=dict(active_adapters=frozenset({"x"}), max_lora=1), none=dict())
    assert survivors(LoraAffinityFilter(), nowhere, model="sql") == ["full", "none"]


def test_prefix_cache_affinity_filter() -> None:
    snap = snapshot(a=dict(waiting=0), b=dict(waiting=0), c=dict(waiting=0))
    f = registry.create("prefix-cache-affinity-filter", "f", {"affinityThreshold": 0.5})
    prompt = "r" * 640
    assert survivors(f, snap, prompt=prompt) == ["a", "b", "c"]  # nothing known: keep all
    f.producer.post_pick(state(snap, prompt=prompt), 2)
    assert survivors(f, snap, prompt=prompt) == ["c"]
    assert survivors(f, snap, prompt=prompt[:320] + "z" * 320) == ["c"]  # 0.5 >= 0.5
    assert survivors(f, snap, prompt=prompt[:192] + "z" * 448) == ["a", "b", "c"]


# -- pickers -------------------------------------------------------------------------


def _pick(picker, totals: list[float]) -> list[int]:
    t = np.asarray(totals, dtype=np.float64)
    return picker.pick(None, np.arange(len(t)), t).tolist()


def test_max_score_picker_breaks_ties_at_random() -> None:
    p = MaxScorePicker("p", seed=1)
    assert _pick(p, [0.1, 0.9, 0.5]) == [1]
    seen = {_pick(p, [1.0, 0.2, 1.0, 1.0])[0] for _ in range(200)}
    assert seen == {0, 2, 3}
    ranked = MaxScorePicker("p", max_endpoints=3, seed=1)
    assert _pick(ranked, [0.1, 0.9, 0.5, 0.7]) == [1, 3, 2]


def test_random_picker_ignores_scores() -> None:
    p = RandomPicker("p", seed=2)
    assert {_pick(p, [0.0, 1.0, 0.0])[0] for _ in range(200)} == {0, 1, 2}
    assert sorted(_pick(RandomPicker("p", max_endpoints=5, seed=2), [1, 1, 1])) == [0, 1, 2]


def test_weighted_random_picker_follows_the_weights() -> None:
    p = WeightedRandomPicker("p", seed=3)
    counts = np.bincount([_pick(p, [0.0, 1.0, 3.0])[0] for _ in range(4000)], minlength=3)
    assert counts[0] == 0
    assert 0.2 < counts[1] / 4000 < 0.3  # expected 0.25
    assert {_pick(p, [0.0, 0.0])[0] for _ in range(100)} == {0, 1}  # all zero: uniform
    many = WeightedRandomPicker("p", max_endpoints=2, seed=3)
    assert sorted(_pick(many, [0.0, 1.0, 3.0])) == [1, 2]


def test_picker_parameters() -> None:
    assert registry.create("max-score-picker", "m", {"maxNumOfEndpoints": 2}).max_endpoints == 2
    for bad in ({"maxNumOfEndpoints": 0}, {"maxNumOfEndpoints": True}, {"other": 1}):
        with pytest.raises(ValueError):
            registry.create("max-score-picker", "m", bad)


def test_every_plugin_is_registered_under_its_upstream_name() -> None:
    for name in (
        "queue-scorer", "running-requests-size-scorer", "kv-cache-utilization-scorer",
        "lora-affinity-scorer", "prefix-cache-scorer", "least-queue", "least-kv-cache",
        "low-queue", "lora-affinity", "prefix-cache-affinity-filter", "prefix-cache-affinity",
        "max-score-picker", "random-picker", "weighted-random-picker", "single-profile-handler",
    ):
        assert name in registry.known_types()
        registry.create(name, name, {})


def test_a_third_party_scorer_is_clamped() -> None:
    class Wild:
        name = "wild"

        def score(self, state, candidates):
            return np.array([2.0, -1.0, math.nan])

    snap = snapshot(a=dict(waiting=0), b=dict(waiting=0), c=dict(waiting=0))
    prof = Profile("p", scorers=[(Wild(), 1.0)], picker=MaxScorePicker("max"))
    sched = Scheduler([prof])
    res = sched.schedule(SchedulingRequest("r", "m"), snap, explain=True, now=NOW)
    assert res.endpoint.name == "a"
    assert [c.total for c in res.explanation.profiles[0].scores] == [1.0, 0.0, 0.0]
