"""The response phase through a real Envoy, on both response paths of `epp envoy-config`:
`observed` (Envoy waits on the EPP for rewritten responses only) and `blocking`.

Either way the EPP must see every response end: token usage counted, the client's model
name restored after a rewrite, the running-requests gauge back to zero when the response
completes and when the client goes away in the middle of it."""

from __future__ import annotations

import http.client
import json
import textwrap
import time
from typing import Iterator

import pytest

from tests.e2e.test_envoy_protocol import sample
from tests.support import (
    EnvoyProcess,
    EppProcess,
    UpstreamFleet,
    post_json,
    scratch_dir,
    start_envoy,
    start_epp,
    wait_until,
)

pytestmark = pytest.mark.e2e

REWRITE = textwrap.dedent("""\
    apiVersion: inference.networking.x-k8s.io/v1alpha2
    kind: InferenceModelRewrite
    metadata: {name: canary, namespace: default}
    spec:
      poolRef: {name: pool}
      rules:
      - matches: [{model: {type: Exact, value: alias}}]
        targets: [{modelRewrite: alias-v2, weight: 100}]
    """)


@pytest.fixture(scope="module")
def fleet() -> Iterator[UpstreamFleet]:
    with UpstreamFleet(2) as f:
        yield f


@pytest.fixture(scope="module")
def epp(fleet: UpstreamFleet) -> Iterator[EppProcess]:
    rules = scratch_dir() / "response-paths-rewrite.yaml"
    rules.write_text(REWRITE)
    p = start_epp("--pool-name", "pool", "--objectives-file", str(rules),
                  endpoints=",".join(u.hostport for u in fleet.upstreams))
    yield p
    p.proc.stop()


@pytest.fixture(scope="module", params=["observed", "blocking"])
def envoy(request: pytest.FixtureRequest, epp: EppProcess) -> Iterator[EnvoyProcess]:
    e = start_envoy(epp.grpc_port, response_path=request.param)
    yield e
    e.proc.stop()


def labels(model: str, target: str | None = None) -> dict[str, str]:
    return {"model_name": model, "target_model_name": target or model}


@pytest.mark.parametrize("stream", [False, True])
def test_usage_is_counted_and_the_request_ends(envoy: EnvoyProcess, epp: EppProcess,
                                               stream: bool) -> None:
    model = f"m-{envoy.port}-{stream}"
    r = post_json(envoy.url + "/v1/completions", {"model": model, "prompt": "x", "stream": stream})
    assert r.status == 200
    assert r.body.count(b"prompt_tokens") == 1  # the body passed through whole
    wait_until(lambda: sample(epp, "inference_objective_output_tokens_sum", **labels(model)) == 3.0,
               5, "output tokens counted")
    assert sample(epp, "inference_objective_input_tokens_sum", **labels(model)) == 7.0
    assert sample(epp, "inference_objective_request_duration_seconds_count", **labels(model)) == 1.0
    assert sample(epp, "inference_objective_running_requests", model_name=model) == 0.0


@pytest.mark.parametrize("stream", [False, True])
def test_rewritten_model_is_restored_for_the_client(envoy: EnvoyProcess, epp: EppProcess,
                                                    fleet: UpstreamFleet, stream: bool) -> None:
    before = sample(epp, "inference_objective_output_tokens_sum", **labels("alias", "alias-v2"))
    r = post_json(envoy.url + "/v1/completions", {"model": "alias", "prompt": "x", "stream": stream})
    assert r.status == 200
    assert b"alias-v2" not in r.body and b'"model": "alias"' in r.body
    seen = [q for u in fleet.upstreams for q in u.requests if b"alias" in q["body"]][-1]
    assert json.loads(seen["body"])["model"] == "alias-v2"
    assert "x-gateway-model-name-restore" not in seen["headers"]  # the marker stays in Envoy
    wait_until(lambda: sample(epp, "inference_objective_output_tokens_sum",
                              **labels("alias", "alias-v2")) == before + 3, 5, "usage counted")


def test_a_forged_restore_marker_changes_nothing(envoy: EnvoyProcess, epp: EppProcess) -> None:
    model = f"forged-{envoy.port}"
    r = post_json(envoy.url + "/v1/completions", {"model": model, "prompt": "x"},
                  headers={"x-gateway-model-name-restore": "1"})
    assert r.status == 200 and r.json()["model"] == model
    wait_until(lambda: sample(epp, "inference_objective_output_tokens_sum", **labels(model)) == 3.0,
               5, "usage counted")


def test_client_going_away_mid_response_ends_the_request(envoy: EnvoyProcess,
                                                         epp: EppProcess) -> None:
    model = f"abandoned-{envoy.port}"
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
    body = json.dumps({"model": model, "prompt": "x", "stream": True, "test_delay": 3})
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert sample(epp, "inference_objective_running_requests", model_name=model) == 1.0
    conn.sock.close()  # mid-stream: the upstream is still sleeping before its first word
    t0 = time.monotonic()
    # Observed: Envoy closes the observer's stream after its deferred-close delay (5 s).
    wait_until(lambda: sample(epp, "inference_objective_running_requests", model_name=model) == 0.0,
               10, "running request released")
    assert time.monotonic() - t0 < 9
