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

# One request at a time per endpoint: a release happens only when the previous request
# finished, so the order requests reach the model server is the order they were released.
CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
saturationDetector:
  type: concurrency-detector
  parameters: {mode: requests, maxConcurrency: 1}
flowControl:
  defaultRequestTTL: 20s
"""


@pytest.fixture
def stack(tmp_path) -> Iterator[tuple[UpstreamFleet, EppProcess, EnvoyProcess]]:
    (tmp_path / "objectives.yaml").write_text(OBJECTIVES)
    with UpstreamFleet(1) as fleet:
        fleet.upstreams[0].metrics_page = vllm_page(waiting=0, running=0, kv=0.05)
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


def occupy(envoy: EnvoyProcess, seconds: float) -> threading.Thread:
    """A slow streamed request that holds the endpoint's only slot."""
    t = threading.Thread(target=post_json, args=(envoy.url + "/v1/completions", {
        "model": "m", "prompt": "blocker", "tag": "blocker", "stream": True, "test_delay": seconds / 2}))
    t.start()
    return t


def test_burst_is_released_highest_priority_first(stack) -> None:
    fleet, epp, envoy = stack
    upstream = fleet.upstreams[0]
    statuses: list[int] = []
    blocker = occupy(envoy, 2.0)
    wait_until(lambda: len(upstream.requests) == 1, 10, "blocker running")

    def send(objective: str, tag: str) -> None:
        r = post_json(envoy.url + "/v1/completions", {"model": "m", "prompt": tag, "tag": tag},
                      headers={"x-gateway-inference-objective": objective} if objective else {})
        statuses.append(r.status)

    plan = [("batch", "low")] * 3 + [("", "mid")] * 3 + [("food-review", "high")] * 3
    threads = [threading.Thread(target=send, args=p) for p in plan]
    for t in threads:
        t.start()
    wait_until(lambda: queued(epp) == len(plan), 10, "all requests queued")
    assert len(upstream.requests) == 1  # only the blocker got through
    blocker.join(20)  # its slot frees: the queue drains one request at a time
    for t in threads:
        t.join(20)
    assert statuses == [200] * len(plan)
    order = [json.loads(r["body"])["tag"] for r in upstream.requests]
    assert order == ["blocker"] + ["high"] * 3 + ["mid"] * 3 + ["low"] * 3


def test_a_client_that_goes_away_leaves_the_queue(stack) -> None:
    fleet, epp, envoy = stack
    blocker = occupy(envoy, 1.0)
    wait_until(lambda: len(fleet.upstreams[0].requests) == 1, 10, "blocker running")
    body = json.dumps({"model": "m", "prompt": "p"}).encode()
    s = socket.create_connection(("127.0.0.1", envoy.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n%s" % (len(body), body))
    wait_until(lambda: queued(epp) == 1, 10, "request queued")
    s.close()  # the client hangs up: Envoy cancels the ext_proc stream
    wait_until(lambda: queued(epp) == 0, 10, "queue emptied")
    blocker.join(20)
    r = post_json(envoy.url + "/v1/completions", {"model": "m", "prompt": "after"})
    assert r.status == 200
    # The abandoned request never reached the model server.
    assert [json.loads(x["body"])["prompt"] for x in fleet.upstreams[0].requests] == ["blocker", "after"]
