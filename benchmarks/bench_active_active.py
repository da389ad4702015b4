"""Active-active EPP replicas sharing state through Redis: quality, cost, failover.

Four parts, everything on 127.0.0.1 with a real redis-server (Debian `redis-server`):

1. routing quality on the shared-prefix shape (8 simulated vLLM pods, Envoy whose `epp`
   cluster holds the replicas): 1 replica, 2 replicas without sync, 2 with sync; p50/p90
   TTFT, prefix-cache hit rate from the pods' counters, errors;
2. the cost of sync: CPU per routed request of the routing core (director + scheduler,
   in this process, distinct shared-prefix prompts) with sync off, on with no peer, and on
   with a peer process routing as fast on the same Redis (so this replica also merges
   everything the peer learns); compared with the CPU of a whole ext_proc exchange;
3. throughput: exchanges/s and CPU per exchange, 1 vs 2 replicas (h2load, a C client,
   one per replica; its CPU share stated), 2 replicas with and without sync;
4. failover: 2 synced replicas under a steady load through Envoy, one killed (SIGKILL)
   midway: failed requests, when they happened, and the hit rate before/after.

    .venv/bin/python benchmarks/bench_active_active.py --quick     # CI, ~1.5 min
    .venv/bin/python benchmarks/bench_active_active.py             # the RESULTS.md run

Markdown on stdout, JSON in benchmarks/results/active-active-<time>.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_routing import MODEL, fleet, scaled  # noqa: E402
from benchmarks.routing.client import replay  # noqa: E402
from benchmarks.routing.report import summarize  # noqa: E402
from benchmarks.routing.stack import Fleet, cpu_seconds, machine_busy  # noqa: E402
from benchmarks.routing.workload import SharedPrefixShape, shared_prefix_schedule  # noqa: E402
from tests.support import (EnvoyProcess, EppProcess, Proc, free_port,  # noqa: E402
                           retry_port_taken, start_envoy, start_epp)

MODES = ("1 replica", "2 unsynced", "2 synced")
CONTROLS = ("1 replica + scraping EPP", "2 synced, 10ms")
"""Controls for the TTFT gap of two replicas (`--controls`): one replica serving while a
second EPP scrapes the same pods but gets no traffic (what a second process alone costs
the simulator and the serving EPP on this machine), and two replicas syncing every 10 ms
instead of 50 (how much the sync interval matters)."""
MODE_SPECS: dict[str, tuple[int, int, bool, str | None]] = {
    # mode: (replicas in Envoy's epp cluster, EPPs that only scrape, synced, interval)
    "1 replica": (1, 0, False, None),
    "2 unsynced": (2, 0, False, None),
    "2 synced": (2, 0, True, None),
    "1 replica + scraping EPP": (1, 1, False, None),
    "2 synced, 10ms": (2, 0, True, "10ms"),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- Redis ----------------------------------------------------------------------------------


class Redis:
    def __init__(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise SystemExit("redis-server is missing: make redis-server "
                             "(apt-get install redis-server)")
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")

        def start() -> tuple[int, Proc]:
            port = free_port()
            proc = Proc([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no", "--dir", self.dir], "redis")
            # Its log line, not a connect: a connect would also reach a process that took
            # the port.
            proc.wait_ready(lambda: "Ready to accept connections" in proc.output(), 10,
                            "redis-server")
            return port, proc

        self.port, self.proc = retry_port_taken(start, "redis-server")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def cpu(self) -> float:
        return cpu_seconds(self.proc.p.pid)

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def sync_args(redis: Redis) -> list[str]:
    return ["--state-sync", redis.url, "--state-sync-key", f"bench:{uuid.uuid4().hex[:8]}"]


# -- 1. routing quality ---------------------------------------------------------------------


class Replicas:
    """N EPP replicas (optionally synced) in front of `hostports`, one Envoy before them."""

    def __init__(self, n: int, hostports: list[str], sync: list[str], idle: int = 0) -> None:
        """`idle` more EPPs run beside them (same pods, same scraping) outside Envoy's cluster."""
        args = ["--refresh-metrics-interval", "0.05s", "-v", "-1", *sync]
        self.epps: list[EppProcess] = []
        self.envoy: EnvoyProcess | None = None
        try:
            for _ in range(n + idle):
                self.epps.append(start_epp(*args, endpoints=",".join(hostports)))
            # One response path for every mode: a multi-replica config is always
            # `blocking` (each ext_proc stream is balanced on its own), so one replica too.
            self.envoy = start_envoy(self.epps[0].grpc_port, response_path="blocking",
                                     more_epps=[e.grpc_port for e in self.epps[1:n]])
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        assert self.envoy is not None
        return self.envoy.url + "/v1/completions"

    def envoy_stat(self, name: str) -> int | None:
        """A counter from Envoy's admin page (None when Envoy does not report it)."""
        assert self.envoy is not None
        url = f"http://127.0.0.1:{self.envoy.admin_port}/stats?filter=^{name}$"
        with urllib.request.urlopen(url, timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + ":"):
                    return int(line.rsplit(":", 1)[1])
        return None

    def stop(self) -> None:
        if self.envoy is not None:
            self.envoy.proc.stop()
        for e in self.epps:
            e.proc.stop()


def routing_point(mode: str, redis: Redis, qps: float, count: int, seed: int,
                  time_scale: float) -> dict[str, Any]:
    sims = fleet(time_scale)
    schedule = shared_prefix_schedule(SharedPrefixShape(), qps, count, seed=seed, model=MODEL)
    pods = Fleet(sims)
    try:
        n, idle, synced, interval = MODE_SPECS[mode]
        sync = sync_args(redis) if synced else []
        if interval:
            sync += ["--state-sync-interval", interval]
        reps = Replicas(n, pods.hostports, sync, idle)
        try:
            time.sleep(0.5)
            q0, h0 = pods.prefix_counters()
            pids = {"fleet": [pods.p.pid], "epps": [e.proc.p.pid for e in reps.epps],
                    "envoy": [reps.envoy.proc.p.pid] if reps.envoy else []}
            cpu0 = {k: sum(map(cpu_seconds, v)) for k, v in pids.items()}
            busy0, w0 = machine_busy(), time.perf_counter()
            results, _ = asyncio.run(replay(reps.url, scaled(schedule, time_scale),
                                            timeout=600 / time_scale))
            wall = time.perf_counter() - w0
            busy1 = machine_busy()
            cpu = {k: round((sum(map(cpu_seconds, v)) - cpu0[k]) / wall, 3)
                   for k, v in pids.items()}
            q1, h1 = pods.prefix_counters()
            ejections = reps.envoy_stat("cluster.epp.outlier_detection.ejections_enforced_total")
        finally:
            reps.stop()
    finally:
        pods.stop()
    out = summarize(results, time_scale)
    out["prefix_hit_rate"] = (h1 - h0) / (q1 - q0) if q1 > q0 else None
    # Cores in use while replaying: by process group, and the whole machine's (others' too).
    out["cores"] = cpu | {"machine": round((busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
                                           * (os.cpu_count() or 1), 2)}
    out["epp_ejections"] = ejections
    return out


def routing(redis: Redis, qps_list: list[float], count: int, repeat: int,
            time_scale: float, modes: tuple[str, ...] = MODES) -> list[dict[str, Any]]:
    rows = []
    for qps in qps_list:
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for r in range(repeat):  # interleaved, so that machine load hits every mode alike
            for mode in modes:
                runs[mode].append(routing_point(mode, redis, qps, count, 1 + r, time_scale))
                log(f"routing {mode} run {r + 1}: p50 {runs[mode][-1]['ttft_p50']} "
                    f"p90 {runs[mode][-1]['ttft_p90']} cores {runs[mode][-1]['cores']}")
        for mode in modes:
            row = {"mode": mode, "qps": qps, "requests": count, "repeat": repeat,
                   "runs": runs[mode]}
            for k in ("ttft_p50", "ttft_p90", "prefix_hit_rate", "errors", "epp_ejections"):
                vals = [r[k] for r in runs[mode] if r[k] is not None]
                row[k] = statistics.median(vals) if vals else None
            for k in runs[mode][0]["cores"]:
                row[f"cores_{k}"] = statistics.median(r["cores"][k] for r in runs[mode])
            rows.append(row)
            log(f"routing {mode:>10} qps={qps:g}: ttft p90 {row['ttft_p90']} "
                f"hit {row['prefix_hit_rate']} errors {row['errors']}")
    return rows


# -- 2. the cost of sync ----------------------------------------------------------------------


def _core_prompts(n: int) -> list[str]:
    shape = SharedPrefixShape()
    sched = shared_prefix_schedule(shape, 1000.0, n, seed=7, model=MODEL)
    return [r.prompt for r in sched]


async def _route_loop(url: str | None, key: str, seconds: float, replica: str) -> dict[str, Any]:
    """Route distinct shared-prefix prompts as fast as one event loop allows (8 endpoints,
    scraped every 50 ms)."""
    import json as _json

    from epp.config import load_config
    from epp.datastore import Datastore, Endpoint, EndpointMetrics
    from epp.director import Director
    from epp.request import InferenceRequest, parse_body
    from epp.scheduling import InFlightTracker, Scheduler
    from epp.settings import Settings
    from epp.statesync.setup import state_sync_from_settings

    config = load_config(None)
    ds = Datastore()
    names = [f"pod-{i}" for i in range(8)]
    ds.set_endpoints([Endpoint(n, f"10.0.0.{i + 1}", 8000) for i, n in enumerate(names)])
    inflight = InFlightTracker()
    scheduler = Scheduler.from_config(config, inflight=inflight, plugin_metrics_every=16)
    scheduler.attach(ds)
    director = Director(ds, scheduler, inflight=inflight)
    sync = None
    if url:
        sync = state_sync_from_settings(Settings(state_sync=url, state_sync_key=key), ds,
                                        inflight, config.plugins)
        assert sync is not None
        sync.replica = replica
        await sync.start()
    if replica == "peer":
        print("ready", flush=True)  # the measured replica starts now
    prompts = _core_prompts(2000)  # 512 distinct: the shape repeats its questions
    # Every request distinct nonetheless (the worst case for sync: each one has a block
    # nobody has sent yet): its last 64-character block is replaced by the request's
    # number. Building the bodies is not routing: its CPU is taken out of the measurement.
    build_cpu = 0.0

    def tagged(cycle: int) -> list[tuple[bytes, Any]]:
        nonlocal build_cpu
        c = time.process_time()
        out = []
        for i, p in enumerate(prompts):
            tag = f" [{replica} {cycle} {i}]".ljust(64, ".")
            raw = _json.dumps({"model": MODEL, "prompt": p[:-64] + tag}).encode()
            out.append((raw, parse_body("/v1/completions", raw)))
        build_cpu += time.process_time() - c
        return out

    bodies = tagged(0)
    build_cpu = 0.0
    n = 0
    c0, t0 = time.process_time(), time.perf_counter()
    scrape = t0
    while time.perf_counter() - t0 < seconds:
        if n and n % len(bodies) == 0:
            bodies = tagged(n // len(bodies))
        raw, parsed = bodies[n % len(bodies)]
        d = await director.route(InferenceRequest(f"r{n}", "/v1/completions", body=raw,
                                                  parsed=parsed))
        director.finished(d)
        n += 1
        if n % 4 == 0:
            await asyncio.sleep(0)  # let the sync tasks run, as a server's loop would
        if time.perf_counter() - scrape > 0.05:  # the scraper's writes, 50 ms apart
            scrape = time.perf_counter()
            for name in names:
                ds.update_metrics(name, EndpointMetrics(waiting=0, running=2, kv_usage=0.3,
                                                        scraped_at=time.monotonic()))
    cpu = time.process_time() - c0 - build_cpu
    out = {"requests": n, "cpu_us": cpu / n * 1e6}
    if sync is not None:
        await asyncio.sleep(0.3)
        out |= {"sent": sync.sent_records, "received": sync.received_records,
                "connected": sync.connected}
        await sync.stop()
    return out


def sync_cost(redis: Redis, seconds: float, repeat: int) -> list[dict[str, Any]]:
    """A peer process routes beside the measured one in every mode (same machine load);
    modes differ only in who syncs: nobody, only the measured replica (its own key), or
    both on one key (the measured replica also merges everything the peer learns)."""
    modes = {"off": (False, False), "on, alone": (True, False), "on, with a peer": (True, True)}
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for _ in range(repeat):  # interleaved, so that machine load hits every mode alike
        for mode, (mine, shared) in modes.items():
            key = f"bench:{uuid.uuid4().hex[:8]}"
            peer = subprocess.Popen(
                [sys.executable, str(Path(__file__)), "--peer", redis.url if shared else "",
                 key, str(seconds + 1.5)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
            assert peer.stdout is not None and peer.stdout.readline().strip() == "ready"
            rows[mode].append(asyncio.run(_route_loop(redis.url if mine else None, key,
                                                      seconds, "a")))
            peer.wait(30)
    out = []
    base = statistics.median(r["cpu_us"] for r in rows["off"])
    for mode, runs in rows.items():
        cpu = statistics.median(r["cpu_us"] for r in runs)
        row = {"mode": mode, "cpu_us_per_request": round(cpu, 1),
               "delta_us": round(cpu - base, 1), "requests": runs[0]["requests"],
               "received": statistics.median(r.get("received", 0) for r in runs),
               "sent": statistics.median(r.get("sent", 0) for r in runs)}
        out.append(row)
        log(f"sync cost {mode:>16}: {cpu:.1f} µs/request (+{cpu - base:.1f}) {runs}")
    return out


def component_costs(rounds: int = 7) -> dict[str, float]:
    """CPU µs per routed request of each step sync adds, the best of `rounds` (the minimum
    is what the code costs; a shared machine only ever adds to it), for 2,000 shared-prefix
    prompts routed to 8 endpoints in batches of 40 (800 requests/s per replica at 50 ms):
    turning the requests' chains into records (only blocks not yet sent for the endpoint)
    and encoding them, decoding a batch, and merging it into an index that knows the
    shared system prompts (`warm`) or not yet (`cold`)."""
    from epp.datastore import Datastore, Endpoint
    from epp.scheduling import InFlightTracker
    from epp.scheduling import prefix as _prefix
    from epp.scheduling.scorers import PrefixCacheScorer
    from epp.statesync import wire
    from epp.statesync.sync import StateSync, SyncOptions

    chains = [_prefix.block_hashes(MODEL, _prefix.prompt_bytes(p), 64, 256)
              for p in _core_prompts(2000)]
    names = [f"pod-{i}" for i in range(8)]
    ds = Datastore()
    ds.set_endpoints([Endpoint(n, f"10.0.0.{i + 1}", 8000) for i, n in enumerate(names)])
    per = 40

    def sender() -> StateSync:
        scorer = PrefixCacheScorer()
        return StateSync(SyncOptions(url="redis://unused"), ds, InFlightTracker(),
                         {scorer.name: scorer}, replica="a")

    def publish(sync: StateSync) -> list[dict[bytes, bytes]]:
        out = []
        for i in range(0, len(chains), per):
            for j in range(i, min(i + per, len(chains))):
                sync._on_record("prefix-cache-scorer", names[j % 8], 31_250, chains[j])
            records, done = sync._outgoing()
            done()
            out.append(wire.encode("a", {"pod-1": 3}, records))
        return out

    fields = publish(sender())
    batches = [wire.decode(f) for f in fields]
    receiver = sender()
    receiver.replica = "b"  # merges what "a" sent

    def merge(scorer: PrefixCacheScorer) -> None:
        receiver.scorers = {scorer.name: scorer}
        for f in fields:
            receiver._apply(f, bootstrap=False)

    warm = PrefixCacheScorer()
    merge(warm)

    def best(f: Any) -> float:
        runs = []
        for _ in range(rounds):
            c0 = time.process_time()
            f()
            runs.append((time.process_time() - c0) / len(chains) * 1e6)
        return round(min(runs), 2)

    records = sum(len(b.records) for b in batches)
    out = {
        "blocks_per_request": sum(map(len, chains)) / len(chains),
        "records_per_request": records / len(chains),
        "blocks_sent_per_request": sum(len(r.hashes) for b in batches for r in b.records)
        / len(chains),
        "publish_us": best(lambda: publish(sender())),
        "decode_us": best(lambda: [wire.decode(f) for f in fields]),
        "apply_cold_us": best(lambda: merge(PrefixCacheScorer())),
        "apply_warm_us": best(lambda: merge(warm)),
    }
    log(f"component costs per request: {out}")
    return out


# -- 3. throughput ------------------------------------------------------------------------------


def throughput(redis: Redis, seconds: float, concurrency: int, repeat: int) -> list[dict[str, Any]]:
    h2load = shutil.which("h2load")
    if h2load is None:
        log("throughput: h2load missing (make bench-tools); skipped")
        return []
    from benchmarks.bench_extproc import grpc_frames, run_h2load
    from tests.support import UpstreamFleet, vllm_page

    frames = tempfile.NamedTemporaryFile(suffix=".bin", delete=False)
    frames.write(grpc_frames())
    frames.close()
    rows = []
    with UpstreamFleet(3) as ups:
        for u in ups.upstreams:
            u.metrics_page = vllm_page(waiting=1, running=2, kv=0.2)
        hostports = ",".join(u.hostport for u in ups.upstreams)
        configs = [("1 replica", 1, False), ("1 replica, sync on", 1, True),
                   ("2 replicas", 2, False), ("2 replicas, synced", 2, True)]
        runs: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in configs}
        for _ in range(repeat):
            for name, n, synced in configs:
                args = ["-v", "-1", *(sync_args(redis) if synced else [])]
                epps = [start_epp(*args, endpoints=hostports) for _ in range(n)]
                try:
                    time.sleep(0.3)
                    r0 = redis.cpu()
                    with concurrent.futures.ThreadPoolExecutor(n) as pool:
                        futs = [pool.submit(_h2load_with_cpu, h2load, e, frames.name,
                                            concurrency, seconds, run_h2load) for e in epps]
                        res = [f.result() for f in futs]
                    redis_cpu = redis.cpu() - r0
                finally:
                    for e in epps:
                        e.proc.stop()
                done = sum(r["count"] for r in res)
                runs[name].append({
                    "rps": sum(r["rps"] for r in res),
                    "epp_cpu_us": statistics.mean(r["server_cpu_us"] for r in res),
                    "client_cpu_us": sum(r["client_cpu"] for r in res) / done * 1e6,
                    "redis_cpu_us": redis_cpu / done * 1e6 if synced else 0.0,
                    "failed": sum(r["failed"] for r in res)})
                log(f"throughput {name:>20}: {runs[name][-1]}")
    os.unlink(frames.name)
    for name, rs in runs.items():
        rows.append({"mode": name, **{k: round(statistics.median(r[k] for r in rs), 1)
                                      for k in rs[0]}})
    return rows


def _h2load_with_cpu(h2load: str, epp: EppProcess, data: str, c: int, seconds: float,
                     run: Any) -> dict[str, Any]:
    before = os.times()
    r = run(h2load, epp.grpc_port, data, c, seconds, epp.proc.p.pid)
    after = os.times()
    # h2load is our child: its CPU shows in children_user/system once it has exited.
    r["client_cpu"] = (after.children_user - before.children_user
                       + after.children_system - before.children_system)
    return r


# -- 4. failover ----------------------------------------------------------------------------


def failover(redis: Redis, qps: float, seconds: float, time_scale: float) -> dict[str, Any]:
    sims = fleet(time_scale)
    count = int(qps * seconds)
    schedule = shared_prefix_schedule(SharedPrefixShape(), qps, count, seed=3, model=MODEL)
    pods = Fleet(sims)
    try:
        reps = Replicas(2, pods.hostports, sync_args(redis))
        try:
            time.sleep(0.5)
            kill_at = seconds / 2 / time_scale

            async def run() -> list[Any]:
                async def killer() -> None:
                    await asyncio.sleep(kill_at)
                    reps.epps[1].proc.p.kill()

                k = asyncio.ensure_future(killer())
                results, _ = await replay(reps.url, scaled(schedule, time_scale),
                                          timeout=600 / time_scale)
                await k
                return results

            results = asyncio.run(run())
        finally:
            reps.stop()
    finally:
        pods.stop()
    failed = [r for r in results if not r.ok]
    before = [r for r in results if r.at < kill_at - 0.5]
    after = [r for r in results if r.at > kill_at + 1.0 and r.ok]

    def hit(rs: list[Any]) -> float | None:
        return sum(r.cached_tokens > 0 for r in rs) / len(rs) if rs else None

    # In flight on the killed replica: sent before the kill, broken after it.
    inflight = [r for r in failed if r.at < kill_at]
    out = {"qps": qps, "requests": len(results), "killed_at_s": round(kill_at, 2),
           "failed": len(failed), "failed_in_flight": len(inflight),
           "failed_sent_after_kill": len(failed) - len(inflight),
           "failed_at_s": [round(r.at - kill_at, 3) for r in failed][:20],
           "failed_examples": sorted({r.error or str(r.status) for r in failed})[:3],
           "hit_before": hit([r for r in before if r.ok]), "hit_after": hit(after)}
    log(f"failover: {out}")
    return out


# -- report ---------------------------------------------------------------------------------


def _f(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def markdown(doc: dict[str, Any]) -> str:
    lines = []
    if doc.get("routing"):
        lines += ["### Routing quality (shared prefix, 8 simulated pods)", "",
                  "| replicas | QPS | TTFT p50 (s) | TTFT p90 (s) | prefix hit rate | errors | "
                  "cores: sim fleet / EPPs / Envoy / machine |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in doc["routing"]:
            lines.append(f"| {r['mode']} | {r['qps']:g} | {_f(r['ttft_p50'])} | "
                         f"{_f(r['ttft_p90'])} | {_f(r['prefix_hit_rate'])} | {r['errors']} | "
                         f"{r['cores_fleet']:.2f} / {r['cores_epps']:.2f} / "
                         f"{r['cores_envoy']:.2f} / {r['cores_machine']:.2f} |")
        lines.append("")
    if doc.get("sync_cost"):
        lines += ["### CPU per routed request (routing core, this process)", "",
                  "| sync | µs/request | Δ vs off (µs) | records sent | merged from peer |",
                  "|---|---:|---:|---:|---:|"]
        for r in doc["sync_cost"]:
            lines.append(f"| {r['mode']} | {r['cpu_us_per_request']} | {r['delta_us']:+} | "
                         f"{r['sent']:.0f} | {r['received']:.0f} |")
        lines.append("")
    if doc.get("sync_components"):
        c = doc["sync_components"]
        lines += ["### What sync adds per routed request (CPU µs, best of 7)", "",
                  f"{c['blocks_per_request']:.0f} blocks per prompt, "
                  f"{c['blocks_sent_per_request']:.1f} sent ({c['records_per_request']:.2f} "
                  f"records): record + encode {c['publish_us']}, decode {c['decode_us']}, "
                  f"decode + merge {c['apply_cold_us']} (new tails) / {c['apply_warm_us']} "
                  f"(already known). With N replicas sharing the load evenly, a replica "
                  f"publishes its own and decodes and merges N-1 others' for each of its own "
                  f"requests.", ""]
    if doc.get("throughput"):
        lines += ["### ext_proc throughput (h2load per replica)", "",
                  "| EPP | exchanges/s | EPP CPU µs/exchange | h2load CPU µs/exchange | "
                  "redis CPU µs/exchange | failed |", "|---|---:|---:|---:|---:|---:|"]
        for r in doc["throughput"]:
            lines.append(f"| {r['mode']} | {r['rps']:.0f} | {r['epp_cpu_us']} | "
                         f"{r['client_cpu_us']} | {r['redis_cpu_us']} | {r['failed']:.0f} |")
        lines.append("")
    if doc.get("failover"):
        f = doc["failover"]
        lines += ["### Failover (2 synced replicas, one SIGKILLed midway)", "",
                  f"{f['requests']} requests at {f['qps']:g} QPS; failed: {f['failed']} "
                  f"({f['failed_in_flight']} sent before the kill, "
                  f"{f['failed_sent_after_kill']} after) "
                  f"(seconds after the kill: {f['failed_at_s']}; {f['failed_examples']}); "
                  f"requests with a prefix-cache hit before {_f(f['hit_before'])}, "
                  f"after {_f(f['hit_after'])}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", nargs="+", default=["routing", "cost", "throughput", "failover"],
                    choices=["routing", "cost", "throughput", "failover"])
    ap.add_argument("--controls", action="store_true",
                    help="routing: also the control modes " + ", ".join(CONTROLS))
    ap.add_argument("--modes", nargs="+", choices=list(MODE_SPECS),
                    help="routing: only these modes")
    ap.add_argument("--qps", type=float, nargs="+")
    ap.add_argument("--requests", type=int)
    ap.add_argument("--repeat", type=int)
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--peer", nargs=3, metavar=("URL", "KEY", "SECONDS"),
                    help=argparse.SUPPRESS)  # the sync-cost peer process
    args = ap.parse_args(argv)
    if args.peer:
        url, key, secs = args.peer
        print(json.dumps(asyncio.run(_route_loop(url or None, key, float(secs), "peer"))))
        return 0
    quick = args.quick
    repeat = args.repeat or (1 if quick else 3)
    qps = args.qps or ([16] if quick else [16, 32])
    count = args.requests or (120 if quick else 400)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.out or ROOT / "benchmarks" / "results" / f"active-active-{stamp}.json"
    doc: dict[str, Any] = {"command": "benchmarks/bench_active_active.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg()}
    redis = Redis()
    t0 = time.perf_counter()
    try:
        if "routing" in args.parts:
            modes = tuple(args.modes or MODES + (CONTROLS if args.controls else ()))
            doc["routing"] = routing(redis, qps, count, repeat, args.time_scale, modes)
        if "cost" in args.parts:
            doc["sync_components"] = component_costs()
            doc["sync_cost"] = sync_cost(redis, 1.0 if quick else 4.0, repeat)
        if "throughput" in args.parts:
            doc["throughput"] = throughput(redis, 1.0 if quick else 4.0, 32, repeat)
        if "failover" in args.parts:
            doc["failover"] = failover(redis, qps[0], 10.0 if quick else 20.0, args.time_scale)
    finally:
        redis.stop()
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    doc["loadavg_end"] = os.getloadavg()
    print(markdown(doc))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"results: {out}  ({doc['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
