"""Prefill-aware cold placement: a prompt no pod holds goes to the pod with the least
prefill work sent and not yet done, not the one with the fewest requests waiting
(epp/scheduling/prefill.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from epp.datastore import Datastore, Endpoint, EndpointMetrics, Snapshot
from epp.kvevents.decode import BlockStored, EventBatch
from epp.scheduling import Scheduler, SchedulingRequest
from epp.scheduling.inflight import InFlightTracker
from epp.scheduling.pickers import MaxScorePicker
from epp.scheduling.precise_prefix import PrecisePrefixCacheScorer
from epp.scheduling.prefill import PendingPrefills
from epp.scheduling.profile import Profile
from epp.scheduling.scorers import KVCacheUtilizationScorer, QueueScorer
from epp.sim import tinytok
from tests.unit.test_precise_prefix import MODEL, NOW, engine_holds, live

SYSTEM = "You are the assistant of tenant {n}. Answer in one short paragraph, politely. " * 24


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinytok.write(tmp_path_factory.mktemp("tok"))


def held_by(keys: set[tuple[str, int]]):  # type: ignore[no-untyped-def]
    return lambda name, key: (name, key) in keys


def test_an_entry_ends_when_its_last_block_is_stored() -> None:
    pending = PendingPrefills(ttl=10.0)
    pending.record("a", 1500, last_key=11, now=0.0)
    pending.record("a", 60, last_key=22, now=0.0)
    pending.record("b", 900, last_key=33, now=0.0)
    assert (pending.tokens("a"), pending.count("a"), pending.tokens("b")) == (1560, 2, 900)
    pending.settle("a", held_by({("a", 22), ("b", 11)}))  # 11 is stored, but on b
    assert (pending.tokens("a"), pending.count("a")) == (1500, 1)
    pending.settle("a", held_by({("a", 11)}))
    assert (pending.tokens("a"), pending.count("a"), len(pending)) == (0, 0, 1)


def test_an_entry_no_event_confirms_ends_with_its_ttl() -> None:
    pending = PendingPrefills(ttl=10.0)
    pending.record("a", 1500, last_key=11, now=0.0)
    pending.record("a", 700, last_key=12, now=5.0)
    pending.expire(9.9)
    assert pending.tokens("a") == 2200
    pending.expire(10.0)
    assert pending.tokens("a") == 700
    pending.expire(15.0)
    assert pending.tokens("a") == 0 and len(pending) == 0


def test_an_endpoint_that_leaves_takes_its_entries() -> None:
    pending = PendingPrefills(ttl=10.0)
    pending.record("a", 1500, last_key=11, now=0.0)
    pending.record("b", 100, last_key=12, now=0.0)
    pending.forget("a")
    assert (pending.tokens("a"), pending.tokens("b")) == (0, 100)
    pending.expire(20.0)  # its queued expiry finds nothing to end
    assert len(pending) == 0


def test_sums_per_endpoint_of_a_snapshot() -> None:
    pending = PendingPrefills(ttl=10.0)
    for i in range(40):  # more endpoints than the first arrays hold
        pending.record(f"pod-{i}", 100 + i, last_key=i, now=0.0)
    pending.forget("pod-3")
    pending.record("pod-new", 7, last_key=99, now=0.0)  # takes pod-3's slot
    snap = pool({"pod-new": 0, "pod-3": 0, "pod-39": 0, "never-picked": 0})
    tokens, counts = pending.per_endpoint(snap)
    assert tokens.tolist() == [7, 0, 139, 0] and counts.tolist() == [1, 0, 1, 0]
    pending.settle("pod-39", held_by({("pod-39", 39)}))
    assert pending.per_endpoint(snap)[0].tolist() == [7, 0, 0, 0]


def test_nothing_is_kept_when_turned_off() -> None:
    pending = PendingPrefills(ttl=0.0)
    pending.record("a", 1500, last_key=11, now=0.0)
    assert pending.tokens("a") == 0 and len(pending) == 0


# -- in the scorer ------------------------------------------------------------------------


def pool(waiting: dict[str, int]) -> Snapshot:
    ds = Datastore(staleness_threshold=1e9)
    ds.set_endpoints([Endpoint(n, f"10.0.0.{i + 1}", 8000) for i, n in enumerate(waiting)])
    for n, w in waiting.items():
        ds.update_metrics(n, EndpointMetrics(waiting=w, running=0, kv_usage=0.2,
                                             scraped_at=NOW, models=frozenset({MODEL})))
    return ds.snapshot()


def completion(tenant: int, question: str) -> SchedulingRequest:
    prompt = SYSTEM.format(n=tenant) + question
    return SchedulingRequest(f"r-{tenant}-{question}", MODEL, prompt, api="completions",
                             body={"model": MODEL, "prompt": prompt})


class Epp:
    """One EPP replica: the default profile's weights with the precise scorer, and the
    in-flight tracker the director feeds."""

    def __init__(self, tokdir: Path, **params: float) -> None:
        self.scorer = PrecisePrefixCacheScorer(block_size=16, tokenizers={MODEL: str(tokdir)},
                                               **params)  # type: ignore[arg-type]
        live(self.scorer, "a", "b", "c")
        profile = Profile("default", scorers=[
            (QueueScorer("queue-scorer"), 2.0),
            (KVCacheUtilizationScorer("kv-cache-utilization-scorer"), 2.0),
            (self.scorer, 3.0)], picker=MaxScorePicker("max-score-picker"))
        self.inflight = InFlightTracker()
        self.sched = Scheduler([profile], inflight=self.inflight)

    def send(self, req: SchedulingRequest, snap: Snapshot, to: str | None = None) -> str:
        cand = None if to is None else [snap.by_name[to]]
        name = self.sched.schedule(req, snap, cand, now=NOW + 0.01).endpoint.name
        self.inflight.started(req.request_id, name, NOW + 0.01)
        return name


def test_a_new_prompt_goes_where_less_prefill_waits_not_fewer_requests(tokdir: Path) -> None:
    snap = pool({"a": 0, "b": 0, "c": 2})  # c: 2 requests this EPP did not send
    ids = Epp(tokdir).scorer.tokens(completion(3, "Q?"))

    def traffic(epp: Epp) -> None:
        # a is prefilling three prompts it did not hold; b holds tenant 3's system
        # prompt, and prefills only the questions of the three requests it got.
        for tenant in (1, 2, 3):
            epp.send(completion(tenant, "Who?"), snap, to="a")
        engine_holds(epp.scorer, "b", ids, len(ids) // 16 - 1)
        for q in ("Why?", "How?", "When?"):
            epp.send(completion(3, q), snap, to="b")

    epp = Epp(tokdir, tokens_per_request=len(ids) / 4)  # a cold prompt: 4 requests' worth
    traffic(epp)
    loads = {n: epp.scorer.pending.tokens(n) / epp.scorer.tokens_per_request for n in "abc"}
    assert loads["a"] > 11 and loads["b"] < 1.5 and loads["c"] == 0
    # Queued requests say c (2 waiting, against 3 and 3); queued prefill says b.
    assert epp.send(completion(9, "Hi"), snap) == "b"
    counting = Epp(tokdir, tokens_per_request=0)  # load in requests, as before
    traffic(counting)
    assert counting.send(completion(9, "Hi"), snap) == "c"


def test_a_prefill_stops_counting_when_the_engine_reports_it_stored(tokdir: Path) -> None:
    snap = pool({"a": 0, "b": 0, "c": 0})
    epp = Epp(tokdir)
    req = completion(5, "Who?")
    assert epp.send(req, snap, to="a") == "a"
    ids = epp.scorer.tokens(req)
    assert epp.scorer.pending.tokens("a") == len(ids)
    n = len(ids) // 16
    stored = BlockStored([9000 + i for i in range(n)], None, ids[: n * 16], 16, None, "GPU")
    stream = epp.scorer.subscriber.streams["a"]
    stream._apply(EventBatch(0, NOW + 0.5, [stored]))  # as the intake applies a batch
    assert epp.scorer.pending.tokens("a") == 0


def test_the_parameter(tokdir: Path) -> None:
    scorer = PrecisePrefixCacheScorer.from_params(
        "p", {"blockSize": 16, "tokenizers": {MODEL: str(tokdir)}, "prefillTokensPerRequest": 400})
    assert scorer.tokens_per_request == 400 and scorer.pending.ttl == scorer.speculative_ttl
    off = PrecisePrefixCacheScorer.from_params(
        "p", {"blockSize": 16, "tokenizers": {MODEL: str(tokdir)}, "prefillTokensPerRequest": 0})
    assert off.pending.ttl == 0
    with pytest.raises(ValueError, match="prefillTokensPerRequest"):
        PrecisePrefixCacheScorer.from_params("p", {"prefillTokensPerRequest": -1})
