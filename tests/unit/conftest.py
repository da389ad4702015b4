"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from epp.kvevents import index as kv_index
from tests.native_index import require_native_index


@pytest.fixture(params=kv_index.BACKENDS)
def kv_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Runs a test once per KV block index implementation: every `KVBlockIndex()` the test
    makes (directly or through the code under test) is the native one, then the Python one."""
    if request.param == "native":
        require_native_index()
    monkeypatch.setattr(kv_index, "DEFAULT_BACKEND", request.param)
    yield request.param
