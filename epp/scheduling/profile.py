"""A scheduling profile (filters in order -> weighted scorers -> picker), and the
single-profile handler, the upstream default.

Scores are clamped to [0, 1] (unless the scorer is `bounded`) and the total is the sum
of weight x score. Whoever builds a profile supplies its picker: the config loader gives
`max-score-picker` to a profile that names none.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from epp.observability import PLUGIN_DURATION
from epp.plugins import NoParams, plugin_type
from epp.scheduling.cycle import CycleState
from epp.scheduling.interface import (
    CandidateScore,
    Filter,
    FilterStep,
    Picker,
    ProfileExplanation,
    ProfileResult,
    Scorer,
    ScorerInfo,
    SchedulingRequest,
)


def timed(point: str, plugin: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` observing its duration in the plugin-duration histogram (child bound once:
    a label lookup per call would cost more than most plugins)."""
    observe = PLUGIN_DURATION.labels(point, plugin_type(plugin), plugin.name).observe
    clock = time.perf_counter

    def call(*args: Any) -> Any:
        t0 = clock()
        out = fn(*args)
        observe(clock() - t0)
        return out

    return call


class _Calls:
    """A profile's plugin entry points, plain or timed."""

    __slots__ = ("filters", "scorers", "pick")

    def __init__(self, profile: "Profile", timing: bool) -> None:
        def wrap(point: str, plugin: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
            return timed(point, plugin, fn) if timing else fn

        self.filters = tuple(wrap("Filter", f, f.filter) for f in profile.filters)
        self.scorers = tuple(wrap("Scorer", s, s.score) for s, _ in profile.scorers)
        self.pick = wrap("Picker", profile.picker, profile.picker.pick)


class Profile:
    """A named pipeline: filters in order, weighted scorers, one picker."""

    def __init__(
        self,
        name: str,
        filters: Sequence[Filter] = (),
        scorers: Sequence[tuple[Scorer, float]] = (),
        *,
        picker: Picker,
    ) -> None:
        for s, w in scorers:
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"profile {name!r}: weight of scorer {s.name!r} must be >= 0")
        self.name = name
        self.filters = tuple(filters)
        self.scorers = tuple((s, float(w)) for s, w in scorers)
        self.picker = picker
        # Built-in scorers promise [0, 1] and skip the clamp.
        self._clamp = tuple(not getattr(s, "bounded", False) for s, _ in self.scorers)
        self._plain = _Calls(self, timing=False)
        self._timed = _Calls(self, timing=True)

    def plugins(self) -> list[Any]:
        return [*self.filters, *(s for s, _ in self.scorers), self.picker]

    def run(
        self, state: CycleState, candidates: np.ndarray, explain: bool = False, timed: bool = True
    ) -> ProfileResult:
        calls = self._timed if timed else self._plain
        eps = state.snapshot.endpoints
        cand = candidates
        steps: list[FilterStep] = []
        for f, call in zip(self.filters, calls.filters):
            cand = call(state, cand)
            if explain:
                steps.append(FilterStep(f.name, plugin_type(f), tuple(eps[i].name for i in cand.tolist())))
            if len(cand) == 0:
                err = f"no candidate endpoint left after filter {f.name!r} in profile {self.name!r}"
                expl = self._explain(state, candidates, steps, cand, {}, None, None, err) if explain else None
                return ProfileResult(self.name, (), err, expl)

        totals: np.ndarray | None = None
        raw: dict[str, np.ndarray] = {}
        for (s, w), call, clamp in zip(self.scorers, calls.scorers, self._clamp):
            sc = call(state, cand)
            if clamp:
                sc = np.clip(np.nan_to_num(np.asarray(sc, np.float64), nan=0.0), 0.0, 1.0)
            if explain:
                raw[s.name] = sc
            if w == 0.0:
                continue
            if totals is None:
                totals = sc * w  # a new array: safe to add into
            else:
                totals += sc * w
        if totals is None:
            totals = np.zeros(len(cand))
        order = calls.pick(state, cand, totals)
        indices = tuple(cand[order].tolist())
        expl = self._explain(state, candidates, steps, cand, raw, totals, indices[0], None) if explain else None
        return ProfileResult(self.name, indices, None, expl)

    def _explain(
        self,
        state: CycleState,
        into: np.ndarray,
        steps: list[FilterStep],
        cand: np.ndarray,
        raw: dict[str, np.ndarray],
        totals: np.ndarray | None,
        picked: int | None,
        error: str | None,
    ) -> ProfileExplanation:
        eps = state.snapshot.endpoints
        scores: list[CandidateScore] = []
        if totals is not None:
            for pos, i in enumerate(cand.tolist()):
                r = {k: float(v[pos]) for k, v in raw.items()}
                wt = {s.name: float(raw[s.name][pos]) * w for s, w in self.scorers}
                scores.append(CandidateScore(eps[i].name, eps[i].hostport, r, wt, float(totals[pos])))
        return ProfileExplanation(
            profile=self.name,
            candidates=tuple(eps[i].name for i in into.tolist()),
            filters=tuple(steps),
            scorers=tuple(ScorerInfo(s.name, plugin_type(s), w) for s, w in self.scorers),
            scores=tuple(scores),
            picker=self.picker.name,
            picked=eps[picked].name if picked is not None else None,
            error=error,
        )


class SingleProfileHandler(NoParams):
    """Runs the one profile once; its result is primary (the upstream default)."""

    plugin_type = "single-profile-handler"

    def check_profiles(self, profiles: Mapping[str, Profile]) -> None:
        if len(profiles) != 1:
            raise ValueError(
                f"single-profile-handler needs exactly one scheduling profile, got {len(profiles)}"
            )

    def pick_profiles(
        self,
        request: SchedulingRequest,
        profiles: Mapping[str, Profile],
        results: Mapping[str, ProfileResult],
    ) -> Sequence[Profile]:
        if results:
            return ()
        return tuple(profiles.values())[:1]

    def process_results(
        self, request: SchedulingRequest, results: Mapping[str, ProfileResult]
    ) -> str:
        return next(iter(results))


def checked_handler(
    profiles: Mapping[str, Profile], handler: Any | None = None
) -> Any:
    """`handler` (default: the single-profile handler) after it accepted `profiles`;
    raises `ValueError` when they do not fit it."""
    if handler is None:
        handler = SingleProfileHandler()
    handler.check_profiles(profiles)
    return handler
