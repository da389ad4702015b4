"""Two EPP replicas behind one Envoy route shared-prefix traffic as well as one EPP.

Envoy's `epp` cluster holds both replicas and balances the ext_proc streams (one per HTTP
request) round robin across them. Requests come in groups that share a long system
prompt; a request "hits" when the model server that answers it already served its group
(its prefix cache would hold the prompt). Without sync each replica learns every group on
its own and sends the group's second request, which the other replica sees, to a random
pod; with sync both follow what either learned.
"""

from __future__ import annotations

import tempfile
from typing import Iterator

import pytest
import yaml

from tests.redis_server import RedisServer, redis_fixture
from tests.support import (EppProcess, UpstreamFleet, http, post_json,
                           scratch_dir, start_envoy, start_epp, vllm_page)

pytestmark = pytest.mark.e2e

GROUPS = 41  # odd: with round robin, a group's consecutive requests alternate replicas
ROUNDS = 3


@pytest.fixture(scope="module")
def pods() -> Iterator[UpstreamFleet]:
    with UpstreamFleet(4) as f:
        for u in f.upstreams:
            u.metrics_page = vllm_page(waiting=0, running=0, kv=0.1)
        yield f


@pytest.fixture(scope="module")
def endpoints_file(pods: UpstreamFleet) -> str:
    f = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, dir=scratch_dir())
    yaml.safe_dump([{"name": u.name, "address": "127.0.0.1", "port": u.port}
                    for u in pods.upstreams], f)
    f.close()
    return f.name


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    yield from redis_fixture()


def shared_prefix_hit_rate(url: str, tag: str) -> float:
    """Send GROUPS x ROUNDS requests, interleaving groups; the fraction that hit."""
    seen: dict[int, set[str]] = {}
    hits = 0
    for r in range(ROUNDS):
        for g in range(GROUPS):
            system = f"[{tag}] group {g:03d}: " + "you answer questions about food. " * 60
            body = {"model": "food-review", "prompt": f"{system}\nquestion {r}: why?",
                    "max_tokens": 4}
            res = post_json(url + "/v1/completions", body)
            assert res.status == 200, res.body
            pod = res.json()["served_by"]
            hits += pod in seen.setdefault(g, set())
            seen[g].add(pod)
    return hits / (GROUPS * ROUNDS)


def requests_seen(epp: EppProcess) -> float:
    text = http("GET", f"http://127.0.0.1:{epp.metrics_port}/metrics").body.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("inference_objective_request_total{"))


def run(endpoints_file: str, replicas: int, sync: list[str]) -> tuple[float, list[float]]:
    epps = [start_epp(*sync, endpoints_file=endpoints_file) for _ in range(replicas)]
    # The `epp` cluster as `epp envoy-config --epp-address a:port,b:port` writes it.
    envoy = start_envoy(epps[0].grpc_port, more_epps=[e.grpc_port for e in epps[1:]])
    try:
        rate = shared_prefix_hit_rate(envoy.url, f"{replicas}-{bool(sync)}")
        return rate, [requests_seen(e) for e in epps]
    finally:
        envoy.proc.stop()
        for e in epps:
            e.proc.stop()


def test_two_synced_replicas_hit_the_prefix_cache_like_one(endpoints_file: str,
                                                           redis: RedisServer) -> None:
    sync = ["--state-sync", redis.url, "--state-sync-interval", "20ms"]
    one, _ = run(endpoints_file, 1, [])
    unsynced, split_u = run(endpoints_file, 2, [])
    synced, split_s = run(endpoints_file, 2, sync)
    total = GROUPS * ROUNDS
    print(f"hit rate: one {one:.3f}, two unsynced {unsynced:.3f}, two synced {synced:.3f}; "
          f"requests per replica unsynced {split_u}, synced {split_s}")
    # Envoy really spread the streams over both replicas.
    for split in (split_u, split_s):
        assert min(split) >= 0.3 * total, split
    best = (ROUNDS - 1) / ROUNDS  # only a group's first request can miss
    assert one >= best - 0.05, one
    assert synced >= one - 0.05, (synced, one)
    assert unsynced <= synced - 0.15, (unsynced, synced)


def test_a_killed_replica_fails_no_request_sent_after_it_died(endpoints_file: str) -> None:
    """The generated config for several replicas: streams the dead replica refuses are
    retried on the other (Envoy keeps choosing an ejected host for about a second)."""
    epps = [start_epp(endpoints_file=endpoints_file) for _ in range(2)]
    envoy = start_envoy(epps[0].grpc_port, more_epps=[epps[1].grpc_port])
    body = {"model": "food-review", "prompt": "hello", "max_tokens": 2}
    try:
        for _ in range(4):  # both replicas serve
            assert post_json(envoy.url + "/v1/completions", body).status == 200
        assert min(requests_seen(e) for e in epps) >= 1
        epps[1].proc.p.kill()
        epps[1].proc.p.wait(10)
        statuses = [post_json(envoy.url + "/v1/completions", body).status for _ in range(10)]
        assert statuses == [200] * 10, statuses
    finally:
        envoy.proc.stop()
        for e in epps:
            e.proc.stop()
