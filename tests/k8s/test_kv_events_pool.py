"""Exact prefix routing in InferencePool mode: the EPP finds each pod's KV-event sockets from
the pod's own labels, as the API server reports them, and follows pods in and out.

Two simulated vLLM pods (`epp-sim`, tiny tokenizer, KV events on) both listen on 127.0.0.1,
so each carries its serving port in the active-ports annotation and its event ports in the
labels `kv-events.epp/port` / `kv-events.epp/replay-port`. A long prompt sent straight to
one pod (traffic the EPP never routed) reaches the EPP only through that pod's events, and
the EPP then picks that pod for it. Deleting the pod drops what it held.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
import yaml

from epp.k8s.objects import ACTIVE_PORTS_ANNOTATION
from epp.sim import tinytok
from epp.v1 import pick_pb2, pick_pb2_grpc
from tests.k8s import cluster as k
from tests.k8s.conftest import POOL, POOL_LABELS, Kubelet, sa_token
from tests.support import Proc, post_json, wait_until

pytestmark = pytest.mark.k8s

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PROMPT = [{"role": "system", "content": "You are a helpful assistant. " + " ".join(
              f"rule {i}: answer briefly and cite the pool" for i in range(60))},
          {"role": "user", "content": "What is a pod?"}]


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[tuple[dict[str, dict[str, int]], Path]]:
    tok = tinytok.write(tmp_path / "tokenizer")
    replicas = {name: {"port": k.free_port(), "kv_events_port": k.free_port(),
                       "kv_events_replay_port": k.free_port()} for name in ("vllm-x", "vllm-y")}
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump({
        "defaults": {"model": MODEL, "tokenizer": str(tok), "block_size": 16,
                     "num_gpu_blocks": 200, "max_model_len": 2048, "time_scale": 50.0},
        "replicas": [{"name": n, **r} for n, r in replicas.items()]}))
    sim = Proc([sys.executable, "-m", "epp.sim", "--fleet-config", str(tmp_path / "fleet.yaml")],
               "sim")
    try:
        wait_until(lambda: "ready" in sim.output() or sim.p.poll() is not None, 30, "epp-sim")
        assert sim.p.poll() is None, sim.output()
        yield replicas, tok
    finally:
        sim.stop()


def explain(grpc_port: int) -> dict[str, float]:
    """Each endpoint's raw precise-prefix score for PROMPT, by endpoint name."""
    body = json.dumps({"model": MODEL, "messages": PROMPT}).encode()
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        r = pick_pb2_grpc.PickerStub(ch).Explain(
            pick_pb2.PickRequest(body=body, path="/v1/chat/completions"), timeout=5)
    (profile,) = r.explanation.profiles
    return {c.endpoint_name: c.raw["precise-prefix-cache-scorer"] for c in profile.scores}


def pod_of(endpoint_name: str) -> str:
    return re.sub(r"-rank-\d+$", "", endpoint_name)


def test_pods_event_ports_come_from_their_labels_and_leave_with_them(
        cluster: k.Cluster, admin: Any, namespace: str, kubelet: Kubelet, tmp_path: Path,
        sims: tuple[dict[str, dict[str, int]], Path]) -> None:
    replicas, tok = sims
    pool = f"/apis/inference.networking.k8s.io/v1/namespaces/{namespace}/inferencepools/{POOL}"
    status, body = k.call(admin, "PATCH", pool, {"spec": {"targetPorts": [
        {"number": r["port"]} for r in replicas.values()]}}, "application/merge-patch+json")
    assert status == 200, body
    for name, r in replicas.items():
        kubelet.start(name, "127.0.0.1",
                      labels={**POOL_LABELS, "kv-events.epp/port": str(r["kv_events_port"]),
                              "kv-events.epp/replay-port": str(r["kv_events_replay_port"])},
                      annotations={ACTIVE_PORTS_ANNOTATION: str(r["port"])})
    config = f"""
plugins:
- type: queue-scorer
- type: precise-prefix-cache-scorer
  parameters:
    blockSize: 16
    speculativeTTLSeconds: 0
    coldPromptScore: 0           # scores say only what pods report holding
    tokenizers: {{"{MODEL}": "{tok}"}}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 1
  - pluginRef: precise-prefix-cache-scorer
    weight: 3
"""
    grpc_port = k.free_port()
    epp = Proc([sys.executable, "-m", "epp", "--pool-name", POOL, "--pool-namespace", namespace,
                "--kubeconfig", cluster.kubeconfig(sa_token(admin, namespace)),
                "--bind-address", "127.0.0.1", "--secure-serving=false", "--config-text", config,
                "--grpc-port", str(grpc_port), "--grpc-health-port", str(k.free_port()),
                "--metrics-port", str(k.free_port())], "epp", env={"POD_NAME": "epp-0"})
    try:
        wait_until(lambda: {pod_of(n) for n in explain(grpc_port)} == set(replicas), 60,
                   "the EPP to serve both pods")
        # Straight to vllm-y: only its KV events can tell the EPP.
        r = post_json(f"http://127.0.0.1:{replicas['vllm-y']['port']}/v1/chat/completions",
                      {"model": MODEL, "messages": PROMPT, "max_tokens": 1})
        assert r.status == 200, r.body
        try:
            wait_until(lambda: {pod_of(n): s for n, s in explain(grpc_port).items()}
                       == {"vllm-x": 0.0, "vllm-y": 1.0}, 15, "vllm-y's BlockStored events")
        except TimeoutError as e:
            raise AssertionError(f"{e}: {explain(grpc_port)}\n{epp.output()[-3000:]}") from None
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            pick = pick_pb2_grpc.PickerStub(ch).Pick(pick_pb2.PickRequest(
                body=json.dumps({"model": MODEL, "messages": PROMPT}).encode(),
                path="/v1/chat/completions"), timeout=5)
        assert pod_of(pick.endpoint_name) == "vllm-y"
        assert pick.endpoint == f"127.0.0.1:{replicas['vllm-y']['port']}"

        kubelet.delete("vllm-y")
        wait_until(lambda: {pod_of(n) for n in explain(grpc_port)} == {"vllm-x"}, 30,
                   "vllm-y to leave the pool")
        # Back under the same name with a restarted engine's ports: nothing of the old
        # pod's blocks is credited to it.
        kubelet.start("vllm-y", "127.0.0.1",
                      labels={**POOL_LABELS, "kv-events.epp/port": str(k.free_port()),
                              "kv-events.epp/replay-port": "0"},
                      annotations={ACTIVE_PORTS_ANNOTATION: str(replicas["vllm-y"]["port"])})
        wait_until(lambda: {pod_of(n) for n in explain(grpc_port)} == set(replicas), 30,
                   "vllm-y back")
        assert {pod_of(n): s for n, s in explain(grpc_port).items()} == {"vllm-x": 0.0,
                                                                         "vllm-y": 0.0}
    finally:
        epp.stop()
