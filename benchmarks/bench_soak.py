"""Soak and chaos: steady load through a real Envoy and EPP while model servers die and
come back, the endpoints file churns, and hostile requests and streams are mixed in.

    .venv/bin/python -m benchmarks.bench_soak --seconds 600       # the issue's 10 minutes
    .venv/bin/python -m benchmarks.bench_soak --quick             # ~40 s, for make bench

Pieces (all real processes on 127.0.0.1): the EPP (`--endpoints-file`), Envoy in front of
it, and small model servers (this file with `--serve`), each its own process so that it
can be SIGKILLed (connection refused from then on) and restarted on the same port.

Schedule, scaled to `--seconds`: every `kill_every` seconds one server is killed and
restarted `down_for` seconds later; every `churn_every` seconds a fifth server is added to
or removed from the endpoints file, alternately by atomic rename and by truncate-then-write
(an editor); every `hostile_every` seconds a burst of hostile requests (random model names,
a lone surrogate, NaN, UTF-16, empty bodies), undecodable ext_proc messages and idle
ext_proc streams is sent.

Reported: the EPP's RSS over time, client-visible errors by kind, and per kill: the time
from the kill to the last request that still failed on the dead server (time to avoid),
how many failed, and the time from the restart to its first served request (re-admission).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# -- the model server ---------------------------------------------------------------


def serve(port: int, name: str) -> None:
    """A model server that names itself in every answer and serves a vLLM metrics page."""
    from aiohttp import web

    from tests.support import vllm_page

    page = vllm_page()

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/plain")

    async def complete(request: web.Request) -> web.Response:
        body = await request.read()
        await asyncio.sleep(0.005)
        return web.json_response({"served_by": name, "body_bytes": len(body),
                                  "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
                                 headers={"x-served-by": name})

    app = web.Application(client_max_size=1 << 20)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{tail:.*}", complete)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                reuse_address=True)


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_soak", "--serve", str(self.port), self.name],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def entry(self) -> dict[str, Any]:
        return {"name": self.name, "address": "127.0.0.1", "port": self.port}


async def wait_listening(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.02)
    raise TimeoutError(f"port {port} never listened")


# -- the run ------------------------------------------------------------------------


@dataclass
class Outcome:
    sent: float
    status: int
    kind: str
    served_by: str = ""


@dataclass
class Run:
    t0: float = field(default_factory=time.monotonic)
    outcomes: list[Outcome] = field(default_factory=list)
    hostile: Counter[str] = field(default_factory=Counter)
    kills: list[dict[str, Any]] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    churns: int = 0
    bursts: list[float] = field(default_factory=list)
    churn_times: list[float] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t0


def classify(status: int, body: bytes) -> str:
    if status == 200:
        return "ok"
    if body.startswith(b"inference error: "):
        return "epp_" + body[17:].split(b" ", 1)[0].decode(errors="replace")
    if b"upstream connect error" in body or b"reset reason" in body:
        return "envoy_upstream_connect"
    return f"http_{status}"


async def load(run: Run, url: str, rate: float, stop: asyncio.Event) -> None:
    """Steady open-loop load: `rate` requests a second, each on its own."""
    import aiohttp

    body = json.dumps({"model": "meta-llama/Llama-3.1-8B-Instruct",
                       "prompt": "Write as if you were a critic: San Francisco",
                       "max_tokens": 10}).encode()
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one() -> None:
            sent = run.now()
            try:
                async with session.post(url + "/v1/completions", data=body,
                                        headers={"content-type": "application/json"}) as r:
                    data = await r.read()
                    run.outcomes.append(Outcome(sent, r.status, classify(r.status, data),
                                                r.headers.get("x-served-by", "")))
            except Exception as e:  # the client's own view: a failed exchange
                run.outcomes.append(Outcome(sent, 0, f"client_{type(e).__name__}"))

        tasks: set[asyncio.Task[None]] = set()
        next_at = time.monotonic()
        while not stop.is_set():
            t = asyncio.create_task(one())
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if tasks:
            await asyncio.wait(tasks, timeout=15)


async def hostile_burst(run: Run, url: str, grpc_port: int) -> None:
    import aiohttp
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

    rnd = random.Random(len(run.hostile))
    bodies = [json.dumps({"model": f"random-{rnd.getrandbits(64):x}", "prompt": "x"}).encode()
              for _ in range(40)]
    bodies += [b'{"model": "bad\\ud800model", "prompt": "x"}',
               b'{"model": "m", "prompt": "x", "temperature": NaN}',
               b'{"model": "m", "prompt": "x", "temperature": 1e999}',
               json.dumps({"model": "m", "prompt": "x"}).encode("utf-16"), b""]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async def one(b: bytes) -> None:
            try:
                async with session.post(url + "/v1/completions", data=b,
                                        headers={"content-type": "application/json"}) as r:
                    run.hostile[f"http:{classify(r.status, await r.read())}"] += 1
            except Exception as e:
                run.hostile[f"http:client_{type(e).__name__}"] += 1

        await asyncio.gather(*(one(b) for b in bodies))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        raw = ch.stream_stream("/envoy.service.ext_proc.v3.ExternalProcessor/Process",
                               request_serializer=lambda b: b,
                               response_deserializer=ep.ProcessingResponse.FromString)

        async def ended(call: Any, kind: str) -> None:
            """Count how the EPP ended a hostile stream."""
            try:
                async for _ in call:
                    pass
                run.hostile[f"{kind}:OK"] += 1
            except grpc.aio.AioRpcError as e:
                run.hostile[f"{kind}:{e.code().name}"] += 1

        async def garbage() -> None:
            call = raw()
            await call.write(b"\xff\xff\xff\xff not a protobuf")
            await call.done_writing()
            await ended(call, "grpc")

        async def idle() -> None:
            await ended(raw(), "idle")  # opened, never written to: ended by the idle timeout

        await asyncio.gather(*(garbage() for _ in range(20)), *(idle() for _ in range(50)))


async def until_ejected(grpc_port: int, name: str, ejected: bool, timeout: float) -> float | None:
    """Milliseconds until the EPP's Explain lists `name` as ejected (or no longer), polled
    every 5 ms; None if it did not happen within `timeout`."""
    import grpc

    from epp.v1 import pick_pb2, pick_pb2_grpc

    t0 = time.monotonic()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        stub = pick_pb2_grpc.PickerStub(ch)
        while time.monotonic() - t0 < timeout:
            r = await stub.Explain(pick_pb2.PickRequest(model="m", prompt="x"))
            if any(e.endpoint_name == name for e in r.explanation.ejected) == ejected:
                return round(1000 * (time.monotonic() - t0), 1)
            await asyncio.sleep(0.005)
    return None


def write_endpoints(path: Path, servers: list[Server], atomic: bool) -> None:
    import yaml

    text = yaml.safe_dump([s.entry() for s in servers])
    if atomic:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    else:  # an editor: truncate, a pause, then the new contents
        with open(path, "w") as f:
            f.flush()
            time.sleep(0.05)
            f.write(text)


def rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


async def chaos(run: Run, args: argparse.Namespace, servers: list[Server], spare: Server,
                endpoints: Path, url: str, grpc_port: int, epp_pid: int,
                stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    next_kill, next_churn, next_hostile, next_rss = (args.kill_every, args.churn_every,
                                                     args.hostile_every, 0.0)
    victim = 0
    spare_in = False
    pending: list[asyncio.Task[None]] = []
    while not stop.is_set():
        t = loop.time() - start
        if t >= next_rss:
            run.rss.append((round(run.now(), 1), rss_mb(epp_pid)))
            next_rss += args.rss_every
        if t >= next_kill and t + args.down_for < args.seconds:
            s = servers[victim % len(servers)]
            victim += 1
            kill = {"server": s.name, "killed_at": run.now()}
            s.kill()
            run.kills.append(kill)

            async def revive(s: Server = s, kill: dict[str, Any] = kill) -> None:
                kill["epp_ejected_after_ms"] = await until_ejected(grpc_port, s.name, True, 3.0)
                await asyncio.sleep(max(0.0, kill["killed_at"] + args.down_for - run.now()))
                s.start()
                await wait_listening(s.port)
                kill["restarted_at"] = run.now()
                kill["epp_readmitted_after_ms"] = await until_ejected(grpc_port, s.name, False, 10.0)

            pending.append(asyncio.create_task(revive()))
            next_kill += args.kill_every
        if t >= next_churn:
            spare_in = not spare_in
            if spare_in:
                spare.start()
                try:
                    await wait_listening(spare.port)
                except TimeoutError:  # a starved machine: list it anyway (it is refused)
                    run.hostile["bench:spare_start_timeout"] += 1
            listed = servers + ([spare] if spare_in else [])
            await asyncio.to_thread(write_endpoints, endpoints, listed, run.churns % 2 == 0)
            if not spare_in:
                await asyncio.sleep(1.5)  # the EPP re-reads the file every second
                spare.kill()
            run.churns += 1
            run.churn_times.append(round(run.now(), 1))
            next_churn += args.churn_every
        if t >= next_hostile:
            run.bursts.append(round(run.now(), 1))
            pending.append(asyncio.create_task(hostile_burst(run, url, grpc_port)))
            next_hostile += args.hostile_every
        await asyncio.sleep(0.05)
    await asyncio.gather(*pending, return_exceptions=True)


def summarize(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    kinds = Counter(o.kind for o in run.outcomes)
    for k in run.kills:
        t_kill, t_back = k["killed_at"], k.get("restarted_at")
        failed = [o for o in run.outcomes if o.sent >= t_kill - 0.05
                  and (t_back is None or o.sent < t_back)
                  and o.kind in ("envoy_upstream_connect", "http_503", "http_502")]
        k["failed_requests"] = len(failed)
        k["time_to_avoid_ms"] = round(1000 * max(0.0, max((o.sent for o in failed), default=t_kill)
                                                 - t_kill), 1)
        if t_back is not None:
            first = min((o.sent for o in run.outcomes
                         if o.served_by == k["server"] and o.sent >= t_back), default=None)
            k["time_to_readmit_ms"] = (round(1000 * (first - t_back), 1)
                                       if first is not None else None)
    rss = [m for _, m in run.rss]
    return {
        "seconds": args.seconds, "rate": args.rate, "requests": len(run.outcomes),
        "outcomes": dict(kinds), "hostile": dict(run.hostile), "kills": run.kills,
        "failures": [(round(o.sent, 2), o.kind) for o in run.outcomes if o.kind != "ok"][:2000],
        "hostile_bursts_at": run.bursts,
        "endpoint_file_rewrites": run.churns, "rewrites_at": run.churn_times,
        "rss_mb": {"first": rss[0] if rss else None, "last": rss[-1] if rss else None,
                   "max": max(rss, default=None), "timeline": run.rss},
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from tests.support import free_port, start_envoy, start_epp, stop_processes

    servers = [Server(f"s{i}", free_port()) for i in range(args.servers)]
    spare = Server("spare", free_port())
    for s in servers:
        s.start()
    for s in servers:
        await wait_listening(s.port)
    tmpdir = Path(tempfile.mkdtemp(prefix="soak-"))
    endpoints = tmpdir / "endpoints.yaml"
    write_endpoints(endpoints, servers, atomic=True)
    epp = await asyncio.to_thread(
        start_epp, "--extproc-request-idle-timeout", "2s", endpoints_file=str(endpoints))
    envoy = await asyncio.to_thread(start_envoy, epp.grpc_port)
    run = Run()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_later(args.seconds, stop.set)
    try:
        await asyncio.gather(
            load(run, envoy.url, args.rate, stop),
            chaos(run, args, servers, spare, endpoints, envoy.url, epp.grpc_port,
                  epp.proc.p.pid, stop))
        run.rss.append((round(run.now(), 1), rss_mb(epp.proc.p.pid)))
    finally:
        stop_processes([envoy.proc.p, epp.proc.p])
        for s in [*servers, spare]:
            s.kill()
    return summarize(run, args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", nargs=2, metavar=("PORT", "NAME"), help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--quick", action="store_true", help="40 s with a compressed schedule")
    p.add_argument("--rate", type=float, default=40.0, help="requests a second")
    p.add_argument("--servers", type=int, default=4)
    p.add_argument("--kill-every", type=float, default=60.0)
    p.add_argument("--down-for", type=float, default=15.0)
    p.add_argument("--churn-every", type=float, default=20.0)
    p.add_argument("--hostile-every", type=float, default=30.0)
    p.add_argument("--rss-every", type=float, default=10.0)
    p.add_argument("--out", default=None, help="write the JSON summary here")
    args = p.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1])
        return
    if args.quick:
        args.seconds, args.kill_every, args.down_for = 40.0, 12.0, 5.0
        args.churn_every, args.hostile_every, args.rss_every = 8.0, 10.0, 5.0
    summary = asyncio.run(main_async(args))
    text = json.dumps(summary, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    s = summary
    print(f"{s['requests']} requests in {s['seconds']:.0f}s at {s['rate']}/s; outcomes {s['outcomes']}")
    print(f"hostile: {s['hostile']}")
    print(f"RSS MB: first {s['rss_mb']['first']}, last {s['rss_mb']['last']}, max {s['rss_mb']['max']}")
    for k in s["kills"]:
        print(f"kill {k['server']} at {k['killed_at']:.1f}s: ejected by the EPP after "
              f"{k.get('epp_ejected_after_ms')} ms; {k['failed_requests']} requests failed, the "
              f"last sent {k['time_to_avoid_ms']} ms after the kill; restarted: picked again "
              f"after {k.get('epp_readmitted_after_ms')} ms, first served "
              f"{k.get('time_to_readmit_ms')} ms after restart")
    bad = {k: v for k, v in s["outcomes"].items() if k.startswith("epp_")}
    if bad:
        print(f"errors from the EPP under honest load: {bad}")
        sys.exit(1)


if __name__ == "__main__":
    main()
