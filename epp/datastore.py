"""The EPP's view of its pool: endpoints and their latest metrics.

Background tasks (the scraper, the endpoint sources) write here; the request path only
reads `Datastore.snapshot()`, an immutable struct-of-arrays that is rebuilt lazily after a
write and then shared by every request until the next write. Everything runs on the one
event loop thread, so no locks are needed: sources that live in other threads (the
Kubernetes watches) must hand their updates over with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping

import numpy as np

NAN = math.nan


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One model-server endpoint: a pod's IP and one of its target ports."""

    name: str
    address: str
    port: int
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def hostport(self) -> str:
        """The `ip:port` form used on the wire (IPv6 addresses in brackets)."""
        return host_port(self.address, self.port)


def host_port(address: str, port: int) -> str:
    """`address:port`, with an IPv6 address in brackets (as URLs and Envoy want it)."""
    if ":" in address and not address.startswith("["):
        return f"[{address}]:{port}"
    return f"{address}:{port}"


@dataclass(frozen=True, slots=True)
class EndpointMetrics:
    """The last good scrape of one endpoint. NaN / 0 mean "not reported"."""

    waiting: float = NAN
    running: float = NAN
    kv_usage: float = NAN
    active_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    max_lora: int = 0
    block_size: int = 0
    num_gpu_blocks: int = 0
    scraped_at: float = NAN  # time.monotonic() of the last good scrape
    last_error: str | None = None
    models: frozenset[str] = frozenset()
    """Base model names the server reports (vLLM's `model_name` label): requests for
    these need no adapter there."""


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    """An immutable view of the pool, indexed 0..n-1 in `endpoints` order.

    Numeric fields are numpy arrays so that scorers work on whole pools at once.
    NaN in a float array means the endpoint never reported that metric.
    """

    version: int
    endpoints: tuple[Endpoint, ...]
    by_hostport: Mapping[str, int]
    by_name: Mapping[str, int]
    waiting: np.ndarray
    running: np.ndarray
    kv_usage: np.ndarray
    max_lora: np.ndarray
    block_size: np.ndarray
    num_gpu_blocks: np.ndarray
    scraped_at: np.ndarray
    active_adapters: tuple[frozenset[str], ...]
    waiting_adapters: tuple[frozenset[str], ...]
    last_error: tuple[str | None, ...]
    staleness_threshold: float
    models: tuple[frozenset[str], ...] = ()

    def __len__(self) -> int:
        return len(self.endpoints)

    def stale(self, now: float | None = None) -> np.ndarray:
        """Boolean mask: metrics older than the staleness threshold, or never received."""
        if now is None:
            now = time.monotonic()
        age = now - self.scraped_at
        # NaN (never scraped) compares False, so invert a "fresh" test.
        return ~(age <= self.staleness_threshold)


EndpointListener = Callable[[list[Endpoint], list[Endpoint]], None]
"""Called with (added, removed) after the endpoint set changes."""


def departed(added: list[Endpoint], removed: list[Endpoint]) -> list[str]:
    """Names of endpoints really gone in a change (not merely relabelled): what holders
    of per-endpoint state must forget."""
    kept = {e.name: (e.address, e.port) for e in added}
    return [e.name for e in removed if kept.get(e.name) != (e.address, e.port)]


class Datastore:
    """Endpoints and metrics of one pool; see the module docstring for the threading rule."""

    def __init__(self, staleness_threshold: float = 2.0) -> None:
        self.staleness_threshold = staleness_threshold
        self._endpoints: dict[str, Endpoint] = {}
        self._metrics: dict[str, EndpointMetrics] = {}
        self._listeners: list[EndpointListener] = []
        self._version = 0
        self._snapshot: Snapshot | None = None

    # -- endpoints -----------------------------------------------------------------

    def add_listener(self, listener: EndpointListener) -> None:
        self._listeners.append(listener)

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """Replace the whole endpoint set; survivors keep their metrics."""
        new = {e.name: e for e in endpoints}
        removed = [e for n, e in self._endpoints.items() if n not in new or new[n] != e]
        added = [e for n, e in new.items() if self._endpoints.get(n) != e]
        if not added and not removed:
            return
        for name in departed(added, removed):
            self._metrics.pop(name, None)
        self._endpoints = new
        self._changed()
        for listener in self._listeners:
            listener(added, removed)

    def upsert_endpoint(self, endpoint: Endpoint) -> None:
        endpoints = dict(self._endpoints)
        endpoints[endpoint.name] = endpoint
        self.set_endpoints(endpoints.values())

    def remove_endpoint(self, name: str) -> None:
        if name in self._endpoints:
            self.set_endpoints(e for n, e in self._endpoints.items() if n != name)

    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(self._endpoints.values())

    # -- metrics -------------------------------------------------------------------

    def update_metrics(self, name: str, metrics: EndpointMetrics) -> None:
        """Store a good scrape. Ignored for endpoints that have left the pool."""
        if name not in self._endpoints:
            return
        self._metrics[name] = metrics
        self._changed()

    def record_scrape_error(self, name: str, error: str) -> None:
        """Keep the last good values (and their age) but remember what went wrong."""
        if name not in self._endpoints:
            return
        old = self._metrics.get(name, EndpointMetrics())
        if old.last_error != error:
            self._metrics[name] = replace(old, last_error=error)
            self._changed()

    def metrics(self, name: str) -> EndpointMetrics | None:
        return self._metrics.get(name)

    # -- snapshot ------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The current immutable view; rebuilt at most once per write."""
        snap = self._snapshot
        if snap is None:
            snap = self._snapshot = self._build()
        return snap

    def _changed(self) -> None:
        self._version += 1
        self._snapshot = None

    def _build(self) -> Snapshot:
        eps = tuple(self._endpoints.values())
        empty = EndpointMetrics()
        ms = [self._metrics.get(e.name, empty) for e in eps]
        f64 = np.float64
        return Snapshot(
            version=self._version,
            endpoints=eps,
            by_hostport={e.hostport: i for i, e in enumerate(eps)},
            by_name={e.name: i for i, e in enumerate(eps)},
            waiting=np.fromiter((m.waiting for m in ms), f64, len(ms)),
            running=np.fromiter((m.running for m in ms), f64, len(ms)),
            kv_usage=np.fromiter((m.kv_usage for m in ms), f64, len(ms)),
            max_lora=np.fromiter((m.max_lora for m in ms), np.int64, len(ms)),
            block_size=np.fromiter((m.block_size for m in ms), np.int64, len(ms)),
            num_gpu_blocks=np.fromiter((m.num_gpu_blocks for m in ms), np.int64, len(ms)),
            scraped_at=np.fromiter((m.scraped_at for m in ms), f64, len(ms)),
            active_adapters=tuple(m.active_adapters for m in ms),
            waiting_adapters=tuple(m.waiting_adapters for m in ms),
            last_error=tuple(m.last_error for m in ms),
            staleness_threshold=self.staleness_threshold,
            models=tuple(m.models for m in ms),
        )
