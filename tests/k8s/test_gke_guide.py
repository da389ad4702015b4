"""The GKE Inference Gateway guide, followed step by step with our chart and our EPP,
against a real kube-apiserver.

1. `helm install` with exactly the guide's command, our chart in place of the upstream
   `inferencepool` chart; the installed InferencePool, EPP Deployment and Service and the
   GKE policies are what the guide expects.
2. The guide's InferenceObjectives, as written (under both API groups it uses, with and
   without `group` in `poolRef`), apply and reach the EPP.
3. Simulated vLLM pods (`epp-sim`) carry the guide's labels; the EPP runs with the args
   and config the chart put in its Deployment and ConfigMap, as the chart's service
   account; the guide's curl body goes through a real Envoy to a pod serving the adapter.
4. Under saturation, `llama3-base-model` (priority 20) is served before `food-review` (10).

What differs from a GKE cluster, and why: every simulated pod has the IP 127.0.0.1, so
each listens on its own port, named by its active-ports annotation; after the guide's
install the release is upgraded (`--reuse-values`, upstream's value names) with those
ports and with a config that turns flow control on (the priorities only order requests
while they wait) and filters by LoRA affinity (one simulated pod lacks the adapter, which
the guide's pods all load). The GKE policy CRDs are schema-less stand-ins
(tests/k8s/stand-ins/crds.yaml). There is no kubelet: the test writes pod status.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from epp.config import DEFAULT_CONFIG_TEXT
from epp.k8s.objects import ACTIVE_PORTS_ANNOTATION
from epp.sim.server import REPLICA_HEADER
from tests.k8s import cluster as k
from tests.k8s.conftest import Kubelet, sa_token
from tests.support import (
    EnvoyProcess,
    Proc,
    http,
    post_json,
    start_envoy,
    stop_processes,
    wait_until,
)

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

CHART = k.REPO / "deploy" / "helm" / "epp"
STAND_INS = Path(__file__).parent / "stand-ins" / "crds.yaml"

RELEASE = "vllm-llama3-8b-instruct"
EPP = f"{RELEASE}-epp"
BASE_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
ADAPTER = "food-review-1"

# The guide's command, word for word, with our chart's path for the upstream OCI chart.
GUIDE_INSTALL = ["install", RELEASE,
                 "--set", f"inferencePool.modelServers.matchLabels.app={RELEASE}",
                 "--set", "provider.name=gke",
                 "--version", "v1.0.0", str(CHART)]

# The guide's objectives as written: one in each API group it uses, one naming the pool's
# group in poolRef and one leaving it to the default.
GUIDE_OBJECTIVES = f"""\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata:
  name: food-review
spec:
  priority: 10
  poolRef:
    name: {RELEASE}
    group: "inference.networking.k8s.io"
---
apiVersion: inference.networking.k8s.io/v1alpha2
kind: InferenceObjective
metadata:
  name: llama3-base-model
spec:
  priority: 20
  poolRef:
    name: {RELEASE}
"""

# The guide's request: a string temperature and a bearer token the EPP passes through.
GUIDE_BODY = {"model": ADAPTER, "prompt": "What is the best pizza in the world?",
              "max_tokens": 100, "temperature": "0"}
GUIDE_HEADERS = {"Content-Type": "application/json",
                 "Authorization": "Bearer ya29.not-a-real-access-token"}

# Two pods serve the guide's adapter, one only the base model (vLLM without --enable-lora).
FLEET = {"defaults": {"model": BASE_MODEL, "max_loras": 2, "lora_load_time": 0.0,
                      "max_num_seqs": 16, "seed": 7},
         "replicas": [{"name": f"{RELEASE}-0", "lora_modules": [f"{ADAPTER}=/adapters/{ADAPTER}"]},
                      {"name": f"{RELEASE}-1", "lora_modules": [f"{ADAPTER}=/adapters/{ADAPTER}"]},
                      {"name": f"{RELEASE}-2"}]}
ADAPTER_PODS = {f"{RELEASE}-0", f"{RELEASE}-1"}



def flow_control_config() -> str:
    """The config given at `helm upgrade` (upstream's pluginsCustomConfig): the default
    profile behind the `lora-affinity` filter (the guide's pods all load the adapter; in
    this mixed pool an adapter request must skip the base-only pod), and flow control with
    one request in flight per pod counting as full, so that a burst waits in the EPP and
    is released by priority."""
    cfg = yaml.safe_load(DEFAULT_CONFIG_TEXT)
    cfg["plugins"].insert(0, {"type": "lora-affinity"})
    cfg["schedulingProfiles"][0]["plugins"].insert(0, {"pluginRef": "lora-affinity"})
    cfg["featureGates"] = ["flowControl"]
    cfg["saturationDetector"] = {"type": "concurrency-detector",
                                 "parameters": {"mode": "requests", "maxConcurrency": 1}}
    cfg["flowControl"] = {"defaultRequestTTL": "30s"}
    return yaml.safe_dump(cfg)


def helm_env(tmp: Path) -> dict[str, str]:
    return dict(os.environ, HELM_CACHE_HOME=str(tmp / "cache"), HELM_CONFIG_HOME=str(tmp / "config"),
                HELM_DATA_HOME=str(tmp / "data"))


@dataclass
class Guide:
    cluster: k.Cluster
    admin: Any
    namespace: str
    workdir: Path
    helm_bin: str
    kubeconfig: str

    def helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.helm_bin, "--kubeconfig", self.kubeconfig,
                               "--namespace", self.namespace, *args],
                              capture_output=True, text=True, timeout=120,
                              env=helm_env(self.workdir))

    def get(self, path: str) -> dict[str, Any]:
        status, body = k.call(self.admin, "GET", path)
        assert status == 200, f"GET {path}: {status} {body}"
        return body

    def ns_path(self, api: str, plural: str, name: str = "") -> str:
        base = "/api/v1" if api == "v1" else f"/apis/{api}"
        return f"{base}/namespaces/{self.namespace}/{plural}" + (f"/{name}" if name else "")


@pytest.fixture(scope="module")
def guide(cluster: k.Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guide]:
    """A namespace of its own (nothing of deploy/kubernetes in it), the GKE CRD stand-ins,
    and the guide's `helm install`."""
    found = k.binaries(with_helm=True)
    if found is None:
        pytest.skip("helm not built (tests/k8s/build_apiserver.sh)")
    admin = cluster.admin()
    ns = "gke-guide"
    k.apply(admin, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}])
    k.apply(admin, k.load_docs(STAND_INS))
    g = Guide(cluster, admin, ns, tmp_path_factory.mktemp("guide"), str(found[2]),
              cluster.kubeconfig(k.ADMIN_TOKEN))
    wait_until(lambda: len(k.call(admin, "GET", "/apis/networking.gke.io/v1")[1]["resources"]) == 2,
               30, "the stand-in CRDs served")
    r = g.helm(*GUIDE_INSTALL)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        yield g
    finally:
        g.helm("uninstall", RELEASE)
        admin.close()


def test_the_guides_install_creates_the_pool_the_epp_and_the_gke_policies(guide: Guide):
    pool = guide.get(guide.ns_path("inference.networking.k8s.io/v1", "inferencepools", RELEASE))
    assert pool["spec"]["selector"] == {"matchLabels": {"app": RELEASE}}
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"]["name"] == EPP
    assert pool["spec"]["endpointPickerRef"]["port"] == {"number": 9002}

    deployment = guide.get(guide.ns_path("apps/v1", "deployments", EPP))
    service = guide.get(guide.ns_path("v1", "services", EPP))
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc-ext-proc"] == 9002
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--pool-name={RELEASE}" in args and f"--pool-namespace={guide.namespace}" in args

    target = {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": RELEASE}
    hc = guide.get(guide.ns_path("networking.gke.io/v1", "healthcheckpolicies", RELEASE))
    backend = guide.get(guide.ns_path("networking.gke.io/v1", "gcpbackendpolicies", RELEASE))
    assert hc["spec"]["targetRef"] == target == backend["spec"]["targetRef"]
    assert hc["spec"]["default"]["config"]["httpHealthCheck"]["port"] == 8000
    assert backend["spec"]["default"]["timeoutSec"] == 300

    # `helm template` with the same words renders what was installed.
    r = guide.helm("template", *GUIDE_INSTALL[1:])
    assert r.returncode == 0, r.stderr
    rendered = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(r.stdout) if d}
    assert {("InferencePool", RELEASE), ("Deployment", EPP), ("Service", EPP),
            ("HealthCheckPolicy", RELEASE), ("GCPBackendPolicy", RELEASE)} <= rendered


def test_helm_lint_passes_with_the_schema_and_unknown_values_fail(guide: Guide):
    """The chart tests in tests/unit need helm too; `make test` may run before it is built."""
    r = guide.helm("lint", "--strict", str(CHART), "--set", GUIDE_INSTALL[3])
    assert r.returncode == 0, r.stdout + r.stderr
    r = guide.helm("template", *GUIDE_INSTALL[1:], "--set", "inferencePool.selector.app=other")
    assert r.returncode != 0 and "selector" in r.stderr


# -- the EPP, the pods and Envoy --------------------------------------------------------


@dataclass
class Stack:
    guide: Guide
    kubelet: Kubelet
    ports: dict[str, int]
    epp: Proc
    epp_metrics: int
    envoy: EnvoyProcess

    def series(self, series: str) -> list[float]:
        """The values of a metric's series (or of one series, given with its labels) on
        the EPP's /metrics, read with the admin token (--metrics-endpoint-auth is on)."""
        r = http("GET", f"http://127.0.0.1:{self.epp_metrics}/metrics",
                 headers={"Authorization": f"Bearer {k.ADMIN_TOKEN}"})
        assert r.status == 200, r.body
        labels = "" if "{" in series else r"(?:\{[^}]*\})?"
        return [float(v) for v in
                re.findall(rf"^{re.escape(series)}{labels} (\S+)$", r.body.decode(), re.M)]

    def metric(self, series: str) -> float:
        return sum(self.series(series))


def start_sims(workdir: Path) -> tuple[subprocess.Popen[str], dict[str, int]]:
    """`epp-sim` with FLEET on free ports; returns the process and each replica's port."""
    fleet = workdir / "fleet.yaml"
    fleet.write_text(yaml.safe_dump(FLEET))
    proc = subprocess.Popen([sys.executable, "-m", "epp.sim", "--fleet-config", str(fleet),
                             "--base-port", "0", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ports: dict[str, int] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := re.match(r"epp-sim: (\S+) http://127\.0\.0\.1:(\d+) ", line):
            ports[m[1]] = int(m[2])
        if line.startswith("epp-sim: ready"):
            break
    assert len(ports) == len(FLEET["replicas"]), f"epp-sim did not start: {ports}"
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
    return proc, ports


def epp_command(guide: Guide, workdir: Path, ports: tuple[int, int, int]) -> list[str]:
    """The installed Deployment's args for the installed ConfigMap, with local ports, the
    config files written out, and the chart's service account's own token."""
    dep = guide.get(guide.ns_path("apps/v1", "deployments", EPP))
    config = guide.get(guide.ns_path("v1", "configmaps", EPP))["data"]
    conf_dir = workdir / "config"
    conf_dir.mkdir(exist_ok=True)
    for name, text in config.items():
        (conf_dir / name).write_text(text)
    local = {"--grpc-port": ports[0], "--grpc-health-port": ports[1], "--metrics-port": ports[2]}
    args = []
    for a in dep["spec"]["template"]["spec"]["containers"][0]["args"]:
        flag, _, value = a.partition("=")
        if flag in local:
            a = f"{flag}={local[flag]}"
        elif flag == "--config-file":
            a = f"{flag}={conf_dir / Path(value).name}"
        args.append(a)
    token = sa_token(guide.admin, guide.namespace, EPP)
    return [sys.executable, "-m", "epp", *args, "--bind-address=127.0.0.1",
            f"--kubeconfig={guide.cluster.kubeconfig(token)}"]


@pytest.fixture(scope="module")
def stack(guide: Guide) -> Iterator[Stack]:
    g = guide
    kubelet = Kubelet(g.admin, g.namespace)
    sims, ports = start_sims(g.workdir)
    procs: list[Any] = [sims]
    try:
        names = sorted(ports)
        # The pods' own ports, the test's config, and (`flags`) a fast refresh of the pool
        # gauges the test polls.
        values = g.workdir / "local-values.yaml"
        values.write_text(yaml.safe_dump({
            "inferencePool": {"targetPorts": [{"number": ports[n]} for n in names]},
            "inferenceExtension": {
                "pluginsConfigFile": "flow-control.yaml",
                "pluginsCustomConfig": {"flow-control.yaml": flow_control_config()},
                "flags": {"v": 1, "refresh-prometheus-metrics-interval": "100ms"}}}))
        r = g.helm("upgrade", RELEASE, str(CHART), "--reuse-values", "-f", str(values))
        assert r.returncode == 0, r.stdout + r.stderr
        for name in names:  # the pods of the model server Deployment, with the guide's label
            kubelet.start(name, "127.0.0.1", labels={"app": RELEASE},
                          annotations={ACTIVE_PORTS_ANNOTATION: str(ports[name])})
        grpc, health, metrics = k.free_port(), k.free_port(), k.free_port()
        epp = Proc(epp_command(g, g.workdir, (grpc, health, metrics)), "epp",
                   env={"POD_NAME": f"{EPP}-0"})
        procs.append(epp.p)
        envoy = start_envoy(grpc, epp_tls=True)  # the chart's EPP serves TLS, as on GKE
        procs.append(envoy.proc.p)
        s = Stack(g, kubelet, ports, epp, metrics, envoy)
        try:
            # Three pods, each with fresh metrics (per-pod series exist for those only).
            wait_until(lambda: len(s.series("inference_pool_per_pod_queue_size")) == len(names),
                       60, "the EPP to see the three pods and scrape them")
        except (TimeoutError, AssertionError, OSError) as e:
            raise AssertionError(f"{e}\n--- EPP log:\n{epp.output()}") from None
        yield s
    finally:
        stop_processes(procs)


def served_by(r: Any) -> str:
    return r.headers.get(REPLICA_HEADER, "")


@pytest.fixture(scope="module")
def objectives(guide: Guide) -> dict[str, int]:
    """The guide's objective manifests, applied as written; name -> priority as stored."""
    stored = {}
    for doc in yaml.safe_load_all(GUIDE_OBJECTIVES):
        plural = guide.ns_path(doc["apiVersion"], "inferenceobjectives")
        status, body = k.call(guide.admin, "POST", plural, doc)
        assert status == 201, body
        stored[doc["metadata"]["name"]] = guide.get(f"{plural}/{doc['metadata']['name']}")["spec"]["priority"]
    return stored


def test_the_guides_objectives_apply_in_both_groups_and_reach_the_epp(objectives: dict[str, int],
                                                                      stack: Stack):
    assert objectives == {"food-review": 10, "llama3-base-model": 20}
    for name, model in (("food-review", ADAPTER), ("llama3-base-model", BASE_MODEL)):
        r = post_json(stack.envoy.url + "/v1/completions",
                      {"model": model, "prompt": "hi", "max_tokens": 2, "temperature": 0},
                      {**GUIDE_HEADERS, "x-gateway-inference-objective": name})
        assert r.status == 200, r.body
        series = (f'inference_objective_request_total{{model_name="{model}",'
                  f'priority="{objectives[name]}",target_model_name="{model}"}}')
        assert stack.metric(series) == 1, f"the EPP did not apply {name}'s priority"


def test_the_guides_request_is_routed_to_a_pod_serving_the_adapter(stack: Stack):
    for _ in range(6):
        r = post_json(stack.envoy.url + "/v1/completions", GUIDE_BODY, GUIDE_HEADERS)
        assert served_by(r) in ADAPTER_PODS, (r.status, r.headers, r.body)
        # The EPP routed it and passed the string temperature on; the model server takes
        # "0" as 0.0 (vLLM's request parser does, and so does the simulator).
        assert r.status == 200, r.body
    r = post_json(stack.envoy.url + "/v1/completions", {**GUIDE_BODY, "temperature": 0},
                  GUIDE_HEADERS)
    assert r.status == 200 and served_by(r) in ADAPTER_PODS, r.body
    assert r.json()["model"] == ADAPTER


def test_llama3_base_model_outranks_food_review_under_saturation(objectives: dict[str, int],
                                                                stack: Stack):
    # One pod left: every request waits for the one before it to finish, so the order
    # in which they finish is the order in which the EPP released them.
    keep = f"{RELEASE}-0"
    for name in stack.ports:
        if name != keep:
            stack.kubelet.set_status(name, "127.0.0.1", ready=False)
    wait_until(lambda: stack.metric("inference_pool_ready_pods") == 1, 30, "one ready pod")

    url = stack.envoy.url + "/v1/completions"
    finished: list[str] = []
    statuses: list[tuple[str, int, str]] = []
    lock = threading.Lock()

    def send(objective: str, body: dict[str, Any]) -> None:
        r = post_json(url, body, {**GUIDE_HEADERS, "x-gateway-inference-objective": objective})
        with lock:
            finished.append(objective)
            statuses.append((objective, r.status, served_by(r)))

    # The blocker holds the pod's one slot for a few seconds (200 tokens).
    blocker = threading.Thread(target=send, args=("llama3-base-model", {
        "model": BASE_MODEL, "prompt": "blocker", "max_tokens": 200, "temperature": 0}))
    blocker.start()
    wait_until(lambda: stack.metric("inference_objective_running_requests") == 1, 10,
               "the blocker running")
    # The guide's two kinds of request, interleaved, each taking a while (the guide's
    # string temperature, taken as vLLM takes it).
    plan = ["food-review", "llama3-base-model"] * 3
    threads = [threading.Thread(target=send, args=(o, {
        "model": ADAPTER if o == "food-review" else BASE_MODEL,
        "prompt": f"{o} {i}", "max_tokens": 12, "temperature": "0"}))
        for i, o in enumerate(plan)]
    for t in threads:
        t.start()
    wait_until(lambda: stack.metric("inference_extension_flow_control_queue_size") == len(plan),
               15, "the burst queued behind the blocker")
    blocker.join(30)
    for t in threads:
        t.join(30)
    assert all(s == 200 and pod == keep for _, s, pod in statuses), statuses
    assert finished == ["llama3-base-model"] * 4 + ["food-review"] * 3, finished
