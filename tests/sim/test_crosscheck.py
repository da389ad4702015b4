"""Our simulator beside an independent one (llm-d-inference-sim, Go) in one pool.

The EPP's data layer must read both metrics pages correctly, and the scheduler must
route across the mixed pool. llm-d-inference-sim is built once into ~/.cache/epp-tools
(see tests/tools.py); the test skips only when no Go toolchain is installed.

Known differences of llm-d-inference-sim v0.10.2 from real vLLM (we follow vLLM):
- no `engine` label on its engine metrics, and `vllm:cache_config_info` carries only
  block_size and num_gpu_blocks;
- `vllm:lora_requests_info` values are printed with 9 significant digits
  (e.g. `1.79560646e+09`), i.e. 10-second resolution, so the old and the current
  adapter series often tie and "take the largest value" cannot tell them apart.
  The assertions on its adapters below therefore only use what is unambiguous;
- counters and histograms appear only after the first request (Go client vectors);
- `vllm:request_success_total` is labelled `finish_reason` (vLLM: `finished_reason`), and
  its max-tokens histogram is `vllm:max_num_generation_tokens` (vLLM:
  `vllm:request_max_num_generation_tokens`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp.sim import REPLICA_HEADER, Fleet
from tests.sim.conftest import BASE, StartSim
from tests.llm_d_sim import llm_d_inference_sim

pytestmark = pytest.mark.slow

ADAPTER = "food-review"


@pytest.fixture
async def go_sim(tmp_path: Path) -> AsyncIterator[str]:
    """A running llm-d-inference-sim on 127.0.0.1; yields its base URL."""
    async with llm_d_inference_sim(
            tmp_path, "--model", BASE, "--force-dummy-tokenizer",
            "--max-loras", "2", "--max-num-seqs", "8", "--seed", "1",
            "--lora-modules", json.dumps({"name": ADAPTER, "path": "/adapters/food-review"}),
            "--time-to-first-token", "20ms", "--inter-token-latency", "20ms",
            "--mode", "random") as url:
        yield url


async def test_both_simulators_expose_pages_prometheus_can_parse(go_sim: str, start_sim: StartSim,
                                                                 http: aiohttp.ClientSession):
    fleet = await start_sim(lora_modules={ADAPTER: "/adapters/food-review"}, max_loras=2)
    for url in (fleet.urls[0], go_sim):
        async with http.post(url + "/v1/completions",
                             json={"model": ADAPTER, "prompt": "hello there", "max_tokens": 3}) as r:
            assert r.status == 200
            out = await r.json()
            assert out["model"] == ADAPTER
            assert out["usage"]["completion_tokens"] >= 1
        want = {"vllm:num_requests_waiting", "vllm:num_requests_running",
                "vllm:kv_cache_usage_perc", "vllm:lora_requests_info", "vllm:cache_config_info",
                "vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                "vllm:prompt_tokens", "vllm:generation_tokens"}
        # The Go simulator records some series just after it answers: poll briefly.
        deadline = time.monotonic() + 3
        while True:
            async with http.get(url + "/metrics") as r:
                families = {f.name for f in text_string_to_metric_families(await r.text())}
            if want <= families or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert want <= families, (url, want - families)


async def test_the_epp_scrapes_both_and_routes_across_a_mixed_pool(
        go_sim: str, start_sim: StartSim, http: aiohttp.ClientSession):
    import epp.datalayer.scraper as datalayer
    import epp.scheduling as scheduling
    import epp.scheduling.scorers as scorers
    from epp.scheduling.pickers import MaxScorePicker
    from epp.datastore import Datastore, Endpoint

    fleet: Fleet = await start_sim(replicas=2, name="py", time_scale=1.0, max_loras=2,
                                   max_num_seqs=8, lora_modules={ADAPTER: "/adapters/fr"})
    go_host, go_port = go_sim.removeprefix("http://").split(":")
    endpoints = [Endpoint(r.name, "127.0.0.1", r.port) for r in fleet.replicas]
    endpoints.append(Endpoint("go-sim", go_host, int(go_port)))
    ds = Datastore(staleness_threshold=2.0)
    ds.set_endpoints(endpoints)
    scraper = datalayer.Scraper(ds, interval=0.05, timeout=1.0)
    await scraper.start()
    try:
        await _until(lambda: all(
            (m := ds.metrics(e.name)) is not None and m.last_error is None
            and m.scraped_at == m.scraped_at for e in endpoints), "first scrapes")
        idle = {e.name: _metrics(ds, e.name) for e in endpoints}
        for name, m in idle.items():
            assert m.waiting == 0 and m.running == 0, name
            assert 0.0 <= m.kv_usage <= 1.0, name
            assert m.block_size == 16, name
            assert m.max_lora == 2, name
        assert idle["py-0"].num_gpu_blocks == fleet.replicas[0].cfg.num_gpu_blocks
        assert idle["go-sim"].num_gpu_blocks == 1024  # its --kv-cache-size default

        # Route 24 adapter requests through the EPP's scheduler, as the director would.
        inflight = scheduling.InFlightTracker()
        sched = scheduling.Scheduler([scheduling.Profile(
            "default", scorers=[(scorers.QueueScorer(), 1.0),
                                (scorers.RunningRequestsSizeScorer(), 1.0),
                                (scorers.KVCacheUtilizationScorer(), 1.0),
                                (scorers.LoraAffinityScorer(), 1.0)],
            picker=MaxScorePicker("max-score-picker"))], inflight=inflight)
        served: dict[str, int] = {}
        seen_running: dict[str, float] = {e.name: 0.0 for e in endpoints}
        seen_adapters: dict[str, set[str]] = {e.name: set() for e in endpoints}

        async def one(i: int) -> None:
            req = scheduling.SchedulingRequest(request_id=f"r{i}", target_model=ADAPTER,
                                               prompt_text=f"request {i} " * 20)
            picked = sched.schedule(req, ds.snapshot()).endpoint
            inflight.started(req.request_id, picked.name, time.monotonic())
            try:
                async with http.post(f"http://{picked.hostport}/v1/completions",
                                     json={"model": ADAPTER, "prompt": req.prompt_text,
                                           "max_tokens": 25}) as r:
                    assert r.status == 200, await r.text()
                    assert (await r.json())["model"] == ADAPTER
                    if picked.name != "go-sim":
                        assert r.headers[REPLICA_HEADER] == picked.name
            finally:
                inflight.finished(req.request_id)
            served[picked.name] = served.get(picked.name, 0) + 1

        async def watch() -> None:
            while True:
                for e in endpoints:
                    m = ds.metrics(e.name)
                    if m is not None and m.last_error is None:
                        seen_running[e.name] = max(seen_running[e.name], m.running)
                        seen_adapters[e.name] |= m.active_adapters
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        try:
            for wave in range(3):
                await asyncio.gather(*(one(wave * 8 + i) for i in range(8)))
        finally:
            watcher.cancel()
        assert sum(served.values()) == 24
        assert set(served) == {e.name for e in endpoints}, served  # every pod took work
        # The EPP saw load on every pod, our simulator's and the Go one's alike.
        assert all(v >= 1 for v in seen_running.values()), seen_running
        # Our simulator reports the running adapter unambiguously.
        assert all(ADAPTER in seen_adapters[r.name] for r in fleet.replicas), seen_adapters
        for r in fleet.replicas:
            assert r.engine.stats.finished["length"] == served.get(r.name, 0)
        await _until(lambda: all(_metrics(ds, e.name).running == 0 for e in endpoints),
                     "pods idle again")
    finally:
        await scraper.stop()


def _metrics(ds: Any, name: str) -> Any:
    m = ds.metrics(name)
    assert m is not None, f"no metrics for {name}"
    return m


async def _until(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
