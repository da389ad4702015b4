"""What every plugin shares: parameter parsing, and the base for plugins without parameters.

A plugin type is a class with a `plugin_type` (its upstream type name, e.g.
`"queue-scorer"`) and a `from_params(name, params)` classmethod that validates the
config's `parameters` mapping and raises `ValueError` with a readable message. The table
of built-in types is `epp.registry`; the config loader (`epp.config`) instantiates from it.

    class MyScorer(NoParams):
        plugin_type = "my-scorer"

        def score(self, state, candidates):
            return np.ones(len(candidates))

    MyScorer.from_params("mine", {})           # -> MyScorer(name="mine")
    MyScorer.from_params("mine", {"x": 1})     # ValueError: unknown parameter(s) 'x'
"""

from __future__ import annotations

import math
import random
from typing import Any, Mapping, Sequence, TypeVar

P = TypeVar("P", bound="NoParams")


def plugin_type(plugin: object) -> str:
    """A plugin's upstream type name (its class name for plugins defined elsewhere)."""
    return getattr(plugin, "plugin_type", type(plugin).__name__)


class NoParams:
    """Base of plugins configured by name only."""

    plugin_type = ""

    def __init__(self, name: str = "") -> None:
        self.name = name or self.plugin_type

    @classmethod
    def from_params(cls: type[P], name: str, params: Mapping[str, Any]) -> P:
        check_params(params, ())
        return cls(name)


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


def seeded_rng(seed: int | None) -> random.Random:
    """A plugin's random source; a `seed` parameter makes tests deterministic."""
    return random.Random(seed)
