"""TLS between Envoy and the EPP (the default), health names, and the EPP's own metrics."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.test_envoy_routing import COMPLETION
from tests.support import EppProcess, UpstreamFleet, post_json, start_envoy, start_epp

pytestmark = pytest.mark.e2e


def test_envoy_reaches_a_tls_epp_with_its_self_signed_certificate(fleet: UpstreamFleet, endpoints_file: str) -> None:
    epp = start_epp(secure=True, endpoints_file=endpoints_file)
    envoy = start_envoy(epp.grpc_port, epp_tls=True)
    try:
        r = post_json(envoy.url + "/v1/completions", COMPLETION)
        assert r.status == 200
        assert r.json()["served_by"] == "u1"
    finally:
        envoy.proc.stop()
        epp.proc.stop()


@pytest.mark.parametrize("service", ["liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor", ""])
def test_health_services(epp: EppProcess, service: str) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{epp.health_port}") as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_metrics_use_the_upstream_names(epp: EppProcess, fleet: UpstreamFleet) -> None:
    envoy = start_envoy(epp.grpc_port)
    try:
        assert post_json(envoy.url + "/v1/completions", COMPLETION).status == 200
        assert post_json(envoy.url + "/v1/completions", {"prompt": "no model"}).status == 400
    finally:
        envoy.proc.stop()
    text = urllib.request.urlopen(f"http://127.0.0.1:{epp.metrics_port}/metrics", timeout=5).read().decode()
    for name in ("inference_objective_request_total", "inference_objective_request_error_total",
                 "inference_objective_request_duration_seconds", "inference_objective_input_tokens",
                 "inference_objective_output_tokens", "inference_objective_running_requests",
                 "inference_pool_ready_pods", "inference_extension_scheduler_e2e_duration_seconds",
                 "inference_extension_scrape_errors_total"):
        assert f"\n{name}" in text, name
    assert 'inference_objective_request_total{model_name="food-review",priority="0",target_model_name="food-review"}' in text
    assert 'error_code="BadRequest"' in text
    assert 'inference_extension_scrape_errors_total{endpoint="u2",reason="invalid_content"}' in text
