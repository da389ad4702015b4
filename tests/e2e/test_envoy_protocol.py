"""The rest of the EPP protocol through a real Envoy: the endpoint that served, and model
servers that fail."""

from __future__ import annotations

import urllib.request
from typing import Any, Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp.v1 import pick_pb2, pick_pb2_grpc
from tests.support import (
    EnvoyProcess,
    EppProcess,
    UpstreamFleet,
    endpoints_file_for,
    idle_pair,
    post_json,
    start_envoy,
    start_epp,
    wait_until,
)

pytestmark = pytest.mark.e2e

SERVED_HEADER = "x-test-served-endpoint"


def report_served_endpoint(cfg: dict[str, Any]) -> None:
    """Stand in for a data plane that reports the endpoint it used: Envoy's
    header-to-metadata filter copies an upstream response header into `envoy.lb`
    metadata, which the ext_proc filter forwards on the response messages (on the
    response path, filters run in reverse, so it must sit after ext_proc)."""
    hcm = cfg["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    filters = hcm["httpFilters"]
    filters.insert(len(filters) - 1, {
        "name": "envoy.filters.http.header_to_metadata",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config",
            "response_rules": [{
                "header": SERVED_HEADER,
                "on_header_present": {"metadata_namespace": "envoy.lb",
                                      "key": "x-gateway-destination-endpoint-served",
                                      "type": "STRING"},
                "remove": True,
            }],
        },
    })


@pytest.fixture(scope="module")
def pair() -> Iterator[UpstreamFleet]:
    with idle_pair() as f:
        yield f


@pytest.fixture(scope="module")
def epp(pair: UpstreamFleet) -> Iterator[EppProcess]:
    p = start_epp(endpoints_file=endpoints_file_for(pair, "protocol-endpoints.yaml"))
    yield p
    p.proc.stop()


@pytest.fixture(scope="module")
def envoy(epp: EppProcess) -> Iterator[EnvoyProcess]:
    e = start_envoy(epp.grpc_port, patch=report_served_endpoint)
    yield e
    e.proc.stop()


def prefix_scores(epp: EppProcess, prompt: str) -> dict[str, float]:
    stub = pick_pb2_grpc.PickerStub(grpc.insecure_channel(f"127.0.0.1:{epp.grpc_port}"))
    r = stub.Explain(pick_pb2.PickRequest(model="m", prompt=prompt), timeout=5)
    (profile,) = r.explanation.profiles
    return {c.endpoint_name: c.raw["prefix-cache-scorer"] for c in profile.scores}


def sample(epp: EppProcess, name: str, **labels: str) -> float:
    """One sample of the EPP's /metrics (0 when absent)."""
    url = f"http://127.0.0.1:{epp.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


def test_prefix_learning_follows_the_endpoint_that_served(
        envoy: EnvoyProcess, epp: EppProcess, pair: UpstreamFleet) -> None:
    u0, u1 = pair.upstreams
    # Whichever is picked, the data plane reports that the other one served.
    u0.reports_served, u1.reports_served = u1.hostport, u0.hostport
    try:
        prompt = "A long shared system prompt for this conversation. " * 40
        assert prefix_scores(epp, prompt) == {"u0": 0.0, "u1": 0.0}
        r = post_json(envoy.url + "/v1/completions", {"model": "m", "prompt": prompt})
        assert r.status == 200, r.body
        assert SERVED_HEADER not in r.headers  # consumed by Envoy
        picked = r.json()["served_by"]
        other = "u1" if picked == "u0" else "u0"
        # The served endpoint's cache now holds the prompt too: the EPP learned it there.
        wait_until(lambda: prefix_scores(epp, prompt)[other] > 0.9, 5, "served endpoint learned")
    finally:
        u0.reports_served = u1.reports_served = ""


def test_model_server_errors_are_counted_and_never_as_success(
        envoy: EnvoyProcess, epp: EppProcess, pair: UpstreamFleet) -> None:
    for u in pair.upstreams:
        u.status = 503
    try:
        for _ in range(3):
            r = post_json(envoy.url + "/v1/completions", {"model": "failing-model", "prompt": "x"})
            assert r.status == 503
    finally:
        for u in pair.upstreams:
            u.status = 200

    failing = {"model_name": "failing-model", "target_model_name": "failing-model"}
    wait_until(lambda: sample(epp, "inference_objective_request_error_total",
                              error_code="ModelServer5xx", **failing) == 3.0,
               5, "three model-server errors counted")
    # No completed-request latency and no running request left for the failed ones.
    assert sample(epp, "inference_objective_request_duration_seconds_count", **failing) == 0.0
    assert sample(epp, "inference_objective_running_requests", model_name="failing-model") == 0.0
