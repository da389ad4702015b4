"""Real processes and servers for tests: upstream HTTP servers, the EPP, Envoy.

Everything binds 127.0.0.1 on free ports and is stopped by the fixture that started it.
Child processes (the EPP, Envoy, the demo; the benchmarks' Redis and floor server) are
started through `retry_port_taken`: a port `free_port` found free can be taken by another
process before the child binds it, and the child then exits saying so.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from aiohttp import web

from epp.envoyconfig import envoy_binary

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


UPSTREAM = web.AppKey("upstream", object)

_scratch: Path | None = None


def scratch_dir() -> Path:
    """One temporary directory per test process for child logs and Envoy configs, removed
    when the process exits (`EPP_TEST_KEEP=1` keeps it), so runs do not pile files up in
    /tmp. Failure messages quote the logs themselves, so nothing is lost."""
    global _scratch
    if _scratch is None:
        _scratch = Path(tempfile.mkdtemp(prefix="epp-tests-"))
        if os.environ.get("EPP_TEST_KEEP") != "1":
            atexit.register(shutil.rmtree, _scratch, True)
    return _scratch


def endpoints_file_for(fleet: "UpstreamFleet", name: str) -> str:
    """An `--endpoints-file` listing the fleet's servers, in the scratch directory."""
    import yaml

    path = scratch_dir() / name
    path.write_text(yaml.safe_dump(
        [{"name": u.name, "address": "127.0.0.1", "port": u.port} for u in fleet.upstreams]))
    return str(path)


def idle_pair() -> "UpstreamFleet":
    """Two model servers reporting the same light load: a pick between them is a toss."""
    fleet = UpstreamFleet(2)
    for u in fleet.upstreams:
        u.metrics_page = vllm_page(waiting=0, running=0, kv=0.2)
    return fleet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


# -- upstream model servers ----------------------------------------------------------


def vllm_page(waiting: float = 0, running: float = 0, kv: float = 0.0,
              running_adapters: tuple[str, ...] = (), waiting_adapters: tuple[str, ...] = (),
              max_lora: int = 4, model: str = "meta-llama/Llama-3.1-8B-Instruct") -> str:
    """A minimal vLLM /metrics page with the series the EPP reads."""
    lbl = f'engine="0",model_name="{model}"'
    return (
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        f"vllm:num_requests_waiting{{{lbl}}} {waiting}\n"
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f"vllm:num_requests_running{{{lbl}}} {running}\n"
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f"vllm:kv_cache_usage_perc{{{lbl}}} {kv}\n"
        "# HELP vllm:lora_requests_info Running stats on lora requests.\n"
        "# TYPE vllm:lora_requests_info gauge\n"
        f'vllm:lora_requests_info{{max_lora="{max_lora}",running_lora_adapters="{",".join(running_adapters)}",'
        f'waiting_lora_adapters="{",".join(waiting_adapters)}"}} 1.7e9\n'
    )



@dataclass
class Upstream:
    name: str
    port: int
    requests: list[dict[str, Any]] = field(default_factory=list)
    metrics_page: str = ""
    status: int = 200
    """HTTP status of its answers (a failing model server answers 5xx)."""
    reports_served: str = ""
    """When set, answers carry `x-test-served-endpoint: <this>`: an Envoy filter turns
    it into the protocol's served-endpoint report (a data plane that used a fallback)."""
    scrapes: int = 0
    """GET /metrics served so far."""

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"


class UpstreamFleet:
    """Small HTTP servers that answer like a model server and record what reached them.

    Each answers POSTs with JSON naming itself (`served_by`), echoing the model it was
    asked for, and a usage block; `GET /metrics` serves `metrics_page` (scriptable).
    Runs its own event loop in a thread so that synchronous tests can use it.
    """

    def __init__(self, count: int) -> None:
        self.upstreams = [Upstream(f"u{i}", free_port()) for i in range(count)]
        self._loop = asyncio.new_event_loop()
        self._runners: list[web.AppRunner] = []
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> "UpstreamFleet":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def by_port(self, port: int) -> Upstream:
        return next(u for u in self.upstreams if u.port == port)

    def by_name(self, name: str) -> Upstream:
        return next(u for u in self.upstreams if u.name == name)

    async def _start(self) -> None:
        for u in self.upstreams:
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app[UPSTREAM] = u
            app.router.add_get("/metrics", self._metrics)
            app.router.add_route("*", "/{tail:.*}", self._serve)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", u.port).start()
            self._runners.append(runner)

    async def _stop(self) -> None:
        for r in self._runners:
            await r.cleanup()

    @staticmethod
    async def _metrics(request: web.Request) -> web.Response:
        u: Upstream = request.app[UPSTREAM]
        u.scrapes += 1
        if u.metrics_page.startswith("<"):
            return web.Response(text=u.metrics_page, content_type="text/html")
        return web.Response(text=u.metrics_page, content_type="text/plain")

    @staticmethod
    async def _serve(request: web.Request) -> web.StreamResponse:
        u: Upstream = request.app[UPSTREAM]
        body = await request.read()
        record = {"path": request.path, "method": request.method,
                  "headers": {k.lower(): v for k, v in request.headers.items()}, "body": body}
        u.requests.append(record)
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            data = {}
        model = data.get("model", "") if isinstance(data, dict) else ""
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        delay = float(data.get("test_delay", 0)) if isinstance(data, dict) else 0.0
        if isinstance(data, dict) and data.get("stream"):
            resp = web.StreamResponse(headers={"content-type": "text/event-stream",
                                               "x-served-by": u.name})
            await resp.prepare(request)
            for word in ("hello", "world"):
                await asyncio.sleep(delay)
                chunk = {"model": model, "choices": [{"text": word}], "served_by": u.name}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await resp.write(b"data: " + json.dumps({"model": model, "choices": [], "usage": usage}).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        headers = {"x-served-by": u.name}
        if u.reports_served:
            headers["x-test-served-endpoint"] = u.reports_served
        return web.json_response(
            {"served_by": u.name, "model": model, "body_bytes": len(body), "usage": usage},
            headers=headers, status=u.status,
        )


# -- the EPP and Envoy as real processes --------------------------------------------


class Proc:
    """A child process with its log in a temp file, stopped on exit."""

    def __init__(self, args: list[str], name: str, env: dict[str, str] | None = None) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False,
                                               dir=scratch_dir())
        self.args = args
        self.name = name
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                  env={**os.environ, **(env or {})}, cwd=ROOT)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_ready(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait until `ready()` (an exception counts as not yet). If the child exits
        first, the error is `PortTaken` when its output says a port was in use (see
        `retry_port_taken`), else RuntimeError; if time runs out it is stopped. The exit
        is checked before `ready()`: a probe of a port another process holds may raise
        every time, which would hide the exit until the timeout."""
        try:
            wait_until(lambda: self.p.poll() is not None or ready(), timeout, f"{what} readiness")
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{what} did not become ready:\n" + self.output()) from None
        if self.p.poll() is not None:
            out = self.output()
            raise (PortTaken if says_port_taken(out) else RuntimeError)(f"{what} exited:\n" + out)

    def stop(self, sig_timeout: float = 10.0) -> int:
        stop_processes([self.p], sig_timeout)
        return self.p.returncode


def says_port_taken(output: str) -> bool:
    """Whether a child's output says it could not bind a port: the EPP ("cannot start:
    [Errno 98] cannot bind ..."), Envoy, Redis, Go servers ("address already in use")."""
    low = output.lower()
    return "[errno 98]" in low or "address already in use" in low


class PortTaken(RuntimeError):
    """A child exited because a port was in use: `free_port` found it free, but another
    process bound it before the child did."""


def retry_port_taken(start: Callable[[], T], what: str, attempts: int = 3) -> T:
    """`start()`, started again while it fails with `PortTaken` (`start` must pick new
    ports with `free_port` on every call): "find a free port, then let a child bind it"
    races with every other process on the machine, and tests and benchmarks run side by
    side. Bounded: after `attempts` such failures in a row, the last one is raised."""
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except PortTaken as e:
            if attempt == attempts:
                raise PortTaken(f"{what}: a port was taken between free_port() and the "
                                f"bind in {attempts} starts in a row; the last:\n{e}") from None
            print(f"{what}: a port was taken before it bound it; starting again with new "
                  f"ports ({attempt + 1}/{attempts})", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


async def stop_process(proc: asyncio.subprocess.Process, sig_timeout: float = 10.0) -> None:
    """SIGTERM an asyncio child and wait; kill it if it does not exit in time."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), sig_timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def stop_processes(procs: list[subprocess.Popen[Any]], sig_timeout: float = 15.0) -> None:
    """SIGTERM them all, then wait for each; kill what does not exit in time."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(sig_timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


@dataclass
class EppProcess:
    proc: Proc
    grpc_port: int
    health_port: int
    metrics_port: int


def start_epp(*extra: str, secure: bool = False, endpoints_file: str | None = None,
              endpoints: str | None = None, module: str = "epp",
              env: dict[str, str] | None = None) -> EppProcess:
    """The EPP as a process (`module` may name another launcher taking the same flags;
    `env` adds environment variables, e.g. epp/tuning.py's). A port that another process
    took between `free_port` and the EPP's bind is retried with new ports (twice)."""
    return retry_port_taken(lambda: _start_epp(
        *extra, secure=secure, endpoints_file=endpoints_file, endpoints=endpoints,
        module=module, env=env), "EPP")


def _start_epp(*extra: str, secure: bool, endpoints_file: str | None,
               endpoints: str | None, module: str, env: dict[str, str] | None) -> EppProcess:
    g, h, m = free_port(), free_port(), free_port()
    args = [sys.executable, "-m", module, "--bind-address", "127.0.0.1",
            "--grpc-port", str(g), "--grpc-health-port", str(h), "--metrics-port", str(m),
            f"--secure-serving={'true' if secure else 'false'}"]
    if endpoints_file:
        args += ["--endpoints-file", endpoints_file]
    if endpoints:
        args += ["--endpoints", endpoints]
    args += list(extra)
    proc = Proc(args, "epp", env=env)
    proc.wait_ready(lambda: _health_ok(h), 30, "EPP")
    return EppProcess(proc, g, h, m)


def _health_ok(port: int, service: str = "readiness") -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                 timeout=1)
        return r.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class EnvoyProcess:
    proc: Proc
    port: int
    admin_port: int
    config_path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_envoy(epp_port: int, *, epp_tls: bool = False, body_mode: str = "full-duplex-streamed",
                process_response: bool = True, more_epps: Sequence[int] = (),
                response_path: str = "observed",
                patch: Callable[[dict[str, Any]], None] | None = None) -> EnvoyProcess:
    """Envoy from `epp envoy-config`'s builder; `patch` may edit the config dict first.
    `more_epps`: the gRPC ports of more EPP replicas (active-active): the `epp` cluster
    then lists them all, with the outlier detection the builder adds for replicas. A port
    taken before Envoy bound it is retried with new ports, as for `start_epp`."""
    return retry_port_taken(lambda: _start_envoy(
        epp_port, epp_tls=epp_tls, body_mode=body_mode, process_response=process_response,
        more_epps=more_epps, response_path=response_path, patch=patch), "Envoy")


def _start_envoy(epp_port: int, *, epp_tls: bool, body_mode: str, process_response: bool,
                 more_epps: Sequence[int], response_path: str,
                 patch: Callable[[dict[str, Any]], None] | None) -> EnvoyProcess:
    import yaml

    from epp.envoyconfig import EnvoyOptions, build

    port, admin = free_port(), free_port()
    cfg = build(EnvoyOptions(
        listen_address="127.0.0.1", listen_port=port, admin_port=admin, epp_port=epp_port,
        epp_address=",".join(f"127.0.0.1:{p}" for p in (epp_port, *more_epps)),
        epp_tls=epp_tls, body_mode=body_mode, process_response=process_response,
        response_path=response_path, message_timeout=10.0)).to_dict()
    if patch is not None:
        patch(cfg)
    text = yaml.safe_dump(cfg)
    cfg = tempfile.NamedTemporaryFile("w", prefix="envoy-", suffix=".yaml", delete=False,
                                      dir=scratch_dir())
    cfg.write(text)
    cfg.close()
    proc = Proc([envoy_binary(), "-c", cfg.name, "--log-level", "warn",
                 "--base-id", str(port), "--concurrency", "1"], "envoy")
    env = EnvoyProcess(proc, port, admin, cfg.name)

    def ready() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
            return r.status == 200

    proc.wait_ready(ready, 30, "Envoy")
    return env


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(method: str, url: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 15.0) -> HttpResult:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    if body is not None and "content-type" not in {k.lower() for k in (headers or {})}:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return HttpResult(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:
        return HttpResult(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def post_json(url: str, payload: Any, headers: dict[str, str] | None = None) -> HttpResult:
    return http("POST", url, json.dumps(payload).encode(), headers)
