"""What placement alone can do for the stale-prefix shape's hit rate: a group-level model.

No engines and no EPP: requests are prompt groups (`stale_prefix_schedule`), a cache slot
holds one group. Prints, per seed, the share of requests that find their group cached

- in one fleet-wide cache of `--slots` groups, evicting least recently used (`lru`) or
  least often requested (`lfu`, online counts), or holding the `--slots` most popular
  groups from the start (`static`, an oracle), and with no size limit (`inf`);
- in `--pods` pods of `--slots / --pods` groups each, LRU inside a pod (what engines
  do), where a request no pod holds goes, among the pods whose backlog is within
  `--slack` misses of the least backlogged one, to the least backlogged pod (`load`),
  to the pod whose LRU group was used least recently (`place-lru`) or to the pod whose
  LRU group has the lowest decayed request count (`place-lfu`, what
  `evictionCostShare` approximates). A miss adds `--miss` s of backlog, a hit `--hit` s.

    .venv/bin/python benchmarks/routing/cache_bounds.py --qps 22 --slack 1 2 1000
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter, OrderedDict
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.routing.workload import StalePrefixShape, stale_prefix_schedule


def global_lru(groups: list[int], slots: int) -> float:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for g in groups:
        if g in cache:
            hits += 1
            cache.move_to_end(g)
        else:
            cache[g] = None
            if len(cache) > slots:
                cache.popitem(last=False)
    return hits / len(groups)


def global_lfu(groups: list[int], slots: int) -> float:
    cache: set[int] = set()
    count: Counter[int] = Counter()
    hits = 0
    for g in groups:
        count[g] += 1
        if g in cache:
            hits += 1
            continue
        if len(cache) >= slots:
            cache.remove(min(cache, key=lambda x: count[x]))
        cache.add(g)
    return hits / len(groups)


def static_top(groups: list[int], slots: int) -> float:
    """Groups are numbered by popularity rank (0 = most popular)."""
    seen: set[int] = set()
    hits = 0
    for g in groups:
        hits += g in seen and g < slots
        seen.add(g)
    return hits / len(groups)


def pods(times: list[float], groups: list[int], policy: str, n_pods: int, per_pod: int,
         slack: float, miss: float, hit: float, half_life: float = 60.0) -> float:
    cache: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(n_pods)]
    busy = [0.0] * n_pods
    count: dict[int, tuple[float, float]] = {}
    last: dict[int, float] = {}
    k = math.log(2) / half_life

    def rate(g: int, t: float) -> float:
        c, at = count.get(g, (0.0, t))
        return c * math.exp(-k * (t - at))

    def victim_cost(p: int, t: float) -> float:
        if len(cache[p]) < per_pod:
            return -1.0
        v = next(iter(cache[p]))
        return rate(v, t) if policy == "place-lfu" else last[v]

    hits = 0
    for t, g in zip(times, groups):
        backlog = [max(0.0, b - t) for b in busy]
        ok = [p for p in range(n_pods) if backlog[p] <= min(backlog) + slack * miss]
        holders = [p for p in ok if g in cache[p]]
        if holders:
            p = min(holders, key=lambda q: backlog[q])
        elif policy == "load":
            p = min(ok, key=lambda q: backlog[q])
        else:
            p = min(ok, key=lambda q: (victim_cost(q, t), backlog[q]))
        cached = g in cache[p]
        hits += cached
        cache[p][g] = None
        cache[p].move_to_end(g)
        if len(cache[p]) > per_pod:
            cache[p].popitem(last=False)
        busy[p] = max(busy[p], t) + (hit if cached else miss)
        count[g] = (rate(g, t) + 1.0, t)
        last[g] = t
    return hits / len(groups)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qps", type=float, default=22.0)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--pods", type=int, default=8)
    ap.add_argument("--slack", type=float, nargs="+", default=[1.0, 2.0, 1000.0])
    ap.add_argument("--miss", type=float, default=0.41, help="s of prefill for a miss")
    ap.add_argument("--hit", type=float, default=0.04, help="s for a hit")
    args = ap.parse_args(argv)
    for seed in range(1, args.seeds + 1):
        sched = stale_prefix_schedule(StalePrefixShape(), args.qps, args.requests, seed)
        gs = [r.group for r in sched]
        ts = [r.at for r in sched]
        line = (f"seed {seed}: lru {global_lru(gs, args.slots):.2f} "
                f"lfu {global_lfu(gs, args.slots):.2f} static {static_top(gs, args.slots):.2f} "
                f"inf {1 - len(set(gs)) / len(gs):.2f}")
        for slack in args.slack:
            line += f" | slack {slack:g}:" + "".join(
                f" {pol} {pods(ts, gs, pol, args.pods, args.slots // args.pods, slack, args.miss, args.hit):.2f}"
                for pol in ("load", "place-lru", "place-lfu"))
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
