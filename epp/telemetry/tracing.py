"""OpenTelemetry traces of routed requests (`--tracing`), exported over OTLP/gRPC.

Configured like the upstream EPP, by the standard environment: OTEL_EXPORTER_OTLP_ENDPOINT
(or ..._TRACES_ENDPOINT), OTEL_EXPORTER_OTLP_INSECURE, OTEL_EXPORTER_OTLP_HEADERS,
OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), and the batch
processor's OTEL_BSP_MAX_QUEUE_SIZE / OTEL_BSP_MAX_EXPORT_BATCH_SIZE / OTEL_BSP_SCHEDULE_DELAY.
Without OTEL_TRACES_SAMPLER the sampler is the upstream default: parent-based, 10% of new
traces. A request continues the caller's trace from its `traceparent` header; a malformed
one is ignored (a new trace starts), as the W3C propagator does.

One span per routed request (`epp.route`), from the director's first step to the end of
the response, with a child span for scheduling (`epp.schedule`: picked endpoint, the
winner's per-scorer scores), one for admission when the request waited in a queue
(`epp.admission`, 1 ms or more), and events for parse, objective resolution and the
response (tokens, status). Steps that take no time are events rather than spans because a
span costs several times more to make. Everything is created after the fact from
timestamps the director took, so an unsampled request costs only the sampling decision.

Export never touches the request path: finished spans go into a bounded queue that a
thread drains; when the collector is down or slow and the queue is full, spans are
dropped and counted (`inference_extension_tracing_spans_dropped_total`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any, Mapping

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from epp import observability as obs

log = logging.getLogger(__name__)

DEFAULT_RATIO = 0.1
_QUEUED_NS = 1_000_000  # an admission that took 1 ms or more gets a span of its own
ROOT_SPAN = "epp.route"
_OPERATIONS = {"completions": "text_completion", "chat/completions": "chat",
               "embeddings": "embeddings", "responses": "chat"}


def _env_int(name: str, default: int) -> int:
    try:
        v = int(os.environ.get(name, ""))
    except ValueError:
        return default
    return v if v > 0 else default


class DroppingBatchProcessor(SpanProcessor):
    """Batches finished spans to `exporter` from a thread; a full queue drops, counted.

    The SDK's BatchSpanProcessor also bounds its queue but does not say how many spans it
    dropped; the count is what tells an operator that the collector is not keeping up.
    """

    def __init__(self, exporter: SpanExporter, *, max_queue: int = 2048,
                 max_batch: int = 512, delay: float = 1.0) -> None:
        self.exporter = exporter
        self.max_queue = max_queue
        self.max_batch = max(1, min(max_batch, max_queue))
        self.delay = delay
        self.dropped = 0
        self._queue: deque[ReadableSpan] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="otel-export", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, exporter: SpanExporter) -> "DroppingBatchProcessor":
        return cls(exporter,
                   max_queue=_env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048),
                   max_batch=_env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
                   delay=_env_int("OTEL_BSP_SCHEDULE_DELAY", 1000) / 1000)

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled:
            return
        wake = False
        with self._lock:
            full = len(self._queue) >= self.max_queue
            if full:
                self.dropped += 1
            else:
                self._queue.append(span)
                wake = len(self._queue) >= self.max_batch
        if full:
            obs.TRACING_SPANS_DROPPED.inc()
        elif wake:
            self._wake.set()

    def _take(self) -> list[ReadableSpan]:
        with self._lock:
            n = min(len(self._queue), self.max_batch)
            return [self._queue.popleft() for _ in range(n)]

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.delay)
            self._wake.clear()
            self._export_all()

    def _export_all(self) -> None:
        while batch := self._take():
            try:
                self.exporter.export(batch)
            except Exception as e:  # noqa: BLE001 - an exporter must not kill the thread
                log.warning("trace export failed: %s", e)
            if self._stopping:
                return

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        self._wake.set()
        deadline = time.monotonic() + timeout_millis / 1000
        while time.monotonic() < deadline:
            with self._lock:
                if not self._queue:
                    return True
            time.sleep(0.01)
        return False

    def shutdown(self) -> None:
        """Export what is queued (bounded by `timeout`), then stop the thread."""
        self.force_flush(2000)
        self._stopping = True
        self._wake.set()
        self._thread.join(2.0)
        self.exporter.shutdown()


def default_sampler() -> Any:
    """The upstream EPP's default unless OTEL_TRACES_SAMPLER says otherwise (then None:
    the SDK reads the variable)."""
    if os.environ.get("OTEL_TRACES_SAMPLER"):
        return None
    return ParentBased(TraceIdRatioBased(DEFAULT_RATIO))


class Tracer:
    """The spans of routed requests; see the module docstring."""

    def __init__(self, provider: TracerProvider, processor: DroppingBatchProcessor) -> None:
        self.provider = provider
        self.processor = processor
        self._tracer = provider.get_tracer("epp")
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_env(cls, exporter: SpanExporter | None = None) -> "Tracer":
        if exporter is None:
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter,
                )
            except ImportError as e:
                # xds-protos installs an old opentelemetry/proto copy over the real one.
                raise ValueError(
                    f"--tracing: the OTLP exporter cannot load ({e}); run "
                    "`pip install --no-deps --force-reinstall opentelemetry-proto==<version>` "
                    "(see the Makefile's OTEL_PROTO_FIX)") from None
            exporter = OTLPSpanExporter()
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "epp")})
        sampler = default_sampler()
        provider = (TracerProvider(resource=resource, sampler=sampler) if sampler is not None
                    else TracerProvider(resource=resource))
        processor = DroppingBatchProcessor.from_env(exporter)
        provider.add_span_processor(processor)
        return cls(provider, processor)

    def shutdown(self) -> None:
        self.provider.shutdown()

    # -- called by RequestObserver ---------------------------------------------------

    def start(self, headers: Mapping[str, str], start_ns: int) -> Any:
        """The request's root span when sampled, else None."""
        ctx = self._propagator.extract(headers) if "traceparent" in headers else None
        span = self._tracer.start_span(ROOT_SPAN, context=ctx, kind=SpanKind.SERVER,
                                       start_time=start_ns)
        return span if span.is_recording() else None

    def routed(self, watch: Any, req: Any, rec: Any) -> None:
        root = watch.span
        ctx = trace.set_span_in_context(root)
        parsed = getattr(req, "parsed", None)
        if parsed is not None:
            root.add_event("parse", {"inference.api": parsed.api.value,
                                     "inference.request.body_bytes": len(req.body),
                                     "gen_ai.request.stream": bool(parsed.stream)},
                           timestamp=watch.start_ns)
            root.set_attribute("gen_ai.operation.name", _OPERATIONS.get(parsed.api.value, "other"))
        root.set_attributes(_root_attributes(rec))
        laps = dict(watch.laps)
        t_res = laps.get("resolve", watch.start_ns)
        t_adm = laps.get("admit", t_res)
        t_sch = laps.get("schedule", t_adm)
        root.add_event("objective resolved", {
            "inference.objective": rec.objective, "inference.priority": rec.priority,
            "inference.target_model": rec.target_model}, timestamp=t_res)
        # Spans only for steps that take time: a queue wait is one when it happened.
        if "admit" in laps and t_adm - t_res >= _QUEUED_NS:
            self._child("epp.admission", ctx, t_res, t_adm, {
                "inference.queue_wait_ms": round(rec.queue_ms, 3)})
        elif "admit" in laps:
            root.add_event("admitted", timestamp=t_adm)
        attrs: dict[str, Any] = {"inference.endpoint": rec.endpoint,
                                 "inference.profile": rec.profile,
                                 "inference.candidates": len(rec.candidates)}
        w = rec.winner
        if w is not None:
            attrs["inference.score.total"] = w.total
            for name, v in w.scores:
                attrs[f"inference.score.{name}"] = v
        self._child("epp.schedule", ctx, t_adm, t_sch, attrs)

    def failed(self, watch: Any, code: str, message: str) -> None:
        root = watch.span
        root.set_attribute("error.type", code)
        root.set_status(Status(StatusCode.ERROR, message[:200]))
        root.end()

    def finished(self, watch: Any, usage: Any, status: int | None, error: str | None) -> None:
        """The response ended: its tokens and outcome go on the root span, which ends."""
        root = watch.span
        attrs: dict[str, Any] = {}
        if usage is not None:
            attrs["gen_ai.usage.input_tokens"] = int(usage.prompt_tokens)
            attrs["gen_ai.usage.output_tokens"] = int(usage.completion_tokens)
        if status is not None:
            attrs["http.response.status_code"] = int(status)
        if error is not None:
            attrs["error.type"] = error
            root.set_status(Status(StatusCode.ERROR))
        now = time.time_ns()
        root.add_event("response", attrs, timestamp=now)
        root.set_attributes(attrs)
        root.end(end_time=now)

    def _child(self, name: str, ctx: Any, start: int, end: int, attrs: dict[str, Any]) -> None:
        self._tracer.start_span(name, context=ctx, start_time=start,
                                attributes=attrs).end(end_time=end)


def _root_attributes(rec: Any) -> dict[str, Any]:
    return {"inference.request_id": rec.request_id,
            "gen_ai.request.model": rec.model,
            "gen_ai.response.model": rec.target_model,
            "inference.objective": rec.objective,
            "inference.priority": rec.priority,
            "inference.endpoint": rec.endpoint}
