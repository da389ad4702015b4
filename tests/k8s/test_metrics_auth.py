"""`--metrics-endpoint-auth` against a real kube-apiserver: the `epp` process checks a
scraper's bearer token with a TokenReview and a SubjectAccessReview, so the ClusterRole of
deploy/kubernetes/metrics-reader.yaml decides who reads /metrics, and the EPP's own
ClusterRole in deploy/kubernetes/rbac.yaml is what lets it ask."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from tests.k8s import cluster as k
from tests.k8s.conftest import POOL, sa_token
from tests.support import stop_processes

pytestmark = pytest.mark.k8s

READER_SA = "inference-gateway-sa-metrics-reader"


def bind_cluster_roles(admin: Any, namespace: str) -> None:
    """Apply the cluster-scoped RBAC of rbac.yaml and metrics-reader.yaml for the service
    accounts of `namespace` (the bindings renamed per namespace, as with one install per
    namespace), which the `namespace` fixture leaves out."""
    docs = k.load_docs(k.DEPLOY / "rbac.yaml", k.DEPLOY / "metrics-reader.yaml")
    out = []
    for d in docs:
        if d["kind"] == "ClusterRole":
            out.append(d)
        elif d["kind"] == "ClusterRoleBinding":
            d["metadata"]["name"] = f"{d['metadata']['name']}-{namespace}"
            for s in d["subjects"]:
                s["namespace"] = namespace
            out.append(d)
    k.apply(admin, out)


@pytest.fixture
async def epp_metrics(cluster: k.Cluster, admin: Any, namespace: str,
                      tmp_path: Any) -> AsyncIterator[Callable[..., Any]]:
    """Starts `epp` with the EPP service account's token; returns its /metrics URL."""
    procs: list[subprocess.Popen] = []

    async def start(*extra: str) -> str:
        port = k.free_port()
        args = [sys.executable, "-m", "epp", "--pool-name", POOL, "--pool-namespace", namespace,
                "--kubeconfig", cluster.kubeconfig(sa_token(admin, namespace)),
                "--bind-address", "127.0.0.1", "--secure-serving=false",
                "--grpc-port", str(k.free_port()), "--grpc-health-port", str(k.free_port()),
                "--metrics-port", str(port), *extra]
        log = open(tmp_path / f"epp-{len(procs)}.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, POD_NAME=f"epp-{len(procs)}"))
        procs.append(proc)
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 60
        while True:  # until the metrics server answers at all
            assert proc.poll() is None, (tmp_path / f"epp-{len(procs) - 1}.log").read_text()
            try:
                await get(url)
                return url
            except aiohttp.ClientError:
                assert time.monotonic() < deadline, "metrics server never answered"
                await asyncio.sleep(0.1)

    yield start
    stop_processes(procs)


async def get(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get(url, headers=headers) as r:
            return r.status, await r.text()


async def test_only_the_metrics_reader_may_scrape(epp_metrics, admin: Any, namespace: str):
    bind_cluster_roles(admin, namespace)
    k.apply(admin, [{"apiVersion": "v1", "kind": "ServiceAccount",
                     "metadata": {"name": "no-metrics-role"}}], namespace)
    url = await epp_metrics()  # --metrics-endpoint-auth defaults to true with a cluster

    assert (await get(url))[0] == 401
    assert (await get(url, "not-a-token"))[0] == 401

    status, page = await get(url, sa_token(admin, namespace, READER_SA))
    assert status == 200, page
    assert "# TYPE inference_pool_ready_pods gauge" in page

    status, body = await get(url, sa_token(admin, namespace, "no-metrics-role"))
    assert status == 403
    assert f"system:serviceaccount:{namespace}:no-metrics-role" in body

    # The status page: the same reviews, for its own non-resource URL (metrics-reader.yaml).
    page_url = url.replace("/metrics", "/debug/status")
    assert (await get(page_url))[0] == 401
    status, page = await get(page_url, sa_token(admin, namespace, READER_SA))
    assert status == 200 and "EPP status" in page, page
    assert (await get(page_url, sa_token(admin, namespace, "no-metrics-role")))[0] == 403


async def test_auth_off_by_flag_serves_everyone(epp_metrics):
    url = await epp_metrics("--metrics-endpoint-auth=false")
    status, page = await get(url)
    assert status == 200 and "inference_pool_ready_pods" in page


async def test_without_review_rights_the_epp_answers_503_and_keeps_serving(
        epp_metrics, admin: Any, namespace: str):
    # No ClusterRoleBinding for the EPP: its TokenReview is forbidden, which is the EPP's
    # problem, not the scraper's (503, logged), and the process stays up.
    url = await epp_metrics()
    assert (await get(url, sa_token(admin, namespace, READER_SA)))[0] == 503
    assert (await get(url))[0] == 401
