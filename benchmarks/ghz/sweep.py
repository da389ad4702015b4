"""Run ghz against a running EPP over a concurrency sweep and summarise each run.

Used by `benchmarks/bench_extproc.py`, and on its own against any EPP:

    python benchmarks/ghz/sweep.py --host 127.0.0.1:9002 --api process \\
        --concurrency 1,8,32,64 --duration 5s --repeat 3

ghz prints a report with every call's latency in it (`details`); only the summary is kept
(count, rps, latency distribution, histogram, status and error counts), so the JSON files
under benchmarks/results/ stay small.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GHZ_VERSION = "v0.120.0"
GHZ_INSTALL = (f"GOBIN=$HOME/.cache/epp-tools/bin go install "
               f"github.com/bojand/ghz/cmd/ghz@{GHZ_VERSION}")

CALLS = {
    # api name -> (fully qualified method, protoset file, call data file)
    "process": ("envoy.service.ext_proc.v3.ExternalProcessor/Process",
                "extproc.protoset", "process-data.json"),
    "pick": ("epp.v1.Picker/Pick", "pick.protoset", "pick-data.json"),
}
_KEEP = ("date", "count", "total", "average", "fastest", "slowest", "rps",
         "latencyDistribution", "histogram", "statusCodeDistribution", "errorDistribution")


def find_ghz() -> str | None:
    """`$GHZ`, then ~/.cache/epp-tools/bin/ghz (where the install line puts it), then PATH."""
    for c in (os.environ.get("GHZ"), str(Path.home() / ".cache/epp-tools/bin/ghz")):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return shutil.which("ghz")


@dataclass
class GhzRun:
    api: str
    concurrency: int
    count: int
    rps: float
    p50_ms: float
    p99_ms: float
    avg_ms: float
    ok: int
    errors: dict[str, int] = field(default_factory=dict)
    target: str = "epp"
    server_cpu_us: float | None = None
    """CPU time of the server process (all threads) per completed call, in µs."""
    client_cpu_us: float | None = None
    """CPU time of ghz itself per completed call, in µs."""
    report: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The run without ghz's report: the summary kept in results files."""
        d = asdict(self)
        report = d.pop("report")
        d["latency_ms"] = {str(e["percentage"]): round(e["latency"] / 1e6, 3)
                           for e in report.get("latencyDistribution") or []}
        return d


def _pct(report: dict[str, Any], p: int) -> float:
    for entry in report.get("latencyDistribution") or []:
        if entry.get("percentage") == p:
            return entry["latency"] / 1e6  # ns -> ms
    return float("nan")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_ghz(ghz: str, host: str, api: str = "process", *, concurrency: int = 1,
            duration: str = "5s", connections: int = 1, use_reflection: bool = False,
            data_dir: Path = HERE, timeout: float | None = None,
            server_pid: int | None = None, target: str = "epp") -> GhzRun:
    """One ghz run; the protoset and data file come from `make_data.py` in `data_dir`.

    With `server_pid`, the server's CPU time per call is measured too: on a shared,
    noisy machine that is steadier than calls per second.
    """
    call, protoset, data = CALLS[api]
    args = [ghz, "--insecure", "--call", call, "-D", str(data_dir / data),
            "-c", str(concurrency), "--connections", str(connections), "-z", duration,
            "-O", "json", "--timeout", "10s",
            # Calls cut by the end of the run are not errors of the server: leave them out.
            "--duration-stop", "ignore"]
    if not use_reflection:
        args += ["--protoset", str(data_dir / protoset)]
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        args += ["-o", out.name, host]
        secs = float(duration.rstrip("s")) if duration.endswith("s") else 60.0
        s0 = process_cpu_seconds(server_pid) if server_pid else 0.0
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(args, capture_output=True, text=True, check=False,
                              timeout=timeout or secs + 30)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        s1 = process_cpu_seconds(server_pid) if server_pid else 0.0
        if proc.returncode != 0 and not Path(out.name).stat().st_size:
            raise RuntimeError(f"ghz failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
        full = json.loads(Path(out.name).read_text())
    report = {k: full[k] for k in _KEEP if k in full}
    status = report.get("statusCodeDistribution") or {}
    errors = {k: v for k, v in status.items() if k != "OK"}
    count = int(report.get("count", 0))
    client = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    return GhzRun(api=api, concurrency=concurrency, count=count,
                  rps=float(report.get("rps", 0.0)), p50_ms=_pct(report, 50),
                  p99_ms=_pct(report, 99), avg_ms=report.get("average", 0) / 1e6,
                  ok=int(status.get("OK", 0)), errors=errors, target=target,
                  server_cpu_us=(s1 - s0) / count * 1e6 if server_pid and count else None,
                  client_cpu_us=client / count * 1e6 if count else None, report=report)


def reflection_works(ghz: str, host: str, api: str = "process") -> tuple[bool, str]:
    """Whether ghz can resolve the method through the server's reflection (one call)."""
    call, _, data = CALLS[api]
    p = subprocess.run([ghz, "--insecure", "--call", call, "-D", str(HERE / data), "-n", "1",
                        "-c", "1", host], capture_output=True, text=True, check=False, timeout=60)
    text = (p.stdout + p.stderr).strip()
    ok = p.returncode == 0 and "[OK]" in text
    return ok, "" if ok else text.splitlines()[-1] if text else f"exit {p.returncode}"


def medians(runs: list[GhzRun]) -> list[dict[str, Any]]:
    """Median rps / p50 / p99 per (api, concurrency) over repeated runs."""
    groups: dict[tuple[str, str, int], list[GhzRun]] = {}
    for r in runs:
        groups.setdefault((r.target, r.api, r.concurrency), []).append(r)
    out = []
    for (target, api, c), rs in sorted(groups.items()):
        cpu = [r.server_cpu_us for r in rs if r.server_cpu_us is not None]
        ccpu = [r.client_cpu_us for r in rs if r.client_cpu_us is not None]
        out.append({"target": target, "api": api, "concurrency": c, "runs": len(rs),
                    "server_cpu_us": statistics.median(cpu) if cpu else None,
                    "client_cpu_us": statistics.median(ccpu) if ccpu else None,
                    "rps": statistics.median(r.rps for r in rs),
                    "rps_min": min(r.rps for r in rs), "rps_max": max(r.rps for r in rs),
                    "p50_ms": statistics.median(r.p50_ms for r in rs),
                    "p99_ms": statistics.median(r.p99_ms for r in rs),
                    "errors": sum(sum(r.errors.values()) for r in rs),
                    "ok": sum(r.ok for r in rs)})
    return out


def table(rows: list[dict[str, Any]]) -> str:
    def us(v: float | None) -> str:
        return "" if v is None else f"{v:,.0f}"

    lines = [("| server | API | concurrency | runs | calls/s (median) | min-max | p50 ms | p99 ms "
              "| server CPU µs/call | ghz CPU µs/call | non-OK |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['api']} | {r['concurrency']} | {r['runs']} | "
                     f"{r['rps']:,.0f} | {r['rps_min']:,.0f}-{r['rps_max']:,.0f} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {us(r['server_cpu_us'])} | "
                     f"{us(r['client_cpu_us'])} | {r['errors']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", required=True, help="EPP gRPC address, e.g. 127.0.0.1:9002 (plaintext)")
    p.add_argument("--api", choices=sorted(CALLS), default="process")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--duration", default="5s")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--reflection", action="store_true",
                   help="resolve the method by server reflection instead of the protoset")
    p.add_argument("--server-pid", type=int, help="measure this process's CPU per call")
    p.add_argument("--out", type=Path, help="write the runs and medians as JSON here")
    a = p.parse_args()
    ghz = find_ghz()
    if ghz is None:
        print(f"ghz not found; install it with: {GHZ_INSTALL}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    import make_data

    make_data.write()
    runs = []
    for _ in range(a.repeat):
        for c in (int(x) for x in a.concurrency.split(",")):
            r = run_ghz(ghz, a.host, a.api, concurrency=c, duration=a.duration,
                        use_reflection=a.reflection, server_pid=a.server_pid)
            print(f"{a.api} c={c}: {r.rps:,.0f}/s p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms "
                  f"non-OK {sum(r.errors.values())}", flush=True)
            runs.append(r)
    rows = medians(runs)
    print(table(rows))
    if a.out:
        a.out.write_text(json.dumps({"runs": [r.row() for r in runs], "medians": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
