"""How full is the pool? Saturation detectors, as plugins.

A detector maps a datastore snapshot (and optionally the request's candidate endpoints)
to one number: 0 is idle, 1.0 or more is saturated. The default admission sheds
sheddable requests while it is >= 1.0; the flow-control dispatcher releases a band only
while it is below that band's ceiling.

Each endpoint's utilization is capped at 1.0 before averaging, so the pool reads
saturated only when its candidates are full on average: one hopelessly overloaded pod
cannot make an otherwise idle pool shed work (the scheduler will avoid that pod anyway).

EndpointPickerConfig shapes accepted by `detector_from_config()`:

```yaml
saturationDetector:                  # inline parameters of the utilization detector
  queueDepthThreshold: 5             # waiting requests that count as "full" (default 5)
  kvCacheUtilThreshold: 0.8          # KV-cache usage that counts as "full" (default 0.8)
  metricsStalenessThreshold: 200ms   # older metrics count as full (default 200ms)
# or: a plugin declared under `plugins:` and referenced by name
saturationDetector:
  pluginRef: my-detector
# or: inline type and parameters
saturationDetector:
  type: concurrency-detector
  parameters: {mode: requests, maxConcurrency: 64}
# or: no saturationDetector section and exactly one detector under `plugins:` (used);
# no section and none declared: the utilization detector with its defaults.
```
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from epp.datastore import Snapshot
from epp.units import parse_duration

Candidates = Sequence[int] | np.ndarray | None
"""Indices into the snapshot; None means every endpoint of the pool."""


class SaturationDetector(Protocol):
    def saturation(self, snapshot: Snapshot, candidates: Candidates = None,
                   now: float | None = None) -> float: ...

    def is_saturated(self, snapshot: Snapshot, candidates: Candidates = None,
                     now: float | None = None) -> bool: ...

    def request_started(self, endpoint: str, tokens: int = 0) -> None: ...

    def request_finished(self, endpoint: str, tokens: int = 0) -> None: ...


def _positive(params: Mapping[str, Any], key: str, default: float, where: str) -> float:
    v = params.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
        raise ValueError(f"{where}.{key}: expected a number > 0, got {v!r}")
    return float(v)


def _reject_unknown(params: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"{where}: unknown parameter(s) {', '.join(unknown)}")


class UtilizationDetector:
    """Per endpoint max(waiting / queueDepthThreshold, kv / kvCacheUtilThreshold), capped
    at 1; endpoints whose metrics are stale count as 1; the pool is the mean."""

    plugin_type = "utilization-detector"

    def __init__(
        self,
        queue_depth_threshold: float = 5,
        kv_cache_util_threshold: float = 0.8,
        metrics_staleness_threshold: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        name: str = "utilization-detector",
    ) -> None:
        if not (queue_depth_threshold > 0 and kv_cache_util_threshold > 0
                and metrics_staleness_threshold > 0):
            raise ValueError("utilization-detector thresholds must be > 0")
        self.name = name
        self.queue_depth_threshold = float(queue_depth_threshold)
        self.kv_cache_util_threshold = float(kv_cache_util_threshold)
        self.metrics_staleness_threshold = float(metrics_staleness_threshold)
        self._inv_queue = 1.0 / self.queue_depth_threshold
        self._inv_kv = 1.0 / self.kv_cache_util_threshold
        self.clock = clock
        self._pool_cache: tuple[Snapshot, float, float, float] | None = None

    @classmethod
    def from_params(cls, name: str, params: dict[str, Any]) -> "UtilizationDetector":
        where = f"utilization-detector {name!r}"
        _reject_unknown(params, {"queueDepthThreshold", "kvCacheUtilThreshold",
                                 "metricsStalenessThreshold"}, where)
        stale = parse_duration(params.get("metricsStalenessThreshold", "200ms"),
                               f"{where}.metricsStalenessThreshold")
        if stale <= 0:
            raise ValueError(f"{where}.metricsStalenessThreshold: must be > 0")
        return cls(
            queue_depth_threshold=_positive(params, "queueDepthThreshold", 5, where),
            kv_cache_util_threshold=_positive(params, "kvCacheUtilThreshold", 0.8, where),
            metrics_staleness_threshold=stale,
            name=name,
        )

    def utilization(self, snapshot: Snapshot, candidates: Candidates = None,
                    now: float | None = None) -> np.ndarray:
        """Per-candidate utilization in [0, 1] (for tests, debugging and the Explain API)."""
        if now is None:
            now = self.clock()
        idx = slice(None) if candidates is None else np.asarray(candidates, dtype=np.intp)
        # A handful of whole-array operations (this runs once per dispatch when the
        # cached reading cannot be used, so it is kept lean).
        u = np.fmax(snapshot.waiting[idx] * self._inv_queue,  # fmax ignores a NaN side
                    snapshot.kv_usage[idx] * self._inv_kv)
        np.fmax(u, 0.0, out=u)  # neither reported (NaN) -> 0
        np.minimum(u, 1.0, out=u)
        # Snapshot.stale() applies the datastore's threshold; shift `now` so that it
        # applies ours: age <= ours  <=>  (now + theirs - ours) - scraped_at <= theirs.
        shifted = now + snapshot.staleness_threshold - self.metrics_staleness_threshold
        u[snapshot.stale(shifted)[idx]] = 1.0
        return u

    def saturation(self, snapshot: Snapshot, candidates: Candidates = None,
                   now: float | None = None) -> float:
        if len(snapshot) == 0 or (candidates is not None and len(candidates) == 0):
            return 1.0  # nowhere to send work
        if now is None:
            now = self.clock()
        if candidates is not None:
            return float(self.utilization(snapshot, candidates, now).sum()) / len(candidates)
        # The whole-pool reading (what the flow-control dispatcher asks for, once per
        # release) only changes with a new snapshot or when a fresh endpoint turns stale,
        # so it is cached until the earliest such moment.
        cached = self._pool_cache
        if cached is not None and cached[0] is snapshot and cached[1] <= now <= cached[2]:
            return cached[3]
        value = float(self.utilization(snapshot, None, now).sum()) / len(snapshot)
        fresh_until = snapshot.scraped_at + self.metrics_staleness_threshold
        with np.errstate(invalid="ignore"):
            pending = fresh_until[fresh_until >= now]
        self._pool_cache = (snapshot, now, float(pending.min()) if len(pending) else np.inf, value)
        return value

    def is_saturated(self, snapshot: Snapshot, candidates: Candidates = None,
                     now: float | None = None) -> bool:
        return self.saturation(snapshot, candidates, now) >= 1.0

    def request_started(self, endpoint: str, tokens: int = 0) -> None:
        """Metrics-based: load shows up in the next scrape, nothing to count here."""

    def request_finished(self, endpoint: str, tokens: int = 0) -> None:
        pass


class ConcurrencyDetector:
    """Work the EPP itself has in flight per endpoint against a fixed capacity.

    Needs no metrics, so it reacts to a dispatch at once (no scrape lag). `mode` is
    `requests` (count requests) or `tokens` (sum the token estimate passed to
    `request_started`); `maxConcurrency` is the per-endpoint capacity in that unit.
    """

    plugin_type = "concurrency-detector"

    def __init__(self, max_concurrency: float = 64, mode: str = "requests",
                 name: str = "concurrency-detector") -> None:
        if mode not in ("requests", "tokens"):
            raise ValueError(f"concurrency-detector mode must be requests or tokens, got {mode!r}")
        if not max_concurrency > 0:
            raise ValueError("concurrency-detector maxConcurrency must be > 0")
        self.name = name
        self.mode = mode
        self.max_concurrency = float(max_concurrency)
        self._in_flight: dict[str, float] = {}

    @classmethod
    def from_params(cls, name: str, params: dict[str, Any]) -> "ConcurrencyDetector":
        where = f"concurrency-detector {name!r}"
        _reject_unknown(params, {"mode", "maxConcurrency"}, where)
        mode = params.get("mode", "requests")
        if mode not in ("requests", "tokens"):
            raise ValueError(f"{where}.mode: expected requests or tokens, got {mode!r}")
        default = 64 if mode == "requests" else 65536
        return cls(_positive(params, "maxConcurrency", default, where), mode, name)

    def in_flight(self, endpoint: str) -> float:
        return self._in_flight.get(endpoint, 0.0)

    def request_started(self, endpoint: str, tokens: int = 0) -> None:
        amount = 1.0 if self.mode == "requests" else float(max(tokens, 1))
        self._in_flight[endpoint] = self._in_flight.get(endpoint, 0.0) + amount

    def request_finished(self, endpoint: str, tokens: int = 0) -> None:
        amount = 1.0 if self.mode == "requests" else float(max(tokens, 1))
        left = self._in_flight.get(endpoint, 0.0) - amount
        if left <= 0:
            self._in_flight.pop(endpoint, None)  # no residue for endpoints that went idle
        else:
            self._in_flight[endpoint] = left

    def saturation(self, snapshot: Snapshot, candidates: Candidates = None,
                   now: float | None = None) -> float:
        eps = snapshot.endpoints
        idx = range(len(eps)) if candidates is None else candidates
        if len(idx) == 0:
            return 1.0
        cap, get = self.max_concurrency, self._in_flight.get
        total = sum(min(get(eps[int(i)].name, 0.0) / cap, 1.0) for i in idx)
        return total / len(idx)

    def is_saturated(self, snapshot: Snapshot, candidates: Candidates = None,
                     now: float | None = None) -> bool:
        return self.saturation(snapshot, candidates, now) >= 1.0


DETECTORS: dict[str, Any] = {c.plugin_type: c for c in (UtilizationDetector, ConcurrencyDetector)}
"""The detector types, for the inline `saturationDetector.type` form."""


def detector_from_config(section: Mapping[str, Any] | None,
                         plugins: Mapping[str, Any] | None = None) -> SaturationDetector:
    """The detector an EndpointPickerConfig asks for (see the module docstring).

    `plugins` maps the names of already-instantiated `plugins:` entries to instances,
    for the `pluginRef` form. Raises `ValueError` with a readable message.
    """
    s = dict(section or {})
    if "pluginRef" in s:
        ref = s["pluginRef"]
        if not isinstance(ref, str):  # a YAML list here would be unhashable (TypeError)
            raise ValueError(f"saturationDetector.pluginRef: expected a plugin name, got {ref!r}")
        inst = (plugins or {}).get(ref)
        if inst is None:
            raise ValueError(f"saturationDetector.pluginRef: no plugin named {ref!r}")
        if not callable(getattr(inst, "saturation", None)):
            raise ValueError(f"saturationDetector.pluginRef: plugin {ref!r} is not a saturation detector")
        return inst  # type: ignore[no-any-return]
    if "type" in s:
        params = s.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise ValueError("saturationDetector.parameters: expected a mapping")
        cls = DETECTORS.get(s["type"]) if isinstance(s["type"], str) else None
        if cls is None:
            raise ValueError(f"saturationDetector.type: {s['type']!r} is not a saturation detector "
                             f"(known: {', '.join(sorted(DETECTORS))})")
        return cls.from_params(str(s.get("name") or s["type"]), dict(params))
    if not s:
        # No section: a detector declared under `plugins:` is meant to be used.
        declared = [p for p in (plugins or {}).values()
                    if isinstance(p, (UtilizationDetector, ConcurrencyDetector))]
        if len(declared) == 1:
            return declared[0]
        if len(declared) > 1:
            raise ValueError("several saturation detectors declared under plugins: "
                             "choose one with saturationDetector.pluginRef")
    return UtilizationDetector.from_params("utilization-detector", s)


def pool_saturation_fn(detector: SaturationDetector,
                       snapshot: Callable[[], Snapshot]) -> Callable[[], float]:
    """The pool-wide saturation the flow-control dispatcher reads (all endpoints),
    also published as the pool-saturation gauge by the controller."""
    return lambda: detector.saturation(snapshot())
