"""The ext_proc state machine over a real gRPC channel, message by message."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import grpc
import pytest
from envoy.config.core.v3 import base_pb2 as core
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from epp.config import load_config
from epp.datastore import Datastore, Endpoint
from epp.director import Director
from epp.objectives import Resolution
from epp.scheduling import Scheduler
from epp.server.extproc import ExtProcServicer, add_to_server

Mode = pm.ProcessingMode


def headers(path: str = "/v1/completions", eos: bool = False, **extra: str) -> ep.ProcessingRequest:
    hv = [core.HeaderValue(key=":path", raw_value=path.encode()),
          core.HeaderValue(key=":method", raw_value=b"POST")]
    hv += [core.HeaderValue(key=k.replace("_", "-"), raw_value=v.encode()) for k, v in extra.items()]
    return ep.ProcessingRequest(request_headers=ep.HttpHeaders(
        headers=core.HeaderMap(headers=hv), end_of_stream=eos))


def with_mode(msg: ep.ProcessingRequest, request_mode: int, response_mode: int = Mode.NONE) -> ep.ProcessingRequest:
    msg.protocol_config.request_body_mode = request_mode
    msg.protocol_config.response_body_mode = response_mode
    return msg


def chunk(data: bytes, eos: bool) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=data, end_of_stream=eos))


def set_headers(m: ep.HeaderMutation) -> dict[str, bytes]:
    return {o.header.key: o.header.raw_value for o in m.set_headers}


COMPLETION = json.dumps({"model": "food-review", "prompt": "hello"}).encode()


class Recorder(Director):
    """The real director, remembering what `finished` saw."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.usages: list[Any] = []
        self.detached: list[bool] = []
        self.statuses: list[int | None] = []
        self.served_reports: list[str] = []

    def finished(self, decision, usage=None, *, status=None, detached=False) -> None:  # type: ignore[override]
        self.usages.append(usage)
        self.detached.append(detached)
        self.statuses.append(status)
        super().finished(decision, usage, status=status, detached=detached)

    def served(self, decision, hostport) -> None:  # type: ignore[override]
        self.served_reports.append(hostport)
        super().served(decision, hostport)


class Rewriter:
    def resolve(self, model: str, objective: str | None, rewrite: str | None, rand: float) -> Resolution:
        return Resolution("food-review-v2" if model == "food-review" else model, 10, objective)


@pytest.fixture
async def stub() -> AsyncIterator[tuple[ep_grpc.ExternalProcessorStub, Recorder, grpc.aio.Channel]]:
    ds = Datastore()
    ds.set_endpoints([Endpoint("a", "10.0.0.1", 8000), Endpoint("b", "10.0.0.2", 8000)])
    director = Recorder(ds, Scheduler.from_config(load_config(None)), resolver=Rewriter())
    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(ExtProcServicer(director, max_body_bytes=1000), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield ep_grpc.ExternalProcessorStub(channel), director, channel
    await channel.close()
    await server.stop(0)


async def exchange(stub: ep_grpc.ExternalProcessorStub, msgs: list[ep.ProcessingRequest],
                   expect: int) -> list[ep.ProcessingResponse]:
    call = stub.Process()
    out = []
    for m in msgs:
        await call.write(m)
    while len(out) < expect:
        r = await asyncio.wait_for(call.read(), 5)
        assert r is not grpc.aio.EOF
        out.append(r)
    await call.done_writing()
    return out


async def test_request_without_body_is_routed_on_headers(stub) -> None:
    s, _, _ = stub
    (r,) = await exchange(s, [headers("/v1/models", eos=True)], 1)
    h = set_headers(r.request_headers.response.header_mutation)
    assert h["x-gateway-destination-endpoint"] in (b"10.0.0.1:8000", b"10.0.0.2:8000")
    assert h["x-request-id"]  # generated, since the client sent none
    assert r.request_headers.response.clear_route_cache
    lb = r.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert lb["x-gateway-destination-endpoint"].string_value.encode() == h["x-gateway-destination-endpoint"]
    for o in r.request_headers.response.header_mutation.set_headers:
        assert o.append_action == core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


async def test_buffered_body_answers_headers_first_then_routes_on_the_body(stub) -> None:
    s, _, _ = stub
    h, b = await exchange(s, [with_mode(headers(x_request_id="r1"), Mode.BUFFERED), chunk(COMPLETION, True)], 2)
    assert h.HasField("request_headers")
    assert not set_headers(h.request_headers.response.header_mutation)  # id was given
    common = b.request_body.response
    sets = set_headers(common.header_mutation)
    assert sets["x-gateway-destination-endpoint"].startswith(b"10.0.0.")
    # The rewrite rule renamed the model: the forwarded body says so, with its length.
    assert json.loads(common.body_mutation.body)["model"] == "food-review-v2"
    assert sets["content-length"] == str(len(common.body_mutation.body)).encode()


async def test_full_duplex_collects_chunks_then_streams_the_body_back(stub) -> None:
    s, _, _ = stub
    msgs = [with_mode(headers(), Mode.FULL_DUPLEX_STREAMED), chunk(COMPLETION[:10], False),
            chunk(COMPLETION[10:], False), chunk(b"", True)]
    h, b = await exchange(s, msgs, 2)
    assert set_headers(h.request_headers.response.header_mutation)["x-gateway-destination-endpoint"]
    streamed = b.request_body.response.body_mutation.streamed_response
    assert streamed.end_of_stream
    assert json.loads(streamed.body) == {"model": "food-review-v2", "prompt": "hello"}


async def test_streamed_mode_answers_every_chunk(stub) -> None:
    s, _, _ = stub
    first = with_mode(headers(), Mode.STREAMED)
    first.protocol_config.send_body_without_waiting_for_header_response = True
    out = await exchange(s, [first, chunk(COMPLETION[:7], False), chunk(COMPLETION[7:], True)], 3)
    assert out[0].HasField("request_headers")
    assert out[1].request_body.response.body_mutation.body.startswith(b'{"model":"food-review-v2"')
    assert out[2].request_body.response.body_mutation.clear_body


async def test_empty_chunked_body_is_answered_in_the_body_phase(stub) -> None:
    # `transfer-encoding: chunked` with no data: headers without end_of_stream, then an
    # empty body with it. Envoy expects the answer where it asked the question.
    s, _, _ = stub
    h, b = await exchange(s, [with_mode(headers("/v1/models"), Mode.FULL_DUPLEX_STREAMED), chunk(b"", True)], 2)
    assert set_headers(h.request_headers.response.header_mutation)["x-gateway-destination-endpoint"]
    assert b.request_body.response.body_mutation.streamed_response.end_of_stream
    h, b = await exchange(s, [with_mode(headers("/v1/models"), Mode.BUFFERED), chunk(b"", True)], 2)
    assert h.HasField("request_headers") and b.HasField("request_body")
    assert set_headers(b.request_body.response.header_mutation)["x-gateway-destination-endpoint"]


async def test_bad_json_is_an_immediate_400(stub) -> None:
    s, _, _ = stub
    (r,) = await exchange(s, [with_mode(headers(), Mode.FULL_DUPLEX_STREAMED), chunk(b"{nope", True)], 1)
    assert r.immediate_response.status.code == 400
    assert r.immediate_response.body.startswith(b"inference error: BadRequest - invalid JSON body")


async def test_body_over_the_limit_is_413_without_waiting_for_the_rest(stub) -> None:
    s, _, _ = stub
    (r,) = await exchange(s, [with_mode(headers(), Mode.FULL_DUPLEX_STREAMED), chunk(b"x" * 1001, False)], 1)
    assert r.immediate_response.status.code == 413


async def test_response_usage_is_read_and_the_model_name_restored(stub) -> None:
    s, director, _ = stub
    sse = (b'data: {"model":"food-review-v2","choices":[{"text":"a"}]}\n\n'
           b'data: {"model":"food-review-v2","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
           b"data: [DONE]\n\n")
    msgs = [with_mode(headers(), Mode.FULL_DUPLEX_STREAMED, Mode.FULL_DUPLEX_STREAMED),
            chunk(COMPLETION, True),
            ep.ProcessingRequest(response_headers=ep.HttpHeaders()),
            ep.ProcessingRequest(response_body=ep.HttpBody(body=sse[:30], end_of_stream=False)),
            ep.ProcessingRequest(response_body=ep.HttpBody(body=sse[30:], end_of_stream=True))]
    out = await exchange(s, msgs, 5)
    assert "content-length" in out[2].response_headers.response.header_mutation.remove_headers
    echoed = b"".join(o.response_body.response.body_mutation.streamed_response.body for o in out[3:])
    assert echoed == sse.replace(b"food-review-v2", b"food-review")
    await asyncio.sleep(0.05)
    assert director.usages[-1].completion_tokens == 2
    assert director.detached[-1] is False


@pytest.mark.parametrize("msgs", [
    [chunk(COMPLETION, True)],                        # body before headers
    [headers("/v1/models", eos=True), headers("/v1/models", eos=True)],  # headers twice
    [ep.ProcessingRequest()],                         # nothing set
])
async def test_protocol_violations_end_only_their_stream(stub, msgs) -> None:
    s, _, _ = stub
    call = s.Process()
    for m in msgs:
        await call.write(m)
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in call:
            pass
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The server keeps serving other streams.
    (r,) = await exchange(s, [headers("/v1/models", eos=True)], 1)
    assert r.HasField("request_headers")


async def test_garbage_bytes_end_only_their_stream(stub) -> None:
    s, _, channel = stub
    raw = channel.stream_stream("/envoy.service.ext_proc.v3.ExternalProcessor/Process",
                                request_serializer=lambda b: b, response_deserializer=lambda b: b)
    call = raw()
    await call.write(b"\xff\xff\xff\xff not a protobuf")
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in call:
            pass
    assert e.value.code() != grpc.StatusCode.OK
    (r,) = await exchange(s, [headers("/v1/models", eos=True)], 1)
    assert r.HasField("request_headers")


async def test_cancelled_stream_finishes_its_request(stub) -> None:
    s, director, _ = stub
    call = s.Process()
    await call.write(headers("/v1/models", eos=True))
    assert (await call.read()).HasField("request_headers")
    call.cancel()
    for _ in range(50):
        if director.usages:
            break
        await asyncio.sleep(0.02)
    assert director.usages == [None]
    # No response came through: the model server may still be working on it.
    assert director.detached == [True]


async def test_fallback_endpoints_go_in_the_header_and_the_metadata_primary_first() -> None:
    ds = Datastore()
    ds.set_endpoints([Endpoint("a", "10.0.0.1", 8000), Endpoint("b", "10.0.0.2", 8000),
                      Endpoint("c", "10.0.0.3", 8000)])
    config = load_config("""
plugins:
- {type: kv-cache-utilization-scorer}
- {type: max-score-picker, parameters: {maxNumOfEndpoints: 2}}
schedulingProfiles:
- {name: p, plugins: [{pluginRef: kv-cache-utilization-scorer}, {pluginRef: max-score-picker}]}
""")
    server = grpc.aio.server()
    add_to_server(server, Director(ds, Scheduler.from_config(config)))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            (r,) = await exchange(ep_grpc.ExternalProcessorStub(channel), [headers("/v1/models", eos=True)], 1)
    finally:
        await server.stop(0)
    value = set_headers(r.request_headers.response.header_mutation)["x-gateway-destination-endpoint"]
    primary, fallback = value.decode().split(",")
    assert primary != fallback and {primary, fallback} <= {"10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"}
    lb = r.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert lb["x-gateway-destination-endpoint"].string_value.encode() == value


def served_report(hostport: str) -> ep.ProcessingRequest:
    msg = ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=core.HeaderMap(
        headers=[core.HeaderValue(key=":status", raw_value=b"200")])))
    msg.metadata_context.filter_metadata["envoy.lb"].fields[
        "x-gateway-destination-endpoint-served"].string_value = hostport
    return msg


async def test_the_endpoint_that_served_is_reported_to_the_director(stub) -> None:
    s, director, _ = stub
    call = s.Process()
    await call.write(headers("/v1/models", eos=True))
    routed = await call.read()
    picked = set_headers(routed.request_headers.response.header_mutation)[
        "x-gateway-destination-endpoint"].decode()
    other = "10.0.0.2:8000" if picked == "10.0.0.1:8000" else "10.0.0.1:8000"
    await call.write(served_report(other))
    resp = await call.read()
    assert resp.HasField("response_headers")
    await call.done_writing()
    assert director.served_reports[-1] == other


async def test_the_response_status_reaches_request_completion(stub) -> None:
    s, director, _ = stub
    failed = ep.ProcessingRequest(response_headers=ep.HttpHeaders(end_of_stream=True, headers=core.HeaderMap(
        headers=[core.HeaderValue(key=":status", raw_value=b"503")])))
    await exchange(s, [headers("/v1/models", eos=True), failed], 2)
    await asyncio.sleep(0.05)
    assert director.statuses[-1] == 503


# -- the observed response path (`epp envoy-config --response-path=observed`) ---------------

OBSERVED = (("x-epp-response-path", "observed"),)


async def route_observed(stub: ep_grpc.ExternalProcessorStub, body: bytes = COMPLETION
                         ) -> tuple[ep.ProcessingResponse, str]:
    """A routing stream that another filter's stream follows: its reply, and the ticket."""
    call = stub.Process(metadata=OBSERVED)
    for m in [with_mode(headers(), Mode.FULL_DUPLEX_STREAMED), chunk(body, True)]:
        await call.write(m)
    h = await asyncio.wait_for(call.read(), 5)
    await asyncio.wait_for(call.read(), 5)
    # The routing stream ends itself: the response is another stream's business.
    assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
    ticket = h.dynamic_metadata.fields["epp.response"].struct_value.fields["ticket"].string_value
    assert ticket
    return h, ticket


def follower_headers(ticket: str, observe: bool) -> ep.ProcessingRequest:
    m = headers()
    m.observability_mode = observe
    m.metadata_context.filter_metadata["epp.response"].fields["ticket"].string_value = ticket
    return m


def response(body: bytes, observe: bool, status: bytes = b"200") -> list[ep.ProcessingRequest]:
    hv = core.HeaderMap(headers=[core.HeaderValue(key=":status", raw_value=status)])
    return [ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=hv), observability_mode=observe),
            ep.ProcessingRequest(response_body=ep.HttpBody(body=body, end_of_stream=True),
                                 observability_mode=observe)]


USAGE = b'{"model":"m","usage":{"prompt_tokens":5,"completion_tokens":2}}'


async def test_observer_stream_finishes_the_request_with_its_usage(stub) -> None:
    s, director, _ = stub
    h, ticket = await route_observed(s, json.dumps({"model": "m", "prompt": "x"}).encode())
    mutation = h.request_headers.response.header_mutation
    assert "x-gateway-model-name-restore" in mutation.remove_headers  # not rewritten
    assert director.usages == []  # the routing stream's end is not the request's end
    call = s.Process()
    for m in [follower_headers(ticket, True), *response(USAGE, True)]:
        await call.write(m)
    # Observability mode: nothing is answered, and the EPP ends the stream itself.
    assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
    assert director.usages[-1].completion_tokens == 2
    assert director.statuses[-1] == 200 and director.detached[-1] is False


async def test_rewritten_request_is_marked_and_its_restorer_puts_the_name_back(stub) -> None:
    s, director, _ = stub
    h, ticket = await route_observed(s)
    assert set_headers(h.request_headers.response.header_mutation)["x-gateway-model-name-restore"]
    msgs = [with_mode(follower_headers(ticket, False), Mode.NONE, Mode.FULL_DUPLEX_STREAMED),
            *response(b'{"model":"food-review-v2","usage":{"prompt_tokens":5,"completion_tokens":2}}',
                      False)]
    out = await exchange(s, msgs, 3)
    assert out[0].HasField("request_headers")
    body = out[2].response_body.response.body_mutation.streamed_response.body
    assert json.loads(body)["model"] == "food-review"
    await asyncio.sleep(0.05)
    assert director.usages[-1].completion_tokens == 2


async def test_observer_stream_closed_before_the_response_leaves_the_request_detached(stub) -> None:
    s, director, _ = stub
    _, ticket = await route_observed(s)
    call = s.Process()
    await call.write(follower_headers(ticket, True))
    await asyncio.sleep(0.05)
    call.cancel()  # Envoy's client went away before any response
    await asyncio.sleep(0.1)
    assert director.detached[-1] is True


async def test_unclaimed_decision_is_finished_as_detached_after_its_ttl() -> None:
    from epp.server.handover import DecisionTickets

    expired: list[Any] = []
    tickets = DecisionTickets(expired.append, ttl=0.05)
    first, second = tickets.hand_over("d1"), tickets.hand_over("d2")  # type: ignore[arg-type]
    assert tickets.claim(first) == "d1"
    assert tickets.claim(first) is None  # claimed once only
    await asyncio.sleep(0.15)
    assert expired == ["d2"] and tickets.claim(second) is None and len(tickets) == 0
