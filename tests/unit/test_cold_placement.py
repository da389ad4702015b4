"""Cold placement: a prompt no pod holds goes to the least loaded pod, and EPP replicas that
never talk to each other send the same new prompt to the same pod (epp/scheduling/coldplace.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from epp.datastore import Datastore, Endpoint, EndpointMetrics, Snapshot
from epp.scheduling import Scheduler, SchedulingRequest
from epp.scheduling.pickers import MaxScorePicker
from epp.scheduling.precise_prefix import PrecisePrefixCacheScorer
from epp.scheduling.profile import Profile
from epp.scheduling.scorers import KVCacheUtilizationScorer, QueueScorer
from epp.sim import tinytok
from tests.unit.test_precise_prefix import MODEL, NOW, engine_holds, live

SYSTEM = "You are the assistant of tenant {n}. Answer in one short paragraph, politely. " * 6


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinytok.write(tmp_path_factory.mktemp("tok"))


def pool(load: dict[str, tuple[int, float]]) -> Snapshot:
    """Endpoints with (waiting requests, KV usage)."""
    ds = Datastore(staleness_threshold=1e9)
    ds.set_endpoints([Endpoint(n, f"10.0.0.{i + 1}", 8000) for i, n in enumerate(load)])
    for n, (waiting, kv) in load.items():
        ds.update_metrics(n, EndpointMetrics(waiting=waiting, running=0, kv_usage=kv,
                                             scraped_at=NOW, models=frozenset({MODEL})))
    return ds.snapshot()


def epp_replica(tokdir: Path, **params: float) -> tuple[Scheduler, PrecisePrefixCacheScorer]:
    """The default profile's weights with the precise scorer: queue 2, KV 2, prefix 3."""
    scorer = PrecisePrefixCacheScorer(block_size=16, tokenizers={MODEL: str(tokdir)}, **params)  # type: ignore[arg-type]
    live(scorer, "a", "b", "c", "d")
    profile = Profile("default", scorers=[(QueueScorer("queue-scorer"), 2.0),
                                          (KVCacheUtilizationScorer("kv-cache-utilization-scorer"), 2.0),
                                          (scorer, 3.0)],
                      picker=MaxScorePicker("max-score-picker"))
    return Scheduler([profile]), scorer


def completion(tenant: int, question: str = "What is a pod?") -> SchedulingRequest:
    prompt = SYSTEM.format(n=tenant) + question
    return SchedulingRequest("r", MODEL, prompt, api="completions",
                             body={"model": MODEL, "prompt": prompt})


def test_a_new_prompt_goes_to_the_shortest_queue_not_the_emptiest_cache(tokdir: Path) -> None:
    # b queues 2 requests but has the most free KV cache; a full prefill is best started
    # where it waits least.
    snap = pool({"a": (0, 0.5), "b": (2, 0.0), "c": (1, 0.5), "d": (1, 0.5)})
    sched, _ = epp_replica(tokdir)
    assert sched.schedule(completion(1), snap, now=NOW).endpoint.name == "a"
    off, _ = epp_replica(tokdir, cold_score=0.0)
    assert off.schedule(completion(1), snap, now=NOW).endpoint.name == "b"


def test_two_replicas_send_a_new_prompt_to_the_same_pod(tokdir: Path) -> None:
    snap = pool({n: (0, 0.2) for n in "abcd"})
    first, _ = epp_replica(tokdir)
    second, _ = epp_replica(tokdir)  # shares nothing with the first
    picks = {}
    for tenant in range(40):
        a = first.schedule(completion(tenant, "Who are you?"), snap, now=NOW).endpoint.name
        b = second.schedule(completion(tenant, "What can you do?"), snap, now=NOW).endpoint.name
        assert a == b, tenant
        picks[tenant] = a
    assert set(picks.values()) == set("abcd")  # and different prompts spread over the pool


def test_a_prompt_a_pod_holds_is_left_to_prefix_affinity(tokdir: Path) -> None:
    snap = pool({"a": (0, 0.2), "b": (1, 0.2), "c": (1, 0.2), "d": (1, 0.2)})
    sched, scorer = epp_replica(tokdir)
    req = completion(7)
    ids = scorer.tokens(req)
    engine_holds(scorer, "c", ids, len(ids) // 16)
    res = sched.schedule(req, snap, explain=True, now=NOW)
    assert res.endpoint.name == "c"
    raw = {c.endpoint: c.raw[scorer.name] for c in res.explanation.profiles[0].scores}
    assert raw["a"] == 0.0  # no cold bonus for the least loaded pod


def test_a_prompt_held_in_small_part_is_still_cold(tokdir: Path) -> None:
    snap = pool({"a": (0, 0.2), "b": (1, 0.2), "c": (1, 0.2), "d": (1, 0.2)})
    sched, scorer = epp_replica(tokdir)
    req = completion(8)
    ids = scorer.tokens(req)
    engine_holds(scorer, "c", ids, 2)  # a shared preamble, far under coldPromptThreshold
    res = sched.schedule(req, snap, explain=True, now=NOW)
    raw = {c.endpoint: c.raw[scorer.name] for c in res.explanation.profiles[0].scores}
    assert raw["a"] == pytest.approx(0.3) and 0 < raw["c"] < 0.3
    assert res.endpoint.name == "a"


def test_unknown_loads_name_no_pod(tokdir: Path) -> None:
    ds = Datastore(staleness_threshold=1e9)
    ds.set_endpoints([Endpoint(n, f"10.0.0.{i + 1}", 8000) for i, n in enumerate("abcd")])
    sched, scorer = epp_replica(tokdir)  # never scraped: nothing to say which is least loaded
    res = sched.schedule(completion(3), ds.snapshot(), explain=True, now=NOW)
    assert all(c.raw[scorer.name] == 0.0 for c in res.explanation.profiles[0].scores)


def test_parameters_from_the_config(tokdir: Path) -> None:
    scorer = PrecisePrefixCacheScorer.from_params(
        "p", {"blockSize": 16, "tokenizers": {MODEL: str(tokdir)},
              "coldPromptScore": 0.5, "coldPromptThreshold": 0.25})
    assert (scorer.cold_score, scorer.cold_threshold) == (0.5, 0.25)
    with pytest.raises(ValueError, match="coldPromptScore"):
        PrecisePrefixCacheScorer.from_params("p", {"coldPromptScore": 2})


def test_a_new_prompt_for_an_adapter_stays_where_the_adapter_is_loaded(tokdir: Path) -> None:
    ds = Datastore(staleness_threshold=1e9)
    ds.set_endpoints([Endpoint(n, f"10.0.0.{i + 1}", 8000) for i, n in enumerate("abcd")])
    for n, waiting, adapters in (("a", 0, frozenset()), ("b", 0, frozenset()),
                                 ("c", 2, frozenset({"tenant-lora"})), ("d", 3, frozenset())):
        ds.update_metrics(n, EndpointMetrics(waiting=waiting, running=0, kv_usage=0.2,
                                             scraped_at=NOW, models=frozenset({MODEL}),
                                             active_adapters=adapters, max_lora=4))
    _, scorer = epp_replica(tokdir)
    req = completion(9)
    req.target_model = "tenant-lora"
    sched = Scheduler([Profile("default", scorers=[(scorer, 1.0)],
                               picker=MaxScorePicker("max-score-picker"))])
    res = sched.schedule(req, ds.snapshot(), explain=True, now=NOW)
    raw = {c.endpoint: c.raw[scorer.name] for c in res.explanation.profiles[0].scores}
    # c serves the adapter: the least loaded of the pods that do, though a and b are idle.
    assert raw == {"a": 0.0, "b": 0.0, "c": pytest.approx(0.3), "d": 0.0}
