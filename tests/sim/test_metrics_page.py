"""The simulator's /metrics page against real vLLM captures (tests/fixtures/sim/)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.sim.conftest import BASE, StartSim, scrape, value

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sim"
VLLM_V1 = FIXTURES / "vllm-v1-2025-11-qwen1.5-0.5b-chat.txt"
VLLM_V0_LORA = FIXTURES / "vllm-v0-2025-with-lora.txt"


def families(text: str) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(text)}


async def page(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return await r.text()


async def test_every_family_matches_real_vllm_v1_in_type_labels_and_buckets(
        start_sim: StartSim, http):
    fleet = await start_sim(time_scale=20)
    url = fleet.urls[0]
    async with http.post(url + "/v1/completions",
                         json={"model": BASE, "prompt": "warm up", "max_tokens": 3}) as r:
        assert r.status == 200
    ours = families(await page(http, url))
    real = families(VLLM_V1.read_text())
    for name, fam in ours.items():
        if name == "vllm:lora_requests_info":
            continue  # not in this capture (LoRA off there); checked against V0 below
        assert name in real, f"{name} is not a real vLLM V1 family"
        ref = real[name]
        assert fam.type == ref.type, name
        assert fam.documentation == ref.documentation, name
        ours_labels = {k for s in fam.samples for k in s.labels if k != "le"}
        real_labels = {k for s in ref.samples for k in s.labels if k != "le"}
        assert ours_labels <= real_labels, (name, ours_labels - real_labels)
        if fam.type == "histogram":
            def bounds(f: Metric) -> list[str]:
                return sorted({s.labels["le"] for s in f.samples if s.name.endswith("_bucket")},
                              key=float)
            assert bounds(fam) == bounds(ref), name
    for must in ("vllm:num_requests_waiting", "vllm:num_requests_running",
                 "vllm:kv_cache_usage_perc", "vllm:cache_config_info",
                 "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
                 "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:prompt_tokens",
                 "vllm:generation_tokens"):
        assert must in ours, must
    sample = ours["vllm:num_requests_running"].samples[0]
    assert sample.labels == {"model_name": BASE, "engine": "0"}


async def test_lora_info_has_the_labels_of_real_vllm_and_a_timestamp_value(
        start_sim: StartSim, http):
    fleet = await start_sim(lora_modules={"food-review": "/f"}, max_loras=3)
    text = await page(http, fleet.urls[0])
    ours = families(text)["vllm:lora_requests_info"]
    real = families(VLLM_V0_LORA.read_text())["vllm:lora_requests_info"]
    assert {k for s in ours.samples for k in s.labels} == {
        k for s in real.samples for k in s.labels}
    (s,) = ours.samples
    assert s.labels == {"max_lora": "3", "running_lora_adapters": "",
                        "waiting_lora_adapters": ""}
    assert s.value > 1.7e9  # Unix time, like the real one (1.7382173358407154e+09)


async def test_legacy_flag_emits_gpu_cache_usage_perc_instead(start_sim: StartSim, http):
    fleet = await start_sim(legacy_cache_metric=True)
    fams = families(await page(http, fleet.urls[0]))
    assert "vllm:gpu_cache_usage_perc" in fams
    assert "vllm:kv_cache_usage_perc" not in fams


async def test_token_counters_follow_the_requests(start_sim: StartSim, http):
    fleet = await start_sim(time_scale=20)
    url = fleet.urls[0]
    usage = []
    for prompt in ("a" * 40, "b" * 80):
        # Scraped between requests: the histograms' cached text must follow every request.
        m = await scrape(http, url)
        assert value(m, "vllm:e2e_request_latency_seconds_count") == len(usage)
        async with http.post(url + "/v1/completions",
                             json={"model": BASE, "prompt": prompt, "max_tokens": 5}) as r:
            usage.append((await r.json())["usage"])
    m = await scrape(http, url)
    assert value(m, "vllm:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage) == 30
    assert value(m, "vllm:generation_tokens_total") == 10
    assert value(m, "vllm:request_success_total", finished_reason="length") == 2
    assert value(m, "vllm:e2e_request_latency_seconds_count") == 2
    assert value(m, "vllm:inter_token_latency_seconds_count") == 8  # 4 gaps per request
    assert value(m, "vllm:cache_config_info", block_size="16", num_gpu_blocks="4096") == 1.0


async def test_the_epps_own_parser_reads_the_page(start_sim: StartSim, http):
    """epp.datalayer's targeted parser agrees with prometheus_client on our page."""
    import epp.datalayer.engines as engines

    fleet = await start_sim(lora_modules={"food-review": "/f"}, max_loras=2, num_gpu_blocks=512,
                            max_model_len=4096)
    text = await page(http, fleet.urls[0])
    got = engines.BUILTIN_ENGINES["vllm"].parse(text, scraped_at=1.0)
    assert (got.waiting, got.running, got.kv_usage) == (0.0, 0.0, 0.0)
    assert (got.block_size, got.num_gpu_blocks, got.max_lora) == (16, 512, 2)
    assert got.active_adapters == frozenset()


async def test_without_lora_there_is_no_lora_info_and_no_runtime_loading(
        start_sim: StartSim, http):
    base_only = await start_sim()
    fams = families(await page(http, base_only.urls[0]))
    assert "vllm:lora_requests_info" not in fams  # as on vLLM started without --enable-lora
    async with http.post(base_only.urls[0] + "/v1/load_lora_adapter",
                         json={"lora_name": "food-review", "lora_path": "/f"}) as r:
        assert r.status == 400
    empty_slots = await start_sim(enable_lora=True, max_loras=4)
    (s,) = families(await page(http, empty_slots.urls[0]))["vllm:lora_requests_info"].samples
    assert s.labels["max_lora"] == "4"
