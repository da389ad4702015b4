"""Queues: ordering within a flow, fairness among flows, early removal without residue."""

from __future__ import annotations

import math

import pytest

from epp.flowcontrol.queues import (
    Band,
    EDFQueue,
    FCFSQueue,
    GlobalStrictFairness,
    LazyHeap,
    QueueItem,
    RoundRobinFairness,
    AdmissionTicket,
)
from epp.flowcontrol.settings import BandConfig

_seq = iter(range(10**9))


def item(rid: str, flow: str = "default", deadline: float = math.inf, size: int = 0) -> QueueItem:
    """A queued request; these tests never resolve it, so it needs no future."""
    return QueueItem(AdmissionTicket(rid, fairness_id=flow, size=size), None,  # type: ignore[arg-type]
                     0.0, deadline, next(_seq))


def drain(q: FCFSQueue | EDFQueue) -> list[str]:
    out = []
    while len(q):
        out.append(q.pop().ticket.request_id)
    return out


def test_fcfs_keeps_arrival_order_and_removes_in_o1() -> None:
    q = FCFSQueue()
    items = [item(f"r{i}") for i in range(5)]
    for it in items:
        q.push(it)
    q.remove(items[2])
    q.remove(items[2])  # twice is harmless
    assert drain(q) == ["r0", "r1", "r3", "r4"]


def test_edf_releases_earliest_deadline_first_ties_by_arrival() -> None:
    q = EDFQueue()
    for rid, d in [("late", 30.0), ("soon", 10.0), ("none", math.inf), ("soon-too", 10.0), ("mid", 20.0)]:
        q.push(item(rid, deadline=d))
    assert drain(q) == ["soon", "soon-too", "mid", "late", "none"]


def test_edf_removal_leaves_no_entries_behind() -> None:
    q = EDFQueue()
    items = [item(f"r{i}", deadline=float(i)) for i in range(200)]
    for it in items:
        q.push(it)
    for it in items[:150]:
        q.remove(it)
    assert len(q) == 50
    assert q._heap.raw_size < 200  # compacted once blanks outnumbered live entries
    assert [q.pop().ticket.request_id for _ in range(2)] == ["r150", "r151"]
    for it in items[152:]:
        q.remove(it)
    assert len(q) == 0 and q._heap.raw_size == 0


def test_lazy_heap_peek_skips_blanks() -> None:
    h = LazyHeap()
    a, b = item("a"), item("b")
    ea = h.push(1.0, a)
    h.push(2.0, b)
    h.discard(ea)
    assert h.peek()[2] is b
    assert h.pop() is b
    assert h.raw_size == 0


def test_global_strict_ignores_fairness_ids() -> None:
    p = GlobalStrictFairness("fcfs")
    for rid, flow in [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b")]:
        p.push(item(rid, flow))
    assert [p.pop().ticket.request_id for _ in range(4)] == ["a1", "a2", "a3", "b1"]


def test_round_robin_takes_turns_among_fairness_ids() -> None:
    p = RoundRobinFairness("fcfs")
    for rid, flow in [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("c1", "c"), ("b2", "b")]:
        p.push(item(rid, flow))
    assert p.flows() == 3
    assert [p.pop().ticket.request_id for _ in range(6)] == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert p.flows() == 0


def test_round_robin_with_edf_inside_each_flow() -> None:
    p = RoundRobinFairness("earliest-deadline")
    p.push(item("a-late", "a", deadline=9.0))
    p.push(item("a-soon", "a", deadline=1.0))
    p.push(item("b-only", "b", deadline=5.0))
    assert [p.pop().ticket.request_id for _ in range(3)] == ["a-soon", "b-only", "a-late"]


def test_round_robin_removal_of_last_item_drops_the_flow() -> None:
    p = RoundRobinFairness("fcfs")
    a, b = item("a1", "a"), item("b1", "b")
    p.push(a)
    p.push(b)
    p.remove(a)
    assert p.flows() == 1
    assert p._turns == type(p._turns)(["b"])
    p.remove(b)
    assert p.flows() == 0 and not p._flows and not p._turns


@pytest.mark.parametrize(("max_requests", "max_bytes", "sizes", "fits"), [
    (2, 0, [1, 1], False),
    (3, 0, [1, 1], True),
    (0, 100, [60], False),   # 60 + 60 > 100
    (0, 120, [60], True),
    (0, 0, [10**9] * 5, True),  # 0 = unlimited
])
def test_band_bounds(max_requests: int, max_bytes: int, sizes: list[int], fits: bool) -> None:
    band = Band(BandConfig(max_requests=max_requests, max_bytes=max_bytes))
    for s in sizes:
        band.push(item("x", size=s))
    assert band.fits(60 if max_bytes else 1) is fits


def test_band_totals_follow_pushes_pops_and_removals() -> None:
    band = Band(BandConfig(fairness="round-robin"))
    a, b = item("a", "x", size=10), item("b", "y", size=5)
    band.push(a)
    band.push(b)
    assert (band.count, band.bytes) == (2, 15)
    band.remove(b)
    assert (band.count, band.bytes) == (1, 10)
    assert band.pop() is a
    assert (band.count, band.bytes) == (0, 0)
