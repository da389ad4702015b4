"""The scheduling cycle: profile handler -> profiles (filters -> weighted scorers -> picker).

This keeps the upstream EPP's shape: a `Scheduler` asks its `ProfileHandler` which profiles
to run, each `Profile` narrows the candidates with its filters in order, scores the
survivors with its weighted scorers (each score clamped to [0, 1]; total = sum of
weight x score) and lets its picker choose. The handler then names the primary result.

Candidates are numpy int arrays of snapshot indices, and every plugin works on whole arrays
at once: a cycle costs a few dozen numpy calls whatever the pool size. Values that depend
only on the snapshot (for example 1 - KV usage) are computed once per snapshot version and
shared by the cycles that read the same snapshot (`Derived`); values that depend on the
request or the clock are computed at most once per cycle (`CycleState`).

The cycle is synchronous and does no I/O: it is called on the event loop thread.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from epp.datastore import Endpoint, Snapshot
from epp.errors import ErrorCode, EppError
from epp.observability import PLUGIN_DURATION, SCHEDULER_E2E_DURATION
from epp.plugins import register
from epp.scheduling import prefix as _prefix
from epp.scheduling.inflight import InFlightTracker

log = logging.getLogger(__name__)


# -- plain data in and out ---------------------------------------------------------


@dataclass(slots=True)
class SchedulingRequest:
    """What the scheduler needs from a request (no protobuf, no body bytes)."""

    request_id: str
    target_model: str
    """The model the endpoint will serve (after any rewrite): LoRA affinity and prefix seed."""
    prompt_text: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    priority: int = 0

    @classmethod
    def from_inference(
        cls, req: Any, target_model: str | None = None, priority: int = 0
    ) -> "SchedulingRequest":
        """From an `epp.request.InferenceRequest` (target_model defaults to its model)."""
        return cls(
            request_id=req.request_id,
            target_model=target_model if target_model is not None else req.model,
            prompt_text=req.prompt_text,
            headers=req.headers,
            priority=priority,
        )


@dataclass(frozen=True, slots=True)
class FilterStep:
    """One filter as applied in a profile: who went in, who survived."""

    name: str
    type: str
    survivors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CandidateScore:
    """One candidate's scores in one profile; `raw` and `weighted` are keyed by scorer name."""

    endpoint: str
    address: str
    raw: Mapping[str, float]
    weighted: Mapping[str, float]
    total: float


@dataclass(frozen=True, slots=True)
class ScorerInfo:
    name: str
    type: str
    weight: float


@dataclass(frozen=True, slots=True)
class ProfileExplanation:
    """Everything one profile did, in order, for `Explain` and for logs."""

    profile: str
    candidates: tuple[str, ...]
    filters: tuple[FilterStep, ...]
    scorers: tuple[ScorerInfo, ...]
    scores: tuple[CandidateScore, ...]
    picker: str
    picked: str | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Explanation:
    primary_profile: str
    profiles: tuple[ProfileExplanation, ...]
    picked: str


@dataclass(slots=True)
class ProfileResult:
    """The outcome of one profile: ranked snapshot indices (best first), or an error."""

    profile: str
    indices: tuple[int, ...] = ()
    error: str | None = None
    explanation: ProfileExplanation | None = None


@dataclass(slots=True)
class SchedulingResult:
    endpoint: Endpoint
    index: int
    """Index of `endpoint` in the snapshot the cycle read."""
    profile: str
    fallbacks: tuple[Endpoint, ...] = ()
    """Further endpoints ranked by the primary picker (maxNumOfEndpoints > 1), best first."""
    profile_results: Mapping[str, ProfileResult] = field(default_factory=dict)
    explanation: Explanation | None = None


# -- per-snapshot and per-cycle state ----------------------------------------------


_MISSING: Any = object()


class Derived:
    """Arrays derived from one snapshot only, shared by all cycles on that snapshot."""

    __slots__ = ("snapshot", "prev", "n", "all", "all_true", "fresh_until", "_cache")

    MAX_ENTRIES = 256

    def __init__(self, snapshot: Snapshot, prev: "Derived | None" = None) -> None:
        self.snapshot = snapshot
        self.prev = prev
        """The previous snapshot's values, for builders that can reuse them when their
        inputs did not change (a scrape usually changes numbers, not adapters)."""
        self.n = len(snapshot)
        self.all: np.ndarray
        self.all_true: np.ndarray
        if prev is not None and prev.n == self.n:
            self.all, self.all_true = prev.all, prev.all_true  # read-only by convention
        else:
            self.all = np.arange(self.n, dtype=np.int64)
            self.all_true = np.ones(self.n, np.bool_)
        # Until this time every endpoint is fresh, so cycles skip the staleness test.
        scraped = snapshot.scraped_at
        if self.n and not np.isnan(scraped).any():
            self.fresh_until = float(scraped.min()) + snapshot.staleness_threshold
        else:
            self.fresh_until = -math.inf
        self._cache: dict[Any, Any] = {}

    def carried(self, key: Any, same_inputs: Callable[[Snapshot, Snapshot], bool]) -> Any:
        """The previous snapshot's value for `key` when `same_inputs(old, new)`, else _MISSING."""
        prev = self.prev
        if prev is None:
            return _MISSING
        v = prev._cache.get(key, _MISSING)
        if v is _MISSING:
            return v
        same = self._cache.get(("same-inputs", same_inputs), _MISSING)
        if same is _MISSING:
            same = self._cache[("same-inputs", same_inputs)] = same_inputs(prev.snapshot, self.snapshot)
        return v if same else _MISSING

    def get(self, key: Any, build: Callable[[Snapshot], Any]) -> Any:
        """The value for `key`, built from the snapshot on first use.

        Some keys come from requests (LoRA scores per target model), and a snapshot can
        live for long (a pool whose scrapes all fail changes nothing): past
        `MAX_ENTRIES` values are built per call and not kept, so memory stays bounded.
        """
        v = self._cache.get(key, _MISSING)
        if v is _MISSING:
            v = build(self.snapshot)
            if len(self._cache) < self.MAX_ENTRIES:
                self._cache[key] = v
        return v




class CycleState:
    """Inputs and memoised intermediate values of one scheduling cycle."""

    __slots__ = (
        "snapshot",
        "derived",
        "request",
        "now",
        "inflight",
        "_fresh",
        "_all_fresh",
        "_waiting",
        "_prompt",
        "_prefix",
    )

    def __init__(
        self,
        derived: Derived,
        request: SchedulingRequest,
        now: float,
        inflight: InFlightTracker | None,
    ) -> None:
        self.snapshot = derived.snapshot
        self.derived = derived
        self.request = request
        self.now = now
        self.inflight = inflight
        self._fresh: np.ndarray | None = None
        self._all_fresh = False
        self._waiting: np.ndarray | None = None
        self._prompt: bytes | None = None
        self._prefix: dict[Any, Any] = {}

    def take(self, arr: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """`arr[candidates]`, without a copy when the candidates are the whole pool."""
        return arr if candidates is self.derived.all else arr[candidates]

    @property
    def fresh(self) -> np.ndarray:
        """Per snapshot index: metrics are recent enough to trust."""
        if self._fresh is None:
            if self.now <= self.derived.fresh_until:
                self._fresh = self.derived.all_true
                self._all_fresh = True
            else:
                self._fresh = ~self.snapshot.stale(self.now)
                self._all_fresh = bool(self._fresh.all())
        return self._fresh

    @property
    def all_fresh(self) -> bool:
        self.fresh  # noqa: B018 - computes the flag
        return self._all_fresh

    @property
    def waiting(self) -> np.ndarray:
        """Scraped waiting requests plus those routed since the last scrape (NaN = unknown)."""
        if self._waiting is None:
            w = self.snapshot.waiting
            if self.inflight is not None:
                extra = self.inflight.extra_waiting(self.snapshot, self.now)
                if extra is not None:
                    w = w + extra
            self._waiting = w
        return self._waiting

    @property
    def prompt(self) -> bytes:
        if self._prompt is None:
            self._prompt = _prefix.prompt_bytes(self.request.prompt_text)
        return self._prompt

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """Per-cycle memo shared by plugins (e.g. prefix hashes used by a filter and a scorer)."""
        v = self._prefix.get(key, _MISSING)
        if v is _MISSING:
            v = self._prefix[key] = build()
        return v


# -- plugin protocols --------------------------------------------------------------


@runtime_checkable
class Filter(Protocol):
    """Narrows candidates; returns a subset of `candidates` (order kept), possibly empty."""

    name: str

    def filter(self, state: CycleState, candidates: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class Scorer(Protocol):
    """Scores candidates in [0, 1], higher is better; one float per candidate."""

    name: str

    def score(self, state: CycleState, candidates: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class Picker(Protocol):
    """Ranks candidates by their totals; returns positions into `candidates`, best first."""

    name: str

    def pick(self, state: CycleState, candidates: np.ndarray, totals: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class PostPick(Protocol):
    """Learns from the final pick (e.g. the prefix index records the prompt's blocks)."""

    def post_pick(self, state: CycleState, index: int) -> None: ...


@runtime_checkable
class ProfileHandler(Protocol):
    """Chooses which profiles run (possibly over several rounds) and which result is primary."""

    name: str

    def pick_profiles(
        self,
        request: SchedulingRequest,
        profiles: Mapping[str, "Profile"],
        results: Mapping[str, ProfileResult],
    ) -> Sequence["Profile"]: ...

    def process_results(
        self, request: SchedulingRequest, results: Mapping[str, ProfileResult]
    ) -> str: ...


def plugin_type(plugin: Any) -> str:
    return getattr(plugin, "plugin_type", type(plugin).__name__)


# -- profile -----------------------------------------------------------------------


class _Timer:
    """A bound PLUGIN_DURATION child; observing costs ~0.5 µs, so it is bound once."""

    __slots__ = ("observe",)

    def __init__(self, point: str, plugin: Any) -> None:
        self.observe = PLUGIN_DURATION.labels(point, plugin_type(plugin), plugin.name).observe


class Profile:
    """A named pipeline: filters in order, weighted scorers, one picker."""

    def __init__(
        self,
        name: str,
        filters: Sequence[Filter] = (),
        scorers: Sequence[tuple[Scorer, float]] = (),
        picker: Picker | None = None,
    ) -> None:
        if picker is None:
            from epp.scheduling.pickers import MaxScorePicker

            picker = MaxScorePicker("max-score-picker")
        for s, w in scorers:
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"profile {name!r}: weight of scorer {s.name!r} must be >= 0")
        self.name = name
        self.filters = tuple(filters)
        self.scorers = tuple((s, float(w)) for s, w in scorers)
        self.picker = picker
        self._filter_timers = tuple(_Timer("Filter", f) for f in self.filters)
        self._scorer_timers = tuple(_Timer("Scorer", s) for s, _ in self.scorers)
        self._picker_timer = _Timer("Picker", picker)
        # Built-in scorers promise [0, 1] and skip the clamp.
        self._clamp = tuple(not getattr(s, "bounded", False) for s, _ in self.scorers)

    def plugins(self) -> list[Any]:
        return [*self.filters, *(s for s, _ in self.scorers), self.picker]

    def run(
        self, state: CycleState, candidates: np.ndarray, explain: bool = False, timed: bool = True
    ) -> ProfileResult:
        snap = state.snapshot
        cand = candidates
        steps: list[FilterStep] = []
        into = cand
        clock = time.perf_counter
        emptied_by = ""
        for f, timer in zip(self.filters, self._filter_timers):
            if timed:
                t0 = clock()
                cand = f.filter(state, cand)
                timer.observe(clock() - t0)
            else:
                cand = f.filter(state, cand)
            if explain:
                steps.append(
                    FilterStep(
                        f.name, plugin_type(f), tuple(snap.endpoints[i].name for i in cand.tolist())
                    )
                )
            if len(cand) == 0:
                emptied_by = f.name
                break
        if len(cand) == 0:
            err = f"no candidate endpoint left after filter {emptied_by!r} in profile {self.name!r}"
            expl = self._explain(state, into, steps, cand, {}, None, None, err) if explain else None
            return ProfileResult(self.name, (), err, expl)

        n = len(cand)
        totals: np.ndarray | None = None
        raw: dict[str, np.ndarray] = {}
        for (s, w), timer, clamp in zip(self.scorers, self._scorer_timers, self._clamp):
            if timed:
                t0 = clock()
                sc = s.score(state, cand)
                timer.observe(clock() - t0)
            else:
                sc = s.score(state, cand)
            if clamp:
                sc = np.clip(np.nan_to_num(np.asarray(sc, np.float64), nan=0.0), 0.0, 1.0)
            if explain:
                raw[s.name] = sc
            if w == 0.0:
                continue
            if totals is None:
                totals = sc * w
            else:
                totals += sc * w
        if totals is None:
            totals = np.zeros(n)
        if timed:
            t0 = clock()
            order = self.picker.pick(state, cand, totals)
            self._picker_timer.observe(clock() - t0)
        else:
            order = self.picker.pick(state, cand, totals)
        indices = tuple(cand[order].tolist())
        expl = self._explain(state, into, steps, cand, raw, totals, indices[0], None) if explain else None
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


# -- profile handler ---------------------------------------------------------------


@register("single-profile-handler")
class SingleProfileHandler:
    """Runs the one profile once; its result is primary (the upstream default)."""

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def from_params(cls, name: str, params: dict[str, Any]) -> "SingleProfileHandler":
        if params:
            raise ValueError(f"takes no parameters, got {sorted(params)}")
        return cls(name)

    def check_profiles(self, profiles: Mapping[str, "Profile"]) -> None:
        if len(profiles) != 1:
            raise ValueError(
                f"single-profile-handler needs exactly one scheduling profile, got {len(profiles)}"
            )

    def pick_profiles(
        self,
        request: SchedulingRequest,
        profiles: Mapping[str, "Profile"],
        results: Mapping[str, ProfileResult],
    ) -> Sequence["Profile"]:
        if results:
            return ()
        return tuple(profiles.values())[:1]

    def process_results(
        self, request: SchedulingRequest, results: Mapping[str, ProfileResult]
    ) -> str:
        return next(iter(results))


# -- scheduler ---------------------------------------------------------------------


class Scheduler:
    """Runs scheduling cycles over datastore snapshots; built from an `EppConfig`.

    Besides choosing, it owns two pieces of learned state that later cycles read: the prefix
    indices of its plugins (updated after each pick) and the in-flight tracker (started
    after each pick; the caller reports `inflight.finished(request_id)`).
    """

    def __init__(
        self,
        profiles: Mapping[str, Profile] | Sequence[Profile],
        handler: ProfileHandler | None = None,
        *,
        inflight: InFlightTracker | None = None,
        track_inflight: bool = True,
        plugin_metrics_every: int = 1,
        e2e_metric: bool = True,
    ) -> None:
        if not isinstance(profiles, Mapping):
            profiles = {p.name: p for p in profiles}
        if not profiles:
            raise ValueError("a scheduler needs at least one profile")
        if handler is None:
            handler = SingleProfileHandler("single-profile-handler")
        check = getattr(handler, "check_profiles", None)
        if check is not None:
            check(profiles)
        self.profiles: dict[str, Profile] = dict(profiles)
        self.handler = handler
        self.inflight = inflight if inflight is not None else InFlightTracker()
        self.track_inflight = track_inflight
        self.plugin_metrics_every = max(1, int(plugin_metrics_every))
        self._cycle = 0
        self._derived: Derived | None = None
        self._post_pick: dict[str, list[Any]] = {
            name: [p for p in _with_producers(prof.plugins()) if isinstance(p, PostPick)]
            for name, prof in self.profiles.items()
        }
        self._forgetters = [
            p
            for p in _with_producers([p for prof in self.profiles.values() for p in prof.plugins()])
            if hasattr(p, "forget_endpoint")
        ]
        self._e2e_observe = SCHEDULER_E2E_DURATION.observe if e2e_metric else _noop

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> "Scheduler":
        """The scheduler an `epp.config.EppConfig` describes (kwargs as for `__init__`)."""
        return cls(config.profiles, config.profile_handler, **kwargs)

    # -- pool membership -----------------------------------------------------------

    def attach(self, datastore: Any) -> None:
        """Forget learned state of endpoints that leave `datastore`'s pool."""
        datastore.add_listener(self.on_endpoints_changed)

    def on_endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        """Datastore listener: an endpoint removed (not merely relabelled) is forgotten."""
        kept = {e.name: (e.address, e.port) for e in added}
        for e in removed:
            if kept.get(e.name) == (e.address, e.port):
                continue
            self.forget_endpoint(e.name)

    def forget_endpoint(self, name: str) -> None:
        for p in self._forgetters:
            p.forget_endpoint(name)
        self.inflight.forget_endpoint(name)

    # -- the cycle -----------------------------------------------------------------

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

        `learn=False` is a dry run: the pick updates no prefix index and no in-flight count.
        Raises `EppError(ServiceUnavailable)` when no candidate remains.
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
        endpoint = snapshot.endpoints[index]

        if learn:
            for p in self._post_pick.get(primary, ()):
                p.post_pick(state, index)
        if learn and self.track_inflight:
            self.inflight.started(req.request_id, endpoint.name, now)

        explanation = None
        if explain:
            explanation = Explanation(
                primary_profile=primary,
                profiles=tuple(r.explanation for r in results.values() if r.explanation is not None),
                picked=endpoint.name,
            )
        self._e2e_observe(time.perf_counter() - t_start)
        return SchedulingResult(
            endpoint=endpoint,
            index=index,
            profile=primary,
            fallbacks=tuple(snapshot.endpoints[i] for i in res.indices[1:])
            if len(res.indices) > 1
            else (),
            profile_results=results,
            explanation=explanation,
        )


def _noop(_: float) -> None:
    pass


def _with_producers(plugins: list[Any]) -> list[Any]:
    """Plugins plus the state producers they read (a filter's prefix index), each once."""
    out = []
    for p in plugins:
        out.append(p)
        producer = getattr(p, "producer", None)
        if producer is not None:
            out.append(producer)
    return _dedupe(out)


def _dedupe(items: list[Any]) -> list[Any]:
    seen: set[int] = set()
    out = []
    for x in items:
        if id(x) not in seen:
            seen.add(id(x))
            out.append(x)
    return out


def seeded_rng(seed: Any) -> random.Random:
    """A picker's random source; a `seed` parameter makes tests deterministic."""
    return random.Random(seed)


# -- parameter parsing shared by plugins ------------------------------------------


def check_params(params: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """Reject unknown parameter names so that a typo fails at start, not silently."""
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        known = ", ".join(allowed) or "none"
        raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))} (known: {known})")


def param_int(
    params: Mapping[str, Any], key: str, default: int, *, minimum: int | None = None
) -> int:
    v = params.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise ValueError(f"parameter {key!r} must be an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"parameter {key!r} must be >= {minimum}, got {v}")
    return v


def param_float(
    params: Mapping[str, Any],
    key: str,
    default: float,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
) -> float:
    v = params.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"parameter {key!r} must be a finite number, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"parameter {key!r} must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"parameter {key!r} must be <= {maximum}, got {v}")
    return float(v)


def param_bool(params: Mapping[str, Any], key: str, default: bool) -> bool:
    v = params.get(key, default)
    if not isinstance(v, bool):
        raise ValueError(f"parameter {key!r} must be true or false, got {v!r}")
    return v


def param_seed(params: Mapping[str, Any]) -> int | None:
    v = params.get("seed")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"parameter 'seed' must be an integer, got {v!r}")
    return v
