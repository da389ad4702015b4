"""`--log-format json -v 4`: every line is one JSON object; each routing decision is one
line with the span's field names; every line logged for a request carries its id."""

from __future__ import annotations

import json
from typing import Iterator

import pytest

from tests.support import EnvoyProcess, EppProcess, post_json, start_envoy, start_epp, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def json_epp(endpoints_file: str) -> Iterator[EppProcess]:
    p = start_epp("--log-format", "json", "-v", "4", endpoints_file=endpoints_file)
    yield p
    p.proc.stop()


@pytest.fixture(scope="module")
def envoy(json_epp: EppProcess) -> Iterator[EnvoyProcess]:
    e = start_envoy(json_epp.grpc_port)
    yield e
    e.proc.stop()


def lines(epp: EppProcess) -> list[dict]:
    return [json.loads(line) for line in epp.proc.output().splitlines() if line.strip()]


def test_each_routing_decision_is_one_json_line_with_the_request_id(
        json_epp: EppProcess, envoy: EnvoyProcess) -> None:
    r = post_json(envoy.url + "/v1/completions", {"model": "m1", "prompt": "hello " * 30},
                  headers={"x-request-id": "req-json-1"})
    assert r.status == 200
    wait_until(lambda: any(ln.get("request_id") == "req-json-1" for ln in lines(json_epp)), 10,
               "the decision line")
    mine = [ln for ln in lines(json_epp) if ln.get("request_id") == "req-json-1"]
    decision = [ln for ln in mine if ln["msg"] == "routing decision"]
    assert len(decision) == 1
    d = decision[0]
    assert d["level"] == "debug" and d["gen_ai.request.model"] == "m1"
    assert d["inference.endpoint"] in ("u0", "u1", "u2")
    assert d["inference.score.total"] >= 0 and "inference.score.queue-scorer" in d
    assert d["inference.schedule_us"] > 0


def test_every_line_of_a_rejected_request_carries_its_id(
        json_epp: EppProcess, envoy: EnvoyProcess) -> None:
    r = post_json(envoy.url + "/v1/completions", {"prompt": "no model"},
                  headers={"x-request-id": 'bad"<id>{}'})
    assert r.status == 400
    wait_until(lambda: any("rejected" in ln["msg"] for ln in lines(json_epp)), 10, "the rejection")
    for ln in lines(json_epp):  # every line parses (the loop above would have raised)
        if "rejected" in ln["msg"]:
            assert ln["request_id"] == 'bad"<id>{}'
