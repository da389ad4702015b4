"""The scheduler: pick an endpoint, then let post-pick plugins learn.

`Scheduler.schedule` runs one cycle over a datastore snapshot: the profile handler picks
profiles, each runs (`Profile.run`), and the handler names the primary result. It owns the
learned state of its plugins (the approximate prefix index) and nothing else: in-flight
accounting, admission leases and request metrics belong to the director
(`epp.director`), which hands the scheduler a read-only view of in-flight load.

The cycle is synchronous and does no I/O: it runs on the event loop thread.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from epp.datastore import Endpoint, Snapshot, departed
from epp.errors import ErrorCode, EppError
from epp.observability import SCHEDULER_E2E_DURATION
from epp.scheduling.cycle import CycleState, Derived
from epp.scheduling.inflight import InFlightTracker
from epp.scheduling.interface import (
    EndpointForgetter,
    Explanation,
    PostPick,
    PrepareData,
    ProfileHandler,
    ProfileResult,
    SchedulingRequest,
    SchedulingResult,
)
from epp.scheduling.profile import Profile, checked_handler

if TYPE_CHECKING:
    from epp.config import EppConfig
    from epp.datastore import Datastore


class Scheduler:
    """Runs scheduling cycles over datastore snapshots; built from an `EppConfig`.

    `inflight` is read, never written: requests routed since an endpoint's last scrape
    count as waiting there (the director records them).
    """

    def __init__(
        self,
        profiles: Mapping[str, Profile] | Sequence[Profile],
        handler: ProfileHandler | None = None,
        *,
        inflight: InFlightTracker | None = None,
        plugin_metrics_every: int = 1,
    ) -> None:
        if not isinstance(profiles, Mapping):
            profiles = {p.name: p for p in profiles}
        if not profiles:
            raise ValueError("a scheduler needs at least one profile")
        self.profiles: dict[str, Profile] = dict(profiles)
        self.handler: ProfileHandler = checked_handler(self.profiles, handler)
        self.inflight = inflight
        self.plugin_metrics_every = max(1, int(plugin_metrics_every))
        self._cycle = 0
        self._derived: Derived | None = None
        learners = _with_producers([p for prof in self.profiles.values() for p in prof.plugins()])
        self._post_pick: dict[str, list[PostPick]] = {
            name: [p for p in _with_producers(prof.plugins()) if isinstance(p, PostPick)]
            for name, prof in self.profiles.items()
        }
        self._forgetters = [p for p in learners if isinstance(p, EndpointForgetter)]
        self._preparers = [p for p in learners if isinstance(p, PrepareData)]

    @classmethod
    def from_config(cls, config: EppConfig, **kwargs: Any) -> "Scheduler":
        """The scheduler an `epp.config.EppConfig` describes (kwargs as for `__init__`)."""
        return cls(config.profiles, config.profile_handler, **kwargs)

    # -- pool membership -----------------------------------------------------------

    def attach(self, datastore: Datastore) -> None:
        """Forget learned state of endpoints that leave `datastore`'s pool."""
        datastore.add_listener(self.on_endpoints_changed)

    def on_endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        """Datastore listener: an endpoint removed (not merely relabelled) is forgotten."""
        for name in departed(added, removed):
            for p in self._forgetters:
                p.forget_endpoint(name)

    # -- the cycle -----------------------------------------------------------------

    async def prepare(self, req: SchedulingRequest) -> None:
        """Let plugins compute request data the cycle needs and that may take a while
        (tokenizing), before the synchronous cycle; a dry run may skip this."""
        for p in self._preparers:
            await p.prepare_request_data(req)

    def derived(self, snapshot: Snapshot) -> Derived:
        d = self._derived
        # Keyed by identity: the datastore hands out one object per version.
        if d is None or d.snapshot is not snapshot:
            if d is not None:
                d.prev = None  # keep one generation only
            d = self._derived = Derived(snapshot, d)
            for p in self._forgetters:
                prune = getattr(p, "prune", None)
                if prune is not None:
                    prune(snapshot)
        return d

    def schedule(
        self,
        req: SchedulingRequest,
        snapshot: Snapshot,
        candidates: np.ndarray | Sequence[int] | None = None,
        *,
        explain: bool = False,
        now: float | None = None,
        learn: bool = True,
    ) -> SchedulingResult:
        """Choose an endpoint for `req` among `candidates` (snapshot indices; None = all).

        `learn=False` is a dry run: post-pick plugins learn nothing. Raises
        `EppError(ServiceUnavailable)` when no candidate remains.
        """
        t_start = time.perf_counter()
        if now is None:
            now = time.monotonic()
        derived = self.derived(snapshot)
        if candidates is None:
            cand = derived.all
        else:
            cand = np.asarray(candidates, dtype=np.int64)
            if len(cand) == derived.n and np.array_equal(cand, derived.all):
                cand = derived.all  # the whole pool: plugins then skip their fancy indexing
            elif cand.ndim != 1 or (len(cand) and (cand.min() < 0 or cand.max() >= derived.n)):
                raise EppError(ErrorCode.Internal, "candidate indices out of the snapshot's range")
        if len(cand) == 0:
            raise EppError(ErrorCode.ServiceUnavailable, "no candidate endpoints in the pool")
        state = CycleState(derived, req, now, self.inflight)
        self._cycle += 1
        timed = self._cycle % self.plugin_metrics_every == 0

        results: dict[str, ProfileResult] = {}
        handler = self.handler
        while True:
            todo = handler.pick_profiles(req, self.profiles, results)
            if not todo:
                break
            for prof in todo:
                results[prof.name] = prof.run(state, cand, explain, timed)
        if not results:
            raise EppError(ErrorCode.Internal, "the profile handler ran no profile")
        primary = handler.process_results(req, results)
        res = results.get(primary)
        if res is None or not res.indices:
            msg = res.error if res is not None and res.error else f"profile {primary!r} chose nothing"
            raise EppError(ErrorCode.ServiceUnavailable, msg)
        index = res.indices[0]
        if learn:
            for p in self._post_pick.get(primary, ()):
                p.post_pick(state, index)

        explanation = None
        if explain:
            explanation = Explanation(
                primary_profile=primary,
                profiles=tuple(r.explanation for r in results.values() if r.explanation is not None),
                picked=snapshot.endpoints[index].name,
            )
        else:
            SCHEDULER_E2E_DURATION.observe(time.perf_counter() - t_start)
        return SchedulingResult(
            endpoint=snapshot.endpoints[index],
            index=index,
            profile=primary,
            fallbacks=tuple(snapshot.endpoints[i] for i in res.indices[1:]),
            profile_results=results,
            explanation=explanation,
        )

    def learn_served(self, req: SchedulingRequest, result: SchedulingResult, served: str) -> None:
        """The data plane sent the request to `served` (an endpoint's ip:port) instead of
        the pick: post-pick plugins learn that endpoint too (its cache now holds the
        prompt). Unknown or unchanged endpoints are ignored."""
        snapshot = self._derived.snapshot if self._derived is not None else None
        if snapshot is None:
            return
        index = snapshot.by_hostport.get(served)
        if index is None or snapshot.endpoints[index].name == result.endpoint.name:
            return
        state = CycleState(self.derived(snapshot), req, time.monotonic(), self.inflight)
        for p in self._post_pick.get(result.profile, ()):
            p.post_pick(state, index)


def _with_producers(plugins: list[Any]) -> list[Any]:
    """Plugins plus the state producers they read (a filter's prefix index), each once."""
    out: list[Any] = []
    seen: set[int] = set()
    for p in plugins:
        for x in (p, getattr(p, "producer", None)):
            if x is not None and id(x) not in seen:
                seen.add(id(x))
                out.append(x)
    return out
