"""Admission: the gate a request passes after its priority is known, before scheduling.

The director calls, once per request::

    lease = await admission.admit(ticket, candidates)   # may raise EppError 429/503
    ...schedule...; lease.started(endpoint.name, tokens)
    ...until the response ends, fails, or the stream goes away...
    lease.release()                 # on every exit path, cancellation included

`ticket` is the request as flow control queues it (id, priority, fairness id, size);
`candidates()` returns `(snapshot, indices or None)`: the pool and the request's
candidate endpoints (the subset hint), computed only when admission needs it.

Two implementations, chosen by the `flowControl` feature gate:

- `DefaultAdmission`: requests with priority < 0 are rejected with 429 ``system
  saturated, sheddable request dropped`` while their candidates are saturated; priority
  0 and above always pass (and cost nothing: no saturation is computed for them).
- `FlowControlAdmission`: every request waits in the flow controller's queues until the
  dispatcher releases it (see `controller.py`).

The lease is how a dispatched request signals completion: `release()` tells the saturation detector (the concurrency detector counts in-flight work) and wakes
the dispatcher so that it sees load drain without waiting for its next poll.

`admission_from_config()` builds the right one from the EndpointPickerConfig sections.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from epp.datastore import Snapshot
from epp.errors import EppError, ErrorCode
from epp.flowcontrol.controller import FlowController
from epp.flowcontrol.queues import AdmissionTicket
from epp.flowcontrol.saturation import SaturationDetector
from epp.flowcontrol.settings import FlowControlConfig, feature_enabled

SHED_MESSAGE = "system saturated, sheddable request dropped"

CandidatesFn = Callable[[], tuple[Snapshot, Sequence[int] | np.ndarray | None]]


@runtime_checkable
class Lease(Protocol):
    """An admitted request's hold on the pool, given back exactly once by its owner."""

    def started(self, endpoint: str, tokens: int = 0) -> None:
        """The request was sent to `endpoint` (its name) with about `tokens` tokens."""
        ...

    def release(self) -> None:
        """The request is over (done, failed or abandoned); idempotent."""
        ...


class AdmissionLease:
    """One admitted request's hold on the pool; `release()` is idempotent."""

    __slots__ = ("_detector", "_controller", "_endpoint", "_tokens", "_released")

    def __init__(self, detector: SaturationDetector | None,
                 controller: FlowController | None = None) -> None:
        self._detector = detector
        self._controller = controller
        self._endpoint: str | None = None
        self._tokens = 0
        self._released = False

    def started(self, endpoint: str, tokens: int = 0) -> None:
        """The request was sent to `endpoint` (its name) with about `tokens` tokens."""
        if self._released or self._endpoint is not None:
            return
        self._endpoint, self._tokens = endpoint, tokens
        if self._detector is not None:
            self._detector.request_started(endpoint, tokens)

    def release(self) -> None:
        """The request is over (done, failed or abandoned): its load drains."""
        if self._released:
            return
        self._released = True
        if self._endpoint is not None and self._detector is not None:
            self._detector.request_finished(self._endpoint, self._tokens)
        if self._controller is not None:
            self._controller.notify()

    @property
    def released(self) -> bool:
        return self._released

    def __enter__(self) -> "AdmissionLease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Admission(Protocol):
    """The gate between priority and scheduling (the director's one admission contract)."""

    async def admit(self, ticket: AdmissionTicket, candidates: CandidatesFn) -> Lease:
        """Wait until `ticket` may be scheduled, or raise `EppError` (429/503)."""
        ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...


class DefaultAdmission:
    """Shed requests with priority < 0 while their candidates are saturated."""

    def __init__(self, detector: SaturationDetector,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.detector = detector
        self.clock = clock

    async def admit(self, ticket: AdmissionTicket, candidates: CandidatesFn) -> AdmissionLease:
        if ticket.priority < 0:
            snapshot, idx = candidates()
            if self.detector.is_saturated(snapshot, idx, self.clock()):
                raise EppError(ErrorCode.ResourceExhausted, SHED_MESSAGE)
        return AdmissionLease(self.detector)

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


class FlowControlAdmission:
    """Queue every request in the flow controller until the dispatcher releases it."""

    def __init__(self, controller: FlowController, detector: SaturationDetector | None) -> None:
        self.controller = controller
        self.detector = detector
        self._state = "new"  # -> "running" -> "stopped"

    async def admit(self, ticket: AdmissionTicket, candidates: CandidatesFn) -> AdmissionLease:
        if self._state == "new":
            self.start()  # queued requests must never wait for a dispatcher nobody started
        await self.controller.enqueue_and_wait(ticket)
        return AdmissionLease(self.detector, self.controller)

    def start(self) -> None:
        """Start the dispatcher task (on the running loop); `admit()` does it if needed."""
        if self._state == "new":
            self._state = "running"
            self.controller.start()

    async def stop(self) -> None:
        """Stop the dispatcher; waiting requests get 503, later ones too."""
        self._state = "stopped"
        await self.controller.stop()


def admission_from_config(
    feature_gates: Any,
    flow_control: Mapping[str, Any] | None,
    detector: SaturationDetector,
    snapshot: Callable[[], Snapshot],
    clock: Callable[[], float] = time.monotonic,
) -> DefaultAdmission | FlowControlAdmission:
    """The admission an EndpointPickerConfig asks for: flow control if the `flowControl`
    feature gate is on (its section parsed by `FlowControlConfig.from_config`), else the
    default. `snapshot` is `Datastore.snapshot`; flow control gates on the whole pool."""
    if not feature_enabled(feature_gates):
        return DefaultAdmission(detector, clock)
    config = FlowControlConfig.from_config(flow_control)
    controller = FlowController(
        config, lambda: detector.saturation(snapshot(), None, clock()), clock)
    return FlowControlAdmission(controller, detector)
