"""Envoy's external-processing protocol: one state machine per HTTP request stream.

Envoy opens a `Process` stream per HTTP request and sends the request headers, body
chunks, then the response headers and body. This module turns those messages into an
`InferenceRequest`, asks the director for an endpoint, and answers with the upstream
EPP's wire contract (docs/architecture.md): the destination header (always overwritten, so a
client can never choose its own host) and the same value in `envoy.lb` dynamic metadata.

When the answer must go out depends on the body mode Envoy announces in
`protocol_config`:
- BUFFERED: Envoy waits for the headers reply before sending the body, so the headers are
  answered at once and the destination rides on the body reply.
- FULL_DUPLEX_STREAMED, and STREAMED with `send_body_without_waiting_for_header_response`:
  the headers reply is held until the whole body is in, then the body goes back as
  streamed (or per-chunk) body replies.

With `epp envoy-config --response-path=observed` (the default), the routing filter's
stream sees the request only: it hands the decision over (`handover.py`) under a ticket it
puts in dynamic metadata, and the stream of a later filter claims it by that ticket and
follows the response: an observability-mode filter, which Envoy never waits on, or, for
requests whose model was rewritten, a blocking filter that restores the client's model name.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf.message import DecodeError

from epp import observability as obs
from epp.director import Director, RoutingDecision
from epp.errors import EppError, ErrorCode
from epp.labels import for_log
from epp.ratelog import RateLimitedLog
from epp.request import (
    DESTINATION_HEADER,
    REQUEST_ID_HEADER,
    RESPONSE_PATH_METADATA,
    RESTORE_MODEL_HEADER,
    InferenceRequest,
    ResponseReader,
    Usage,
    parse_request_body,
)
from epp.server import envoy_messages as msgs
from epp.server.handover import DecisionTickets
from epp.server.idle import IdleTimeout, IdleWatch, StreamLimits
from epp.telemetry.logs import set_request_id

log = logging.getLogger(__name__)

Mode = pm.ProcessingMode
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


class ProtocolError(Exception):
    """A message that breaks the ext_proc protocol; ends only its own stream."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class _Modes:
    request_body: int = Mode.BUFFERED
    response_body: int = Mode.NONE
    body_without_waiting: bool = False

    @property
    def defer_headers(self) -> bool:
        """True when the headers reply must wait for the whole request body."""
        return self.request_body == Mode.FULL_DUPLEX_STREAMED or (
            self.request_body == Mode.STREAMED and self.body_without_waiting
        )


SERVICE_NAME = ep.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
"""`envoy.service.ext_proc.v3.ExternalProcessor`, for reflection and health."""


def add_to_server(server: grpc.aio.Server, director: Director, *,
                  max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                  limits: StreamLimits = StreamLimits()) -> "ExtProcServicer":
    """Serve ext_proc on a grpc.aio server (call before `server.start()`)."""
    servicer = ExtProcServicer(director, max_body_bytes=max_body_bytes, limits=limits)
    ep_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    return servicer


_log_fault = RateLimitedLog(log)


class ExtProcServicer(ep_grpc.ExternalProcessorServicer):
    """`envoy.service.ext_proc.v3.ExternalProcessor`; one `_Stream` per call."""

    def __init__(self, director: Director, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 limits: StreamLimits = StreamLimits()):
        self.director = director
        self.max_body_bytes = max_body_bytes
        self.limits = limits
        self.active = 0
        self.tickets = DecisionTickets(self._unclaimed)

    def _unclaimed(self, decision: RoutingDecision) -> None:
        _log_fault("unclaimed", logging.WARNING,
                   "no response stream claimed request %s's routing decision: finished as "
                   "detached (abandoned, or Envoy's response filters reach another EPP "
                   "replica: use epp envoy-config --response-path=blocking there)",
                   for_log(decision.inflight_key or "-"))
        try:
            self.director.finished(decision, None, detached=True)
        except Exception:
            log.exception("finishing an unclaimed decision failed")

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ep.ProcessingResponse]:
        limits = self.limits
        if self.active >= limits.max_streams:
            obs.EXTPROC_STREAMS_REFUSED.inc()
            _log_fault("refused", logging.WARNING,
                       "ext_proc stream refused: %d streams open (--extproc-max-streams)",
                       self.active)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"endpoint picker at its ext_proc stream limit ({limits.max_streams})")
        self.active += 1
        obs.EXTPROC_STREAMS.inc()
        stream = _Stream(self.director, self.max_body_bytes, self.tickets, context)
        messages = request_iterator.__aiter__()
        watch = IdleWatch()
        phase = "request"
        try:
            # The idle deadline runs only while waiting for Envoy's next message, never
            # while the request waits for admission or a reply is being sent.
            while True:
                routed = stream.decision is not None
                phase = "response" if routed else "request"
                watch.waiting(limits.response_idle if routed else limits.request_idle)
                try:
                    msg = await messages.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    watch.raise_if_idle()
                    raise
                watch.received()
                for out in await stream.handle(msg):
                    yield out
                if stream.done:
                    return
        except IdleTimeout:
            obs.EXTPROC_STREAM_TIMEOUTS.labels(phase).inc()
            _log_fault(f"idle {phase}", logging.INFO,
                       "ext_proc stream %s idle too long in the %s phase: closed",
                       for_log(stream.request_id or "-"), phase)
            if phase == "request":
                if stream.saw_headers:  # Envoy waits for an answer: a clear one
                    yield msgs.immediate_response(EppError(
                        ErrorCode.RequestTimeout, "request body not received in time"))
                    return
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    "no ext_proc message received in time")
            # After routing, the request went on its way: just let go of the stream.
        except ProtocolError as e:
            self._reject(e.reason, str(e), stream)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except DecodeError as e:
            # Not a ProcessingRequest (corrupt wire format, bad UTF-8 in a string field):
            # the peer's fault, so no traceback and not INTERNAL.
            reason = "bad_utf8" if "UTF-8" in str(e) else "undecodable"
            self._reject(reason, "ext_proc message could not be decoded", stream)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"ext_proc message could not be decoded ({reason})")
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            obs.EXTPROC_STREAM_ERRORS.labels("internal").inc()
            log.exception("ext_proc stream %s failed", for_log(stream.request_id or "-"))
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in endpoint picker")
        finally:
            watch.close()
            self.active -= 1
            obs.EXTPROC_STREAMS.dec()
            stream.close()

    @staticmethod
    def _reject(reason: str, message: str, stream: "_Stream") -> None:
        obs.EXTPROC_STREAM_ERRORS.labels(reason).inc()
        _log_fault(reason, logging.WARNING, "ext_proc stream %s ended (%s): %s",
                   for_log(stream.request_id or "-"), reason, message)


def _observed(metadata: "tuple[tuple[str, str | bytes], ...] | None") -> bool:
    """True when the routing filter says another filter follows the response."""
    for key, value in metadata or ():
        if key == RESPONSE_PATH_METADATA:
            return value == "observed"
    return False


class _Stream:
    """State of one ext_proc stream (one HTTP request and its response)."""

    __slots__ = (
        "director", "max_body", "modes", "req", "request_id", "generated_id", "chunks",
        "body_len", "decision", "done", "finished", "response", "status",
        "saw_headers", "body_msgs", "saw_response", "tickets", "context", "observer",
    )

    def __init__(self, director: Director, max_body: int, tickets: DecisionTickets | None = None,
                 context: grpc.aio.ServicerContext | None = None) -> None:
        self.director = director
        self.max_body = max_body
        self.tickets = tickets
        self.context = context
        self.observer = False
        """This stream is an observability-mode filter's: Envoy reads no reply."""
        self.modes = _Modes()
        self.req: InferenceRequest | None = None
        self.request_id = ""
        self.generated_id = False
        self.chunks: list[bytes] = []
        self.body_len = 0
        self.decision: RoutingDecision | None = None
        self.done = False
        self.finished = False
        self.response = ResponseReader()
        self.status: int | None = None
        self.saw_headers = False
        self.body_msgs = 0
        self.saw_response = False

    async def handle(self, msg: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
        kind = msg.WhichOneof("request")
        if msg.HasField("protocol_config"):
            pc = msg.protocol_config
            self.modes = _Modes(pc.request_body_mode, pc.response_body_mode,
                                pc.send_body_without_waiting_for_header_response)
        if kind == "request_headers":
            ticket = msgs.ticket(msg)
            if ticket is not None:
                return self._claim(msg, ticket)
            return await self._on_request_headers(msg)
        if kind == "request_body":
            return await self._on_request_body(msg.request_body)
        if kind == "request_trailers":
            return await self._on_request_trailers()
        if kind in ("response_headers", "response_body", "response_trailers"):
            self._note_served(msg)
        if kind == "response_headers":
            out = self._on_response_headers(msg.response_headers)
        elif kind == "response_body":
            out = self._on_response_body(msg.response_body)
        elif kind == "response_trailers":
            self._finish(self.response.usage())
            out = [ep.ProcessingResponse(response_trailers=ep.TrailersResponse())]
        else:
            raise ProtocolError("empty_message", "ProcessingRequest carries no request field")
        if not msg.observability_mode:
            return out
        # Envoy reads no reply in observability mode; once the response is over, end
        # the stream rather than wait for Envoy's deferred close.
        self.observer = True
        if self.finished or self.decision is None:
            self.done = True
        return []

    def _claim(self, msg: ep.ProcessingRequest, ticket: str) -> list[ep.ProcessingResponse]:
        """A response filter's stream starts: it takes over the routing stream's decision."""
        if self.saw_headers:
            raise ProtocolError("out_of_order", "request_headers received twice")
        self.saw_headers = True
        self.observer = msg.observability_mode
        decision = self.tickets.claim(ticket) if self.tickets is not None else None
        if decision is None:
            # Not (or no longer) held here: follow the response without accounting.
            if self.observer:
                self.done = True
            _log_fault("unknown ticket", logging.WARNING,
                       "response stream for a routing decision this EPP does not hold: "
                       "passed through unaccounted (several EPP replicas behind per-stream "
                       "balancing need epp envoy-config --response-path=blocking)")
        else:
            self.decision = decision
            self.request_id = decision.inflight_key
            self.response = ResponseReader(decision.target_model, decision.model)
        if self.observer:
            return []
        return [ep.ProcessingResponse(request_headers=ep.HeadersResponse())]

    # -- request -------------------------------------------------------------------

    async def _on_request_headers(self, msg: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
        if self.saw_headers:
            raise ProtocolError("out_of_order", "request_headers received twice")
        self.saw_headers = True
        headers = msgs.request_headers(msg.request_headers)
        rid = headers.get(REQUEST_ID_HEADER)
        if not rid:
            rid = os.urandom(16).hex()  # as unique as uuid4().hex, without the UUID object
            self.generated_id = True
        self.request_id = rid
        set_request_id(rid)
        self.req = InferenceRequest(
            request_id=rid,
            path=headers.get(":path", "/"),
            method=headers.get(":method", "POST"),
            headers=headers,
            subset=msgs.subset_hint(msg),
        )
        if msg.request_headers.end_of_stream or self.modes.request_body == Mode.NONE:
            return await self._route(headers_reply=True)
        if self.modes.request_body == Mode.STREAMED and not self.modes.body_without_waiting:
            return self._immediate(EppError(
                ErrorCode.Internal,
                "ext_proc STREAMED request bodies need send_body_without_waiting_for_header_response: true",
            ))
        if self.modes.defer_headers:
            return []
        # BUFFERED: Envoy waits for this reply before it sends the body.
        reply = ep.ProcessingResponse()
        mutation = reply.request_headers.response.header_mutation
        mutation.SetInParent()  # a headers reply even with nothing to set
        self._add_id(mutation)
        return [reply]

    async def _on_request_body(self, body: ep.HttpBody) -> list[ep.ProcessingResponse]:
        if not self.saw_headers:
            raise ProtocolError("out_of_order", "request_body received before request_headers")
        if self.decision is not None or self.done:
            raise ProtocolError("out_of_order", "request_body received after the request ended")
        self.body_msgs += 1
        if body.body:
            self.chunks.append(body.body)
            self.body_len += len(body.body)
            if self.body_len > self.max_body:
                return self._immediate(EppError(
                    ErrorCode.PayloadTooLarge,
                    f"request body exceeds the limit of {self.max_body} bytes",
                ))
        if not body.end_of_stream:
            if self.modes.request_body in (Mode.BUFFERED, Mode.BUFFERED_PARTIAL):
                return self._immediate(EppError(
                    ErrorCode.PayloadTooLarge,
                    "request body exceeds the gateway's buffer; use a streamed body mode",
                ))
            return []
        return await self._route(headers_reply=self.modes.defer_headers)

    async def _on_request_trailers(self) -> list[ep.ProcessingResponse]:
        if self.decision is None and not self.done and self.saw_headers:
            out = await self._route(headers_reply=self.modes.defer_headers)
            return out + [ep.ProcessingResponse(request_trailers=ep.TrailersResponse())]
        return [ep.ProcessingResponse(request_trailers=ep.TrailersResponse())]

    async def _route(self, headers_reply: bool) -> list[ep.ProcessingResponse]:
        req = self.req
        assert req is not None
        body = b"".join(self.chunks)
        req.body = body
        try:
            req.parsed = parse_request_body(req.path, body)
            decision = await self.director.route(req)
        except EppError as e:
            if req.parsed is None:
                obs.REQUEST_ERROR_TOTAL.labels("", "", e.code.name).inc()
            _log_fault(f"rejected {e.code.name}", logging.INFO, "request %s rejected: %s",
                       for_log(req.request_id), for_log(e.body, 300))
            return self._immediate(e)
        self.decision = decision
        self.response = ResponseReader(decision.target_model, decision.model)
        new_body = decision.body
        destination = decision.destination
        # The reply that carries the decision: the headers reply, or in BUFFERED mode (the
        # headers were answered already) the body reply, which may still set headers.
        buffered = (self.body_msgs > 0 and not headers_reply
                    and self.modes.request_body != Mode.FULL_DUPLEX_STREAMED)
        reply = ep.ProcessingResponse()
        common = (reply.request_body if buffered else reply.request_headers).response
        common.clear_route_cache = True
        mutation = common.header_mutation
        self._add_id(mutation)
        msgs.set_header(mutation, DESTINATION_HEADER, destination.encode())
        if new_body is not None:
            msgs.set_header(mutation, "content-length", str(len(new_body)).encode())
        msgs.set_lb_metadata(reply.dynamic_metadata, destination)
        if (self.tickets is not None and self.context is not None
                and _observed(self.context.invocation_metadata())):
            # The response filters' stream finishes this request, not this one.
            self.finished = True
            self.done = True
            msgs.set_ticket(reply.dynamic_metadata, self.tickets.hand_over(decision))
            if self.response.rewrites:
                msgs.set_header(mutation, RESTORE_MODEL_HEADER, b"1")
            else:
                mutation.remove_headers.append(RESTORE_MODEL_HEADER)

        if self.body_msgs == 0:
            # Routed on the headers alone: the headers reply carries everything.
            return [reply]
        if self.modes.request_body == Mode.FULL_DUPLEX_STREAMED:
            return [reply, *msgs.streamed_body(new_body if new_body is not None else body)]
        if headers_reply:  # STREAMED, body sent without waiting: one reply per chunk
            out = [reply]
            for i in range(self.body_msgs):
                if new_body is None:
                    out.append(ep.ProcessingResponse(request_body=ep.BodyResponse()))
                elif i == 0:
                    out.append(msgs.body_reply(ep.BodyMutation(body=new_body)))
                else:
                    out.append(msgs.body_reply(ep.BodyMutation(clear_body=True)))
            return out
        # BUFFERED: headers were already answered; the body reply carries the decision.
        if new_body is not None:
            common.body_mutation.body = new_body
        return [reply]

    def _add_id(self, mutation: ep.HeaderMutation) -> None:
        """The request id the EPP made up, for the model server and the logs downstream."""
        if self.generated_id:
            msgs.set_header(mutation, REQUEST_ID_HEADER, self.request_id.encode())

    def _immediate(self, e: EppError) -> list[ep.ProcessingResponse]:
        self.done = True
        return [msgs.immediate_response(e)]

    # -- response ------------------------------------------------------------------

    def _on_response_headers(self, msg: ep.HttpHeaders) -> list[ep.ProcessingResponse]:
        # A response before a routing decision is Envoy's own local reply (for example its
        # 413 for a body over its buffer limit): pass it through untouched.
        self.saw_response = True
        self.status = msgs.response_status(msg)
        if self.decision is not None:
            self.director.response_status(self.decision, self.status)
        common = ep.CommonResponse()
        if self.response.rewrites and self.modes.response_body != Mode.NONE:
            # The body may change length when the model name is restored.
            common.header_mutation.remove_headers.append("content-length")
        if msg.end_of_stream:
            self._finish(None)
        return [ep.ProcessingResponse(response_headers=ep.HeadersResponse(response=common))]

    def _on_response_body(self, body: ep.HttpBody) -> list[ep.ProcessingResponse]:
        chunk = body.body
        out_chunk = self.response.feed(chunk, body.end_of_stream)
        if body.end_of_stream:
            self._finish(self.response.usage())
        if self.modes.response_body == Mode.FULL_DUPLEX_STREAMED:
            return [ep.ProcessingResponse(response_body=ep.BodyResponse(response=ep.CommonResponse(
                body_mutation=ep.BodyMutation(streamed_response=ep.StreamedBodyResponse(
                    body=out_chunk, end_of_stream=body.end_of_stream)))))]
        if out_chunk is chunk:
            return [ep.ProcessingResponse(response_body=ep.BodyResponse())]
        mutation = ep.BodyMutation(body=out_chunk) if out_chunk else ep.BodyMutation(clear_body=True)
        return [ep.ProcessingResponse(response_body=ep.BodyResponse(
            response=ep.CommonResponse(body_mutation=mutation)))]

    # -- end -----------------------------------------------------------------------

    def _note_served(self, msg: ep.ProcessingRequest) -> None:
        """The data plane may say which endpoint really served (a fallback, say)."""
        if self.decision is None or not msg.HasField("metadata_context"):
            return
        served = msgs.served_endpoint(msg)
        if served:
            self.director.served(self.decision, served)

    def _finish(self, usage: Usage | None, detached: bool = False) -> None:
        if self.decision is not None and not self.finished:
            self.finished = True
            try:
                self.director.finished(self.decision, usage, status=self.status, detached=detached)
            except Exception:
                log.exception("request %s: finishing bookkeeping failed", self.request_id)

    def close(self) -> None:
        """The stream ended (normally, by error or by cancellation).

        Closed before any response came through: Envoy does not send responses here
        (`--process-response=false`) or the request was abandoned. Either way the model
        server may still be working on it, so it stays counted in flight until the
        endpoint's next scrape."""
        self._finish(None, detached=not self.saw_response)
