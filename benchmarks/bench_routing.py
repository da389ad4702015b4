"""Routing quality: the EPP's profiles against round-robin, random and an oracle, on a simulated fleet.

For each strategy and offered load, a fresh stack is started (8 simulated vLLM pods, the
EPP when the strategy uses it, Envoy in front), a Poisson schedule of requests is
replayed through Envoy with streaming responses, and TTFT / latency / throughput are
measured by the client; prefix-cache hit rate comes from the pods' /metrics, adapter
swaps from the simulator's engine counters. The `oracle` strategy (routing/oracle.py)
reads every pod's true cache and queue inside the simulator's process and is the
yardstick: every strategy's p90 TTFT and throughput are also reported as multiples of
it. Times are in *simulated* seconds: the
simulator runs `--time-scale` x faster than the wall clock and the client's wall
timings are multiplied back.

    .venv/bin/python benchmarks/bench_routing.py --quick          # CI: ~1 min
    .venv/bin/python benchmarks/bench_routing.py                  # the report's sweep

Shapes: `shared-prefix` (32 groups, uniform), `skewed-prefix` (the same groups with Zipf
popularity, s = 2: the hottest group needs more than one pod), `lora` (multi-LoRA),
`stale-prefix` (issue 14).

Results: JSON in benchmarks/results/routing-<time>.json, PNG plots next to it, markdown
tables on stdout (copy them into benchmarks/RESULTS.md, "## Routing quality").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.routing.client import replay
from benchmarks.routing.report import (
    hot_group_spread,
    markdown_table,
    median_of,
    oracle_table,
    plot,
    summarize,
)
from benchmarks.routing.stack import STRATEGIES, Stack, ensure_tokenizer, machine_busy
from benchmarks.routing.workload import (
    SHAPES,
    SKEWED_PREFIX,
    LoraShape,
    Request,
    SharedPrefixShape,
    StalePrefixShape,
    schedule_for,
    stale_prefix_schedule,
)
from epp.sim.config import SimConfig

MODEL = "meta-llama/Llama-3.1-8B-Instruct"

# One 8B model on a 24 GB-class GPU (L4 / A10G): ~6 GB left for KV = 2,048 blocks of 16
# tokens (32k tokens), prefill ~5k tokens/s, a decode step of ~25 ms plus per-sequence
# and per-context-token costs. Small enough that a fleet-wide prefix working set does
# not fit one pod but does fit when split across the 8.
GPU = SimConfig(
    model=MODEL, port=0, num_gpu_blocks=2048, block_size=16, max_num_seqs=128,
    max_num_batched_tokens=2048, max_model_len=8192, step_time=0.025,
    prefill_time_per_token=0.0002, decode_time_per_seq=0.0003,
    decode_time_per_kv_token=2e-7, max_waiting=100_000)


def fleet(time_scale: float, replicas: int = 8, lora: LoraShape | None = None,
          max_loras: int = 2, kv_events: bool = False) -> list[SimConfig]:
    """`kv_events`: the pods tokenize (the tiny tokenizer) and publish KV events, for
    the precise scorer (every strategy of the sweep then runs on that same fleet)."""
    base = replace(GPU, time_scale=time_scale)
    if kv_events:
        base = replace(base, tokenizer=str(ensure_tokenizer()), kv_events_port=0,
                       kv_events_replay_port=0)
    if lora is not None:
        base = replace(base, lora_modules={a: f"/adapters/{a}" for a in lora.adapters},
                       max_loras=max_loras, lora_load_time=0.1)
    return [replace(base, name=f"sim-{i}", seed=i).validate() for i in range(replicas)]


# The stale-prefix shape: pods that tokenize (the project's tiny tokenizer), publish KV
# events, and have a quarter of the KV cache above (512 blocks = 8k tokens: ~4 of the 150
# groups' system prompts each), so the fleet holds ~20% of the working set.
STALE_GPU = replace(GPU, num_gpu_blocks=512, max_model_len=4096)


def stale_fleet(time_scale: float, replicas: int = 8) -> list[SimConfig]:
    tok = str(ensure_tokenizer())
    base = replace(STALE_GPU, time_scale=time_scale, tokenizer=tok, kv_events_port=0,
                   kv_events_replay_port=0)
    return [replace(base, name=f"sim-{i}", seed=i).validate() for i in range(replicas)]


def scaled(schedule: list[Request], time_scale: float) -> list[Request]:
    return [replace(r, at=r.at / time_scale) for r in schedule]


def run_point(strategy: str, sims: list[SimConfig], schedule: list[Request],
              time_scale: float, refresh: float = 0.05, epp_replicas: int = 1) -> dict[str, Any]:
    """One replay against a fresh stack; all times in simulated seconds."""
    stack = Stack(STRATEGIES[strategy], sims, refresh_interval=refresh,
                  epp_replicas=epp_replicas)
    try:
        time.sleep(0.5)  # a few scrapes before traffic
        q0, h0 = stack.fleet.prefix_counters()
        s0 = stack.fleet.stats()
        cpu0, busy0, wall0 = stack.cpu(), machine_busy(), time.perf_counter()
        results, _ = asyncio.run(replay(stack.url, scaled(schedule, time_scale),
                                           timeout=600 / time_scale))
        cpu1, busy1, wall1 = stack.cpu(), machine_busy(), time.perf_counter()
        q1, h1 = stack.fleet.prefix_counters()
        s1 = stack.fleet.stats()
    finally:
        stack.stop()
    out = summarize(results, time_scale)
    out.update(hot_group_spread(results, [r.group for r in schedule]))
    out["prefix_hit_rate"] = (h1 - h0) / (q1 - q0) if q1 > q0 else None
    out["adapter_swaps"] = sum(b["lora_loads"] - a["lora_loads"] for a, b in zip(s0, s1))
    out["preemptions"] = sum(b["preemptions"] - a["preemptions"] for a, b in zip(s0, s1))
    dt = wall1 - wall0
    out["wall_s"] = dt
    out["cpu_cores"] = {k: round((cpu1[k] - cpu0[k]) / dt, 3) for k in cpu0}
    out["machine_busy"] = round((busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 3)
    return out


def run_sweep(shape_name: str, strategies: list[str], qps_list: list[float], count: int,
              repeat: int, time_scale: float, seed: int, log: Any,
              min_count: int = 80, refresh: float = 0.05,
              epp_replicas: int = 1) -> list[dict[str, Any]]:
    """Every strategy at every load; `count` requests per run, fewer at light loads
    (about 10 simulated seconds of arrivals, at least `min_count`)."""
    points = []
    lora = LoraShape() if shape_name == "lora" else None
    events = any(STRATEGIES[s].kv_events for s in strategies)
    sims = (stale_fleet(time_scale) if shape_name == "stale-prefix"
            else fleet(time_scale, lora=lora, kv_events=events))
    for qps in qps_list:
        n = min(count, max(min_count, int(qps * 10)))
        for name in strategies:
            runs = []
            for rep in range(repeat):
                if shape_name == "stale-prefix":
                    sched = stale_prefix_schedule(StalePrefixShape(), qps, n, seed=seed + rep,
                                                  model=MODEL)
                else:
                    sched = schedule_for(shape_name, qps, n, seed + rep, MODEL)
                r = run_point(name, sims, sched, time_scale, refresh, epp_replicas)
                runs.append(r)
                log(f"{shape_name} {name:>20} qps={qps:<5g} rep={rep} "
                    f"ttft p50/p90={_s(r['ttft_p50'])}/{_s(r['ttft_p90'])} "
                    f"tok/s={_s(r['output_tok_s'])} hit={_s(r['prefix_hit_rate'])} "
                    f"swaps={r['adapter_swaps']} err={r['errors']} wall={r['wall_s']:.1f}s "
                    f"cpu={r['cpu_cores']} busy={r['machine_busy']} "
                    f"lag99={r['client_lag_p99_ms']:.0f}ms")
            point: dict[str, Any] = {"shape": shape_name, "strategy": name, "qps": qps,
                                     "requests": n, "runs": runs}
            for key in ("ttft_p50", "ttft_p90", "ttft_p99", "e2e_p50", "e2e_p90",
                        "output_tok_s", "prefix_hit_rate", "adapter_swaps", "errors",
                        "machine_busy", "hot_pods", "hot_top_share"):
                point[key] = median_of(runs, key)
            points.append(point)
    return points


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def saturation_point(points: list[dict[str, Any]]) -> dict[str, Any] | str:
    """Round-robin's point at the highest load where its p90 TTFT exceeds 10x its
    light-load value (the load where it saturates), or why there is none."""
    rr = sorted((p for p in points if p["strategy"] == "round-robin"), key=lambda p: p["qps"])
    if len(rr) < 2 or rr[0]["ttft_p90"] is None:
        return "target: needs round-robin at two or more loads"
    light = rr[0]["ttft_p90"]
    heavy = [p for p in rr if p["ttft_p90"] is not None and p["ttft_p90"] > 10 * light]
    if not heavy:
        return (f"target: round-robin p90 TTFT never exceeded 10x its light-load value "
                f"({light:.3f} s); raise the QPS range")
    return max(heavy, key=lambda p: p["qps"])


def oracle_verdict(points: list[dict[str, Any]], strategy: str = "default",
                   want: float = 1.5) -> list[str]:
    """Issue 13's target: `strategy` within `want` x the oracle's p90 TTFT where
    round-robin saturates (or, without such a load, at the highest load)."""
    at = saturation_point(points)
    qps = at["qps"] if isinstance(at, dict) else max((p["qps"] for p in points), default=None)
    mine = next((p for p in points if p["qps"] == qps and p["strategy"] == strategy), None)
    ref = next((p for p in points if p["qps"] == qps and p["strategy"] == "oracle"), None)
    if mine is None or ref is None or not mine["ttft_p90"] or not ref["ttft_p90"]:
        return [f"oracle target: needs {strategy} and oracle at QPS {qps}"]
    r = mine["ttft_p90"] / ref["ttft_p90"]
    where = "where round-robin saturates" if isinstance(at, dict) else "(highest load)"
    return [f"oracle target at QPS {qps:g} {where}: {strategy} p90 TTFT "
            f"{mine['ttft_p90']:.3f} s = {r:.2f}x the oracle's {ref['ttft_p90']:.3f} s "
            f"(want <= {want}): {'MET' if r <= want else 'not met'}"]


def verdict(points: list[dict[str, Any]]) -> list[str]:
    """Issue 8's target, evaluated on the shared-prefix sweep."""
    at = saturation_point(points)
    if isinstance(at, str):
        return [at]
    light = min((p for p in points if p["strategy"] == "round-robin"),
                key=lambda p: p["qps"])["ttft_p90"]
    lines = [(f"target evaluated at QPS {at['qps']:g}: round-robin p90 TTFT "
              f"{at['ttft_p90']:.3f} s (light load {light:.3f} s, "
              f"x{at['ttft_p90'] / light:.0f}), {at['output_tok_s']:.0f} output tok/s")]
    for p in points:
        if p["qps"] != at["qps"] or p["strategy"] in ("round-robin", "random", "oracle"):
            continue
        if p["ttft_p90"] is None or p["output_tok_s"] is None:
            continue
        t_ratio = at["ttft_p90"] / p["ttft_p90"]
        x_ratio = p["output_tok_s"] / at["output_tok_s"]
        ok = t_ratio >= 5 and x_ratio >= 1.5
        lines.append(f"  {p['strategy']}: p90 TTFT {p['ttft_p90']:.3f} s ({t_ratio:.1f}x lower; "
                     f"want >= 5), throughput {x_ratio:.2f}x (want >= 1.5): "
                     f"{'MET' if ok else 'not met'}")
    return lines


def stale_verdict(points: list[dict[str, Any]],
                  output_len: int = StalePrefixShape().output_len) -> list[str]:
    """Issue 14's target on the stale-prefix sweep: at the load where round-robin
    saturates, precise p90 TTFT <= 0.5x the approximate (default) profile's, and a higher
    prefix-cache hit rate.

    Saturated: the lowest load at which round-robin delivers under 80 % of the output
    tokens offered (QPS x output length), i.e. its queues grow for as long as the run
    lasts. Not 90 %: a run of ~10 s of Poisson arrivals, measured to its last response,
    shows 85-95 % at a load round-robin keeps up with. (A p90 rule, "10x the light-load
    p90", depends on the run's length: a saturated queue's p90 keeps growing with the
    number of requests.)"""
    rr = sorted((p for p in points if p["strategy"] == "round-robin" and p["ttft_p90"]),
                key=lambda p: p["qps"])
    if not rr:
        return ["target: needs round-robin in the sweep"]
    saturated = [p for p in rr if p["output_tok_s"] < 0.8 * p["qps"] * output_len]
    at = saturated[0] if saturated else rr[-1]
    share = at["output_tok_s"] / (at["qps"] * output_len)
    by = {p["strategy"]: p for p in points if p["qps"] == at["qps"]}
    lines = [f"evaluated at QPS {at['qps']:g}: round-robin delivers {share:.0%} of the offered "
             f"output tokens, p90 TTFT {at['ttft_p90']:.3f} s"
             f"{'' if saturated else ' (round-robin never saturated: highest load)'}"]
    a, p = by.get("default"), by.get("precise")
    if a and p and a["ttft_p90"] and p["ttft_p90"]:
        ratio = p["ttft_p90"] / a["ttft_p90"]
        ha, hp = a["prefix_hit_rate"] or 0.0, p["prefix_hit_rate"] or 0.0
        ok = ratio <= 0.5 and hp > ha
        lines.append(f"  precise p90 TTFT {p['ttft_p90']:.3f} s vs approximate "
                     f"{a['ttft_p90']:.3f} s: {ratio:.2f}x (want <= 0.5); hit rate "
                     f"{hp:.3f} vs {ha:.3f}: {'MET' if ok else 'not met'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="CI size: shared prefix only, round-robin vs default, 2 loads")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES),
                    choices=[*SHAPES, "stale-prefix"])
    ap.add_argument("--stale-qps", type=float, nargs="+")
    ap.add_argument("--strategies", nargs="+", choices=sorted(STRATEGIES))
    ap.add_argument("--qps", type=float, nargs="+", help="offered loads, simulated req/s")
    ap.add_argument("--lora-qps", type=float, nargs="+")
    ap.add_argument("--requests", type=int,
                    help="requests per run at high load (default 400, LoRA 300; quick 100)")
    ap.add_argument("--repeat", type=int, help="runs per point, medians (default 3; quick 1)")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="simulated seconds per wall second (default %(default)s)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--refresh-interval", type=float, default=0.05,
                    help="EPP metrics scrape interval, wall seconds (default %(default)s)")
    ap.add_argument("--epp-replicas", type=int, default=1,
                    help="EPP replicas behind Envoy, each on its own (no state sync); "
                         "the stale-prefix shape's realistic case is 2 or more")
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)

    quick = args.quick
    sp_strategies = args.strategies or (
        ["round-robin", "default"] if quick else
        ["round-robin", "random", "queue+kv", "oracle", "default", "default-upstream",
         "prefix-heavy", "default-no-inflight"])
    # Prefix weight and the in-flight ablation are shared-prefix questions.
    lora_strategies = args.strategies or (
        ["round-robin", "default"] if quick else
        ["round-robin", "random", "queue+kv", "oracle", "default", "default-upstream"])
    shapes = ["shared-prefix"] if quick and args.shapes == list(SHAPES) else args.shapes
    qps = args.qps or ([4, 40] if quick else [4, 16, 32, 48, 64])
    lora_qps = args.lora_qps or ([8, 24] if quick else [8, 16, 24])
    sp_count = args.requests or (100 if quick else 400)
    lora_count = args.requests or (100 if quick else 300)
    min_count = 40 if quick else 80
    repeat = args.repeat or (1 if quick else 3)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.out or ROOT / "benchmarks" / "results" / f"routing-{stamp}.json"

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    stale_strategies = args.strategies or ["round-robin", "default", "precise"]
    stale_qps = args.stale_qps or ([6, 14] if quick else [4, 8, 12, 16])
    doc: dict[str, Any] = {
        "command": "benchmarks/bench_routing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "time_scale": args.time_scale, "refresh_interval": args.refresh_interval,
        "epp_replicas": args.epp_replicas,
        "sim": asdict(GPU) | {"lora_modules": {}},
        "shared_prefix_shape": asdict(SharedPrefixShape()),
        "skewed_prefix_shape": asdict(SKEWED_PREFIX), "lora_shape": asdict(LoraShape()),
        "strategies": {s: STRATEGIES[s].note for s in dict.fromkeys(sp_strategies + lora_strategies + stale_strategies)},
        "sweeps": {}}
    t0 = time.perf_counter()
    plans = {  # shape -> (strategies, loads, requests per run, verdict key and function)
        "shared-prefix": (sp_strategies, qps, sp_count, "verdict", verdict),
        "skewed-prefix": (sp_strategies, qps, sp_count, None, None),
        "lora": (lora_strategies, lora_qps, lora_count, None, None),
        "stale-prefix": (stale_strategies, stale_qps, sp_count, "stale_verdict", stale_verdict),
    }
    if "stale-prefix" in shapes:
        doc["stale_prefix_shape"] = asdict(StalePrefixShape())
        doc["stale_sim"] = asdict(STALE_GPU) | {"lora_modules": {}}
    for shape in shapes:
        strategies, loads, count, verdict_key, judge = plans[shape]
        points = run_sweep(shape, strategies, loads, count, repeat, args.time_scale, args.seed,
                           log, min_count, args.refresh_interval, args.epp_replicas)
        doc["sweeps"][shape] = points
        print(f"\n### {shape}\n")
        print(markdown_table(points))
        if any(p["strategy"] == "oracle" for p in points):
            print("\nRelative to the oracle:\n")
            print(oracle_table(points))
            doc.setdefault("oracle_verdict", {})[shape] = oracle_verdict(points)
            print("\n" + "\n".join(doc["oracle_verdict"][shape]))
        if verdict_key is not None and judge is not None:
            doc[verdict_key] = judge(points)
            print("\n" + "\n".join(doc[verdict_key]))
        if not args.no_plot:
            png = out.with_name(out.stem + f"-{shape}.png")
            eppn = f", {args.epp_replicas} EPP replicas unsynced" if args.epp_replicas > 1 else ""
            plot(points, png, f"{shape}: 8 simulated pods through Envoy{eppn} "
                              f"({count}+ requests per point, median of {repeat})")
            print(f"\nplot: {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}")
    doc["wall_s"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"results: {out}  ({doc['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
