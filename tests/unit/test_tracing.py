"""Tracing and the request observer without a network: the SDK's in-memory exporter
stands in for OTLP here (tests/e2e/test_tracing.py exports to a real OTLP receiver)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from typing import Any, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from epp import observability as obs
from epp.config import load_config
from epp.director import Director
from epp.flowcontrol.admission import AdmissionLease
from epp.request import InferenceRequest, Usage, parse_body
from epp.scheduling import Scheduler
from epp.telemetry import DecisionRing, RequestObserver
from epp.telemetry.tracing import DroppingBatchProcessor, Tracer
from tests.unit.test_director import two_pods

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def request(rid: str, headers: dict[str, str] | None = None) -> InferenceRequest:
    raw = json.dumps({"model": "m", "prompt": "hello " * 20}).encode()
    return InferenceRequest(rid, "/v1/completions", headers=headers or {}, body=raw,
                            parsed=parse_body("/v1/completions", raw))


def traced_director(monkeypatch: Any, sampler: str = "parentbased_always_on"
                    ) -> tuple[Director, Tracer, InMemorySpanExporter]:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    exporter = InMemorySpanExporter()
    tracer = Tracer.from_env(exporter)
    observer = RequestObserver(tracer=tracer, ring=DecisionRing(interval=3600))
    scheduler = Scheduler.from_config(load_config(None))
    return Director(two_pods(), scheduler, observer=observer), tracer, exporter


class SlowAdmission:
    """Holds each request in a "queue" for 5 ms, then admits it."""

    async def admit(self, ticket: Any, candidates: Any) -> AdmissionLease:
        await asyncio.sleep(0.005)
        return AdmissionLease(None)


async def test_a_routed_and_finished_request_is_one_trace(monkeypatch: Any) -> None:
    director, tracer, exporter = traced_director(monkeypatch)
    req = request("r1", {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"})
    d = await director.route(req)
    director.finished(d, Usage(prompt_tokens=12, completion_tokens=5), status=200)
    tracer.processor.force_flush()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"epp.route", "epp.schedule"}
    root = spans["epp.route"]
    assert [e.name for e in root.events] == ["parse", "objective resolved", "response"]
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert root.attributes["gen_ai.usage.input_tokens"] == 12
    assert root.attributes["inference.endpoint"] == d.endpoint.name
    tracer.shutdown()


async def test_a_queue_wait_gets_a_span_of_its_own(monkeypatch: Any) -> None:
    director, tracer, exporter = traced_director(monkeypatch)
    director.admission = SlowAdmission()
    req = request("r2")
    director.finished(await director.route(req), None)
    tracer.processor.force_flush()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"epp.route", "epp.admission", "epp.schedule"}
    wait = spans["epp.admission"]
    assert wait.end_time - wait.start_time >= 5_000_000
    assert wait.attributes["inference.queue_wait_ms"] >= 5


async def test_the_default_sampler_keeps_about_one_new_trace_in_ten(monkeypatch: Any) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    tracer = Tracer.from_env(InMemorySpanExporter())
    sampled = sum(tracer.start({}, time.time_ns()) is not None for _ in range(2000))
    assert 120 < sampled < 280  # binomial(2000, 0.1): mean 200, sd 13
    # A sampled parent is always followed, an unsampled one never.
    parent = f"00-{TRACE_ID}-00f067aa0ba902b7-"
    assert all(tracer.start({"traceparent": parent + "01"}, 0) is not None for _ in range(50))
    assert all(tracer.start({"traceparent": parent + "00"}, 0) is None for _ in range(50))
    tracer.shutdown()


W3C = re.compile(r"^\s*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\s*$")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300)
       | st.from_regex(r"\A[0-9a-f]{2}-[0-9a-fA-F]{30,34}-[0-9a-f]{14,18}-[0-9a-f]{1,3}(-[a-z]*)?\Z"))
def test_a_valid_traceparent_is_continued_and_anything_else_starts_a_new_trace(value: str) -> None:
    m = W3C.match(value)
    valid = bool(m) and m[1] != "ff" and not (m[1] == "00" and m[5]) \
        and m[2] != "0" * 32 and m[3] != "0" * 16
    span = _ALWAYS_ON.start({"traceparent": value}, time.time_ns())
    if valid and not int(m[4], 16) & 1:
        assert span is None  # the caller decided not to sample this trace
        return
    assert span is not None and span.get_span_context().is_valid
    if valid:
        assert span.get_span_context().trace_id == int(m[2], 16)
        assert span.parent.span_id == int(m[3], 16)
    else:
        assert span.parent is None  # malformed: ignored, a new trace
    span.end()


class _AlwaysOn:
    def __init__(self) -> None:
        import os

        os.environ["OTEL_TRACES_SAMPLER"] = "parentbased_always_on"
        try:
            self.tracer = Tracer.from_env(InMemorySpanExporter())
        finally:
            del os.environ["OTEL_TRACES_SAMPLER"]

    def start(self, headers: dict[str, str], start_ns: int) -> Any:
        return self.tracer.start(headers, start_ns)


_ALWAYS_ON = _AlwaysOn()


class BlockedExporter(SpanExporter):
    """A collector that does not answer until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exported = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        self.release.wait(10)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


async def test_a_stuck_collector_makes_the_queue_drop_and_count_never_block() -> None:
    exporter = BlockedExporter()
    processor = DroppingBatchProcessor(exporter, max_queue=10, max_batch=5, delay=0.01)
    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(processor)
    tracer = Tracer(provider, processor)
    before = obs.TRACING_SPANS_DROPPED._value.get()  # type: ignore[attr-defined]
    for _ in range(100):
        tracer.start({}, time.time_ns()).end()
    # One batch of 5 is stuck in export, 10 wait in the queue, the rest were dropped.
    assert 80 <= processor.dropped <= 90
    assert obs.TRACING_SPANS_DROPPED._value.get() - before == processor.dropped  # type: ignore[attr-defined]
    exporter.release.set()
    assert processor.force_flush(5000)
    assert exporter.exported == 100 - processor.dropped
    processor.shutdown()


async def test_without_tracing_most_requests_carry_no_watch() -> None:
    observer = RequestObserver(ring=DecisionRing(interval=3600))
    director = Director(two_pods(), Scheduler.from_config(load_config(None)), observer=observer)
    decisions = [await director.route(request(f"r{i}")) for i in range(20)]
    watched = [d for d in decisions if d.watch is not None]
    assert len(watched) == 1  # the first, sampled for the status page; then one per hour
    assert watched[0].explanation is not None and decisions[1].explanation is None
    assert sum(observer.picks_per_second().values()) == 20 / 10.0
