"""CPU cost of scraping N endpoints at 50 ms, all serving a realistic 45 KB vLLM page.

Run: .venv/bin/python benchmarks/bench_scrape_scale.py [--n 10 100 500] [--clients raw aiohttp]
     [--seconds 5] [--profile]

The model servers run in a separate process (a minimal asyncio Protocol server listening
on N ports of 127.0.0.1 that answers every GET with the fixture page, keep-alive), so the
numbers below are the scraper's own: CPU seconds per wall second (`time.process_time`
and `resource.getrusage` of this process) over a measured window after a warm-up, and
the polls per second actually achieved (target: N x 20/s). Each case runs for
warm-up + `--seconds` (about 7 s by default) and is bounded by `--max-case-seconds`.

`--profile` runs cProfile over the measured window of each case and prints the top
functions by own time, to see where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import platform
import pstats
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "tests" / "fixtures" / "metrics" / "vllm-bench-45k-loaded.txt"


# -- the model servers (child process) ---------------------------------------------------


class _Serve(asyncio.Protocol):
    response = b""

    def connection_made(self, transport):  # type: ignore[override]
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.buf = self.buf[end + 4 :]
            self.t.write(self.response)


async def serve(n: int) -> None:
    body = PAGE.read_bytes()
    _Serve.response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    loop = asyncio.get_running_loop()
    ports = []
    for _ in range(n):
        srv = await loop.create_server(_Serve, "127.0.0.1", 0, backlog=64)
        ports.append(srv.sockets[0].getsockname()[1])
    print(" ".join(map(str, ports)), flush=True)
    # Exit when the parent closes our stdin.
    await loop.run_in_executor(None, sys.stdin.read)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(f"server-cpu {ru.ru_utime + ru.ru_stime:.3f}", flush=True)


# -- the scraper (this process) ----------------------------------------------------------


async def run_case(
    n: int, client: str, seconds: float, warmup: float, profile: bool, cap: float | None = None
) -> dict:
    from epp.datalayer.scraper import Scraper
    from epp.datastore import Datastore, Endpoint

    server_cpu = float("nan")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(n)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        ports = [int(p) for p in proc.stdout.readline().split()]
        assert len(ports) == n
        ds = Datastore()
        polls = 0
        orig = ds.update_metrics

        def counting(name, m):  # count good polls
            nonlocal polls
            polls += 1
            orig(name, m)

        ds.update_metrics = counting  # type: ignore[method-assign]
        ds.set_endpoints(Endpoint(f"pod-{i}", "127.0.0.1", p) for i, p in enumerate(ports))
        scraper = Scraper(
            ds, interval=0.05, timeout=1.0, client=client,  # type: ignore[arg-type]
            max_polls_per_second=cap,
        )
        await scraper.start()
        await asyncio.sleep(warmup)
        errors = sum(1 for e in ds.endpoints() if (ds.metrics(e.name) or None) is None)
        prof = cProfile.Profile() if profile else None
        p0, w0, r0, c0 = polls, time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        if prof:
            prof.enable()
        await asyncio.sleep(seconds)
        if prof:
            prof.disable()
        c1, r1, w1, p1 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), polls
        eff = scraper.effective_interval()
        await scraper.stop()
        wall = w1 - w0
        snap = ds.snapshot()
        stale = int(snap.stale().sum())
        out = {
            "n": n, "client": client, "wall": wall,
            "cpu_per_wall": (c1 - c0) / wall,
            "rusage_per_wall": ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) / wall,
            "user_per_wall": (r1.ru_utime - r0.ru_utime) / wall,
            "sys_per_wall": (r1.ru_stime - r0.ru_stime) / wall,
            "polls_per_s": (p1 - p0) / wall,
            "target_polls_per_s": n / eff,
            "stale_at_end": stale, "never_ok_after_warmup": errors,
        }
        if prof:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
            out["profile"] = s.getvalue()
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            line = proc.stdout.read() if proc.stdout else ""
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            line = ""
        for tok in line.split("\n"):
            if tok.startswith("server-cpu"):
                server_cpu = float(tok.split()[1])
    out["server_cpu_total_s"] = server_cpu
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, nargs="+", default=[10, 100, 500])
    ap.add_argument("--clients", nargs="+", default=["raw", "aiohttp"])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--uvloop", action="store_true", help="run the scraper on uvloop (optional)")
    ap.add_argument("--cap", type=float, default=None,
                    help="Scraper(max_polls_per_second=...): adaptive interval under a budget")
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    print(f"python {platform.python_version()} {platform.machine()}, {os.cpu_count()} cores, "
          f"load avg {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M')}")
    if args.uvloop:
        print("event loop: uvloop")
    if args.cap:
        print(f"adaptive interval: max_polls_per_second={args.cap:g}")
    print(f"{'N':>4s} {'client':8s} {'cpu/wall':>9s} {'user':>6s} {'sys':>6s} "
          f"{'polls/s':>9s} {'target':>7s} {'stale':>6s} {'server CPU s':>12s}")
    for n in args.n:
        for client in args.clients:
            coro = run_case(n, client, args.seconds, args.warmup, args.profile, args.cap)
            if args.uvloop:
                import uvloop  # optional: pip install "uvloop>=0.19,<1"

                r = uvloop.run(coro)
            else:
                r = asyncio.run(coro)
            print(f"{r['n']:4d} {r['client']:8s} {r['cpu_per_wall']:9.3f} {r['user_per_wall']:6.3f} "
                  f"{r['sys_per_wall']:6.3f} {r['polls_per_s']:9.0f} {r['target_polls_per_s']:7.0f} "
                  f"{r['stale_at_end']:6d} {r['server_cpu_total_s']:12.2f}", flush=True)
            if "profile" in r:
                print(r["profile"])


if __name__ == "__main__":
    main()
