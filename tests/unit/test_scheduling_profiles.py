"""The default profile end to end on known metric tables, through `Scheduler.schedule`."""

from __future__ import annotations

import time

import numpy as np
import pytest

from epp.config import load_config
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.director import Director
from epp.errors import EppError, ErrorCode
from epp.observability import PLUGIN_DURATION, REGISTRY, SCHEDULER_E2E_DURATION
from epp.request import InferenceRequest, parse_body
from epp.scheduling import InFlightTracker, Scheduler, SchedulingRequest

NOW = 500.0


def pool(rows: dict[str, dict | None]) -> Datastore:
    ds = Datastore(staleness_threshold=2.0)
    ds.set_endpoints([Endpoint(n, f"10.1.0.{i + 1}", 8000) for i, n in enumerate(rows)])
    for n, m in rows.items():
        if m is not None:
            ds.update_metrics(n, EndpointMetrics(**{"scraped_at": NOW - 0.5, **m}))
    return ds


def default_scheduler(track_inflight: bool = True, config: str | None = None) -> Scheduler:
    """The scheduler as the EPP builds it; with `track_inflight`, `pick` records each
    pick in flight as the director does."""
    return Scheduler.from_config(load_config(config),
                                 inflight=InFlightTracker() if track_inflight else None)


def pick(s: Scheduler, ds: Datastore, prompt: str = "hi", model: str = "m", rid: str = "r",
         **kw) -> str:
    name = s.schedule(SchedulingRequest(rid, model, prompt), ds.snapshot(), now=NOW, **kw).endpoint.name
    if s.inflight is not None:
        s.inflight.started(rid, name, NOW)  # what the director does after each pick
    return name


def test_lower_queue_and_kv_usage_wins() -> None:
    ds = pool({
        "busy": dict(waiting=8, kv_usage=0.9),
        "idle": dict(waiting=1, kv_usage=0.2),
        "mid": dict(waiting=4, kv_usage=0.5),
    })
    s = default_scheduler()
    for i in range(20):
        assert pick(s, ds, rid=f"r{i}") == "idle"
        s.inflight.finished(f"r{i}")  # the response ended
    # Requests still open count as queued: enough of them move the next pick elsewhere,
    # a few do not (each is 1/32 of the queue weight against a 0.3 KV difference).
    picks = [pick(s, ds, rid=f"open{i}") for i in range(30)]
    assert picks[:10] == ["idle"] * 10 and "mid" in picks


def test_active_adapter_wins_over_lower_kv_usage() -> None:
    ds = pool({
        "free": dict(waiting=0, kv_usage=0.1, max_lora=1, active_adapters=frozenset({"other"})),
        "has-adapter": dict(waiting=0, kv_usage=0.4, max_lora=1,
                            active_adapters=frozenset({"sql-lora"})),
    })
    s = default_scheduler(track_inflight=False)
    assert pick(s, ds, model="sql-lora") == "has-adapter"
    assert pick(s, ds, model="base") == "free"


def test_repeated_long_prompt_returns_to_the_endpoint_that_served_its_prefix() -> None:
    ds = pool({f"pod-{i}": dict(waiting=0, kv_usage=0.3) for i in range(8)})
    s = default_scheduler(track_inflight=False)
    conversation = "You are a careful assistant. " * 150  # ~4.3 KB
    first = pick(s, ds, prompt=conversation)
    # The load moves a little; the prefix match outweighs it.
    ds.update_metrics(first, EndpointMetrics(waiting=2, kv_usage=0.4, scraped_at=NOW))
    for turn in range(5):
        conversation += f" user turn {turn}: tell me more."
        assert pick(s, ds, prompt=conversation, rid=f"t{turn}") == first
    # An unrelated prompt is not drawn there.
    others = {pick(s, ds, prompt=f"{i} unrelated " * 100, rid=f"u{i}") for i in range(10)}
    assert first not in others


def test_endpoint_without_metrics_is_not_chosen_while_fresh_ones_exist() -> None:
    ds = pool({"new": None, "stale": dict(waiting=0, kv_usage=0.0, scraped_at=NOW - 60),
               "loaded": dict(waiting=50, kv_usage=0.95)})
    s = default_scheduler(track_inflight=False)
    assert {pick(s, ds, rid=f"r{i}") for i in range(30)} == {"loaded"}
    # With nothing fresh, something is still chosen.
    dead = pool({"new": None, "stale": dict(waiting=0, scraped_at=NOW - 60)})
    assert pick(s, dead) in {"new", "stale"}


SEEDED = """
plugins:
- {type: queue-scorer}
- {type: kv-cache-utilization-scorer}
- {type: prefix-cache-scorer}
- {type: max-score-picker, parameters: {seed: 7}}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: max-score-picker}
"""


def test_burst_between_scrapes_spreads_thanks_to_inflight_accounting() -> None:
    ds = pool({f"pod-{i}": dict(waiting=0, kv_usage=0.5) for i in range(4)})
    most = {}
    for track in (True, False):
        s = default_scheduler(track_inflight=track, config=SEEDED)
        names = [pick(s, ds, prompt=f"short {i}", rid=f"b{i}") for i in range(8)]
        most[track] = max(names.count(n) for n in set(names))
    assert most[True] == 2  # 8 requests over 4 idle pods: two each
    assert most[False] > 2  # without it every pick is a blind tie-break


def test_a_burst_sharing_a_long_prefix_stays_together() -> None:
    # Prefix affinity outweighs a few queued requests by design; past about
    # `cacheHitQueueWorth` (8) of them the group spills (test_scheduling_scores.py).
    ds = pool({f"pod-{i}": dict(waiting=0, kv_usage=0.5) for i in range(4)})
    s = default_scheduler()
    names = {pick(s, ds, prompt="shared system prompt " * 50, rid=f"b{i}") for i in range(6)}
    assert len(names) == 1


def test_finished_requests_stop_counting() -> None:
    ds = pool({"a": dict(waiting=0, kv_usage=0.5), "b": dict(waiting=0, kv_usage=0.5)})
    s = default_scheduler()
    first = pick(s, ds, rid="x")
    s.inflight.finished("x")
    # Idle again: a tie, so both endpoints appear over a few tries.
    seen = set()
    for i in range(30):
        seen.add(pick(s, ds, rid=f"y{i}"))
        s.inflight.finished(f"y{i}")
    assert first in seen and len(seen) == 2


def test_subset_candidates_are_respected() -> None:
    ds = pool({"a": dict(waiting=0), "b": dict(waiting=9), "c": dict(waiting=5)})
    s = default_scheduler()
    snap = ds.snapshot()
    res = s.schedule(SchedulingRequest("r", "m"), snap, np.array([1, 2]), now=NOW)
    assert res.endpoint.name == "c" and res.index == 2
    with pytest.raises(EppError) as e:
        s.schedule(SchedulingRequest("r", "m"), snap, np.array([], dtype=np.int64), now=NOW)
    assert e.value.code is ErrorCode.ServiceUnavailable
    with pytest.raises(EppError):
        s.schedule(SchedulingRequest("r", "m"), pool({}).snapshot(), now=NOW)


def test_filters_that_leave_nothing_end_in_503_naming_the_filter() -> None:
    cfg = load_config("""
plugins:
- {type: low-queue, name: short-queues, parameters: {threshold: 2}}
- {type: queue-scorer}
schedulingProfiles:
- name: strict
  plugins: [{pluginRef: short-queues}, {pluginRef: queue-scorer}]
""")
    s = Scheduler.from_config(cfg)
    ds = pool({"a": dict(waiting=5), "b": dict(waiting=3)})
    with pytest.raises(EppError) as e:
        pick(s, ds)
    assert e.value.code is ErrorCode.ServiceUnavailable
    assert "short-queues" in e.value.message


def test_explanation_lists_filters_scores_and_the_pick() -> None:
    cfg = load_config("""
plugins:
- {type: least-queue}
- {type: queue-scorer, parameters: {normalization: minmax}}
- {type: kv-cache-utilization-scorer}
- {type: max-score-picker, parameters: {maxNumOfEndpoints: 2}}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: least-queue}
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 1}
  - {pluginRef: max-score-picker}
""")
    s = Scheduler.from_config(cfg)
    ds = pool({"a": dict(waiting=0, kv_usage=0.5), "b": dict(waiting=1, kv_usage=0.1),
               "c": dict(waiting=9, kv_usage=0.0)})
    res = s.schedule(SchedulingRequest("r", "m"), ds.snapshot(), explain=True, now=NOW)
    e = res.explanation
    assert e.picked == res.endpoint.name == "a" and e.primary_profile == "default"
    assert [x.name for x in res.fallbacks] == ["b"]  # maxNumOfEndpoints: 2
    (p,) = e.profiles
    assert p.candidates == ("a", "b", "c")
    assert [(f.name, f.survivors) for f in p.filters] == [("least-queue", ("a", "b"))]
    assert [(x.name, x.weight) for x in p.scorers] == [
        ("queue-scorer", 2.0), ("kv-cache-utilization-scorer", 1.0)]
    by = {c.endpoint: c for c in p.scores}
    assert set(by) == {"a", "b"} and by["a"].address == "10.1.0.1:8000"
    assert by["a"].raw == {"queue-scorer": 1.0, "kv-cache-utilization-scorer": 0.5}
    assert by["a"].weighted == {"queue-scorer": 2.0, "kv-cache-utilization-scorer": 0.5}
    assert by["b"].raw == {"queue-scorer": 0.0, "kv-cache-utilization-scorer": 0.9}
    assert by["a"].total == 2.5 and by["b"].total == pytest.approx(0.9)
    assert p.picked == "a" and p.picker == "max-score-picker" and p.error is None


def test_the_prompt_is_derived_only_when_a_plugin_asks() -> None:
    calls = []

    def prompt() -> str:
        calls.append(1)
        return "hello"

    ds = pool({"a": dict(waiting=0), "b": dict(waiting=1)})
    queue_only = default_scheduler(config="""
plugins: [{type: queue-scorer}]
schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer}]}]
""")
    queue_only.schedule(SchedulingRequest("r", "m", prompt_source=prompt), ds.snapshot(), now=NOW)
    assert calls == []
    default_scheduler().schedule(SchedulingRequest("r", "m", prompt_source=prompt), ds.snapshot(),
                                 now=NOW)
    assert calls == [1]


def test_endpoints_leaving_the_pool_are_forgotten() -> None:
    ds = pool({"a": dict(waiting=0), "b": dict(waiting=0)})
    s = default_scheduler()
    s.attach(ds)
    s.inflight.attach(ds)
    chosen = pick(s, ds, prompt="z" * 1000, rid="k")
    prefix_scorer = load_prefix_scorer(s)
    assert prefix_scorer.index.blocks_of(chosen) == 15
    assert s.inflight.endpoint_of("k") == chosen
    ds.remove_endpoint(chosen)
    assert prefix_scorer.index.blocks_of(chosen) == 0
    assert s.inflight.endpoint_of("k") is None
    # A relabel (same address) keeps what was learned.
    other = ds.endpoints()[0]
    pick(s, ds, prompt="y" * 1000, rid="k2")
    ds.upsert_endpoint(Endpoint(other.name, other.address, other.port, {"new": "label"}))
    assert prefix_scorer.index.blocks_of(other.name) == 15


def load_prefix_scorer(s: Scheduler):
    (prof,) = s.profiles.values()
    return next(sc for sc, _ in prof.scorers if sc.name == "prefix-cache-scorer")


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_cycles_and_plugins_are_timed() -> None:
    ds = pool({"a": dict(waiting=0)})
    labels = {"extension_point": "Scorer", "plugin_type": "queue-scorer",
              "plugin_name": "queue-scorer"}
    before_e2e = _sample("inference_extension_scheduler_e2e_duration_seconds_count", {})
    before = _sample("inference_extension_plugin_duration_seconds_count", labels)
    s = default_scheduler()
    for i in range(3):
        pick(s, ds, rid=f"m{i}")
    assert _sample("inference_extension_scheduler_e2e_duration_seconds_count", {}) == before_e2e + 3
    assert _sample("inference_extension_plugin_duration_seconds_count", labels) == before + 3
    assert PLUGIN_DURATION is not None and SCHEDULER_E2E_DURATION is not None


def test_prefix_affinity_filter_without_a_scorer_learns_on_its_own() -> None:
    cfg = load_config("""
plugins:
- {type: prefix-cache-affinity-filter, parameters: {affinityThreshold: 0.5}}
- {type: kv-cache-utilization-scorer}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: prefix-cache-affinity-filter}, {pluginRef: kv-cache-utilization-scorer}]
""")
    s = Scheduler.from_config(cfg)
    ds = pool({"a": dict(kv_usage=0.2), "b": dict(kv_usage=0.1)})
    assert pick(s, ds, prompt="k" * 1024) == "b"
    ds.update_metrics("b", EndpointMetrics(kv_usage=0.6, scraped_at=NOW - 0.5))
    assert pick(s, ds, prompt="k" * 1024) == "b"  # affinity beats the better KV usage
    assert pick(s, ds, prompt="j" * 1024) == "a"  # no affinity: KV usage decides


async def test_wired_into_the_director() -> None:
    # As the EPP wires it: the director records started/finished, the scheduler reads.
    t = time.monotonic()  # the director schedules at the real time
    ds = pool({"a": dict(waiting=3, kv_usage=0.5, scraped_at=t),
               "b": dict(waiting=0, kv_usage=0.1, scraped_at=t)})
    s = default_scheduler()
    s.attach(ds)
    director = Director(ds, s, inflight=s.inflight)
    body = b'{"model": "m", "prompt": "hello"}'
    req = InferenceRequest("d1", "/v1/completions", body=body,
                           parsed=parse_body("/v1/completions", body))
    decision = await director.route(req, explain=True)
    assert decision.endpoint.name == "b"
    assert decision.explanation.picked == "b"
    assert s.inflight.endpoint_of(decision.inflight_key) == "b"
    director.finished(decision, None)
    assert s.inflight.endpoint_of(decision.inflight_key) is None
