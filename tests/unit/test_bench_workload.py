"""The routing benchmark's workload generator: Poisson arrivals, Zipf adapters, seeds."""

from __future__ import annotations

import random
import statistics
from collections import Counter

import pytest

from benchmarks.routing.workload import (
    CHARS_PER_TOKEN,
    LoraShape,
    SharedPrefixShape,
    lora_schedule,
    poisson_arrivals,
    random_text,
    shared_prefix_schedule,
)


def test_poisson_arrivals_have_the_asked_rate_and_exponential_gaps() -> None:
    times = poisson_arrivals(20.0, 20_000, random.Random(7))
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    assert all(g > 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(1 / 20, rel=0.03)
    # Exponential: the standard deviation equals the mean (a fixed-rate clock would give 0).
    assert statistics.stdev(gaps) == pytest.approx(1 / 20, rel=0.05)
    # Poisson counts: per 1 s window, variance ~ mean ~ 20.
    windows = Counter(int(t) for t in times)
    counts = [windows.get(i, 0) for i in range(int(times[-1]))]
    assert statistics.mean(counts) == pytest.approx(20, rel=0.03)
    assert statistics.variance(counts) == pytest.approx(20, rel=0.2)


def test_poisson_arrivals_reject_bad_rates() -> None:
    with pytest.raises(ValueError, match="qps"):
        poisson_arrivals(0, 10, random.Random(0))
    with pytest.raises(ValueError, match="count"):
        poisson_arrivals(1, -1, random.Random(0))


def test_schedule_arrivals_follow_qps() -> None:
    sched = shared_prefix_schedule(SharedPrefixShape(system_prompt_len=16, question_len=4),
                                   qps=50, count=5000, seed=3)
    assert [r.at for r in sched] == sorted(r.at for r in sched)
    assert len(sched) / sched[-1].at == pytest.approx(50, rel=0.05)


def test_zipf_popularity_ranks_adapters() -> None:
    shape = LoraShape(num_adapters=5, zipf_s=1.0)
    p = shape.popularity()
    assert sum(p) == pytest.approx(1.0)
    assert p == pytest.approx([(1 / k) / sum(1 / j for j in range(1, 6)) for k in range(1, 6)])
    sched = lora_schedule(shape, qps=10, count=20_000, seed=5)
    seen = Counter(r.model for r in sched)
    for name, want in zip(shape.adapters, p):
        assert seen[name] / len(sched) == pytest.approx(want, abs=0.01)
    assert next(r.group for r in sched if r.model == "adapter-0") == 0


def test_zipf_exponent_zero_is_uniform() -> None:
    assert LoraShape(num_adapters=4, zipf_s=0).popularity() == [0.25] * 4


def test_shared_prefix_groups_share_their_system_prompt_exactly() -> None:
    shape = SharedPrefixShape(num_groups=3, prompts_per_group=4, system_prompt_len=64,
                              question_len=8, output_len=5)
    sched = shared_prefix_schedule(shape, qps=5, count=300, seed=1)
    sys_chars = 64 * CHARS_PER_TOKEN
    by_group: dict[int, set[str]] = {}
    questions: dict[int, set[str]] = {}
    for r in sched:
        assert len(r.prompt) == (64 + 8) * CHARS_PER_TOKEN  # lengths are in ~4-char tokens
        by_group.setdefault(r.group, set()).add(r.prompt[:sys_chars])
        questions.setdefault(r.group, set()).add(r.prompt[sys_chars:])
        assert r.max_tokens == 5
    assert sorted(by_group) == [0, 1, 2]
    assert all(len(s) == 1 for s in by_group.values())  # one system prompt per group
    assert len({next(iter(s)) for s in by_group.values()}) == 3  # and they differ
    assert all(len(q) == 4 for q in questions.values())  # prompts_per_group questions


def test_same_seed_same_schedule_other_seed_other_schedule() -> None:
    shape = SharedPrefixShape(num_groups=4, system_prompt_len=32, question_len=8)
    a = shared_prefix_schedule(shape, 10, 50, seed=9)
    b = shared_prefix_schedule(shape, 10, 50, seed=9)
    c = shared_prefix_schedule(shape, 10, 50, seed=10)
    assert a == b
    assert [r.at for r in a] != [r.at for r in c]
    la = lora_schedule(LoraShape(), 10, 50, seed=2)
    assert la == lora_schedule(LoraShape(), 10, 50, seed=2)
    assert [r.model for r in la] != [r.model for r in lora_schedule(LoraShape(), 10, 50, seed=3)]


def test_lora_prompts_are_unique_so_only_the_adapter_matters() -> None:
    sched = lora_schedule(LoraShape(prompt_len=16), 10, 200, seed=0)
    assert len({r.prompt[:16 * CHARS_PER_TOKEN // 2] for r in sched}) == 200


def test_request_body_is_a_streaming_completion_with_usage() -> None:
    r = shared_prefix_schedule(SharedPrefixShape(system_prompt_len=8, question_len=2,
                                                 output_len=7), 1, 1)[0]
    body = r.body()
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 7 and body["prompt"] == r.prompt
    assert "stream" not in r.body(stream=False)


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_groups"):
        shared_prefix_schedule(SharedPrefixShape(num_groups=0), 1, 1)
    with pytest.raises(ValueError, match="zipf_s"):
        lora_schedule(LoraShape(zipf_s=-1), 1, 1)
    with pytest.raises(ValueError, match="num_adapters"):
        lora_schedule(LoraShape(num_adapters=0), 1, 1)


def test_random_text_is_exactly_sized() -> None:
    rng = random.Random(0)
    for n in (1, 7, 100):
        assert len(random_text(n, rng, head="[x]")) == n * CHARS_PER_TOKEN
    assert random_text(3, rng, head="[head]").startswith("[head]")


def test_stale_prefix_schedule_is_skewed_over_many_groups() -> None:
    from benchmarks.routing.workload import StalePrefixShape, stale_prefix_schedule

    shape = StalePrefixShape(num_groups=150, system_prompt_len=50, question_len=5)
    sched = stale_prefix_schedule(shape, qps=10, count=2000, seed=3)
    counts = Counter(r.group for r in sched)
    assert counts[0] > 5 * counts.get(20, 0) > 0  # Zipf: the head is hot...
    assert len(counts) > 100                       # ...and the tail long
    assert stale_prefix_schedule(shape, 10, 2000, seed=3) == sched  # deterministic
    same_group = [r.prompt for r in sched if r.group == 0]
    assert all(p.startswith(same_group[0][:200]) for p in same_group)


def test_skewed_prefix_shape_has_zipf_groups_and_keeps_the_uniform_schedule() -> None:
    from benchmarks.routing.workload import SKEWED_PREFIX

    share = SKEWED_PREFIX.popularity()
    assert share[0] > 0.6 and share == sorted(share, reverse=True)
    sched = shared_prefix_schedule(SKEWED_PREFIX, 50, 4000, seed=3)
    counts = Counter(r.group for r in sched)
    assert counts[0] / len(sched) == pytest.approx(share[0], abs=0.03)
    # zipf_s = 0 (the default) draws exactly what the shape always drew: old seeds hold.
    a = shared_prefix_schedule(SharedPrefixShape(), 10, 50, seed=1)
    b = shared_prefix_schedule(SharedPrefixShape(zipf_s=0.0), 10, 50, seed=1)
    assert a == b
    with pytest.raises(ValueError, match="zipf_s"):
        shared_prefix_schedule(SharedPrefixShape(zipf_s=-1), 10, 5)
