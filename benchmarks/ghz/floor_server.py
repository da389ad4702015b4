"""The floor for the direct benchmark: a grpc.aio ext_proc server that does no work.

It answers a headers+body exchange with the same messages the EPP sends (a headers reply
with the destination header and `envoy.lb` metadata, then the body echoed as one streamed
body reply) but built once at start, with no parsing, routing or metrics. Run under the
same ghz load in the same benchmark, it shows how much of the EPP's cost per exchange is
grpcio's per-stream overhead and how much is the EPP's own logic.

    python benchmarks/ghz/floor_server.py --port 50099 [--style generator|readwrite]
        [--destination 127.0.0.1:8000]

`--destination` is the endpoint its headers reply names, so that it can also stand behind a
real Envoy (`bench_extproc.py`'s end-to-end floor) and route to a real upstream.

`--style readwrite` uses `context.read()` / `context.write()` instead of an async
generator, to measure that difference too; `--style epp-servicer` serves the EPP's own
servicer and director alone (no health server, scraper or metrics server).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2 as core
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import struct_pb2

_DEST = "x-gateway-destination-endpoint"


def _headers_reply(hostport: str) -> ep.ProcessingResponse:
    m = ep.HeaderMutation()
    m.set_headers.append(core.HeaderValueOption(
        header=core.HeaderValue(key=_DEST, raw_value=hostport.encode()),
        append_action=core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD))
    md = struct_pb2.Struct()
    md.fields["envoy.lb"].struct_value.fields[_DEST].string_value = hostport
    return ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(response=ep.CommonResponse(
            header_mutation=m, clear_route_cache=True)),
        dynamic_metadata=md)


class Floor(ep_grpc.ExternalProcessorServicer):
    def __init__(self, destination: str = "127.0.0.1:8000") -> None:
        self.reply = _headers_reply(destination)

    def _body(self, body: bytes) -> ep.ProcessingResponse:
        return ep.ProcessingResponse(request_body=ep.BodyResponse(response=ep.CommonResponse(
            body_mutation=ep.BodyMutation(streamed_response=ep.StreamedBodyResponse(
                body=body, end_of_stream=True)))))

    async def Process(self, request_iterator: AsyncIterator[ep.ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[ep.ProcessingResponse]:
        chunks: list[bytes] = []
        async for msg in request_iterator:
            if msg.HasField("request_body"):
                chunks.append(msg.request_body.body)
                if msg.request_body.end_of_stream:
                    yield self.reply
                    yield self._body(b"".join(chunks))


class FloorReadWrite(Floor):
    async def Process(self, request_iterator: object,  # type: ignore[override]
                      context: grpc.aio.ServicerContext) -> None:
        while True:
            msg = await context.read()
            if msg is grpc.aio.EOF:
                return
            if msg.HasField("request_body") and msg.request_body.end_of_stream:
                await context.write(self.reply)
                await context.write(self._body(msg.request_body.body))


def _epp_servicer(destination: str = "") -> ep_grpc.ExternalProcessorServicer:
    """The EPP's own servicer and director (built by `EppApp` from the default config) over
    3 fixed endpoints, without the rest of the EPP process (health server, scraper, metrics
    server): splits the EPP's cost into what its servicer adds to this floor and what the
    surrounding process adds."""
    from epp.app import EppApp
    from epp.server.extproc import ExtProcServicer
    from epp.settings import parse_settings
    from epp.sources import parse_endpoint_list

    hosts = "127.0.0.1:8001,127.0.0.1:8002,127.0.0.1:8003"
    app = EppApp(parse_settings(["--endpoints", hosts, "--secure-serving=false"]))
    app.datastore.set_endpoints(parse_endpoint_list(hosts))
    return ExtProcServicer(app.director)


async def serve(port: int, style: str, destination: str) -> None:
    from epp.server import ports

    server = grpc.aio.server(options=[ports.NO_REUSEPORT])  # a port in use fails the bind
    servicer = {"readwrite": FloorReadWrite, "generator": Floor, "epp-servicer": _epp_servicer}
    ep_grpc.add_ExternalProcessorServicer_to_server(servicer[style](destination), server)
    ports.bind(server, "floor ext_proc", f"127.0.0.1:{port}")
    await server.start()
    print(f"floor ext_proc server ({style}) on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--style", choices=("generator", "readwrite", "epp-servicer"), default="generator")
    p.add_argument("--destination", default="127.0.0.1:8000",
                   help="the endpoint the headers reply names")
    p.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    a = p.parse_args()
    if a.uvloop:
        import uvloop

        uvloop.install()
    try:
        asyncio.run(serve(a.port, a.style, a.destination))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
