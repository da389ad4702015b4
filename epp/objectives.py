"""Who a request is for and how much it matters: objectives, model rewrites, priorities.

Three Kubernetes kinds (group `inference.networking.x-k8s.io`) shape a request before it
is scheduled:

- `InferenceObjective` (`spec.priority`, `spec.poolRef`): named by the request header
  `x-gateway-inference-objective`; gives the request its priority.
- `InferenceModelRewrite` (`spec.rules[].matches[].model`, `spec.rules[].targets[]`):
  rewrites the body's `model` to one of several weighted targets.
- `InferenceModel` (legacy v1alpha2: `modelName`, `criticality`, `targetModels`): found
  by the body's `model`; gives both a priority (from its criticality) and targets.

`ObjectiveStore` holds the objects of one pool, keyed by (kind, namespace, name), and
answers `resolve()` on the request path from small precomputed indexes (no scanning).
It accepts single-object add/update/delete (as a Kubernetes watch delivers them) and
whole-set replacement (as the `--objectives-file` watcher does).

Precedence rules (documented here because they are the contract):

Priority
  1. an `InferenceObjective` whose name equals the objective header;
  2. else a legacy `InferenceModel` whose `modelName` equals the body's model;
  3. else 0 (unknown or absent objective).

Target model
  1. the `x-gateway-model-name-rewrite` header, verbatim, overrides everything;
  2. else an `InferenceModelRewrite` rule whose `matches` name the model exactly;
  3. else a legacy `InferenceModel` with that `modelName` and `targetModels`
     (also an exact match, but the newer kind wins over the legacy one);
  4. else a generic `InferenceModelRewrite` rule (empty `matches`: every model);
  5. else the model unchanged.
  Among several objects that qualify at the same step the oldest wins
  (`metadata.creationTimestamp`, then the order the objects were first seen, which for a
  file is document order); within one object the first matching rule wins.
  Targets are weighted (weights 1..1,000,000; omitted weights count as 1) and chosen with
  the caller's uniform random number `rand` in [0, 1), so tests can pin the choice.

Legacy criticality -> priority
  `Critical` -> 1, `Standard` -> 0 (also when omitted), `Sheddable` -> -1.
  Negative priorities are what the default admission sheds when the pool is saturated,
  so `Sheddable` keeps its legacy meaning; `Critical` sits just above the default.
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Union

log = logging.getLogger(__name__)

KIND_OBJECTIVE = "InferenceObjective"
KIND_REWRITE = "InferenceModelRewrite"
KIND_MODEL = "InferenceModel"
KINDS = (KIND_OBJECTIVE, KIND_REWRITE, KIND_MODEL)

MIN_WEIGHT = 1
MAX_WEIGHT = 1_000_000

CRITICALITY_PRIORITY: dict[str, int] = {"Critical": 1, "Standard": 0, "Sheddable": -1}
"""Legacy `InferenceModel.spec.criticality` mapped to a priority (see module docstring)."""

DEFAULT_PRIORITY = 0


@dataclass(frozen=True, slots=True)
class ObjectKey:
    """Identity of one object, as a Kubernetes watch would key it."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """The metadata the store needs: identity, pool, and age for tie-breaking."""

    key: ObjectKey
    pool: str
    """`spec.poolRef.name`; objects for another pool are ignored by the store."""
    created: float = math.inf
    """`metadata.creationTimestamp` as a POSIX time; +inf when absent (file manifests)."""


@dataclass(frozen=True, slots=True)
class WeightedTarget:
    model: str
    weight: int = 1


@dataclass(frozen=True, slots=True)
class InferenceObjective:
    meta: ObjectMeta
    priority: int = DEFAULT_PRIORITY


@dataclass(frozen=True, slots=True)
class RewriteRule:
    """One rule of an `InferenceModelRewrite`; empty `models` means "every model"."""

    models: tuple[str, ...]
    targets: tuple[WeightedTarget, ...]

    @property
    def generic(self) -> bool:
        return not self.models


@dataclass(frozen=True, slots=True)
class InferenceModelRewrite:
    meta: ObjectMeta
    rules: tuple[RewriteRule, ...] = ()


@dataclass(frozen=True, slots=True)
class InferenceModel:
    """The legacy (v1alpha2) kind: one model name, its criticality and its targets."""

    meta: ObjectMeta
    model_name: str
    criticality: str | None = None
    targets: tuple[WeightedTarget, ...] = ()

    @property
    def priority(self) -> int:
        return CRITICALITY_PRIORITY.get(self.criticality or "Standard", DEFAULT_PRIORITY)


InferenceObject = Union[InferenceObjective, InferenceModelRewrite, InferenceModel]


@dataclass(frozen=True, slots=True)
class Resolution:
    """What the director needs: the model to forward, the priority, the objective used."""

    target_model: str
    priority: int
    objective_name: str | None
    """The `InferenceObjective` name (or legacy `InferenceModel` model name) that gave
    the priority; None when the default priority applies."""


class _Picker:
    """Weighted choice among targets with one uniform random number (O(log n))."""

    __slots__ = ("models", "cumulative", "total")

    def __init__(self, targets: tuple[WeightedTarget, ...]) -> None:
        self.models = tuple(t.model for t in targets)
        acc, cum = 0, []
        for t in targets:
            acc += t.weight
            cum.append(acc)
        self.cumulative = cum
        self.total = acc

    def pick(self, rand: float) -> str:
        if len(self.models) == 1:
            return self.models[0]
        r = min(max(rand, 0.0), math.nextafter(1.0, 0.0)) * self.total
        return self.models[bisect.bisect_right(self.cumulative, r)]


@dataclass(slots=True)
class _Index:
    priority_by_objective: dict[str, int] = field(default_factory=dict)
    legacy_by_model: dict[str, InferenceModel] = field(default_factory=dict)
    exact_rewrite: dict[str, _Picker] = field(default_factory=dict)
    legacy_targets: dict[str, _Picker] = field(default_factory=dict)
    generic_rewrite: _Picker | None = None


class ObjectiveStore:
    """Objectives, rewrites and legacy models of one pool; see the module docstring.

    `pool_name` filters by `spec.poolRef.name` (None accepts every pool: handy for a
    standalone EPP that was given no pool name); `pool_namespace`, when given, also
    requires the object to live in that namespace (poolRef is namespace-local in a
    cluster). Like the Datastore, it is used from the event-loop thread only: a
    Kubernetes watch thread hands objects over with `loop.call_soon_threadsafe`.
    """

    def __init__(self, pool_name: str | None, pool_namespace: str | None = None) -> None:
        self.pool_name = pool_name
        self.pool_namespace = pool_namespace
        self._objects: dict[ObjectKey, InferenceObject] = {}
        self._seen: dict[ObjectKey, int] = {}  # first-seen order, the age tie-breaker
        self._seq = 0
        self._index = _Index()
        self._dirty = False
        self.version = 0
        """Bumped on every change (for observers that cache derived data)."""

    # -- writes ----------------------------------------------------------------------

    def accepts(self, obj: InferenceObject) -> bool:
        """Whether the object belongs to this store's pool."""
        m = obj.meta
        if self.pool_name is not None and m.pool != self.pool_name:
            return False
        return self.pool_namespace is None or m.key.namespace == self.pool_namespace

    def upsert(self, obj: InferenceObject) -> bool:
        """Add or update one object; returns False (and drops any old version) if the
        object references another pool."""
        key = obj.meta.key
        if not self.accepts(obj):
            log.debug("ignoring %s: poolRef %r is not pool %r", key, obj.meta.pool, self.pool_name)
            if key in self._objects:
                self.delete(key)
            return False
        if self._objects.get(key) == obj:
            return True
        self._objects[key] = obj
        if key not in self._seen:
            self._seen[key] = self._seq
            self._seq += 1
        self._changed()
        return True

    def delete(self, key: ObjectKey) -> bool:
        """Remove one object by key; returns whether it was present."""
        if self._objects.pop(key, None) is None:
            return False
        self._seen.pop(key, None)
        self._changed()
        return True

    def replace_all(self, objs: Iterable[InferenceObject]) -> None:
        """Make the store hold exactly `objs` (those of this pool). Objects that survive
        keep their age; new ones are aged in iteration order (document order)."""
        new: dict[ObjectKey, InferenceObject] = {}
        for obj in objs:
            if self.accepts(obj):
                new[obj.meta.key] = obj
            else:
                log.debug("ignoring %s: poolRef %r is not pool %r",
                          obj.meta.key, obj.meta.pool, self.pool_name)
        seen = {k: v for k, v in self._seen.items() if k in new}
        for k in new:
            if k not in seen:
                seen[k] = self._seq
                self._seq += 1
        self._objects, self._seen = new, seen
        self._changed()

    # -- reads -----------------------------------------------------------------------

    def objects(self) -> tuple[InferenceObject, ...]:
        return tuple(self._objects.values())

    def get(self, key: ObjectKey) -> InferenceObject | None:
        return self._objects.get(key)

    def __len__(self) -> int:
        return len(self._objects)

    def resolve(
        self, model: str, objective: str | None, rewrite_header: str | None, rand: float
    ) -> Resolution:
        """Target model and priority of one request (dict lookups on prebuilt indexes)."""
        if self._dirty:
            self._rebuild()
        ix = self._index
        legacy = ix.legacy_by_model.get(model)
        hit = ix.priority_by_objective.get(objective) if objective else None
        if hit is not None:
            priority, objective_name = hit, objective
        elif legacy is not None:
            priority, objective_name = legacy.priority, legacy.model_name
        else:
            priority, objective_name = DEFAULT_PRIORITY, None

        if rewrite_header:
            target = rewrite_header
        else:
            picker = ix.exact_rewrite.get(model) or ix.legacy_targets.get(model)
            if picker is None:
                picker = ix.generic_rewrite
            target = picker.pick(rand) if picker is not None else model
        return Resolution(target, priority, objective_name)

    # -- indexes ---------------------------------------------------------------------

    def _age(self, obj: InferenceObject) -> tuple[float, int, str, str]:
        k = obj.meta.key
        return (obj.meta.created, self._seen.get(k, 0), k.namespace, k.name)

    def _changed(self) -> None:
        # Indexes are rebuilt lazily by the next `resolve()`, so that a watch's initial
        # list of many objects costs one rebuild, not one per object.
        self._dirty = True
        self.version += 1

    def _rebuild(self) -> None:
        """Recompute the lookup indexes, oldest object first so that it wins ties."""
        ix = _Index()
        for obj in sorted(self._objects.values(), key=self._age):
            if isinstance(obj, InferenceObjective):
                ix.priority_by_objective.setdefault(obj.meta.key.name, obj.priority)
            elif isinstance(obj, InferenceModel):
                if obj.model_name not in ix.legacy_by_model:
                    ix.legacy_by_model[obj.model_name] = obj
                    if obj.targets:
                        ix.legacy_targets[obj.model_name] = _Picker(obj.targets)
            else:
                for rule in obj.rules:
                    if not rule.targets:
                        continue
                    if rule.generic:
                        if ix.generic_rewrite is None:
                            ix.generic_rewrite = _Picker(rule.targets)
                    else:
                        for m in rule.models:
                            if m not in ix.exact_rewrite:
                                ix.exact_rewrite[m] = _Picker(rule.targets)
        self._index = ix
        self._dirty = False
