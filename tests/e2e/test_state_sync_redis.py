"""Active-active replicas sharing state through a real redis-server.

In-process replicas (datastore, scheduler, director, `StateSync`, as `epp` wires them)
against a real Redis, and EPP processes where dying or starting matters. Waits poll with
generous deadlines: a loaded 2-core machine must not turn them red; the speed itself is
measured in benchmarks/bench_active_active.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import grpc
import pytest

from epp import observability as obs
from epp.config import load_config
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.director import Director
from epp.request import InferenceRequest, parse_body
from epp.scheduling import InFlightTracker, Scheduler
from epp.scheduling import prefix as _prefix
from epp.scheduling.scorers import PrefixCacheScorer
from epp.settings import Settings
from epp.statesync.setup import state_sync_from_settings
from epp.statesync.sync import StateSync
from epp.v1 import pick_pb2, pick_pb2_grpc
from tests.redis_server import RedisServer, redis_fixture
from tests.support import free_port, http, start_epp

pytestmark = pytest.mark.e2e

NAMES = ["pod-a", "pod-b", "pod-c", "pod-d"]
MODEL = "food-review"


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    yield from redis_fixture()


class Replica:
    """One EPP replica's routing core with state sync, wired like `EppApp` does."""

    def __init__(self, url: str, key: str, *, scraped: bool = True, ttl: float = 1.0,
                 interval: float = 0.02) -> None:
        self.config = load_config(None)
        self.datastore = Datastore()
        self.datastore.set_endpoints([Endpoint(n, f"10.0.0.{i + 1}", 8000)
                                      for i, n in enumerate(NAMES)])
        if scraped:  # fresh, idle metrics; unscraped endpoints count every open request
            for n in NAMES:
                self.datastore.update_metrics(n, EndpointMetrics(
                    waiting=0, running=0, kv_usage=0.1, scraped_at=time.monotonic()))
        self.inflight = InFlightTracker()
        self.scheduler = Scheduler.from_config(self.config, inflight=self.inflight)
        self.director = Director(self.datastore, self.scheduler, inflight=self.inflight)
        settings = Settings(state_sync=url, state_sync_key=key, state_sync_interval=interval,
                            state_sync_ttl=ttl)
        sync = state_sync_from_settings(settings, self.datastore, self.inflight,
                                        self.config.plugins)
        assert sync is not None
        self.sync: StateSync = sync
        self.scorer: PrefixCacheScorer = self.config.plugins["prefix-cache-scorer"]

    async def route(self, prompt: str, rid: str = "r") -> Any:
        raw = json.dumps({"model": MODEL, "prompt": prompt}).encode()
        req = InferenceRequest(rid, "/v1/completions", body=raw,
                               parsed=parse_body("/v1/completions", raw))
        return await self.director.route(req)

    def holders(self, prompt: str) -> dict[str, int]:
        """Endpoints this replica believes hold `prompt`'s blocks, and how many."""
        hashes = _prefix.block_hashes(MODEL, _prefix.prompt_bytes(prompt),
                                      self.scorer.default_chars, self.scorer.max_blocks)
        return self.scorer.index.match(hashes)


def prompt(i: int) -> str:
    return f"system prompt {i:04d} " + "you are a careful assistant. " * 40


async def eventually(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture
async def replicas(redis: RedisServer) -> AsyncIterator[Callable[..., Awaitable[Replica]]]:
    started: list[Replica] = []

    async def make(**kw: Any) -> Replica:
        r = Replica(kw.pop("url", redis.url), kw.pop("key", "epp:state:test"), **kw)
        await r.sync.start()
        started.append(r)
        return r

    yield make
    for r in started:
        await r.sync.stop()


async def test_a_prefix_learned_on_one_replica_is_used_by_the_other(replicas: Any) -> None:
    a, b = await replicas(), await replicas()
    assert a.sync.connected and b.sync.connected
    first = await a.route(prompt(1))
    took = await eventually(lambda: first.endpoint.name in b.holders(prompt(1)),
                            what="B to learn A's prefix")
    # B now routes the same prompt where A sent it, although it never saw it itself.
    again = await b.route(prompt(1))
    assert again.endpoint.name == first.endpoint.name
    assert took < 5.0


async def test_three_replicas_converge(replicas: Any) -> None:
    reps = [await replicas() for _ in range(3)]
    routed = {}
    for i, r in enumerate(reps):
        routed[i] = (await r.route(prompt(10 + i))).endpoint.name
    for r in reps:
        for i in range(3):
            await eventually(lambda: routed[i] in r.holders(prompt(10 + i)),
                             what=f"replica to learn prompt {i}")
    # Each replica routes every prompt where its first replica did.
    for r in reps:
        for i in range(3):
            assert (await r.route(prompt(10 + i))).endpoint.name == routed[i]


async def test_in_flight_load_is_shared_and_counts_while_open(replicas: Any) -> None:
    a = await replicas(scraped=False)
    b = await replicas(scraped=False)
    decisions = [await a.route(prompt(i), f"r{i}") for i in range(5)]
    loaded = {d.endpoint.name for d in decisions}
    await eventually(lambda: sum(b.sync.remote.total(n) for n in NAMES) == 5,
                     what="B to see A's five open requests")
    for d in decisions:
        a.director.finished(d)
    await eventually(lambda: sum(b.sync.remote.total(n) for n in NAMES) == 0,
                     what="A's finished requests to stop counting on B")
    assert loaded


async def test_a_late_replica_bootstraps_before_it_is_ready(replicas: Any) -> None:
    a = await replicas()
    routed = {i: (await a.route(prompt(i))).endpoint.name for i in range(20)}
    await eventually(lambda: a.sync.sent_records >= 20 and not a.sync._pending,
                     what="A's records to reach Redis")
    late = await replicas()  # start() returns after the replay: nothing to wait for
    assert late.sync.bootstrapped
    for i, name in routed.items():
        assert name in late.holders(prompt(i))


async def test_redis_restarted_mid_load_no_request_fails(redis: RedisServer,
                                                         replicas: Any) -> None:
    a, b = await replicas(), await replicas()
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def load(r: Replica, base: int) -> int:
        n = 0
        while not stop.is_set():
            try:
                d = await r.route(prompt(base + n % 50), f"x{n}")
                r.director.finished(d)
            except BaseException as e:  # noqa: BLE001 - any error would reach a client
                errors.append(e)
            n += 1
            await asyncio.sleep(0.002)
        return n

    tasks = [asyncio.ensure_future(load(a, 100)), asyncio.ensure_future(load(b, 200))]
    await asyncio.sleep(0.3)
    await asyncio.to_thread(redis.restart)
    await asyncio.sleep(0.3)
    stop.set()
    counts = await asyncio.gather(*tasks)
    assert errors == [] and min(counts) > 10
    await eventually(lambda: a.sync.connected and b.sync.connected, what="reconnection")
    # Resynchronised: what is learned now flows again.
    d = await a.route(prompt(999))
    await eventually(lambda: d.endpoint.name in b.holders(prompt(999)),
                     what="sync after the restart")


async def test_redis_lost_peers_load_stops_counting_and_comes_back(redis: RedisServer,
                                                                   replicas: Any) -> None:
    a = await replicas(scraped=False)
    b = await replicas(scraped=False)
    for i in range(3):
        await a.route(prompt(i), f"r{i}")

    def seen() -> int:
        return sum(b.sync.remote.total(n) for n in NAMES)

    await eventually(lambda: seen() == 3, what="B to see A's load")
    await asyncio.to_thread(redis.kill)
    await eventually(lambda: not b.sync.connected, what="B to notice")
    assert seen() == 0  # cut off: no stale load from peers it cannot hear
    assert (await b.route(prompt(50))).endpoint.name in NAMES
    await asyncio.to_thread(redis.start)
    await eventually(lambda: seen() == 3, what="A's load to be re-announced")


async def test_redis_unreachable_routing_goes_on_degraded(replicas: Any) -> None:
    before = _errors("unreachable")
    r = await replicas(url=f"redis://127.0.0.1:{free_port()}")
    assert not r.sync.connected and r.sync.status.startswith("degraded")
    d = await r.route(prompt(1))
    assert d.endpoint.name in NAMES
    assert _errors("unreachable") > before


async def test_auth_refused_and_garbage_degrade_without_failing(tmp_path: Any) -> None:
    locked = RedisServer(password="s3cret").start()
    try:
        before = _errors("auth")
        r = Replica(f"redis://127.0.0.1:{locked.port}", "k")
        await r.sync.start()
        try:
            assert not r.sync.connected
            assert (await r.route(prompt(1))).endpoint.name in NAMES
            assert _errors("auth") > before
        finally:
            await r.sync.stop()
        # With the password it works; garbage entries in the stream are skipped.
        locked.command("XADD", "k", "*", "v", "1", "r", "evil", "pm", "[[1,2]]", "ph", "x")
        locked.command("XADD", "k", "*", "junk", "yes")
        garbage = _errors("garbage")
        ok = Replica(locked.url, "k")
        await ok.sync.start()
        try:
            assert ok.sync.connected and ok.sync.bootstrapped
            assert _errors("garbage") >= garbage + 2
        finally:
            await ok.sync.stop()
        # A key of the wrong type: degraded (reason garbage), routing goes on.
        locked.command("SET", "wrongtype", "x")
        wt = Replica(locked.url, "wrongtype")
        await wt.sync.start()
        try:
            assert not wt.sync.connected
            assert (await wt.route(prompt(2))).endpoint.name in NAMES
        finally:
            await wt.sync.stop()
    finally:
        locked.stop()


def _errors(reason: str) -> float:
    return obs.REGISTRY.get_sample_value(
        "inference_extension_state_sync_errors_total", {"reason": reason}) or 0.0


# -- EPP processes: a replica that dies, a replica that cannot reach Redis -----------------


def _pick(port: int, text: str) -> pick_pb2.PickResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return pick_pb2_grpc.PickerStub(ch).Pick(
            pick_pb2.PickRequest(model=MODEL, prompt=text), timeout=5)


async def test_in_flight_load_of_a_killed_replica_expires(redis: RedisServer) -> None:
    # Unscraped endpoints (nothing listens on port 9): a detached pick stays in flight.
    endpoints = ",".join(f"127.0.0.{i + 1}:9" for i in range(2))
    dying = await asyncio.to_thread(
        start_epp, "--state-sync", redis.url, "--state-sync-key", "k", "--state-sync-ttl",
        "1s", "--state-sync-interval", "20ms", endpoints=endpoints)
    watcher = Replica(redis.url, "k", scraped=False, ttl=1.0)
    watcher.datastore.set_endpoints([Endpoint(f"127.0.0.{i + 1}:9", f"127.0.0.{i + 1}", 9)
                                     for i in range(2)])
    await watcher.sync.start()
    try:
        for i in range(4):
            await asyncio.to_thread(_pick, dying.grpc_port, prompt(i))

        def remote_total() -> int:
            return sum(watcher.sync.remote.total(e.name) for e in watcher.datastore.endpoints())

        await eventually(lambda: remote_total() == 4, what="the watcher to see 4 open picks")
        dying.proc.p.kill()  # no goodbye: only the heartbeat TTL can clear its load
        took = await eventually(lambda: remote_total() == 0, what="the dead replica's load to expire")
        assert took < 5.0
        assert watcher.sync.remote.peers == []
    finally:
        await watcher.sync.stop()
        dying.proc.stop()


def test_an_epp_that_cannot_reach_redis_serves_and_says_degraded() -> None:
    epp = start_epp("--state-sync", f"redis://127.0.0.1:{free_port()}",
                    endpoints="127.0.0.1:9")  # start_epp waits for readiness
    try:
        assert _pick(epp.grpc_port, "hello").endpoint == "127.0.0.1:9"
        metrics = http("GET", f"http://127.0.0.1:{epp.metrics_port}/metrics").body.decode()
        assert 'inference_extension_state_sync_errors_total{reason="unreachable"}' in metrics
        assert "inference_extension_state_sync_connected 0.0" in metrics
        assert "state sync degraded (unreachable" in epp.proc.output()
    finally:
        epp.proc.stop()
