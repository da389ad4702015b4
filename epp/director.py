"""The request pipeline: rewrite → objective/priority → candidates → admission → schedule.

The director is the one place that knows the order of these steps, and the one owner of
what a request holds while it runs: its admission lease, its in-flight record (which the
scheduler reads as load) and its request metrics. It works on plain dataclasses
(`InferenceRequest` in, `RoutingDecision` out) so that the gRPC edges
(`server/extproc.py`, `server/pick_api.py`) stay thin and the pipeline is testable alone.
See docs/architecture.md.
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
from epp.errors import EppError, unavailable
from epp.flowcontrol.admission import Admission, Lease
from epp.flowcontrol.queues import AdmissionTicket
from epp.labels import LabelFolder
from epp.objectives import Resolution
from epp.passivehealth import PassiveHealth
from epp.request import InferenceRequest, Usage, with_model
from epp.scheduling.inflight import InFlightTracker
from epp.scheduling.interface import Explanation, SchedulingRequest, SchedulingResult

log = logging.getLogger(__name__)


class Resolver(Protocol):
    """Objectives and rewrite rules (`epp.objectives.ObjectiveStore`)."""

    def resolve(
        self, model: str, objective: str | None, rewrite_header: str | None, rand: float
    ) -> Resolution: ...


class Picks(Protocol):
    """The scheduler as the director uses it (`epp.scheduling.Scheduler`)."""

    def schedule(self, req: SchedulingRequest, snapshot: Snapshot,
                 candidates: np.ndarray | None = None, *, explain: bool = False,
                 learn: bool = True) -> SchedulingResult: ...

    def learn_served(self, req: SchedulingRequest, result: SchedulingResult, served: str) -> None: ...


@dataclass(slots=True)
class RoutingDecision:
    """The director's answer for one request."""

    endpoint: Endpoint
    model: str
    """The model name the client sent (restored in the response)."""
    target_model: str
    priority: int
    fallbacks: tuple[Endpoint, ...] = ()
    """Further endpoints, best first, for a data plane that retries elsewhere."""
    body: bytes | None = None
    """The rewritten body to forward, or None when the client's body goes unchanged."""
    explanation: Explanation | None = None
    started_at: float = field(default_factory=time.monotonic)
    lease: Lease | None = None
    inflight_key: str = ""
    """The request's key in in-flight accounting: unique even when clients reuse ids."""
    scheduled: tuple[SchedulingRequest, SchedulingResult] | None = None
    """What the scheduler saw and chose, for learning the endpoint that really served."""
    served: str = ""
    """ip:port of the endpoint the data plane reports having used, when it differs."""
    watch: Any = None
    """The observer's record of this request (epp.telemetry), when it keeps one."""

    @property
    def hostport(self) -> str:
        return self.endpoint.hostport

    @property
    def destination(self) -> str:
        """The protocol's destination value: `ip:port[,ip:port...]`, primary first."""
        if not self.fallbacks:
            return self.endpoint.hostport
        return ",".join([self.endpoint.hostport, *(e.hostport for e in self.fallbacks)])


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
    def of(cls, model: str, target: str, priority: int, labels: LabelFolder) -> "_ObjectiveMetrics":
        model, target = labels.label(model), labels.label(target)
        return cls(
            obs.REQUEST_TOTAL.labels(model, target, str(priority)),
            obs.REQUEST_SIZES.labels(model, target),
            obs.RUNNING_REQUESTS.labels(model),
            obs.REQUEST_DURATION.labels(model, target),
            obs.INPUT_TOKENS.labels(model, target),
            obs.OUTPUT_TOKENS.labels(model, target),
        )


_METRICS_CACHE_LIMIT = 4096


def model_server_error(status: int | None) -> str | None:
    """The error code a model server's response status counts as, or None for success."""
    if status is None or status < 400:
        return None
    return "ModelServer5xx" if status >= 500 else "ModelServer4xx"


class Director:
    """Runs the pipeline for each request against the datastore's current snapshot."""

    def __init__(
        self,
        datastore: Datastore,
        scheduler: Picks,
        *,
        resolver: Resolver | None = None,
        admission: Admission | None = None,
        inflight: InFlightTracker | None = None,
        rng: random.Random | None = None,
        labels: LabelFolder | None = None,
        health: PassiveHealth | None = None,
        observer: Any = None,
    ) -> None:
        self.datastore = datastore
        self.scheduler = scheduler
        self.resolver = resolver
        self.admission = admission
        self.inflight = inflight
        self.observer = observer
        """An epp.telemetry.RequestObserver: metrics, traces and logs of each decision."""
        self._rng = rng or random.Random()
        self.labels = labels or LabelFolder()
        self.health = health
        self._metrics: dict[tuple[str, str, int], _ObjectiveMetrics] = {}
        self._seq = 0

    def _metrics_for(self, model: str, target: str, priority: int) -> _ObjectiveMetrics:
        key = (model, target, priority)
        m = self._metrics.get(key)
        if m is None:
            if len(self._metrics) >= _METRICS_CACHE_LIMIT:
                self._metrics.clear()  # many distinct model names: stay bounded
            m = self._metrics[key] = _ObjectiveMetrics.of(model, target, priority, self.labels)
        return m

    def resolve(self, req: InferenceRequest) -> Resolution:
        if self.resolver is None:
            return Resolution(req.model_rewrite or req.model, 0, req.objective)
        return self.resolver.resolve(req.model, req.objective, req.model_rewrite, self._rng.random())

    def candidates(self, req: InferenceRequest, snapshot: Snapshot) -> np.ndarray | None:
        """Indices allowed by the gateway's subset hint and passive health; None (the
        whole pool) without either."""
        if req.subset is None:
            return self.health.filter(snapshot, None) if self.health else None
        idx = [snapshot.by_hostport[h] for h in req.subset if h in snapshot.by_hostport]
        if not idx:
            raise unavailable("no endpoints match the subset hint" if req.subset
                              else "subset hint is empty")
        cands = np.asarray(sorted(set(idx)), dtype=np.intp)
        return self.health.filter(snapshot, cands) if self.health else cands

    async def route(self, req: InferenceRequest, explain: bool = False) -> RoutingDecision:
        """Choose an endpoint for `req`, or raise `EppError`.

        Whatever ends this early (an error, or the stream being cancelled while queued)
        gives the admission lease back; after a successful return the lease travels with
        the decision until `finished`.
        """
        watch = self.observer.begin(req.request_id, req.headers) if self.observer else None
        res = self.resolve(req)
        model = req.model
        metrics = self._metrics_for(model, res.target_model, res.priority)
        metrics.total.inc()
        lease: Lease | None = None
        try:
            if watch is not None:
                watch.lap("resolve")
            snapshot = self.datastore.snapshot()
            if len(snapshot) == 0:
                raise unavailable("no endpoints in the pool")
            cands = self.candidates(req, snapshot)
            if self.admission is not None:
                lease = await self._admit(req, res.priority, snapshot, cands)
                latest = self.datastore.snapshot()
                if latest is not snapshot:  # it waited in a queue while the pool changed
                    snapshot, cands = latest, self.candidates(req, latest)
                if watch is not None:
                    watch.lap("admit")
            sreq = self._scheduling_request(req, res)
            prepare = getattr(self.scheduler, "prepare", None)
            if prepare is not None:
                await prepare(sreq)
            result = self.scheduler.schedule(sreq, snapshot, cands, explain=explain or watch is not None)
            if watch is not None:
                watch.lap("schedule")
            body = None
            if req.parsed is not None and res.target_model != model:
                body = with_model(req.parsed, res.target_model)
            if lease is not None:
                lease.started(result.endpoint.name,
                              req.parsed.token_estimate() if req.parsed is not None else 0)
        except BaseException as e:
            _release(lease)
            if isinstance(e, EppError):
                self._count_error(model, res.target_model, e.code.name)
            if self.observer is not None:
                self.observer.failed(watch, req, res, e)
            raise
        decision = RoutingDecision(
            endpoint=result.endpoint,
            model=model,
            target_model=res.target_model,
            priority=res.priority,
            fallbacks=result.fallbacks,
            body=body,
            explanation=result.explanation,
            lease=lease,
            scheduled=(sreq, result),
            watch=watch,
        )
        if self.observer is not None:
            self.observer.routed(watch, req, res, decision)
        if self.inflight is not None:
            self._seq += 1
            decision.inflight_key = f"{req.request_id}#{self._seq}"
            self.inflight.started(decision.inflight_key, result.endpoint.name, time.monotonic())
        metrics.running.inc()
        if req.parsed is not None:
            metrics.size.observe(len(req.body))
        return decision

    async def _admit(self, req: InferenceRequest, priority: int, snapshot: Snapshot,
                     cands: np.ndarray | None) -> Lease:
        assert self.admission is not None
        ticket = AdmissionTicket(req.request_id, priority, req.fairness_id, len(req.body))
        # Candidates covering the whole pool go as None: the detector's cached
        # whole-pool reading then applies.
        whole = cands is None or len(cands) == len(snapshot)
        return await self.admission.admit(ticket, lambda: (snapshot, None if whole else cands))

    @staticmethod
    def _scheduling_request(req: InferenceRequest, res: Resolution) -> SchedulingRequest:
        parsed = req.parsed
        return SchedulingRequest(
            request_id=req.request_id,
            target_model=res.target_model,
            headers=req.headers,
            priority=res.priority,
            prompt_source=(lambda: parsed.prompt_text) if parsed is not None else None,
            api=parsed.api.value if parsed is not None else "",
            body=parsed.data if parsed is not None else None,
        )

    async def route_detached(self, req: InferenceRequest) -> RoutingDecision:
        """A pick for a gateway that never reports back (the Pick API).

        Nothing stays held: the admission lease and the running-requests gauge are given
        back at once. The in-flight record stays until the endpoint's next scrape covers
        it, so a burst of picks still spreads out.
        """
        decision = await self.route(req)
        _release(decision.lease)
        if self.observer is not None:
            self.observer.finished(decision.watch, None, None, None)
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
            self._scheduling_request(req, res), snapshot, self.candidates(req, snapshot),
            explain=True, learn=False,
        )
        return RoutingDecision(endpoint=result.endpoint, model=req.model,
                               target_model=res.target_model, priority=res.priority,
                               fallbacks=result.fallbacks, explanation=result.explanation)

    def served(self, decision: RoutingDecision, hostport: str) -> None:
        """The data plane reports that `hostport` served the request (a fallback, say):
        in-flight load and prefix learning move there."""
        if not hostport or hostport == decision.hostport or hostport == decision.served:
            return
        snapshot = self.datastore.snapshot()
        index = snapshot.by_hostport.get(hostport)
        if index is None:
            log.debug("served endpoint %s is not in the pool", hostport)
            return
        decision.served = hostport
        if self.inflight is not None and decision.inflight_key:
            self.inflight.started(decision.inflight_key, snapshot.endpoints[index].name,
                                  time.monotonic())
        if decision.scheduled is not None:
            self.scheduler.learn_served(*decision.scheduled, hostport)

    def response_status(self, decision: RoutingDecision, status: int | None) -> None:
        """The response's status as the gateway saw it, at its headers (passive health)."""
        if self.health is None or status is None:
            return
        name = decision.endpoint.name
        if decision.served:
            snapshot = self.datastore.snapshot()
            index = snapshot.by_hostport.get(decision.served)
            if index is not None:
                name = snapshot.endpoints[index].name
        self.health.response(name, status)

    def _count_error(self, model: str, target: str, code: str) -> None:
        obs.REQUEST_ERROR_TOTAL.labels(self.labels.label(model), self.labels.label(target),
                                       code).inc()

    def finished(self, decision: RoutingDecision, usage: Usage | None = None, *,
                 status: int | None = None, detached: bool = False) -> None:
        """Called once per routed request when its response ended or its stream closed.

        `status` is the model server's HTTP status, when seen: 4xx/5xx count as errors
        (`inference_objective_request_error_total`) and never as a completed request.
        `detached`: the end of the request was not seen (no response came through the
        EPP); its in-flight record then stays until the endpoint's next scrape covers it.
        """
        if self.inflight is not None and not detached:
            self.inflight.finished(decision.inflight_key)
        _release(decision.lease)
        m, t = decision.model, decision.target_model
        metrics = self._metrics_for(m, t, decision.priority)
        metrics.running.dec()
        error = model_server_error(status)
        if self.observer is not None:
            self.observer.finished(decision.watch, usage, status, error)
        if error is not None:
            self._count_error(m, t, error)
            log.debug("model server %s answered %s for model %r",
                      decision.served or decision.hostport, status, t)
            return
        metrics.duration.observe(time.monotonic() - decision.started_at)
        if usage is not None:
            metrics.input_tokens.observe(usage.prompt_tokens)
            metrics.output_tokens.observe(usage.completion_tokens)


def _release(lease: Lease | None) -> None:
    """Give an admission lease back; never lets bookkeeping break the stream."""
    if lease is None:
        return
    try:
        lease.release()
    except Exception:
        log.exception("admission lease release failed")
