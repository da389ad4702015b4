"""Hypothesis budgets: small and reproducible in `make test`, large in `make fuzz`.

`make fuzz` sets EPP_FUZZ=deep (thousands of examples per property, random seeds). A
failing example that a deep run finds is then written down as a regular test next to the
property (the `*_regressions` tests), so that `make test` keeps checking it.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "deep", max_examples=int(os.environ.get("EPP_FUZZ_EXAMPLES", "3000")), deadline=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("deep" if os.environ.get("EPP_FUZZ") == "deep" else "ci")
