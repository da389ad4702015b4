"""CPU cost of the simulator (`epp-sim`) per request, against llm-d-inference-sim.

Each server runs as its own process on 127.0.0.1; a client in this process keeps a fixed
number of requests in flight until a fixed count is done. The server's CPU time is read
from /proc/<pid>/stat before and after, so the client's own cost is not counted.
Both servers are set to similar latencies (~12 ms to first token, ~12-15 ms per output
token), so they hold similar numbers of requests in flight. A server whose free port another
process took before it bound it is started again on a new one (`retry_port_taken`).

Also measured: CPU of an idle 8-replica fleet over a few seconds (should be ~0: idle
engines wait on an event, no polling).

    .venv/bin/python benchmarks/bench_sim.py [--requests 600] [--concurrency 32] [--rounds 3]

llm-d-inference-sim comes from tests/tools.py's cache (built if Go is installed); without
it the baseline column is left empty.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Callable

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import Proc, free_port, retry_port_taken, stop_process  # noqa: E402

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def epp_sim_cmd(port: int) -> list[str]:
    return [sys.executable, "-m", "epp.sim.cli", "--port", str(port), "--model", MODEL,
            "--log-level", "WARNING"]


def go_sim_cmd(go_bin: Path, port: int) -> list[str]:
    return [str(go_bin), "--port", str(port), "--model", MODEL, "--force-dummy-tokenizer",
            "--max-num-seqs", "256", "--time-to-first-token", "12ms",
            "--inter-token-latency", "13ms", "-v", "0"]


def start(name: str, cmd_for: Callable[[int], list[str]]) -> tuple[Proc, str]:
    """The server `cmd_for(port)` on a free port, and its URL, once /health answers. A
    port taken before the server bound it makes it exit saying "address already in use"
    (both servers; llm-d-inference-sim with status 0), which `wait_ready` turns into
    `PortTaken`: started again on a new port."""

    def once() -> tuple[Proc, str]:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = Proc(cmd_for(port), "server")

        def healthy() -> bool:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                return r.status == 200

        proc.wait_ready(healthy, 30, name)
        return proc, url

    return retry_port_taken(once, name)


async def drive(url: str, pid: int, requests: int, concurrency: int, stream: bool) -> dict:
    body = {"model": MODEL, "prompt": "Write as if you were a critic: San Francisco " * 4,
            "max_tokens": 16, "stream": stream}
    done = 0

    async def worker(s: aiohttp.ClientSession) -> None:
        nonlocal done
        while done < requests:
            done += 1
            async with s.post(url + "/v1/completions", json=body) as r:
                await r.read()
                assert r.status == 200, r.status

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:
        c0, t0 = cpu_seconds(pid), time.monotonic()
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
        c1, t1 = cpu_seconds(pid), time.monotonic()
    return {"cpu_ms_per_req": (c1 - c0) * 1000 / requests, "req_per_s": requests / (t1 - t0)}


async def idle_fleet_cpu(seconds: float) -> float:
    cmd = [sys.executable, "-m", "epp.sim.cli", "--replicas", "8", "--base-port", "0",
           "--log-level", "WARNING"]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL, cwd=ROOT)
    assert proc.stdout is not None
    try:
        while not (await proc.stdout.readline()).startswith(b"epp-sim: ready"):
            pass
        await asyncio.sleep(0.5)
        c0 = cpu_seconds(proc.pid)
        await asyncio.sleep(seconds)
        return (cpu_seconds(proc.pid) - c0) / seconds * 100
    finally:
        await stop_process(proc)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from tests.tools import LLM_D_INFERENCE_SIM, BuildFailed, GoMissing, ensure

    try:
        go_bin: Path | None = ensure(LLM_D_INFERENCE_SIM)
    except (GoMissing, BuildFailed) as e:
        print(f"no baseline: {e}", file=sys.stderr)
        go_bin = None

    results: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for stream in (False, True):
            servers: list[tuple[str, Callable[[int], list[str]]]] = [
                (f"epp-sim stream={stream}", epp_sim_cmd)]
            if go_bin is not None:
                servers.append((f"llm-d-inference-sim stream={stream}",
                                partial(go_sim_cmd, go_bin)))
            for name, cmd_for in servers:
                proc, url = start(name, cmd_for)  # blocks the loop: nothing else runs yet
                try:
                    r = await drive(url, proc.p.pid, args.requests, args.concurrency, stream)
                finally:
                    proc.stop()
                results.setdefault(name, []).append(r)
    idle = [await idle_fleet_cpu(3.0) for _ in range(args.rounds)]
    out = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for name, rs in results.items()}
    print(json.dumps({"medians": out, "idle_8_replicas_cpu_percent": statistics.median(idle),
                      "requests": args.requests, "concurrency": args.concurrency,
                      "rounds": args.rounds}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
