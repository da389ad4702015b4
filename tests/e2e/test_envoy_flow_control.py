"""Flow control through a real Envoy: queued while saturated, released highest priority first."""

from __future__ import annotations

import json
import re
import socket
import threading
import urllib.request
from typing import Iterator

import pytest

from tests.e2e.test_envoy_priorities import OBJECTIVES
from tests.support import (
    EnvoyProcess,
    EppProcess,
    UpstreamFleet,
    post_json,
    start_envoy,
    start_epp,
    vllm_page,
    wait_until,
)

pytestmark = pytest.mark.e2e

CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
flowControl:
  defaultRequestTTL: 20s
"""

SATURATED = vllm_page(waiting=50, running=64, kv=0.99)
IDLE = vllm_page(waiting=0, running=0, kv=0.05)


@pytest.fixture
def stack(tmp_path) -> Iterator[tuple[UpstreamFleet, EppProcess, EnvoyProcess]]:
    (tmp_path / "objectives.yaml").write_text(OBJECTIVES)
    with UpstreamFleet(1) as fleet:
        fleet.upstreams[0].metrics_page = SATURATED
        epp = start_epp("--pool-name", "pool", "--objectives-file", str(tmp_path / "objectives.yaml"),
                        "--config-text", CONFIG, endpoints=fleet.upstreams[0].hostport)
        envoy = start_envoy(epp.grpc_port)
        try:
            yield fleet, epp, envoy
        finally:
            envoy.proc.stop()
            epp.proc.stop()


def queued(epp: EppProcess) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{epp.metrics_port}/metrics", timeout=2).read().decode()
    return sum(float(v) for v in re.findall(r"^inference_extension_flow_control_queue_size\{[^}]*\} (\S+)$", text, re.M))


def test_burst_is_released_highest_priority_first(stack) -> None:
    fleet, epp, envoy = stack
    upstream = fleet.upstreams[0]
    statuses: list[int] = []

    def send(objective: str, tag: str) -> None:
        r = post_json(envoy.url + "/v1/completions", {"model": "m", "prompt": tag, "tag": tag},
                      headers={"x-gateway-inference-objective": objective} if objective else {})
        statuses.append(r.status)

    plan = [("batch", "low")] * 3 + [("", "mid")] * 3 + [("food-review", "high")] * 3
    threads = [threading.Thread(target=send, args=p) for p in plan]
    for t in threads:
        t.start()
    wait_until(lambda: queued(epp) == len(plan), 10, "all requests queued")
    assert upstream.requests == []
    upstream.metrics_page = IDLE  # load drains
    for t in threads:
        t.join(20)
    assert statuses == [200] * len(plan)
    order = [json.loads(r["body"])["tag"] for r in upstream.requests]
    assert order == ["high"] * 3 + ["mid"] * 3 + ["low"] * 3


def test_a_client_that_goes_away_leaves_the_queue(stack) -> None:
    fleet, epp, envoy = stack
    body = json.dumps({"model": "m", "prompt": "p"}).encode()
    s = socket.create_connection(("127.0.0.1", envoy.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n%s" % (len(body), body))
    wait_until(lambda: queued(epp) == 1, 10, "request queued")
    s.close()  # the client hangs up: Envoy cancels the ext_proc stream
    wait_until(lambda: queued(epp) == 0, 10, "queue emptied")
    fleet.upstreams[0].metrics_page = IDLE
    r = post_json(envoy.url + "/v1/completions", {"model": "m", "prompt": "after"})
    assert r.status == 200
    assert [json.loads(x["body"])["prompt"] for x in fleet.upstreams[0].requests] == ["after"]
