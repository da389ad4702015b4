"""How the default profile's scores hold under load (issue 13), as tables of cases.

Every case is a pool whose scraped metrics stay fixed (all requests arrive within one
scrape interval) and a number of requests sent one after another; each pick is counted
as in flight on its pod, as the director does. The properties:

- a few requests keep going to the pod with clearly better KV headroom, the active
  adapter, or the longer cached prefix (a one-request difference does not flip it);
- a burst larger than the pods' headroom difference still spreads, the better pod
  taking the larger share;
- a hot prompt group spills to more pods once its pod's queue makes the cache hit worth
  less than the queueing, and stops spilling when the queue drains; a cold group stays.

The upstream formula (`normalization: minmax`) is run on the same tables to show what
changed: there a difference of one in-flight request is worth the queue scorer's whole
weight.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from epp.config import load_config
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.scheduling import Scheduler, SchedulingRequest
from epp.scheduling.inflight import InFlightTracker
from epp.scheduling.upstream import upstream_default_config_text

NOW = 500.0
UPSTREAM = upstream_default_config_text()
SYSTEM = "You are a support agent for ACME. Policies follow. " * 30  # ~1,500 characters


def pool(rows: dict[str, dict]) -> Datastore:
    ds = Datastore(staleness_threshold=2.0)
    ds.set_endpoints([Endpoint(n, f"10.2.0.{i + 1}", 8000) for i, n in enumerate(rows)])
    for n, m in rows.items():
        ds.update_metrics(n, EndpointMetrics(**{"scraped_at": NOW - 0.01, **m}))
    return ds


def scheduler(config: str | None = None) -> Scheduler:
    return Scheduler.from_config(load_config(config), inflight=InFlightTracker())


def send(s: Scheduler, ds: Datastore, n: int, model: str = "m", prompt: str = "hi",
         tag: str = "r") -> list[str]:
    """`n` sequential requests, none finished: each stays in flight on its pod (recorded
    as the director records it)."""
    snap = ds.snapshot()
    picks = []
    for i in range(n):
        name = s.schedule(SchedulingRequest(f"{tag}{i}", model, prompt + f" question {i}"),
                          snap, now=NOW).endpoint.name
        s.inflight.started(f"{tag}{i}", name, NOW)
        picks.append(name)
    return picks


@dataclass
class Case:
    name: str
    pods: dict[str, dict]
    model: str = "m"
    prompt: str = "hi"
    best: str = ""
    warm: int = 0
    """Requests sent and finished first (they teach the prefix index)."""
    stays: int = 8
    """Sequential requests the best pod takes before any other pod gets one."""


EQUAL_QUEUES = dict(waiting=2, running=10)
CASES = [
    Case("kv headroom", {
        "kv15": dict(EQUAL_QUEUES, kv_usage=0.15),
        "kv85": dict(EQUAL_QUEUES, kv_usage=0.85),
        "kv45": dict(EQUAL_QUEUES, kv_usage=0.45),
    }, best="kv15"),
    Case("active adapter", {
        "plain-a": dict(EQUAL_QUEUES, kv_usage=0.3, max_lora=2),
        "has-sql": dict(EQUAL_QUEUES, kv_usage=0.3, max_lora=2,
                        active_adapters=frozenset({"sql"})),
        "plain-b": dict(EQUAL_QUEUES, kv_usage=0.3, max_lora=2),
    }, model="sql", best="has-sql", stays=4),  # an adapter swap is worth ~3 queued requests
    Case("cached prefix", {
        "p0": dict(EQUAL_QUEUES, kv_usage=0.3),
        "p1": dict(EQUAL_QUEUES, kv_usage=0.3),
        "p2": dict(EQUAL_QUEUES, kv_usage=0.3),
    }, prompt=SYSTEM, warm=1),
    Case("one more scraped request on the better pod", {
        "kv15": dict(waiting=3, running=10, kv_usage=0.15),
        "kv45": dict(waiting=2, running=10, kv_usage=0.45),
    }, best="kv15", stays=4),
]


def run_case(c: Case, n: int, config: str | None = None) -> tuple[str, list[str]]:
    s = scheduler(config)
    ds = pool(c.pods)
    best = c.best
    if c.warm:
        first = send(s, ds, c.warm, c.model, c.prompt, tag="warm")
        for i in range(c.warm):
            s.inflight.finished(f"warm{i}")
        best = first[0]
    return best, send(s, ds, n, c.model, c.prompt)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_few_sequential_requests_stay_on_the_clearly_better_pod(case: Case) -> None:
    for n in (1, 2, 3):
        best, picks = run_case(case, n)
        assert picks == [best] * n


@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: c.name)
def test_upstream_minmax_leaves_the_better_pod_after_one_request(case: Case) -> None:
    # The report, reproduced with the upstream formula: the second request goes
    # elsewhere because the first one is in flight on the better pod.
    best, picks = run_case(case, 3, UPSTREAM)
    assert picks[0] == best and picks[1] != best


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: c.name)
def test_a_large_burst_still_spreads_with_the_better_pod_taking_most(case: Case) -> None:
    best, picks = run_case(case, 60)
    counts = Counter(picks)
    assert len(counts) == len(case.pods), counts
    assert counts.most_common(1)[0][0] == best, counts


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_picks_never_flip_back_and_forth(case: Case) -> None:
    # While one pod is clearly better, the sequence is one run on it before any other pod
    # is chosen: no A, B, A on a one-request difference.
    best, picks = run_case(case, 40)
    first_other = next((i for i, p in enumerate(picks) if p != best), len(picks))
    assert first_other >= case.stays and picks[:first_other] == [best] * first_other


def test_kv_headroom_order_of_spreading() -> None:
    # The pods: 0.15 takes requests first, then 0.45 joins, 0.85 joins last.
    _, picks = run_case(CASES[0], 60)
    first = {p: picks.index(p) for p in set(picks)}
    assert first["kv15"] < first["kv45"] < first["kv85"]
    counts = Counter(picks)
    assert counts["kv15"] > counts["kv45"] > counts["kv85"]


# -- hot prompt groups ---------------------------------------------------------------


def idle_pods(n: int) -> dict[str, dict]:
    return {f"pod-{i}": dict(waiting=0, running=0, kv_usage=0.2) for i in range(n)}


@pytest.mark.parametrize(
    "config, hot_pods",
    [
        (None, range(2, 5)),     # default: the hot group spills over a few pods
        (UPSTREAM, range(1, 2)),  # upstream: its pod takes all 24 between two scrapes
    ],
    ids=["default", "upstream"],
)
def test_a_hot_group_spills_and_a_cold_group_stays(config, hot_pods) -> None:
    s = scheduler(config)
    ds = pool(idle_pods(6))
    hot = send(s, ds, 24, prompt="HOT " + SYSTEM, tag="hot")
    cold = send(s, ds, 3, prompt="COLD " + SYSTEM, tag="cold")
    assert len(set(hot)) in hot_pods, Counter(hot)
    assert len(set(cold)) == 1
    # The first pod keeps the most: the spill takes only the excess.
    assert Counter(hot).most_common(1)[0][0] == hot[0]


def test_spilling_stops_when_the_queue_drains() -> None:
    s = scheduler()
    ds = pool(idle_pods(6))
    hot = send(s, ds, 24, prompt="HOT " + SYSTEM, tag="hot")
    holders = set(hot)
    assert len(holders) >= 2
    for i in range(24):
        s.inflight.finished(f"hot{i}")
    # Load gone: the group goes back to its home pod, the first one it went to.
    again = send(s, ds, 4, prompt="HOT " + SYSTEM, tag="again")
    assert set(again) <= holders and again == [hot[0]] * 4


@pytest.mark.parametrize("waiting, running, kv, stays", [
    (0, 0, 0.2, True),
    (3, 8, 0.3, True),     # a few more than the idle pods: the cache hit is worth it
    (20, 0, 0.2, False),   # a long queue (the scrape caught up with the burst)
    (0, 120, 0.6, False),  # a full batch of short requests: no queue, but slow steps
])
def test_spilling_follows_the_scraped_load(waiting: int, running: int, kv: float,
                                           stays: bool) -> None:
    s = scheduler()
    ds = pool(idle_pods(3))
    (home,) = send(s, ds, 1, prompt="HOT " + SYSTEM, tag="w")
    s.inflight.finished("w0")
    ds.update_metrics(home, EndpointMetrics(scraped_at=NOW - 0.01, waiting=waiting,
                                            running=running, kv_usage=kv))
    (got,) = send(s, ds, 1, prompt="HOT " + SYSTEM, tag="next")
    assert (got == home) is stays, got


def test_the_upstream_config_sets_upstream_formulas() -> None:
    s = scheduler(UPSTREAM)
    (prof,) = s.profiles.values()
    by_type = {type(p).__name__: p for p, _ in prof.scorers}
    assert by_type["QueueScorer"].normalization == "minmax"
    assert by_type["PrefixCacheScorer"].hit_queue_worth == 0
    d = {type(p).__name__: p for p, _ in scheduler().profiles["default"].scorers}
    assert d["QueueScorer"].normalization == "scaled" and d["PrefixCacheScorer"].hit_queue_worth == 8
