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
                    candidates: np.ndarray) -> Any: ...


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

    @property
    def hostport(self) -> str:
        return self.endpoint.hostport


class LeastRecentlyPicked:
    """Stand-in scheduler: rotate through candidates, least recently picked first.

    Used only when no load-aware scheduler is configured; it ignores metrics.
    """

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._tick = 0.0

    def schedule(self, req: Any, snapshot: Snapshot, candidates: np.ndarray | None = None,
                 *, explain: bool = False, learn: bool = True) -> Any:
        idx = range(len(snapshot)) if candidates is None else candidates.tolist()
        best = min(idx, key=lambda i: self._last.get(snapshot.endpoints[i].name, -1.0),
                   default=None)
        if best is None:
            raise unavailable("no endpoints available")
        if learn:
            self._tick += 1
            self._last[snapshot.endpoints[best].name] = self._tick
        return _PlainResult(snapshot.endpoints[best], best)


@dataclass(slots=True)
class _PlainResult:
    endpoint: Endpoint
    index: int
    explanation: Any = None


class Director:
    """Runs the pipeline for each request against the datastore's current snapshot."""

    def __init__(
        self,
        datastore: Datastore,
        scheduler: SchedulerLike | None = None,
        *,
        resolver: Resolver | None = None,
        admission: Admission | None = None,
        inflight: Any = None,
        make_scheduling_request: Any = None,
        rng: random.Random | None = None,
    ) -> None:
        self.datastore = datastore
        self.scheduler = scheduler or LeastRecentlyPicked()
        self.resolver = resolver
        self.admission = admission
        self.inflight = inflight
        self._make_req = make_scheduling_request or (lambda req, res: req)
        self._rng = rng or random.Random()

    def resolve(self, req: InferenceRequest) -> Resolution:
        model = req.model
        if self.resolver is None:
            return Resolution(req.model_rewrite or model, 0, req.objective)
        r = self.resolver.resolve(model, req.objective, req.model_rewrite, self._rng.random())
        return Resolution(r.target_model, int(r.priority), getattr(r, "objective_name", None))

    def candidates(self, req: InferenceRequest, snapshot: Snapshot) -> np.ndarray:
        """Indices allowed by the gateway's subset hint (all when there is none)."""
        if req.subset is None:
            return np.arange(len(snapshot), dtype=np.intp)
        idx = [snapshot.by_hostport[h] for h in req.subset if h in snapshot.by_hostport]
        if not idx:
            raise unavailable("no endpoints match the subset hint" if req.subset
                              else "subset hint is empty")
        return np.asarray(sorted(set(idx)), dtype=np.intp)

    async def route(self, req: InferenceRequest, explain: bool = False) -> RoutingDecision:
        """Choose an endpoint for `req`, or raise `EppError`."""
        res = self.resolve(req)
        model = req.model
        obs.REQUEST_TOTAL.labels(model, res.target_model, str(res.priority)).inc()
        try:
            snapshot = self.datastore.snapshot()
            if len(snapshot) == 0:
                raise unavailable("no endpoints in the pool")
            cands = self.candidates(req, snapshot)
            ticket = None
            if self.admission is not None:
                ticket = await self.admission.admit(req, res.priority, snapshot, cands)
            try:
                if ticket is not None:
                    snapshot = self.datastore.snapshot()  # may have waited in a queue
                    cands = self.candidates(req, snapshot)
                t0 = time.perf_counter()
                result = self.scheduler.schedule(
                    self._make_req(req, res), snapshot, cands, explain=explain
                )
                obs.SCHEDULER_E2E_DURATION.observe(time.perf_counter() - t0)
            except BaseException:
                _release(ticket)  # scheduling failed or the stream went away
                raise
            if ticket is not None and hasattr(ticket, "started"):
                ticket.started(result.endpoint.name, 0)
        except EppError as e:
            obs.REQUEST_ERROR_TOTAL.labels(model, res.target_model, e.code.name).inc()
            raise
        body = None
        if req.parsed is not None and res.target_model != model:
            body = with_model(req.parsed, res.target_model)
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
            self.inflight.started(req.request_id, result.endpoint.name, time.monotonic())
        obs.RUNNING_REQUESTS.labels(model).inc()
        if req.parsed is not None:
            obs.REQUEST_SIZES.labels(model, res.target_model).observe(len(req.body))
        return decision

    async def route_detached(self, req: InferenceRequest) -> RoutingDecision:
        """A pick for a gateway that never reports back (the Pick API).

        Nothing stays held: the admission lease and the running-requests gauge are given
        back at once. The in-flight record stays until the endpoint's next scrape covers
        it, so a burst of picks still spreads out.
        """
        decision = await self.route(req)
        _release(decision.admission_ticket)
        obs.RUNNING_REQUESTS.labels(decision.model).dec()
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
            self._make_req(req, res), snapshot, self.candidates(req, snapshot),
            explain=True, learn=False,
        )
        return RoutingDecision(endpoint=result.endpoint, model=req.model,
                               target_model=res.target_model, priority=res.priority,
                               explanation=getattr(result, "explanation", None))

    def finished(self, req: InferenceRequest, decision: RoutingDecision,
                 usage: Usage | None, error_code: ErrorCode | None = None) -> None:
        """Called once per routed request when its response ended or its stream closed."""
        if self.inflight is not None:
            self.inflight.finished(req.request_id)
        _release(decision.admission_ticket)
        m, t = decision.model, decision.target_model
        obs.RUNNING_REQUESTS.labels(m).dec()
        obs.REQUEST_DURATION.labels(m, t).observe(time.monotonic() - decision.started_at)
        if usage is not None:
            obs.INPUT_TOKENS.labels(m, t).observe(usage.prompt_tokens)
            obs.OUTPUT_TOKENS.labels(m, t).observe(usage.completion_tokens)
        if error_code is not None:
            obs.REQUEST_ERROR_TOTAL.labels(m, t, error_code.name).inc()


def _release(ticket: Any) -> None:
    """Give an admission lease back; never lets bookkeeping break the stream."""
    if ticket is None or not hasattr(ticket, "done"):
        return
    try:
        ticket.done()
    except Exception:
        log.exception("admission lease release failed")
