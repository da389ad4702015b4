"""The queueing model: behaviour a router depends on, read from the server's own metrics.

Latencies come from the simulator's histograms, which are in simulated seconds, so these
checks do not depend on how fast this machine is (only on it keeping up with the
chosen time scale, which is modest here).
"""

from __future__ import annotations

import asyncio
import random

import aiohttp

from tests.sim.conftest import BASE, StartSim, scrape, value, wait_until


async def complete(http: aiohttp.ClientSession, url: str, model: str = BASE,
                   prompt: str = "hello", max_tokens: int = 8) -> dict:
    async with http.post(url + "/v1/completions",
                         json={"model": model, "prompt": prompt, "max_tokens": max_tokens}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def ttft_of_next(http: aiohttp.ClientSession, url: str, **kw: object) -> float:
    """Send one request alone and return its simulated time to first token."""
    before = await scrape(http, url)
    await complete(http, url, **kw)  # type: ignore[arg-type]
    after = await scrape(http, url)
    name = "vllm:time_to_first_token_seconds_sum"
    return value(after, name) - value(before, name)


async def test_littles_law_holds_under_steady_load(start_sim: StartSim, http):
    """L = lambda * W: the queue gauges agree with the arrival rate and latencies."""
    scale = 2.0
    fleet = await start_sim(time_scale=scale, max_num_seqs=8, seed=7)
    url = fleet.urls[0]
    rng = random.Random(1)
    rate = 16.0  # Poisson arrivals per simulated second; capacity is well above it
    horizon = 7.0  # simulated seconds of arrivals
    tasks: list[asyncio.Task] = []
    area = 0.0  # integral of (running + waiting) over wall time, from the scraped gauges
    loop = asyncio.get_running_loop()

    async def sampler() -> None:
        # Time-weighted: each reading holds until the next one, however late that is.
        nonlocal area
        last_t, last_n = loop.time(), 0.0
        while True:
            page = await scrape(http, url)
            now = loop.time()
            area += last_n * (now - last_t)
            last_t = now
            last_n = (value(page, "vllm:num_requests_running")
                      + value(page, "vllm:num_requests_waiting"))
            await asyncio.sleep(0.01)

    t0 = loop.time()
    sampling = asyncio.create_task(sampler())
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t > horizon:
            break
        await asyncio.sleep(max(0.0, t0 + t / scale - loop.time()))
        tasks.append(asyncio.create_task(
            complete(http, url, prompt="x" * rng.randint(40, 800),
                     max_tokens=rng.randint(4, 24))))
    await asyncio.gather(*tasks)
    await asyncio.sleep(0.03)  # one more reading of the empty server
    sampling.cancel()
    wall = loop.time() - t0  # from empty to empty, so no request is cut off
    page = await scrape(http, url)
    n = value(page, "vllm:e2e_request_latency_seconds_count")
    w = value(page, "vllm:e2e_request_latency_seconds_sum") / n  # simulated seconds
    assert n == len(tasks)
    lam = n / (wall * scale)
    l_avg = area / wall
    assert l_avg > 1.0  # there really was a queue to measure
    assert abs(l_avg - lam * w) / (lam * w) < 0.15, (l_avg, lam, w)


async def test_repeated_prefix_cuts_time_to_first_token(start_sim: StartSim, http):
    fleet = await start_sim(time_scale=2.0)
    url = fleet.urls[0]
    shared = "You are a helpful assistant. " * 150  # ~1100 tokens
    cold = await ttft_of_next(http, url, prompt=shared + "Question one?")
    out = await complete(http, url, prompt=shared + "Question two?")
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] >= 1024
    warm = await ttft_of_next(http, url, prompt=shared + "Question three?")
    # ~1100 tokens of prefill at 50 us each is ~55 ms of the cold TTFT.
    assert warm < cold - 0.04, (cold, warm)
    page = await scrape(http, url)
    assert value(page, "vllm:prefix_cache_hits_total") >= 2 * 1024
    assert value(page, "vllm:prefix_cache_queries_total") > value(
        page, "vllm:prefix_cache_hits_total")


async def test_different_adapters_do_not_share_cached_prefixes(start_sim: StartSim, http):
    fleet = await start_sim(lora_modules={"a": "/a"}, max_loras=2, time_scale=20)
    url = fleet.urls[0]
    prompt = "the same long prompt " * 50
    await complete(http, url, model=BASE, prompt=prompt)
    out = await complete(http, url, model="a", prompt=prompt)
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_adapter_swap_in_costs_its_load_time(start_sim: StartSim, http):
    load = 0.3
    fleet = await start_sim(lora_modules={"food-review": "/f", "cad-fabricator": "/c"},
                            max_loras=1, lora_load_time=load, time_scale=4.0)
    url = fleet.urls[0]
    first = await ttft_of_next(http, url, model="food-review")   # loads food-review
    resident = await ttft_of_next(http, url, model="food-review")  # already in the slot
    swapped = await ttft_of_next(http, url, model="cad-fabricator")  # evicts food-review
    assert first - resident > load * 0.8
    assert swapped - resident > load * 0.8
    assert fleet.replicas[0].engine.stats.lora_loads == 2


async def test_lora_requests_info_reports_running_and_waiting_adapters(
        start_sim: StartSim, http):
    # One adapter slot: while food-review runs, cad-fabricator must wait for the slot.
    fleet = await start_sim(lora_modules={"food-review": "/f", "cad-fabricator": "/c"},
                            max_loras=1, time_scale=2.0)
    url = fleet.urls[0]
    engine = fleet.replicas[0].engine
    a = asyncio.create_task(complete(http, url, model="food-review", max_tokens=30))
    await wait_until(lambda: engine.num_running >= 1, "a running request")
    b = asyncio.create_task(complete(http, url, model="cad-fabricator", max_tokens=5))
    await wait_until(lambda: engine.num_waiting >= 1, "a waiting request")
    page = await scrape(http, url)
    infos = {labels: v for (name, labels), v in page.items()
             if name == "vllm:lora_requests_info"}
    latest = dict(max(infos.items(), key=lambda kv: kv[1])[0])
    assert latest == {"max_lora": "1", "running_lora_adapters": "food-review",
                      "waiting_lora_adapters": "cad-fabricator"}
    await asyncio.gather(a, b)


async def test_decode_steps_slow_down_as_the_batch_grows(start_sim: StartSim, http):
    fleet = await start_sim(time_scale=4.0, decode_time_per_seq=0.001)
    url = fleet.urls[0]

    async def mean_itl(concurrency: int) -> float:
        before = await scrape(http, url)
        await asyncio.gather(*(complete(http, url, max_tokens=20) for _ in range(concurrency)))
        after = await scrape(http, url)
        s = "vllm:inter_token_latency_seconds_"
        return ((value(after, s + "sum") - value(before, s + "sum"))
                / (value(after, s + "count") - value(before, s + "count")))

    alone = await mean_itl(1)
    batched = await mean_itl(24)
    # 23 more sequences in the batch at 1 ms each
    assert batched > alone + 0.015, (alone, batched)


async def test_batch_never_exceeds_max_num_seqs_and_the_rest_wait(start_sim: StartSim, http):
    fleet = await start_sim(time_scale=4.0, max_num_seqs=4)
    url = fleet.urls[0]
    work = asyncio.gather(*(complete(http, url, max_tokens=10) for _ in range(12)))
    running, waiting = [], []
    while not work.done():
        page = await scrape(http, url)
        running.append(value(page, "vllm:num_requests_running"))
        waiting.append(value(page, "vllm:num_requests_waiting"))
        await asyncio.sleep(0.005)
    await work
    assert max(running) == 4
    assert max(waiting) >= 4


async def test_kv_pressure_preempts_and_still_finishes_everything(start_sim: StartSim, http):
    # 24 blocks of 16 tokens; each request needs 4-5 blocks as it grows.
    fleet = await start_sim(time_scale=10.0, num_gpu_blocks=24, block_size=16,
                            max_model_len=128, enable_prefix_caching=False)
    url = fleet.urls[0]
    outs = await asyncio.gather(*(complete(http, url, prompt=f"{i:03d}" * 40, max_tokens=60)
                                  for i in range(8)))
    assert all(o["usage"]["completion_tokens"] == 60 for o in outs)
    page = await scrape(http, url)
    assert value(page, "vllm:num_preemptions_total") > 0
    assert value(page, "vllm:kv_cache_usage_perc") == 0.0
    assert fleet.replicas[0].engine.kv.num_free == 24


async def test_kv_usage_is_reported_while_requests_hold_blocks(start_sim: StartSim, http):
    fleet = await start_sim(time_scale=2.0, num_gpu_blocks=100, block_size=16,
                            max_model_len=1024)
    url = fleet.urls[0]
    task = asyncio.create_task(complete(http, url, prompt="y" * 640, max_tokens=40))
    engine = fleet.replicas[0].engine
    await wait_until(lambda: engine.num_running == 1, "a running request")
    page = await scrape(http, url)
    assert 0.095 <= value(page, "vllm:kv_cache_usage_perc") <= 0.135  # 10-13 blocks of 100
    await task


async def test_a_request_waiting_for_an_adapter_slot_does_not_block_others(
        start_sim: StartSim, http):
    fleet = await start_sim(lora_modules={"food-review": "/f", "cad-fabricator": "/c"},
                            max_loras=1, time_scale=2.0)
    url = fleet.urls[0]
    engine = fleet.replicas[0].engine
    long_one = asyncio.create_task(complete(http, url, model="food-review", max_tokens=40))
    await wait_until(lambda: engine.num_running == 1, "food-review running")
    blocked = asyncio.create_task(complete(http, url, model="cad-fabricator", max_tokens=2))
    await wait_until(lambda: engine.num_waiting == 1, "cad-fabricator waiting")
    await complete(http, url, model=BASE, max_tokens=2)  # the base model passes it by
    assert not blocked.done() and not long_one.done()
    await asyncio.gather(long_one, blocked)


async def test_long_prompts_are_prefilled_in_chunks(start_sim: StartSim, http):
    fleet = await start_sim(time_scale=10.0, max_num_batched_tokens=256, max_model_len=2048)
    engine = fleet.replicas[0].engine
    out = await complete(http, fleet.urls[0], prompt="w" * 4000, max_tokens=1)
    assert out["usage"]["prompt_tokens"] == 1000
    assert engine.stats.steps == 4  # 256 + 256 + 256 + 232 tokens; the last emits the token
