"""Envoy ext_proc messages: reading what the EPP needs out of them, and building replies.

Protobuf in, plain values out (and back): the stream state machine in `extproc.py` calls
these, so that it reads as the protocol and not as message plumbing.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2 as core
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from epp.errors import EppError
from epp.request import (
    DESTINATION_HEADER,
    LB_NAMESPACE,
    SERVED_KEY,
    SUBSET_KEY,
    SUBSET_NAMESPACE,
    TICKET_KEY,
    TICKET_NAMESPACE,
)

_OVERWRITE = core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
STREAM_CHUNK = 64 * 1024
"""Bytes per streamed body reply."""


def request_headers(msg: ep.HttpHeaders) -> dict[str, str]:
    """Header names (lower case) to values; raw values decoded as UTF-8, bad bytes replaced."""
    headers: dict[str, str] = {}
    for h in msg.headers.headers:
        headers[h.key.lower()] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return headers


# Replies are built in place (`add()`, field writes on the parent): constructing the nested
# messages and passing them in copies each one again, 3-4x the cost per exchange.


def set_header(m: ep.HeaderMutation, key: str, value: bytes) -> None:
    o = m.set_headers.add()
    o.header.key = key
    o.header.raw_value = value
    o.append_action = _OVERWRITE


def set_lb_metadata(metadata: struct_pb2.Struct, destination: str) -> None:
    """`envoy.lb` dynamic metadata naming the destination (as the header does)."""
    metadata.fields[LB_NAMESPACE].struct_value.fields[DESTINATION_HEADER].string_value = destination


def set_ticket(metadata: struct_pb2.Struct, ticket: str) -> None:
    """The routing decision's ticket, for the response filters' streams to claim it."""
    metadata.fields[TICKET_NAMESPACE].struct_value.fields[TICKET_KEY].string_value = ticket


def ticket(msg: ep.ProcessingRequest) -> str | None:
    """The ticket a response filter's first message carries, or None (a routing stream)."""
    fm = msg.metadata_context.filter_metadata
    if TICKET_NAMESPACE not in fm:
        return None
    fields = fm[TICKET_NAMESPACE].fields
    return fields[TICKET_KEY].string_value if TICKET_KEY in fields else None


def body_reply(mutation: ep.BodyMutation) -> ep.ProcessingResponse:
    return ep.ProcessingResponse(request_body=ep.BodyResponse(
        response=ep.CommonResponse(body_mutation=mutation)))


def streamed_body(body: bytes) -> list[ep.ProcessingResponse]:
    out = []
    n = len(body)
    for start in range(0, max(n, 1), STREAM_CHUNK):
        r = ep.ProcessingResponse()
        streamed = r.request_body.response.body_mutation.streamed_response
        streamed.body = body[start:start + STREAM_CHUNK]
        streamed.end_of_stream = start + STREAM_CHUNK >= n
        out.append(r)
    return out


def immediate_response(e: EppError) -> ep.ProcessingResponse:
    """The upstream EPP's error answer: status, and body `inference error: <Code> - <msg>`."""
    hm = ep.HeaderMutation()
    set_header(hm, "content-type", b"text/plain; charset=utf-8")
    return ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=e.code.http_status),
        headers=hm,
        body=e.body.encode(),
        details=f"epp_{e.code.name}",
    ))


def response_status(msg: ep.HttpHeaders) -> int | None:
    for h in msg.headers.headers:
        if h.key == ":status":
            v = h.raw_value or h.value.encode()
            return int(v) if v.isdigit() and len(v) <= 3 else None
    return None


def served_endpoint(msg: ep.ProcessingRequest) -> str:
    fm = msg.metadata_context.filter_metadata
    if LB_NAMESPACE not in fm:
        return ""
    fields = fm[LB_NAMESPACE].fields
    if SERVED_KEY not in fields:
        return ""
    return fields[SERVED_KEY].string_value


def subset_hint(msg: ep.ProcessingRequest) -> tuple[str, ...] | None:
    fm = msg.metadata_context.filter_metadata
    if SUBSET_NAMESPACE not in fm:
        return None
    fields = fm[SUBSET_NAMESPACE].fields
    if SUBSET_KEY not in fields:
        return None
    v = fields[SUBSET_KEY]
    kind = v.WhichOneof("kind")
    if kind == "list_value":
        return tuple(x.string_value for x in v.list_value.values if x.string_value)
    if kind == "string_value":
        return tuple(s.strip() for s in v.string_value.split(",") if s.strip())
    return ()
