"""Side by side: the upstream Go EPP v1.5.0, ours, and a do-nothing grpc.aio server.

`make bench-compare` (never part of `make bench`: it needs a Go build and a kube-apiserver).
Everything runs on 127.0.0.1:

1. a real etcd + kube-apiserver (tests/k8s/cluster.py; binaries from
   tests/k8s/build_apiserver.sh) with the InferencePool CRDs of the upstream module
   (config/crd/bases, copied by benchmarks/goepp/build_goepp.sh);
2. 4 simulated vLLM servers (`epp-sim`, one process) on 127.0.0.2-5, one port; 4 pods
   created through the API with podIP 127.0.0.x and Ready written to their status (there
   is no kubelet), selected by one InferencePool whose targetPort is that port;
3. both EPPs serve that InferencePool from the API server, with the same admin kubeconfig:
   the Go EPP (v1.5.0's standalone `--endpoint-selector` mode cannot start: "namespace
   must not be empty") with `--secure-serving=false --metrics-endpoint-auth=false
   --tracing=false` (tracing would export to an absent collector), everything else default
   (its default scheduling profile, 50 ms scrapes, pprof on); ours with
   `--secure-serving=false --metrics-endpoint-auth=false` and its defaults. The floor is benchmarks/ghz/floor_server.py;
4. idle CPU of each process over the same window (no traffic: watches and 50 ms scrapes);
5. load: h2load (a C client) sending one ext_proc exchange per stream (request headers +
   a ~1 KB completions body, as Envoy sends it in FULL_DUPLEX_STREAMED) on one HTTP/2
   connection, and ghz the same exchange, at each concurrency; targets interleaved and
   their order reversed on odd repetitions, so machine drift hits all three alike. Every
   exchange must be routed: the EPPs' own `inference_objective_request_total` must grow
   by the count h2load reports, and ghz must see no non-OK status;
6. per target and concurrency the medians over repetitions, and the ratios of CPU per
   exchange (ours / Go, floor / Go, ours / floor) paired per repetition, then the median:
   on a shared machine the ratios measured in the same minute are steadier than the
   absolute numbers. RSS after the load.

Usage:
    .venv/bin/python benchmarks/bench_compare.py                      # c=1,8,32, 3 x 3 s
    .venv/bin/python benchmarks/bench_compare.py --duration 5 --repeat 5 --tools h2load
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "ghz"))

import bench_extproc as bx
import make_data
import sweep
import yaml

from tests.k8s import cluster as k
from tests.k8s.conftest import Kubelet
from tests.support import Proc, free_port, retry_port_taken, start_epp

BUILD_GOEPP = ROOT / "benchmarks" / "goepp" / "build_goepp.sh"
BUILD_APISERVER = ROOT / "tests" / "k8s" / "build_apiserver.sh"
NAMESPACE = "bench"
POOL = "bench-pool"
LABELS = {"app": "bench-sim"}
MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # the model of benchmarks/ghz's call data
TARGETS = ("go", "ours", "floor")


def build_goepp() -> tuple[Path, Path]:
    """(binary, CRD dir) from the build script (instant when cached)."""
    p = subprocess.run(["bash", str(BUILD_GOEPP)], stdout=subprocess.PIPE, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"building the Go EPP failed (exit {p.returncode}): bash {BUILD_GOEPP}")
    binary, crds = p.stdout.split()[-2:]
    return Path(binary), Path(crds)


def rss_kib(pid: int) -> dict[str, int]:
    """Resident memory now and at its peak (VmRSS, VmHWM), from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def idle_cpu_all(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Share of one core each process uses with no traffic, over the same window."""
    s0 = {n: sweep.process_cpu_seconds(p) for n, p in pids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    dt = time.monotonic() - t0
    return {n: (sweep.process_cpu_seconds(p) - s0[n]) / dt for n, p in pids.items()}


def start_sims(n: int) -> tuple[Proc, list[str], int]:
    """`n` simulated vLLM servers in one `epp-sim` process, on 127.0.0.2.. and one free
    port (started again on a new one if another process took it first)."""
    return retry_port_taken(lambda: _start_sims(free_port(), n), "simulators")


def _start_sims(port: int, n: int) -> tuple[Proc, list[str], int]:
    ips = [f"127.0.0.{2 + i}" for i in range(n)]
    fleet = {"defaults": {"model": MODEL, "seed": 1},
             "replicas": [{"name": f"sim-{i}", "host": ip, "port": port} for i, ip in enumerate(ips)]}
    cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    cfg.write(yaml.safe_dump(fleet))
    cfg.close()
    proc = Proc([sys.executable, "-m", "epp.sim", "--fleet-config", cfg.name,
                 "--log-level", "WARNING"], "sim")
    try:
        # Not "ready" alone: a bind failure's "already in use" holds it too.
        proc.wait_ready(lambda: "epp-sim: ready" in proc.output(), 30, "epp-sim")
    finally:
        os.unlink(cfg.name)
    return proc, ips, port


def setup_pool(admin: Any, crds: Path, ips: list[str], port: int) -> None:
    """CRDs, namespace, InferencePool, and one Ready pod per simulator address."""
    k.apply(admin, k.load_docs(*sorted(crds.glob("*.yaml"))))
    k.apply(admin, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}])
    k.apply(admin, [{
        "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": {"name": POOL},
        "spec": {"selector": {"matchLabels": LABELS}, "targetPorts": [{"number": port}],
                 "endpointPickerRef": {"kind": "Service", "name": "bench-epp",
                                       "port": {"number": 9002}}}}], namespace=NAMESPACE)
    kubelet = Kubelet(admin, NAMESPACE)
    for i, ip in enumerate(ips):
        kubelet.start(f"sim-{i}", ip, labels=dict(LABELS))


def start_go_epp(binary: Path, kubeconfig: str, hosts: set[str]) -> tuple[Proc, int, int]:
    """The upstream EPP serving the pool; ready once an exchange is routed to a pod. A
    port another process took first makes it exit with Go's "bind: address already in
    use" in its log: started again on new ports."""
    return retry_port_taken(lambda: _start_go_epp(binary, kubeconfig, hosts), "the Go EPP")


def _start_go_epp(binary: Path, kubeconfig: str, hosts: set[str]) -> tuple[Proc, int, int]:
    grpc_port, metrics_port = free_port(), free_port()
    proc = Proc([str(binary), "--pool-name", POOL, "--pool-namespace", NAMESPACE,
                 "--grpc-port", str(grpc_port), "--grpc-health-port", str(free_port()),
                 "--metrics-port", str(metrics_port), "--secure-serving=false",
                 "--metrics-endpoint-auth=false", "--tracing=false"],
                "go-epp", env={"KUBECONFIG": kubeconfig})

    def routes() -> bool:
        bx.check_direct(grpc_port, hosts)  # raises while not listening or no pods known
        return True

    proc.wait_ready(routes, 90, "the Go EPP routing to the pool")
    return proc, grpc_port, metrics_port


PAIRS = [("ours", "go"), ("floor", "go"), ("ours", "floor")]


def paired_ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CPU per exchange ours/go, floor/go, ours/floor per (tool, concurrency), paired per
    repetition (bench_extproc.paired_ratios)."""
    return bx.paired_ratios(runs, PAIRS, group=("tool", "concurrency"))


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for tool, c, t in sorted({(r["tool"], r["concurrency"], r["target"]) for r in runs}):
        rs = [r for r in runs if (r["tool"], r["concurrency"], r["target"]) == (tool, c, t)]
        cpu = [r["server_cpu_us"] for r in rs if r["server_cpu_us"]]
        out.append({"tool": tool, "concurrency": c, "target": t, "runs": len(rs),
                    "rps": statistics.median(r["rps"] for r in rs),
                    "rps_min": min(r["rps"] for r in rs), "rps_max": max(r["rps"] for r in rs),
                    "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                    "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                    "server_cpu_us": statistics.median(cpu) if cpu else None,
                    "cpu_min": min(cpu) if cpu else None, "cpu_max": max(cpu) if cpu else None,
                    "errors": sum(r["errors"] for r in rs)})
    return out


def side_by_side(rows: list[dict[str, Any]], tool: str) -> str:
    """One line per concurrency: exchanges/s, p50, p99, CPU µs per exchange of each target."""
    head = " | ".join(f"{t}: exch/s, p50 ms, p99 ms, CPU µs/exch" for t in TARGETS)
    lines = [f"| c | {head} |", "|---:|" + "---|" * len(TARGETS)]
    for c in sorted({r["concurrency"] for r in rows if r["tool"] == tool}):
        cells = []
        for t in TARGETS:
            m = next((r for r in rows if (r["tool"], r["concurrency"], r["target"]) == (tool, c, t)),
                     None)
            cells.append("" if m is None else
                         f"{m['rps']:,.0f}, {m['p50_ms']:.2f}, {m['p99_ms']:.2f}, "
                         f"{m['server_cpu_us'] or 0:,.0f}" + (f" ({m['errors']} errors)"
                                                             if m["errors"] else ""))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", default="1,8,32", help="comma list (default %(default)s)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per run (default %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions (default %(default)s)")
    p.add_argument("--tools", default="h2load,ghz", help="load generators (default %(default)s)")
    p.add_argument("--pods", type=int, default=4, help="simulated model servers (default %(default)s)")
    p.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measurement")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/"
                   "compare-<time>.json)")
    a = p.parse_args()
    conc = [int(x) for x in a.concurrency.split(",")]
    tools = [t for t in a.tools.split(",") if t]
    h2load = shutil.which("h2load") if "h2load" in tools else None
    ghz = sweep.find_ghz() if "ghz" in tools else None
    if "h2load" in tools and h2load is None:
        raise SystemExit(f"h2load not found; install: {bx.H2LOAD_INSTALL} (or make bench-tools)")
    if "ghz" in tools and ghz is None:
        raise SystemExit(f"ghz not found; install: {sweep.GHZ_INSTALL} (or make bench-tools)")
    if k.binaries() is None:
        raise SystemExit(f"kube-apiserver/etcd not built: bash {BUILD_APISERVER}")
    binary, crds = build_goepp()
    make_data.write()
    started = datetime.datetime.now(datetime.UTC)
    result: dict[str, Any] = {"started": started.isoformat(timespec="seconds"),
                              "machine_before": bx.machine(), "seconds": a.duration,
                              "repeat": a.repeat, "concurrency": conc, "tools": tools,
                              "go_epp": str(binary), "pods": a.pods}
    print(f"machine: {result['machine_before']}", flush=True)

    cluster = k.start_cluster()
    procs: list[Proc] = []
    try:
        admin = cluster.admin()
        sims, ips, port = start_sims(a.pods)
        procs.append(sims)
        hosts = {f"{ip}:{port}" for ip in ips}
        setup_pool(admin, crds, ips, port)
        kubeconfig = cluster.kubeconfig(k.ADMIN_TOKEN)
        go, go_port, go_metrics = start_go_epp(binary, kubeconfig, hosts)
        procs.append(go)
        ours = start_epp("--pool-name", POOL, "--pool-namespace", NAMESPACE,
                         "--kubeconfig", kubeconfig, "--metrics-endpoint-auth=false")
        procs.append(ours.proc)
        bx.check_direct(ours.grpc_port, hosts)
        floor_port, floor = bx.start_floor()
        procs.append(floor)
        targets = {"go": (go_port, go.p.pid, go_metrics),
                   "ours": (ours.grpc_port, ours.proc.p.pid, ours.metrics_port),
                   "floor": (floor_port, floor.p.pid, None)}
        pids = {t: v[1] for t, v in targets.items()}
        print(f"pool of {a.pods} pods {sorted(hosts)}; pids {pids}", flush=True)
        time.sleep(2.0)  # let both settle after their first sync
        result["idle_cpu"] = idle_cpu_all(pids, a.idle)
        result["rss_idle_kib"] = {t: rss_kib(pid) for t, pid in pids.items()}
        print("idle CPU (share of a core): " + ", ".join(
            f"{t} {v * 100:.1f}%" for t, v in result["idle_cpu"].items()), flush=True)

        runs: list[dict[str, Any]] = []
        data = None
        if h2load:
            with tempfile.NamedTemporaryFile(suffix=".grpc", delete=False) as f:
                f.write(bx.grpc_frames())
                data = f.name
        try:
            for rep in range(a.repeat):
                for c in conc:
                    order = list(TARGETS) if rep % 2 == 0 else list(reversed(TARGETS))
                    for tool in tools:
                        for t in order:
                            grpc_port, pid, metrics = targets[t]
                            runs.append(one_run(tool, t, rep, c, a.duration, grpc_port, pid,
                                                metrics, h2load, ghz, data))
        finally:
            if data:
                os.unlink(data)
        result["rss_after_kib"] = {t: rss_kib(pid) for t, pid in pids.items()}
        result["runs"] = runs
        result["medians"] = medians(runs)
        result["ratios"] = paired_ratios(runs)
        for t, proc in (("go", go), ("ours", ours.proc)):
            if proc.p.poll() is not None:
                raise RuntimeError(f"{t} EPP exited during the runs:\n{proc.output()[-2000:]}")
    finally:
        for pr in reversed(procs):
            pr.stop()
        cluster.stop()

    result["machine_after"] = bx.machine()
    print(f"\nMachine: {result['machine_before']} (before), {result['machine_after']} (after)")
    print(f"{a.repeat} x {a.duration:g} s per point, targets interleaved; medians")
    for tool in tools:
        print(f"\n{tool}: one ext_proc exchange (headers + ~1 KB body) per stream, 1 HTTP/2 "
              f"connection")
        print(side_by_side(result["medians"], tool))
    print("\nCPU per exchange, ratios paired per repetition (median, min-max):")
    print(bx.ratio_table(result["ratios"], PAIRS, group=("tool", "concurrency")))
    print("\nIdle (no traffic, 4 pods scraped every 50 ms, watches open), RSS idle / after load:")
    for t in TARGETS:
        print(f"- {t}: {result['idle_cpu'][t] * 100:.1f}% of a core, RSS "
              f"{result['rss_idle_kib'][t]['VmRSS'] / 1024:.0f} / "
              f"{result['rss_after_kib'][t]['VmRSS'] / 1024:.0f} MiB "
              f"(peak {result['rss_after_kib'][t]['VmHWM'] / 1024:.0f} MiB)")
    out = a.out or ROOT / "benchmarks" / "results" / f"compare-{started:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nresults: {out}")
    if any(m["errors"] for m in result["medians"]):
        print("ERRORS during the runs: the numbers above are not valid", file=sys.stderr)
        return 1
    return 0


def one_run(tool: str, target: str, rep: int, c: int, seconds: float, port: int, pid: int,
            metrics_port: int | None, h2load: str | None, ghz: str | None,
            data: str | None) -> dict[str, Any]:
    """One bounded load run against one target, checked for unrouted exchanges."""
    before = bx.epp_routed_total(metrics_port) if metrics_port else 0.0
    if tool == "h2load":
        assert h2load and data
        d = bx.run_h2load(h2load, port, data, c, seconds, pid)
        errors = d["failed"]
    else:
        assert ghz
        r = sweep.run_ghz(ghz, f"127.0.0.1:{port}", "process", concurrency=c,
                          duration=f"{seconds:g}s", server_pid=pid, target=target)
        d = {"count": r.count, "rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
             "server_cpu_us": r.server_cpu_us, "client_cpu_us": r.client_cpu_us}
        errors = sum(r.errors.values())
    if metrics_port:
        routed = bx.epp_routed_total(metrics_port) - before
        # ghz leaves out calls cut by the end of the run, which the EPP may have counted.
        errors += max(0, d["count"] - int(routed))
    d.update(tool=tool, target=target, rep=rep, concurrency=c, errors=errors)
    print(f"{tool} rep {rep} c={c} {target}: {d['rps']:,.0f} exch/s, p50 {d['p50_ms']:.2f} ms, "
          f"p99 {d['p99_ms']:.2f} ms, server CPU {d['server_cpu_us'] or 0:,.0f} µs/exch, "
          f"errors {errors}", flush=True)
    return d


if __name__ == "__main__":
    raise SystemExit(main())
