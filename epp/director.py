"""The request pipeline: rewrite → objective/priority → admission → candidates → schedule.

The director is the one place that knows the order of these steps. It works on plain
dataclasses (`InferenceRequest` in, `RoutingDecision` out) so that the gRPC edges
(`server/extproc.py`, `server/pick_api.py`) stay thin and the pipeline is testable alone.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from epp import observability as obs
from epp.datastore import Datastore, Endpoint, Snapshot
from epp.errors import EppError, ErrorCode, unavailable
from epp.request import InferenceRequest, Usage, with_model
from epp.scheduling.framework import SchedulingRequest

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Resolution:
    """What the objective and rewrite rules say about one request."""

    target_model: str
    priority: int = 0
    objective: str | None = None


class Resolver(Protocol):
    def resolve(
        self, model: str, objective: str | None, rewrite_header: str | None, rand: float
    ) -> Any: ...


class Admission(Protocol):
    async def admit(self, request: InferenceRequest, priority: int, snapshot: Snapshot,
                    candidates: np.ndarray | None) -> Any: ...


class SchedulerLike(Protocol):
    def schedule(self, req: Any, snapshot: Snapshot, candidates: np.ndarray | None = None,
                 *, explain: bool = False, learn: bool = True) -> Any: ...


@dataclass(slots=True)
class RoutingDecision:
    """The director's answer for one request."""

    endpoint: Endpoint
    model: str
    """The model name the client sent (restored in the response)."""
    target_model: str
    priority: int
    body: bytes | None = None
    """The rewritten body to forward, or None when the client's body goes unchanged."""
    explanation: Any = None
    started_at: float = field(default_factory=time.monotonic)
    admission_ticket: Any = None
    inflight_key: str = ""
    """The request's key in in-flight accounting: unique even when clients reuse ids."""

    @property
    def hostport(self) -> str:
        return self.endpoint.hostport


@dataclass(slots=True)
class _ObjectiveMetrics:
    """Label children of one (model, target model, priority), looked up once."""

    total: Any
    size: Any
    running: Any
    duration: Any
    input_tokens: Any
    output_tokens: Any

    @classmethod
    def of(cls, model: str, target: str, priority: int) -> "_ObjectiveMetrics":
        return cls(
            obs.REQUEST_TOTAL.labels(model, target, str(priority)),
            obs.REQUEST_SIZES.labels(model, target),
            obs.RUNNING_REQUESTS.labels(model),
            obs.REQUEST_DURATION.labels(model, target),
            obs.INPUT_TOKENS.labels(model, target),
            obs.OUTPUT_TOKENS.labels(model, target),
        )


_METRICS_CACHE_LIMIT = 4096


class Director:
    """Runs the pipeline for each request against the datastore's current snapshot."""

    def __init__(
        self,
        datastore: Datastore,
        scheduler: SchedulerLike,
        *,
        resolver: Resolver | None = None,
        admission: Admission | None = None,
        inflight: Any = None,
        rng: random.Random | None = None,
    ) -> None:
        self.datastore = datastore
        self.scheduler = scheduler
        self.resolver = resolver
        self.admission = admission
        self.inflight = inflight
        self._rng = rng or random.Random()
        self._metrics: dict[tuple[str, str, int], _ObjectiveMetrics] = {}
        self._seq = 0

    def _metrics_for(self, model: str, target: str, priority: int) -> _ObjectiveMetrics:
        key = (model, target, priority)
        m = self._metrics.get(key)
        if m is None:
            if len(self._metrics) >= _METRICS_CACHE_LIMIT:
                self._metrics.clear()  # many distinct model names: stay bounded
            m = self._metrics[key] = _ObjectiveMetrics.of(model, target, priority)
        return m

    def resolve(self, req: InferenceRequest) -> Resolution:
        model = req.model
        if self.resolver is None:
            return Resolution(req.model_rewrite or model, 0, req.objective)
        r = self.resolver.resolve(model, req.objective, req.model_rewrite, self._rng.random())
        return Resolution(r.target_model, int(r.priority), getattr(r, "objective_name", None))

    def candidates(self, req: InferenceRequest, snapshot: Snapshot) -> np.ndarray | None:
        """Indices allowed by the gateway's subset hint; None (the whole pool) without one."""
        if req.subset is None:
            return None
        idx = [snapshot.by_hostport[h] for h in req.subset if h in snapshot.by_hostport]
        if not idx:
            raise unavailable("no endpoints match the subset hint" if req.subset
                              else "subset hint is empty")
        return np.asarray(sorted(set(idx)), dtype=np.intp)

    async def route(self, req: InferenceRequest, explain: bool = False) -> RoutingDecision:
        """Choose an endpoint for `req`, or raise `EppError`.

        Whatever ends this early (an error, or the stream being cancelled while queued)
        gives the admission lease back; after a successful return the lease travels with
        the decision until `finished`.
        """
        res = self.resolve(req)
        model = req.model
        metrics = self._metrics_for(model, res.target_model, res.priority)
        metrics.total.inc()
        ticket = None
        try:
            snapshot = self.datastore.snapshot()
            if len(snapshot) == 0:
                raise unavailable("no endpoints in the pool")
            cands = self.candidates(req, snapshot)
            if self.admission is not None:
                ticket = await self.admission.admit(req, res.priority, snapshot, cands)
                latest = self.datastore.snapshot()
                if latest is not snapshot:  # it waited in a queue while the pool changed
                    snapshot, cands = latest, self.candidates(req, latest)
            t0 = time.perf_counter()
            result = self.scheduler.schedule(
                SchedulingRequest.from_inference(req, res.target_model, res.priority),
                snapshot, cands, explain=explain)
            obs.SCHEDULER_E2E_DURATION.observe(time.perf_counter() - t0)
            body = None
            if req.parsed is not None and res.target_model != model:
                body = with_model(req.parsed, res.target_model)
            if ticket is not None and hasattr(ticket, "started"):
                ticket.started(result.endpoint.name, _token_estimate(req))
        except BaseException as e:
            _release(ticket)
            if isinstance(e, EppError):
                obs.REQUEST_ERROR_TOTAL.labels(model, res.target_model, e.code.name).inc()
            raise
        decision = RoutingDecision(
            endpoint=result.endpoint,
            model=model,
            target_model=res.target_model,
            priority=res.priority,
            body=body,
            explanation=getattr(result, "explanation", None),
            admission_ticket=ticket,
        )
        if self.inflight is not None:
            self._seq += 1
            decision.inflight_key = f"{req.request_id}#{self._seq}"
            self.inflight.started(decision.inflight_key, result.endpoint.name, time.monotonic())
        metrics.running.inc()
        if req.parsed is not None:
            metrics.size.observe(len(req.body))
        return decision

    async def route_detached(self, req: InferenceRequest) -> RoutingDecision:
        """A pick for a gateway that never reports back (the Pick API).

        Nothing stays held: the admission lease and the running-requests gauge are given
        back at once. The in-flight record stays until the endpoint's next scrape covers
        it, so a burst of picks still spreads out.
        """
        decision = await self.route(req)
        _release(decision.admission_ticket)
        self._metrics_for(decision.model, decision.target_model, decision.priority).running.dec()
        return decision

    def explain(self, req: InferenceRequest) -> RoutingDecision:
        """A dry run with the explanation: what would be picked now, and why.

        No admission, no in-flight record, no learning: asking does not change the answer.
        """
        res = self.resolve(req)
        snapshot = self.datastore.snapshot()
        if len(snapshot) == 0:
            raise unavailable("no endpoints in the pool")
        result = self.scheduler.schedule(
            SchedulingRequest.from_inference(req, res.target_model, res.priority), snapshot, self.candidates(req, snapshot),
            explain=True, learn=False,
        )
        return RoutingDecision(endpoint=result.endpoint, model=req.model,
                               target_model=res.target_model, priority=res.priority,
                               explanation=getattr(result, "explanation", None))

    def finished(self, req: InferenceRequest, decision: RoutingDecision,
                 usage: Usage | None, error_code: ErrorCode | None = None,
                 detached: bool = False) -> None:
        """Called once per routed request when its response ended or its stream closed.

        `detached`: the end of the request was not seen (no response came through the
        EPP); its in-flight record then stays until the endpoint's next scrape covers it.
        """
        if self.inflight is not None and not detached:
            self.inflight.finished(decision.inflight_key)
        _release(decision.admission_ticket)
        m, t = decision.model, decision.target_model
        metrics = self._metrics_for(m, t, decision.priority)
        metrics.running.dec()
        metrics.duration.observe(time.monotonic() - decision.started_at)
        if usage is not None:
            metrics.input_tokens.observe(usage.prompt_tokens)
            metrics.output_tokens.observe(usage.completion_tokens)
        if error_code is not None:
            obs.REQUEST_ERROR_TOTAL.labels(m, t, error_code.name).inc()


def _token_estimate(req: InferenceRequest) -> int:
    """Prompt tokens plus the requested output, at ~4 characters a token: what the
    concurrency detector's token mode counts (no tokenizer on the request path)."""
    if req.parsed is None:
        return 0
    max_tokens = req.parsed.data.get("max_tokens") or req.parsed.data.get("max_completion_tokens")
    out = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 0
    return len(req.parsed.prompt_text) // 4 + out


def _release(ticket: Any) -> None:
    """Give an admission lease back; never lets bookkeeping break the stream."""
    if ticket is None or not hasattr(ticket, "done"):
        return
    try:
        ticket.done()
    except Exception:
        log.exception("admission lease release failed")
