"""gRPC health on its own port: `liveness`, `readiness` and the ext_proc service name.

Liveness is SERVING while the process runs. Readiness (and the ext_proc service name,
"", and `inference-extension`, the name upstream's chart probes with one replica) turn
SERVING only when the EPP can route: after the first full sync of its endpoint source
and, with leader election, only on the leader.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from epp.server import ports

EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_READY_NAMES = ("readiness", EXTPROC_SERVICE, "", "inference-extension")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthService:
    """Owns the health server and the readiness state."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self.ready = False
        self._server: grpc.aio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = grpc.aio.server(options=[ports.NO_REUSEPORT])
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self._server)
        bound = ports.bind(self._server, "gRPC health", f"{host}:{port}")
        await self.servicer.set("liveness", SERVING)
        for name in _READY_NAMES:
            await self.servicer.set(name, NOT_SERVING)
        await self._server.start()
        return bound

    async def set_ready(self, ready: bool) -> None:
        if ready == self.ready:
            return
        self.ready = ready
        for name in _READY_NAMES:
            await self.servicer.set(name, SERVING if ready else NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            await self.servicer.enter_graceful_shutdown()
            await self._server.stop(grace)
