"""Admission: default shedding of sheddable requests, flow-control admission, leases, config."""

from __future__ import annotations

import asyncio

import pytest

from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.errors import EppError, ErrorCode
from epp.flowcontrol.admission import (
    SHED_MESSAGE,
    AdmissionLease,
    DefaultAdmission,
    FlowControlAdmission,
    admission_from_config,
)
from epp.flowcontrol.queues import AdmissionTicket
from epp.flowcontrol.saturation import ConcurrencyDetector, UtilizationDetector
from epp.flowcontrol.settings import FlowControlConfig, feature_enabled

NOW = 50.0


def pool(waiting: list[float]) -> Datastore:
    ds = Datastore()
    ds.set_endpoints(Endpoint(f"pod-{i}", f"10.0.0.{i}", 8000) for i in range(len(waiting)))
    for i, w in enumerate(waiting):
        ds.update_metrics(f"pod-{i}", EndpointMetrics(waiting=w, kv_usage=0.1, scraped_at=NOW))
    return ds


def all_of(ds: Datastore):  # type: ignore[no-untyped-def]
    return lambda: (ds.snapshot(), None)


async def test_sheddable_request_is_dropped_while_saturated() -> None:
    ds = pool([9, 9])  # 9 waiting > queueDepthThreshold 5 on every pod
    admission = DefaultAdmission(UtilizationDetector(), clock=lambda: NOW)
    with pytest.raises(EppError) as exc:
        await admission.admit(AdmissionTicket("r", priority=-1), all_of(ds))
    assert exc.value.code is ErrorCode.ResourceExhausted
    assert exc.value.body == "inference error: ResourceExhausted - system saturated, sheddable request dropped"
    assert exc.value.message == SHED_MESSAGE


async def test_priority_zero_and_above_are_never_shed() -> None:
    ds = pool([9, 9])
    admission = DefaultAdmission(UtilizationDetector(), clock=lambda: NOW)
    calls = 0

    def candidates():  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return ds.snapshot(), None

    for prio in (0, 10):
        lease = await admission.admit(AdmissionTicket("r", priority=prio), candidates)
        assert isinstance(lease, AdmissionLease)
    assert calls == 0  # not even computed


async def test_sheddable_request_passes_when_its_candidates_have_room() -> None:
    ds = pool([9, 0])
    admission = DefaultAdmission(UtilizationDetector(), clock=lambda: NOW)
    await admission.admit(AdmissionTicket("r", priority=-1), lambda: (ds.snapshot(), [1]))
    with pytest.raises(EppError):
        await admission.admit(AdmissionTicket("r", priority=-1), lambda: (ds.snapshot(), [0]))


async def test_lease_counts_in_flight_work_for_the_concurrency_detector() -> None:
    ds = pool([0])
    det = ConcurrencyDetector(max_concurrency=1)
    admission = DefaultAdmission(det)
    lease = await admission.admit(AdmissionTicket("a", priority=-1), all_of(ds))
    lease.started("pod-0")
    with pytest.raises(EppError, match="sheddable"):
        await admission.admit(AdmissionTicket("b", priority=-1), all_of(ds))
    lease.release()
    lease.release()  # idempotent
    assert det.in_flight("pod-0") == 0
    await admission.admit(AdmissionTicket("c", priority=-1), all_of(ds))


async def test_flow_control_admission_queues_and_lease_release_drains() -> None:
    ds = pool([0, 0])
    det = ConcurrencyDetector(max_concurrency=1)
    admission = admission_from_config(["flowControl"], {"dispatchPollInterval": "10s"}, det,
                                      ds.snapshot)
    assert isinstance(admission, FlowControlAdmission)
    admission.start()
    try:
        leases = []
        for i in range(2):  # fill both pods
            lease = await admission.admit(AdmissionTicket(f"r{i}"), all_of(ds))
            lease.started(f"pod-{i}")
            leases.append(lease)
        order: list[str] = []

        async def request(rid: str, prio: int) -> None:
            lease = await admission.admit(AdmissionTicket(rid, prio), all_of(ds))
            order.append(rid)
            lease.started("pod-0")

        low = asyncio.create_task(request("low", -1))
        high = asyncio.create_task(request("high", 5))
        await asyncio.sleep(0.01)
        assert admission.controller.queued() == 2 and order == []
        leases[0].release()  # load drains; the poll interval (10 s) is not what wakes it
        await asyncio.wait_for(high, 2.0)
        assert order == ["high"] and not low.done()
        leases[1].release()
        await asyncio.wait_for(low, 2.0)
        assert order == ["high", "low"]
    finally:
        await admission.stop()


async def test_flow_control_admission_cancelled_stream_leaves_no_residue() -> None:
    ds = pool([9])
    admission = admission_from_config({"flowControl": True}, None,
                                      UtilizationDetector(clock=lambda: NOW), ds.snapshot,
                                      clock=lambda: NOW)
    assert isinstance(admission, FlowControlAdmission)
    t = asyncio.create_task(admission.admit(AdmissionTicket("r", size=1000), all_of(ds)))
    await asyncio.sleep(0)
    assert admission.controller.queued_bytes() == 1000
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert admission.controller.residue() == {"queued": 0, "bytes": 0, "flows": 0, "expiry_entries": 0}


def test_feature_gate_selects_the_admission() -> None:
    ds = pool([0])
    det = UtilizationDetector()
    assert isinstance(admission_from_config(None, None, det, ds.snapshot), DefaultAdmission)
    assert isinstance(admission_from_config(["otherGate"], {"maxRequests": 5}, det, ds.snapshot),
                      DefaultAdmission)
    assert feature_enabled(["flowControl"]) and feature_enabled({"flowControl": True})
    assert feature_enabled("prefixCache, flowControl")
    assert not feature_enabled({"flowControl": False}) and not feature_enabled([])
    with pytest.raises(ValueError, match="flowControl.priorityBands"):
        admission_from_config(["flowControl"], {"priorityBands": {"priority": 1}}, det, ds.snapshot)


def test_flow_control_config_defaults_and_upstream_names() -> None:
    c = FlowControlConfig.from_config({})
    assert (c.max_requests, c.max_bytes, c.default_ttl) == (0, 0, 30.0)
    b = c.band(7)
    assert (b.priority, b.max_requests, b.max_bytes, b.fairness, b.ordering, b.ttl,
            b.saturation_ceiling) == (7, 0, 1_000_000_000, "global-strict", "fcfs", 30.0, 1.0)
    c = FlowControlConfig.from_config({
        "maxBytes": "64Mi",
        "defaultRequestTTL": "1m30s",
        "defaultPriorityBand": {"orderingPolicyRef": "edf-ordering-policy"},
        "priorityBands": [{"priority": 20, "maxRequests": 100, "maxBytes": 5000,
                           "fairnessPolicyRef": "round-robin-fairness-policy",
                           "requestTTL": "250ms", "saturationCeiling": 0.9}],
    })
    assert c.max_bytes == 64 * 2**20 and c.default_ttl == 90.0
    assert c.band(0).ordering == "earliest-deadline" and c.band(0).ttl == 90.0
    b = c.band(20)
    assert (b.max_requests, b.max_bytes, b.fairness, b.ordering, b.ttl, b.saturation_ceiling) == (
        100, 5000, "round-robin", "earliest-deadline", 0.25, 0.9)


@pytest.mark.parametrize(("section", "fragment"), [
    ({"maxRequests": -1}, "flowControl.maxRequests"),
    ({"maxBytes": "lots"}, "flowControl.maxBytes"),
    ({"defaultRequestTTL": "10 parsecs"}, "flowControl.defaultRequestTTL"),
    ({"priorityBands": [{"maxRequests": 1}]}, "priorityBands[0].priority"),
    ({"priorityBands": [{"priority": 1}, {"priority": 1}]}, "configured twice"),
    ({"priorityBands": [{"priority": 1, "fairnessPolicy": "lottery"}]}, "fairnessPolicy"),
    ({"priorityBands": [{"priority": 1, "orderingPolicy": ["x"]}]}, "orderingPolicy"),
    ({"priorityBands": [{"priority": 1, "saturationCeiling": 0}]}, "saturationCeiling"),
    ({"defaultPriorityBand": {"priority": 3}}, "defaultPriorityBand.priority"),
    ({"maxDispatchPerCycle": 0}, "maxDispatchPerCycle"),
    ({"bands": []}, "unknown field(s) bands"),
])
def test_flow_control_config_errors_name_the_field(section: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=None) as exc:
        FlowControlConfig.from_config(section)
    assert fragment in str(exc.value)


async def test_objectives_and_admission_together_protect_important_work() -> None:
    """The GKE-guide scenario at unit level: objective header -> priority -> admission."""
    from epp.manifests import parse_manifests
    from epp.objectives import ObjectiveStore

    store = ObjectiveStore("pool")
    store.replace_all(parse_manifests("""
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: food-review}
spec: {priority: 10, poolRef: {name: pool}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1, poolRef: {name: pool}}
"""))
    ds = pool([8, 8, 8])  # every pod has more than 5 waiting: saturated
    admission = DefaultAdmission(UtilizationDetector(), clock=lambda: NOW)

    async def send(objective: str) -> str:
        res = store.resolve("food-review-1", objective, None, 0.5)
        try:
            await admission.admit(AdmissionTicket("r", res.priority), all_of(ds))
        except EppError as e:
            return f"{e.code.http_status} {e.body}"
        return "routed"

    assert await send("food-review") == "routed"
    assert await send("unknown") == "routed"  # priority 0 is never shed
    assert await send("batch") == (
        "429 inference error: ResourceExhausted - system saturated, sheddable request dropped")


async def test_lease_as_context_manager_releases_on_error() -> None:
    det = ConcurrencyDetector(max_concurrency=4)
    lease = await DefaultAdmission(det).admit(AdmissionTicket("r"), all_of(pool([0])))
    with pytest.raises(RuntimeError):
        with lease:
            lease.started("pod-0")
            assert det.in_flight("pod-0") == 1
            raise RuntimeError("upstream reset")
    assert lease.released and det.in_flight("pod-0") == 0


@pytest.mark.parametrize(("text", "seconds"), [
    ("200ms", 0.2), ("1m30s", 90.0), ("1.5s", 1.5), ("100us", 1e-4), ("2h", 7200.0), (3, 3.0), ("0", 0.0),
])
def test_durations(text: object, seconds: float) -> None:
    from epp.flowcontrol.settings import parse_duration

    assert parse_duration(text, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "ms", "1s2", "-1s", True, None])
def test_bad_durations(text: object) -> None:
    from epp.flowcontrol.settings import parse_duration

    with pytest.raises(ValueError, match="^x: "):
        parse_duration(text, "x")


@pytest.mark.parametrize(("text", "size"), [
    (1000, 1000), ("64Mi", 64 * 2**20), ("1G", 10**9), ("1.5Ki", 1536), ("0", 0),
])
def test_quantities(text: object, size: int) -> None:
    from epp.flowcontrol.settings import parse_quantity

    assert parse_quantity(text, "x") == size


def test_documented_yaml_example_is_valid() -> None:
    import re

    import yaml

    import epp.flowcontrol.settings as settings

    block = re.search(r"```yaml\n(.*?)```", settings.__doc__ or "", re.S)
    assert block is not None
    doc = yaml.safe_load(block.group(1))
    assert feature_enabled(doc["featureGates"])
    c = FlowControlConfig.from_config(doc["flowControl"])
    assert c.band(20).max_requests == 1000 and c.band(20).fairness == "round-robin"
    assert c.band(-1).saturation_ceiling == 0.8 and c.band(-1).max_bytes == 10**9


async def test_the_director_queues_a_ticket_built_from_the_request() -> None:
    from epp.config import load_config
    from epp.director import Director
    from epp.request import FAIRNESS_ID_HEADER, InferenceRequest
    from epp.scheduling import Scheduler

    ds = pool([9, 9])
    pool_fc = admission_from_config(["flowControl"], {}, UtilizationDetector(clock=lambda: NOW),
                                    ds.snapshot, clock=lambda: NOW)
    assert isinstance(pool_fc, FlowControlAdmission)
    director = Director(ds, Scheduler.from_config(load_config(None)), admission=pool_fc)
    req = InferenceRequest("req-1", headers={FAIRNESS_ID_HEADER: "tenant-a"}, body=b"x" * 123)
    t = asyncio.create_task(director.route(req))
    await asyncio.sleep(0)
    fc = pool_fc.controller
    assert fc.queued(0) == 1 and fc.queued_bytes(0) == 123
    (state,) = [s for s in fc._order if s.band.priority == 0]
    assert list(state.band.policy._queue._items.values())[0].ticket.fairness_id == "tenant-a"
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t

    shedder = DefaultAdmission(UtilizationDetector(), clock=lambda: NOW)
    with pytest.raises(EppError, match="sheddable"):
        await shedder.admit(AdmissionTicket("req-2", -1), all_of(ds))
    lease = await shedder.admit(AdmissionTicket("req-3", 0), all_of(ds))
    lease.release()
    assert lease.released


def test_a_single_declared_detector_plugin_is_used_without_a_section() -> None:
    from epp.flowcontrol.saturation import detector_from_config

    det = ConcurrencyDetector(4)
    assert detector_from_config({}, {"mine": det, "scorer": object()}) is det
    assert isinstance(detector_from_config({}, {}), UtilizationDetector)
    with pytest.raises(ValueError, match="pluginRef"):
        detector_from_config(None, {"a": det, "b": UtilizationDetector()})


async def test_flow_control_admission_starts_its_dispatcher_when_first_needed() -> None:
    ds = pool([9])
    clock = [NOW]
    admission = admission_from_config(["flowControl"], {"defaultRequestTTL": "50ms"},
                                      UtilizationDetector(clock=lambda: NOW), ds.snapshot,
                                      clock=lambda: clock[0])
    assert isinstance(admission, FlowControlAdmission)
    try:
        t = asyncio.create_task(admission.admit(AdmissionTicket("r"), all_of(ds)))
        await asyncio.sleep(0.01)
        clock[0] += 1.0  # past the TTL: only a running dispatcher can notice
        admission.controller.notify()
        with pytest.raises(EppError, match="timed out"):
            await asyncio.wait_for(t, 2.0)
    finally:
        await admission.stop()
    with pytest.raises(EppError, match="shutting down"):
        await admission.admit(AdmissionTicket("late"), all_of(ds))
