"""The EPP as an InferencePool's endpoint picker, against a real kube-apiserver and etcd.

Each test gets a namespace with deploy/kubernetes applied (CRDs, RBAC, the EPP Deployment
and Service, the example InferencePool, the food-review / llama3-base-model objectives,
the simulator Deployment), and runs `KubernetesSource` with the EPP service account's own
token, so RBAC is exercised as in a cluster. The tests play the kubelet.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Callable

import pytest

from epp.config import load_config
from epp.datastore import Datastore
from epp.k8s import KubernetesSettings, KubernetesSource
from epp.k8s.settings import GROUP_X
from epp.objectives import ObjectiveStore
from epp.scheduling import Scheduler
from tests.k8s import cluster as k
from tests.k8s.conftest import POOL, CuttableProxy, Kubelet, eventually, sa_token

pytestmark = pytest.mark.k8s


def endpoints(ds: Datastore) -> dict[str, str]:
    return {e.name: e.hostport for e in ds.endpoints()}


Factory = Callable[..., Any]


@pytest.fixture
async def start_epp(cluster: k.Cluster, admin: Any, namespace: str) -> AsyncIterator[Factory]:
    """Start a KubernetesSource as the EPP's service account; stopped at teardown."""
    started: list[KubernetesSource] = []

    async def start(url: str | None = None, wait_ready: bool = True,
                    **overrides: Any) -> tuple[KubernetesSource, Datastore, ObjectiveStore]:
        token = sa_token(admin, namespace)
        opts: dict[str, Any] = dict(pool_name=POOL, pool_namespace=namespace,
                                    kubeconfig=cluster.kubeconfig(token, url),
                                    backoff_initial=0.1, backoff_max=1.0, watch_timeout=60)
        opts.update(overrides)
        ds = Datastore()
        store = ObjectiveStore(opts.get("pool_name") or "", namespace)
        src = KubernetesSource(ds, store, KubernetesSettings(**opts))
        await src.start()
        started.append(src)
        if wait_ready:
            await eventually(src.ready.is_set, 30, "first full sync")
        return src, ds, store

    yield start
    for src in started:
        await src.stop()


async def test_pods_appear_turn_ready_unready_and_leave(start_epp: Factory, kubelet: Kubelet):
    src, ds, _ = await start_epp()
    assert src.serving and endpoints(ds) == {}

    kubelet.create("vllm-0")  # scheduled, no IP yet: not an endpoint
    kubelet.start("vllm-1", "10.0.0.11")
    kubelet.start("other", "10.0.0.99", labels={"app": "something-else"})
    await eventually(lambda: endpoints(ds) == {"vllm-1-rank-0": "10.0.0.11:8000"},
                     what="vllm-1 only")

    kubelet.set_status("vllm-0", "10.0.0.10", ready=True)
    await eventually(lambda: "vllm-0-rank-0" in endpoints(ds), what="vllm-0 ready")

    kubelet.set_status("vllm-1", "10.0.0.11", ready=False)
    await eventually(lambda: endpoints(ds) == {"vllm-0-rank-0": "10.0.0.10:8000"},
                     what="vllm-1 unready")

    kubelet.delete("vllm-0")
    await eventually(lambda: endpoints(ds) == {}, what="vllm-0 deleted")


async def test_pool_selector_and_ports_change(start_epp: Factory, kubelet: Kubelet, admin: Any,
                                              namespace: str):
    src, ds, _ = await start_epp()
    kubelet.start("blue-0", "10.0.1.1")
    kubelet.start("green-0", "10.0.1.2", labels={"app": "green"},
                  annotations={"inference.networking.k8s.io/active-ports": "8001"})
    await eventually(lambda: set(endpoints(ds)) == {"blue-0-rank-0"}, what="blue")

    path = f"/apis/inference.networking.k8s.io/v1/namespaces/{namespace}/inferencepools/{POOL}"
    status, body = k.call(admin, "PATCH", path,
                          {"spec": {"selector": {"matchLabels": {"app": "green"}},
                                    "targetPorts": [{"number": 8000}, {"number": 8001}]}},
                          "application/merge-patch+json")
    assert status == 200, body
    # green-0 announces only 8001 active: one endpoint, rank 1 (the port's index).
    await eventually(lambda: endpoints(ds) == {"green-0-rank-1": "10.0.1.2:8001"},
                     what="green after selector change")
    assert src.pool is not None and src.pool.target_ports == (8000, 8001)

    kubelet.patch("green-0", {"annotations": {"inference.networking.k8s.io/active-ports": None}})
    await eventually(lambda: set(endpoints(ds)) == {"green-0-rank-0", "green-0-rank-1"},
                     what="both ports once the annotation is gone")


async def test_objective_priority_change_takes_effect(start_epp: Factory, admin: Any,
                                                      namespace: str):
    _, _, store = await start_epp()
    # The manifests' objectives were synced before readiness.
    assert store.resolve("llama3", "food-review", None, 0.0).priority == 10
    assert store.resolve("llama3", "llama3-base-model", None, 0.0).priority == 20

    path = (f"/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/{namespace}"
            f"/inferenceobjectives/food-review")
    status, body = k.call(admin, "PATCH", path, {"spec": {"priority": 30}},
                          "application/merge-patch+json")
    assert status == 200, body
    await eventually(lambda: store.resolve("llama3", "food-review", None, 0.0).priority == 30,
                     what="new priority")

    # A rewrite for this pool applies; one for another pool does not.
    base = f"/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/{namespace}"
    for name, pool in (("canary", POOL), ("elsewhere", "other-pool")):
        status, body = k.call(admin, "POST", f"{base}/inferencemodelrewrites", {
            "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
            "kind": "InferenceModelRewrite", "metadata": {"name": name},
            "spec": {"poolRef": {"name": pool},
                     "rules": [{"matches": [{"model": {"value": f"{name}-model"}}],
                                "targets": [{"modelRewrite": f"{name}-v2"}]}]}})
        assert status == 201, body
    await eventually(lambda: store.resolve("canary-model", None, None, 0.0).target_model
                     == "canary-v2", what="rewrite applied")
    assert store.resolve("elsewhere-model", None, None, 0.0).target_model == "elsewhere-model"

    status, _ = k.call(admin, "DELETE", f"{base}/inferenceobjectives/food-review")
    assert status == 200
    await eventually(lambda: store.resolve("llama3", "food-review", None, 0.0).priority == 0,
                     what="deleted objective falls back to the default priority")


async def test_objectives_in_either_group_and_in_both(start_epp: Factory, admin: Any,
                                                      namespace: str):
    """GKE serves InferenceObjective under inference.networking.k8s.io/v1alpha2 as well;
    the EPP reads both groups, and one name in both is one objective that lasts while
    either copy does."""
    _, _, store = await start_epp()
    v1 = f"/apis/inference.networking.k8s.io/v1alpha2/namespaces/{namespace}/inferenceobjectives"
    x = f"/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/{namespace}/inferenceobjectives"

    def objective(name: str, priority: int) -> dict[str, Any]:
        return {"apiVersion": "inference.networking.k8s.io/v1alpha2", "kind": "InferenceObjective",
                "metadata": {"name": name}, "spec": {"priority": priority, "poolRef": {"name": POOL}}}

    assert k.call(admin, "POST", v1, objective("batch", 5))[0] == 201
    await eventually(lambda: store.resolve("m", "batch", None, 0.0).priority == 5,
                     what="objective of the v1 group")

    # food-review also exists in the x-k8s group (priority 10, from the manifests).
    assert k.call(admin, "POST", v1, objective("food-review", 40))[0] == 201
    await eventually(lambda: store.resolve("m", "food-review", None, 0.0).priority == 40,
                     what="the latest write wins")
    assert k.call(admin, "DELETE", f"{v1}/food-review")[0] == 200
    await eventually(lambda: store.resolve("m", "food-review", None, 0.0).priority == 10,
                     what="the x-k8s copy remains")
    assert k.call(admin, "DELETE", f"{x}/food-review")[0] == 200
    await eventually(lambda: store.resolve("m", "food-review", None, 0.0).priority == 0,
                     what="gone with both copies")


async def test_a_role_without_an_objective_group_still_syncs(start_epp: Factory, admin: Any,
                                                             namespace: str, cluster: k.Cluster):
    """RBAC written for another EPP (the upstream chart's Role has no InferenceObjective of
    the v1 group, nor rewrites) must not keep this one from becoming ready."""
    role = next(d for d in k.load_docs(k.DEPLOY / "rbac.yaml") if d["kind"] == "Role")
    role["rules"] = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                     {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"],
                      "verbs": ["get", "list", "watch"]},
                     {"apiGroups": ["inference.networking.x-k8s.io"],
                      "resources": ["inferenceobjectives"], "verbs": ["get", "list", "watch"]}]
    k.apply(admin, [role], namespace)
    epp = cluster.client_for(sa_token(admin, namespace))
    v1_objectives = f"/apis/inference.networking.k8s.io/v1alpha2/namespaces/{namespace}/inferenceobjectives"
    await eventually(lambda: k.call(epp, "GET", v1_objectives)[0] == 403, what="RBAC in force")
    epp.close()
    _, _, store = await start_epp()  # waits for the first full sync
    assert store.resolve("m", "food-review", None, 0.0).priority == 10


async def test_standalone_selector_without_crds(start_epp: Factory, kubelet: Kubelet):
    _, ds, _ = await start_epp(pool_name=None, endpoint_selector={"app": "vllm"},
                               endpoint_target_ports=(8000, 8002))
    kubelet.start("s-0", "10.0.2.1", labels={"app": "vllm"})
    kubelet.start("s-1", "10.0.2.2", labels={"app": "not-vllm"})
    await eventually(lambda: endpoints(ds) == {"s-0-rank-0": "10.0.2.1:8000",
                                               "s-0-rank-1": "10.0.2.1:8002"},
                     what="standalone endpoints")


async def test_legacy_pool_group(start_epp: Factory, kubelet: Kubelet, admin: Any,
                                 namespace: str):
    status, body = k.call(admin, "POST",
                          f"/apis/{GROUP_X}/v1alpha2/namespaces/{namespace}/inferencepools", {
                              "apiVersion": f"{GROUP_X}/v1alpha2", "kind": "InferencePool",
                              "metadata": {"name": "legacy"},
                              "spec": {"selector": {"app": "old"}, "targetPortNumber": 9000}})
    assert status == 201, body
    _, ds, _ = await start_epp(pool_name="legacy", pool_group=GROUP_X)
    kubelet.start("old-0", "10.0.3.1", labels={"app": "old"})
    await eventually(lambda: endpoints(ds) == {"old-0-rank-0": "10.0.3.1:9000"}, what="legacy")


async def test_apiserver_restart_mid_watch_loses_no_update(
        cluster: k.Cluster, start_epp: Factory, kubelet: Kubelet, proxy: CuttableProxy):
    src, ds, _ = await start_epp(url=proxy.url)
    kubelet.start("r-0", "10.0.4.1")
    kubelet.start("r-1", "10.0.4.2")
    await eventually(lambda: len(endpoints(ds)) == 2, what="two pods")
    errors_before = {n: r.stats.errors for n, r in src.reflectors.items()}

    # The API server goes away under the open watches, then comes back. While the EPP is
    # still cut off, the pods change; the EPP must catch up on all of it.
    t0 = time.monotonic()
    proxy.set_cut(True)
    cluster.restart_apiserver()
    await asyncio.sleep(1.0)  # let the retries run on the loop-free threads a little
    away = time.monotonic() - t0
    assert set(endpoints(ds)) == {"r-0-rank-0", "r-1-rank-0"}  # last known state serves
    assert src.serving  # and readiness holds: the EPP can still route
    for name, r in src.reflectors.items():
        retries = r.stats.errors - errors_before[name]
        # Backoff (0.1 s doubling to 1 s, jittered) allows about 1-2 tries a second;
        # a busy loop would make hundreds.
        assert 1 <= retries <= 6 + 2 * away, (name, retries, away)
    kubelet.delete("r-0")
    kubelet.start("r-2", "10.0.4.3")
    kubelet.set_status("r-1", "10.0.4.20", ready=True)  # new IP
    proxy.set_cut(False)

    await eventually(lambda: endpoints(ds) == {"r-1-rank-0": "10.0.4.20:8000",
                                               "r-2-rank-0": "10.0.4.3:8000"},
                     timeout=60, what="state after the restart")
    assert src.serving


async def test_watch_410_gone_relists(cluster: k.Cluster, start_epp: Factory,
                                      kubelet: Kubelet, admin: Any, proxy: CuttableProxy):
    src, ds, _ = await start_epp(url=proxy.url)
    kubelet.start("g-0", "10.0.5.1")
    await eventually(lambda: "g-0-rank-0" in endpoints(ds), what="g-0")
    pods = src.reflectors["pods"]
    old_rv = pods.resource_version
    assert old_rv

    proxy.set_cut(True)
    kubelet.delete("g-0")  # a deletion only a relist can discover after compaction
    kubelet.start("g-1", "10.0.5.2")
    # Wait until etcd has compacted past the EPP's resourceVersion (the pods watch cache
    # is off in the test API server, so the resumed watch will reach etcd).
    path = f"/api/v1/namespaces/{kubelet.ns}/pods?resourceVersion={old_rv}&resourceVersionMatch=Exact"
    await eventually(lambda: k.call(admin, "GET", path)[0] == 410, timeout=30,
                     what="compaction past the EPP's resourceVersion")
    gone_before = pods.stats.gone
    proxy.set_cut(False)

    await eventually(lambda: endpoints(ds) == {"g-1-rank-0": "10.0.5.2:8000"}, timeout=30,
                     what="relisted state")
    assert pods.stats.gone > gone_before


async def test_leader_election_failover(start_epp: Factory, admin: Any, namespace: str):
    k.apply(admin, k.load_docs(k.DEPLOY / "optional" / "leader-election.yaml"), namespace)
    ha = dict(leader_election=True, lease_duration=3.0, renew_deadline=2.0, retry_period=0.3)
    a, _, _ = await start_epp(identity="epp-a", **ha)
    b, _, _ = await start_epp(identity="epp-b", **ha)

    await eventually(lambda: a.serving != b.serving, what="exactly one leader")
    leader, follower = (a, b) if a.serving else (b, a)
    assert leader.ready.is_set() and follower.ready.is_set()  # both synced, one serves

    # The leader dies without releasing the lease (no graceful shutdown).
    for r in leader.reflectors.values():
        r.stop()
    assert leader.leader is not None
    t0 = time.monotonic()
    await leader.leader.stop(release=False)
    await eventually(lambda: follower.serving, timeout=3.0 * 3, what="follower takes over")
    print(f"failover after {time.monotonic() - t0:.2f}s (lease 3s, retry 0.3s)")

    status, lease = k.call(admin, "GET", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}"
                           f"/leases/epp-{POOL}-leader")
    assert status == 200 and lease["spec"]["holderIdentity"] == follower.settings.identity


async def test_readiness_waits_for_the_pool_and_priority_reaches_the_next_request(
        start_epp: Factory, kubelet: Kubelet, admin: Any, namespace: str):
    """Wired as the EPP wires it: readiness on the gRPC health port follows
    `KubernetesSource.serving`; the director resolves priorities from the ObjectiveStore."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from epp.director import Director
    from epp.request import InferenceRequest, parse_body
    from epp.server.health import HealthService

    pool_path = (f"/apis/inference.networking.k8s.io/v1/namespaces/{namespace}"
                 f"/inferencepools/{POOL}")
    status, pool = k.call(admin, "GET", pool_path)
    assert status == 200
    assert k.call(admin, "DELETE", pool_path)[0] == 200

    health = HealthService()
    port = await health.start("127.0.0.1", 0)
    try:
        src, ds, store = await start_epp(wait_ready=False)
        src.add_readiness_listener(lambda ok: asyncio.ensure_future(health.set_ready(ok)))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)

            async def state(name: str) -> int:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=name))
                return resp.status

            # Everything is listed, but the pool does not exist: not ready, yet alive.
            await eventually(lambda: {"pods", "pool"} <= src.synced, what="lists done")
            assert await state("readiness") == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await state("liveness") == health_pb2.HealthCheckResponse.SERVING
            assert not src.ready.is_set()

            pool["metadata"] = {"name": POOL}
            assert k.call(admin, "POST", pool_path.rsplit("/", 1)[0], pool)[0] == 201
            await eventually(src.ready.is_set, what="ready once the pool exists")
            await eventually(lambda: health.ready, what="health flipped")
            assert await state("readiness") == health_pb2.HealthCheckResponse.SERVING

        kubelet.start("d-0", "10.0.6.1")
        await eventually(lambda: len(ds.endpoints()) == 1, what="one endpoint")
        director = Director(ds, Scheduler.from_config(load_config(None)), resolver=store)
        body = b'{"model": "llama3", "prompt": "hi"}'

        def request(i: int) -> InferenceRequest:
            return InferenceRequest(request_id=f"r{i}", path="/v1/completions",
                                    headers={"x-gateway-inference-objective": "food-review"},
                                    body=body, parsed=parse_body("/v1/completions", body))

        first = await director.route(request(1))
        assert (first.priority, first.hostport) == (10, "10.0.6.1:8000")
        obj_path = (f"/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/{namespace}"
                    f"/inferenceobjectives/food-review")
        assert k.call(admin, "PATCH", obj_path, {"spec": {"priority": 15}},
                      "application/merge-patch+json")[0] == 200
        await eventually(lambda: store.resolve("llama3", "food-review", None, 0).priority == 15,
                         what="store updated")
        assert (await director.route(request(2))).priority == 15
    finally:
        await health.stop(0)


async def test_helm_chart_applies_to_the_api_server(cluster: k.Cluster, admin: Any,
                                                   namespace: str):
    """The chart's default and HA renderings are valid objects for a real API server
    (test_gke_guide.py installs it with helm itself)."""
    import subprocess

    helm = k.binaries(with_helm=True)
    assert helm is not None, "helm not built: run tests/k8s/build_apiserver.sh"
    for i, sets in enumerate(([], ["inferenceExtension.replicas=2",
                                   "inferenceObjectives[0].name=chat",
                                   "inferenceObjectives[0].priority=5"])):
        args = [str(helm[2]), "template", f"helm-pool-{i}", str(k.REPO / "deploy" / "helm" / "epp"),
                "--namespace", namespace, "--set", "inferencePool.modelServers.matchLabels.app=vllm"]
        for s in sets:
            args += ["--set", s]
        out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)
        docs = [d for d in __import__("yaml").safe_load_all(out.stdout) if d]
        k.apply(admin, docs, namespace)
    status, objective = k.call(admin, "GET", f"/apis/inference.networking.x-k8s.io/v1alpha2"
                               f"/namespaces/{namespace}/inferenceobjectives/chat")
    assert status == 200 and objective["spec"]["priority"] == 5
    status, pool = k.call(admin, "GET", f"/apis/inference.networking.k8s.io/v1"
                          f"/namespaces/{namespace}/inferencepools/helm-pool-1")
    assert status == 200 and pool["spec"]["endpointPickerRef"]["failureMode"] == "FailClose"
