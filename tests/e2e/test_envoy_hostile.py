"""Hostile clients and a failing model server, through a real Envoy (issue 12)."""

from __future__ import annotations

import json
import urllib.request
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    EnvoyProcess,
    EppProcess,
    UpstreamFleet,
    endpoints_file_for,
    http,
    idle_pair,
    post_json,
    start_envoy,
    start_epp,
)

pytestmark = pytest.mark.e2e
CAP = 4


@pytest.fixture(scope="module")
def pair() -> Iterator[UpstreamFleet]:
    with idle_pair() as f:
        yield f


@pytest.fixture(scope="module")
def epp(pair: UpstreamFleet) -> Iterator[EppProcess]:
    p = start_epp("--metrics-label-cap", str(CAP), "--passive-health-cooldown", "60s",
                  endpoints_file=endpoints_file_for(pair, "hostile-endpoints.yaml"))
    yield p
    p.proc.stop()


@pytest.fixture(scope="module")
def envoy(epp: EppProcess) -> Iterator[EnvoyProcess]:
    e = start_envoy(epp.grpc_port)
    yield e
    e.proc.stop()


def scrape(epp: EppProcess) -> list:
    text = urllib.request.urlopen(f"http://127.0.0.1:{epp.metrics_port}/metrics", timeout=10).read()
    return list(text_string_to_metric_families(text.decode()))


@pytest.mark.parametrize(("body", "message"), [
    (b'{"model": "bad\\ud800model", "prompt": "x"}', b"model must be valid Unicode"),
    (b'{"model": "m", "prompt": "x", "temperature": NaN}', b"number NaN is not finite"),
    (b'{"model": "m", "prompt": "x", "temperature": 1e999}', b"number 1e999 is not finite"),
    (json.dumps({"model": "m", "prompt": "x"}).encode("utf-16"), b"not UTF-8"),
    (b"", b"request body is empty"),
])
def test_bodies_that_are_not_what_they_claim_are_400(
        envoy: EnvoyProcess, pair: UpstreamFleet, body: bytes, message: bytes) -> None:
    before = sum(len(u.requests) for u in pair.upstreams)
    r = http("POST", envoy.url + "/v1/completions", body)
    assert r.status == 400 and message in r.body, r.body
    assert sum(len(u.requests) for u in pair.upstreams) == before  # never forwarded


def test_metrics_stay_exposable_and_bounded_whatever_names_clients_send(
        envoy: EnvoyProcess, epp: EppProcess) -> None:
    for i in range(30):
        r = post_json(envoy.url + "/v1/completions", {"model": f"made-up-{i}\u2028\x01", "prompt": "x"})
        assert r.status == 200
    families = {f.name: f for f in scrape(epp)}  # parses: the exposition is intact
    models = {s.labels["model_name"] for s in families["inference_objective_request"].samples}
    made_up = {m for m in models if m.startswith("made-up-")}
    assert len(made_up) <= CAP and "other" in models
    assert all("\x01" not in m for m in models)


def test_a_model_server_failing_every_request_stops_being_picked(
        envoy: EnvoyProcess, epp: EppProcess, pair: UpstreamFleet) -> None:
    bad, good = pair.upstreams
    bad.status = 500
    try:
        statuses = [post_json(envoy.url + "/v1/completions",
                              {"model": "m", "prompt": f"distinct prompt {i}"}).status
                    for i in range(40)]
    finally:
        bad.status = 200
    assert statuses.count(500) <= 5  # --passive-health-consecutive-failures
    assert statuses[-10:] == [200] * 10
    ejected = {s.labels["reason"]: s.value for f in scrape(epp)
               if f.name == "inference_extension_passive_health_ejections"
               for s in f.samples if s.name.endswith("_total")}
    assert ejected.get("consecutive_5xx") == 1.0
