from __future__ import annotations

import tempfile
from typing import Iterator

import pytest
import yaml

from tests.support import EnvoyProcess, EppProcess, UpstreamFleet, start_envoy, start_epp


@pytest.fixture(scope="module")
def fleet() -> Iterator[UpstreamFleet]:
    with UpstreamFleet(3) as f:
        yield f


@pytest.fixture(scope="module")
def endpoints_file(fleet: UpstreamFleet) -> str:
    f = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    yaml.safe_dump([{"name": u.name, "address": "127.0.0.1", "port": u.port} for u in fleet.upstreams], f)
    f.close()
    return f.name


@pytest.fixture(scope="module")
def epp(endpoints_file: str) -> Iterator[EppProcess]:
    p = start_epp(endpoints_file=endpoints_file)
    yield p
    p.proc.stop()


def envoy_for(epp: EppProcess, body_mode: str) -> Iterator[EnvoyProcess]:
    e = start_envoy(epp.grpc_port, body_mode=body_mode)
    yield e
    e.proc.stop()
