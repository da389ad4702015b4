"""ext_proc load: the EPP alone (ghz, h2load), and end to end through Envoy with and without it.

One entry point, everything on 127.0.0.1:

1. starts 3 upstream HTTP servers (tests/support.py's fleet), the EPP as a real process
   (`python -m epp --secure-serving=false --endpoints ...`), the do-nothing grpc.aio
   server `ghz/floor_server.py` (grpcio's own cost: the baseline), and five Envoys built by
   `epp envoy-config`'s builder: the default config (`--response-path=observed`),
   `--response-path=blocking`, `--process-response=false`, the same with the floor server
   in the EPP's place (the latency grpcio alone adds), and one with the ext_proc filters
   removed;
2. checks that each path really routes (a direct exchange must name an upstream; a request
   through each Envoy must come back 200 from an upstream), so errors are never timed;
3. direct: ghz against `ExternalProcessor/Process` (one headers+body exchange per call, as
   Envoy sends it) on the EPP and the floor, and `epp.v1.Picker/Pick` when served; then
   h2load (a C client) sending the same exchange as raw gRPC frames, checked against the
   EPP's own routed-request counter; CPU per exchange of the server process for each run;
4. end to end: wrk (POST /v1/completions, a ~1 KB JSON body) through every Envoy,
   interleaved in the same run, so "added latency" is the p50 difference under the same
   machine load, paired per repetition; and at concurrency 1, the time to the first event
   of a streamed completion through each Envoy (token streaming).

`--tuning uvloop gc-freeze ...` adds one more EPP per named runtime tuning (epp/tuning.py,
environment variables, off by default) as direct targets `epp+<name>`, measured in the
same interleaved runs as the default EPP and the floor.

Each run is bounded (`--duration`), repeated (`--repeat`), and reported as medians.
`--quick` takes a few seconds (CI runs it so this never rots); the default is the full
sweep for benchmarks/RESULTS.md.

Tools (not Python packages):
- ghz:  GOBIN=$HOME/.cache/epp-tools/bin go install github.com/bojand/ghz/cmd/ghz@v0.120.0
- wrk:  apt-get update && apt-get install -y wrk             (Debian package `wrk`)
- h2load: apt-get update && apt-get install -y nghttp2-client (Debian; a C gRPC-frame client
  for the direct runs: ghz costs as much CPU per call as the EPP, which on 2 cores halves
  what the EPP can show)
A missing tool skips its part with a message saying how to install it.

Usage:
    .venv/bin/python benchmarks/bench_extproc.py --quick
    .venv/bin/python benchmarks/bench_extproc.py            # full: c=1,8,32,64, 3 x 5 s
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "ghz"))

import make_data
import sweep

from tests.support import (
    EnvoyProcess,
    Proc,
    UpstreamFleet,
    free_port,
    post_json,
    retry_port_taken,
    start_envoy,
    start_epp,
)

WRK_INSTALL = "apt-get update && apt-get install -y wrk"
H2LOAD_INSTALL = "apt-get update && apt-get install -y nghttp2-client"
# Runtime tunings the EPP honours (epp/tuning.py), by the names `--tuning` takes.
TUNINGS: dict[str, dict[str, str]] = {
    "uvloop": {"EPP_EVENT_LOOP": "uvloop"},
    "gc-freeze": {"EPP_GC_FREEZE": "1"},
    "gc-gen0-10k": {"EPP_GC_THRESHOLD": "10000"},
    "gc-freeze-gen0-10k": {"EPP_GC_FREEZE": "1", "EPP_GC_THRESHOLD": "10000"},
    "uvloop-gc": {"EPP_EVENT_LOOP": "uvloop", "EPP_GC_FREEZE": "1", "EPP_GC_THRESHOLD": "10000"},
}
METRICS_FIXTURE = ROOT / "tests" / "fixtures" / "metrics" / "vllm-v1-2025-11-qwen1.5-0.5b-chat.txt"

# wrk: POST the same body as ghz; every request names an upstream in the destination header,
# which is what the no-EPP Envoy routes on and what the EPP must overwrite (same client work
# on both paths). done() prints one JSON line that the script parses.
WRK_LUA = r"""
local body = BODY
local hosts = HOSTS
local pace = PACE_MS
local n = 0
delay = function()
  return pace
end
request = function()
  n = n + 1
  return wrk.format("POST", "/v1/completions", {
    ["Host"] = "bench",
    ["Content-Type"] = "application/json",
    ["x-gateway-destination-endpoint"] = hosts[(n % #hosts) + 1],
  }, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
    latency.max))
end
"""


def _lua_str(b: bytes) -> str:
    return json.dumps(b.decode())  # a JSON string is a valid Lua string for this ASCII body


def without_ext_proc(cfg: dict[str, Any]) -> None:
    """Patch an `epp envoy-config` bootstrap: drop the ext_proc filters (routing and the
    response filters), keep everything else."""
    for lst in cfg["staticResources"]["listeners"]:
        for chain in lst["filterChains"]:
            for f in chain["filters"]:
                hcm = f["typedConfig"]
                kept = [h for h in hcm["httpFilters"]
                        if "ext_proc" not in h["typedConfig"]["@type"]]
                if len(kept) == len(hcm["httpFilters"]):
                    raise RuntimeError("no ext_proc filter to remove: config layout changed")
                hcm["httpFilters"] = kept


def start_floor(destination: str = "127.0.0.1:8000") -> tuple[int, Proc]:
    """The do-nothing grpc.aio ext_proc server: grpcio's own cost per exchange (behind
    Envoy, it names `destination`). Restarted on new ports if its port was taken."""

    def start() -> tuple[int, Proc]:
        port = free_port()
        proc = Proc([sys.executable, str(ROOT / "benchmarks" / "ghz" / "floor_server.py"),
                     "--port", str(port), "--destination", destination], "floor")
        # Its line, not a connect: a connect would also reach a process that took the port.
        proc.wait_ready(lambda: f"on 127.0.0.1:{port}" in proc.output(), 30, "floor server")
        return port, proc

    return retry_port_taken(start, "floor server")


def serves_pick(port: int) -> bool:
    """True when the EPP answers epp.v1.Picker/Pick (any answer but UNIMPLEMENTED)."""
    import grpc

    try:
        from epp.v1 import pick_pb2
    except ImportError:
        return False
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary("/epp.v1.Picker/Pick",
                              request_serializer=pick_pb2.PickRequest.SerializeToString,
                              response_deserializer=pick_pb2.PickResponse.FromString)
        try:
            call(pick_pb2.PickRequest(model="m", prompt="hello"), timeout=5)
        except grpc.RpcError as e:
            return e.code() != grpc.StatusCode.UNIMPLEMENTED
    return True


def check_direct(port: int, hosts: set[str]) -> None:
    """One exchange with the ghz call data, from Python: the EPP must name an upstream."""
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
    from google.protobuf import json_format

    text = (make_data.HERE / "process-data.json").read_text()
    text = text.replace("{{.UUID | b64enc}}", base64.b64encode(uuid.uuid4().hex.encode()).decode())
    msgs = [json_format.ParseDict(m, ep.ProcessingRequest()) for m in json.loads(text)]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        replies = list(ep_grpc.ExternalProcessorStub(ch).Process(iter(msgs), timeout=10))
    dest = [h.header.raw_value.decode() for r in replies if r.HasField("request_headers")
            for h in r.request_headers.response.header_mutation.set_headers
            if h.header.key == "x-gateway-destination-endpoint"]
    if not dest or dest[0] not in hosts:
        raise RuntimeError(f"the EPP did not route the benchmark exchange: {replies}")


def check_envoy(env: EnvoyProcess, body: bytes, forced: str) -> None:
    r = post_json(env.url + "/v1/completions", json.loads(body),
                  headers={"x-gateway-destination-endpoint": forced})
    if r.status != 200 or "served_by" not in r.json():
        raise RuntimeError(f"Envoy on {env.port} did not serve the benchmark request: "
                           f"{r.status} {r.body[:200]!r}")


def grpc_frames(drop_request_id: bool = True) -> bytes:
    """The ghz call data as one gRPC request body (length-prefixed messages) for h2load.

    h2load sends the same bytes every time, so `x-request-id` is dropped and the EPP makes
    a fresh id per request, as it does for clients that send none.
    """
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    from google.protobuf import json_format

    msgs = json.loads((make_data.HERE / "process-data.json").read_text())
    if drop_request_id:
        hm = msgs[0]["request_headers"]["headers"]
        hm["headers"] = [h for h in hm["headers"] if h["key"] != "x-request-id"]
    out = b""
    for m in msgs:
        b = json_format.ParseDict(m, ep.ProcessingRequest()).SerializeToString()
        out += b"\0" + struct.pack(">I", len(b)) + b
    return out


def epp_routed_total(metrics_port: int) -> float:
    """The EPP's own count of requests it routed (inference_objective_request_total)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith("inference_objective_request_total{"))


def run_h2load(h2load: str, port: int, data: str, concurrency: int, seconds: float,
               server_pid: int) -> dict[str, Any]:
    """One h2load run: `concurrency` streams on one HTTP/2 connection, as Envoy uses.

    h2load only sees HTTP statuses (a gRPC error is a 200 with grpc-status in trailers):
    the caller checks the EPP's own routed-request counter against the count.
    """
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        args = [h2load, "-c1", f"-m{concurrency}", "-D", f"{seconds:g}", "-d", data,
                "-H", "content-type: application/grpc", "-H", "te: trailers",
                "--log-file", log.name,
                f"http://127.0.0.1:{port}/envoy.service.ext_proc.v3.ExternalProcessor/Process"]
        s0 = sweep.process_cpu_seconds(server_pid)
        p = subprocess.run(args, capture_output=True, text=True, check=False, timeout=seconds + 30)
        s1 = sweep.process_cpu_seconds(server_pid)
        lat = sorted(int(ln.split("\t")[2]) for ln in Path(log.name).read_text().splitlines()
                     if ln.count("\t") >= 2 and ln.split("\t")[1] == "200")
    out = p.stdout
    if "succeeded" not in out:
        raise RuntimeError(f"h2load failed ({p.returncode}): {p.stderr or out}")
    done = int(out.split("succeeded")[0].split(",")[-1].split()[0])
    failed = int(out.split("succeeded,")[1].split("failed")[0])
    rps = float(out.split("finished in")[1].split(",")[1].split()[0])

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] / 1000 if lat else float("nan")

    return {"concurrency": concurrency, "count": done, "failed": failed, "rps": rps,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "server_cpu_us": (s1 - s0) / done * 1e6 if done else None}


def h2_medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for t, c in sorted({(r["target"], r["concurrency"]) for r in runs}):
        rs = [r for r in runs if (r["target"], r["concurrency"]) == (t, c)]
        out.append({"target": t, "concurrency": c, "runs": len(rs),
                    "rps": statistics.median(r["rps"] for r in rs),
                    "rps_min": min(r["rps"] for r in rs), "rps_max": max(r["rps"] for r in rs),
                    "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                    "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                    "server_cpu_us": statistics.median(r["server_cpu_us"] for r in rs),
                    "errors": sum(r["failed"] + r.get("unrouted", 0) for r in rs)})
    return out


def paired_ratios(runs: list[dict[str, Any]], pairs: list[tuple[str, str]],
                  group: tuple[str, ...] = ("concurrency",),
                  key: str = "server_cpu_us") -> list[dict[str, Any]]:
    """Per group (e.g. concurrency): for each (a, b) target pair, the median over repetitions
    of a's `key` / b's `key` within the same repetition, and its min-max. Runs of one
    repetition share the machine's load of that minute, so on a shared machine these
    ratios are steadier than either absolute number."""
    out = []
    for g in sorted({tuple(r[k] for k in group) for r in runs}):
        by_rep: dict[int, dict[str, float]] = {}
        for r in runs:
            if tuple(r[k] for k in group) == g and r.get(key):
                by_rep.setdefault(r["rep"], {})[r["target"]] = r[key]
        row: dict[str, Any] = dict(zip(group, g))
        for a, b in pairs:
            ratios = [v[a] / v[b] for v in by_rep.values() if a in v and b in v]
            if ratios:
                row[f"{a}/{b}"] = statistics.median(ratios)
                row[f"{a}/{b} range"] = (min(ratios), max(ratios))
        out.append(row)
    return out


def ratio_table(rows: list[dict[str, Any]], pairs: list[tuple[str, str]],
                group: tuple[str, ...] = ("concurrency",), what: str = "CPU/exch") -> str:
    names = [f"{a}/{b}" for a, b in pairs]
    lines = ["| " + " | ".join(group) + " | " + " | ".join(f"{what} {n} (min-max)" for n in names)
             + " |", "|" + "---:|" * (len(group) + len(names))]
    for r in rows:
        cells = [f"{r[n]:.2f} ({r[n + ' range'][0]:.2f}-{r[n + ' range'][1]:.2f})" if n in r else ""
                 for n in names]
        lines.append("| " + " | ".join(str(r[k]) for k in group) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def h2_table(rows: list[dict[str, Any]]) -> str:
    lines = [("| server | concurrency | runs | exchanges/s (median) | min-max | p50 ms | p99 ms "
              "| server CPU µs/exchange | errors |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['concurrency']} | {r['runs']} | {r['rps']:,.0f} | "
                     f"{r['rps_min']:,.0f}-{r['rps_max']:,.0f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['server_cpu_us']:,.0f} | {r['errors']} |")
    return "\n".join(lines)


def idle_cpu(pid: int, seconds: float) -> float:
    """Share of one core the process uses with no traffic (its background scraping)."""
    s0, t0 = sweep.process_cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (sweep.process_cpu_seconds(pid) - s0) / (time.monotonic() - t0)


def run_wrk(wrk: str, url: str, script: str, concurrency: int, seconds: float) -> dict[str, Any]:
    args = [wrk, "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "10s",
            "-s", script, url]
    p = subprocess.run(args, capture_output=True, text=True, check=False, timeout=seconds + 30)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stderr or p.stdout}")
    d = json.loads(line[len("WRKJSON "):])
    d["rps"] = d["requests"] / (d["duration_us"] / 1e6)
    d["errors"] = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
    return d


PACE_MS = 5
"""Think time between a paced client's requests: a response's end no longer overlaps the next
request, as with a real model server whose answers take far longer than the EPP's work."""
VARIANTS = {
    "with_epp": "Envoy + EPP as `epp envoy-config` writes it (--response-path=observed: the "
                "response followed by an observability-mode filter)",
    "with_epp_blocking": "Envoy + EPP, --response-path=blocking (the EPP holds every response "
                         "chunk; the shipped config before issue 18)",
    "with_epp_request_only": "Envoy + EPP, request phases only (--process-response=false)",
    "floor_request_only": "Envoy + the do-nothing grpc.aio server (ghz/floor_server.py) in the "
                          "routing filter's place, request phases only: grpcio's bound",
    "with_epp_buffered_request_only": "Envoy + EPP, BUFFERED request body, request phases only "
                                      "(--body-mode=buffered --process-response=false)",
    "without_epp": "Envoy without the ext_proc filter (client names the upstream)",
}


def ttfb(port: int, body: bytes, count: int, destination: str) -> dict[str, Any]:
    """Time to the first event of a streamed completion (`"stream": true`), in ms, over
    `count` sequential requests on one keep-alive connection: what a token-streaming
    client waits before its first token (the upstream sends it at once)."""
    import socket

    head = (f"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"x-gateway-destination-endpoint: {destination}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    out, errors = [], 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for _ in range(count):
            t0 = time.perf_counter()
            sock.sendall(head + body)
            buf = b""
            first = None
            while not buf.endswith(b"0\r\n\r\n"):  # the chunked body's end
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError("connection closed mid-response")
                buf += data
                if first is None and b"data:" in buf:
                    first = time.perf_counter() - t0
            if first is None or b" 200 " not in buf[:20]:
                errors += 1
                continue
            out.append(first * 1000)
    out.sort()
    return {"count": len(out), "errors": errors,
            "p50_ms": out[len(out) // 2] if out else float("nan"),
            "p99_ms": out[min(len(out) - 1, int(0.99 * len(out)))] if out else float("nan")}


def e2e_medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per concurrency and variant; added p50 = median over same-repetition pairs."""
    out = []
    for c in sorted({r["concurrency"] for r in runs}, key=lambda c: (int(str(c).split()[0]), str(c))):
        row: dict[str, Any] = {"concurrency": c}
        for v in VARIANTS:
            rs = [r for r in runs if r["concurrency"] == c and r["variant"] == v]
            if rs:
                row[v] = {"runs": len(rs), "rps": statistics.median(r["rps"] for r in rs),
                          "p50_ms": statistics.median(r["p50_us"] for r in rs) / 1000,
                          "p99_ms": statistics.median(r["p99_us"] for r in rs) / 1000,
                          "errors": sum(r["errors"] for r in rs)}
        for v in VARIANTS:
            if v == "without_epp":
                continue
            pairs = []
            for rep in sorted({r["rep"] for r in runs}):
                w = [r for r in runs if (r["concurrency"], r["variant"], r["rep"]) == (c, v, rep)]
                wo = [r for r in runs
                      if (r["concurrency"], r["variant"], r["rep"]) == (c, "without_epp", rep)]
                if w and wo:
                    pairs.append((w[0]["p50_us"] - wo[0]["p50_us"]) / 1000)
            if pairs:
                row[f"added_p50_ms/{v}"] = statistics.median(pairs)
                row[f"added_p50_ms_pairs/{v}"] = pairs
        out.append(row)
    return out


def ttfb_medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: medians of p50/p99, and the p50 added over Envoy alone paired per
    repetition."""
    out = []
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        if not rs:
            continue
        row: dict[str, Any] = {"variant": v, "runs": len(rs),
                               "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                               "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                               "errors": sum(r["errors"] for r in rs)}
        pairs = [r["p50_ms"] - w["p50_ms"] for r in rs for w in runs
                 if w["variant"] == "without_epp" and w["rep"] == r["rep"]]
        if v != "without_epp" and pairs:
            row["added_p50_ms"] = statistics.median(pairs)
        out.append(row)
    return out


def e2e_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| concurrency | variant | req/s | p50 ms | p99 ms | added p50 ms vs no EPP | errors |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        for v in VARIANTS:
            m = r.get(v)
            if not m:
                continue
            added = r.get(f"added_p50_ms/{v}")
            lines.append(f"| {r['concurrency']} | {v} | {m['rps']:,.0f} | {m['p50_ms']:.2f} | "
                         f"{m['p99_ms']:.2f} | {'' if added is None else f'{added:+.2f}'} | "
                         f"{m['errors']} |")
    return "\n".join(lines)


def machine() -> str:
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
            f"Python {platform.python_version()}, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few seconds in all (CI)")
    p.add_argument("--concurrency", help="comma list (default 1,8,32,64; quick: 8 direct, 1 end to end)")
    p.add_argument("--duration", type=float, help="seconds per run (default 5; quick: 1)")
    p.add_argument("--repeat", type=int, help="repetitions (default 3; quick: 1)")
    p.add_argument("--skip-direct", action="store_true")
    p.add_argument("--skip-envoy", action="store_true")
    p.add_argument("--no-floor", action="store_true",
                   help="do not run the do-nothing grpc.aio server (ghz/floor_server.py) beside the EPP")
    p.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/"
                   "extproc-<time>.json in full mode, a temp file in quick mode)")
    p.add_argument("--tuning", nargs="+", default=[], choices=sorted(TUNINGS),
                   help="also run an EPP per named runtime tuning (direct runs only)")
    p.add_argument("--hold", type=float, default=0.0,
                   help="after starting everything, keep it up this many seconds (for profiling)")
    a = p.parse_args()
    conc = [int(x) for x in (a.concurrency or ("8" if a.quick else "1,8,32,64")).split(",")]
    seconds = a.duration or (1.0 if a.quick else 5.0)
    repeat = a.repeat or (1 if a.quick else 3)
    if a.quick and not a.concurrency:
        e2e_conc = [1]
    else:
        e2e_conc = conc

    ghz = sweep.find_ghz()
    wrk = shutil.which("wrk")
    h2load = shutil.which("h2load")
    if h2load is None:
        print(f"SKIP direct ext_proc load from a C client: h2load not found. Install: {H2LOAD_INSTALL}")
    if ghz is None:
        print(f"SKIP direct ext_proc load: ghz not found. Install: {sweep.GHZ_INSTALL}")
    if wrk is None:
        print(f"SKIP end-to-end load through Envoy: wrk not found. Install: {WRK_INSTALL}")
    make_data.write()
    body = make_data.completion_body()
    started = datetime.datetime.now(datetime.UTC)
    result: dict[str, Any] = {"started": started.isoformat(timespec="seconds"),
                              "machine_before": machine(), "quick": a.quick,
                              "seconds": seconds, "repeat": repeat, "concurrency": conc,
                              "body_bytes": len(body), "direct": {}, "e2e": {}}

    with UpstreamFleet(3) as fleet:
        page = METRICS_FIXTURE.read_text() if METRICS_FIXTURE.exists() else ""
        for u in fleet.upstreams:
            u.metrics_page = page
        hosts = [u.hostport for u in fleet.upstreams]
        epp = start_epp(endpoints=",".join(hosts))
        envoys: dict[str, EnvoyProcess] = {}
        procs: list[Proc] = []
        # Direct targets: name -> (gRPC port, pid); EPPs also by their metrics port.
        targets = {"epp": (epp.grpc_port, epp.proc.p.pid)}
        metrics_ports = {"epp": epp.metrics_port}
        try:
            for name in a.tuning:
                tuned = start_epp(endpoints=",".join(hosts), env=TUNINGS[name])
                procs.append(tuned.proc)
                check_direct(tuned.grpc_port, set(hosts))
                targets[f"epp+{name}"] = (tuned.grpc_port, tuned.proc.p.pid)
                metrics_ports[f"epp+{name}"] = tuned.metrics_port
                print(f"EPP with {TUNINGS[name]}: pid {tuned.proc.p.pid}", flush=True)
            print(f"EPP pid {epp.proc.p.pid} on 127.0.0.1:{epp.grpc_port}; upstreams {hosts}",
                  flush=True)
            check_direct(epp.grpc_port, set(hosts))
            if wrk and not a.skip_envoy:
                envoys["with_epp"] = start_envoy(epp.grpc_port)
                envoys["with_epp_blocking"] = start_envoy(epp.grpc_port, response_path="blocking")
                envoys["with_epp_request_only"] = start_envoy(epp.grpc_port, process_response=False)
                if not a.no_floor:
                    e2e_floor = start_floor(destination=hosts[0])
                    procs.append(e2e_floor[1])
                    envoys["floor_request_only"] = start_envoy(e2e_floor[0], process_response=False)
                envoys["without_epp"] = start_envoy(epp.grpc_port, patch=without_ext_proc)
                for v, env in envoys.items():
                    # Through the EPP a forged destination is overwritten; without it the
                    # client's header is the route.
                    check_envoy(env, body, hosts[0] if v == "without_epp" else "127.0.0.1:1")
                    print(f"Envoy {v}: :{env.port} (pid {env.proc.p.pid})", flush=True)
            result["epp_idle_cpu"] = idle_cpu(epp.proc.p.pid, 1.0 if a.quick else 3.0)
            print(f"EPP idle CPU (background scraping of 3 endpoints): "
                  f"{result['epp_idle_cpu'] * 100:.1f}% of a core", flush=True)
            if a.hold:
                print(f"holding {a.hold:g}s", flush=True)
                time.sleep(a.hold)

            if ghz and not a.skip_direct:
                if not a.no_floor:
                    floor = start_floor()
                    procs.append(floor[1])
                    targets["floor"] = (floor[0], floor[1].p.pid)
                host = f"127.0.0.1:{epp.grpc_port}"
                apis = ["process"]
                for api in sweep.CALLS:
                    ok, why = sweep.reflection_works(ghz, host, api)
                    result[f"ghz_reflection_{api}"] = ok or why
                    print(f"ghz via server reflection, {api}: {'works' if ok else why}", flush=True)
                if (make_data.HERE / "pick.protoset").exists() and serves_pick(epp.grpc_port):
                    apis.append("pick")
                else:
                    print("SKIP Pick API: the EPP does not serve epp.v1.Picker", flush=True)
                runs = []
                for rep in range(repeat):
                    for c in conc:
                        jobs = [(t, "process") for t in targets] + [("epp", x) for x in apis[1:]]
                        if rep % 2:
                            jobs.reverse()
                        for target, api in jobs:
                            port, pid = targets[target]
                            r = sweep.run_ghz(ghz, f"127.0.0.1:{port}", api,
                                              concurrency=c, duration=f"{seconds:g}s",
                                              server_pid=pid, target=target)
                            print(f"direct rep {rep} c={c} {target} {api}: {r.rps:,.0f} calls/s, "
                                  f"p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, server CPU "
                                  f"{r.server_cpu_us or 0:,.0f} µs/call, "
                                  f"non-OK {sum(r.errors.values())}", flush=True)
                            runs.append(r)
                result["direct"] = {"runs": [r.row() for r in runs],
                                    "medians": sweep.medians(runs)}
            if h2load and not a.skip_direct:
                if "floor" not in targets and not a.no_floor:
                    floor = start_floor()
                    procs.append(floor[1])
                    targets["floor"] = (floor[0], floor[1].p.pid)
                with tempfile.NamedTemporaryFile(suffix=".grpc", delete=False) as f:
                    f.write(grpc_frames())
                    data = f.name
                h2runs = []
                try:
                    for rep in range(repeat):
                        for c in conc:
                            order = list(targets.items())
                            if rep % 2:
                                order.reverse()
                            for target, (port, pid) in order:
                                mport = metrics_ports.get(target)
                                before = epp_routed_total(mport) if mport else 0
                                d = run_h2load(h2load, port, data, c, seconds, pid)
                                d.update(target=target, rep=rep)
                                if mport:
                                    routed = epp_routed_total(mport) - before
                                    d["unrouted"] = max(0, d["count"] - int(routed))
                                print(f"direct/h2load rep {rep} c={c} {target}: {d['rps']:,.0f} "
                                      f"exchanges/s, p50 {d['p50_ms']:.2f} ms, p99 {d['p99_ms']:.2f} ms, "
                                      f"server CPU {d['server_cpu_us'] or 0:,.0f} µs/exchange, "
                                      f"failed {d['failed'] + d.get('unrouted', 0)}", flush=True)
                                h2runs.append(d)
                finally:
                    os.unlink(data)
                result["direct_h2load"] = {"runs": h2runs, "medians": h2_medians(h2runs)}
                if a.tuning:
                    pairs = [(f"epp+{n}", "epp") for n in a.tuning]
                    result["direct_h2load"]["tuning_ratios"] = {
                        k: paired_ratios(h2runs, pairs, key=k) for k in ("server_cpu_us", "p99_ms")}
            if envoys and wrk:
                with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
                    f.write(WRK_LUA.replace("BODY", _lua_str(body)).replace(
                        "HOSTS", "{" + ",".join(json.dumps(h) for h in hosts) + "}").replace(
                        "PACE_MS", "0"))
                    script = f.name
                with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
                    f.write(WRK_LUA.replace("BODY", _lua_str(body)).replace(
                        "HOSTS", "{" + ",".join(json.dumps(h) for h in hosts) + "}").replace(
                        "PACE_MS", str(PACE_MS)))
                    paced_script = f.name
                runs2 = []
                ttfb_runs: list[dict[str, Any]] = []
                sb = json.loads(body)
                sb["stream"] = True
                stream_body = json.dumps(sb).encode()
                try:
                    for rep in range(repeat):
                        for c in e2e_conc:
                            # Interleaved, order alternating per repetition, so slow drift
                            # in the machine's load hits every variant alike.
                            order = list(envoys.items())
                            if rep % 2:
                                order.reverse()
                            for variant, env in order:
                                d = run_wrk(wrk, env.url + "/v1/completions", script, c, seconds)
                                d.update(variant=variant, concurrency=c, rep=rep)
                                print(f"e2e rep {rep} c={c} {variant}: {d['rps']:,.0f} req/s, "
                                      f"p50 {d['p50_us'] / 1000:.2f} ms, p99 {d['p99_us'] / 1000:.2f} ms, "
                                      f"errors {d['errors']}", flush=True)
                                runs2.append(d)
                                for u in fleet.upstreams:
                                    u.requests.clear()
                            if c != 1:
                                continue
                            for variant, env in order:  # one client with think time
                                d = run_wrk(wrk, env.url + "/v1/completions", paced_script, 1, seconds)
                                d.update(variant=variant, concurrency="1 paced", rep=rep)
                                print(f"e2e rep {rep} c=1 paced {PACE_MS} ms {variant}: "
                                      f"p50 {d['p50_us'] / 1000:.2f} ms, p99 {d['p99_us'] / 1000:.2f} ms, "
                                      f"errors {d['errors']}", flush=True)
                                runs2.append(d)
                            for variant, env in order:  # time to first token, streamed
                                t = ttfb(env.port, stream_body, 20 if a.quick else 300, hosts[0])
                                t.update(variant=variant, rep=rep)
                                print(f"ttfb rep {rep} {variant}: p50 {t['p50_ms']:.2f} ms, "
                                      f"p99 {t['p99_ms']:.2f} ms, errors {t['errors']}", flush=True)
                                ttfb_runs.append(t)
                                for u in fleet.upstreams:
                                    u.requests.clear()
                finally:
                    os.unlink(script)
                    os.unlink(paced_script)
                result["e2e"] = {"runs": runs2, "medians": e2e_medians(runs2)}
                result["ttfb"] = {"runs": ttfb_runs, "medians": ttfb_medians(ttfb_runs)}
        finally:
            for env in envoys.values():
                env.proc.stop()
            for pr in procs:
                pr.stop()
            epp.proc.stop()

    result["machine_after"] = machine()
    print()
    print(f"Machine: {result['machine_before']} (before), {result['machine_after']} (after)")
    print(f"Body: POST /v1/completions, {len(body)} bytes; {repeat} x {seconds:g} s per point")
    if result["direct"]:
        print("\nDirect (ghz, 1 HTTP/2 connection; process = one ext_proc headers+body exchange "
              "per call, pick = one epp.v1.Picker/Pick; floor = ghz/floor_server.py):")
        print(sweep.table(result["direct"]["medians"]))
    if result.get("direct_h2load"):
        print("\nDirect ext_proc (h2load, a C client: the same exchange as raw gRPC frames, "
              "concurrent streams on 1 HTTP/2 connection; errors = HTTP failures + calls "
              "the EPP did not count as routed):")
        print(h2_table(result["direct_h2load"]["medians"]))
        for k, rows in result["direct_h2load"].get("tuning_ratios", {}).items():
            pairs = [(f"epp+{n}", "epp") for n in a.tuning]
            print(f"\nRuntime tunings against the default EPP, {k} paired per repetition "
                  f"(median, min-max):")
            print(ratio_table(rows, pairs, what=k))
    if result["e2e"]:
        print("\nEnd to end through Envoy (wrk, HTTP/1.1 keep-alive, Envoy --concurrency 1):")
        for v, text in VARIANTS.items():
            print(f"- {v}: {text}")
        print(e2e_table(result["e2e"]["medians"]))
    if result.get("ttfb", {}).get("medians"):
        print("\nTime to the first streamed event (`\"stream\": true`, sequential, one connection):")
        print("| variant | runs | p50 ms | p99 ms | added p50 ms vs no EPP | errors |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in result["ttfb"]["medians"]:
            added = r.get("added_p50_ms")
            print(f"| {r['variant']} | {r['runs']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                  f"{'' if added is None else f'{added:+.2f}'} | {r['errors']} |")
    out = a.out
    if out is None and not a.quick:
        out = ROOT / "benchmarks" / "results" / f"extproc-{started:%Y%m%dT%H%M%SZ}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nresults: {out}")
    bad = [m for m in result["direct"].get("medians", []) if m["errors"]]
    bad += [m for m in result.get("direct_h2load", {}).get("medians", []) if m["errors"]]
    bad += [m for m in result["e2e"].get("medians", [])
            if any(m.get(v, {}).get("errors") for v in VARIANTS)]
    bad += [m for m in result.get("ttfb", {}).get("medians", []) if m["errors"]]
    if bad:
        print("ERRORS during the runs: the numbers above are not valid", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
