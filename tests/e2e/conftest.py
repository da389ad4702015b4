from __future__ import annotations

import tempfile
from typing import Iterator

import pytest
import yaml

from tests.support import (
    EnvoyProcess,
    EppProcess,
    UpstreamFleet,
    scratch_dir,
    start_envoy,
    start_epp,
    vllm_page,
)


@pytest.fixture(scope="module")
def fleet() -> Iterator[UpstreamFleet]:
    """u0 is busy, u1 idle, u2 serves no metrics at all."""
    with UpstreamFleet(3) as f:
        f.upstreams[0].metrics_page = vllm_page(waiting=8, running=20, kv=0.9)
        f.upstreams[1].metrics_page = vllm_page(waiting=0, running=1, kv=0.1)
        f.upstreams[2].metrics_page = "<html>not metrics</html>"
        yield f


@pytest.fixture(scope="module")
def endpoints_file(fleet: UpstreamFleet) -> str:
    f = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, dir=scratch_dir())
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
