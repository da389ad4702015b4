"""The targeted extractor must agree with prometheus_client's parser on real pages."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp.datalayer.promtext import (
    Extractor,
    ExpositionError,
    MetricSpec,
    find_samples,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "metrics"
PAGES = sorted(p.name for p in FIXTURES.glob("*.txt"))


def reference_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of the page according to prometheus_client, by sample name."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def same_value(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_fixture_set_covers_the_engines_and_generations():
    assert len(PAGES) >= 9
    for needle in ("vllm-0.4.3", "vllm-v1-2025-03", "vllm-0.10.0", "sglang", "trtllm", "constructed"):
        assert any(needle in p for p in PAGES), needle


@pytest.mark.parametrize("page", PAGES)
def test_every_sample_of_every_page_matches_prometheus_client(page):
    text = (FIXTURES / page).read_text()
    ref = reference_samples(text)
    assert ref, "fixture parsed to nothing"
    extractor = Extractor(ref)  # all sample names on the page at once
    found = extractor.scan(text)
    for name, expected in ref.items():
        got = [(s.labels, s.value) for s in found[name]]
        assert len(got) == len(expected), name
        for (gl, gv), (el, ev) in zip(got, expected):
            assert gl == el, name
            assert same_value(gv, ev), (name, gv, ev)


def test_edge_cases_read_as_prometheus_client_reads_them():
    text = (FIXTURES / "constructed-edge-cases.txt").read_text()
    esc = find_samples(text, "escaped_info")
    assert esc[0].labels == {
        "path": "C:\\models\\llama",
        "quote": 'say "hi"',
        "newline": "a\nb",
        "braces": "{x=1,y=2}",
        "spaces": "  two  spaces ",
    }
    assert esc[1].labels == {"path": "trailing comma"}
    values = {s.labels["kind"]: s.value for s in find_samples(text, "special_values")}
    assert math.isnan(values["nan"])
    assert values["pinf"] == math.inf and values["ninf"] == -math.inf
    assert values["exp"] == 1.5e-07 and values["int"] == 42.0
    assert find_samples(text, "with_timestamp")[0].value == 12.5
    assert [s.value for s in find_samples(text, "spaced_sample")] == [3.0, 4.0]
    assert find_samples(text, "last_line_no_newline")[0].value == 9.0


def test_a_name_never_matches_a_longer_name_or_a_comment():
    text = (FIXTURES / "constructed-edge-cases.txt").read_text()
    waiting = find_samples(text, "vllm:num_requests_waiting")
    assert [s.value for s in waiting] == [3.0, 4.0]
    assert all("reason" not in s.labels for s in waiting)
    assert find_samples(text, "vllm:num_requests") == []


def test_sample_on_the_first_line_is_found():
    assert find_samples('up{job="x"} 1\nother 2\n', "up")[0].value == 1.0
    assert find_samples("up 1", "up")[0].labels == {}


def test_missing_names_map_to_empty_lists():
    ex = Extractor(["a_metric", "b_metric"])
    assert ex.scan("c_metric 1\n") == {"a_metric": [], "b_metric": []}
    assert Extractor([]).scan("a 1\n") == {}


@pytest.mark.parametrize(
    "line",
    [
        'm{a="unterminated} 1\n',
        "m{a=unquoted} 1\n",
        'm{a="x"\n',
        "m{=\"x\"} 1\n",
        "m \n",
        "m{} banana\n",
    ],
)
def test_malformed_wanted_lines_raise_exposition_error(line):
    with pytest.raises(ExpositionError):
        find_samples("# page\n" + line, "m")


def test_malformed_lines_of_other_metrics_are_ignored():
    text = 'junk{a="unterminated 1\nm 5\n<html>\n'
    assert find_samples(text, "m")[0].value == 5.0


def test_metric_spec_parses_upstream_spec_strings():
    spec = MetricSpec.parse("nv_trt_llm_request_metrics{request_type=waiting}")
    assert spec.name == "nv_trt_llm_request_metrics"
    assert spec.labels == (("request_type", "waiting"),)
    assert MetricSpec.parse('m{a="b", c=d}').labels == (("a", "b"), ("c", "d"))
    assert str(spec) == "nv_trt_llm_request_metrics{request_type=waiting}"
    assert spec.matches({"request_type": "waiting", "other": "x"})
    assert not spec.matches({"request_type": "scheduled"})
    for bad in ("", "m{a=b", "m{a}", "9bad", "has space"):
        with pytest.raises(ValueError):
            MetricSpec.parse(bad)


def test_extract_filters_by_spec_labels():
    text = (
        'nv_trt_llm_request_metrics{model="m",request_type="waiting"} 4\n'
        'nv_trt_llm_request_metrics{model="m",request_type="scheduled"} 9\n'
    )
    waiting = MetricSpec.parse("nv_trt_llm_request_metrics{request_type=waiting}")
    running = MetricSpec.parse("nv_trt_llm_request_metrics{request_type=scheduled}")
    got = Extractor([waiting.name]).extract(text, [waiting, running])
    assert [s.value for s in got[waiting]] == [4.0]
    assert [s.value for s in got[running]] == [9.0]


def test_repeated_scans_reuse_label_sets_without_serving_stale_ones():
    text = (FIXTURES / "vllm-v1-2025-11-qwen1.5-0.5b-chat.txt").read_text()
    ref = reference_samples(text)
    ex = Extractor(ref)
    first = ex.scan(text)
    second = ex.scan(text)  # label sets now come from the extractor's cache
    assert {n: [(s.labels, s.value) for s in v] for n, v in first.items()} == {
        n: [(s.labels, s.value) for s in v] for n, v in second.items()
    }
    ex = Extractor(["info"])
    assert ex.scan('info{block_size="16",n="1"} 1\n')["info"][0].labels["block_size"] == "16"
    assert ex.scan('info{block_size="32",n="1"} 1\n')["info"][0].labels["block_size"] == "32"
    assert ex.scan('info{block_size="16",n="1"} 1\n')["info"][0].labels["block_size"] == "16"
