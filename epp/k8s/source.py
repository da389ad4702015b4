"""Kubernetes as a source of endpoints and objectives for the datastore.

`KubernetesSource` runs one `Reflector` per collection: the InferencePool (unless
standalone), the Pods of its namespace, and the InferenceObjective / InferenceModelRewrite
/ legacy InferenceModel objects. Their callbacks run on the event loop and keep a cache of
raw objects; any change to the pool or a pod recomputes the endpoint set and hands it to
`Datastore.set_endpoints`, which diffs and keeps the metrics of survivors.

Pods are watched across the whole namespace and filtered here (not by a server-side label
selector) so that a change of the pool's selector takes effect without restarting a watch.
In standalone mode the fixed selector goes to the server instead.

Readiness: `ready` is set once every collection has been listed and (in pool mode) the
pool exists. `serving` adds leadership when leader election is on; listeners registered
with `add_readiness_listener` hear every change of `serving`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Callable, Protocol

from epp.datastore import Datastore, Endpoint
from epp.k8s.leader import LeaderElector
from epp.k8s.objects import (
    InvalidObject,
    PoolSpec,
    object_key,
    parse_pool,
    pod_endpoints,
    references_pool,
)
from epp.k8s.reflector import Obj, Reflector
from epp.k8s.settings import GROUP_V1, GROUP_X, KubernetesSettings, load_api_client

log = logging.getLogger(__name__)

# (collection, kind, plural, group, version) of the objects that configure requests for a
# pool. GKE serves InferenceObjective under the v1 group's v1alpha2 as well as under the
# x-k8s group, and its guide uses both: either is watched (a CRD not installed is an empty
# collection). An objective of one name in both groups is one objective: the copy seen
# last wins, and the objective stays while either copy exists.
OBJECTIVE_KINDS: tuple[tuple[str, str, str, str, str], ...] = (
    ("InferenceObjective", "InferenceObjective", "inferenceobjectives", GROUP_X, "v1alpha2"),
    (f"InferenceObjective.{GROUP_V1}", "InferenceObjective", "inferenceobjectives", GROUP_V1,
     "v1alpha2"),
    ("InferenceModelRewrite", "InferenceModelRewrite", "inferencemodelrewrites", GROUP_X,
     "v1alpha2"),
    ("InferenceModel", "InferenceModel", "inferencemodels", GROUP_X, "v1alpha2"),
)
_KIND_OF = {c[0]: c[1] for c in OBJECTIVE_KINDS}


class ObjectiveSink(Protocol):
    """What the source needs from epp.objectives.ObjectiveStore.

    Keys are (kind, namespace, name); `obj` is the raw Kubernetes object (a dict with
    `metadata` and `spec`). `add` of an existing key replaces it.
    """

    def add(self, kind: str, namespace: str, name: str, obj: Obj) -> None: ...
    def delete(self, kind: str, namespace: str, name: str) -> None: ...


class StoreSink:
    """Adapts `epp.objectives.ObjectiveStore` (typed objects) to `ObjectiveSink` (raw dicts).

    Conversion uses `epp.manifests.object_from_manifest`, the same parser as
    `--objectives-file`, so a cluster and a file accept exactly the same objects.
    """

    def __init__(self, store: Any) -> None:
        self.store = store

    def add(self, kind: str, namespace: str, name: str, obj: Obj) -> None:
        from epp.manifests import object_from_manifest

        typed = object_from_manifest(obj)
        if typed is not None:
            self.store.upsert(typed)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        from epp.objectives import ObjectKey

        self.store.delete(ObjectKey(kind, namespace, name))


class KubernetesSource:
    """Feeds `datastore` (and `objectives`, if given) from the API server.

    Call `await start()` on the running loop; `await stop()` on shutdown.
    """

    def __init__(
        self,
        datastore: Datastore,
        objectives: Any,
        settings: KubernetesSettings,
        *,
        api_client: Any = None,
    ) -> None:
        self.datastore = datastore
        if objectives is not None and not hasattr(objectives, "add") and hasattr(objectives, "upsert"):
            objectives = StoreSink(objectives)  # an epp.objectives.ObjectiveStore
        self.objectives: ObjectiveSink | None = objectives
        self.settings = settings
        self._api = api_client
        self._own_api = api_client is None
        self.ready = asyncio.Event()
        """Set once after the first full sync of every collection (and the pool exists)."""
        self.pool: PoolSpec | None = None
        self.leader: LeaderElector | None = None
        self.reflectors: dict[str, Reflector] = {}
        self._pods: dict[str, Obj] = {}
        self._objs: dict[str, dict[tuple[str, str], Obj]] = {k[0]: {} for k in OBJECTIVE_KINDS}
        self._synced: set[str] = set()
        self._listeners: list[Callable[[bool], None]] = []
        self._serving = False
        self._started = False

    # -- public --------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """What the readiness probe should say now."""
        return self._serving

    @property
    def synced(self) -> frozenset[str]:
        """Names of the collections listed at least once ("pool", "pods", kinds...)."""
        return frozenset(self._synced)

    def add_readiness_listener(self, cb: Callable[[bool], None]) -> None:
        """`cb(serving)` runs on the loop whenever `serving` changes."""
        self._listeners.append(cb)

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        loop = asyncio.get_running_loop()
        s = self.settings
        if self._api is None:
            self._api = await loop.run_in_executor(None, load_api_client, s.kubeconfig)
        from kubernetes import client

        core = client.CoreV1Api(self._api)
        custom = client.CustomObjectsApi(self._api)
        ns = s.pool_namespace
        common = dict(watch_timeout=s.watch_timeout, backoff_initial=s.backoff_initial,
                      backoff_max=s.backoff_max)

        if s.standalone:
            self.pool = PoolSpec(
                name="", namespace=ns, selector=dict(s.endpoint_selector or {}),
                target_ports=s.endpoint_target_ports,
            )
            selector = ",".join(f"{k}={v}" for k, v in self.pool.selector.items())
            self._add(Reflector("pods", functools.partial(core.list_namespaced_pod, ns), loop,
                                self._pods_replace, self._pods_event,
                                label_selector=selector, **common))
        else:
            pools = functools.partial(custom.list_namespaced_custom_object, s.pool_group,
                                      s.pool_version, ns, "inferencepools")
            self._add(Reflector("pool", pools, loop, self._pool_replace, self._pool_event,
                                field_selector=f"metadata.name={s.pool_name}", **common))
            self._add(Reflector("pods", functools.partial(core.list_namespaced_pod, ns), loop,
                                self._pods_replace, self._pods_event, **common))
            if s.watch_objectives:
                for coll, _kind, plural, group, version in OBJECTIVE_KINDS:
                    fn = functools.partial(custom.list_namespaced_custom_object,
                                           group, version, ns, plural)
                    self._add(Reflector(
                        coll, fn, loop,
                        functools.partial(self._objs_replace, coll),
                        functools.partial(self._objs_event, coll),
                        optional=True, absent_retry=min(30.0, s.backoff_max), **common))

        if s.leader_election:
            self.leader = LeaderElector(
                self._api, namespace=ns, name=s.lease, identity=s.identity,
                lease_duration=s.lease_duration, renew_deadline=s.renew_deadline,
                retry_period=s.retry_period,
            )
            self.leader.add_listener(lambda _leading: self._update_serving())
        for r in self.reflectors.values():
            r.start()
        if self.leader is not None:
            await self.leader.start()
        log.info("k8s source started: %s in namespace %s",
                 "standalone selector" if s.standalone else f"pool {s.pool_name}", ns)

    async def stop(self) -> None:
        """Stop every watch (and give up leadership); the datastore keeps its last state."""
        for r in self.reflectors.values():
            r.stop()
        if self.leader is not None:
            await self.leader.stop()
        loop = asyncio.get_running_loop()
        for r in self.reflectors.values():
            await loop.run_in_executor(None, r.join, 5.0)
        if self._own_api and self._api is not None:
            await loop.run_in_executor(None, self._api.close)
        self._set_serving(False)

    # -- wiring --------------------------------------------------------------------

    def _add(self, r: Reflector) -> None:
        self.reflectors[r.name] = r

    def _mark_synced(self, name: str) -> None:
        if name not in self._synced:
            self._synced.add(name)
            log.info("k8s %s: first list done", name)
        self._update_serving()

    def _update_serving(self) -> None:
        synced = set(self.reflectors) <= self._synced and self.pool is not None
        if synced and not self.ready.is_set():
            self.ready.set()
            log.info("k8s source: initial sync complete (%d endpoints)",
                     len(self.datastore.endpoints()))
        leading = self.leader is None or self.leader.is_leader
        self._set_serving(synced and leading)

    def _set_serving(self, value: bool) -> None:
        if value == self._serving:
            return
        self._serving = value
        log.info("k8s source: readiness %s", "SERVING" if value else "NOT_SERVING")
        for cb in list(self._listeners):
            try:
                cb(value)
            except Exception:  # noqa: BLE001
                log.exception("readiness listener failed")

    # -- pool ----------------------------------------------------------------------

    def _pool_replace(self, items: list[Obj]) -> None:
        mine = [o for o in items if object_key(o)[1] == self.settings.pool_name]
        self._set_pool(mine[0] if mine else None)
        self._mark_synced("pool")

    def _pool_event(self, etype: str, obj: Obj) -> None:
        if object_key(obj)[1] != self.settings.pool_name:
            return
        self._set_pool(None if etype == "DELETED" else obj)

    def _set_pool(self, obj: Obj | None) -> None:
        if obj is None:
            if self.pool is not None:
                log.warning("k8s: InferencePool %s/%s is gone; no endpoints",
                            self.settings.pool_namespace, self.settings.pool_name)
            self.pool = None
        else:
            try:
                self.pool = parse_pool(obj, self.settings.pool_group)
            except InvalidObject as e:
                # Keep the last good spec: a bad edit should not empty a serving pool.
                log.error("k8s: ignoring invalid pool update: %s", e)
                return
        self._recompute()
        self._update_serving()

    # -- pods ----------------------------------------------------------------------

    def _pods_replace(self, items: list[Obj]) -> None:
        self._pods = {object_key(p)[1]: p for p in items}
        self._recompute()
        self._mark_synced("pods")

    def _pods_event(self, etype: str, obj: Obj) -> None:
        name = object_key(obj)[1]
        if etype == "DELETED":
            self._pods.pop(name, None)
        else:
            self._pods[name] = obj
        self._recompute()

    def _recompute(self) -> None:
        pool = self.pool
        endpoints: list[Endpoint] = []
        if pool is not None:
            for pod in self._pods.values():
                try:
                    endpoints.extend(pod_endpoints(pod, pool.selector, pool.target_ports))
                except Exception as e:  # noqa: BLE001 - one odd pod must not stop the rest
                    log.error("k8s: skipping pod %s: %s", object_key(pod)[1], e)
        self.datastore.set_endpoints(endpoints)

    # -- objectives ----------------------------------------------------------------

    def _mine(self, obj: Obj) -> bool:
        return references_pool(obj, self.settings.pool_name or "", self.settings.pool_group)

    def _objs_replace(self, coll: str, items: list[Obj]) -> None:
        new = {object_key(o): o for o in items if self._mine(o)}
        old = self._objs[coll]
        self._objs[coll] = new
        for key in set(old) - set(new):
            self._forget(coll, key)
        for key, obj in new.items():
            if old.get(key) != obj:
                self._sink_add(coll, key, obj)
        self._mark_synced(coll)

    def _objs_event(self, coll: str, etype: str, obj: Obj) -> None:
        key = object_key(obj)
        cache = self._objs[coll]
        if etype == "DELETED" or not self._mine(obj):
            # Not (or no longer) pointing at our pool: forget it if we had it.
            if cache.pop(key, None) is not None:
                self._forget(coll, key)
            return
        cache[key] = obj
        self._sink_add(coll, key, obj)

    def _forget(self, coll: str, key: tuple[str, str]) -> None:
        """`key` left `coll`: delete it, unless another group still holds the same kind."""
        kind = _KIND_OF[coll]
        for other, objs in self._objs.items():
            if other != coll and _KIND_OF[other] == kind and key in objs:
                self._sink_add(other, key, objs[key])
                return
        self._sink_delete(coll, key)

    def _sink_add(self, coll: str, key: tuple[str, str], obj: Obj) -> None:
        if self.objectives is None:
            return
        try:
            self.objectives.add(_KIND_OF[coll], key[0], key[1], obj)
        except Exception as e:  # noqa: BLE001 - a bad object is logged, never fatal
            log.error("k8s: %s %s/%s rejected: %s", coll, key[0], key[1], e)

    def _sink_delete(self, coll: str, key: tuple[str, str]) -> None:
        if self.objectives is None:
            return
        try:
            self.objectives.delete(_KIND_OF[coll], key[0], key[1])
        except Exception as e:  # noqa: BLE001
            log.error("k8s: deleting %s %s/%s failed: %s", coll, key[0], key[1], e)
