"""The side-by-side benchmark's arithmetic (benchmarks/bench_compare.py) and the profile
summary (benchmarks/profile_extproc.py): ratios are paired within a repetition, and every
busy sample is charged to exactly one part."""

from __future__ import annotations

import pytest

from benchmarks import bench_compare, profile_extproc
from benchmarks.run import BENCHES


def run(target: str, rep: int, cpu: float, c: int = 1) -> dict[str, object]:
    return {"tool": "h2load", "target": target, "rep": rep, "concurrency": c,
            "server_cpu_us": cpu, "rps": 1000.0, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0}


def test_ratios_are_paired_per_repetition_then_the_median() -> None:
    # The machine got twice as slow in repetition 1: every target's CPU doubled, so the
    # paired ratios stay 3.0 and 1.5 while unpaired medians would mix the two minutes.
    runs = [run("go", 0, 100), run("ours", 0, 300), run("floor", 0, 150),
            run("go", 1, 200), run("ours", 1, 600), run("floor", 1, 300),
            run("go", 2, 100), run("ours", 2, 330), run("floor", 2, 150)]
    [row] = bench_compare.paired_ratios(runs)
    assert row["ours/go"] == pytest.approx(3.0)
    assert row["ours/go range"] == (pytest.approx(3.0), pytest.approx(3.3))
    assert row["floor/go"] == pytest.approx(1.5)
    assert row["ours/floor"] == pytest.approx(2.0)


def test_a_missing_target_in_a_repetition_leaves_that_pair_out() -> None:
    runs = [run("go", 0, 100), run("ours", 0, 300), run("ours", 1, 999), run("floor", 1, 10)]
    [row] = bench_compare.paired_ratios(runs)
    assert row["ours/go"] == pytest.approx(3.0)
    assert row["ours/floor"] == pytest.approx(99.9)
    assert "floor/go" not in row


def test_medians_and_table_per_concurrency() -> None:
    runs = [run(t, r, cpu, c) for c in (1, 8) for r in range(3)
            for t, cpu in (("go", 100 + r), ("ours", 300), ("floor", 150))]
    rows = bench_compare.medians(runs)
    go1 = next(m for m in rows if (m["target"], m["concurrency"]) == ("go", 1))
    assert go1["server_cpu_us"] == 101 and go1["runs"] == 3
    table = bench_compare.side_by_side(rows, "h2load")
    assert table.count("\n") == 3  # header, rule, c=1, c=8


RAW = """\
_run_module_as_main (<frozen runpy>:198);BaseEventLoop._run_once (asyncio/base_events.py:1907);Handle._run (asyncio/events.py:80) 50
_run_module_as_main (<frozen runpy>:198);BaseEventLoop._run_once (asyncio/base_events.py:1899);EpollSelector.select (selectors.py:468) 100
ExtProcServicer.Process (epp/server/extproc.py:98);_Stream._route (epp/server/extproc.py:246);Director.route (epp/director.py:218);Scheduler.schedule (epp/scheduling/scheduler.py:170) 30
ExtProcServicer.Process (epp/server/extproc.py:98);Director.route (epp/director.py:218);Counter.inc (prometheus_client/metrics.py:300) 20
"""


def test_profile_summary_charges_the_innermost_known_part_and_leaves_out_idle() -> None:
    s = profile_extproc.summarize(RAW)
    assert s["samples"] == 100 and s["idle_samples"] == 100
    assert s["self"]["loop callbacks in C (grpcio Cython, task steps)"] == pytest.approx(0.5)
    assert s["self"]["scheduler (epp/scheduling)"] == pytest.approx(0.3)
    assert s["self"]["metrics (prometheus_client, epp/observability)"] == pytest.approx(0.2)
    assert sum(s["self"].values()) == pytest.approx(1.0)
    assert s["inclusive"]["director (epp/director.py)"] == pytest.approx(0.5)


def test_the_go_comparison_never_runs_in_quick_mode() -> None:
    [compare] = [b for b in BENCHES if b.script == "bench_compare.py"]
    assert compare.quick is None
