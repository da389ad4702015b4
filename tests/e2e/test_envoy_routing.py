"""The wire contract, through a real Envoy: requests land where the EPP says."""

from __future__ import annotations

import json
from typing import Iterator

import pytest

from tests.e2e.conftest import envoy_for
from tests.support import (
    EnvoyProcess,
    EppProcess,
    UpstreamFleet,
    http,
    post_json,
    start_envoy,
    start_epp,
)

pytestmark = pytest.mark.e2e

COMPLETION = {"model": "food-review", "prompt": "Write as if you were a critic: San Francisco",
              "max_tokens": 10, "temperature": 0}


@pytest.fixture(scope="module", params=["full-duplex-streamed", "buffered", "streamed"])
def envoy(request: pytest.FixtureRequest, epp: EppProcess) -> Iterator[EnvoyProcess]:
    yield from envoy_for(epp, request.param)


def served_by(fleet: UpstreamFleet, r) -> str:
    assert r.status == 200, (r.status, r.body)
    return r.json()["served_by"]


def test_completion_is_routed_to_a_pool_member(envoy: EnvoyProcess, fleet: UpstreamFleet) -> None:
    r = post_json(envoy.url + "/v1/completions", COMPLETION)
    name = served_by(fleet, r)
    upstream = fleet.by_name(name)
    got = upstream.requests[-1]
    assert got["headers"]["x-gateway-destination-endpoint"] == upstream.hostport
    assert json.loads(got["body"]) == COMPLETION
    assert r.json()["model"] == "food-review"


def test_the_least_loaded_endpoint_with_fresh_metrics_wins(envoy: EnvoyProcess, fleet: UpstreamFleet) -> None:
    # u0 reports a long queue and a full KV cache; u2 reports nothing usable (stale).
    names = {served_by(fleet, post_json(envoy.url + "/v1/completions", {**COMPLETION, "prompt": f"q{i}"}))
             for i in range(6)}
    assert names == {"u1"}


def test_chat_completion(envoy: EnvoyProcess, fleet: UpstreamFleet) -> None:
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    assert served_by(fleet, post_json(envoy.url + "/v1/chat/completions", body))


def test_forged_destination_header_is_overwritten(envoy: EnvoyProcess, fleet: UpstreamFleet) -> None:
    # A client naming its own host must not reach it: the EPP's choice replaces the header.
    forged = "127.0.0.1:1"
    r = post_json(envoy.url + "/v1/completions", COMPLETION,
                  headers={"x-gateway-destination-endpoint": forged})
    upstream = fleet.by_name(served_by(fleet, r))
    assert upstream.requests[-1]["headers"]["x-gateway-destination-endpoint"] == upstream.hostport


def test_body_split_across_many_chunks(envoy: EnvoyProcess, fleet: UpstreamFleet) -> None:
    import http.client

    payload = json.dumps({**COMPLETION, "prompt": "x" * 200_000}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=15)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("content-type", "application/json")
    conn.putheader("transfer-encoding", "chunked")
    conn.endheaders()
    for i in range(0, len(payload), 7000):
        piece = payload[i:i + 7000]
        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    conn.send(b"0\r\n\r\n")
    resp = conn.getresponse()
    data = json.loads(resp.read())
    assert resp.status == 200
    assert data["body_bytes"] == len(payload)


def test_invalid_json_is_a_400_that_reaches_the_client(envoy: EnvoyProcess, fleet: UpstreamFleet) -> None:
    before = sum(len(u.requests) for u in fleet.upstreams)
    r = http("POST", envoy.url + "/v1/completions", b'{"model": "x", "prompt": ')
    assert r.status == 400
    assert r.body.startswith(b"inference error: BadRequest - invalid JSON body")
    assert sum(len(u.requests) for u in fleet.upstreams) == before


def test_missing_model_is_a_400(envoy: EnvoyProcess) -> None:
    r = post_json(envoy.url + "/v1/completions", {"prompt": "hi"})
    assert r.status == 400
    assert r.body == b"inference error: BadRequest - model not found in request body"


def test_get_without_body_is_routed(envoy: EnvoyProcess, fleet: UpstreamFleet) -> None:
    r = http("GET", envoy.url + "/v1/models")
    assert r.status == 200
    assert r.json()["served_by"] == "u1"


def test_streamed_response_passes_through(envoy: EnvoyProcess, fleet: UpstreamFleet) -> None:
    r = post_json(envoy.url + "/v1/completions", {**COMPLETION, "stream": True})
    assert r.status == 200
    assert r.body.count(b"data: ") == 4
    assert r.body.rstrip().endswith(b"data: [DONE]")


def test_two_mib_body(envoy: EnvoyProcess, fleet: UpstreamFleet) -> None:
    big = {**COMPLETION, "prompt": "y" * (2 * 1024 * 1024)}
    r = post_json(envoy.url + "/v1/completions", big)
    assert r.status == 200
    assert r.json()["body_bytes"] > 2 * 1024 * 1024


def test_body_over_the_epp_limit_is_a_413(fleet: UpstreamFleet, endpoints_file: str) -> None:
    epp = start_epp("--max-body-bytes", "100000", endpoints_file=endpoints_file)
    envoy = start_envoy(epp.grpc_port)
    try:
        r = post_json(envoy.url + "/v1/completions", {**COMPLETION, "prompt": "z" * 200_000})
        assert r.status == 413
        assert r.body.startswith(b"inference error: PayloadTooLarge - request body exceeds")
    finally:
        envoy.proc.stop()
        epp.proc.stop()


def test_request_id_is_generated_when_missing(envoy: EnvoyProcess, fleet: UpstreamFleet) -> None:
    r = post_json(envoy.url + "/v1/completions", COMPLETION)
    upstream = fleet.by_name(served_by(fleet, r))
    assert upstream.requests[-1]["headers"].get("x-request-id")


def test_chunked_request_with_an_empty_body(envoy: EnvoyProcess, fleet: UpstreamFleet) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=15)
    conn.putrequest("GET", "/v1/models")
    conn.putheader("transfer-encoding", "chunked")
    conn.endheaders()
    conn.send(b"0\r\n\r\n")
    resp = conn.getresponse()
    assert resp.status == 200
    assert json.loads(resp.read())["served_by"] == "u1"
