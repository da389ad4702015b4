"""The `flowControl` and `featureGates` sections of the EndpointPickerConfig, typed.

`epp.config` keeps these sections as plain dicts; `FlowControlConfig.from_config()` turns
the `flowControl` dict into checked dataclasses and raises `ValueError` naming the field.
Field names follow the upstream EndpointPickerConfig; the ones marked (ext) are ours.

```yaml
featureGates: [flowControl]          # a list of names (epp.config rejects other shapes)
flowControl:
  maxRequests: 0                     # all bands together; 0 = unlimited (default 0)
  maxBytes: 0                        # all bands together; int or quantity "1Gi" (default 0)
  defaultRequestTTL: 30s             # time a request may wait; 0 = forever (default 30s)
  dispatchPollInterval: 10ms         # (ext) re-check saturation this often while blocked
  maxDispatchPerCycle: 1             # (ext) releases per cycle; between cycles released
                                     # requests run, so in-flight counting sees them (default 1)
  defaultPriorityBand:               # template for priorities without their own band
    maxRequests: 0                   # 0 = unlimited (default 0)
    maxBytes: 1G                     # default 1,000,000,000
    fairnessPolicy: global-strict    # or round-robin (default global-strict)
    orderingPolicy: fcfs             # or earliest-deadline (default fcfs)
    requestTTL: 30s                  # (ext) defaults to defaultRequestTTL
    saturationCeiling: 1.0           # (ext) release only while pool saturation < this
  priorityBands:                     # unset fields come from defaultPriorityBand
    - priority: 20
      maxRequests: 1000
      fairnessPolicy: round-robin
    - priority: -1
      saturationCeiling: 0.8
```

`fairnessPolicyRef`/`orderingPolicyRef` are accepted as synonyms, and so are the upstream
plugin type names (`global-strict-fairness-policy`, `round-robin-fairness-policy`,
`fcfs-ordering-policy`, `edf-ordering-policy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from epp.units import parse_duration, parse_quantity

FEATURE_FLOW_CONTROL = "flowControl"

FAIRNESS_POLICIES = {
    "global-strict": "global-strict",
    "global-strict-fairness-policy": "global-strict",
    "round-robin": "round-robin",
    "round-robin-fairness-policy": "round-robin",
}
ORDERING_POLICIES = {
    "fcfs": "fcfs",
    "fcfs-ordering-policy": "fcfs",
    "earliest-deadline": "earliest-deadline",
    "edf": "earliest-deadline",
    "edf-ordering-policy": "earliest-deadline",
}

def _count(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{where}: expected an integer >= 0, got {v!r}")
    return v


def _ratio(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
        raise ValueError(f"{where}: expected a number > 0, got {v!r}")
    return float(v)


def feature_enabled(feature_gates: Any, name: str = FEATURE_FLOW_CONTROL) -> bool:
    """Whether a feature gate is on; `featureGates` may be a list of names or a map."""
    if not feature_gates:
        return False
    if isinstance(feature_gates, Mapping):
        return bool(feature_gates.get(name, False))
    if isinstance(feature_gates, str):
        return name in (g.strip() for g in feature_gates.split(","))
    if isinstance(feature_gates, Iterable):
        return name in feature_gates
    return False


@dataclass(frozen=True, slots=True)
class BandConfig:
    """One priority band; `max_requests`/`max_bytes` 0 mean unlimited, `ttl` 0 forever."""

    priority: int = 0
    max_requests: int = 0
    max_bytes: int = 1_000_000_000
    fairness: str = "global-strict"
    ordering: str = "fcfs"
    ttl: float = 30.0
    saturation_ceiling: float = 1.0


@dataclass(frozen=True, slots=True)
class FlowControlConfig:
    max_requests: int = 0
    max_bytes: int = 0
    default_ttl: float = 30.0
    poll_interval: float = 0.010
    max_dispatch_per_cycle: int = 1
    default_band: BandConfig = field(default_factory=BandConfig)
    bands: Mapping[int, BandConfig] = field(default_factory=dict)

    def band(self, priority: int) -> BandConfig:
        """The configured band of a priority, or the default template for it."""
        b = self.bands.get(priority)
        return b if b is not None else replace(self.default_band, priority=priority)

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> "FlowControlConfig":
        """Build from the plain `flowControl` dict; raises `ValueError` naming the field."""
        s = dict(section or {})
        known = {"maxRequests", "maxBytes", "defaultRequestTTL", "dispatchPollInterval",
                 "maxDispatchPerCycle", "defaultPriorityBand", "priorityBands",
                 "usageLimitPolicyPluginRef"}
        unknown = sorted(set(s) - known)
        if unknown:
            raise ValueError(f"flowControl: unknown field(s) {', '.join(unknown)}")
        ttl = parse_duration(s.get("defaultRequestTTL", "30s"), "flowControl.defaultRequestTTL")
        per_cycle = _count(s.get("maxDispatchPerCycle", 1), "flowControl.maxDispatchPerCycle")
        if per_cycle < 1:
            raise ValueError("flowControl.maxDispatchPerCycle: must be >= 1")
        poll = parse_duration(s.get("dispatchPollInterval", "10ms"), "flowControl.dispatchPollInterval")
        if poll <= 0:
            raise ValueError("flowControl.dispatchPollInterval: must be > 0")
        default = _band(s.get("defaultPriorityBand"), "flowControl.defaultPriorityBand",
                        BandConfig(ttl=ttl), needs_priority=False)
        bands: dict[int, BandConfig] = {}
        raw = s.get("priorityBands") or []
        if not isinstance(raw, list):
            raise ValueError("flowControl.priorityBands: expected a list")
        for i, b in enumerate(raw):
            where = f"flowControl.priorityBands[{i}]"
            band = _band(b, where, default, needs_priority=True)
            if band.priority in bands:
                raise ValueError(f"{where}: priority {band.priority} configured twice")
            bands[band.priority] = band
        return cls(
            max_requests=_count(s.get("maxRequests", 0), "flowControl.maxRequests"),
            max_bytes=parse_quantity(s.get("maxBytes", 0), "flowControl.maxBytes"),
            default_ttl=ttl,
            poll_interval=poll,
            max_dispatch_per_cycle=per_cycle,
            default_band=default,
            bands=bands,
        )


def _band(raw: Any, where: str, base: BandConfig, needs_priority: bool) -> BandConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a mapping")
    known = {"priority", "maxRequests", "maxBytes", "fairnessPolicy", "fairnessPolicyRef",
             "orderingPolicy", "orderingPolicyRef", "requestTTL", "saturationCeiling"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
    prio = raw.get("priority")
    if needs_priority:
        if isinstance(prio, bool) or not isinstance(prio, int):
            raise ValueError(f"{where}.priority: expected an integer, got {prio!r}")
    elif prio is not None:
        raise ValueError(f"{where}.priority: the default band takes the request's priority")
    fairness = raw.get("fairnessPolicy", raw.get("fairnessPolicyRef", base.fairness))
    if not isinstance(fairness, str) or fairness not in FAIRNESS_POLICIES:
        raise ValueError(f"{where}.fairnessPolicy: {fairness!r} is not one of global-strict, round-robin")
    ordering = raw.get("orderingPolicy", raw.get("orderingPolicyRef", base.ordering))
    if not isinstance(ordering, str) or ordering not in ORDERING_POLICIES:
        raise ValueError(f"{where}.orderingPolicy: {ordering!r} is not one of fcfs, earliest-deadline")
    priority: int = prio if isinstance(prio, int) else base.priority
    return BandConfig(
        priority=priority,
        max_requests=_count(raw.get("maxRequests", base.max_requests), f"{where}.maxRequests"),
        max_bytes=parse_quantity(raw.get("maxBytes", base.max_bytes), f"{where}.maxBytes"),
        fairness=FAIRNESS_POLICIES[fairness],
        ordering=ORDERING_POLICIES[ordering],
        ttl=parse_duration(raw.get("requestTTL", base.ttl), f"{where}.requestTTL"),
        saturation_ceiling=_ratio(raw.get("saturationCeiling", base.saturation_ceiling),
                                  f"{where}.saturationCeiling"),
    )
