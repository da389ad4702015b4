"""What the director tells the outside world about each routing decision.

The director calls three hooks per request: `begin` before the pipeline, `routed` or
`failed` after it, `finished` when the response ended. Everything that watches decisions
hangs off them: the scheduling-attempts counter and pick rates (every request), the
status page's ring of recent decisions and the decision log line (sampled or at debug
verbosity), and the request's trace span (when tracing samples it).

Most requests carry no `Watch` at all: `begin` returns None unless something will record
this one, so the cost with tracing off is a counter increment and a timestamp per pick.
A watched request also asks the scheduler for its explanation (per-scorer scores); that
costs tens of microseconds, which is why the status page samples (by default at most
ten decisions a second) instead of explaining every request.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from epp import observability as obs
from epp.labels import LabelFolder, safe
from epp.telemetry.records import DecisionRecord, clip, decision_record

log = logging.getLogger("epp.decisions")

_LABEL_CACHE_LIMIT = 4096
_PICK_WINDOW = 10.0  # seconds over which picks per second are averaged


@dataclass(slots=True)
class Watch:
    """One request that something records: its timestamps, and where the facts go."""

    request_id: str
    start_ns: int
    record: bool
    """Keep the decision in the status page's ring."""
    span: Any = None
    """The request's tracing span (see epp.telemetry.tracing), or None."""
    laps: list[tuple[str, int]] = field(default_factory=list)

    def lap(self, name: str) -> None:
        """A pipeline step ended now (`resolve`, `admit`, `schedule`)."""
        self.laps.append((name, time.time_ns()))


class DecisionRing:
    """The last `capacity` sampled decisions, newest last, for the status page.

    `want` samples by time (at most one decision every `interval` seconds) so that a
    busy EPP pays for explanations at a fixed rate, not per request.
    """

    def __init__(self, capacity: int = 50, interval: float = 0.1) -> None:
        self._items: deque[DecisionRecord] = deque(maxlen=capacity)
        self.interval = interval
        self._next = 0.0

    def want(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval
        return True

    def add(self, record: DecisionRecord) -> None:
        self._items.append(record)

    def recent(self) -> list[DecisionRecord]:
        """Newest first. Called on the event loop (the status page hops there)."""
        return list(reversed(self._items))


class PickRates:
    """Picks per endpoint over the last few seconds: a bounded deque of times each."""

    def __init__(self, window: float = _PICK_WINDOW, per_endpoint: int = 4096) -> None:
        self.window = window
        self._per_endpoint = per_endpoint
        self._times: dict[str, deque[float]] = {}

    def picked(self, endpoint: str, now: float) -> None:
        q = self._times.get(endpoint)
        if q is None:
            if len(self._times) >= _LABEL_CACHE_LIMIT:
                self._times.clear()
            q = self._times[endpoint] = deque(maxlen=self._per_endpoint)
        q.append(now)

    def per_second(self, now: float) -> dict[str, float]:
        since = now - self.window
        out: dict[str, float] = {}
        for name, q in self._times.items():
            while q and q[0] < since:
                q.popleft()
            out[name] = len(q) / self.window
        return out


class RequestObserver:
    """The director's one observer; see the module docstring.

    `tracer` is an `epp.telemetry.tracing.Tracer` (or None when tracing is off);
    `log_decisions` writes one log line per routing decision (debug verbosity).
    """

    def __init__(self, *, tracer: Any = None, log_decisions: bool = False,
                 ring: DecisionRing | None = None, namespace: str = "",
                 labels: LabelFolder | None = None) -> None:
        self.tracer = tracer
        self.labels = labels or LabelFolder()
        """Folds client model names into bounded metric labels (shared with the director)."""
        self.log_decisions = log_decisions
        self.ring = ring if ring is not None else DecisionRing()
        self.picks = PickRates()
        self.namespace = namespace
        self._attempts: dict[tuple[str, str, int], Any] = {}

    # -- the director's hooks ----------------------------------------------------------

    def begin(self, request_id: str, headers: Any) -> Watch | None:
        """A Watch when this request will be recorded, else None (the common case)."""
        now = time.time_ns()
        span = self.tracer.start(headers, now) if self.tracer is not None else None
        sample = self.ring.want()
        if span is None and not sample and not self.log_decisions:
            return None
        return Watch(request_id, now, sample, span)

    def routed(self, watch: Watch | None, req: Any, resolution: Any, decision: Any) -> None:
        ep = decision.endpoint
        key = (decision.target_model, ep.name, ep.port)
        counter = self._attempts.get(key)
        if counter is None:
            if len(self._attempts) >= _LABEL_CACHE_LIMIT:
                self._attempts.clear()
            counter = self._attempts[key] = obs.SCHEDULER_ATTEMPTS.labels(
                "success", self.labels.label(decision.target_model), safe(ep.name),
                self.namespace, str(ep.port))
        counter.inc()
        self.picks.picked(ep.name, time.monotonic())
        if watch is None:
            return
        rec = decision_record(watch, req, resolution, decision)
        if watch.record:
            self.ring.add(rec)
        if self.log_decisions:
            log.debug("routing decision", extra={"fields": rec.fields()})
        if watch.span is not None:
            self.tracer.routed(watch, req, rec)

    def failed(self, watch: Watch | None, req: Any, resolution: Any, error: BaseException) -> None:
        code = getattr(getattr(error, "code", None), "name", None)
        if code is not None:  # an EppError; a cancelled stream is no scheduling failure
            obs.SCHEDULER_ATTEMPTS.labels("failure", self.labels.label(resolution.target_model),
                                          "", self.namespace, "").inc()
        else:
            code = type(error).__name__
        if watch is None:
            return
        if self.log_decisions:
            log.debug("routing failed", extra={"fields": {
                "request_id": watch.request_id, "error.type": code,
                "gen_ai.request.model": clip(req.model),
                "inference.target_model": clip(resolution.target_model)}})
        if watch.span is not None:
            self.tracer.failed(watch, code, str(error))

    def finished(self, watch: Watch | None, usage: Any, status: int | None,
                 error: str | None) -> None:
        """The response ended: `status` is the model server's HTTP status when seen,
        `error` the error code it counts as (None for success)."""
        if watch is not None and watch.span is not None:
            self.tracer.finished(watch, usage, status, error)

    # -- for the status page -----------------------------------------------------------

    def recent_decisions(self) -> list[DecisionRecord]:
        return self.ring.recent()

    def picks_per_second(self) -> dict[str, float]:
        return self.picks.per_second(time.monotonic())
