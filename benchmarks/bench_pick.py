"""Pick latency of the scheduler vs a plain-Python implementation of the same scorers.

Run: .venv/bin/python benchmarks/bench_pick.py [--quick] [--sizes 8 64 512 4096]

Setup, the same for both implementations and measured in one run: the default profile
(queue 2, kv-cache 2, prefix-cache 3, lora-affinity 1, max-score picker); pools of N
endpoints with random scraped metrics; 4 KB prompts made of one of 16 shared 2 KB "system
prompts" plus a unique 2 KB tail (so the prefix index sees partial hits and records new
blocks on every pick); 64 requests kept open (in-flight accounting has work to do).

Reported per pool size: p50/p99 of one `Scheduler.schedule()` call on an unchanged
snapshot (the common case between scrapes) and on a new snapshot every pick (every cache
keyed by snapshot misses), the plain-Python baseline's p50/p99, and the cost of the
Prometheus timing. Also: prefix hashing in µs per KB, and the in-flight accounting effect on
a burst between two scrapes.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import re
import statistics
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from epp.config import load_config  # noqa: E402
from epp.datastore import Datastore, Endpoint, EndpointMetrics, Snapshot  # noqa: E402
from epp.scheduling import InFlightTracker, Scheduler, SchedulingRequest  # noqa: E402
from epp.scheduling.prefix import block_hashes, prompt_bytes  # noqa: E402

OPEN_REQUESTS = 64
ROUNDS = 5
WORDS = "the of and to in is you that it he was for on are as with his they at be this".split()


def text(rng: random.Random, n: int) -> str:
    out: list[str] = []
    size = 0
    while size < n:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n]


def make_pool(n: int, rng: random.Random, now: float) -> Datastore:
    ds = Datastore(staleness_threshold=1e9)  # metrics never go stale during the run
    ds.set_endpoints([Endpoint(f"pod-{i}", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 8000)
                      for i in range(n)])
    for i in range(n):
        ds.update_metrics(f"pod-{i}", random_metrics(rng, now))
    return ds


def random_metrics(rng: random.Random, now: float) -> EndpointMetrics:
    active = frozenset(rng.sample(["sql", "chat", "code", "math"], rng.randint(0, 2)))
    return EndpointMetrics(
        waiting=rng.randint(0, 20), running=rng.randint(0, 30), kv_usage=rng.random(),
        active_adapters=active, max_lora=4, block_size=16, num_gpu_blocks=20_000,
        scraped_at=now,
    )


def make_prompts(rng: random.Random, count: int) -> list[str]:
    systems = [text(rng, 2048) for _ in range(16)]
    return [systems[i % 16] + text(rng, 2048) for i in range(count)]


def percentiles(ts: list[float]) -> tuple[float, float]:
    ts = sorted(ts)
    return ts[len(ts) // 2] * 1e6, ts[min(len(ts) - 1, int(len(ts) * 0.99))] * 1e6


# -- the numpy scheduler -------------------------------------------------------------


def bench_scheduler(n: int, iters: int, *, churn: bool, metrics: bool, seed: int = 1) -> tuple[float, float]:
    rng = random.Random(seed)
    now = time.monotonic()
    ds = make_pool(n, rng, now)
    kw = {} if metrics else {"plugin_metrics_every": 10**9}
    inflight = InFlightTracker()
    sched = Scheduler.from_config(load_config(None), inflight=inflight, **kw)
    prompts = make_prompts(rng, iters + 200)
    # A few distinct snapshot objects to rotate through (each a cache miss), built up front
    # so that the datastore's own rebuild is not measured here.
    snaps: list[Snapshot] = [ds.snapshot()]
    if churn:
        for k in range(7):
            # A scrape changes the numbers; the adapters stay (as they mostly do).
            name = f"pod-{k % n}"
            old = ds.metrics(name)
            ds.update_metrics(name, replace(old, waiting=rng.randint(0, 20),
                                            kv_usage=rng.random(), scraped_at=now))
            snaps.append(ds.snapshot())
    ts: list[float] = []
    gc.collect()
    for k in range(iters + 200):
        snap = snaps[k % len(snaps)] if churn else snaps[0]
        req = SchedulingRequest(f"r{k}", "chat", prompts[k])
        t0 = time.perf_counter()
        picked = sched.schedule(req, snap, now=now + 0.001 * k).endpoint.name
        inflight.started(req.request_id, picked, now + 0.001 * k)  # as the director does
        dt = time.perf_counter() - t0
        if k >= 200:
            ts.append(dt)
        if k >= OPEN_REQUESTS:
            inflight.finished(f"r{k - OPEN_REQUESTS}")
    return percentiles(ts)


# -- the plain-Python baseline -------------------------------------------------------


@dataclass
class PlainPod:
    name: str
    m: EndpointMetrics


class PlainScheduler:
    """The same scorers, weights and picker written as straightforward per-endpoint loops,
    with the upstream-style prefix index (hash -> set of pods, OrderedDict LRU per pod)."""

    def __init__(self, staleness: float = 1e9) -> None:
        self.index: dict[int, set[str]] = {}
        self.lru: dict[str, OrderedDict[int, None]] = {}
        self.inflight: dict[str, tuple[str, float]] = {}
        self.staleness = staleness
        self.rng = random.Random(0)

    def schedule(self, rid: str, model: str, prompt: str, pods: list[PlainPod], now: float) -> PlainPod:
        extra: dict[str, int] = {}
        for name, started in self.inflight.values():
            extra[name] = extra.get(name, 0) + 1
        fresh = [not (now - p.m.scraped_at > self.staleness) for p in pods]
        waiting = [p.m.waiting + extra.get(p.name, 0) for p in pods]
        good = [w for w, f in zip(waiting, fresh) if f]
        lo, hi = min(good), max(good)
        queue = [(1.0 if hi == lo else (hi - w) / (hi - lo)) if f else 0.0
                 for w, f in zip(waiting, fresh)]
        kv = [max(0.0, 1.0 - p.m.kv_usage) if f else 0.0 for p, f in zip(pods, fresh)]
        lora = []
        for p, f in zip(pods, fresh):
            a, w = p.m.active_adapters, p.m.waiting_adapters
            if not f:
                lora.append(0.0)
            elif model in a:
                lora.append(1.0)
            elif len(a) + len(w) < p.m.max_lora:
                lora.append(0.8)
            elif model in w:
                lora.append(0.6)
            else:
                lora.append(0.0)
        hashes = block_hashes(model, prompt_bytes(prompt), 64, 256)
        counts: dict[str, int] = {}
        for h in hashes:
            servers = self.index.get(h)
            if not servers:
                break
            for s in servers:
                counts[s] = counts.get(s, 0) + 1
        total_blocks = len(hashes) or 1
        best, best_score = [], -1.0
        for i, p in enumerate(pods):
            score = 2 * queue[i] + 2 * kv[i] + 3 * counts.get(p.name, 0) / total_blocks + lora[i]
            if score > best_score + 1e-9:
                best, best_score = [p], score
            elif score >= best_score - 1e-9:
                best.append(p)
        chosen = best[self.rng.randrange(len(best))]
        lru = self.lru.setdefault(chosen.name, OrderedDict())
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                self.index.setdefault(h, set()).add(chosen.name)
        while len(lru) > chosen.m.num_gpu_blocks:
            old, _ = lru.popitem(last=False)
            self.index[old].discard(chosen.name)
        self.inflight[rid] = (chosen.name, now)
        return chosen


def bench_plain(n: int, iters: int, seed: int = 1) -> tuple[float, float]:
    rng = random.Random(seed)
    now = time.monotonic()
    ds = make_pool(n, rng, now)
    pods = [PlainPod(e.name, ds.metrics(e.name)) for e in ds.endpoints()]  # type: ignore[arg-type]
    sched = PlainScheduler()
    prompts = make_prompts(rng, iters + 200)
    ts: list[float] = []
    gc.collect()
    for k in range(iters + 200):
        t0 = time.perf_counter()
        sched.schedule(f"r{k}", "chat", prompts[k], pods, now + 0.001 * k)
        dt = time.perf_counter() - t0
        if k >= 200:
            ts.append(dt)
        if k >= OPEN_REQUESTS:
            sched.inflight.pop(f"r{k - OPEN_REQUESTS}", None)
    return percentiles(ts)


# -- hashing and in-flight effect -----------------------------------------------------


def hashing_us_per_kb(kb: int) -> float:
    data = prompt_bytes(text(random.Random(kb), kb * 1024))
    rounds = []
    for _ in range(7):
        reps = max(50, 4000 // kb)
        t0 = time.perf_counter()
        for _ in range(reps):
            block_hashes("chat", data, 64, 10**9)
        rounds.append((time.perf_counter() - t0) / reps / kb * 1e6)
    return statistics.median(rounds)


def burst_spread(track: bool, shared_prefix: bool, endpoints: int = 16, burst: int = 64) -> tuple[int, float]:
    """Max and stdev of requests per endpoint for a burst routed between two scrapes."""
    rng = random.Random(5)
    now = time.monotonic()
    ds = Datastore(staleness_threshold=1e9)
    ds.set_endpoints([Endpoint(f"pod-{i}", f"10.0.0.{i}", 8000) for i in range(endpoints)])
    for i in range(endpoints):
        ds.update_metrics(f"pod-{i}", EndpointMetrics(waiting=0, running=2, kv_usage=0.3,
                                                      scraped_at=now - 0.01))
    inflight = InFlightTracker() if track else None
    sched = Scheduler.from_config(load_config(None), inflight=inflight)
    systems = [text(rng, 2048) for _ in range(8)]
    snap = ds.snapshot()
    counts: dict[str, int] = {}
    for k in range(burst):
        prompt = (systems[k % 8] if shared_prefix else "") + text(rng, 512)
        name = sched.schedule(SchedulingRequest(f"b{k}", "chat", prompt), snap, now=now).endpoint.name
        if inflight is not None:
            inflight.started(f"b{k}", name, now)
        counts[name] = counts.get(name, 0) + 1
    per = [counts.get(f"pod-{i}", 0) for i in range(endpoints)]
    return max(per), statistics.pstdev(per)


READING = """\
Reading: the numpy scheduler's cost is nearly flat in the pool size, a fixed ~40 µs of
which about half is the 4 KB prompt's prefix work (hashing 64 blocks ~6 µs, matching, and
learning: recording the new blocks on the chosen endpoint, refreshing the ones it held and
evicting at capacity, ~15-20 µs in steady state), about 5 µs in-flight accounting and the
rest the numpy calls of four scorers and the picker. The plain-Python loops grow linearly
with the pool: they win below ~64 endpoints by up to ~15 µs (numpy's fixed cost per call),
break even at 64 and lose 5x at 512 and 30x at 4,096. There is no separate small-pool path:
the gap is a few µs, within target, and a second implementation of every plugin would be
a second thing to keep correct. "New snapshot each pick" is the worst case where every
per-snapshot cache misses (with thousands of endpoints a scrape lands between almost every
two picks); the LoRA table is carried over from the previous snapshot when the adapters
did not change (a C-level tuple compare). Prometheus timing (cycle + 5 plugin histograms)
costs ~5 µs per pick; `Scheduler(plugin_metrics_every=N)` samples plugin timings if that
ever matters. p99 on this shared 2-core machine is dominated by preemption by other jobs.
The burst table is the in-flight accounting effect: with distinct prompts a burst between
two scrapes spreads evenly (4 per endpoint) instead of following blind tie-breaks; with
shared prefixes each prefix group stays on one endpoint (prefix weight 3 > queue weight 2,
as upstream) and in-flight accounting keeps different groups apart (without it, whether
groups collide is down to tie-breaks).

Since issue 13 the default prefix-cache scorer is load-aware (a load discount and a home
pod per prompt group, docs/scoring.md). That costs the pick: in an interleaved A/B on this
machine (2026-12-02, load average ~1) the 64-endpoint p50 was ~62 µs for the code before
it and ~86-100 µs after, and in one process the default profile costs ~30 µs more than the
same profile with upstream's formulas (`epp.scheduling.upstream`), partly because hot
groups now spread over more pods, so matching walks more holders per prompt. The 50 µs
target at 64 endpoints is therefore not met any more; bringing the pick back under it is
part of the request-path work (issue 18, part 1)."""


# -- main -----------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--sizes", type=int, nargs="*", default=[8, 64, 512, 4096])
    ap.add_argument("--results", type=Path, help="rewrite the '## Scheduler' section of this file")
    args = ap.parse_args()
    iters = 1000 if args.quick else 4000

    lines: list[str] = []
    out = lines.append
    p50s: dict[int, float] = {}
    churn50s: dict[int, float] = {}
    hash_kb: dict[int, float] = {}
    out("| endpoints | numpy p50 µs | numpy p99 µs | new snapshot each pick p50 / p99 µs "
        "| no Prometheus timing p50 µs | plain Python p50 µs | plain Python p99 µs | speed-up (p50) |")
    out("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        it = (iters if n <= 512 else iters // 2) // ROUNDS
        # Interleaved rounds, medians of the per-round percentiles: a burst of load from
        # other jobs on this shared machine then spoils one round, not a whole column.
        rounds: list[list[tuple[float, float]]] = [[], [], [], []]
        for seed in range(ROUNDS):
            rounds[0].append(bench_scheduler(n, it, churn=False, metrics=True, seed=seed))
            rounds[1].append(bench_scheduler(n, it, churn=True, metrics=True, seed=seed))
            rounds[2].append(bench_scheduler(n, it, churn=False, metrics=False, seed=seed))
            rounds[3].append(bench_plain(n, it if n <= 512 else it // 2, seed=seed))
        (p50, p99), (c50, c99), (m50, _), (b50, b99) = (
            (statistics.median(x[0] for x in r), statistics.median(x[1] for x in r)) for r in rounds
        )
        p50s[n], churn50s[n] = p50, c50
        out(f"| {n} | {p50:.1f} | {p99:.1f} | {c50:.1f} / {c99:.1f} | {m50:.1f} | {b50:.1f} | "
            f"{b99:.1f} | {b50 / p50:.1f}x |")
        print(lines[-1], flush=True)
    out("")
    out("| prompt | prefix hashing µs per KB |")
    out("|---|---|")
    for kb in (1, 4, 16):
        hash_kb[kb] = hashing_us_per_kb(kb)
        out(f"| {kb} KB | {hash_kb[kb]:.2f} |")
    out("")
    out("| burst of 64 requests between two scrapes, 16 idle endpoints | in-flight accounting "
        "| max per endpoint | stdev per endpoint |")
    out("|---|---|---|---|")
    for shared in (False, True):
        for track in (True, False):
            mx, sd = burst_spread(track, shared)
            label = "8 shared 2 KB prefixes + 512 B tails" if shared else "distinct 512 B prompts"
            out(f"| {label} | {'on' if track else 'off'} | {mx} | {sd:.2f} |")
    out("")
    out("Targets (issue #4), p50 on the unchanged / new-snapshot columns:")
    for n, target in ((64, 50.0), (4096, 1000.0)):
        if n in p50s:
            ok = "met" if max(p50s[n], churn50s[n]) <= target else (
                "met on an unchanged snapshot only" if p50s[n] <= target else "NOT met")
            out(f"- {n} endpoints: {p50s[n]:.1f} / {churn50s[n]:.1f} µs, target <= {target:.0f} µs: {ok}")
    ok = "met" if hash_kb[4] <= 20 else "NOT met"
    out(f"- prefix hashing: {hash_kb[4]:.2f} µs per KB (4 KB prompt), target <= 20: {ok}")
    out("")
    out(READING)
    report = "\n".join(lines)
    print()
    print(report)
    if args.results:
        write_section(args.results, report, iters)


def write_section(path: Path, report: str, iters: int) -> None:
    load = os.getloadavg()[0]
    body = (
        "## Scheduler\n\n"
        f"Command: `.venv/bin/python benchmarks/bench_pick.py --results benchmarks/RESULTS.md` "
        f"({iters} picks per size in {ROUNDS} interleaved rounds of {iters // ROUNDS}, each after 200 "
        f"warm-up picks; half for 4,096 endpoints; medians of the rounds' percentiles).\n"
        f"Machine: {os.cpu_count()}-core {platform.machine()} VM shared with other jobs "
        f"(load average {load:.1f} at the end of the run), Python {platform.python_version()}, "
        f"numpy {np.__version__}. Run {time.strftime('%Y-%m-%d')}.\n\n"
        + report + "\n"
    )
    text_ = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(r"^## Scheduler\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text_):
        text_ = pattern.sub(lambda _: body + "\n", text_, count=1)
    else:
        text_ = text_.rstrip("\n") + "\n\n" + body
    path.write_text(text_)


if __name__ == "__main__":
    main()
