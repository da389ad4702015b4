"""A deployment written for the upstream EPP (v1.5.0's Helm chart) runs this EPP unchanged:
its flags, its default config with the data-layer plugins, and its health probe name.

The args and config below are what `helm template` renders from upstream's
`config/charts/inferencepool` v1.5.0 with `modelServers.matchLabels` set (checked by hand
against the chart in the v1.5.0 module); `tests/k8s` runs the rendered chart itself.
"""

from __future__ import annotations

import asyncio
import math

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.app import EppApp
from epp.settings import parse_settings
from tests.unit.test_config import UPSTREAM_CHART_DEFAULT

UPSTREAM_CHART_ARGS = ["--pool-name", "vllm-llama3-8b-instruct", "--pool-namespace", "default",
                       "--pool-group", "inference.networking.k8s.io", "--zap-encoder", "json",
                       "--config-file", "/config/default-plugins.yaml", "--v", "1",
                       "--tracing=false"]

VLLM_PAGE = """\
vllm:num_requests_waiting{model_name="m"} 3
vllm:num_requests_running{model_name="m"} 1
vllm:kv_cache_usage_perc{model_name="m"} 0.25
"""


def test_the_upstream_charts_args_parse() -> None:
    s = parse_settings(UPSTREAM_CHART_ARGS)
    assert (s.pool_name, s.pool_namespace, s.config_file) == (
        "vllm-llama3-8b-instruct", "default", "/config/default-plugins.yaml")
    assert (s.log_format, s.tracing, s.verbosity) == ("json", False, 1)
    assert parse_settings(["--zap-encoder", "console"]).log_format == "text"


async def serve_metrics_at(path: str) -> tuple[web.AppRunner, int]:
    async def page(_: web.Request) -> web.Response:
        return web.Response(text=VLLM_PAGE)

    app = web.Application()
    app.router.add_get(path, page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


async def test_metrics_data_source_decides_where_pods_are_scraped(tmp_path) -> None:
    # The flag says /metrics; the config's metrics-data-source says /vllm/metrics and wins,
    # as upstream's parameters do over its deprecated flags.
    runner, port = await serve_metrics_at("/vllm/metrics")
    config = tmp_path / "default-plugins.yaml"
    config.write_text(UPSTREAM_CHART_DEFAULT.replace('path: "/metrics"', 'path: "/vllm/metrics"'))
    app = EppApp(parse_settings([
        "--endpoints", f"127.0.0.1:{port}", "--config-file", str(config),
        "--zap-encoder", "json", "--tracing=false", "--model-server-metrics-path", "/metrics",
        "--bind-address", "127.0.0.1", "--secure-serving=false", "--grpc-port", "0",
        "--grpc-health-port", "0", "--metrics-port", "0"]))
    await app.start()
    try:
        (endpoint,) = app.datastore.endpoints()
        for _ in range(100):
            m = app.datastore.metrics(endpoint.name)
            if m is not None and not math.isnan(m.waiting):
                break
            await asyncio.sleep(0.02)
        assert m is not None and (m.waiting, m.running, m.kv_usage) == (3, 1, 0.25)

        # Upstream's chart probes this service name with one replica.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.health_port}") as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="inference-extension"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await app.stop(0)
        await runner.cleanup()
