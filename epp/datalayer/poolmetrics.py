"""The EPP's own `inference_pool_*` gauges, recomputed from the Datastore snapshot.

Refreshed on a timer (`--refresh-prometheus-metrics-interval`, default 5 s) rather than
on every scrape: the gauges are for dashboards, and recomputing them 2000 times a second
for 100 endpoints would be waste. Averages are over endpoints whose metrics are fresh
(not stale by the snapshot's staleness threshold); with none fresh they read 0, as the
upstream EPP does. Per-pod queue sizes are published for fresh endpoints only, and the
series of endpoints that left (or went stale) are removed, so label cardinality follows
the pool.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from epp.datastore import Datastore
from epp.labels import safe
from epp.observability import (
    POOL_AVG_KV_CACHE,
    POOL_AVG_QUEUE,
    POOL_AVG_RUNNING,
    POOL_PER_POD_KV_CACHE,
    POOL_PER_POD_QUEUE,
    POOL_PER_POD_RUNNING,
    POOL_READY_PODS,
)
from epp.tasks import cancel_and_wait

log = logging.getLogger(__name__)


def _mean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else 0.0


class PoolMetricsRefresher:
    """Publishes pool gauges for `pool_name` every `interval` seconds."""

    def __init__(self, datastore: Datastore, pool_name: str, interval: float = 5.0) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.datastore = datastore
        self.pool_name = pool_name
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._pods: set[str] = set()

    def refresh(self, now: float | None = None) -> None:
        """Recompute every gauge once from the current snapshot."""
        snap = self.datastore.snapshot()
        if now is None:
            now = time.monotonic()
        fresh = ~snap.stale(now)
        name = self.pool_name
        POOL_READY_PODS.labels(name=name).set(len(snap))
        POOL_AVG_KV_CACHE.labels(name=name).set(_mean(snap.kv_usage[fresh]))
        POOL_AVG_QUEUE.labels(name=name).set(_mean(snap.waiting[fresh]))
        POOL_AVG_RUNNING.labels(name=name).set(_mean(snap.running[fresh]))
        pods: set[str] = set()
        for i in np.flatnonzero(fresh):
            waiting = float(snap.waiting[i])
            if np.isnan(waiting):
                continue
            pod = safe(snap.endpoints[i].name)
            pods.add(pod)
            POOL_PER_POD_QUEUE.labels(name=name, model_server_pod=pod).set(waiting)
            for gauge, value in ((POOL_PER_POD_KV_CACHE, snap.kv_usage[i]),
                                 (POOL_PER_POD_RUNNING, snap.running[i])):
                if not np.isnan(value):
                    gauge.labels(name=name, model_server_pod=pod).set(float(value))
        for pod in self._pods - pods:
            for gauge in (POOL_PER_POD_QUEUE, POOL_PER_POD_KV_CACHE, POOL_PER_POD_RUNNING):
                try:
                    gauge.remove(name, pod)
                except KeyError:
                    pass
        self._pods = pods

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"pool metrics {self.pool_name}"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # gauges are best effort; never die
                log.exception("refreshing pool metrics for %s failed", self.pool_name)
            await asyncio.sleep(self.interval)
