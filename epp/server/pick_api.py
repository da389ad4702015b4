"""The Pick API (`epp.v1.Picker`): endpoint picking for gateways that cannot speak ext_proc.

`Pick` answers with the endpoint a request should go to: a real routing decision, as
through ext_proc. `Explain` returns what would be picked now and how it was decided, as a
dry run that changes nothing (the EPP wires `route(req, explain)` to the director's
`route_detached` and `explain`). Protobuf stops in this
module: the request becomes an `InferenceRequest`, the answer comes back as any object with
`endpoint`, `target_model` and `explanation` (`RoutingDecisionLike`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Awaitable, Callable, Protocol

import grpc

from epp.datastore import Endpoint
from epp.errors import EppError, ErrorCode, bad_request
from epp.passivehealth import PassiveHealth
from epp.request import REQUEST_ID_HEADER, InferenceRequest, parse_body
from epp.scheduling.interface import Explanation
from epp.v1 import pick_pb2, pick_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pick_pb2.DESCRIPTOR.services_by_name["Picker"].full_name
"""`epp.v1.Picker`, for gRPC reflection and health."""

MAX_BODY_BYTES = 16 * 1024 * 1024


class RoutingDecisionLike(Protocol):
    """What the Pick API needs from a routing decision."""

    @property
    def endpoint(self) -> Endpoint: ...

    @property
    def target_model(self) -> str: ...

    @property
    def explanation(self) -> Explanation | None: ...


Route = Callable[[InferenceRequest, bool], Awaitable[RoutingDecisionLike]]
"""`route(request, explain)`: the director's pipeline; raises `EppError`."""

_STATUS = {
    ErrorCode.BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NotFound: grpc.StatusCode.NOT_FOUND,
    ErrorCode.PayloadTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.Internal: grpc.StatusCode.INTERNAL,
    ErrorCode.ServiceUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def grpc_status(code: ErrorCode) -> grpc.StatusCode:
    """The gRPC status for an EPP error code (413 is the caller's fault: INVALID_ARGUMENT)."""
    return _STATUS.get(code, grpc.StatusCode.INTERNAL)


def to_inference_request(msg: pick_pb2.PickRequest, max_body_bytes: int = MAX_BODY_BYTES) -> InferenceRequest:
    """A PickRequest as the director sees requests from ext_proc; raises a 400/413 EppError."""
    headers = {k.lower(): v for k, v in msg.headers.items()}
    rid = msg.request_id or headers.get(REQUEST_ID_HEADER) or str(uuid.uuid4())
    if msg.body:
        if msg.prompt:
            raise bad_request("give either prompt or body, not both")
        body = bytes(msg.body)
        if len(body) > max_body_bytes:
            raise EppError(ErrorCode.PayloadTooLarge, f"body exceeds {max_body_bytes} bytes")
        path = msg.path or ("/v1/chat/completions" if b'"messages"' in body else "/v1/completions")
        parsed = parse_body(path, body)
        if msg.model and msg.model != parsed.model:
            raise bad_request(f"model {msg.model!r} does not match the body's {parsed.model!r}")
    else:
        if not msg.model:
            raise bad_request("model is required (or a body with one)")
        path = msg.path or "/v1/completions"
        body = json.dumps({"model": msg.model, "prompt": msg.prompt}, ensure_ascii=False).encode(
            "utf-8", "surrogatepass"
        )
        if len(body) > max_body_bytes:
            raise EppError(ErrorCode.PayloadTooLarge, f"prompt exceeds {max_body_bytes} bytes")
        parsed = parse_body("/v1/completions", body)
    return InferenceRequest(
        request_id=rid,
        path=path,
        method="POST",
        headers=headers,
        body=body,
        parsed=parsed,
        subset=tuple(msg.subset) if msg.subset else None,
    )


def explanation_to_proto(e: Explanation) -> pick_pb2.Explanation:
    out = pick_pb2.Explanation(primary_profile=e.primary_profile, picked=e.picked)
    for p in e.profiles:
        pp = out.profiles.add(
            profile=p.profile,
            candidates=list(p.candidates),
            picker=p.picker,
            picked=p.picked or "",
            error=p.error or "",
        )
        for f in p.filters:
            pp.filters.add(name=f.name, type=f.type, survivors=list(f.survivors))
        for s in p.scorers:
            pp.scorers.add(name=s.name, type=s.type, weight=s.weight)
        for c in p.scores:
            cs = pp.scores.add(endpoint_name=c.endpoint, endpoint=c.address, total=c.total)
            cs.raw.update(c.raw)
            cs.weighted.update(c.weighted)
    return out


class PickService(pick_pb2_grpc.PickerServicer):
    """`epp.v1.Picker` over a routing callable (the director's `route`)."""

    def __init__(self, route: Route, *, max_body_bytes: int = MAX_BODY_BYTES,
                 health: PassiveHealth | None = None) -> None:
        self._route = route
        self._max_body = max_body_bytes
        self._health = health

    async def Pick(self, request: pick_pb2.PickRequest, context: Any) -> pick_pb2.PickResponse:
        req, decision = await self._decide(request, context, explain=False)
        return self._pick_response(req, decision)

    async def Explain(
        self, request: pick_pb2.PickRequest, context: Any
    ) -> pick_pb2.ExplainResponse:
        req, decision = await self._decide(request, context, explain=True)
        out = pick_pb2.ExplainResponse(pick=self._pick_response(req, decision))
        expl = getattr(decision, "explanation", None)
        if isinstance(expl, Explanation):
            out.explanation.CopyFrom(explanation_to_proto(expl))
        if self._health is not None:
            now = time.monotonic()
            for ej in self._health.ejected():
                out.explanation.ejected.add(endpoint_name=ej.endpoint, reason=ej.reason,
                                            cooldown_left_seconds=max(0.0, ej.until - now))
        return out

    @staticmethod
    def _pick_response(req: InferenceRequest, decision: RoutingDecisionLike) -> pick_pb2.PickResponse:
        ep = decision.endpoint
        return pick_pb2.PickResponse(
            endpoint=ep.hostport,
            endpoint_name=ep.name,
            target_model=decision.target_model,
            request_id=req.request_id,
        )

    async def _decide(
        self, request: pick_pb2.PickRequest, context: Any, explain: bool
    ) -> tuple[InferenceRequest, RoutingDecisionLike]:
        try:
            req = to_inference_request(request, self._max_body)
            return req, await self._route(req, explain)
        except EppError as e:
            log.info("pick api: %s", e.body)
            await context.abort(grpc_status(e.code), e.body)
        except Exception:
            log.exception("pick api: unexpected error")
            await context.abort(grpc.StatusCode.INTERNAL, "inference error: Internal - unexpected error")
        raise AssertionError("unreachable")  # context.abort raises


def add_to_server(server: Any, route: Route, *, max_body_bytes: int = MAX_BODY_BYTES,
                  health: PassiveHealth | None = None) -> PickService:
    """Serve `epp.v1.Picker` on a grpc.aio server (call before `server.start()`)."""
    service = PickService(route, max_body_bytes=max_body_bytes, health=health)
    pick_pb2_grpc.add_PickerServicer_to_server(service, server)
    return service
