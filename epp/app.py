"""Wires the EPP together: datastore, sources, director, gRPC servers, metrics.

`EppApp` is what `epp` runs; tests start it in-process the same way.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from epp import observability as obs
from epp.config import load_config, load_config_file
from epp.datalayer.engines import EngineRegistry
from epp.datalayer.plugins import engine_section, metrics_source
from epp.datalayer.poolmetrics import PoolMetricsRefresher
from epp.datalayer.scraper import Scraper
from epp.datastore import Datastore
from epp.director import Director
from epp.flowcontrol.admission import admission_from_config
from epp.flowcontrol.saturation import detector_from_config
from epp.k8s import KubernetesSource, kubernetes_settings
from epp.labels import LabelFolder, known_names
from epp.manifests import ObjectivesFileWatcher
from epp.objectives import ObjectiveStore
from epp.passivehealth import PassiveHealth
from epp.scheduling import InFlightTracker, Scheduler
from epp.server import extproc, ports, reflection, tls
from epp.server.health import HealthService
from epp.server.metrics_http import MetricsAuth, MetricsServer, kubernetes_auth
from epp.server.status_page import StatusPage, StatusSource
from epp.server.pick_api import SERVICE_NAME as PICK_SERVICE_NAME
from epp.server.pick_api import add_to_server as add_pick_api
from epp.settings import Settings
from epp.sources import EndpointsFileSource, parse_endpoint_list
from epp.statesync.setup import state_sync_from_settings
from epp.telemetry import RequestObserver
from epp.telemetry.tracing import Tracer

log = logging.getLogger(__name__)

_GRPC_OPTIONS = [
    ports.NO_REUSEPORT,  # a taken port fails the start (epp/server/ports.py)
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
]


class EppApp:
    """One EPP process's worth of servers and background tasks."""

    def __init__(self, settings: Settings) -> None:
        """Builds everything that can fail on bad configuration (raises ValueError)."""
        self.settings = settings
        self.config = (load_config_file(settings.config_file) if settings.config_file
                       else load_config(settings.config_text))
        self.datastore = Datastore(staleness_threshold=settings.metrics_staleness_threshold)
        self.passive_health = PassiveHealth(
            consecutive_failures=settings.passive_health_consecutive_failures,
            base_cooldown=settings.passive_health_cooldown,
            max_cooldown=max(30.0, settings.passive_health_cooldown))
        self.datastore.add_listener(self.passive_health.on_endpoints_changed)
        # An objectives file carries its own namespaces; a cluster filters by the pool's.
        self.objectives = ObjectiveStore(
            settings.pool_name or None,
            None if settings.objectives_file else settings.pool_namespace)
        # The director records in-flight requests; the scheduler reads them as load.
        self.inflight = InFlightTracker()
        self.inflight.attach(self.datastore)
        # Per-plugin timings are sampled (1 cycle in 16): timing every cycle cost ~5 µs a pick.
        self.scheduler = Scheduler.from_config(self.config, inflight=self.inflight,
                                               plugin_metrics_every=16)
        self.scheduler.attach(self.datastore)
        detector = detector_from_config(self.config.saturation_detector, self.config.plugins)
        self.detector = detector
        self.labels = LabelFolder(known_names(self.datastore, self.objectives),
                                  cap=settings.metrics_label_cap)
        self.tracer = Tracer.from_env() if settings.tracing else None
        self.admission = admission_from_config(
            self.config.feature_gates, self.config.flow_control, detector, self.datastore.snapshot)
        self.director = Director(
            self.datastore, self.scheduler,
            resolver=self.objectives,
            admission=self.admission,
            inflight=self.inflight,
            labels=self.labels,
            health=self.passive_health,
            observer=self._observer(),
        )
        self.sync = state_sync_from_settings(settings, self.datastore, self.inflight,
                                             self.config.plugins, self.config.state_sync)
        self.engines = EngineRegistry.from_config(
            engine_section(self.config.plugins, self.config.data))
        self.k8s: KubernetesSource | None = None
        self.health = HealthService()
        self.server: grpc.aio.Server | None = None
        self.grpc_port = 0
        self.health_port = 0
        self.metrics_port = 0
        self._metrics_server: MetricsServer | None = None
        self._tasks: list[Any] = []  # objects with async stop()

    def _observer(self) -> RequestObserver:
        s = self.settings
        return RequestObserver(tracer=self.tracer, log_decisions=s.verbosity >= 4,
                               namespace=s.pool_namespace if s.pool_name else "",
                               labels=self.labels)

    async def start(self) -> None:
        s = self.settings
        await self._start_sources()
        if self.sync is not None:
            await self.sync.start()  # bootstrap from the other replicas before ready
            self._tasks.append(self.sync)
        self.server = grpc.aio.server(options=_GRPC_OPTIONS)
        extproc.add_to_server(self.server, self.director, max_body_bytes=s.max_body_bytes,
                              limits=extproc.StreamLimits(s.extproc_max_streams,
                                                          s.extproc_request_idle_timeout,
                                                          s.extproc_response_idle_timeout))
        add_pick_api(self.server, self._pick_route, health=self.passive_health)
        reflection.enable(self.server, [extproc.SERVICE_NAME, PICK_SERVICE_NAME])
        addr = f"{s.bind_address}:{s.grpc_port}"
        if s.secure_serving:
            cert, key = tls.load_or_create(s.cert_path)
            creds = grpc.ssl_server_credentials([(key, cert)])
            self.grpc_port = ports.bind(self.server, "ext_proc", addr, creds)
        else:
            self.grpc_port = ports.bind(self.server, "ext_proc", addr)
        await self.server.start()
        self.health_port = await self.health.start(s.bind_address, s.grpc_health_port)
        if s.metrics_port >= 0:
            auth: MetricsAuth | None = None
            if s.metrics_endpoint_auth and self.k8s is not None:
                auth = await asyncio.to_thread(kubernetes_auth, s.kubeconfig)
            elif s.metrics_endpoint_auth:
                log.info("metrics endpoint auth is off: no Kubernetes API server to ask "
                         "(standalone endpoints)")
            page = StatusPage(StatusSource(
                datastore=self.datastore, observer=self.director.observer, config=self.config,
                objectives=self.objectives, inflight=self.inflight,
                detector=self.detector, pool_name=s.pool_name), asyncio.get_running_loop())
            self._metrics_server = MetricsServer(obs.REGISTRY, auth=auth, status_page=page.html)
            self.metrics_port = self._metrics_server.start(s.bind_address, s.metrics_port)
        if self.k8s is not None:
            # Ready only after the first full sync and, with HA, only on the leader.
            loop = asyncio.get_running_loop()
            pending: set[asyncio.Task[None]] = set()

            def on_readiness(ok: bool) -> None:
                t = loop.create_task(self.health.set_ready(ok))
                pending.add(t)
                t.add_done_callback(pending.discard)

            self.k8s.add_readiness_listener(on_readiness)
            await self.health.set_ready(self.k8s.serving)
        else:
            await self.health.set_ready(True)
        log.info("EPP serving: ext_proc %s on %s, health on %d, metrics on %d, %d endpoints",
                 "TLS" if s.secure_serving else "plaintext", self.grpc_port,
                 self.health_port, self.metrics_port, len(self.datastore.endpoints()))

    async def _pick_route(self, req: Any, explain: bool) -> Any:
        """Pick API: `Pick` is a real, detached decision; `Explain` a side-effect-free dry run."""
        if explain:
            return self.director.explain(req)
        return await self.director.route_detached(req)

    async def _start_sources(self) -> None:
        s = self.settings
        if s.objectives_file:
            watcher = ObjectivesFileWatcher(s.objectives_file, self.objectives)
            await asyncio.to_thread(watcher.load)  # a bad file stops the start
            watcher.start()
            self._tasks.append(watcher)
        self.admission.start()
        self._tasks.append(self.admission)
        if s.endpoints:
            self.datastore.set_endpoints(parse_endpoint_list(s.endpoints))
        if s.endpoints_file:
            src = EndpointsFileSource(self.datastore, s.endpoints_file)
            await src.start()
            self._tasks.append(src)
        ks = kubernetes_settings(s)
        if ks is None and not (s.endpoints or s.endpoints_file):
            log.warning("no endpoint source: give --endpoints, --endpoints-file, --pool-name "
                        "or --endpoint-selector; every request will get 503")
        if ks is not None:
            self.k8s = KubernetesSource(self.datastore, self.objectives, ks)
            await self.k8s.start()
            self._tasks.append(self.k8s)
        source = metrics_source(self.config.plugins)  # upstream's plugin overlays the flags
        scraper = Scraper(
            self.datastore,
            interval=s.refresh_metrics_interval,
            scheme=_first(source and source.scheme, s.model_server_metrics_scheme),
            path=_first(source and source.path, s.model_server_metrics_path),
            port=s.model_server_metrics_port,
            insecure_skip_verify=_first(source and source.insecure_skip_verify,
                                        s.model_server_metrics_https_insecure_skip_verify),
            engines=self.engines,
            health=self.passive_health,
        )
        await scraper.start()
        self._tasks.append(scraper)
        await self._await_first_scrape(timeout=2.0)
        for plugin in self.config.plugins.values():
            start = getattr(plugin, "start_background", None)  # e.g. KV-event intake
            if start is not None:
                await start(self.datastore)
                self._tasks.append(plugin)
        refresher = PoolMetricsRefresher(self.datastore, s.pool_name,
                                         interval=s.refresh_prometheus_metrics_interval)
        await refresher.start()
        self._tasks.append(refresher)

    async def _await_first_scrape(self, timeout: float) -> None:
        """Hold readiness until every known endpoint was polled once (or `timeout`), so
        that the first requests are not routed blind."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            snap = self.datastore.snapshot()
            failed = np.fromiter((e is not None for e in snap.last_error), bool, len(snap))
            if bool(np.all(np.isfinite(snap.scraped_at) | failed)):
                return
            await asyncio.sleep(0.01)
        log.warning("not every endpoint answered its first metrics poll within %.1fs", timeout)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report not ready, stop accepting, let streams in flight finish."""
        await self.health.set_ready(False)
        if self.server is not None:
            await self.server.stop(grace)
        for t in reversed(self._tasks):
            await t.stop()
        await self.health.stop(0)
        if self._metrics_server is not None:
            self._metrics_server.stop()
        if self.tracer is not None:  # export what is queued, bounded; off the loop
            await asyncio.to_thread(self.tracer.shutdown)


async def serve(settings: Settings, on_started: Callable[[], None] | None = None,
                adjust: Callable[[EppApp], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain. `adjust` changes the app before it starts (the
    routing benchmark's ablations). Expected start faults are one log line and exit 2."""
    try:
        app = EppApp(settings)
    except ValueError as e:  # ConfigError, engine config errors
        log.error("invalid configuration: %s", e)
        return 2
    if adjust is not None:
        adjust(app)
    try:
        await app.start()
    except (ValueError, OSError) as e:
        # Bad flag combinations, unreadable objectives file or certificates, ports in use.
        log.error("cannot start: %s", e)
        await app.stop(0)
        return 2
    if on_started is not None:
        on_started()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining (up to %.0fs)", settings.drain_timeout)
    await app.stop(settings.drain_timeout)
    log.info("drained; exiting")
    return 0


def _first(override: Any, default: Any) -> Any:
    """A config override when it is set (False counts as set), else the flag's value."""
    return default if override is None else override
