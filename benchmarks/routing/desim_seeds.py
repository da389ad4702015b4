"""Per-seed p90 TTFT and prefix-hit rate of routing strategies on the virtual clock.

`desim.py` prints medians; this prints one line per seed, so that two versions of a
scorer (run on two trees) or two configs can be compared seed by seed:

    .venv/bin/python benchmarks/routing/desim_seeds.py --qps 22 --seeds 8 default precise
    .venv/bin/python benchmarks/routing/desim_seeds.py --qps 22 --replicas 2 @my-config.yaml

Strategies are names from `benchmarks/routing/stack.py` or `@path` of an
EndpointPickerConfig file; the shape is stale-prefix (600 requests a seed by default).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.bench_routing import MODEL, stale_fleet
from benchmarks.routing import desim
from benchmarks.routing.stack import STRATEGIES
from benchmarks.routing.workload import StalePrefixShape, stale_prefix_schedule


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("strategies", nargs="+")
    ap.add_argument("--qps", type=float, default=22.0)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--replicas", type=int, default=1)
    args = ap.parse_args(argv)
    configs = [Path(n[1:]).read_text() if n.startswith("@") else (STRATEGIES[n].config or "")
               for n in args.strategies]
    sims = stale_fleet(1.0)
    print("seed", *(f"{n} p90/hit" for n in args.strategies))
    for seed in range(1, args.seeds + 1):
        schedule = stale_prefix_schedule(StalePrefixShape(), args.qps, args.requests, seed, MODEL)
        row = []
        for cfg in configs:
            o = desim.run(sims, schedule, cfg, replicas=args.replicas)
            row.append(f"{o.ttft_p90:.3f}/{o.prefix_hit_rate:.2f}")
        print(seed, *row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
