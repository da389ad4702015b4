"""The routing benchmark's fleet on a virtual clock, in one process, without HTTP.

The simulator's engines (`epp.sim.engine.Engine`) are stepped by a discrete-event loop
instead of their asyncio tasks, the EPP's `Scheduler` (the real plugins, the real
in-flight tracker) picks from datastore snapshots refreshed every `scrape` simulated
seconds, and the oracle (oracle.py) reads the engines directly. Nothing waits on the
wall clock and the picker's tie-breaks are seeded, so a run is deterministic for a seed
and is not disturbed by other jobs on the machine: this is for comparing scoring choices quickly and repeatably. What it
leaves out against `bench_routing.py`: Envoy, the ext_proc protocol, real scrape jitter
and the EPP's own CPU time.

    .venv/bin/python benchmarks/routing/desim.py --shapes skewed-prefix --qps 64 80
    .venv/bin/python benchmarks/routing/desim.py --variant w4:prefix-cache-scorer.cacheHitQueueWorth=4
    .venv/bin/python benchmarks/routing/desim.py --shapes stale-prefix \
        --strategies round-robin default precise --replicas 2
    .venv/bin/python benchmarks/routing/desim.py --shapes shared-prefix --kv-events \
        --strategies default precise

For `stale-prefix` the pods tokenize (the tiny tokenizer) and their KV events go straight
into the precise scorer's index at the end of each step; `--replicas`, `--direct` and
`--restart-every` model what makes an approximate index stale in real deployments
(unsynced EPP replicas, clients that bypass the EPP, pod restarts).

Prints one markdown table row per (shape, strategy, load): medians over the seeds, and
p90 TTFT as a multiple of the oracle's.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.routing.oracle import DEFAULT_OBJECTIVE, best
from benchmarks.routing.report import percentile
from benchmarks.routing.workload import SHAPES, LoraShape, Request, schedule_for
from epp.config import DEFAULT_CONFIG_TEXT, load_config
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.scheduling import Scheduler, SchedulingRequest
from epp.scheduling.inflight import InFlightTracker
from epp.scheduling.precise_prefix import PrecisePrefixCacheScorer
from epp.sim.config import SimConfig
from epp.sim.engine import Engine, Sequence
from epp.sim.tokens import ids_prompt, text_prompt
from epp.tokenization import ModelTokenizer


@dataclass
class Outcome:
    ttft_p50: float | None
    ttft_p90: float | None
    output_tok_s: float
    prefix_hit_rate: float
    adapter_swaps: int
    hot_pods: int
    hot_top_share: float


def run(sims: list[SimConfig], schedule: list[Request], router: str,
        scrape: float = 0.05, warmup: float = 0.1, direct: float = 0.0,
        restart_every: float = 0.0, replicas: int = 1, own_scrapes: bool = False) -> Outcome:
    """Replay `schedule`; `router` is an EndpointPickerConfig text ("" for the EPP's
    default), "round-robin", or "oracle" / "oracle:<objective>".

    Pods with a `tokenizer` tokenize prompts with it (as `epp-sim` does), and their KV
    events go straight into any `precise-prefix-cache-scorer`'s index at the end of each
    step (what its subscriber does over ZeroMQ, minus the transport's delay). `direct`:
    the share of requests (chosen by a seeded draw) that another client sends straight to
    the pods, round-robin, without the EPP; TTFT and hit rate are then over the EPP's
    requests only. `restart_every`: every that many simulated seconds one pod (in turn)
    restarts: its KV cache is cleared (AllBlocksCleared), its queue kept. `replicas`: EPP
    replicas without state sync, each with its own indexes and in-flight tracker, taking
    the requests in turn (as Envoy spreads them over the EPP's pods). `own_scrapes`: each
    replica scrapes the pods itself, the replicas' scrapes spread evenly over the
    interval (as separate EPP processes do), instead of all reading one datastore."""
    engines = [Engine(replace(c, time_scale=1.0)) for c in sims]
    toks = [ModelTokenizer(c.model, c.tokenizer) if c.tokenizer else None for c in sims]
    adapters = [dict(c.lora_modules) for c in sims]
    names = [c.name for c in sims]
    own = own_scrapes and replicas > 1
    dss = [Datastore(staleness_threshold=2.0) for _ in range(replicas if own else 1)]
    for ds in dss:
        ds.set_endpoints([Endpoint(n, f"10.9.0.{i + 1}", 8000) for i, n in enumerate(names)])
    oracle = (router.partition(":")[2] or DEFAULT_OBJECTIVE) if router.startswith("oracle") else None
    rr = router == "round-robin"
    scheds: list[Scheduler] = []
    if not (oracle or rr):
        # A seeded picker: equal totals are broken the same way in every run.
        text = (router or DEFAULT_CONFIG_TEXT).replace(
            "- type: max-score-picker\n", "- type: max-score-picker\n  parameters: {seed: 1}\n")
        scheds = [Scheduler.from_config(load_config(text), inflight=InFlightTracker())
                  for _ in range(max(1, replicas))]
    precise = [p for sched in scheds for p in _precise_scorers(sched)]
    if precise:
        for e in engines:
            e.kv.events = []
    rng = random.Random(7)
    unrouted = {i for i in range(len(schedule)) if rng.random() < direct}
    direct_rr = itertools.count()
    seq_rid: dict[int, str] = {}
    busy_until = [float("inf")] * len(engines)
    plans: list[Any] = [None] * len(engines)
    events: list[tuple[float, int, str, int]] = []
    tie = itertools.count()
    for i, r in enumerate(schedule):
        heapq.heappush(events, (r.at, next(tie), "arrive", i))
    for r in range(len(dss)):
        heapq.heappush(events, (r * scrape / len(dss), next(tie), "scrape", r))
    if restart_every > 0:
        heapq.heappush(events, (restart_every, next(tie), "restart", 0))
    seqs: list[Sequence | None] = [None] * len(schedule)
    served_by = [-1] * len(schedule)
    pending = len(schedule)

    def kick(k: int, now: float) -> None:
        if plans[k] is not None:
            return
        e = engines[k]
        plan = e._schedule(now)
        if plan is None:
            return
        work, duration = plan
        plans[k] = work
        busy_until[k] = now + duration
        heapq.heappush(events, (now + duration, next(tie), "step", k))

    def scrape_all(now: float, r: int) -> None:
        ds = dss[r]
        for k, e in enumerate(engines):
            cfg = e.cfg
            ds.update_metrics(names[k], EndpointMetrics(
                waiting=float(len(e.waiting)), running=float(len(e.running)),
                kv_usage=e.kv.usage, active_adapters=frozenset(e.running_adapters()),
                waiting_adapters=frozenset(e.waiting_adapters()),
                max_lora=cfg.max_loras if cfg.lora_enabled else 0,
                block_size=cfg.block_size, num_gpu_blocks=cfg.num_gpu_blocks,
                scraped_at=now, models=frozenset({cfg.model})))

    while events and pending:
        now, _, kind, x = heapq.heappop(events)
        if kind == "scrape":
            scrape_all(now, x)
            heapq.heappush(events, (now + scrape, next(tie), "scrape", x))
        elif kind == "restart":
            engines[x].kv.reset_prefix_cache()
            _deliver(precise, names[x], engines[x])
            heapq.heappush(events, (now + restart_every, next(tie), "restart",
                                    (x + 1) % len(engines)))
        elif kind == "arrive":
            r = schedule[x]
            if x in unrouted:
                k = next(direct_rr) % len(engines)
            elif rr:
                k = x % len(engines)
            elif not scheds:
                k = best(engines, r.prompt, r.model, r.max_tokens, adapters, oracle or DEFAULT_OBJECTIVE)
            else:
                sched = scheds[x % len(scheds)]
                res = sched.schedule(SchedulingRequest(f"r{x}", r.model, r.prompt,
                                                       api="completions", body=r.body(False)),
                                     dss[x % len(scheds) if own else 0].snapshot(), now=now)
                k = res.index
                sched.inflight.started(f"r{x}", res.endpoint.name, now)  # as the director does
            e = engines[k]
            adapter = r.model if r.model in adapters[k] else None
            tok = toks[k]
            salt = adapter or ""
            prompt = (ids_prompt(tok.encode(r.prompt, True), e.cfg.block_size, salt)
                      if tok is not None else text_prompt(r.prompt, e.cfg.block_size, salt))
            seq = Sequence(request_id=f"r{x}", prompt=prompt,
                           max_tokens=r.max_tokens, adapter=adapter)
            seq.arrival = now
            e.waiting.append(seq)
            seqs[x] = seq
            served_by[x] = k
            seq_rid[id(seq)] = f"r{x}"
            kick(k, now)
        else:  # a step ended
            k = x
            e = engines[k]
            work = plans[k]
            plans[k] = None
            e.clock = now
            e._complete(work, now)
            _deliver(precise, names[k], e)
            for seq, _n in work:
                if seq.finished and scheds:
                    rid = seq_rid.pop(id(seq), None)
                    if rid is not None:
                        scheds[int(rid[1:]) % len(scheds)].inflight.finished(rid)
                        pending -= 1
                elif seq.finished:
                    if seq_rid.pop(id(seq), None) is not None:
                        pending -= 1
            kick(k, now)
    skip = int(len(schedule) * warmup)
    done = [s for i, s in enumerate(seqs) if i >= skip and i not in unrouted
            and s is not None and s.first_token_at is not None]
    ttft = [s.first_token_at - s.arrival for s in done]  # type: ignore[operator]
    all_done = [s for s in seqs if s is not None and s.finished_at is not None]
    span = max(s.finished_at for s in all_done) - schedule[0].at  # type: ignore[type-var]
    mine = [s for i, s in enumerate(seqs) if i not in unrouted and s is not None]
    q = sum(s.prompt.num_tokens for s in mine)
    h = sum(s.cached_tokens for s in mine)
    hot = [served_by[i] for i, r in enumerate(schedule) if r.group == 0]
    by_pod = {k: hot.count(k) for k in set(hot)}
    return Outcome(
        ttft_p50=percentile(ttft, 50), ttft_p90=percentile(ttft, 90),
        output_tok_s=sum(s.generated for s in all_done) / span,
        prefix_hit_rate=h / q if q else 0.0,
        adapter_swaps=sum(e.stats.lora_loads for e in engines),
        hot_pods=sum(1 for c in by_pod.values() if c >= 0.1 * len(hot)) if hot else 0,
        hot_top_share=max(by_pod.values()) / len(hot) if hot else 0.0)


def _precise_scorers(sched: Scheduler) -> list[Any]:
    """The scheduler's precise prefix scorers, told that every endpoint's stream is live."""
    found = [p for prof in sched.profiles.values() for p in prof.plugins()
             if isinstance(p, PrecisePrefixCacheScorer)]
    for p in found:
        p.subscriber.healthy = lambda name: True  # type: ignore[method-assign]
    return found


def _deliver(precise: list[Any], name: str, engine: Engine) -> None:
    """An engine's pending KV events into every precise scorer's index."""
    if not precise:
        return
    events = engine.kv.take_events()
    for p in precise:
        if p.index.apply(name, events).stored:
            p.blocks_stored(name)


def variant(assigns: str) -> str:
    """The default EndpointPickerConfig with `type.param=value,...` set."""
    params: dict[str, list[str]] = {}
    for a in assigns.split(","):
        key, _, value = a.partition("=")
        plugin_type, _, param = key.partition(".")
        params.setdefault(plugin_type, []).append(f"{param}: {value}")
    text = DEFAULT_CONFIG_TEXT
    for plugin_type, kv in params.items():
        line = f"- type: {plugin_type}\n"
        if line not in text:
            raise SystemExit(f"no plugin of type {plugin_type!r} in the default profile")
        text = text.replace(line, line + "  parameters: {" + ", ".join(kv) + "}\n")
    return text


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench_routing import MODEL, fleet, stale_fleet
    from benchmarks.routing.workload import StalePrefixShape, stale_prefix_schedule
    from benchmarks.routing.stack import STRATEGIES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", choices=[*SHAPES, "stale-prefix"],
                    default=list(SHAPES))
    ap.add_argument("--direct", type=float, default=0.0,
                    help="share of requests sent straight to the pods, round-robin, "
                         "without the EPP (reported figures are the EPP's requests)")
    ap.add_argument("--restart-every", type=float, default=0.0,
                    help="simulated seconds between pod restarts (cache cleared), 0: none")
    ap.add_argument("--replicas", type=int, default=1,
                    help="EPP replicas without state sync, taking requests in turn")
    ap.add_argument("--kv-events", action="store_true",
                    help="the other shapes' pods tokenize and publish KV events too, so that "
                         "the precise strategy can run on them (stale-prefix's always do)")
    ap.add_argument("--own-scrapes", action="store_true",
                    help="with --replicas: each replica scrapes the pods itself, at "
                         "staggered times (closer to separate EPP processes)")
    ap.add_argument("--stale", action="append", default=[],
                    help="FIELD=VALUE: a StalePrefixShape field for the stale-prefix shape")
    ap.add_argument("--qps", type=float, nargs="+",
                    help="loads (default: 16 48 64 shared, 16 64 80 skewed, 16 24 LoRA)")
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--strategies", nargs="+",
                    default=["oracle", "default", "default-upstream", "round-robin"])
    ap.add_argument("--config", action="append", default=[],
                    help="NAME=PATH: an EndpointPickerConfig file as an extra strategy")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:TYPE.PARAM=VALUE[,TYPE.PARAM=VALUE...]: the default profile "
                         "with these plugin parameters, e.g. q16:queue-scorer.scale=16")
    args = ap.parse_args(argv)
    routers: dict[str, str] = {}
    for name in args.strategies:
        if name.startswith("oracle") or name == "round-robin":
            routers[name] = name
        else:
            routers[name] = STRATEGIES[name].config or ""
    for spec in args.config:
        name, path = spec.split("=", 1)
        with open(path) as f:
            routers[name] = f.read()
    for spec in args.variant:
        name, _, assigns = spec.partition(":")
        routers[name] = variant(assigns)
    default_qps = {"shared-prefix": [16, 48, 64], "skewed-prefix": [16, 64, 80],
                   "lora": [16, 24], "stale-prefix": [10, 22]}
    stale = StalePrefixShape(**{k: type(getattr(StalePrefixShape(), k))(v) for k, v in
                                (a.split("=", 1) for a in args.stale)})
    print("| shape | strategy | QPS | TTFT p50 s | TTFT p90 s | x oracle | out tok/s | "
          "prefix hit | adapter swaps | hot group: pods (top share) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape_name in args.shapes:
        lora = LoraShape() if shape_name == "lora" else None
        sims = (stale_fleet(1.0) if shape_name == "stale-prefix"
                else fleet(1.0, lora=lora, kv_events=args.kv_events))
        for qps in args.qps or default_qps[shape_name]:
            ref = None
            for name, router in routers.items():
                outs = []
                for seed in range(1, args.seeds + 1):
                    if shape_name == "stale-prefix":
                        sched = stale_prefix_schedule(stale, qps, args.requests, seed, MODEL)
                    else:
                        sched = schedule_for(shape_name, qps, args.requests, seed, MODEL)
                    outs.append(run(sims, sched, router, direct=args.direct,
                                    restart_every=args.restart_every,
                                    replicas=args.replicas,
                                    own_scrapes=args.own_scrapes))
                p90 = statistics.median(o.ttft_p90 or 0 for o in outs)
                if name == "oracle":
                    ref = p90
                med = lambda f: statistics.median(getattr(o, f) for o in outs)  # noqa: E731
                rel = f"{p90 / ref:.2f}" if ref else "-"
                print(f"| {shape_name} | {name} | {qps:g} | {med('ttft_p50'):.3f} | "
                      f"{p90:.3f} | {rel} | {med('output_tok_s'):.0f} | "
                      f"{med('prefix_hit_rate'):.0%} | {med('adapter_swaps'):.0f} | "
                      f"{med('hot_pods'):.0f} ({med('hot_top_share'):.0%}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
