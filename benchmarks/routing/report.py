"""Summaries of a replay (percentiles, throughput, CPU), markdown tables and the plot."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.routing.client import Result


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, round(q / 100 * len(v) + 0.5) - 1))
    return v[k]


def summarize(results: list[Result], scale: float, warmup: float = 0.1) -> dict[str, Any]:
    """Latency statistics in *simulated* seconds (wall x `scale`).

    The first `warmup` fraction of requests (by arrival) is left out of the latency
    percentiles (cold caches); throughput counts every request.
    """
    skip = int(len(results) * warmup)
    measured = [r for r in sorted(results, key=lambda r: r.at)[skip:]]
    ok = [r for r in measured if r.ok]
    ttft = [r.ttft * scale for r in ok if r.ttft is not None]
    lat = [r.latency * scale for r in ok if r.latency is not None]
    all_ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in all_ok)
    first = min((r.at for r in results), default=0.0)
    last = max((r.done_at for r in all_ok if r.done_at is not None), default=0.0)
    span = (last - first) * scale
    replicas: dict[str, int] = {}
    for r in all_ok:
        replicas[r.replica] = replicas.get(r.replica, 0) + 1
    return {
        "requests": len(results),
        "errors": len(results) - len(all_ok),
        "error_examples": sorted({r.error for r in results if not r.ok})[:3],
        "ttft_p50": percentile(ttft, 50), "ttft_p90": percentile(ttft, 90),
        "ttft_p99": percentile(ttft, 99),
        "e2e_p50": percentile(lat, 50), "e2e_p90": percentile(lat, 90),
        "output_tok_s": out_tokens / span if span > 0 else None,
        "client_lag_p99_ms": (percentile([r.lag for r in results], 99) or 0.0) * 1000,
        "per_replica": dict(sorted(replicas.items())),
    }


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


COLUMNS = [("ttft_p50", "TTFT p50 s"), ("ttft_p90", "TTFT p90 s"), ("ttft_p99", "TTFT p99 s"),
           ("e2e_p50", "e2e p50 s"), ("e2e_p90", "e2e p90 s"), ("output_tok_s", "out tok/s"),
           ("prefix_hit_rate", "prefix hit"), ("adapter_swaps", "adapter swaps"),
           ("errors", "errors")]


def markdown_table(points: list[dict[str, Any]]) -> str:
    """One row per (strategy, qps): medians over repeats."""
    head = "| strategy | QPS | " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "---|" * (len(COLUMNS) + 2)
    rows = [head, sep]
    for p in points:
        cells = [p["strategy"], _fmt(p["qps"])]
        for key, _ in COLUMNS:
            v = p.get(key)
            if key == "prefix_hit_rate" and v is not None:
                cells.append(f"{v:.0%}")
            else:
                cells.append(_fmt(v))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(points: list[dict[str, Any]], path: Path, title: str) -> None:
    """p90 TTFT and output throughput against QPS, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(p["strategy"] for p in points):
        ps = sorted((p for p in points if p["strategy"] == name), key=lambda p: p["qps"])
        xs = [p["qps"] for p in ps]
        a.plot(xs, [p.get("ttft_p90") for p in ps], marker="o", label=name)
        b.plot(xs, [p.get("output_tok_s") for p in ps], marker="o", label=name)
    a.set_yscale("log")
    a.set_xlabel("offered load (requests/s, simulated time)")
    a.set_ylabel("TTFT p90 (s)")
    a.grid(True, which="both", alpha=0.3)
    b.set_xlabel("offered load (requests/s, simulated time)")
    b.set_ylabel("output tokens/s")
    b.grid(True, alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def oracle_table(points: list[dict[str, Any]], oracle: str = "oracle") -> str:
    """Per load, every strategy's p90 TTFT and throughput as multiples of the oracle's
    (TTFT: lower is better, 1.0 = as good as the oracle; throughput: higher is better)."""
    ref = {p["qps"]: p for p in points if p["strategy"] == oracle}
    rows = ["| strategy | QPS | TTFT p90 s | x oracle | out tok/s | x oracle | hot group: pods (top share) |",
            "|---|---|---|---|---|---|---|"]
    for p in points:
        o = ref.get(p["qps"])
        if o is None:
            continue
        t = _ratio(p.get("ttft_p90"), o.get("ttft_p90"))
        x = _ratio(p.get("output_tok_s"), o.get("output_tok_s"))
        hot = "-"
        if p.get("hot_pods") is not None:
            hot = f"{_fmt(p['hot_pods'])} ({p['hot_top_share']:.0%})"
        rows.append(f"| {p['strategy']} | {_fmt(p['qps'])} | {_fmt(p.get('ttft_p90'))} | "
                    f"{_fmt(t, 2)} | {_fmt(p.get('output_tok_s'))} | {_fmt(x, 2)} | {hot} |")
    return "\n".join(rows)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def hot_group_spread(results: list[Result], groups: list[int], share: float = 0.1) -> dict[str, Any]:
    """How the hottest group (group 0) was served: pods that took >= `share` of its
    requests, and the busiest pod's share."""
    by_pod: dict[str, int] = {}
    for r in results:
        if r.ok and groups[r.index] == 0:
            by_pod[r.replica] = by_pod.get(r.replica, 0) + 1
    n = sum(by_pod.values())
    if not n:
        return {"hot_pods": None, "hot_top_share": None}
    return {"hot_pods": sum(1 for c in by_pod.values() if c >= share * n),
            "hot_top_share": max(by_pod.values()) / n}
