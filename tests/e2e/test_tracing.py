"""`--tracing`: the EPP process exports spans over OTLP/gRPC to a real OTLP receiver
(tests/otlp.py: opentelemetry-proto's TraceService over grpcio; its docstring says why
not the Collector or Jaeger), continuing the caller's trace through a real Envoy."""

from __future__ import annotations

import os
import time
import urllib.request
from typing import Iterator

import pytest

from tests.otlp import OtlpReceiver, ReceivedSpan
from tests.support import EnvoyProcess, EppProcess, post_json, start_envoy, start_epp, wait_until

pytestmark = pytest.mark.e2e

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def start_traced_epp(endpoints_file: str, collector: str, **env: str) -> EppProcess:
    saved = dict(os.environ)
    os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": collector,
                       "OTEL_EXPORTER_OTLP_INSECURE": "true",
                       "OTEL_BSP_SCHEDULE_DELAY": "100", **env})
    try:
        return start_epp("--tracing", endpoints_file=endpoints_file)
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def traced(endpoints_file: str, receiver: OtlpReceiver) -> Iterator[tuple[EppProcess, EnvoyProcess]]:
    # Every new trace sampled, so that the tests below are deterministic; the default
    # (parent-based, 10%) is covered by tests/unit/test_tracing.py.
    epp = start_traced_epp(endpoints_file, receiver.endpoint,
                           OTEL_TRACES_SAMPLER="parentbased_always_on", OTEL_SERVICE_NAME="epp-test")
    envoy = start_envoy(epp.grpc_port)
    yield epp, envoy
    envoy.proc.stop()
    epp.proc.stop()


def spans_of(receiver: OtlpReceiver, trace_id: str) -> dict[str, ReceivedSpan]:
    return {s.name: s for s in receiver.snapshot() if s.trace_id == trace_id}


def test_a_request_continues_the_callers_trace_with_one_span_per_step(
        traced: tuple[EppProcess, EnvoyProcess], receiver: OtlpReceiver) -> None:
    _, envoy = traced
    r = post_json(envoy.url + "/v1/chat/completions",
                  {"model": "m1", "messages": [{"role": "user", "content": "hi " * 40}]},
                  headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
                           "x-request-id": "traced-1"})
    assert r.status == 200
    wait_until(lambda: "epp.route" in spans_of(receiver, TRACE_ID), 15, "the exported spans")
    spans = spans_of(receiver, TRACE_ID)
    # No queue here; admission gets a span of its own only if it took 1 ms or more (which a
    # loaded machine can cause), else an event.
    assert {"epp.route", "epp.schedule"} <= set(spans) <= {"epp.route", "epp.schedule",
                                                           "epp.admission"}
    root = spans["epp.route"]
    assert root.parent_span_id == PARENT_ID  # Envoy's span, from the traceparent header
    assert root.resource["service.name"] == "epp-test"
    admitted = [] if "epp.admission" in spans else ["admitted"]
    assert root.events == ["parse", "objective resolved", *admitted, "response"]
    sched_span = spans["epp.schedule"]
    assert sched_span.parent_span_id == root.span_id
    assert root.start_ns <= sched_span.start_ns <= sched_span.end_ns <= root.end_ns
    a = root.attributes
    assert a["gen_ai.request.model"] == "m1" and a["gen_ai.operation.name"] == "chat"
    assert a["inference.request_id"] == "traced-1"
    assert a["inference.endpoint"] in ("u0", "u1", "u2")
    assert a["gen_ai.usage.input_tokens"] == 7 and a["gen_ai.usage.output_tokens"] == 3
    sched = sched_span.attributes
    assert sched["inference.endpoint"] == a["inference.endpoint"]
    assert sched["inference.score.total"] > 0 and "inference.score.queue-scorer" in sched


def test_an_unsampled_parent_is_respected_and_a_malformed_one_ignored(
        traced: tuple[EppProcess, EnvoyProcess], receiver: OtlpReceiver) -> None:
    _, envoy = traced
    unsampled = "5bf92f3577b34da6a3ce929d0e0e4736"
    r = post_json(envoy.url + "/v1/completions", {"model": "m1", "prompt": "x"},
                  headers={"traceparent": f"00-{unsampled}-{PARENT_ID}-00"})
    assert r.status == 200
    for bad in ("00-zz-yy-01", "garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "x" * 5000):
        r = post_json(envoy.url + "/v1/completions", {"model": "m1", "prompt": "x"},
                      headers={"traceparent": bad, "x-request-id": f"bad-{len(bad)}"})
        assert r.status == 200
    # The malformed ones started new traces of their own (sampled: always-on here).
    wait_until(lambda: sum(s.name == "epp.route" and s.attributes.get(
        "inference.request_id", "").startswith("bad-") for s in receiver.snapshot()) == 4,
        15, "spans of the requests with malformed traceparent")
    for s in receiver.snapshot():
        if s.attributes.get("inference.request_id", "").startswith("bad-"):
            assert s.parent_span_id == "" and s.trace_id != "0" * 32
    time.sleep(0.5)  # a further export cycle: the unsampled trace never shows up
    assert not spans_of(receiver, unsampled)


def test_a_slow_collector_neither_slows_requests_nor_grows_memory(endpoints_file: str) -> None:
    slow = OtlpReceiver(delay=3.0).start()
    epp = start_traced_epp(endpoints_file, slow.endpoint, OTEL_TRACES_SAMPLER="always_on",
                           OTEL_BSP_MAX_QUEUE_SIZE="8", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="4",
                           OTEL_EXPORTER_OTLP_TIMEOUT="10")
    envoy = start_envoy(epp.grpc_port)
    try:
        worst = 0.0
        for i in range(40):
            t0 = time.monotonic()
            r = post_json(envoy.url + "/v1/completions", {"model": "m1", "prompt": f"p{i}"})
            worst = max(worst, time.monotonic() - t0)
            assert r.status == 200
        # Generous bound: the collector takes 3 s per export; a request waiting on it would show.
        assert worst < 2.0
        with urllib.request.urlopen(f"http://127.0.0.1:{epp.metrics_port}/metrics", timeout=5) as m:
            text = m.read().decode()
        dropped = next(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith("inference_extension_tracing_spans_dropped_total "))
        assert dropped > 0  # 40 requests x 2 spans cannot fit a queue of 8
    finally:
        envoy.proc.stop()
        epp.proc.stop()
        slow.stop()


def test_a_collector_that_is_down_changes_nothing_for_requests(endpoints_file: str) -> None:
    from tests.support import free_port

    epp = start_traced_epp(endpoints_file, f"http://127.0.0.1:{free_port()}",
                           OTEL_TRACES_SAMPLER="always_on")
    envoy = start_envoy(epp.grpc_port)
    try:
        for i in range(20):
            assert post_json(envoy.url + "/v1/completions", {"model": "m1", "prompt": f"p{i}"}).status == 200
    finally:
        envoy.proc.stop()
        assert epp.proc.stop() == 0  # and it still shuts down cleanly, promptly
