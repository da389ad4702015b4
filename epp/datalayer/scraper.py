"""Poll every endpoint's metrics page and keep the Datastore current.

One asyncio task per endpoint, so a slow or dead endpoint only delays itself. Tasks start
and stop with the pool: the scraper subscribes to `Datastore.add_listener`. Each poll is
one keep-alive HTTP GET with a per-poll timeout, then the engine's targeted extractor
(`engines.EngineConfig.parse`), then `Datastore.update_metrics`.

Faults never end a task. Every failed poll is counted in
`inference_extension_scrape_errors_total{endpoint,reason}` and recorded in the Datastore
with `record_scrape_error`, which keeps the last good values and their time, so that the
snapshot's staleness test (`--metrics-staleness-threshold`) turns a failing endpoint into
the worst choice once its numbers are too old. Logs are written once per change of state
(first failure, change of reason, recovery), never once per 50 ms poll.

Reasons (bounded, used as label values): `connection_refused`, `connect`, `timeout`,
`disconnected`, `truncated`, `http_status`, `invalid_content`, `too_large`, `parse`,
`missing_metrics`, `invalid_value`, `http_client`, `internal`.

Two HTTP clients do the fetching: aiohttp (the default, any scheme, TLS with optional
skip-verify) and `fasthttp.RawHttpClient`, a minimal HTTP/1.1 keep-alive client on an
asyncio Protocol that costs a fraction of aiohttp's CPU per poll (see
benchmarks/RESULTS.md, "Data layer"). `client="auto"` uses the raw client for plain http.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import ssl
import time
from dataclasses import dataclass
from typing import Literal

import aiohttp

from epp.datastore import Datastore, Endpoint, EndpointMetrics, host_port
from epp.datalayer.engines import EngineConfig, EngineRegistry, MetricsError
from epp.datalayer.fasthttp import FetchError, RawHttpClient, decode_metrics_body
from epp.labels import safe
from epp.observability import SCRAPE_ERRORS
from epp.passivehealth import PassiveHealth
from epp.tasks import cancel_and_wait

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
OVERSIZE_BACKOFF = 2.0
ClientKind = Literal["auto", "aiohttp", "raw"]


@dataclass(slots=True)
class _EndpointState:
    """What one polling task remembers between polls."""

    endpoint: Endpoint
    engine: EngineConfig
    url: str
    host: str
    port: int
    last_reason: str | None = None  # None = healthy (or never polled)
    ever_ok: bool = False
    reasons_seen: set[str] | None = None


class Scraper:
    """Keeps `datastore`'s endpoint metrics fresh; `await start()` then `await stop()`."""

    def __init__(
        self,
        datastore: Datastore,
        *,
        interval: float = 0.05,
        timeout: float = 1.0,
        scheme: str = "http",
        path: str = "/metrics",
        port: int | None = None,
        insecure_skip_verify: bool = False,
        engines: EngineRegistry | None = None,
        client: ClientKind = "auto",
        max_body_bytes: int = MAX_BODY_BYTES,
        flush_delay: float | None = None,
        max_polls_per_second: float | None = None,
        health: PassiveHealth | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme must be http or https, got {scheme!r}")
        if max_polls_per_second is not None and max_polls_per_second <= 0:
            raise ValueError("max_polls_per_second must be positive")
        if client not in ("auto", "aiohttp", "raw"):
            raise ValueError(f"client must be auto, aiohttp or raw, got {client!r}")
        if not path.startswith("/"):
            path = "/" + path
        self.datastore = datastore
        self.health = health
        self.interval = interval
        self.timeout = timeout
        self.scheme = scheme
        self.path = path
        self.port = port
        self.insecure_skip_verify = insecure_skip_verify
        self.engines = engines or EngineRegistry()
        self.max_body_bytes = max_body_bytes
        self.max_polls_per_second = max_polls_per_second
        self.use_raw = client == "raw" or (client == "auto" and scheme == "http")
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | bool | None = None
        self._running = False
        self._subscribed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Good scrapes wait here up to `flush_delay` and are written together: every
        # Datastore write invalidates the snapshot, and a rebuild costs ~50 µs for 100
        # endpoints, so writing 2000 times a second one by one could force a rebuild on
        # nearly every request. Batched, the request path sees at most 1/flush_delay
        # rebuilds per second, for at most flush_delay of extra metric age.
        self.flush_delay = min(0.01, interval / 2) if flush_delay is None else flush_delay
        self._pending: dict[str, EndpointMetrics] = {}
        self._flush_handle: asyncio.TimerHandle | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        if self.scheme == "https":
            if self.insecure_skip_verify:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                self._ssl = ctx
            else:
                self._ssl = ssl.create_default_context()
        if not self.use_raw:
            connector = aiohttp.TCPConnector(
                limit=0, keepalive_timeout=max(30.0, 4 * self.interval), ssl=self._ssl or False
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Accept": "text/plain"},
                auto_decompress=True,
            )
        self._running = True
        if not self._subscribed:
            self.datastore.add_listener(self._on_endpoints_changed)
            self._subscribed = True
        for ep in self.datastore.endpoints():
            self._start_task(ep)

    async def stop(self) -> None:
        self._running = False
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush()
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await cancel_and_wait(*tasks)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def effective_interval(self) -> float:
        """The poll interval each endpoint gets now.

        `interval`, unless `max_polls_per_second` caps the total: then large pools are
        polled less often (N / cap seconds) so that the scraper's CPU stays bounded
        whatever the pool size, at the price of older (but still fresh) metrics.
        """
        cap = self.max_polls_per_second
        if cap is None:
            return self.interval
        return max(self.interval, len(self._tasks) / cap)

    def polling(self) -> frozenset[str]:
        """Names of the endpoints that have a polling task right now."""
        return frozenset(self._tasks)

    def _on_endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        if not self._running:
            return
        for ep in removed:
            self._pending.pop(ep.name, None)
            task = self._tasks.pop(ep.name, None)
            if task is not None:
                task.cancel()
        for ep in added:
            self._start_task(ep)

    def _start_task(self, ep: Endpoint) -> None:
        old = self._tasks.pop(ep.name, None)
        if old is not None:
            old.cancel()
        assert self._loop is not None
        self._tasks[ep.name] = self._loop.create_task(
            self._run(ep), name=f"scrape {ep.name}"
        )

    # -- one endpoint ----------------------------------------------------------------------

    def _state_for(self, ep: Endpoint) -> _EndpointState:
        port = self.port if self.port is not None else ep.port
        host = ep.address
        url = f"{self.scheme}://{host_port(host, port)}{self.path}"
        return _EndpointState(ep, self.engines.for_labels(ep.labels), url, host, port)

    async def _run(self, ep: Endpoint) -> None:
        st = self._state_for(ep)
        raw = (
            RawHttpClient(st.host, st.port, self.path, ssl=self._ssl,
                          max_body_bytes=self.max_body_bytes)
            if self.use_raw else None
        )
        loop = asyncio.get_running_loop()
        try:
            # Spread the first polls over one interval so that 100 endpoints added at once
            # do not poll in lockstep forever after.
            await asyncio.sleep(random.uniform(0, self.effective_interval()))
            next_at = loop.time()
            while True:
                await self._poll_once(st, raw)
                next_at += self.effective_interval()
                now = loop.time()
                if st.last_reason == "too_large":
                    # Reading a page up to the limit costs ~50 ms of CPU for 16 MB: an
                    # endpoint that serves endless pages is asked again rarely.
                    next_at = max(next_at, now + OVERSIZE_BACKOFF)
                if next_at < now:  # this endpoint was slow: go on from now, no burst
                    next_at = now
                await asyncio.sleep(next_at - now)
        finally:
            if raw is not None:
                raw.close()
            self._forget_error_series(st)

    async def _poll_once(self, st: _EndpointState, raw: RawHttpClient | None) -> None:
        name = st.endpoint.name
        try:
            if raw is not None:
                text = await raw.get(self.timeout)
            else:
                text = await self._get_aiohttp(st.url)
            metrics = st.engine.parse(text, time.monotonic())
        except asyncio.CancelledError:
            raise
        except MetricsError as e:
            self._failed(st, e.reason, e.detail)
            return
        except FetchError as e:
            self._failed(st, e.reason, e.detail)
            return
        except Exception as e:  # the task must never die
            reason, detail = _classify(e)
            if reason == "internal":
                log.exception("scrape %s (%s): unexpected error", name, st.url)
            self._failed(st, reason, detail)
            return
        self._store(name, metrics)
        if self.health is not None:
            self.health.probe_ok(name)
        if st.last_reason is not None:
            log.info("scrape %s (%s): recovered after %s", name, st.url, st.last_reason)
        elif not st.ever_ok:
            log.debug("scrape %s (%s): first good scrape", name, st.url)
        st.last_reason = None
        st.ever_ok = True

    async def _get_aiohttp(self, url: str) -> str:
        assert self._session is not None
        async with self._session.get(url) as resp:
            if resp.status != 200:
                raise FetchError("http_status", f"HTTP {resp.status}")
            ctype = resp.headers.get("Content-Type", "")
            if "html" in ctype:
                raise FetchError("invalid_content", f"content type {ctype!r}")
            length = resp.content_length
            if length is not None and length > self.max_body_bytes:
                raise FetchError("too_large", f"{length} bytes")
            if length is not None:
                body = await resp.read()
            else:
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_any():
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise FetchError("too_large", f"over {self.max_body_bytes} bytes")
                    chunks.append(chunk)
                body = b"".join(chunks)
        return decode_metrics_body(body)

    def _store(self, name: str, metrics: EndpointMetrics) -> None:
        if self.flush_delay <= 0:
            self.datastore.update_metrics(name, metrics)
            return
        self._pending[name] = metrics
        if self._flush_handle is None:
            assert self._loop is not None
            self._flush_handle = self._loop.call_later(self.flush_delay, self._flush)

    def _flush(self) -> None:
        """Write every pending good scrape at once (one snapshot invalidation)."""
        self._flush_handle = None
        pending, self._pending = self._pending, {}
        for name, metrics in pending.items():
            self.datastore.update_metrics(name, metrics)

    def _failed(self, st: _EndpointState, reason: str, detail: str) -> None:
        name = st.endpoint.name
        earlier = self._pending.pop(name, None)
        if earlier is not None:  # keep the order: that good scrape came first
            self.datastore.update_metrics(name, earlier)
        SCRAPE_ERRORS.labels(endpoint=safe(name), reason=reason).inc()
        if reason == "connection_refused" and self.health is not None:
            self.health.connection_refused(name)
        if st.reasons_seen is None:
            st.reasons_seen = set()
        st.reasons_seen.add(reason)
        self.datastore.record_scrape_error(name, reason)
        if st.last_reason != reason:
            kept = "keeping last good values" if st.ever_ok else "no metrics yet"
            log.warning("scrape %s (%s) failed: %s (%s); %s", name, st.url, reason, detail, kept)
            st.last_reason = reason

    def _forget_error_series(self, st: _EndpointState) -> None:
        """Drop the endpoint's error counters once it leaves the pool (bounded cardinality)."""
        if not st.reasons_seen or (
            self._running and st.endpoint.name in self._tasks
        ):
            return
        for reason in st.reasons_seen:
            try:
                SCRAPE_ERRORS.remove(safe(st.endpoint.name), reason)
            except KeyError:
                pass


def _classify(e: BaseException) -> tuple[str, str]:
    if isinstance(e, (asyncio.TimeoutError, TimeoutError, aiohttp.ServerTimeoutError)):
        return "timeout", "no complete answer within the poll timeout"
    if isinstance(e, aiohttp.ClientConnectorError):
        if e.os_error is not None and e.os_error.errno == errno.ECONNREFUSED:
            return "connection_refused", str(e)
        return "connect", str(e)
    if isinstance(e, aiohttp.ClientPayloadError):
        return "truncated", str(e)
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "disconnected", str(e)
    if isinstance(e, ConnectionRefusedError):
        return "connection_refused", str(e)
    if isinstance(e, (ConnectionResetError, BrokenPipeError)):
        return "disconnected", str(e)
    if isinstance(e, (aiohttp.ClientError, OSError)):
        return "http_client", f"{type(e).__name__}: {e}"
    return "internal", f"{type(e).__name__}: {e}"
