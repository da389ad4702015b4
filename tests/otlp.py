"""A real OTLP/gRPC trace receiver for tests, built on opentelemetry-proto's service
definitions (`opentelemetry.proto.collector.trace.v1.TraceService`).

Why not the OpenTelemetry Collector or Jaeger: both build from Go modules, but each pulls
hundreds of modules (the Collector's builder, Jaeger's storage backends) for minutes of
compile time on CI's two cores, on top of the kube-apiserver and Prometheus builds; the
EPP's exporter only needs the OTLP wire protocol, which this receiver speaks exactly (the
same generated protobuf and gRPC service a collector implements).
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    events: list[str]
    status_code: int
    start_ns: int
    end_ns: int
    resource: dict[str, Any]


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects every span exported to it; `delay` makes it a slow collector."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.spans: list[ReceivedSpan] = []
        self.exports = 0
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.port = 0

    def Export(self, request: Any, context: Any) -> Any:
        if self.delay:
            time.sleep(self.delay)
        got = []
        for rs in request.resource_spans:
            res = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(ReceivedSpan(
                        s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                        {a.key: _value(a.value) for a in s.attributes},
                        [e.name for e in s.events], s.status.code,
                        s.start_time_unix_nano, s.end_time_unix_nano, res))
        with self._lock:
            self.spans.extend(got)
            self.exports += 1
        return trace_service_pb2.ExportTraceServiceResponse()

    def start(self) -> "OtlpReceiver":
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def snapshot(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)
