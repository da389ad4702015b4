"""Objectives and rewrites through a real Envoy: important work is protected."""

from __future__ import annotations

import json
import textwrap
from typing import Iterator

import pytest

from tests.support import EnvoyProcess, EppProcess, UpstreamFleet, post_json, start_envoy, start_epp, vllm_page

pytestmark = pytest.mark.e2e

OBJECTIVES = textwrap.dedent("""\
    apiVersion: inference.networking.x-k8s.io/v1alpha2
    kind: InferenceObjective
    metadata: {name: food-review, namespace: default}
    spec: {priority: 10, poolRef: {name: pool}}
    ---
    apiVersion: inference.networking.x-k8s.io/v1alpha2
    kind: InferenceObjective
    metadata: {name: batch, namespace: default}
    spec: {priority: -1, poolRef: {name: pool}}
    ---
    apiVersion: inference.networking.x-k8s.io/v1alpha2
    kind: InferenceModelRewrite
    metadata: {name: canary, namespace: default}
    spec:
      poolRef: {name: pool}
      rules:
      - matches: [{model: {type: Exact, value: food-review}}]
        targets: [{modelRewrite: food-review-v2, weight: 100}]
    """)


@pytest.fixture(scope="module")
def saturated() -> Iterator[UpstreamFleet]:
    with UpstreamFleet(2) as f:
        for u in f.upstreams:
            u.metrics_page = vllm_page(waiting=50, running=64, kv=0.99)
        yield f


@pytest.fixture(scope="module")
def stack(saturated: UpstreamFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyProcess]:
    d = tmp_path_factory.mktemp("objectives")
    (d / "objectives.yaml").write_text(OBJECTIVES)
    epp = start_epp("--pool-name", "pool", "--objectives-file", str(d / "objectives.yaml"),
                    endpoints=",".join(u.hostport for u in saturated.upstreams))
    envoy = start_envoy(epp.grpc_port)
    yield envoy
    envoy.proc.stop()
    epp.proc.stop()


def ask(envoy: EnvoyProcess, objective: str, model: str = "food-review"):
    return post_json(envoy.url + "/v1/completions",
                     {"model": model, "prompt": "Write as if you were a critic: San Francisco", "max_tokens": 10},
                     headers={"x-gateway-inference-objective": objective})


def test_sheddable_request_gets_429_while_the_pool_is_saturated(stack: EnvoyProcess) -> None:
    r = ask(stack, "batch")
    assert r.status == 429
    assert r.body == b"inference error: ResourceExhausted - system saturated, sheddable request dropped"


def test_important_request_is_still_routed(stack: EnvoyProcess, saturated: UpstreamFleet) -> None:
    assert ask(stack, "food-review").status == 200
    assert ask(stack, "unknown-objective").status == 200  # priority 0 is never shed


def test_model_is_rewritten_upstream_and_restored_for_the_client(stack: EnvoyProcess, saturated: UpstreamFleet) -> None:
    r = ask(stack, "food-review")
    assert r.status == 200
    assert r.json()["model"] == "food-review"  # what the client asked for
    upstream = saturated.by_name(r.json()["served_by"])
    assert json.loads(upstream.requests[-1]["body"])["model"] == "food-review-v2"


def test_rewrite_header_overrides_the_rules(stack: EnvoyProcess, saturated: UpstreamFleet) -> None:
    r = post_json(stack.url + "/v1/completions", {"model": "food-review", "prompt": "p"},
                  headers={"x-gateway-model-name-rewrite": "food-review-v3"})
    upstream = saturated.by_name(r.json()["served_by"])
    assert json.loads(upstream.requests[-1]["body"])["model"] == "food-review-v3"
    assert r.json()["model"] == "food-review"
