"""Pickers: turn the profile's total scores into a ranking (positions, best first).

Upstream type names and parameters: `maxNumOfEndpoints` (default 1) asks for a ranked list
of that many endpoints (the first is the pick, the rest are fallbacks). The extra `seed`
parameter makes the random choices reproducible in tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from epp.plugins import check_params, param_int, param_seed, seeded_rng
from epp.scheduling.cycle import CycleState

_PARAMS = ("maxNumOfEndpoints", "seed")
_TIE_EPS = 1e-9


class _BasePicker:
    plugin_type = ""

    def __init__(self, name: str, max_endpoints: int = 1, seed: int | None = None) -> None:
        self.name = name
        self.max_endpoints = max_endpoints
        self._rng = seeded_rng(seed)
        self._np_rng = np.random.default_rng(seed)

    @classmethod
    def from_params(cls, name: str, params: dict[str, Any]) -> Any:
        check_params(params, _PARAMS)
        return cls(name, param_int(params, "maxNumOfEndpoints", 1, minimum=1), param_seed(params))


class MaxScorePicker(_BasePicker):
    """The highest total wins; equal totals are broken at random so that ties spread load."""

    plugin_type = "max-score-picker"

    def pick(self, state: CycleState, candidates: np.ndarray, totals: np.ndarray) -> np.ndarray:
        n = len(totals)
        if n == 1:
            return np.zeros(1, np.int64)
        if self.max_endpoints == 1:
            ties = np.flatnonzero(totals >= totals.max() - _TIE_EPS)
            if len(ties) == 1:
                return ties
            return ties[self._rng.randrange(len(ties)) :][:1]
        perm = self._np_rng.permutation(n)
        order = perm[np.argsort(-totals[perm], kind="stable")]
        return order[: self.max_endpoints]


class RandomPicker(_BasePicker):
    """Uniformly random, ignoring scores (a baseline, or after strict filters)."""

    plugin_type = "random-picker"

    def pick(self, state: CycleState, candidates: np.ndarray, totals: np.ndarray) -> np.ndarray:
        n = len(totals)
        if self.max_endpoints == 1:
            return np.array([self._rng.randrange(n)], np.int64)
        return self._np_rng.permutation(n)[: self.max_endpoints]


class WeightedRandomPicker(_BasePicker):
    """Random with probability proportional to the total score (uniform when all are 0).

    Several endpoints are drawn without replacement by weighted reservoir keys u^(1/w).
    """

    plugin_type = "weighted-random-picker"

    def pick(self, state: CycleState, candidates: np.ndarray, totals: np.ndarray) -> np.ndarray:
        n = len(totals)
        w = np.clip(totals, 0.0, None)
        total = float(w.sum())
        if total <= 0.0:
            return RandomPicker.pick(self, state, candidates, totals)  # type: ignore[arg-type]
        if self.max_endpoints == 1:
            cum = np.cumsum(w)
            pos = int(np.searchsorted(cum, self._rng.random() * total, side="right"))
            # Never land on a zero-weight endpoint at the end (float rounding).
            pos = min(pos, n - 1)
            while w[pos] == 0.0 and pos > 0:
                pos -= 1
            return np.array([pos], np.int64)
        u = self._np_rng.random(n)
        with np.errstate(divide="ignore"):
            keys = np.where(w > 0, np.log(u) / np.where(w > 0, w, 1.0), -np.inf)
        return np.argsort(-keys, kind="stable")[: self.max_endpoints]
