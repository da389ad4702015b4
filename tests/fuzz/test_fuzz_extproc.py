"""Property tests of the ext_proc state machine, message by message (no gRPC: the
`_Stream` is driven directly, so thousands of sequences run in seconds).

Any sequence of messages gives replies or a ProtocolError (which ends only that stream);
a valid request, whatever its body mode and however its body is split, is routed with the
body forwarded unchanged, or rewritten exactly when a rule says so.
"""

from __future__ import annotations

import asyncio
import json

from envoy.config.core.v3 import base_pb2 as core
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from hypothesis import given
from hypothesis import strategies as st

from epp.config import load_config
from epp.datastore import Datastore, Endpoint
from epp.director import Director
from epp.objectives import Resolution
from epp.scheduling import InFlightTracker, Scheduler
from epp.server.extproc import ProtocolError, _Stream

Mode = pm.ProcessingMode
MODES = st.sampled_from([Mode.BUFFERED, Mode.STREAMED, Mode.FULL_DUPLEX_STREAMED, Mode.NONE,
                         Mode.BUFFERED_PARTIAL])
PATHS = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models"])


class Rewrite:
    def resolve(self, model, objective, rewrite, rand):
        return Resolution("rewritten" if model == "food-review" else model, 0, None)


def director(rewrite: bool) -> Director:
    ds = Datastore()
    ds.set_endpoints([Endpoint("a", "10.0.0.1", 8000), Endpoint("b", "10.0.0.2", 8000)])
    inflight = InFlightTracker()
    inflight.attach(ds)
    return Director(ds, Scheduler.from_config(load_config(None), inflight=inflight),
                    resolver=Rewrite() if rewrite else None, inflight=inflight)


def headers(path: str, eos: bool, mode: int, without_waiting: bool,
            response_mode: int = Mode.NONE) -> ep.ProcessingRequest:
    msg = ep.ProcessingRequest(request_headers=ep.HttpHeaders(
        headers=core.HeaderMap(headers=[core.HeaderValue(key=":path", raw_value=path.encode()),
                                        core.HeaderValue(key=":method", raw_value=b"POST")]),
        end_of_stream=eos))
    msg.protocol_config.request_body_mode = mode
    msg.protocol_config.response_body_mode = response_mode
    msg.protocol_config.send_body_without_waiting_for_header_response = without_waiting
    return msg


def body(data: bytes, eos: bool) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=data, end_of_stream=eos))


def response_headers(status: int, eos: bool) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_headers=ep.HttpHeaders(
        headers=core.HeaderMap(headers=[core.HeaderValue(key=":status",
                                                         raw_value=str(status).encode())]),
        end_of_stream=eos))


ANY_MESSAGE = st.one_of(
    st.builds(headers, PATHS, st.booleans(), MODES, st.booleans(), MODES),
    st.builds(body, st.binary(max_size=30), st.booleans()),
    st.just(ep.ProcessingRequest(request_trailers=ep.HttpTrailers())),
    st.builds(response_headers, st.integers(100, 599), st.booleans()),
    st.builds(lambda b, e: ep.ProcessingRequest(response_body=ep.HttpBody(body=b, end_of_stream=e)),
              st.binary(max_size=30), st.booleans()),
    st.just(ep.ProcessingRequest(response_trailers=ep.HttpTrailers())),
    st.just(ep.ProcessingRequest()),
)


def run(d: Director, messages: list[ep.ProcessingRequest]) -> tuple[_Stream, list[ep.ProcessingResponse]]:
    async def go() -> tuple[_Stream, list[ep.ProcessingResponse]]:
        stream = _Stream(d, 1000)
        out: list[ep.ProcessingResponse] = []
        try:
            for m in messages:
                out.extend(await stream.handle(m))
                if stream.done:
                    break
        except ProtocolError as e:
            assert e.reason and str(e)
        finally:
            stream.close()
        return stream, out

    return asyncio.run(go())


@given(st.lists(ANY_MESSAGE, max_size=8), st.booleans())
def test_any_message_sequence_gives_replies_or_a_protocol_error(messages, rewrite) -> None:
    d = director(rewrite)
    stream, out = run(d, messages)
    for r in out:
        assert r.WhichOneof("response") is not None
        if r.HasField("immediate_response"):
            assert 400 <= r.immediate_response.status.code < 600
    if stream.decision is not None:
        dest = stream.decision.destination.encode()
        sets = [o.header.raw_value for r in out if r.HasField("request_headers")
                for o in r.request_headers.response.header_mutation.set_headers
                if o.header.key == "x-gateway-destination-endpoint"]
        sets += [o.header.raw_value for r in out if r.HasField("request_body")
                 for o in r.request_body.response.header_mutation.set_headers
                 if o.header.key == "x-gateway-destination-endpoint"]
        assert sets == [dest]  # exactly one destination, the one decided
    assert d.inflight is not None and len(d.inflight) <= 1


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=5)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


@given(st.data(), st.sampled_from([Mode.STREAMED, Mode.FULL_DUPLEX_STREAMED]), st.booleans(),
       st.booleans())
def test_a_valid_body_is_forwarded_intact_however_it_is_split(data, mode, rewrite, trailers) -> None:
    payload = {"model": "food-review", "prompt": data.draw(st.text(max_size=50)),
               "max_tokens": data.draw(st.integers(1, 100))}
    raw = json.dumps(payload, ensure_ascii=data.draw(st.booleans())).encode()
    pieces = data.draw(split(raw))
    msgs = [headers("/v1/completions", False, mode, True)]
    msgs += [body(p, eos=(i == len(pieces) - 1 and not trailers)) for i, p in enumerate(pieces)]
    if trailers:
        msgs.append(ep.ProcessingRequest(request_trailers=ep.HttpTrailers()))
    stream, out = run(director(rewrite), msgs)
    assert stream.decision is not None, out
    if mode == Mode.FULL_DUPLEX_STREAMED:
        forwarded = b"".join(r.request_body.response.body_mutation.streamed_response.body
                             for r in out if r.HasField("request_body"))
    else:  # STREAMED: either every chunk passes unchanged, or the first carries the new body
        muts = [r.request_body.response.body_mutation for r in out if r.HasField("request_body")]
        assert len(muts) == len(pieces)
        forwarded = muts[0].body if muts[0].body else b"".join(pieces)
    expected = dict(payload, model="rewritten") if rewrite else payload
    assert json.loads(forwarded) == expected
    if not rewrite:
        assert forwarded == raw
