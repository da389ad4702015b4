"""Wires the EPP together: datastore, sources, director, gRPC servers, metrics.

`EppApp` is what `epp` runs; tests start it in-process the same way.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from epp import observability as obs
from epp.datalayer.engines import EngineRegistry
from epp.datalayer.poolmetrics import PoolMetricsRefresher
from epp.datalayer.scraper import Scraper
from epp.datastore import Datastore
from epp.director import Director
from epp.server import tls
from epp.server.extproc import ExtProcServicer
from epp.server.health import HealthService
from epp.settings import Settings
from epp.sources import EndpointsFileSource, parse_endpoint_list

log = logging.getLogger(__name__)

_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
]


class EppApp:
    """One EPP process's worth of servers and background tasks."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.datastore = Datastore(staleness_threshold=settings.metrics_staleness_threshold)
        self.director = Director(self.datastore)
        self.health = HealthService()
        self.server: grpc.aio.Server | None = None
        self.grpc_port = 0
        self.health_port = 0
        self.metrics_port = 0
        self._metrics_server: Any = None
        self._tasks: list[Any] = []  # objects with async stop()
        self.engines_config: Any = None

    async def start(self) -> None:
        s = self.settings
        await self._start_sources()
        self.server = grpc.aio.server(options=_GRPC_OPTIONS)
        ep_grpc.add_ExternalProcessorServicer_to_server(
            ExtProcServicer(self.director, max_body_bytes=s.max_body_bytes), self.server)
        names = [ep.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name,
                 reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        addr = f"{s.bind_address}:{s.grpc_port}"
        if s.secure_serving:
            cert, key = tls.load_or_create(s.cert_path)
            creds = grpc.ssl_server_credentials([(key, cert)])
            self.grpc_port = self.server.add_secure_port(addr, creds)
        else:
            self.grpc_port = self.server.add_insecure_port(addr)
        await self.server.start()
        self.health_port = await self.health.start(s.bind_address, s.grpc_health_port)
        if s.metrics_port >= 0:
            self._metrics_server, thread = start_http_server(
                s.metrics_port, addr=s.bind_address, registry=obs.REGISTRY)
            self.metrics_port = self._metrics_server.server_port
        await self.health.set_ready(True)
        log.info("EPP serving: ext_proc %s on %s, health on %d, metrics on %d, %d endpoints",
                 "TLS" if s.secure_serving else "plaintext", self.grpc_port,
                 self.health_port, self.metrics_port, len(self.datastore.endpoints()))

    async def _start_sources(self) -> None:
        s = self.settings
        if s.endpoints:
            self.datastore.set_endpoints(parse_endpoint_list(s.endpoints))
        if s.endpoints_file:
            src = EndpointsFileSource(self.datastore, s.endpoints_file)
            await src.start()
            self._tasks.append(src)
        scraper = Scraper(
            self.datastore,
            interval=s.refresh_metrics_interval,
            scheme=s.model_server_metrics_scheme,
            path=s.model_server_metrics_path,
            port=s.model_server_metrics_port,
            insecure_skip_verify=s.model_server_metrics_https_insecure_skip_verify,
            engines=EngineRegistry.from_config(self.engines_config),
        )
        await scraper.start()
        self._tasks.append(scraper)
        refresher = PoolMetricsRefresher(self.datastore, s.pool_name,
                                         interval=s.refresh_prometheus_metrics_interval)
        await refresher.start()
        self._tasks.append(refresher)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report not ready, stop accepting, let streams in flight finish."""
        await self.health.set_ready(False)
        if self.server is not None:
            await self.server.stop(grace)
        for t in reversed(self._tasks):
            await t.stop()
        await self.health.stop(0)
        if self._metrics_server is not None:
            threading.Thread(target=self._metrics_server.shutdown, daemon=True).start()


async def serve(settings: Settings) -> int:
    app = EppApp(settings)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining (up to %.0fs)", settings.drain_timeout)
    await app.stop(settings.drain_timeout)
    log.info("drained; exiting")
    return 0
