"""`make demo`: four simulated vLLM pods, the EPP and a real Envoy on this machine.

It starts each as its own process (the EPP never imports the simulator), sends a few
requests shaped like the GKE Inference Gateway guide's through Envoy, prints which pod
served each and why (the EPP's Explain API), then keeps everything running until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import yaml

from epp.envoyconfig import envoy_binary

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "demo"
FLEET = Path(__file__).resolve().parent / "sim" / "fleet_demo.yaml"
POOL = "vllm-llama3-8b-instruct"
BASE_MODEL = "meta-llama/Llama-3.1-8B-Instruct"

CRITIC = ("You are a food critic for a city magazine. Reviews are honest, specific about "
          "dishes, service and price, and end with a score out of ten. ")
REQUESTS: list[tuple[str, dict[str, Any], dict[str, str]]] = [
    ("food-review", {"model": "food-review", "prompt": CRITIC + "Write as if you were a critic: San Francisco",
                     "max_tokens": 100, "temperature": 0}, {"x-gateway-inference-objective": "food-review"}),
    ("food-review, same prefix", {"model": "food-review", "prompt": CRITIC + "Write as if you were a critic: Oakland",
                                  "max_tokens": 100, "temperature": 0},
     {"x-gateway-inference-objective": "food-review"}),
    ("cad-fabricator", {"model": "cad-fabricator", "prompt": "Design a bracket for a 12 mm shaft",
                        "max_tokens": 60, "temperature": 0}, {}),
    ("base model", {"model": BASE_MODEL, "prompt": "Explain KV caches in one paragraph",
                    "max_tokens": 80, "temperature": 0}, {"x-gateway-inference-objective": "llama3-base-model"}),
    ("base model, chat", {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hello!"}],
                          "max_tokens": 20}, {}),
]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """The demo's processes, started in order and stopped in reverse."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "wb")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                             start_new_session=True)
        self.procs.append((name, p))
        return p

    def check(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                tail = (self.logdir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"demo: {name} exited with {p.returncode}:\n{tail}")

    def stop(self) -> None:
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in reversed(self.procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def _wait(stack: Stack, what: str, ok: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check()
        try:
            if ok():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise SystemExit(f"demo: timed out waiting for {what} (logs in {stack.logdir})")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as r:
        return r.status == 200


def _ready(port: int) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="readiness"), timeout=1)
        return r.status == health_pb2.HealthCheckResponse.SERVING


def _explain(grpc_port: int, body: dict[str, Any], headers: dict[str, str], path: str) -> str:
    from epp.v1 import pick_pb2, pick_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        try:
            r = pick_pb2_grpc.PickerStub(ch).Explain(pick_pb2.PickRequest(
                body=json.dumps(body).encode(), path=path, headers=headers), timeout=5)
        except grpc.RpcError as e:
            return f"explain failed: {e.details()}"
    lines = []
    for prof in r.explanation.profiles:
        for f in prof.filters:
            lines.append(f"      filter {f.type}: kept {', '.join(f.survivors) or 'none'}")
        for c in sorted(prof.scores, key=lambda c: -c.total):
            parts = ", ".join(f"{k.split('-scorer')[0]} {v:.2f}" for k, v in sorted(c.raw.items()))
            lines.append(f"      {c.endpoint_name:<18} total {c.total:5.2f}  ({parts})")
    return "\n".join(lines)


def _send(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, str, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            data = json.loads(r.read())
            text = (data.get("choices") or [{}])[0]
            text = text.get("text") or (text.get("message") or {}).get("content") or ""
            return r.status, r.headers.get("x-sim-replica", "?"), text[:50]
    except urllib.error.HTTPError as e:
        return e.code, "-", e.read().decode(errors="replace")[:120]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m epp.demo", description=__doc__.split("\n")[0])
    p.add_argument("--once", action="store_true", help="send the requests, then stop (for tests)")
    p.add_argument("--free-ports", action="store_true", help="pick free ports instead of the defaults")
    p.add_argument("--tracing", action="store_true",
                   help="run the EPP with --tracing (OTLP endpoint and sampler from OTEL_* variables)")
    args = p.parse_args(argv)

    fleet = yaml.safe_load(FLEET.read_text())
    n = len(fleet["replicas"])
    if args.free_ports:
        sim_ports = [_free_port() for _ in range(n)]
        grpc_port, health_port, metrics_port, envoy_port, admin_port = (_free_port() for _ in range(5))
    else:
        sim_ports = [8001 + i for i in range(n)]
        grpc_port, health_port, metrics_port, envoy_port, admin_port = 9002, 9003, 9090, 8081, 9901
    busy = [q for q in [*sim_ports, grpc_port, health_port, metrics_port, envoy_port, admin_port]
            if not _port_free(q)]
    if busy:
        raise SystemExit(f"demo: ports in use: {busy}; stop what uses them or run with --free-ports")

    logdir = Path(tempfile.mkdtemp(prefix="epp-demo-"))
    endpoints = [{"name": r["name"], "address": "127.0.0.1", "port": port}
                 for r, port in zip(fleet["replicas"], sim_ports)]
    (logdir / "endpoints.yaml").write_text(yaml.safe_dump(endpoints))
    fleet["replicas"] = [{**r, "port": port} for r, port in zip(fleet["replicas"], sim_ports)]
    (logdir / "fleet.yaml").write_text(yaml.safe_dump(fleet))

    py = sys.executable
    stack = Stack(logdir)
    clean = False
    try:
        print(f"demo: logs in {logdir}")
        print(f"demo: starting {n} simulated vLLM pods ({BASE_MODEL}; pods 0-1 serve LoRA "
              "adapters food-review and cad-fabricator)")
        stack.start("sim", [py, "-m", "epp.sim", "--fleet-config", str(logdir / "fleet.yaml")])
        for port in sim_ports:
            _wait(stack, f"simulated pod on {port}", lambda: _http_ok(f"http://127.0.0.1:{port}/health"))
        print("demo: starting the EPP (standalone, plaintext, scraping the pods)")
        stack.start("epp", [py, "-m", "epp", "--secure-serving=false", "--bind-address", "127.0.0.1",
                            "--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
                            "--metrics-port", str(metrics_port), "--pool-name", POOL,
                            "--endpoints-file", str(logdir / "endpoints.yaml"),
                            "--config-file", str(DEPLOY / "epp-config.yaml"),
                            "--objectives-file", str(DEPLOY / "objectives.yaml"),
                            *(["--tracing"] if args.tracing else [])])
        _wait(stack, "EPP readiness", lambda: _ready(health_port))
        print("demo: starting Envoy")
        cfg = subprocess.run([py, "-m", "epp", "envoy-config", "--epp-tls=false",
                              "--listen-address", "127.0.0.1", f"--listen-port={envoy_port}",
                              f"--admin-port={admin_port}", f"--epp-port={grpc_port}"],
                             check=True, capture_output=True, text=True).stdout
        (logdir / "envoy.yaml").write_text(cfg)
        try:
            envoy = envoy_binary()
        except RuntimeError as e:
            raise SystemExit(f"demo: {e}") from None
        # A dynamic base id: another Envoy on this machine must not stop the demo's.
        stack.start("envoy", [envoy, "-c", str(logdir / "envoy.yaml"), "--use-dynamic-base-id",
                              "--log-level", "warn", "--concurrency", "1"])
        _wait(stack, "Envoy readiness", lambda: _http_ok(f"http://127.0.0.1:{admin_port}/ready"))

        url = f"http://127.0.0.1:{envoy_port}"
        print(f"\ndemo: sending requests through Envoy at {url}\n")
        failures = 0
        for label, body, headers in REQUESTS:
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            why = _explain(grpc_port, body, headers, path)
            status, pod, text = _send(url + path, body, headers)
            failures += status != 200
            print(f"  POST {path} model={body['model']!r} ({label})")
            print(f"    -> {status} served by {pod}: {text!r}")
            print(f"    why (EPP Explain, just before sending):\n{why}\n")
        if args.once:
            clean = not failures
            return 1 if failures else 0
        print("demo: running. Try it yourself:")
        print(f"  curl {url}/v1/completions -H 'content-type: application/json' \\")
        print("    -d '{\"model\": \"food-review\", \"prompt\": \"Write as if you were a critic: San Francisco\", \"max_tokens\": 100}'")
        print(f"  EPP status:    http://127.0.0.1:{metrics_port}/debug/status")
        print(f"  EPP metrics:   http://127.0.0.1:{metrics_port}/metrics")
        print(f"  pod metrics:   http://127.0.0.1:{sim_ports[0]}/metrics")
        print(f"  Envoy admin:   http://127.0.0.1:{admin_port}/")
        print("Ctrl-C stops everything.")
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while True:
            time.sleep(1)
            stack.check()
    except KeyboardInterrupt:
        print("\ndemo: stopping")
        clean = True
        return 0
    finally:
        stack.stop()
        if clean:
            shutil.rmtree(logdir, ignore_errors=True)
        else:
            print(f"demo: logs kept in {logdir}")


if __name__ == "__main__":
    raise SystemExit(main())
