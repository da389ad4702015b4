"""The native KV block index in tests: skipped when it is not built, except in CI."""

from __future__ import annotations

import os

import pytest

from epp.kvevents.index import native_available


def require_native_index() -> None:
    """Skip the calling test when `make venv` could not build `native/` (no cargo); in CI
    (CI=true, as .ci/run sets) fail instead, so that a broken build cannot hide."""
    if native_available():
        return
    message = "the native KV index is not built (make venv needs cargo; see native/README.md)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
