"""The `epp` process itself against the API server: readiness on its gRPC health port
follows the first full sync, and of two replicas with leader election only the leader is
ready until it is killed, when the other one takes over."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any, AsyncIterator, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.k8s import cluster as k
from tests.k8s.conftest import POOL, sa_token
from tests.support import stop_processes

pytestmark = pytest.mark.k8s

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
async def epp_process(cluster: k.Cluster, admin: Any, namespace: str,
                      tmp_path: Any) -> AsyncIterator[Callable[..., Any]]:
    procs: list[subprocess.Popen] = []

    def start(name: str, *extra: str) -> tuple[subprocess.Popen, int]:
        health = k.free_port()
        args = [sys.executable, "-m", "epp", "--pool-name", POOL, "--pool-namespace", namespace,
                "--kubeconfig", cluster.kubeconfig(sa_token(admin, namespace)),
                "--bind-address", "127.0.0.1", "--secure-serving=false",
                "--grpc-port", str(k.free_port()), "--grpc-health-port", str(health),
                "--metrics-port", str(k.free_port()), *extra]
        log = open(tmp_path / f"{name}.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, POD_NAME=name))
        procs.append(proc)
        return proc, health

    yield start
    stop_processes(procs)


async def status(port: int, service: str) -> int | None:
    """The health status of `service` on `port`, or None if nothing answers yet."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1)
        except grpc.aio.AioRpcError:
            return None
        return resp.status


async def wait_status(port: int, service: str, want: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while await status(port, service) != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_readiness_turns_serving_after_the_pool_syncs(epp_process, admin: Any,
                                                           namespace: str):
    pools = f"/apis/inference.networking.k8s.io/v1/namespaces/{namespace}/inferencepools"
    status_code, pool = k.call(admin, "GET", f"{pools}/{POOL}")
    assert status_code == 200
    assert k.call(admin, "DELETE", f"{pools}/{POOL}")[0] == 200

    _, port = epp_process("epp-a")
    await wait_status(port, "liveness", SERVING, 60, "liveness")
    await asyncio.sleep(1.0)  # time enough to list everything: still no pool
    assert await status(port, "readiness") != SERVING

    pool["metadata"] = {"name": POOL}
    assert k.call(admin, "POST", pools, pool)[0] == 201
    await wait_status(port, "readiness", SERVING, 30, "readiness after the pool appears")
    assert await status(port, "envoy.service.ext_proc.v3.ExternalProcessor") == SERVING


async def test_two_replicas_one_leader_and_failover_on_kill(epp_process, admin: Any,
                                                           namespace: str):
    k.apply(admin, k.load_docs(k.DEPLOY / "optional" / "leader-election.yaml"), namespace)
    a, a_port = epp_process("epp-a", "--ha-enable-leader-election")
    b, b_port = epp_process("epp-b", "--ha-enable-leader-election")
    for port in (a_port, b_port):
        await wait_status(port, "liveness", SERVING, 60, "liveness")

    async def ready() -> list[bool]:
        return [await status(p, "readiness") == SERVING for p in (a_port, b_port)]

    deadline = time.monotonic() + 30
    while (r := await ready()).count(True) != 1:
        assert time.monotonic() < deadline, f"want exactly one ready replica, have {r}"
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    assert (await ready()).count(True) == 1  # and it stays that way

    leader, follower_port = (a, b_port) if r[0] else (b, a_port)
    leader.kill()  # no graceful release: the follower must wait the lease out
    t0 = time.monotonic()
    await wait_status(follower_port, "readiness", SERVING, 15 + 2 + 10, "failover")
    print(f"process failover after {time.monotonic() - t0:.1f}s (lease 15s, retry 2s)")
