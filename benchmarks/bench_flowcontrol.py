"""Flow control under a 10,000-request backlog from 100 fairness ids: dispatch cost and memory.

Run: .venv/bin/python benchmarks/bench_flowcontrol.py [--requests 10000] [--flows 100] [--rounds 7]

Every case queues `--requests` requests (4 priorities, `--flows` fairness ids, 1 KB bodies)
while the pool reads saturated, then lets the pool drain and releases them all. Reported
(medians over `--rounds` rounds, all measured in this one run):

- dispatch µs/request, controller only: `dispatch_cycle()` until the backlog is empty,
  with one saturation reading per cycle. Variants: `maxDispatchPerCycle` 1 (the default:
  one reading per release) and 64; fairness global-strict / round-robin; ordering FCFS /
  EDF; saturation from a constant or from the real `utilization-detector` over an
  8-endpoint snapshot (`utilization`: its cached whole-pool reading, as between two
  scrapes; `util-nocache`: recomputed for every release, as if a scrape landed each time).
- baseline µs/request: a plain `deque` of futures, `popleft()` + `set_result()`, i.e. the
  least any asyncio queue must do. The ratio is controller / baseline, measured back to
  back in each round (median of the per-round ratios).
- end to end µs/request: 10,000 tasks awaiting `enqueue_and_wait()`, the dispatcher task
  running, from "pool drained" until the last task resumed; baseline: the same tasks
  awaiting plain futures released by one loop.
- memory bytes/request (tracemalloc): queue structures + future + ticket per queued
  request, and, separately, with an awaiting task per request (what a real request holds).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections import deque
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from epp.datastore import Datastore, Endpoint, EndpointMetrics  # noqa: E402
from epp.flowcontrol.controller import FlowController  # noqa: E402
from epp.flowcontrol.queues import AdmissionTicket  # noqa: E402
from epp.flowcontrol.saturation import UtilizationDetector  # noqa: E402
from epp.flowcontrol.settings import FlowControlConfig  # noqa: E402

PRIORITIES = (20, 10, 0, -1)


class Gate:
    """The pool's saturation as the benchmark sets it."""

    def __init__(self) -> None:
        self.value = 2.0

    def read(self) -> float:
        return self.value


def utilization_source(gate: Gate, uncached: bool = False) -> Callable[[], float]:
    """Real detector over 8 fresh endpoints; `gate` decides saturated or idle metrics."""
    ds_busy, ds_idle = Datastore(), Datastore()
    for ds, waiting in ((ds_busy, 50.0), (ds_idle, 0.0)):
        ds.set_endpoints(Endpoint(f"pod-{i}", f"10.0.0.{i}", 8000) for i in range(8))
        for i in range(8):
            ds.update_metrics(f"pod-{i}", EndpointMetrics(waiting=waiting, running=4, kv_usage=0.3,
                                                          scraped_at=1e12))
    det = UtilizationDetector(clock=lambda: 1e12)
    busy, idle = ds_busy.snapshot(), ds_idle.snapshot()
    if uncached:  # as if every release saw a new snapshot (a scrape landed in between)
        def fresh_reading() -> float:
            det._pool_cache = None  # noqa: SLF001 - the benchmark defeats the cache on purpose
            return det.saturation(busy if gate.value >= 1.0 else idle)

        return fresh_reading
    return lambda: det.saturation(busy if gate.value >= 1.0 else idle)


def tickets(n: int, flows: int) -> list[AdmissionTicket]:
    return [AdmissionTicket(f"req-{i}", PRIORITIES[i % len(PRIORITIES)], f"tenant-{i % flows}", 1024)
            for i in range(n)]


def make(gate: Gate, source: str, per_cycle: int, fairness: str, ordering: str) -> FlowController:
    cfg = FlowControlConfig.from_config({
        "maxDispatchPerCycle": per_cycle,
        "defaultRequestTTL": "60s",
        "defaultPriorityBand": {"fairnessPolicy": fairness, "orderingPolicy": ordering,
                                "maxRequests": 0, "maxBytes": 0},
    })
    sat = gate.read if source == "constant" else utilization_source(gate, source == "util-nocache")
    return FlowController(cfg, sat)


async def controller_round(ts: list[AdmissionTicket], source: str, per_cycle: int,
                           fairness: str, ordering: str) -> tuple[float, float]:
    """(µs/request to dispatch, µs/request to submit)."""
    gate = Gate()
    fc = make(gate, source, per_cycle, fairness, ordering)
    gc.collect()
    t0 = time.perf_counter()
    items = [fc.submit(t) for t in ts]
    t1 = time.perf_counter()
    assert all(i is not None for i in items) and fc.queued() == len(ts)
    gate.value = 0.0
    t2 = time.perf_counter()
    while fc.dispatch_cycle():
        pass
    t3 = time.perf_counter()
    assert fc.queued() == 0
    n = len(ts)
    return (t3 - t2) / n * 1e6, (t1 - t0) / n * 1e6


async def baseline_round(n: int) -> float:
    loop = asyncio.get_running_loop()
    q: deque[asyncio.Future[None]] = deque(loop.create_future() for _ in range(n))
    gc.collect()
    t0 = time.perf_counter()
    while q:
        q.popleft().set_result(None)
    return (time.perf_counter() - t0) / n * 1e6


async def e2e_round(ts: list[AdmissionTicket], per_cycle: int) -> float:
    gate = Gate()
    fc = make(gate, "utilization", per_cycle, "round-robin", "fcfs")
    fc.start()
    done = 0

    async def request(t: AdmissionTicket) -> None:
        nonlocal done
        await fc.enqueue_and_wait(t)
        done += 1

    tasks = [asyncio.create_task(request(t)) for t in ts]
    while fc.queued() < len(ts):
        await asyncio.sleep(0)
    gc.collect()
    t0 = time.perf_counter()
    gate.value = 0.0
    fc.notify()
    await asyncio.gather(*tasks)
    dt = time.perf_counter() - t0
    await fc.stop()
    assert done == len(ts)
    return dt / len(ts) * 1e6


async def e2e_baseline_round(n: int) -> float:
    loop = asyncio.get_running_loop()
    futs = [loop.create_future() for _ in range(n)]

    async def request(f: asyncio.Future[None]) -> None:
        await f

    tasks = [asyncio.create_task(request(f)) for f in futs]
    await asyncio.sleep(0)
    gc.collect()
    t0 = time.perf_counter()
    for f in futs:
        f.set_result(None)
    await asyncio.gather(*tasks)
    return (time.perf_counter() - t0) / n * 1e6


async def memory_per_request(ts: list[AdmissionTicket], with_tasks: bool) -> float:
    gate = Gate()
    fc = make(gate, "constant", 1, "round-robin", "fcfs")
    fresh = [AdmissionTicket(t.request_id, t.priority, t.fairness_id, t.size) for t in ts]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    if with_tasks:
        tasks = [asyncio.create_task(fc.enqueue_and_wait(t)) for t in fresh]
        while fc.queued() < len(ts):
            await asyncio.sleep(0)
    else:
        items = [fc.submit(t) for t in fresh]
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per = (after - before) / len(ts)
    await fc.stop()  # fails the waiters with 503
    if with_tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    else:
        for i in items:
            if i is not None and i.future.done():
                i.future.exception()  # retrieved: no "never retrieved" warnings
    return per


def med(xs: list[float]) -> float:
    return statistics.median(xs)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--flows", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    n, rounds = args.requests, args.rounds
    ts = tickets(n, args.flows)

    print(f"# flow control benchmark: {n} queued requests, {args.flows} fairness ids, "
          f"priorities {PRIORITIES}, {rounds} rounds (medians)")
    print(f"# python {platform.python_version()} on {platform.machine()} "
          f"({os.cpu_count()} cpus, {platform.processor() or platform.platform()})")
    base = med([await baseline_round(n) for _ in range(rounds)])
    print(f"baseline deque+set_result             {base:7.2f} µs/request")
    cases = [
        ("constant", 1, "global-strict", "fcfs"),
        ("constant", 1, "round-robin", "fcfs"),
        ("constant", 1, "round-robin", "earliest-deadline"),
        ("utilization", 1, "round-robin", "fcfs"),
        ("util-nocache", 1, "round-robin", "fcfs"),
        ("utilization", 64, "round-robin", "fcfs"),
        ("constant", 64, "global-strict", "fcfs"),
    ]
    print(f"{'saturation':<12}{'perCycle':>9} {'fairness':<14}{'ordering':<18}"
          f"{'dispatch µs':>12}{'ratio':>8}{'submit µs':>11}")
    for source, per_cycle, fairness, ordering in cases:
        # Baseline and case back to back in every round; the ratio is the median of the
        # per-round ratios, which shrugs off load changes on a shared machine.
        rs, ratios = [], []
        for _ in range(rounds):
            b = await baseline_round(n)
            r = await controller_round(ts, source, per_cycle, fairness, ordering)
            rs.append(r)
            ratios.append(r[0] / b)
        d, s = med([r[0] for r in rs]), med([r[1] for r in rs])
        print(f"{source:<12}{per_cycle:>9} {fairness:<14}{ordering:<18}{d:>12.2f}{med(ratios):>8.1f}{s:>11.2f}")

    e2e_base = med([await e2e_baseline_round(n) for _ in range(rounds)])
    print(f"end-to-end baseline (tasks on futures)   {e2e_base:7.2f} µs/request")
    for per_cycle in (1, 64):
        es, ratios = [], []
        for _ in range(rounds):
            b = await e2e_baseline_round(n)
            e = await e2e_round(ts, per_cycle)
            es.append(e)
            ratios.append(e / b)
        e = med(es)
        print(f"end-to-end dispatcher task, perCycle {per_cycle:<3} {e:7.2f} µs/request "
              f"(ratio {med(ratios):.1f}, +{e - e2e_base:.2f} µs)")

    mem_q = med([await memory_per_request(ts, False) for _ in range(3)])
    mem_t = med([await memory_per_request(ts, True) for _ in range(3)])
    print(f"memory per queued request: {mem_q:.0f} B (queue+future+ticket), "
          f"{mem_t:.0f} B with an awaiting task")


if __name__ == "__main__":
    asyncio.run(main())
