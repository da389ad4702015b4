"""Every PromQL expression of deploy/grafana/epp-dashboard.json, evaluated by a real
Prometheus that scrapes two running EPPs while the simulator serves their traffic.

Prometheus is built from its Go module by tests/e2e/build_prometheus.sh (cached outside
the repository; the first build takes minutes and prints its progress). Without Go the
test skips; CI runs the build first (.ci/run).

Two EPPs with the demo's scheduling profile, each behind a real Envoy, because one
process cannot show every panel at once:
- A sheds: its saturation detector calls metrics older than 1 ms stale, so the pool always
  looks saturated and requests of the `batch` objective (priority -1) get 429; it also
  lists an endpoint where nothing listens (scrape errors).
- B runs the flowControl feature gate with a concurrency detector allowing one request per
  endpoint, and has one endpoint, so concurrent clients queue and are released as others
  finish: its queues, queue times and pool saturation are published.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.support import (
    ROOT,
    EppProcess,
    Proc,
    free_port,
    http,
    post_json,
    start_envoy,
    start_epp,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DASHBOARD = ROOT / "deploy" / "grafana" / "epp-dashboard.json"
BUILD = ROOT / "tests" / "e2e" / "build_prometheus.sh"
POOL = "dash-pool"
BASE = "meta-llama/Llama-3.1-8B-Instruct"
SCRAPE_INTERVAL = "1s"
# Grafana's variables, as an operator would pick them; $__rate_interval is at least four
# scrape intervals in Grafana, so 15s is what it would be for a 1s scrape here.
VARIABLES = {"$__rate_interval": "15s", "$job": ".*", "$pool": POOL}
TRAFFIC_SECONDS = 12.0


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, expr) for every query target of every panel."""
    d = json.loads(DASHBOARD.read_text())
    out = []
    for p in d["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    return out


def substitute(expr: str) -> str:
    for k, v in VARIABLES.items():
        expr = expr.replace(k, v)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def prometheus_binary() -> str:
    if shutil.which("go") is None and not (Path.home() / ".cache/epp-prometheus/bin/prometheus").exists():
        pytest.skip("Go is not installed: cannot build Prometheus (tests/e2e/build_prometheus.sh)")
    r = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, f"building Prometheus failed:\n{r.stderr[-3000:]}"
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dashboard")


@pytest.fixture(scope="module")
def sims(workdir: Path) -> Iterator[list[int]]:
    ports = [free_port(), free_port()]
    fleet = {"defaults": {"model": BASE, "time_scale": 1.0, "max_num_seqs": 8, "seed": 7},
             "replicas": [{"name": f"sim-{i}", "port": p} for i, p in enumerate(ports)]}
    cfg = workdir / "fleet.yaml"
    cfg.write_text(yaml.safe_dump(fleet))
    proc = Proc([sys.executable, "-m", "epp.sim", "--fleet-config", str(cfg)], "sim")
    try:
        for p in ports:
            wait_until(lambda: http("GET", f"http://127.0.0.1:{p}/health", timeout=1).status == 200,
                       30, f"simulator on {p}")
        yield ports
    finally:
        proc.stop()


def _endpoints_file(workdir: Path, name: str, ports: list[int], dead: bool = False) -> str:
    eps = [{"name": f"sim-{i}", "address": "127.0.0.1", "port": p} for i, p in enumerate(ports)]
    if dead:
        eps.append({"name": "nothing-listens", "address": "127.0.0.1", "port": free_port()})
    f = workdir / f"{name}-endpoints.yaml"
    f.write_text(yaml.safe_dump(eps))
    return str(f)


OBJECTIVES = f"""\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {{name: batch, namespace: default}}
spec: {{priority: -1, poolRef: {{name: {POOL}}}}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {{name: chat, namespace: default}}
spec: {{priority: 10, poolRef: {{name: {POOL}}}}}
"""

DEMO_CONFIG = yaml.safe_load((ROOT / "deploy" / "demo" / "epp-config.yaml").read_text())
SHEDDING_CONFIG = yaml.safe_dump({
    **DEMO_CONFIG, "saturationDetector": {"metricsStalenessThreshold": "1ms"}})
FLOW_CONTROL_CONFIG = yaml.safe_dump({
    **DEMO_CONFIG, "featureGates": ["flowControl"],
    "saturationDetector": {"type": "concurrency-detector",
                           "parameters": {"maxConcurrency": 1}}})


@pytest.fixture(scope="module")
def epps(sims: list[int], workdir: Path) -> Iterator[tuple[EppProcess, EppProcess]]:
    objectives = workdir / "objectives.yaml"
    objectives.write_text(OBJECTIVES)
    common = ["--pool-name", POOL, "--pool-namespace", "default", "--objectives-file",
              str(objectives), "--refresh-prometheus-metrics-interval", "1s"]
    a = start_epp(*common, "--config-text", SHEDDING_CONFIG,
                  endpoints_file=_endpoints_file(workdir, "a", sims, dead=True))
    try:
        b = start_epp(*common, "--config-text", FLOW_CONTROL_CONFIG,
                      endpoints_file=_endpoints_file(workdir, "b", sims[:1]))
    except Exception:
        a.proc.stop()
        raise
    yield a, b
    b.proc.stop()
    a.proc.stop()


@pytest.fixture(scope="module")
def prometheus(epps: tuple[EppProcess, EppProcess], workdir: Path) -> Iterator[str]:
    binary = prometheus_binary()
    port = free_port()
    cfg = {"global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
           "scrape_configs": [{"job_name": "epp", "static_configs": [{"targets": [
               f"127.0.0.1:{e.metrics_port}" for e in epps]}]}]}
    cfg_file = workdir / "prometheus.yml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    proc = Proc([binary, f"--config.file={cfg_file}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], "prometheus")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http("GET", url + "/-/ready", timeout=1).status == 200, 60,
                   "Prometheus readiness")
    except TimeoutError:
        proc.stop()
        raise RuntimeError("Prometheus did not start:\n" + proc.output()) from None
    yield url
    proc.stop()


def _drive_envoy(url: str, stop: threading.Event, counts: dict[str, int]) -> None:
    """Chat-like traffic with a shared system prompt (prefix hits), plus `batch` requests
    that the saturated-looking pool sheds."""
    system = "You are a helpful assistant for a gardening shop. " * 8
    i = 0
    while not stop.is_set():
        i += 1
        objective = "batch" if i % 4 == 0 else "chat"
        r = post_json(url + "/v1/completions",
                      {"model": BASE, "prompt": f"{system} Question {i}: how deep to plant tulips?",
                       "max_tokens": 8},
                      headers={"x-gateway-inference-objective": objective})
        counts[str(r.status)] = counts.get(str(r.status), 0) + 1


def query(prom: str, expr: str) -> dict[str, Any]:
    r = http("GET", prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=10)
    body = r.json()
    assert r.status == 200 and body["status"] == "success", f"{expr}: {r.status} {body}"
    return body["data"]


def test_every_dashboard_expression_parses_and_returns_data(
        epps: tuple[EppProcess, EppProcess], prometheus: str) -> None:
    envoys = [start_envoy(e.grpc_port) for e in epps]
    stop = threading.Event()
    counts_a: dict[str, int] = {}
    counts_b: dict[str, int] = {}
    threads = [threading.Thread(target=_drive_envoy, args=(envoys[0].url, stop, counts_a))
               for _ in range(3)]
    threads += [threading.Thread(target=_drive_envoy, args=(envoys[1].url, stop, counts_b))
                for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(TRAFFIC_SECONDS)
    finally:
        stop.set()
        for t in threads:
            t.join(20)
        for e in envoys:
            e.proc.stop()
    assert counts_a.get("200", 0) > 20 and counts_a.get("429", 0) > 0, counts_a
    assert counts_b.get("200", 0) > 20, counts_b

    # Both targets up, scraped a dozen times or so.
    up = query(prometheus, 'up{job="epp"}')["result"]
    assert sorted(float(s["value"][1]) for s in up) == [1.0, 1.0], up

    exprs = dashboard_expressions()
    assert len(exprs) >= 20
    empty, failed = [], []
    for title, expr in exprs:
        data = query(prometheus, substitute(expr))
        values = [float(s["value"][1]) for s in data["result"]]
        if not values:
            empty.append(f"{title}: {expr}")
        elif not any(v == v and abs(v) != float("inf") for v in values):  # all NaN/Inf
            failed.append(f"{title}: {expr} -> {values}")
    assert not empty, "expressions without data:\n" + "\n".join(empty)
    assert not failed, "expressions with only NaN/Inf:\n" + "\n".join(failed)

    # The dashboard's variables (Grafana's label_values) find their labels.
    d = json.loads(DASHBOARD.read_text())
    for var in d["templating"]["list"]:
        if var["type"] != "query":
            continue
        q = var["query"]["query"]
        metric, label = q[len("label_values("):-1].rsplit(",", 1)
        r = http("GET", prometheus + "/api/v1/series?" + urllib.parse.urlencode(
            {"match[]": substitute(metric.strip())}), timeout=10).json()
        assert any(label.strip() in s for s in r["data"]), f"variable {var['name']}: {q}"


def test_dashboard_is_importable_json() -> None:
    """What Grafana's import needs: unique panel ids, a uid, the data-source variable on
    every query, and grid positions inside the 24-column layout."""
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
    assert os.path.getsize(DASHBOARD) < 200_000
