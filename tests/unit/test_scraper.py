"""The scraper against real HTTP servers on 127.0.0.1 serving scripted pages and faults."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from pathlib import Path
from typing import Awaitable, Callable

import pytest
from aiohttp import web

from epp.datalayer.engines import ENGINE_LABEL
from epp.datalayer.poolmetrics import PoolMetricsRefresher
from epp.datalayer.scraper import Scraper
from epp.datastore import Datastore, Endpoint
from epp.observability import REGISTRY

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "metrics"
VLLM_PAGE = (FIXTURES / "vllm-bench-45k-loaded.txt").read_bytes()  # waiting 3, running 12
SGLANG_PAGE = (FIXTURES / "sglang-docs-2024-production-metrics.txt").read_bytes()
TEXT = "text/plain; version=0.0.4; charset=utf-8"
CLIENTS = ["raw", "aiohttp"]


def small_page(waiting: str = "1", running: str = "2", kv: str = "0.25") -> bytes:
    return (
        f'vllm:num_requests_waiting{{model_name="m"}} {waiting}\n'
        f'vllm:num_requests_running{{model_name="m"}} {running}\n'
        f'vllm:kv_cache_usage_perc{{model_name="m"}} {kv}\n'
    ).encode()


class ScriptedServer:
    """A model server whose /metrics answer is chosen by `mode` at request time."""

    def __init__(self, keepalive_timeout: float = 75.0) -> None:
        self.keepalive_timeout = keepalive_timeout
        self.mode = "ok"
        self.page = VLLM_PAGE
        self.requests = 0
        self.peers: set[object] = set()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        mode = self.mode
        if mode == "ok":
            return web.Response(body=self.page, headers={"Content-Type": TEXT})
        if mode == "chunked":
            resp = web.StreamResponse(headers={"Content-Type": TEXT})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(self.page), 7000):
                await resp.write(self.page[i : i + 7000])
            await resp.write_eof()
            return resp
        if mode == "500":
            return web.Response(status=500, text="internal error")
        if mode == "html":
            return web.Response(
                body=b"<!DOCTYPE html><html><body>login</body></html>",
                headers={"Content-Type": "text/html"},
            )
        if mode == "html-as-text":
            return web.Response(body=b"\n  <html><body>oops</body></html>", headers={"Content-Type": TEXT})
        if mode == "slow":
            await asyncio.sleep(5)
            return web.Response(body=self.page, headers={"Content-Type": TEXT})
        if mode == "truncated":
            resp = web.StreamResponse(headers={"Content-Type": TEXT, "Content-Length": str(len(self.page))})
            await resp.prepare(request)
            await resp.write(self.page[: len(self.page) // 2])
            assert request.transport is not None
            request.transport.close()
            return resp
        if mode == "negative":
            return web.Response(body=small_page(waiting="-3"), headers={"Content-Type": TEXT})
        if mode == "kv-above-1":
            return web.Response(body=small_page(kv="1.7"), headers={"Content-Type": TEXT})
        if mode == "nan":
            return web.Response(body=small_page(running="NaN"), headers={"Content-Type": TEXT})
        if mode == "garbage":
            return web.Response(body=b"hello world\n", headers={"Content-Type": TEXT})
        raise AssertionError(mode)

    async def start(self) -> "ScriptedServer":
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        self.runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1,
            keepalive_timeout=self.keepalive_timeout,
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def servers():
    started: list[ScriptedServer] = []

    async def make() -> ScriptedServer:
        s = await ScriptedServer().start()
        started.append(s)
        return s

    yield make
    for s in started:
        await s.stop()


@pytest.fixture
async def scrapers():
    started: list[Scraper] = []

    async def make(ds: Datastore, **kw) -> Scraper:
        kw.setdefault("interval", 0.02)
        kw.setdefault("timeout", 0.3)
        s = Scraper(ds, **kw)
        await s.start()
        started.append(s)
        return s

    yield make
    for s in started:
        await s.stop()


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def errors(name: str, reason: str) -> float:
    return REGISTRY.get_sample_value(
        "inference_extension_scrape_errors_total", {"endpoint": name, "reason": reason}
    ) or 0.0


def ep(name: str, port: int, **labels: str) -> Endpoint:
    return Endpoint(name, "127.0.0.1", port, labels)


@pytest.mark.parametrize("client", CLIENTS)
async def test_scrapes_a_vllm_page_into_the_snapshot(servers, scrapers, client):
    srv = await servers()
    ds = Datastore()
    ds.set_endpoints([ep("pod-a", srv.port)])
    await scrapers(ds, client=client)
    await wait_until(lambda: ds.metrics("pod-a") is not None and ds.metrics("pod-a").last_error is None
                     and not math.isnan(ds.metrics("pod-a").scraped_at))
    snap = ds.snapshot()
    i = snap.by_name["pod-a"]
    assert (snap.waiting[i], snap.running[i], snap.kv_usage[i]) == (3.0, 12.0, 0.4375)
    assert snap.active_adapters[i] == {"sql-lora", "chat-lora"}
    assert (snap.block_size[i], snap.num_gpu_blocks[i], snap.max_lora[i]) == (16, 2452, 4)
    assert not snap.stale()[i]


@pytest.mark.parametrize("client", CLIENTS)
async def test_keeps_polling_on_one_keep_alive_connection(servers, scrapers, client):
    srv = await servers()
    ds = Datastore()
    ds.set_endpoints([ep("pod-a", srv.port)])
    await scrapers(ds, client=client)
    await wait_until(lambda: srv.requests >= 10)
    assert len(srv.peers) == 1


@pytest.mark.parametrize("client", CLIENTS)
async def test_chunked_answers_are_read_whole(servers, scrapers, client):
    srv = await servers()
    srv.mode = "chunked"
    ds = Datastore()
    ds.set_endpoints([ep("pod-a", srv.port)])
    await scrapers(ds, client=client)
    await wait_until(lambda: ds.metrics("pod-a") is not None and ds.metrics("pod-a").running == 12.0)
    await wait_until(lambda: srv.requests >= 3)
    assert ds.metrics("pod-a").last_error is None


FAULTS = [
    ("500", "http_status"),
    ("html", "invalid_content"),
    ("html-as-text", "invalid_content"),
    ("slow", "timeout"),
    ("truncated", "truncated"),
    ("negative", "invalid_value"),
    ("kv-above-1", "invalid_value"),
    ("nan", "invalid_value"),
    ("garbage", "missing_metrics"),
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("mode, reason", FAULTS)
async def test_a_fault_keeps_last_good_values_counts_and_recovers(
    servers, scrapers, client, mode, reason, caplog
):
    srv = await servers()
    name = f"pod-{mode}-{client}"
    ds = Datastore()
    ds.set_endpoints([ep(name, srv.port)])
    await scrapers(ds, client=client, timeout=0.2)
    await wait_until(lambda: ds.metrics(name) is not None and ds.metrics(name).waiting == 3.0)
    before = errors(name, reason)

    with caplog.at_level(logging.INFO, logger="epp.datalayer.scraper"):
        srv.mode = mode
        await wait_until(lambda: ds.metrics(name).last_error == reason)
        await wait_until(lambda: errors(name, reason) >= before + 2)  # every failed poll counts
        good = ds.metrics(name)
        assert (good.waiting, good.running, good.kv_usage) == (3.0, 12.0, 0.4375)  # last good kept
        last_good_at = good.scraped_at
        await asyncio.sleep(0.05)
        assert ds.metrics(name).scraped_at == last_good_at  # its age keeps growing

        srv.mode = "ok"
        await wait_until(lambda: ds.metrics(name).last_error is None)
        assert ds.metrics(name).scraped_at > last_good_at

    failures = [r for r in caplog.records if r.levelno == logging.WARNING and name in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]  # once per change of state
    assert reason in failures[0].getMessage()
    assert any("recovered" in r.getMessage() for r in caplog.records if name in r.getMessage())


@pytest.mark.parametrize("client", CLIENTS)
async def test_refused_endpoint_is_stale_and_counted(scrapers, client):
    name = f"pod-refused-{client}"
    ds = Datastore(staleness_threshold=0.2)
    ds.set_endpoints([ep(name, closed_port())])
    before = errors(name, "connection_refused")
    await scrapers(ds, client=client)
    await wait_until(lambda: errors(name, "connection_refused") >= before + 3)
    m = ds.metrics(name)
    assert m.last_error == "connection_refused" and math.isnan(m.scraped_at)
    snap = ds.snapshot()
    assert snap.stale()[snap.by_name[name]]  # never scraped: worst choice, not idle


async def test_metrics_go_stale_after_the_threshold_while_failing(servers, scrapers):
    srv = await servers()
    ds = Datastore(staleness_threshold=0.3)
    ds.set_endpoints([ep("pod-a", srv.port)])
    await scrapers(ds)
    await wait_until(lambda: ds.metrics("pod-a") is not None and ds.metrics("pod-a").last_error is None
                     and ds.metrics("pod-a").waiting == 3.0)
    assert not ds.snapshot().stale()[0]
    srv.mode = "500"
    await wait_until(lambda: bool(ds.snapshot().stale()[0]), timeout=3.0)
    assert ds.snapshot().waiting[0] == 3.0  # the values are still there, marked stale


async def test_a_slow_endpoint_does_not_delay_the_others(servers, scrapers):
    slow, fast = await servers(), await servers()
    slow.mode = "slow"
    ds = Datastore()
    ds.set_endpoints([ep("slow", slow.port), ep("fast", fast.port)])
    await scrapers(ds, interval=0.02, timeout=1.0)
    await wait_until(lambda: slow.requests >= 1)
    start = fast.requests
    await asyncio.sleep(0.5)  # the slow endpoint's first poll is still hanging
    assert slow.requests == 1
    assert fast.requests - start >= 5


async def test_tasks_follow_the_endpoint_set(servers, scrapers):
    a, b = await servers(), await servers()
    ds = Datastore()
    ds.set_endpoints([ep("a", a.port)])
    scraper = await scrapers(ds)
    assert scraper.polling() == {"a"}
    ds.upsert_endpoint(ep("b", b.port))
    assert scraper.polling() == {"a", "b"}
    await wait_until(lambda: b.requests >= 2)
    ds.remove_endpoint("a")
    assert scraper.polling() == {"b"}
    await asyncio.sleep(0.05)
    seen = a.requests
    await asyncio.sleep(0.1)
    assert a.requests == seen  # no more polls of a removed endpoint
    await scraper.stop()
    assert scraper.polling() == frozenset()
    await asyncio.sleep(0.05)  # a request already on the wire may still arrive
    seen = b.requests
    await asyncio.sleep(0.1)
    assert b.requests == seen


async def test_engine_label_selects_metric_names(servers, scrapers):
    srv = await servers()
    srv.page = SGLANG_PAGE
    ds = Datastore()
    ds.set_endpoints([ep("sgl", srv.port, **{ENGINE_LABEL: "sglang"})])
    await scrapers(ds)
    await wait_until(lambda: ds.metrics("sgl") is not None and ds.metrics("sgl").waiting == 2826.0)
    assert ds.metrics("sgl").kv_usage == 0.28


async def test_port_and_path_overrides(servers, scrapers):
    srv = await servers()
    ds = Datastore()
    ds.set_endpoints([Endpoint("pod-a", "127.0.0.1", 8000)])  # serving port, not metrics port
    await scrapers(ds, port=srv.port, path="metrics")
    await wait_until(lambda: ds.metrics("pod-a") is not None and ds.metrics("pod-a").waiting == 3.0)


def test_bad_settings_are_value_errors():
    ds = Datastore()
    for kw in ({"interval": 0}, {"timeout": -1}, {"scheme": "ftp"}, {"client": "curl"}):
        with pytest.raises(ValueError):
            Scraper(ds, **kw)


async def test_pool_gauges_average_fresh_endpoints_only():
    ds = Datastore(staleness_threshold=2.0)
    ds.set_endpoints([ep("p1", 1), ep("p2", 2), ep("p3", 3)])
    from epp.datastore import EndpointMetrics

    now = time.monotonic()
    ds.update_metrics("p1", EndpointMetrics(waiting=2, running=4, kv_usage=0.2, scraped_at=now))
    ds.update_metrics("p2", EndpointMetrics(waiting=6, running=8, kv_usage=0.6, scraped_at=now))
    ds.update_metrics("p3", EndpointMetrics(waiting=100, running=100, kv_usage=1.0, scraped_at=now - 10))
    ref = PoolMetricsRefresher(ds, "pool-x", interval=0.05)
    ref.refresh(now)

    def gauge(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"name": "pool-x", **labels})

    assert gauge("inference_pool_ready_pods") == 3
    assert gauge("inference_pool_average_kv_cache_utilization") == pytest.approx(0.4)
    assert gauge("inference_pool_average_queue_size") == 4.0
    assert gauge("inference_pool_average_running_requests") == 6.0
    assert gauge("inference_pool_per_pod_queue_size", model_server_pod="p2") == 6.0
    assert gauge("inference_pool_per_pod_queue_size", model_server_pod="p3") is None  # stale

    ds.remove_endpoint("p2")
    await ref.start()
    await wait_until(lambda: gauge("inference_pool_ready_pods") == 2)
    await ref.stop()
    assert gauge("inference_pool_per_pod_queue_size", model_server_pod="p2") is None
    assert gauge("inference_pool_average_queue_size") == 2.0


def self_signed_cert(tmp_path: Path) -> tuple[str, str]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import datetime
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "model-server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.mark.parametrize("client", CLIENTS)
async def test_https_with_skip_verify_and_without(tmp_path, scrapers, client):
    import ssl

    cert, key = self_signed_cert(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    srv = ScriptedServer()
    app = web.Application()
    app.router.add_get("/metrics", srv.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        ds = Datastore()
        ds.set_endpoints([ep("tls-ok", port)])
        await scrapers(ds, scheme="https", insecure_skip_verify=True, client=client)
        await wait_until(lambda: ds.metrics("tls-ok") is not None and ds.metrics("tls-ok").waiting == 3.0)

        ds2 = Datastore()
        ds2.set_endpoints([ep("tls-untrusted", port)])
        await scrapers(ds2, scheme="https", client=client)
        await wait_until(lambda: ds2.metrics("tls-untrusted") is not None
                         and ds2.metrics("tls-untrusted").last_error == "connect")
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("mode", ["ok", "chunked"])
async def test_oversized_pages_are_refused(servers, scrapers, client, mode):
    srv = await servers()
    srv.mode = mode
    name = f"pod-big-{client}-{mode}"
    ds = Datastore()
    ds.set_endpoints([ep(name, srv.port)])
    await scrapers(ds, client=client, max_body_bytes=10_000)
    await wait_until(lambda: ds.metrics(name) is not None and ds.metrics(name).last_error == "too_large")
    assert math.isnan(ds.metrics(name).waiting)


@pytest.mark.parametrize("client", CLIENTS)
async def test_server_closing_idle_connections_is_not_an_error(scrapers, client):
    srv = await ScriptedServer(keepalive_timeout=0.02).start()
    try:
        name = f"pod-idle-close-{client}"
        ds = Datastore()
        ds.set_endpoints([ep(name, srv.port)])
        await scrapers(ds, client=client, interval=0.05)
        await wait_until(lambda: srv.requests >= 8)
        assert len(srv.peers) >= 4  # it did close them, and we reconnected
        assert ds.metrics(name).last_error is None
        assert all(errors(name, r) == 0 for r in ("disconnected", "truncated", "http_client"))
    finally:
        await srv.stop()


async def test_a_poll_budget_stretches_the_interval_of_large_pools(servers, scrapers):
    srvs = [await servers() for _ in range(4)]
    ds = Datastore()
    ds.set_endpoints([ep(f"p{i}", s.port) for i, s in enumerate(srvs)])
    scraper = await scrapers(ds, interval=0.01, max_polls_per_second=40)
    assert scraper.effective_interval() == pytest.approx(0.1)  # 4 endpoints / 40 per s
    await asyncio.sleep(0.6)
    total = sum(s.requests for s in srvs)
    assert 8 <= total <= 40  # ~24 under the cap; uncapped it would be ~240


class _NullTransport:
    def write(self, data: bytes) -> None:
        pass

    def abort(self) -> None:
        pass


@pytest.mark.parametrize("chunked", [False, True])
async def test_raw_client_reads_a_many_read_answer_in_one_pass(chunked: bool) -> None:
    """A big answer arriving in many reads is accumulated in place and parsed once.

    Re-copying (`bytes + bytes`) or re-dechunking the whole answer on every read was
    quadratic: about a second of event loop per poll of a 16 MB page in 64 KB reads.
    """
    from epp.datalayer.fasthttp import _Proto

    proto = _Proto(max_body=4 * 1024 * 1024)
    proto.connection_made(_NullTransport())  # type: ignore[arg-type]
    proto.waiter = asyncio.get_running_loop().create_future()
    piece = 4096
    pieces = [bytes([65 + i % 26]) * piece for i in range(256)]  # 1 MB of body
    if chunked:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = b"".join(b"%x\r\n%s\r\n" % (piece, p) for p in pieces) + b"0\r\n\r\n"
    else:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (piece * 256)
        body = b"".join(pieces)
    data = head + body
    reads = [data[i : i + 5000] for i in range(0, len(data), 5000)]
    proto.data_received(reads[0])
    proto.data_received(reads[1])
    buf = proto.buf
    for r in reads[2:-1]:
        proto.data_received(r)
        assert proto.buf is buf  # grown in place, never re-copied
    if chunked:  # the chunks read so far were decoded once, not once per read
        assert len(proto._chunk_out) == piece * ((len(data) - len(reads[-1]) - len(head)) // (piece + 8))
    proto.data_received(reads[-1])
    assert proto.waiter.result().body == b"".join(pieces)
