"""Upstream's own Helm chart deploys this EPP: a user switching keeps their chart, values
and config, and changes only the image.

The `inferencepool` chart of gateway-api-inference-extension v1.5.0 (fetched with
`go mod download`, its hash pinned as in benchmarks/goepp/build_goepp.sh) is installed
with `helm install` and the user guide's one required value into a real kube-apiserver.
Our EPP then runs with exactly the Deployment's args (upstream's flags: `--zap-encoder
json`, `--tracing=false`, space-separated values), the ConfigMap's default config (with
upstream's `metrics-data-source` and `core-metrics-extractor` plugins) and the token of
the chart's own service account (upstream's RBAC, narrower than ours). What differs from
a cluster: no kubelet (the test writes pod status), the ports are free local ones rather
than 9002/9003/9090 (the machine is shared), and the simulated pod listens on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.k8s import cluster as k
from tests.k8s.conftest import Kubelet, sa_token
from tests.k8s.test_gke_guide import Guide, helm_env
from tests.support import Proc, post_json, start_envoy, stop_processes, wait_until

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

MODULE = "sigs.k8s.io/gateway-api-inference-extension"
VERSION = "v1.5.0"
MODULE_SUM = "h1:w9Awt60cmI1vM7Y6N81h8wDCBP0WkmxpdI7GKY0v070="  # as build_goepp.sh pins it
RELEASE = "vllm-llama3-8b-instruct"
EPP = f"{RELEASE}-epp"
NAMESPACE = "upstream-chart"


def upstream_chart(workdir: Path) -> Path:
    """The v1.5.0 `inferencepool` chart with its `epplib` dependency built, in `workdir`."""
    cache = Path(os.environ.get("EPP_K8S_CACHE", Path.home() / ".cache" / "epp-k8s"))
    env = dict(os.environ, GOMODCACHE=str(cache / "gomod"), GOWORK="off",
               GOTOOLCHAIN="local", GOFLAGS="-mod=mod")
    if shutil.which("go") is None:
        pytest.fail("go is needed to fetch the upstream chart (the k8s tests build with it too)")
    r = subprocess.run(["go", "mod", "download", "-json", f"{MODULE}@{VERSION}"], env=env,
                       cwd=workdir, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout)
    assert info["Sum"] == MODULE_SUM, f"{MODULE}@{VERSION} hash {info['Sum']}"
    charts = workdir / "charts"
    for name in ("inferencepool", "epplib"):  # the module cache is read-only
        shutil.copytree(Path(info["Dir"]) / "config" / "charts" / name, charts / name)
    for p in charts.rglob("*"):
        p.chmod(p.stat().st_mode | stat.S_IWUSR)
    return charts / "inferencepool"


def start_sim() -> tuple[Proc, int]:
    port = k.free_port()
    sim = Proc([sys.executable, "-m", "epp.sim", "--port", str(port),
                "--model", "meta-llama/Llama-3.1-8B-Instruct", "--log-level", "WARNING"], "sim")
    wait_until(lambda: post_json(f"http://127.0.0.1:{port}/v1/completions",
                                 {"prompt": "x", "max_tokens": 1}).status == 200,
               30, "the simulator")
    return sim, port


def epp_args(g: Guide, workdir: Path, ports: tuple[int, int, int]) -> list[str]:
    """The installed Deployment's args as written, the ConfigMap's files at the path they
    name, then this machine's ports and the chart's service account's token."""
    dep = g.get(g.ns_path("apps/v1", "deployments", EPP))
    (container,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "epp"]
    files = g.get(g.ns_path("v1", "configmaps", EPP))["data"]
    conf = workdir / "config"
    conf.mkdir()
    for name, text in files.items():
        (conf / name).write_text(text)
    args = [a.replace("/config/", f"{conf}/") for a in container["args"]]
    token = sa_token(g.admin, NAMESPACE, EPP)
    return [*args, f"--grpc-port={ports[0]}", f"--grpc-health-port={ports[1]}",
            f"--metrics-port={ports[2]}", "--bind-address=127.0.0.1",
            f"--kubeconfig={g.cluster.kubeconfig(token)}"]


def health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture(scope="module")
def installed(cluster: k.Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guide]:
    found = k.binaries(with_helm=True)
    assert found is not None, "helm not built (tests/k8s/build_apiserver.sh)"
    workdir = tmp_path_factory.mktemp("upstream-chart")
    chart = upstream_chart(workdir)
    admin = cluster.admin()
    k.apply(admin, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}])
    g = Guide(cluster, admin, NAMESPACE, workdir, str(found[2]), cluster.kubeconfig(k.ADMIN_TOKEN))
    r = subprocess.run([g.helm_bin, "dependency", "build", str(chart)], capture_output=True,
                       text=True, timeout=120, env=helm_env(workdir))
    assert r.returncode == 0, r.stdout + r.stderr
    yield g
    g.helm("uninstall", RELEASE)
    admin.close()


@pytest.fixture(scope="module")
def running(installed: Guide) -> Iterator[dict[str, Any]]:
    g = installed
    sim, sim_port = start_sim()
    procs: list[Any] = [sim.p]
    try:
        r = g.helm("install", RELEASE, str(g.workdir / "charts" / "inferencepool"),
                   "--set", f"inferencePool.modelServers.matchLabels.app={RELEASE}",
                   "--set", f"inferencePool.targetPorts[0].number={sim_port}",
                   "--set", "inferenceExtension.image.registry=example.com",
                   "--set", "inferenceExtension.image.repository=epp-python")
        assert r.returncode == 0, r.stdout + r.stderr
        Kubelet(g.admin, NAMESPACE).start(f"{RELEASE}-0", "127.0.0.1", labels={"app": RELEASE})
        ports = (k.free_port(), k.free_port(), k.free_port())
        args = epp_args(g, g.workdir, ports)
        epp = Proc([sys.executable, "-m", "epp", *args], "epp", env={"POD_NAME": f"{EPP}-0"})
        procs.append(epp.p)
        envoy = start_envoy(ports[0], epp_tls=True)  # upstream's default: --secure-serving
        procs.append(envoy.proc.p)
        try:
            wait_until(lambda: health(ports[1], "inference-extension")
                       == health_pb2.HealthCheckResponse.SERVING, 60, "the chart's probe")
        except (TimeoutError, AssertionError, grpc.RpcError) as e:
            raise AssertionError(f"{e}\n--- EPP log:\n{epp.output()}") from None
        yield {"args": args, "epp": epp, "envoy": envoy, "health": ports[1]}
    finally:
        stop_processes(procs)


def test_the_charts_probes_pass_and_a_request_is_routed(running: dict[str, Any]) -> None:
    assert "--zap-encoder" in running["args"] and "--tracing=false" in running["args"]
    assert health(running["health"], "liveness") == health_pb2.HealthCheckResponse.SERVING
    r = post_json(running["envoy"].url + "/v1/completions",
                  {"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": "hello",
                   "max_tokens": 5})
    assert r.status == 200, (r.status, r.body, running["epp"].output()[-3000:])
    assert r.json()["choices"][0]["text"]


def test_logs_follow_the_charts_json_encoder(running: dict[str, Any]) -> None:
    lines = [ln for ln in running["epp"].output().splitlines() if ln.startswith("{")]
    assert lines, running["epp"].output()[-2000:]
    assert all(isinstance(json.loads(ln), dict) for ln in lines)
    # Upstream's config, with its data-layer plugins, was the one loaded (not our default).
    text = (Path(running["args"][running["args"].index("--config-file") + 1])).read_text()
    assert "metrics-data-source" in yaml.safe_load(text)["plugins"][3]["type"]
