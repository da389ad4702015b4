"""Saturation detectors: utilization from scraped metrics, concurrency from in-flight work."""

from __future__ import annotations

import math

import pytest

from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.flowcontrol.saturation import (
    ConcurrencyDetector,
    UtilizationDetector,
    detector_from_config,
    pool_saturation_fn,
)
from epp.registry import create

NOW = 1000.0


def pool(*metrics: tuple[float, float, float]) -> Datastore:
    """A pool whose endpoint i reports (waiting, kv_usage, age_seconds)."""
    ds = Datastore(staleness_threshold=2.0)
    ds.set_endpoints(Endpoint(f"pod-{i}", f"10.0.0.{i}", 8000) for i in range(len(metrics)))
    for i, (waiting, kv, age) in enumerate(metrics):
        ds.update_metrics(f"pod-{i}", EndpointMetrics(waiting=waiting, running=1, kv_usage=kv,
                                                      scraped_at=NOW - age))
    return ds


def test_per_endpoint_utilization_is_the_larger_of_queue_and_kv() -> None:
    det = UtilizationDetector()  # thresholds 5 waiting, 0.8 KV, 200 ms
    ds = pool((1, 0.2, 0.0), (1, 0.6, 0.0), (4, 0.0, 0.0), (50, 0.1, 0.0))
    u = det.utilization(ds.snapshot(), now=NOW)
    assert u.tolist() == pytest.approx([0.25, 0.75, 0.8, 1.0])  # capped at 1
    assert det.saturation(ds.snapshot(), now=NOW) == pytest.approx((0.25 + 0.75 + 0.8 + 1.0) / 4)


def test_saturated_when_candidates_are_full_on_average() -> None:
    det = UtilizationDetector()
    ds = pool((5, 0.1, 0.0), (0, 0.8, 0.0), (0, 0.0, 0.0))
    snap = ds.snapshot()
    assert det.is_saturated(snap, [0, 1], now=NOW)
    assert not det.is_saturated(snap, now=NOW)
    assert not det.is_saturated(snap, [2], now=NOW)


def test_stale_metrics_count_as_full() -> None:
    det = UtilizationDetector(metrics_staleness_threshold=0.2)
    ds = pool((0, 0.0, 0.1), (0, 0.0, 0.25))
    # The datastore would still call 0.25 s fresh (its threshold is 2 s); ours is 200 ms.
    assert not ds.snapshot().stale(NOW).any()
    assert det.utilization(ds.snapshot(), now=NOW).tolist() == [0.0, 1.0]


def test_never_scraped_and_unreported_metrics() -> None:
    ds = Datastore()
    ds.set_endpoints([Endpoint("a", "10.0.0.1", 8000), Endpoint("b", "10.0.0.2", 8000)])
    ds.update_metrics("b", EndpointMetrics(waiting=math.nan, kv_usage=0.4, scraped_at=NOW))
    det = UtilizationDetector()
    assert det.utilization(ds.snapshot(), now=NOW).tolist() == [1.0, 0.5]


def test_no_candidates_means_saturated() -> None:
    det = UtilizationDetector()
    assert det.is_saturated(Datastore().snapshot(), now=NOW)
    assert det.is_saturated(pool((0, 0, 0)).snapshot(), [], now=NOW)


def test_injected_clock_is_used_when_now_is_omitted() -> None:
    clock = [NOW]
    det = UtilizationDetector(clock=lambda: clock[0])
    snap = pool((0, 0.0, 0.0)).snapshot()
    assert det.saturation(snap) == 0.0
    clock[0] = NOW + 1.0
    assert det.saturation(snap) == 1.0


def test_registered_plugin_with_upstream_parameter_names() -> None:
    det = create("utilization-detector", "u", {"queueDepthThreshold": 10,
                                               "kvCacheUtilThreshold": 0.5,
                                               "metricsStalenessThreshold": "1s"})
    assert isinstance(det, UtilizationDetector)
    assert (det.queue_depth_threshold, det.kv_cache_util_threshold,
            det.metrics_staleness_threshold) == (10.0, 0.5, 1.0)
    defaults = create("utilization-detector", "d", {})
    assert (defaults.queue_depth_threshold, defaults.kv_cache_util_threshold,
            defaults.metrics_staleness_threshold) == (5.0, 0.8, 0.2)


@pytest.mark.parametrize("params", [
    {"queueDepthThreshold": 0},
    {"kvCacheUtilThreshold": "high"},
    {"metricsStalenessThreshold": "soon"},
    {"metricsStalenessThreshold": "0s"},
    {"queueDepth": 5},
])
def test_bad_parameters_are_readable_errors(params: dict) -> None:
    with pytest.raises(ValueError, match="utilization-detector 'u'"):
        create("utilization-detector", "u", params)


def test_detector_from_config_shapes() -> None:
    inline = detector_from_config({"queueDepthThreshold": 2})
    assert isinstance(inline, UtilizationDetector) and inline.queue_depth_threshold == 2
    assert isinstance(detector_from_config(None), UtilizationDetector)
    mine = ConcurrencyDetector(8)
    assert detector_from_config({"pluginRef": "c"}, {"c": mine}) is mine
    typed = detector_from_config({"type": "concurrency-detector",
                                  "parameters": {"maxConcurrency": 3}})
    assert isinstance(typed, ConcurrencyDetector) and typed.max_concurrency == 3
    with pytest.raises(ValueError, match="no plugin named 'x'"):
        detector_from_config({"pluginRef": "x"}, {})
    with pytest.raises(ValueError, match="not a saturation detector"):
        detector_from_config({"pluginRef": "s"}, {"s": object()})
    with pytest.raises(ValueError, match="expected a plugin name"):
        detector_from_config({"pluginRef": ["c"]}, {"c": mine})  # a start-up error, not a crash


def test_concurrency_detector_counts_in_flight_requests() -> None:
    det = ConcurrencyDetector(max_concurrency=2)
    snap = pool((0, 0, 0), (0, 0, 0)).snapshot()
    assert det.saturation(snap) == 0.0
    det.request_started("pod-0")
    det.request_started("pod-0")
    assert det.saturation(snap) == 0.5
    assert det.is_saturated(snap, [0]) and not det.is_saturated(snap)
    det.request_started("pod-1")
    det.request_started("pod-1")
    assert det.is_saturated(snap)
    for _ in range(2):
        det.request_finished("pod-0")
        det.request_finished("pod-1")
    assert det.saturation(snap) == 0.0
    assert det._in_flight == {}  # idle endpoints leave nothing behind


def test_concurrency_detector_in_token_mode() -> None:
    det = create("concurrency-detector", "t", {"mode": "tokens", "maxConcurrency": 1000})
    snap = pool((0, 0, 0)).snapshot()
    det.request_started("pod-0", tokens=600)
    assert det.saturation(snap) == pytest.approx(0.6)
    det.request_started("pod-0", tokens=600)
    assert det.is_saturated(snap)
    det.request_finished("pod-0", tokens=600)
    assert det.saturation(snap) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="mode"):
        create("concurrency-detector", "t", {"mode": "bytes"})


def test_pool_saturation_fn_reads_the_latest_snapshot() -> None:
    ds = pool((0, 0.0, 0.0))
    det = UtilizationDetector(clock=lambda: NOW)
    sat = pool_saturation_fn(det, ds.snapshot)
    assert sat() == 0.0
    ds.update_metrics("pod-0", EndpointMetrics(waiting=10, kv_usage=0.0, scraped_at=NOW))
    assert sat() == 1.0


def test_cached_pool_reading_expires_when_an_endpoint_turns_stale() -> None:
    det = UtilizationDetector(metrics_staleness_threshold=0.2)
    snap = pool((0, 0.0, 0.0), (0, 0.0, 0.1)).snapshot()  # fresh until NOW+0.2 and NOW+0.1
    assert det.saturation(snap, now=NOW) == 0.0
    assert det.saturation(snap, now=NOW + 0.1) == 0.0  # cached, still right
    assert det.saturation(snap, now=NOW + 0.15) == 0.5  # pod-1 went stale
    assert det.saturation(snap, now=NOW + 0.25) == 1.0
    assert det.saturation(snap, now=NOW) == 0.0  # an earlier `now` is not served from cache
