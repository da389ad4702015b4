"""CPU cost of the simulator (`epp-sim`) per request, against llm-d-inference-sim.

Each server runs as its own process on 127.0.0.1; a client in this process keeps a fixed
number of requests in flight until a fixed count is done. The server's CPU time is read
from /proc/<pid>/stat before and after, so the client's own cost is not counted.
Both servers are set to similar latencies (~12 ms to first token, ~12-15 ms per output
token), so they hold similar numbers of requests in flight.

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
import socket
import statistics
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import stop_process  # noqa: E402

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


async def start(cmd: list[str], url: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url + "/health") as r:
                    if r.status == 200:
                        return proc
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not start")


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
    port = free_port()
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
        del port
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
            port = free_port()
            ours = [sys.executable, "-m", "epp.sim.cli", "--port", str(port), "--model", MODEL,
                    "--log-level", "WARNING"]
            servers = [(f"epp-sim stream={stream}", ours)]
            if go_bin is not None:
                gport = free_port()
                servers.append((f"llm-d-inference-sim stream={stream}", [
                    str(go_bin), "--port", str(gport), "--model", MODEL,
                    "--force-dummy-tokenizer", "--max-num-seqs", "256",
                    "--time-to-first-token", "12ms", "--inter-token-latency", "13ms", "-v", "0"]))
            for name, cmd in servers:
                url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
                proc = await start(cmd, url)
                try:
                    r = await drive(url, proc.pid, args.requests, args.concurrency, stream)
                finally:
                    await stop_process(proc)
                results.setdefault(name, []).append(r)
    idle = [await idle_fleet_cpu(3.0) for _ in range(args.rounds)]
    out = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for name, rs in results.items()}
    print(json.dumps({"medians": out, "idle_8_replicas_cpu_percent": statistics.median(idle),
                      "requests": args.requests, "concurrency": args.concurrency,
                      "rounds": args.rounds}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
