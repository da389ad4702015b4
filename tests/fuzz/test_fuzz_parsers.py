"""Property tests of the parsers fed by model servers and by files: whatever the input,
a result or the parser's own error, never anything else."""

from __future__ import annotations

import math
import random
from pathlib import Path

import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from epp.config import ConfigError, load_config
from epp.datalayer.engines import BUILTIN_ENGINES, MetricsError
from epp.manifests import ManifestError, parse_manifests
from epp.sources import parse_endpoints_yaml

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "metrics"
VLLM_PAGE = (FIXTURES / "vllm-v1-2025-11-qwen1.5-0.5b-chat.txt").read_text()
NAMES = ["vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:gpu_cache_usage_perc",
         "vllm:kv_cache_usage_perc", "vllm:lora_requests_info", "vllm:cache_config_info"]
VALUES = st.sampled_from(["0", "1", "-1", "NaN", "+Inf", "-Inf", "1e308", "1e999", "0.5",
                          "nan", "x", "", "00", "1_0", "0x10"])
LABEL_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)


@st.composite
def exposition_lines(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(NAMES) | st.text(max_size=10))
    labels = draw(st.dictionaries(st.sampled_from(["model_name", "running_lora_adapters",
                                                   "max_lora", "block_size", "x"]),
                                  LABEL_TEXT, max_size=3))
    quoted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    head = f"{name}{{{quoted}}}" if draw(st.booleans()) else name
    return f"{head} {draw(VALUES)}" + draw(st.sampled_from(["", " 123", " x", "\r"]))


@st.composite
def pages(draw: st.DrawFn) -> str:
    """A real vLLM page, cut and spliced with hostile lines, or made up from scratch."""
    lines = VLLM_PAGE.splitlines() if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 6))):
        lines.insert(draw(st.integers(0, len(lines))), draw(exposition_lines()))
    text = "\n".join(lines)
    if draw(st.booleans()) and text:
        text = text[: draw(st.integers(0, len(text)))]  # truncated mid-page
    return text


def check_page(text: str) -> None:
    try:
        m = BUILTIN_ENGINES["vllm"].parse(text, scraped_at=1.0)
    except MetricsError as e:
        assert e.reason in {"parse", "missing_metrics", "invalid_value"}
        return
    assert 0 <= m.waiting and math.isfinite(m.waiting)
    assert 0 <= m.running and math.isfinite(m.running)
    assert math.isnan(m.kv_usage) or 0 <= m.kv_usage <= 1.01


@given(pages())
@example(VLLM_PAGE)
def test_metrics_pages_give_metrics_or_a_metrics_error(text: str) -> None:
    check_page(text)


@given(st.text(max_size=300))
def test_arbitrary_text_gives_metrics_or_a_metrics_error(text: str) -> None:
    check_page(text)


# -- files ----------------------------------------------------------------------------

YAML_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=10),
                         st.floats(allow_nan=False))
YAML_VALUES = st.recursive(
    YAML_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["name", "address", "port", "labels", "endpoints", "kind", "spec",
                         "metadata", "apiVersion", "plugins", "type", "parameters",
                         "schedulingProfiles", "pluginRef", "weight", "poolRef", "priority",
                         "rules", "targets", "matches", "model", "modelRewrite"]),
        inner, max_size=5),
    max_leaves=25)


def mangled(doc: object, rnd: random.Random) -> str:
    """A document as a file an editor may leave behind: whole, truncated, or garbled."""
    text = yaml.safe_dump(doc, allow_unicode=True)
    cut = rnd.random()
    if cut < 0.3:
        return text[: int(len(text) * rnd.random())]
    if cut < 0.4:
        return text.replace(":", "", 1)
    return text


@given(YAML_VALUES, st.randoms(use_true_random=False))
@example([{"name": "a", "address": "10.0.0.1", "port": 8000}], random.Random(0))
def test_endpoints_files_give_endpoints_or_a_value_error(doc: object, rnd: random.Random) -> None:
    try:
        eps = parse_endpoints_yaml(mangled(doc, rnd))
    except (ValueError, yaml.YAMLError):
        return
    for e in eps:
        assert e.address and 0 < e.port < 65536


@given(YAML_VALUES, st.randoms(use_true_random=False))
def test_objectives_files_give_objects_or_a_manifest_error(doc: object, rnd: random.Random) -> None:
    text = mangled({"apiVersion": "inference.networking.x-k8s.io/v1alpha2",
                    "kind": rnd.choice(["InferenceObjective", "InferenceModelRewrite",
                                        "InferenceModel"]),
                    "metadata": {"name": "x"}, "spec": doc}, rnd)
    try:
        parse_manifests(text)
    except ManifestError:
        pass


@given(YAML_VALUES, st.randoms(use_true_random=False))
def test_config_files_give_a_config_or_a_config_error(doc: object, rnd: random.Random) -> None:
    text = mangled({"apiVersion": "inference.networking.x-k8s.io/v1alpha1",
                    "kind": "EndpointPickerConfig", "plugins": doc}, rnd)
    try:
        load_config(text)
    except ConfigError:
        pass
