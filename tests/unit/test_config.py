"""EndpointPickerConfig loading: defaults, the upstream YAML shape, and clear errors."""

from __future__ import annotations

import pytest

from epp import registry
from epp.config import ConfigError, DEFAULT_CONFIG_TEXT, load_config, load_config_file
from epp.scheduling.filters import PrefixCacheAffinityFilter
from epp.scheduling.pickers import MaxScorePicker, WeightedRandomPicker
from epp.scheduling.scorers import PrefixCacheScorer


def weights(cfg, profile: str = "default") -> dict[str, float]:
    return {s.name: w for s, w in cfg.profiles[profile].scorers}


def test_no_config_gives_the_default_profile() -> None:
    for text in (None, "", "  \n"):
        cfg = load_config(text)
        assert weights(cfg) == {
            "queue-scorer": 2.0,
            "kv-cache-utilization-scorer": 2.0,
            "prefix-cache-scorer": 3.0,
            "lora-affinity-scorer": 1.0,
        }
        assert isinstance(cfg.profiles["default"].picker, MaxScorePicker)
        assert cfg.profile_handler.name == "single-profile-handler"
        assert cfg.feature_gates == frozenset() and cfg.data == {}
    assert load_config(DEFAULT_CONFIG_TEXT).plugin_types == load_config(None).plugin_types


FULL = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl, dataLayer]
plugins:
- type: single-profile-handler
- type: prefix-cache-scorer
  name: prefix
  parameters:
    blockSizeTokens: 32
    maxPrefixBlocksToMatch: 128
    lruCapacityPerServer: 1000
- type: prefix-cache-affinity-filter
  parameters: {affinityThreshold: 0.9}
- type: queue-scorer
- type: weighted-random-picker
  name: picker
  parameters: {maxNumOfEndpoints: 2}
- type: utilization-detector
  name: saturation
schedulingProfiles:
- name: main
  plugins:
  - pluginRef: prefix-cache-affinity-filter
  - pluginRef: prefix
    weight: 3
  - pluginRef: queue-scorer
  - pluginRef: picker
saturationDetector:
  queueDepthThreshold: 5
flowControl:
  maxBytes: 1000
data:
  engines: {vllm: {waiting: "vllm:num_requests_waiting"}}
"""


def test_full_upstream_config() -> None:
    cfg = load_config(FULL)
    prof = cfg.profiles["main"]
    assert [f.name for f in prof.filters] == ["prefix-cache-affinity-filter"]
    assert weights(cfg, "main") == {"prefix": 3.0, "queue-scorer": 1.0}  # weight defaults to 1
    assert isinstance(prof.picker, WeightedRandomPicker) and prof.picker.max_endpoints == 2
    prefix = cfg.plugin("prefix")
    assert isinstance(prefix, PrefixCacheScorer)
    assert (prefix.default_chars, prefix.max_blocks, prefix.lru_capacity) == (128, 128, 1000)
    flt = cfg.plugin("prefix-cache-affinity-filter")
    assert isinstance(flt, PrefixCacheAffinityFilter) and flt.producer is prefix  # linked
    assert cfg.feature_gates == frozenset({"flowControl", "dataLayer"})
    assert cfg.saturation_detector == {"queueDepthThreshold": 5}
    assert cfg.flow_control == {"maxBytes": 1000}
    assert cfg.data["engines"]["vllm"]["waiting"] == "vllm:num_requests_waiting"
    # A plugin of a kind the scheduler does not run is kept for its owner.
    assert cfg.plugin_types["saturation"] == "utilization-detector"
    assert cfg.plugins_of_type("utilization-detector") == [cfg.plugin("saturation")]
    sched = cfg.scheduler()
    assert list(sched.profiles) == ["main"]


def test_profiles_default_to_every_schedulable_plugin() -> None:
    cfg = load_config("""
plugins:
- type: low-queue
- type: kv-cache-utilization-scorer
- type: random-picker
""")
    prof = cfg.profiles["default"]
    assert [f.name for f in prof.filters] == ["low-queue"]
    assert weights(cfg) == {"kv-cache-utilization-scorer": 1.0}
    assert prof.picker.name == "random-picker"


def test_a_profile_without_picker_gets_max_score() -> None:
    cfg = load_config("""
plugins: [{type: queue-scorer}]
schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer, weight: 0.5}]}]
""")
    assert isinstance(cfg.profiles["p"].picker, MaxScorePicker)
    assert weights(cfg, "p") == {"queue-scorer": 0.5}


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("plugins: [{type: no-such-scorer}]", ["plugins[0]", "no-such-scorer", "unknown plugin type"]),
        ("plugins: [{type: low-queue, parameters: {threshold: -3}}]", ["plugins[0]", "'low-queue'", "threshold"]),
        ("plugins: [{type: prefix-cache-scorer, name: px, parameters: {blockSize: x}}]", ["'px'", "blockSize"]),
        ("plugins: [{type: queue-scorer, parameters: {typo: 1}}]", ["queue-scorer", "typo"]),
        ("plugins: [{type: queue-scorer}, {type: queue-scorer}]", ["plugins[1]", "duplicate"]),
        ("plugins: [{name: x}]", ["plugins[0]", "type"]),
        ("plugins: {type: queue-scorer}", ["plugins must be a list"]),
        ("plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: p, plugins: [{pluginRef: queue}]}]",
         ["schedulingProfiles[0] 'p'", "pluginRef 'queue'", "no plugin named"]),
        ("plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer, weight: -1}]}]",
         ["queue-scorer", "weight"]),
        ("plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer, weight: heavy}]}]",
         ["queue-scorer", "weight", "heavy"]),
        ("plugins: [{type: random-picker}]\nschedulingProfiles: [{name: p, plugins: [{pluginRef: random-picker, weight: 2}]}]",
         ["random-picker", "not a scorer"]),
        ("plugins: [{type: random-picker}, {type: max-score-picker}]\nschedulingProfiles: [{name: p, plugins: [{pluginRef: random-picker}, {pluginRef: max-score-picker}]}]",
         ["max-score-picker", "already has picker"]),
        ("plugins: [{type: utilization-detector}]\nschedulingProfiles: [{name: p, plugins: [{pluginRef: utilization-detector}]}]",
         ["utilization-detector", "not a filter, scorer or picker"]),
        ("plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: []}, {name: b, plugins: []}]",
         ["single-profile-handler", "exactly one"]),
        ("plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a}, {name: a}]", ["duplicate profile"]),
        ("plugins: [{type: prefix-cache-affinity-filter, parameters: {prefixScorerName: nope}}]",
         ["prefix-cache-affinity-filter", "nope"]),
        ("kind: Deployment", ["kind"]),
        ("apiVersion: v9", ["apiVersion"]),
        ("featureGates: flowControl", ["featureGates"]),
        ("saturationDetector: [1]", ["saturationDetector"]),
        ("plugins: [\n", ["YAML"]),
        ("- just a list", ["mapping"]),
    ],
)
def test_errors_name_the_offending_entry(text: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(text)
    for n in names:
        assert n in str(e.value)


def test_config_file(tmp_path) -> None:
    f = tmp_path / "epp.yaml"
    f.write_text(FULL)
    assert "main" in load_config_file(f).profiles
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config_file(tmp_path / "missing.yaml")


def test_plugins_are_instances_per_config() -> None:
    a, b = load_config(None), load_config(None)
    assert a.plugin("prefix-cache-scorer") is not b.plugin("prefix-cache-scorer")
    assert "utilization-detector" in registry.known_types()


# What upstream's v1.5.0 Helm chart writes as default-plugins.yaml (modelServerType vllm).
UPSTREAM_CHART_DEFAULT = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: metrics-data-source
  parameters:
    scheme: "http"
    path: "/metrics"
    insecureSkipVerify: true
- type: core-metrics-extractor
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
"""


def test_upstream_charts_default_config_loads_with_its_data_layer_plugins() -> None:
    from epp.datalayer.engines import EngineRegistry
    from epp.datalayer.plugins import engine_section, metrics_source

    cfg = load_config(UPSTREAM_CHART_DEFAULT)
    assert weights(cfg) == {"queue-scorer": 2.0, "kv-cache-utilization-scorer": 2.0,
                            "prefix-cache-scorer": 3.0}
    source = metrics_source(cfg.plugins)
    assert (source.scheme, source.path, source.insecure_skip_verify) == ("http", "/metrics", True)
    assert EngineRegistry.from_config(engine_section(cfg.plugins, cfg.data)).default == "vllm"


def test_core_metrics_extractor_takes_upstreams_engine_parameters() -> None:
    from epp.datalayer.engines import EngineRegistry
    from epp.datalayer.plugins import engine_section

    cfg = load_config("""
plugins:
- type: queue-scorer
- type: core-metrics-extractor
  parameters:
    defaultEngine: mine
    engineConfigs:
    - name: mine
      queuedRequestsSpec: "mine:queue"
      runningRequestsSpec: "mine:running"
      kvUsageSpec: "mine:kv"
      cacheInfoSpec: "mine:cache_config_info"
      cacheBlockSizeLabelName: page_size
      cacheNumBlocksLabelName: num_pages
""")
    engines = EngineRegistry.from_config(engine_section(cfg.plugins, cfg.data))
    mine = engines.for_labels({})
    assert (mine.name, mine.block_size_label, mine.num_blocks_label) == ("mine", "page_size", "num_pages")


@pytest.mark.parametrize(("text", "names"), [
    ("plugins: [{type: metrics-data-source, parameters: {scheme: ftp}}]", ["metrics-data-source", "scheme"]),
    ("plugins: [{type: metrics-data-source, parameters: {path: metrics}}]", ["path"]),
    ("plugins: [{type: metrics-data-source, parameters: {insecureSkipVerify: 'yes'}}]", ["insecureSkipVerify"]),
    ("plugins: [{type: metrics-data-source}, {type: metrics-data-source, name: b}]", ["one metrics-data-source"]),
    ("plugins: [{type: core-metrics-extractor, parameters: {defaultEngine: nope}}]", ["core-metrics-extractor", "nope"]),
    ("plugins: [{type: core-metrics-extractor}]\ndata: {defaultEngine: vllm}", ["not both"]),
    ("plugins: [{type: core-metrics-extractor}]\nschedulingProfiles: [{name: p, plugins: [{pluginRef: core-metrics-extractor}]}]",
     ["not a filter, scorer or picker"]),
])
def test_data_layer_plugin_errors_name_the_entry(text: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(text)
    for n in names:
        assert n in str(e.value)
