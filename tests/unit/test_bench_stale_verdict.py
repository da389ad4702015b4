"""The stale-prefix sweep's verdict: judged where round-robin stops keeping up."""

from __future__ import annotations

from benchmarks.bench_routing import stale_verdict


def _point(strategy: str, qps: float, p90: float, tok_s: float, hits: float = 0.5) -> dict:
    return {"strategy": strategy, "qps": qps, "ttft_p90": p90, "output_tok_s": tok_s,
            "prefix_hit_rate": hits}


def test_judged_at_the_lowest_load_where_round_robin_falls_behind() -> None:
    points = [
        _point("round-robin", 4, 0.4, 64),      # all 4 x 16 offered tokens/s delivered
        _point("round-robin", 16, 0.9, 218),    # 85 %: a short run's drain, not saturation
        _point("round-robin", 22, 2.2, 264),    # 75 %: saturated
        _point("round-robin", 28, 3.6, 269),
        _point("default", 22, 2.0, 300, hits=0.36),
        _point("precise", 22, 0.9, 300, hits=0.51),
        _point("default", 28, 2.7, 300, hits=0.34),
        _point("precise", 28, 2.0, 300, hits=0.45),
    ]
    first, verdict = stale_verdict(points, output_len=16)
    assert first.startswith("evaluated at QPS 22: round-robin delivers 75% of the offered")
    assert "0.45x" in verdict and verdict.endswith("MET")


def test_a_higher_p90_without_more_hits_is_not_met() -> None:
    points = [_point("round-robin", 22, 2.2, 200), _point("default", 22, 2.0, 300, hits=0.5),
              _point("precise", 22, 0.9, 300, hits=0.5)]
    assert stale_verdict(points, output_len=16)[1].endswith("not met")


def test_round_robin_that_never_saturates_is_judged_at_the_highest_load() -> None:
    points = [_point("round-robin", 4, 0.4, 64), _point("round-robin", 8, 0.5, 128)]
    assert "never saturated" in stale_verdict(points, output_len=16)[0]
