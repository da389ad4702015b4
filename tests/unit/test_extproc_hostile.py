"""Hostile ext_proc peers over a real gRPC channel on 127.0.0.1 (issue 12, defects 3, 4, 6):
undecodable messages are INVALID_ARGUMENT without a traceback, streams are capped and
time out when idle, and an empty body is not routed."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import grpc
import pytest
from envoy.config.core.v3 import base_pb2 as core
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from epp.config import load_config
from epp.datastore import Datastore, Endpoint
from epp.director import Director
from epp.observability import REGISTRY
from epp.scheduling import Scheduler
from epp.server import extproc
from epp.server.extproc import StreamLimits

Mode = pm.ProcessingMode


def headers(path: str = "/v1/completions", eos: bool = False) -> ep.ProcessingRequest:
    msg = ep.ProcessingRequest(request_headers=ep.HttpHeaders(
        headers=core.HeaderMap(headers=[core.HeaderValue(key=":path", raw_value=path.encode())]),
        end_of_stream=eos))
    msg.protocol_config.request_body_mode = Mode.FULL_DUPLEX_STREAMED
    return msg


async def serve(limits: StreamLimits) -> tuple[grpc.aio.Server, grpc.aio.Channel]:
    ds = Datastore()
    ds.set_endpoints([Endpoint("a", "10.0.0.1", 8000)])
    director = Director(ds, Scheduler.from_config(load_config(None)))
    server = grpc.aio.server()
    extproc.add_to_server(server, director, limits=limits)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server, ch = await serve(StreamLimits(max_streams=3, request_idle=0.3, response_idle=0.3))
    yield ch
    await ch.close()
    await server.stop(0)


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def routed_on_headers(ch: grpc.aio.Channel) -> bool:
    call = ep_grpc.ExternalProcessorStub(ch).Process()
    await call.write(headers("/v1/models", eos=True))
    r = await asyncio.wait_for(call.read(), 5)
    call.cancel()
    return r.HasField("request_headers")


@pytest.mark.parametrize(("raw", "reason"), [
    (b"\xff\xff\xff\xff not a protobuf", "undecodable"),
    # request_headers.headers.headers[0] = {key: "abc", value: <bad UTF-8>}
    (b"\x12\x0e\n\x0c\n\n\n\x03abc\x12\x03\xff\xfe\xfd", "bad_utf8"),
])
async def test_undecodable_messages_are_invalid_argument_without_a_traceback(
        channel, caplog, raw: bytes, reason: str) -> None:
    before = counter("inference_extension_extproc_stream_errors_total", reason=reason)
    raw_process = channel.stream_stream(
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
        request_serializer=lambda b: b, response_deserializer=ep.ProcessingResponse.FromString)
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            call = raw_process()
            await call.write(raw)
            await call.done_writing()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in call:
                    pass
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert reason in e.value.details()
    assert counter("inference_extension_extproc_stream_errors_total", reason=reason) == before + 3
    faults = [r for r in caplog.records if reason in r.getMessage()]
    assert len(faults) <= 1  # once per reason every few seconds, not once per stream
    assert not any(r.exc_info for r in caplog.records)
    assert await routed_on_headers(channel)  # the server keeps serving


async def test_streams_past_the_cap_are_refused_with_resource_exhausted(channel) -> None:
    stub = ep_grpc.ExternalProcessorStub(channel)
    before = counter("inference_extension_extproc_streams_refused_total")
    held = []
    for _ in range(3):
        call = stub.Process()
        await call.write(headers("/v1/models", eos=True))
        assert (await call.read()).HasField("request_headers")  # open, waiting for the response
        held.append(call)
    extra = stub.Process()
    await extra.write(headers("/v1/models", eos=True))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await extra.read()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "stream limit (3)" in e.value.details()
    assert counter("inference_extension_extproc_streams_refused_total") == before + 1
    for call in held:
        call.cancel()
    for _ in range(100):  # the slots come back as the streams end
        if counter("inference_extension_extproc_streams") == 0:
            break
        await asyncio.sleep(0.01)
    assert await routed_on_headers(channel)


async def test_a_stream_that_never_sends_its_body_gets_408(channel) -> None:
    before = counter("inference_extension_extproc_stream_idle_timeouts_total", phase="request")
    call = ep_grpc.ExternalProcessorStub(channel).Process()
    await call.write(headers())  # headers, then nothing: the body never comes
    r = await asyncio.wait_for(call.read(), 5)
    assert r.immediate_response.status.code == 408
    assert counter("inference_extension_extproc_stream_idle_timeouts_total",
                   phase="request") == before + 1


async def test_a_stream_that_sends_nothing_is_ended(channel) -> None:
    call = ep_grpc.ExternalProcessorStub(channel).Process()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await asyncio.wait_for(call.read(), 5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_a_routed_stream_whose_response_never_comes_is_let_go(channel) -> None:
    before = counter("inference_extension_extproc_stream_idle_timeouts_total", phase="response")
    call = ep_grpc.ExternalProcessorStub(channel).Process()
    await call.write(headers("/v1/models", eos=True))
    assert (await call.read()).HasField("request_headers")
    assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    assert counter("inference_extension_extproc_stream_idle_timeouts_total",
                   phase="response") == before + 1


async def test_an_empty_body_with_end_of_stream_is_400_not_routed(channel) -> None:
    call = ep_grpc.ExternalProcessorStub(channel).Process()
    await call.write(headers())
    await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=b"", end_of_stream=True)))
    r = await asyncio.wait_for(call.read(), 5)
    assert r.immediate_response.status.code == 400
    assert b"model not found" in r.immediate_response.body
