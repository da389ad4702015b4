"""Cost of reading one realistic ~45 KB vLLM /metrics page: targeted extractor vs prometheus_client.

Run: .venv/bin/python benchmarks/bench_promtext.py [--seconds 3]

Reports medians over repeated timing rounds, all measured in this one run:
- `engine.parse`: what the scraper does per poll (extract the six vLLM series, validate,
  build EndpointMetrics);
- `Extractor.scan`: the extraction alone;
- `bytes.decode`: turning the HTTP body into text;
- `prometheus_client`: `text_string_to_metric_families` over the whole page (the baseline).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from epp.datalayer.engines import BUILTIN_ENGINES

PAGE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "metrics" / "vllm-bench-45k-loaded.txt"


def per_call_us(fn, budget: float) -> float:
    """Median µs per call over rounds of ~budget/15 seconds each."""
    # size a round
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt > budget / 15 or n > 1_000_000:
            break
        n *= 2
    rounds = []
    end = time.perf_counter() + budget
    while time.perf_counter() < end or len(rounds) < 5:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(rounds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0, help="timing budget per case")
    args = ap.parse_args()
    body = PAGE.read_bytes()
    text = body.decode()
    engine = BUILTIN_ENGINES["vllm"]
    ex = engine._extractor  # noqa: SLF001 - the benchmark looks inside on purpose

    m = engine.parse(text, 0.0)
    assert (m.waiting, m.running, m.kv_usage) == (3.0, 12.0, 0.4375), m

    cases = {
        "engine.parse (per poll)": lambda: engine.parse(text, 0.0),
        "Extractor.scan": lambda: ex.scan(text),
        "bytes.decode": lambda: body.decode("utf-8", "replace"),
        "prometheus_client (baseline)": lambda: list(text_string_to_metric_families(text)),
    }
    results = {name: per_call_us(fn, args.seconds) for name, fn in cases.items()}
    base = results["prometheus_client (baseline)"]
    print(f"page: {PAGE.name}, {len(body)} bytes; python {platform.python_version()}, "
          f"{platform.machine()}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'case':32s} {'median µs/page':>15s} {'speed-up vs baseline':>22s}")
    for name, us in results.items():
        print(f"{name:32s} {us:15.1f} {base / us:21.1f}x")


if __name__ == "__main__":
    main()
