"""Passive health: a definite failure signal stops picks of an endpoint at once (issue 12,
defect 7); it returns after a cool-down and a good probe."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from envoy.config.core.v3 import base_pb2 as core
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from epp import observability as obs
from epp.config import load_config
from epp.datalayer.scraper import Scraper
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.director import Director
from epp.passivehealth import FAILURES, REFUSED, PassiveHealth
from epp.request import InferenceRequest
from epp.scheduling import Scheduler
from epp.server.extproc import ExtProcServicer
from epp.server.pick_api import add_to_server
from epp.v1 import pick_pb2, pick_pb2_grpc


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def pool(*names: str) -> Datastore:
    ds = Datastore()
    ds.set_endpoints([Endpoint(n, f"10.0.0.{i + 1}", 8000) for i, n in enumerate(names)])
    for n in names:
        ds.update_metrics(n, EndpointMetrics(waiting=0, running=0, kv_usage=0.0,
                                             scraped_at=time.monotonic()))
    return ds


def kept(health: PassiveHealth, ds: Datastore) -> list[str]:
    snap = ds.snapshot()
    cands = health.filter(snap, None)
    idx = range(len(snap)) if cands is None else cands
    return [snap.endpoints[i].name for i in idx]


def test_a_refused_connection_ejects_at_once_until_cooldown_and_probe() -> None:
    clock = Clock()
    h = PassiveHealth(base_cooldown=1.0, clock=clock)
    ds = pool("a", "b")
    before = obs.REGISTRY.get_sample_value(
        "inference_extension_passive_health_ejections_total", {"reason": REFUSED}) or 0
    h.connection_refused("a")
    assert kept(h, ds) == ["b"]
    assert obs.REGISTRY.get_sample_value(
        "inference_extension_passive_health_ejections_total", {"reason": REFUSED}) == before + 1
    h.probe_ok("a")  # still cooling down: a good scrape alone does not bring it back
    clock.t += 1.0
    assert kept(h, ds) == ["b"]  # cool-down over: waits for its probe
    h.probe_ok("a")
    assert kept(h, ds) == ["a", "b"]


def test_a_flapping_endpoint_stays_out_longer_each_time() -> None:
    clock = Clock()
    h = PassiveHealth(base_cooldown=1.0, max_cooldown=30.0, clock=clock)
    h.connection_refused("a")
    clock.t += 5.0
    h.connection_refused("a")  # still down after its cool-down: waits for a good probe
    h.probe_ok("a")  # it came back
    assert not h.is_ejected("a")
    clock.t += 1.0
    h.connection_refused("a")  # and went away again soon after
    assert h.ejected()[0].until - clock.t == pytest.approx(2.0)
    h.connection_refused("a")  # during a cool-down: changes nothing
    assert h.ejected()[0].until - clock.t == pytest.approx(2.0)
    clock.t += 2.0
    h.probe_ok("a")
    clock.t += 31.0  # stayed well long enough: back to the base cool-down
    h.connection_refused("a")
    assert h.ejected()[0].until - clock.t == pytest.approx(1.0)


def test_a_burst_of_5xx_ejects_and_a_success_resets_the_count() -> None:
    h = PassiveHealth(consecutive_failures=3, clock=Clock())
    for status in (503, 500, 200, 502, 503):
        h.response("a", status)
    assert not h.is_ejected("a")
    h.response("a", 504)
    assert h.is_ejected("a") and h.ejected()[0].reason == FAILURES


def test_when_every_candidate_is_ejected_the_pick_ignores_ejections() -> None:
    h = PassiveHealth(clock=Clock())
    ds = pool("a", "b")
    h.connection_refused("a")
    h.connection_refused("b")
    assert kept(h, ds) == ["a", "b"]
    snap = ds.snapshot()
    assert list(h.filter(snap, np.array([1]))) == [1]


def test_endpoints_that_leave_are_forgotten() -> None:
    h = PassiveHealth(clock=Clock())
    ds = pool("a", "b")
    ds.add_listener(h.on_endpoints_changed)
    h.connection_refused("a")
    ds.remove_endpoint("a")
    assert h.ejected() == []


async def test_the_director_never_picks_an_ejected_endpoint() -> None:
    h = PassiveHealth(clock=Clock())
    ds = pool("a", "b", "c")
    d = Director(ds, Scheduler.from_config(load_config(None)), health=h)
    h.connection_refused("b")
    for i in range(30):
        req = InferenceRequest(f"r{i}", "/v1/models")
        decision = await d.route(req)
        assert decision.endpoint.name != "b"
        d.finished(decision)
    hinted = InferenceRequest("h", "/v1/models", subset=("10.0.0.2:8000", "10.0.0.3:8000"))
    assert (await d.route(hinted)).endpoint.name == "c"


async def test_5xx_responses_reported_through_ext_proc_eject_the_endpoint() -> None:
    h = PassiveHealth(consecutive_failures=2, clock=Clock())
    ds = pool("a")
    d = Director(ds, Scheduler.from_config(load_config(None)), health=h)
    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(ExtProcServicer(d), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = ep_grpc.ExternalProcessorStub(ch)
            for _ in range(2):
                call = stub.Process()
                await call.write(ep.ProcessingRequest(request_headers=ep.HttpHeaders(
                    headers=core.HeaderMap(headers=[
                        core.HeaderValue(key=":path", raw_value=b"/v1/models")]),
                    end_of_stream=True)))
                await call.read()
                await call.write(ep.ProcessingRequest(response_headers=ep.HttpHeaders(
                    headers=core.HeaderMap(headers=[
                        core.HeaderValue(key=":status", raw_value=b"503")]),
                    end_of_stream=True)))
                await call.read()
                await call.done_writing()
    finally:
        await server.stop(0)
    assert h.is_ejected("a")


async def test_explain_lists_the_ejected_endpoints() -> None:
    h = PassiveHealth(clock=time.monotonic)
    ds = pool("a", "b")
    d = Director(ds, Scheduler.from_config(load_config(None)), health=h)
    h.connection_refused("a")

    async def route(req, explain):
        return d.explain(req) if explain else await d.route_detached(req)

    server = grpc.aio.server()
    add_to_server(server, route, health=h)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            resp = await pick_pb2_grpc.PickerStub(ch).Explain(
                pick_pb2.PickRequest(model="m", prompt="p"))
    finally:
        await server.stop(0)
    assert resp.pick.endpoint_name == "b"
    (ej,) = resp.explanation.ejected
    assert (ej.endpoint_name, ej.reason) == ("a", REFUSED)
    assert 0 < ej.cooldown_left_seconds <= 1.0
    assert list(resp.explanation.profiles[0].candidates) == ["b"]


class MetricsServer:
    """A model server's metrics page on 127.0.0.1 that can die (listener and connections)."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self.server = await _metrics_server(self.port, self.writers)
        self.port = self.server.sockets[0].getsockname()[1]

    async def kill(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        await self.server.wait_closed()


async def _metrics_server(port: int, writers: set) -> asyncio.AbstractServer:
    page = b"vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:gpu_cache_usage_perc 0.1\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(page), page))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writers.discard(writer)
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def test_a_model_server_that_dies_is_avoided_within_a_poll_and_readmitted() -> None:
    """A real server on 127.0.0.1 goes away: the scraper's refused connection ejects it
    (no waiting for staleness), and after the cool-down its first good scrape returns it."""
    srv = MetricsServer()
    await srv.start()
    ds = Datastore()
    ds.set_endpoints([Endpoint("live", "127.0.0.1", srv.port)])
    h = PassiveHealth(base_cooldown=0.2)
    ds.add_listener(h.on_endpoints_changed)
    scraper = Scraper(ds, interval=0.02, timeout=0.5, health=h)
    await scraper.start()
    try:
        for _ in range(200):
            if ds.metrics("live") is not None and ds.metrics("live").last_error is None:
                break
            await asyncio.sleep(0.01)
        await srv.kill()
        for _ in range(200):  # bounded wait, not a timing assertion
            if h.is_ejected("live"):
                break
            await asyncio.sleep(0.01)
        assert h.ejected()[0].reason == REFUSED
        await srv.start()
        for _ in range(300):
            if not h.is_ejected("live"):
                break
            await asyncio.sleep(0.01)
        assert not h.is_ejected("live")
    finally:
        await scraper.stop()
        await srv.kill()
