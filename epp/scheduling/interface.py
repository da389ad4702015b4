"""The scheduler's contracts: what a plugin author reads first.

A scheduling cycle runs profiles; a profile narrows the candidate endpoints with its
filters, scores the survivors with weighted scorers and lets a picker rank them. Plugins
work on whole numpy arrays of snapshot indices at once, read what they need from the
cycle's `CycleState` (`epp.scheduling.cycle`), and never do I/O: a cycle runs on the
event loop thread, inside the request path.

Every plugin has a `name` (from the config) and a class attribute `plugin_type` (its
upstream type name); see `epp.plugins` for parameters and `epp.registry` for the table
of built-in types. The data types here are what a cycle takes in and gives back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from epp.datastore import Endpoint

if TYPE_CHECKING:
    from epp.scheduling.cycle import CycleState
    from epp.scheduling.profile import Profile


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
    prompt_source: Callable[[], str] | None = None
    """Derives `prompt_text` when a plugin first asks (`prompt()`), so that requests
    scheduled by profiles without a prefix plugin never serialise their prompt."""
    api: str = ""
    """The OpenAI API called ("completions", "chat/completions", ...), "" when unknown."""
    body: Mapping[str, Any] | None = None
    """The decoded request body (read-only), for plugins that need more than the prompt
    text (a chat template renders the messages)."""
    prepared: dict[str, Any] = field(default_factory=dict)
    """Per-plugin data computed before the cycle by `Scheduler.prepare` (token ids)."""

    def prompt(self) -> str:
        if self.prompt_source is not None:
            self.prompt_text, self.prompt_source = self.prompt_source(), None
        return self.prompt_text


@dataclass(frozen=True, slots=True)
class FilterStep:
    """One filter as applied in a profile: who survived it."""

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


# -- plugin contracts ----------------------------------------------------------------


@runtime_checkable
class Filter(Protocol):
    """Narrows candidates: returns a subset of `candidates` (order kept), possibly empty.

    An empty result ends the profile with "no candidate left" (503 when it is primary).

        class LowQueue(NoParams):
            plugin_type = "low-queue"

            def filter(self, state, candidates):
                waiting = state.take(state.waiting, candidates)
                return candidates[waiting <= 128]
    """

    name: str

    def filter(self, state: CycleState, candidates: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class Scorer(Protocol):
    """Scores candidates in [0, 1], higher is better: one float per candidate.

    The profile multiplies by the scorer's weight and sums. A scorer whose class sets
    `bounded = True` promises [0, 1] without NaN; others are clamped.

        class FreeKV(NoParams):
            plugin_type = "free-kv"
            bounded = True

            def score(self, state, candidates):
                usage = state.take(state.snapshot.kv_usage, candidates)
                return np.nan_to_num(1.0 - usage, nan=0.0).clip(0.0, 1.0)
    """

    name: str

    def score(self, state: CycleState, candidates: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class Picker(Protocol):
    """Ranks candidates by their totals: positions into `candidates`, best first.

    The first is the pick; more than one (`maxNumOfEndpoints`) are fallbacks.

        class Best(NoParams):
            plugin_type = "best"

            def pick(self, state, candidates, totals):
                return np.argsort(-totals, kind="stable")[:1]
    """

    name: str

    def pick(self, state: CycleState, candidates: np.ndarray, totals: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class PostPick(Protocol):
    """Learns from a request's final endpoint (the approximate prefix index records the
    prompt's blocks there). Called after the pick, and again with the endpoint that
    really served when the data plane reports a different one.

        def post_pick(self, state, index):
            self.index.record(state.snapshot.endpoints[index].name, self.hashes(state))
    """

    def post_pick(self, state: CycleState, index: int) -> None: ...


@runtime_checkable
class PrepareData(Protocol):
    """Computes request data before the synchronous cycle and may await while doing so
    (the precise prefix scorer tokenizes long prompts in a worker thread); upstream's
    PrepareDataPlugin. The result goes in `request.prepared[plugin name]`."""

    async def prepare_request_data(self, request: SchedulingRequest) -> None: ...


@runtime_checkable
class EndpointForgetter(Protocol):
    """Keeps per-endpoint state that must go when the endpoint leaves the pool."""

    def forget_endpoint(self, name: str) -> None: ...


@runtime_checkable
class ProfileHandler(Protocol):
    """Chooses which profiles run (possibly over several rounds) and which result is primary.

    The scheduler calls `pick_profiles` until it returns nothing, then
    `process_results` for the primary profile's name.

        class FirstOnly(NoParams):
            plugin_type = "first-only"

            def check_profiles(self, profiles): ...
            def pick_profiles(self, request, profiles, results):
                return () if results else tuple(profiles.values())[:1]
            def process_results(self, request, results):
                return next(iter(results))
    """

    name: str

    def check_profiles(self, profiles: Mapping[str, Profile]) -> None:
        """Raise `ValueError` when the configured profiles do not fit this handler."""
        ...

    def pick_profiles(
        self,
        request: SchedulingRequest,
        profiles: Mapping[str, Profile],
        results: Mapping[str, ProfileResult],
    ) -> Sequence[Profile]: ...

    def process_results(
        self, request: SchedulingRequest, results: Mapping[str, ProfileResult]
    ) -> str: ...
