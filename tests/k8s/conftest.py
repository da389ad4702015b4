"""Fixtures for the `k8s` tests: one etcd + kube-apiserver per session, a fresh
namespace per test with deploy/kubernetes applied to it, and helpers that play the
kubelet (pod status) and a flaky network (a TCP proxy that can be cut)."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Any, Awaitable, Callable, Iterator

import pytest

from tests.k8s import cluster as k

_ns_counter = itertools.count()


@pytest.fixture(scope="session")
def cluster() -> Iterator[k.Cluster]:
    if k.binaries() is None and os.environ.get("EPP_K8S_SKIP_MISSING") == "1":
        pytest.skip("kube-apiserver/etcd not built (tests/k8s/build_apiserver.sh)")
    c = k.start_cluster()
    try:
        admin = c.admin()
        crds = sorted((k.DEPLOY / "crds").glob("*.yaml"))
        cluster_scoped = [d for d in k.load_docs(k.DEPLOY / "metrics-reader.yaml")
                          if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
        k.apply(admin, k.load_docs(*crds) + cluster_scoped)
        admin.close()
        yield c
    finally:
        c.stop()


@pytest.fixture
def admin(cluster: k.Cluster) -> Iterator[Any]:
    api = cluster.admin()
    yield api
    api.close()


@pytest.fixture
def namespace(cluster: k.Cluster, admin: Any, request: pytest.FixtureRequest) -> str:
    """A new namespace with every namespaced manifest of deploy/kubernetes applied."""
    ns = f"t{next(_ns_counter)}-{request.node.name.lower().replace('_', '-')[:40]}".rstrip("-")
    k.apply(admin, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}])
    docs = k.load_docs(k.DEPLOY / "rbac.yaml", k.DEPLOY / "metrics-reader.yaml",
                       k.DEPLOY / "epp.yaml", k.DEPLOY / "inferencepool.yaml",
                       k.DEPLOY / "objectives.yaml", k.DEPLOY / "sim.yaml")
    k.apply(admin, [d for d in docs if d["kind"] not in ("ClusterRole", "ClusterRoleBinding")],
            namespace=ns)
    return ns


EPP_SA = "vllm-llama3-8b-instruct-epp"
POOL = "vllm-llama3-8b-instruct"
POOL_LABELS = {"app": "vllm-llama3-8b-instruct"}


def sa_token(admin: Any, namespace: str, sa: str = EPP_SA) -> str:
    """A real service-account token (TokenRequest), as a pod would have mounted."""
    status, body = k.call(admin, "POST",
                          f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token",
                          {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                           "spec": {"expirationSeconds": 3600}})
    assert status == 201 or status == 200, body
    return body["status"]["token"]


class Kubelet:
    """Creates pods and writes their status, as a kubelet would (there is none)."""

    def __init__(self, admin: Any, namespace: str) -> None:
        self.admin, self.ns = admin, namespace

    def _path(self, name: str = "") -> str:
        return f"/api/v1/namespaces/{self.ns}/pods" + (f"/{name}" if name else "")

    def create(self, name: str, labels: dict[str, str] | None = None,
               annotations: dict[str, str] | None = None) -> None:
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "labels": labels or dict(POOL_LABELS),
                             "annotations": annotations or {}},
                "spec": {"containers": [{"name": "vllm", "image": "vllm:none"}]}}
        status, out = k.call(self.admin, "POST", self._path(), body)
        assert status == 201, out

    def set_status(self, name: str, ip: str | None, ready: bool) -> None:
        status_body = {
            "phase": "Running" if ip else "Pending",
            "podIP": ip, "podIPs": [{"ip": ip}] if ip else None,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        }
        status, out = k.call(self.admin, "PATCH", self._path(name) + "/status",
                             {"status": status_body}, "application/merge-patch+json")
        assert status == 200, out

    def start(self, name: str, ip: str, labels: dict[str, str] | None = None,
              annotations: dict[str, str] | None = None) -> None:
        self.create(name, labels, annotations)
        self.set_status(name, ip, True)

    def patch(self, name: str, metadata: dict[str, Any]) -> None:
        status, out = k.call(self.admin, "PATCH", self._path(name), {"metadata": metadata},
                             "application/merge-patch+json")
        assert status == 200, out

    def delete(self, name: str) -> None:
        status, out = k.call(self.admin, "DELETE", self._path(name) + "?gracePeriodSeconds=0")
        assert status in (200, 202), out

    def rv(self) -> str:
        return k.call(self.admin, "GET", self._path())[1]["metadata"]["resourceVersion"]


@pytest.fixture
def kubelet(admin: Any, namespace: str) -> Kubelet:
    return Kubelet(admin, namespace)


async def eventually(pred: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """Poll `pred` on the loop until truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        await asyncio.sleep(0.05)


class CuttableProxy:
    """A TCP forwarder to the API server that the test can cut and restore.

    While cut, open connections are reset and new ones are closed at once: to the EPP
    this looks like the API server being away, while the test keeps its own direct line.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut = False
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, uw))

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                w.close()
                self._writers.discard(w)

        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))

    def set_cut(self, cut: bool) -> None:
        self.cut = cut
        if cut:
            for w in list(self._writers):
                w.transport.abort()
            self._writers.clear()

    async def stop(self) -> None:
        self.set_cut(True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def proxy(cluster: k.Cluster) -> Any:
    p = CuttableProxy(cluster.port)
    await p.start()
    yield p
    await p.stop()


Eventually = Callable[..., Awaitable[Any]]
