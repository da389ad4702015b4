"""FlowController: priority bands, ceilings, bounds, TTL, cancellation, the dispatcher loop.

Most tests drive the controller by hand (`dispatch_cycle(now)`) with a fake clock and a
saturation value they set, so nothing depends on timing.
"""

from __future__ import annotations

import asyncio

import pytest

from epp.errors import EppError, ErrorCode
from epp.flowcontrol.controller import MSG_EXPIRED, FlowController
from epp.flowcontrol.queues import AdmissionTicket
from epp.flowcontrol.settings import FlowControlConfig
from epp.observability import REGISTRY


class Pool:
    """A saturation value the test sets, and a clock it advances."""

    def __init__(self, saturation: float = 1.0) -> None:
        self.saturation = saturation
        self.now = 100.0
        self.reads = 0

    def read(self) -> float:
        self.reads += 1
        return self.saturation


def controller(pool: Pool, **flow_control: object) -> FlowController:
    """A controller driven by hand; one cycle may release up to 1000 requests."""
    flow_control.setdefault("maxDispatchPerCycle", 1000)
    return FlowController(FlowControlConfig.from_config(flow_control), pool.read, lambda: pool.now)


async def waiter(fc: FlowController, order: list[str], rid: str, priority: int = 0,
                 flow: str = "default", size: int = 0) -> None:
    await fc.enqueue_and_wait(AdmissionTicket(rid, priority, flow, size))
    order.append(rid)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_unsaturated_pool_admits_at_once_without_queueing() -> None:
    pool = Pool(saturation=0.3)
    fc = controller(pool)
    await fc.enqueue_and_wait(AdmissionTicket("r1", priority=-5))
    assert fc.queued() == 0 and pool.reads == 1


async def test_burst_is_released_highest_priority_first_as_load_drains() -> None:
    pool = Pool(saturation=1.2)
    fc = controller(pool)
    order: list[str] = []
    tasks = [asyncio.create_task(waiter(fc, order, rid, prio))
             for rid, prio in [("low", -1), ("mid", 0), ("high", 10), ("mid2", 0), ("top", 20)]]
    await settle()
    assert fc.queued() == 5 and order == []
    assert fc.dispatch_cycle(pool.now) == 0  # still saturated
    pool.saturation = 0.5
    assert fc.dispatch_cycle(pool.now) == 5
    await asyncio.gather(*tasks)
    assert order == ["top", "high", "mid", "mid2", "low"]
    assert fc.residue() == {"queued": 0, "bytes": 0, "flows": 0, "expiry_entries": 0}


async def test_each_band_has_its_own_saturation_ceiling() -> None:
    pool = Pool(saturation=2.0)
    fc = controller(pool, priorityBands=[{"priority": 10}, {"priority": -1, "saturationCeiling": 0.5}])
    order: list[str] = []
    tasks = [asyncio.create_task(waiter(fc, order, rid, prio))
             for rid, prio in [("sheddable", -1), ("important", 10)]]
    await settle()
    pool.saturation = 0.7  # below 1.0 but above the sheddable band's 0.5
    fc.dispatch_cycle()
    await settle()
    assert order == ["important"] and fc.queued(-1) == 1
    pool.saturation = 0.4
    fc.dispatch_cycle()
    await asyncio.gather(*tasks)
    assert order == ["important", "sheddable"]


async def test_a_blocked_higher_band_holds_back_lower_bands() -> None:
    pool = Pool(saturation=2.0)
    fc = controller(pool, priorityBands=[{"priority": 10, "saturationCeiling": 0.5}])
    order: list[str] = []
    tasks = [asyncio.create_task(waiter(fc, order, rid, prio)) for rid, prio in [("hi", 10), ("lo", 0)]]
    await settle()
    pool.saturation = 0.7  # the low band's ceiling (1.0) allows it, but priority is strict
    assert fc.dispatch_cycle() == 0
    pool.saturation = 0.1
    assert fc.dispatch_cycle() == 2
    await asyncio.gather(*tasks)
    assert order == ["hi", "lo"]


async def test_new_request_queues_behind_waiting_higher_priority() -> None:
    pool = Pool(saturation=2.0)
    fc = controller(pool)
    order: list[str] = []
    t1 = asyncio.create_task(waiter(fc, order, "hi", 5))
    await settle()
    pool.saturation = 0.0  # drained, but the dispatcher has not run yet
    t2 = asyncio.create_task(waiter(fc, order, "lo", 0))
    await settle()
    assert fc.queued() == 2  # no overtaking through the fast path
    fc.dispatch_cycle()
    await asyncio.gather(t1, t2)
    assert order == ["hi", "lo"]


async def test_round_robin_fairness_through_the_controller() -> None:
    pool = Pool(saturation=2.0)
    fc = controller(pool, defaultPriorityBand={"fairnessPolicy": "round-robin"})
    order: list[str] = []
    tasks = [asyncio.create_task(waiter(fc, order, rid, 0, flow))
             for rid, flow in [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("c1", "c")]]
    await settle()
    pool.saturation = 0.0
    fc.dispatch_cycle()
    await asyncio.gather(*tasks)
    assert order == ["a1", "b1", "c1", "a2", "a3"]


async def test_per_cycle_budget_limits_releases() -> None:
    pool = Pool(saturation=2.0)
    fc = controller(pool, maxDispatchPerCycle=2)
    tasks = [asyncio.create_task(waiter(fc, [], f"r{i}")) for i in range(5)]
    await settle()
    pool.saturation = 0.0
    assert [fc.dispatch_cycle() for _ in range(4)] == [2, 2, 1, 0]
    await asyncio.gather(*tasks)


async def test_band_overflow_is_429_at_once() -> None:
    pool = Pool(saturation=2.0)
    fc = controller(pool, priorityBands=[{"priority": 3, "maxRequests": 2, "maxBytes": 100}])
    tasks = [asyncio.create_task(waiter(fc, [], f"r{i}", 3, size=10)) for i in range(2)]
    await settle()
    labels = {"priority": "3", "outcome": "rejected"}
    name = "inference_extension_flow_control_request_queue_duration_seconds_count"
    rejected_before = REGISTRY.get_sample_value(name, labels) or 0
    with pytest.raises(EppError) as exc:
        await fc.enqueue_and_wait(AdmissionTicket("r3", 3, size=1))
    assert exc.value.code is ErrorCode.ResourceExhausted
    assert REGISTRY.get_sample_value(name, labels) == rejected_before + 1
    assert exc.value.body == "inference error: ResourceExhausted - flow control queue full for priority 3"
    # Other bands are unaffected by this band's bound.
    other = asyncio.create_task(waiter(fc, [], "other", 4))
    await settle()
    assert fc.queued(4) == 1
    pool.saturation = 0.0
    fc.dispatch_cycle()
    await asyncio.gather(*tasks, other)


async def test_band_byte_bound_and_global_bounds() -> None:
    pool = Pool(saturation=2.0)
    fc = controller(pool, maxRequests=3, maxBytes="1Ki",
                    priorityBands=[{"priority": 0, "maxBytes": 100}])
    t = asyncio.create_task(waiter(fc, [], "big", 0, size=80))
    await settle()
    with pytest.raises(EppError, match="queue full for priority 0"):
        fc.submit(AdmissionTicket("too-big", 0, size=30))
    t2 = asyncio.create_task(waiter(fc, [], "other-band", 1, size=900))
    await settle()
    with pytest.raises(EppError, match="flow control queues full") as exc:
        fc.submit(AdmissionTicket("over-global-bytes", 2, size=100))
    assert exc.value.code is ErrorCode.ResourceExhausted
    t3 = asyncio.create_task(waiter(fc, [], "third", 2))
    await settle()
    with pytest.raises(EppError, match="flow control queues full"):
        fc.submit(AdmissionTicket("over-global-count", 2))
    pool.saturation = 0.0
    fc.dispatch_cycle()
    await asyncio.gather(t, t2, t3)


async def test_ttl_expiry_is_503() -> None:
    pool = Pool(saturation=2.0)
    fc = controller(pool, defaultRequestTTL="5s", priorityBands=[{"priority": 1, "requestTTL": "1s"}])
    short = asyncio.create_task(fc.enqueue_and_wait(AdmissionTicket("short", 1)))
    long = asyncio.create_task(fc.enqueue_and_wait(AdmissionTicket("long", 0)))
    custom = asyncio.create_task(fc.enqueue_and_wait(AdmissionTicket("custom", 0, ttl=0)))
    await settle()
    assert fc.next_deadline() == pool.now + 1
    pool.now += 1.5
    fc.dispatch_cycle()
    with pytest.raises(EppError) as exc:
        await short
    assert exc.value.code is ErrorCode.ServiceUnavailable and exc.value.message == MSG_EXPIRED
    assert not long.done()
    pool.now += 4
    fc.dispatch_cycle()
    with pytest.raises(EppError, match="timed out"):
        await long
    assert fc.queued() == 1 and not custom.done()  # ttl=0: no expiry
    custom.cancel()
    await settle()
    assert fc.residue() == {"queued": 0, "bytes": 0, "flows": 0, "expiry_entries": 0}


@pytest.mark.parametrize("fairness", ["global-strict", "round-robin"])
@pytest.mark.parametrize("ordering", ["fcfs", "earliest-deadline"])
async def test_cancelled_waiters_leave_no_residue(fairness: str, ordering: str) -> None:
    pool = Pool(saturation=2.0)
    fc = controller(pool, defaultPriorityBand={"fairnessPolicy": fairness, "orderingPolicy": ordering})
    order: list[str] = []
    tasks = {f"r{i}": asyncio.create_task(waiter(fc, order, f"r{i}", i % 3, f"f{i % 4}", size=7))
             for i in range(120)}
    await settle()
    assert fc.queued() == 120 and fc.queued_bytes() == 840
    for rid, t in tasks.items():
        if rid != "r5":
            t.cancel()
    await settle()
    assert fc.queued() == 1 and fc.queued_bytes() == 7
    pool.saturation = 0.0
    fc.dispatch_cycle()
    await tasks["r5"]
    assert order == ["r5"]
    assert fc.residue() == {"queued": 0, "bytes": 0, "flows": 0, "expiry_entries": 0}
    assert all(t.cancelled() for rid, t in tasks.items() if rid != "r5")


async def test_cancel_after_release_but_before_resuming_is_harmless() -> None:
    pool = Pool(saturation=2.0)
    fc = controller(pool)
    t = asyncio.create_task(fc.enqueue_and_wait(AdmissionTicket("r", 0)))
    await settle()
    pool.saturation = 0.0
    fc.dispatch_cycle()
    t.cancel()  # the stream went away in the same loop iteration
    with pytest.raises(asyncio.CancelledError):
        await t
    assert fc.residue() == {"queued": 0, "bytes": 0, "flows": 0, "expiry_entries": 0}


async def test_queue_metrics_per_band() -> None:
    pool = Pool(saturation=2.0)
    fc = controller(pool)
    tasks = [asyncio.create_task(waiter(fc, [], f"r{i}", 77, size=100)) for i in range(3)]
    await settle()

    def sample(name: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"priority": "77"})

    assert sample("inference_extension_flow_control_queue_size") == 3
    assert sample("inference_extension_flow_control_queue_bytes") == 300
    before = REGISTRY.get_sample_value(
        "inference_extension_flow_control_request_queue_duration_seconds_count",
        {"priority": "77", "outcome": "dispatched"}) or 0
    pool.saturation = 0.25
    pool.now += 2
    fc.dispatch_cycle()
    await asyncio.gather(*tasks)
    assert sample("inference_extension_flow_control_queue_size") == 0
    assert sample("inference_extension_flow_control_queue_bytes") == 0
    assert REGISTRY.get_sample_value(
        "inference_extension_flow_control_request_queue_duration_seconds_count",
        {"priority": "77", "outcome": "dispatched"}) == before + 3
    assert REGISTRY.get_sample_value("inference_extension_flow_control_pool_saturation") == 0.25


async def test_broken_saturation_source_holds_requests_instead_of_crashing() -> None:
    def broken() -> float:
        raise RuntimeError("detector bug")

    fc = FlowController(FlowControlConfig(), broken)
    item = fc.submit(AdmissionTicket("r", 0))
    assert item is not None and fc.queued() == 1
    assert fc.dispatch_cycle() == 0
    fc.cancel(item)
    assert fc.residue()["queued"] == 0


async def test_dispatcher_task_releases_on_notify_and_on_poll() -> None:
    pool = Pool(saturation=2.0)
    fc = FlowController(FlowControlConfig.from_config({"dispatchPollInterval": "5ms"}), pool.read)
    fc.start()
    try:
        order: list[str] = []
        t1 = asyncio.create_task(waiter(fc, order, "a"))
        await asyncio.sleep(0.02)
        assert order == []
        pool.saturation = 0.0
        fc.notify()  # e.g. a lease was released
        await asyncio.wait_for(t1, 2.0)
        pool.saturation = 2.0
        t2 = asyncio.create_task(waiter(fc, order, "b"))
        await asyncio.sleep(0.02)
        pool.saturation = 0.0  # no notify: the poll interval finds it
        await asyncio.wait_for(t2, 2.0)
        assert order == ["a", "b"]
    finally:
        await fc.stop()


async def test_dispatcher_task_expires_at_the_deadline() -> None:
    pool = Pool(saturation=2.0)
    fc = FlowController(FlowControlConfig.from_config(
        {"defaultRequestTTL": "30ms", "dispatchPollInterval": "10s"}), pool.read)
    fc.start()
    try:
        with pytest.raises(EppError, match="timed out"):
            await asyncio.wait_for(fc.enqueue_and_wait(AdmissionTicket("r")), 2.0)
    finally:
        await fc.stop()


async def test_stop_fails_waiters_with_503_and_refuses_new_ones() -> None:
    pool = Pool(saturation=2.0)
    fc = controller(pool)
    fc.start()
    t = asyncio.create_task(fc.enqueue_and_wait(AdmissionTicket("r")))
    await settle()
    await fc.stop()
    with pytest.raises(EppError, match="shutting down"):
        await t
    with pytest.raises(EppError, match="shutting down"):
        await fc.enqueue_and_wait(AdmissionTicket("late"))
    assert fc.residue()["queued"] == 0


async def test_dispatcher_task_survives_a_failing_cycle(monkeypatch) -> None:
    pool = Pool(saturation=2.0)
    fc = FlowController(FlowControlConfig.from_config({"dispatchPollInterval": "5ms"}), pool.read)
    task = fc.start()
    try:
        order: list[str] = []
        t = asyncio.create_task(waiter(fc, order, "a"))
        await settle()
        assert fc.queued() == 1
        real, calls = fc.expire, []

        def flaky(now: float) -> int:
            calls.append(now)
            if len(calls) == 1:
                raise RuntimeError("bug in a cycle")
            return real(now)

        monkeypatch.setattr(fc, "expire", flaky)
        pool.saturation = 0.0
        fc.notify()
        await asyncio.wait_for(t, 2.0)
        assert order == ["a"] and len(calls) >= 2 and not task.done()
    finally:
        await fc.stop()
