"""Engine metric names, page -> EndpointMetrics, and config-file overrides."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from epp.datalayer.engines import (
    BUILTIN_ENGINES,
    ENGINE_LABEL,
    EngineConfig,
    EngineRegistry,
    MetricsError,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "metrics"


def page(name: str) -> str:
    return (FIXTURES / name).read_text()


VLLM = BUILTIN_ENGINES["vllm"]


@pytest.mark.parametrize(
    "fixture, block_size, num_blocks",
    [
        ("vllm-0.4.3-v0-datadog-fixture.txt", 16, 7281),  # V0: gpu_cache_usage_perc only
        ("vllm-v0-2025-with-lora.txt", 16, 81767),
        ("vllm-v1-2025-03-no-engine-label.txt", 0, 0),  # fragment without cache info
        ("vllm-v1-2025-11-qwen1.5-0.5b-chat.txt", 16, 2452),  # engine label, _created
    ],
)
def test_vllm_pages_of_several_generations(fixture, block_size, num_blocks):
    m = VLLM.parse(page(fixture), scraped_at=12.5)
    assert (m.waiting, m.running, m.kv_usage) == (0.0, 0.0, 0.0)
    assert (m.block_size, m.num_gpu_blocks) == (block_size, num_blocks)
    assert m.scraped_at == 12.5 and m.last_error is None


def test_vllm_loaded_page():
    m = VLLM.parse(page("vllm-bench-45k-loaded.txt"), scraped_at=1.0)
    assert (m.waiting, m.running, m.kv_usage) == (3.0, 12.0, 0.4375)
    assert m.active_adapters == {"sql-lora", "chat-lora"}
    assert m.waiting_adapters == {"tool-lora"}
    assert m.max_lora == 4


def test_vllm_prefers_kv_cache_usage_perc_sums_engines_and_takes_newest_lora():
    m = VLLM.parse(page("constructed-edge-cases.txt"), scraped_at=1.0)
    assert m.kv_usage == 0.5  # max of engines 0.25/0.5, not the deprecated twin's 0.9
    assert m.waiting == 7.0 and m.running == 12.0  # summed over engine="0" and "1"
    assert m.active_adapters == {"sql-lora", "chat-lora"}  # the series with the largest value
    assert m.waiting_adapters == {"tool-lora"}
    assert m.max_lora == 4
    assert m.block_size == 32 and m.num_gpu_blocks == 0  # num_gpu_blocks="None"


def test_vllm_fragment_without_queue_metrics_is_missing_metrics():
    with pytest.raises(MetricsError) as e:
        VLLM.parse(page("vllm-0.10.0-v1.txt"), scraped_at=1.0)
    assert e.value.reason == "missing_metrics"
    assert "vllm:num_requests_waiting" in e.value.detail


def test_sglang_page():
    m = BUILTIN_ENGINES["sglang"].parse(page("sglang-docs-2024-production-metrics.txt"), 1.0)
    assert (m.waiting, m.running, m.kv_usage) == (2826.0, 162.0, 0.28)


TRTLLM_SERVE_PAGE = """\
# HELP trtllm_num_requests_waiting Waiting requests
# TYPE trtllm_num_requests_waiting gauge
trtllm_num_requests_waiting{engine_type="undefined",model_name="undefined"} 2.0
# TYPE trtllm_num_requests_running gauge
trtllm_num_requests_running{engine_type="undefined",model_name="undefined"} 6.0
# TYPE trtllm_kv_cache_utilization gauge
trtllm_kv_cache_utilization{engine_type="undefined",model_name="undefined"} 0.125
# TYPE trtllm_kv_cache_tokens_per_block gauge
trtllm_kv_cache_tokens_per_block 32.0
# TYPE trtllm_kv_cache_max_blocks gauge
trtllm_kv_cache_max_blocks 4096.0
"""

TRITON_PAGE = """\
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="ensemble",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="ensemble",request_type="scheduled",version="1"} 5
nv_trt_llm_request_metrics{model="ensemble",request_type="max",version="1"} 512
nv_trt_llm_request_metrics{model="ensemble",request_type="waiting",version="1"} 3
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="ensemble",version="1"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="ensemble",version="1"} 6239
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="ensemble",version="1"} 0.42
"""


def test_trtllm_serve_and_triton_pages():
    m = BUILTIN_ENGINES["trtllm-serve"].parse(TRTLLM_SERVE_PAGE, 1.0)
    assert (m.waiting, m.running, m.kv_usage, m.block_size, m.num_gpu_blocks) == (
        2.0, 6.0, 0.125, 32, 4096,
    )
    m = BUILTIN_ENGINES["triton-tensorrt-llm"].parse(TRITON_PAGE, 1.0)
    assert (m.waiting, m.running, m.kv_usage, m.block_size, m.num_gpu_blocks) == (
        3.0, 5.0, 0.42, 64, 6239,
    )


def test_published_trtllm_fragments_lack_the_gauges_and_say_so():
    for name in ("trtllm-serve-2026-03-aibrix2004.txt", "trtllm-serve-pr5785-2025-07.txt"):
        with pytest.raises(MetricsError) as e:
            BUILTIN_ENGINES["trtllm-serve"].parse(page(name), 1.0)
        assert e.value.reason == "missing_metrics"


def vllm_page(waiting="1", running="2", kv="0.5") -> str:
    return (
        f"vllm:num_requests_waiting{{model_name=\"m\"}} {waiting}\n"
        f"vllm:num_requests_running{{model_name=\"m\"}} {running}\n"
        f"vllm:kv_cache_usage_perc{{model_name=\"m\"}} {kv}\n"
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"waiting": "-1"},
        {"running": "-0.5"},
        {"waiting": "NaN"},
        {"running": "+Inf"},
        {"waiting": "1e12"},
        {"kv": "1.5"},
        {"kv": "-0.1"},
        {"kv": "NaN"},
    ],
)
def test_absurd_values_are_rejected(kwargs):
    with pytest.raises(MetricsError) as e:
        VLLM.parse(vllm_page(**kwargs), 1.0)
    assert e.value.reason == "invalid_value"


def test_kv_exactly_full_is_fine():
    assert VLLM.parse(vllm_page(kv="1.0"), 1.0).kv_usage == 1.0


def test_html_and_garbage_pages_are_missing_metrics_and_broken_lines_are_parse_errors():
    with pytest.raises(MetricsError) as e:
        VLLM.parse("<html><body>Not Found</body></html>", 1.0)
    assert e.value.reason == "missing_metrics"
    with pytest.raises(MetricsError) as e:
        VLLM.parse('# x\nvllm:num_requests_waiting{model_name="m', 1.0)  # truncated line
    assert e.value.reason == "parse"


def test_registry_picks_engine_by_label_and_falls_back_to_default(caplog):
    reg = EngineRegistry()
    assert reg.for_labels({}).name == "vllm"
    assert reg.for_labels({ENGINE_LABEL: "sglang"}).name == "sglang"
    assert reg.for_labels({ENGINE_LABEL: "triton-tensorrt-llm"}).name == "triton-tensorrt-llm"
    with caplog.at_level(logging.WARNING):
        assert reg.for_labels({ENGINE_LABEL: "mystery"}).name == "vllm"
        assert reg.for_labels({ENGINE_LABEL: "mystery"}).name == "vllm"
    assert sum("mystery" in r.message for r in caplog.records) == 1  # warned once


def test_registry_from_config_overrides_and_adds_engines():
    reg = EngineRegistry.from_config(
        {
            "defaultEngine": "atom",
            "engineLabelKey": "example.com/engine",
            "engineConfigs": [
                {
                    "name": "atom",
                    "queuedRequestsSpec": "atom:num_requests_waiting",
                    "runningRequestsSpec": "atom:num_requests_running",
                    "kvUsageSpec": ["atom:kv_usage", "atom:old_kv_usage"],
                    "cacheInfoSpec": "atom:cache_config_info",
                    "cacheBlockSizeLabelName": "page_size",
                    "cacheNumBlocksLabelName": "num_pages",
                },
                {  # replaces the built-in vllm entry entirely: no LoRA read any more
                    "name": "vllm",
                    "queuedRequestsSpec": "vllm:num_requests_waiting",
                    "runningRequestsSpec": "vllm:num_requests_running",
                    "kvUsageSpec": "vllm:kv_cache_usage_perc",
                    "loraSpec": "",
                },
            ],
        }
    )
    atom = reg.for_labels({})
    assert atom.name == "atom"
    text = (
        "atom:num_requests_waiting 4\natom:num_requests_running 1\natom:old_kv_usage 0.75\n"
        'atom:cache_config_info{page_size="64",num_pages="11147"} 1\n'
    )
    m = atom.parse(text, 1.0)
    assert (m.waiting, m.running, m.kv_usage, m.block_size, m.num_gpu_blocks) == (
        4.0, 1.0, 0.75, 64, 11147,
    )
    vllm = reg.for_labels({"example.com/engine": "vllm"})
    assert vllm.lora is None
    assert vllm.parse(page("constructed-edge-cases.txt"), 1.0).active_adapters == frozenset()


def test_disabled_metrics_are_not_required():
    only_queue = EngineConfig.from_dict({"name": "q", "queuedRequestsSpec": "q_waiting"})
    m = only_queue.parse("q_waiting 3\n", 1.0)
    assert m.waiting == 3.0 and math.isnan(m.running) and math.isnan(m.kv_usage)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"defaultEngine": "nope"}, "not found"),
        ({"engineConfigs": [{"queuedRequestsSpec": "a"}]}, "'name' is required"),
        ({"engineConfigs": [{"name": "default", "queuedRequestsSpec": "a"}]}, "reserved"),
        ({"engineConfigs": [{"name": "x", "queuedRequestSpec": "a"}]}, "unknown keys"),
        ({"engineConfigs": [{"name": "x", "kvUsageSpec": "bad name{"}]}, "kvUsageSpec"),
        ({"engineConfigs": {"name": "x"}}, "must be a list"),
        ({"engineConfig": []}, "unknown keys"),
        ("vllm", "must be a mapping"),
    ],
)
def test_bad_config_is_a_clear_value_error(cfg, message):
    with pytest.raises(ValueError, match=message):
        EngineRegistry.from_config(cfg)


@pytest.mark.parametrize("a, b", [("+Inf", "-Inf"), ("1e308", "1e308")])
def test_absurd_values_across_engine_series_are_invalid_values(a, b):
    # Per-engine series are summed; math.fsum raises on inf - inf and on overflow.
    text = (
        f'vllm:num_requests_waiting{{engine="0"}} {a}\n'
        f'vllm:num_requests_waiting{{engine="1"}} {b}\n'
        "vllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.1\n"
    )
    with pytest.raises(MetricsError) as e:
        VLLM.parse(text, 1.0)
    assert e.value.reason == "invalid_value"
