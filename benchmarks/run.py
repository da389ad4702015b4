"""Run every benchmark, one at a time: `make bench` (quick, CI) or `make bench-full`.

    .venv/bin/python -m benchmarks.run --quick      # bounded: a few minutes on 2 busy cores
    .venv/bin/python -m benchmarks.run --full       # the sizes RESULTS.md quotes
    .venv/bin/python -m benchmarks.run --quick --only pick routing

Quick mode exists so that the benchmarks never rot: every script runs end to end at a
small size and must exit 0; its numbers are not for quoting. Full mode runs the sizes the
report uses. Benchmarks run sequentially (never two heavy ones at once on a 2-core
machine), each as its own process with its output in `<out-dir>/<name>.log`; a summary
(command, exit code, seconds) is printed at the end and written to `<out-dir>/summary.json`.
The exit code is 1 when any benchmark failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    quick: tuple[str, ...] | None
    """Arguments in quick mode; None: full mode only."""
    full: tuple[str, ...] = ()
    note: str = ""
    out_flag: str | None = None
    """Flag naming a results file, pointed into the run's directory."""


BENCHES = (
    Bench("promtext", "bench_promtext.py", ("--seconds", "0.3"),
          note="no --quick flag: quick mode passes a small --seconds"),
    Bench("scrape-scale", "bench_scrape_scale.py",
          ("--n", "10", "100", "--clients", "raw", "--seconds", "1", "--warmup", "0.5"),
          ("--n", "10", "100", "500", "--seconds", "5"),
          note="no --quick flag: quick mode passes small --n/--seconds"),
    Bench("pick", "bench_pick.py", ("--quick", "--sizes", "8", "64", "512")),
    Bench("flowcontrol", "bench_flowcontrol.py", ("--requests", "1000", "--rounds", "2"),
          note="no --quick flag: quick mode passes small --requests/--rounds"),
    Bench("sim", "bench_sim.py", ("--requests", "150", "--rounds", "1"),
          ("--requests", "1500", "--rounds", "3"),
          note="no --quick flag: quick mode passes small --requests/--rounds"),
    Bench("observe", "bench_observe.py", ("--requests", "300", "--rounds", "2"),
          note="no --quick flag: quick mode passes small --requests/--rounds"),
    Bench("extproc", "bench_extproc.py", ("--quick",), out_flag="--out"),
    Bench("routing", "bench_routing.py", ("--quick",), out_flag="--out"),
    Bench("endless-page", "bench_endless_page.py", ("--polls", "5"), ("--polls", "40"),
          note="no --quick flag: quick mode passes a small --polls"),
    Bench("soak", "bench_soak.py", ("--quick",), ("--seconds", "600"), out_flag="--out",
          note="quick: 40 s with a compressed chaos schedule; full: the 10-minute soak"),
    Bench("routing-desim", "routing/desim.py",
          ("--shapes", "skewed-prefix", "--qps", "64", "--seeds", "1", "--requests", "300"),
          note="virtual clock, no HTTP: oracle vs default vs upstream formulas"),
    Bench("active-active", "bench_active_active.py", ("--quick",),
          ("--qps", "8", "16", "--requests", "240", "--repeat", "2"), out_flag="--out",
          note="needs redis-server (make redis-server)"),
    Bench("routing-inflight", "bench_routing.py", None,
          ("--shapes", "shared-prefix", "--strategies", "queue+kv", "queue+kv-no-inflight",
           "default", "default-no-inflight", "--qps", "48", "--repeat", "2",
           "--refresh-interval", "0.5", "--no-plot"), out_flag="--out",
          note="in-flight accounting ablation with 500 ms scrapes (full mode only)"),
    Bench("compare", "bench_compare.py", None, out_flag="--out",
          note="beside the upstream Go EPP v1.5.0 and a kube-apiserver (full mode only; "
               "`make bench-compare` builds both first)"),
    Bench("kvevents", "bench_kvevents.py", ("--quick",)),
    Bench("kvevents-bound", "bench_kvevents_bound.py", ("--quick",),
          note="intake with one bound socket (llm-d's deployment) against the connect mode"),
    Bench("routing-stale", "bench_routing.py", None,
          ("--shapes", "stale-prefix", "--repeat", "2"), out_flag="--out",
          note="exact vs approximate prefix-cache routing where the approximate index goes "
               "stale (full mode only)"),
)


def machine() -> str:
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPUs ({platform.machine()}), Python {platform.python_version()}, "
            f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")


def run(bench: Bench, full: bool, out_dir: Path, timeout: float) -> dict[str, object]:
    args = list(bench.full if full else bench.quick or ())
    if bench.out_flag:
        suffix = ".json"
        args += [bench.out_flag, str(out_dir / f"{bench.name}{suffix}")]
    cmd = [sys.executable, str(ROOT / "benchmarks" / bench.script), *args]
    shown = " ".join([".venv/bin/python", f"benchmarks/{bench.script}", *args])
    log = out_dir / f"{bench.name}.log"
    print(f"== {bench.name}: {shown}", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = -1
            f.write(f"\n[benchmarks.run] timed out after {timeout:.0f} s\n")
    dt = time.perf_counter() - t0
    status = "ok" if rc == 0 else ("TIMEOUT" if rc == -1 else f"FAILED (exit {rc})")
    print(f"   {status} in {dt:.0f} s; log {log}", flush=True)
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print("   | " + "\n   | ".join(tail), flush=True)
    return {"name": bench.name, "command": shown, "exit": rc, "seconds": round(dt, 1),
            "log": str(log), "note": bench.note}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="small sizes, for CI")
    mode.add_argument("--full", action="store_true", help="the report's sizes")
    ap.add_argument("--only", nargs="+", choices=[b.name for b in BENCHES])
    ap.add_argument("--out-dir", type=Path,
                    help="logs and results (default: a temp dir for --quick, "
                         "benchmarks/results/run-<time>/ for --full)")
    ap.add_argument("--timeout", type=float,
                    help="seconds per benchmark before it is stopped (quick 240, full 5400)")
    args = ap.parse_args(argv)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="epp-bench-")) if args.quick
                               else ROOT / "benchmarks" / "results" / f"run-{stamp}")
    out_dir.mkdir(parents=True, exist_ok=True)
    timeout = args.timeout or (240.0 if args.quick else 5400.0)
    print(f"benchmarks ({'full' if args.full else 'quick'}) on {machine()}; output in {out_dir}",
          flush=True)
    t0 = time.perf_counter()
    rows = [run(b, args.full, out_dir, timeout) for b in BENCHES
            if (not args.only or b.name in args.only) and (args.full or b.quick is not None)]
    total = time.perf_counter() - t0
    print("\n| benchmark | exit | seconds | command |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['exit']} | {r['seconds']} | `{r['command']}` |")
    print(f"\ntotal {total:.0f} s")
    (out_dir / "summary.json").write_text(json.dumps(
        {"mode": "full" if args.full else "quick", "machine": machine(), "started": stamp,
         "seconds": round(total, 1), "benchmarks": rows}, indent=1))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
