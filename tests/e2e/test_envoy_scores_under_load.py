"""Issue 13 through the real stack: client -> Envoy -> EPP (ext_proc) -> model servers.

Three model servers report equal queues (2 waiting each) and different KV-cache usage
(0.15, 0.85, 0.45). Requests are sent one after another, each still streaming when the
next is sent, all within one scrape interval: the EPP counts each one in flight on its
pod. With the default profile they all go to the pod at 0.15; with upstream's formulas
(`epp.scheduling.upstream`) the second already leaves it, as the issue reported.
"""

from __future__ import annotations

import threading
import time
from typing import Iterator

import pytest

from epp.scheduling.upstream import upstream_default_config_text
from tests.support import (
    UpstreamFleet,
    http,
    post_json,
    start_envoy,
    start_epp,
    vllm_page,
    wait_until,
)

pytestmark = pytest.mark.e2e

KV = {"u0": 0.15, "u1": 0.85, "u2": 0.45}
SEQUENTIAL = 4


@pytest.fixture(scope="module")
def pods() -> Iterator[UpstreamFleet]:
    with UpstreamFleet(3) as f:
        for u in f.upstreams:
            u.metrics_page = vllm_page(waiting=2, running=10, kv=KV[u.name])
        yield f


def _quietly_post(url: str, body: dict) -> None:
    try:
        post_json(url, body)
    except OSError:  # the stack is stopped under the still-streaming requests
        pass
    except Exception as e:  # http.client.IncompleteRead is not an OSError
        if type(e).__name__ != "IncompleteRead":
            raise


def all_scraped(metrics_port: int, pods: UpstreamFleet) -> bool:
    """The EPP's per-pod queue gauge shows every pod's scraped queue."""
    r = http("GET", f"http://127.0.0.1:{metrics_port}/metrics")
    lines = [x for x in r.body.decode().splitlines()
             if x.startswith("inference_pool_per_pod_queue_size{") and x.endswith(" 2.0")]
    return all(any(f'"{u.hostport}"' in x for x in lines) for u in pods.upstreams)


def sequential_picks(pods: UpstreamFleet, config: str | None) -> list[str]:
    """`SEQUENTIAL` streaming requests, each sent once the previous one reached its pod
    and while it still streams; returns the pods in order."""
    eps = ",".join(u.hostport for u in pods.upstreams)
    # Scrapes every 8 s; the requests are sent right after u0's scrape and take well
    # under that, so all are routed "since u0's scrape" and count in flight there.
    args = ["--refresh-metrics-interval", "8s", "--metrics-staleness-threshold", "300s"]
    if config is not None:
        args += ["--config-text", config]
    epp = start_epp(*args, endpoints=eps)
    envoy = start_envoy(epp.grpc_port)
    threads: list[threading.Thread] = []
    try:
        # The EPP is ready before its first scrapes land (spread over one interval).
        wait_until(lambda: all_scraped(epp.metrics_port, pods), 30, "first scrapes")
        # One finished request first, so that connection set-up does not slow the sequence.
        assert post_json(envoy.url + "/v1/completions", {"model": "m", "prompt": "warm"}).status == 200
        for u in pods.upstreams:
            u.requests.clear()  # the fleet is shared by the module's tests
        u0 = pods.by_name("u0")
        seen = u0.scrapes
        wait_until(lambda: u0.scrapes > seen, 15, "u0's next scrape")
        time.sleep(0.05)  # let the EPP store it
        order: list[str] = []
        for i in range(SEQUENTIAL):
            before = sum(len(u.requests) for u in pods.upstreams)
            body = {"model": "m", "prompt": f"question {i}", "stream": True,
                    "test_delay": 3.0}  # streams for ~6 s: still open when the others go
            t = threading.Thread(target=_quietly_post, args=(envoy.url + "/v1/completions", body),
                                 daemon=True)
            t.start()
            threads.append(t)
            wait_until(lambda: sum(len(u.requests) for u in pods.upstreams) > before, 10,
                       f"request {i} reaching a pod")
            order.append(next(u.name for u in pods.upstreams
                              if any(f"question {i}".encode() in r["body"] for r in u.requests)))
        assert u0.scrapes == seen + 1, "u0 was scraped during the sequence: machine too slow"
        return order
    finally:
        envoy.proc.stop()
        epp.proc.stop()
        for t in threads:
            t.join(0.1)


def test_sequential_requests_stay_on_the_pod_with_kv_headroom(pods: UpstreamFleet) -> None:
    t0 = time.monotonic()
    picks = sequential_picks(pods, None)
    assert picks == ["u0"] * SEQUENTIAL
    assert time.monotonic() - t0 < 60  # all within the one scrape interval


def test_upstream_formulas_leave_it_after_one_request(pods: UpstreamFleet) -> None:
    # (A scrape between two requests resets the in-flight count and can delay the move,
    # hence "some later pick" rather than "the second".)
    picks = sequential_picks(pods, upstream_default_config_text())
    assert picks[0] == "u0" and set(picks) != {"u0"}, picks
