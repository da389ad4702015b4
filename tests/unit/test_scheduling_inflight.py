"""In-flight accounting: requests routed since an endpoint's last scrape count as waiting."""

from __future__ import annotations

from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.scheduling.inflight import InFlightTracker


def _pool(scraped: dict[str, float]) -> Datastore:
    ds = Datastore()
    ds.set_endpoints([Endpoint(n, f"10.0.0.{i}", 8000) for i, n in enumerate(scraped)])
    for n, t in scraped.items():
        if t is not None:
            ds.update_metrics(n, EndpointMetrics(waiting=0, scraped_at=t))
    return ds


def test_requests_after_the_last_scrape_count_until_finished() -> None:
    ds = _pool({"a": 100.0, "b": 100.0})
    t = InFlightTracker(timeout=60)
    assert t.extra_waiting(ds.snapshot(), 101.0) is None  # nothing in flight: no work
    t.started("r1", "a", 99.0)  # before a's scrape: already in its numbers
    t.started("r2", "a", 100.5)
    t.started("r3", "a", 100.6)
    t.started("r4", "b", 100.7)
    assert t.extra_waiting(ds.snapshot(), 101.0).tolist() == [2.0, 1.0]
    t.finished("r2")
    t.finished("unknown")  # ignored
    assert t.extra_waiting(ds.snapshot(), 101.0).tolist() == [1.0, 1.0]
    # A new scrape of a covers r3.
    ds.update_metrics("a", EndpointMetrics(waiting=1, scraped_at=101.0))
    assert t.extra_waiting(ds.snapshot(), 101.5).tolist() == [0.0, 1.0]


def test_never_scraped_endpoint_counts_everything_and_timeouts_expire() -> None:
    ds = _pool({"a": None})
    t = InFlightTracker(timeout=10)
    t.started("r1", "a", 1.0)
    t.started("r2", "a", 5.0)
    assert t.extra_waiting(ds.snapshot(), 6.0).tolist() == [2.0]
    assert t.extra_waiting(ds.snapshot(), 12.0).tolist() == [1.0]  # r1 timed out


def test_restarting_a_request_moves_it() -> None:
    ds = _pool({"a": 0.0, "b": 0.0})
    t = InFlightTracker()
    t.started("r", "a", 1.0)
    t.started("r", "b", 2.0)  # retried elsewhere with the same id
    assert t.extra_waiting(ds.snapshot(), 3.0).tolist() == [0.0, 1.0]
    assert t.endpoint_of("r") == "b"
    assert len(t) == 1


def test_compaction_keeps_open_requests_and_drops_covered_ones() -> None:
    ds = _pool({"a": 0.0, "b": 0.0})
    t = InFlightTracker(timeout=1e6, capacity=16)
    snap = ds.snapshot()
    for i in range(1000):
        t.started(f"r{i}", "a" if i % 2 else "b", 1.0 + i)
        if i % 3:
            t.finished(f"r{i}")
        if i % 50 == 0:
            t.extra_waiting(snap, 2000.0)
    open_a = sum(1 for i in range(1000) if i % 3 == 0 and i % 2)
    open_b = sum(1 for i in range(1000) if i % 3 == 0 and not i % 2)
    assert t.extra_waiting(snap, 2000.0).tolist() == [open_a, open_b]
    assert len(t) == open_a + open_b
    # Once a scrape covers everything, compaction can drop all of it.
    ds.update_metrics("a", EndpointMetrics(scraped_at=5000.0))
    ds.update_metrics("b", EndpointMetrics(scraped_at=5000.0))
    assert t.extra_waiting(ds.snapshot(), 5001.0).tolist() == [0.0, 0.0]
    for i in range(1000, 1100):
        t.started(f"r{i}", "a", 6000.0)
    assert t.extra_waiting(ds.snapshot(), 6001.0).tolist() == [100.0, 0.0]
    assert len(t._start) <= 2048


def test_forget_endpoint() -> None:
    ds = _pool({"a": 0.0, "b": 0.0})
    t = InFlightTracker()
    t.started("r1", "a", 1.0)
    t.started("r2", "b", 1.0)
    t.forget_endpoint("a")
    assert t.extra_waiting(ds.snapshot(), 2.0).tolist() == [0.0, 1.0]
    assert len(t) == 1


def test_pod_churn_does_not_grow_the_tracker() -> None:
    t = InFlightTracker()
    ds = Datastore()
    now = 1000.0
    for gen in range(200):  # 200 generations of 4 pods, each replaced by new names
        names = [f"pod-{gen}-{i}" for i in range(4)]
        ds.set_endpoints([Endpoint(n, f"10.0.{gen % 250}.{i}", 8000) for i, n in enumerate(names)])
        for n in names:
            ds.update_metrics(n, EndpointMetrics(waiting=0, running=0, kv_usage=0, scraped_at=now - 1))
        t.started(f"r{gen}", names[0], now)
        assert t.extra_waiting(ds.snapshot(), now).tolist() == [1, 0, 0, 0]
        for n in names:
            t.forget_endpoint(n)
    assert t._nslots <= 8


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_EVENTS = st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 5), st.booleans()),
                   max_size=60)


@settings(max_examples=200, deadline=None)
@given(events=_EVENTS, scrapes=st.tuples(st.floats(0, 40), st.floats(0, 40), st.floats(0, 40)),
       out_of_order=st.booleans())
def test_reads_skip_covered_records_without_changing_the_counts(events, scrapes, out_of_order) -> None:
    """The read skips records older than every endpoint's last scrape; counts equal a full
    scan's, in time order and out of it (a caller's clock going backwards)."""
    ds = _pool(dict(zip("abc", scrapes)))
    t = InFlightTracker(timeout=30, capacity=16)
    now, open_ = 0.0, {}
    for i, (ep, step, finish) in enumerate(events):
        now = now - step if out_of_order and i % 3 == 0 else now + step
        t.started(f"r{i}", ep, now)
        open_[f"r{i}"] = (ep, now)
        if finish:
            t.finished(f"r{i // 2}")
            open_.pop(f"r{i // 2}", None)
    read_at = now + 1
    expected = [sum(1 for e, at in open_.values()
                    if e == ep and at > max(scraped, read_at - 30))
                for ep, scraped in zip("abc", scrapes)]
    got = t.extra_waiting(ds.snapshot(), read_at)
    assert (got.tolist() if got is not None else [0, 0, 0]) == expected
