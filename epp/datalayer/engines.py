"""Which series mean "queue", "running", "KV usage", ... on each kind of model server.

An endpoint's engine is chosen by its label `inference.networking.k8s.io/engine-type`
(default `vllm`). Built in, with the upstream EPP's metric names:

=====================  ==========================  ==========================  =============================================================
engine                 queued                      running                     KV usage
=====================  ==========================  ==========================  =============================================================
vllm                   vllm:num_requests_waiting   vllm:num_requests_running   vllm:kv_cache_usage_perc, else vllm:gpu_cache_usage_perc (old)
sglang                 sglang:num_queue_reqs       sglang:num_running_reqs     sglang:token_usage
trtllm-serve           trtllm_num_requests_waiting trtllm_num_requests_running trtllm_kv_cache_utilization
triton-tensorrt-llm    nv_trt_llm_request_metrics  (request_type=scheduled)    nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}
                       {request_type=waiting}
=====================  ==========================  ==========================  =============================================================

vLLM also reports LoRA state (`vllm:lora_requests_info`: several series may exist, the
one with the largest value, a timestamp, is current) and its cache configuration
(`vllm:cache_config_info` labels `block_size` and `num_gpu_blocks`, either may be the
string "None"). SGLang, trtllm-serve and Triton report block size and block count as
plain gauges.

When several series match one spec (a vLLM server running several engine cores labels
each `engine="0"`, `engine="1"`, ...), waiting and running are summed and KV usage takes
the maximum: the endpoint is as full as its fullest cache.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from epp.datastore import EndpointMetrics
from epp.datalayer.promtext import Extractor, ExpositionError, MetricSpec, Sample

log = logging.getLogger(__name__)

ENGINE_LABEL = "inference.networking.k8s.io/engine-type"
DEFAULT_ENGINE = "vllm"

# Values above these are not a busy server but a broken exporter.
MAX_REQUESTS = 1e7
KV_TOLERANCE = 1e-6


class MetricsError(Exception):
    """A page that cannot be used; `reason` is a short, bounded label value."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# This EPP's names before it followed upstream's (`...LabelName`); still read.
_OLD_LABEL_KEYS = {"cacheBlockSizeLabel": "cacheBlockSizeLabelName",
                   "cacheNumBlocksLabel": "cacheNumBlocksLabelName"}


def _label_key(d: Mapping[str, Any], key: str, default: str) -> str:
    old = next(o for o, new in _OLD_LABEL_KEYS.items() if new == key)
    if key in d and old in d:
        raise ValueError(f"engine config: give {key!r} or its old name {old!r}, not both")
    return str(d.get(key) or d.get(old) or default)


def _specs(value: Any, key: str) -> tuple[MetricSpec, ...]:
    """A spec string, a list of fallback spec strings, or empty/None (disabled)."""
    if value is None or value == "":
        return ()
    try:
        if isinstance(value, str):
            return (MetricSpec.parse(value),)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(MetricSpec.parse(v) for v in value if v.strip())
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    raise ValueError(f"{key}: expected a metric spec string or a list of them, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Metric specs for one engine. An empty tuple / None disables that metric."""

    name: str
    queued: tuple[MetricSpec, ...] = ()
    running: tuple[MetricSpec, ...] = ()
    kv_usage: tuple[MetricSpec, ...] = ()  # first one present on the page wins
    lora: MetricSpec | None = None
    cache_info: MetricSpec | None = None
    block_size_label: str = "block_size"
    num_blocks_label: str = "num_gpu_blocks"
    cache_block_size: MetricSpec | None = None  # a plain gauge instead of an info label
    cache_num_blocks: MetricSpec | None = None
    _extractor: Extractor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [s.name for s in self.all_specs()]
        object.__setattr__(self, "_extractor", Extractor(names))

    def all_specs(self) -> list[MetricSpec]:
        one = [self.lora, self.cache_info, self.cache_block_size, self.cache_num_blocks]
        return [*self.queued, *self.running, *self.kv_usage, *(s for s in one if s)]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EngineConfig":
        """One `engineConfigs` entry (see `EngineRegistry.from_config`)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"engine config must be a mapping, got {d!r}")
        known = {
            "name", "queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec",
            "cacheInfoSpec", "cacheBlockSizeLabelName", "cacheNumBlocksLabelName",
            "cacheBlockSizeSpec", "cacheNumBlocksSpec",
            *_OLD_LABEL_KEYS,
        }
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"engine config: unknown keys {sorted(unknown)}")
        name = d.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("engine config: 'name' is required")

        def one(key: str) -> MetricSpec | None:
            specs = _specs(d.get(key), f"{name}.{key}")
            if len(specs) > 1:
                raise ValueError(f"{name}.{key}: takes one metric spec")
            return specs[0] if specs else None

        return cls(
            name=name,
            queued=_specs(d.get("queuedRequestsSpec"), f"{name}.queuedRequestsSpec"),
            running=_specs(d.get("runningRequestsSpec"), f"{name}.runningRequestsSpec"),
            kv_usage=_specs(d.get("kvUsageSpec"), f"{name}.kvUsageSpec"),
            lora=one("loraSpec"),
            cache_info=one("cacheInfoSpec"),
            block_size_label=_label_key(d, "cacheBlockSizeLabelName", "block_size"),
            num_blocks_label=_label_key(d, "cacheNumBlocksLabelName", "num_gpu_blocks"),
            cache_block_size=one("cacheBlockSizeSpec"),
            cache_num_blocks=one("cacheNumBlocksSpec"),
        )

    # -- page -> EndpointMetrics ---------------------------------------------------------

    def parse(self, text: str, scraped_at: float) -> EndpointMetrics:
        """Read one page. Raises MetricsError for unusable pages; never anything else."""
        try:
            found = self._extractor.scan(text)
        except ExpositionError as e:
            raise MetricsError("parse", str(e)) from None

        def pick(specs: Sequence[MetricSpec]) -> list[Sample] | None:
            """Samples of the first spec present on the page; None when none is."""
            for spec in specs:
                got = found[spec.name]
                if spec.labels:
                    got = [s for s in got if spec.matches(s.labels)]
                if got:
                    return got
            return None

        missing = []
        values: list[float] = []
        models: frozenset[str] = frozenset()
        for what, specs, agg in (
            ("queued", self.queued, math.fsum),
            ("running", self.running, math.fsum),
            ("kv_usage", self.kv_usage, max),
        ):
            if not specs:
                values.append(math.nan)
                continue
            got = pick(specs)
            if got is None:
                missing.append(str(specs[0]))
                values.append(math.nan)
                continue
            if what == "queued":
                models = frozenset(m for m in (x.labels.get("model_name") for x in got) if m)
            vals = [s.value for s in got]
            if any(math.isnan(v) for v in vals):
                raise MetricsError("invalid_value", f"{what} is NaN")
            try:
                values.append(agg(vals))
            except (ValueError, OverflowError):  # fsum of +Inf and -Inf, or of huge values
                raise MetricsError("invalid_value", f"{what} = {vals!r}"[:200]) from None
        if missing:
            raise MetricsError("missing_metrics", "not on the page: " + ", ".join(missing))
        waiting, running, kv = values
        for what, v, specs in (("queued", waiting, self.queued), ("running", running, self.running)):
            if specs and not (0.0 <= v <= MAX_REQUESTS):  # also rejects ±Inf; NaN above
                raise MetricsError("invalid_value", f"{what} = {v!r}")
        if not (0.0 <= kv <= 1.0 + KV_TOLERANCE) and not math.isnan(kv):
            raise MetricsError("invalid_value", f"kv_usage = {kv!r}")

        active: frozenset[str] = frozenset()
        waiting_ad: frozenset[str] = frozenset()
        max_lora = 0
        if self.lora is not None:
            got = pick((self.lora,))
            if got:
                # The value is the time of the last update: the newest series is current.
                latest = max(got, key=lambda s: s.value if not math.isnan(s.value) else -math.inf)
                active = _adapters(latest.labels.get("running_lora_adapters", ""))
                waiting_ad = _adapters(latest.labels.get("waiting_lora_adapters", ""))
                max_lora = _int_label(latest.labels.get("max_lora"))

        block_size = num_blocks = 0
        if self.cache_info is not None:
            got = pick((self.cache_info,))
            if got:
                block_size = _int_label(got[0].labels.get(self.block_size_label))
                num_blocks = _int_label(got[0].labels.get(self.num_blocks_label))
        if self.cache_block_size is not None:
            got = pick((self.cache_block_size,))
            if got:
                block_size = _int_value(got[0].value)
        if self.cache_num_blocks is not None:
            got = pick((self.cache_num_blocks,))
            if got:
                num_blocks = _int_value(got[0].value)

        return EndpointMetrics(
            waiting=waiting,
            running=running,
            kv_usage=kv,
            active_adapters=active,
            waiting_adapters=waiting_ad,
            max_lora=max_lora,
            block_size=block_size,
            num_gpu_blocks=num_blocks,
            scraped_at=scraped_at,
            last_error=None,
            models=models,
        )


def _adapters(value: str) -> frozenset[str]:
    if not value:
        return frozenset()
    return frozenset(a for a in (p.strip() for p in value.split(",")) if a)


def _int_label(value: str | None) -> int:
    """Integer label values such as "16" or "4294967296.0"; "None" or junk -> 0."""
    if not value:
        return 0
    try:
        return _int_value(float(value))
    except ValueError:
        return 0


def _int_value(v: float) -> int:
    if not math.isfinite(v) or v < 0 or v > 2**53:
        return 0
    return int(v)


def _builtin() -> dict[str, EngineConfig]:
    p = MetricSpec.parse
    return {
        "vllm": EngineConfig(
            name="vllm",
            queued=(p("vllm:num_requests_waiting"),),
            running=(p("vllm:num_requests_running"),),
            kv_usage=(p("vllm:kv_cache_usage_perc"), p("vllm:gpu_cache_usage_perc")),
            lora=p("vllm:lora_requests_info"),
            cache_info=p("vllm:cache_config_info"),
        ),
        "sglang": EngineConfig(
            name="sglang",
            queued=(p("sglang:num_queue_reqs"),),
            running=(p("sglang:num_running_reqs"),),
            kv_usage=(p("sglang:token_usage"),),
            cache_block_size=p("sglang:page_size"),
            cache_num_blocks=p("sglang:num_pages"),
        ),
        "trtllm-serve": EngineConfig(
            name="trtllm-serve",
            queued=(p("trtllm_num_requests_waiting"),),
            running=(p("trtllm_num_requests_running"),),
            kv_usage=(p("trtllm_kv_cache_utilization"),),
            cache_block_size=p("trtllm_kv_cache_tokens_per_block"),
            cache_num_blocks=p("trtllm_kv_cache_max_blocks"),
        ),
        "triton-tensorrt-llm": EngineConfig(
            name="triton-tensorrt-llm",
            queued=(p("nv_trt_llm_request_metrics{request_type=waiting}"),),
            running=(p("nv_trt_llm_request_metrics{request_type=scheduled}"),),
            kv_usage=(p("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}"),),
            cache_block_size=p("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}"),
            cache_num_blocks=p("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}"),
        ),
    }


BUILTIN_ENGINES: Mapping[str, EngineConfig] = _builtin()


class EngineRegistry:
    """Engine configs by name, and the choice of one per endpoint from its labels."""

    def __init__(
        self,
        engines: Iterable[EngineConfig] | None = None,
        *,
        default: str = DEFAULT_ENGINE,
        label_key: str = ENGINE_LABEL,
    ) -> None:
        self.engines: dict[str, EngineConfig] = dict(BUILTIN_ENGINES)
        for e in engines or ():
            self.engines[e.name] = e  # full replacement per name, as upstream
        if default not in self.engines:
            raise ValueError(f"default engine {default!r} not found in engine configs")
        self.default = default
        self.label_key = label_key
        self._warned: set[str] = set()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "EngineRegistry":
        """Build from the config file's section (the upstream extractor's parameters).

        YAML shape (every key optional)::

            engineLabelKey: inference.networking.k8s.io/engine-type
            defaultEngine: vllm
            engineConfigs:
              - name: my-engine                 # replaces a built-in of the same name
                queuedRequestsSpec: "my:queue"
                runningRequestsSpec: "my:running"
                kvUsageSpec: "my:kv_usage"      # or a list: first present wins
                loraSpec: ""                    # empty or absent: not read
                cacheInfoSpec: "my:cache_info"  # info gauge with block size labels
                cacheBlockSizeLabelName: block_size
                cacheNumBlocksLabelName: num_gpu_blocks
                cacheBlockSizeSpec: "my:page_size{kind=tokens}"  # or plain gauges
                cacheNumBlocksSpec: "my:num_pages"

        A spec is `name` or `name{label=value,...}`. Errors raise ValueError naming the key.
        """
        if cfg is None:
            return cls()
        if not isinstance(cfg, Mapping):
            raise ValueError(f"engine config section must be a mapping, got {type(cfg).__name__}")
        unknown = set(cfg) - {"engineLabelKey", "defaultEngine", "engineConfigs"}
        if unknown:
            raise ValueError(f"engine config section: unknown keys {sorted(unknown)}")
        raw = cfg.get("engineConfigs") or []
        if not isinstance(raw, list):
            raise ValueError("engineConfigs must be a list")
        engines = [EngineConfig.from_dict(d) for d in raw]
        if any(e.name == "default" for e in engines):
            raise ValueError("engine name 'default' is reserved")
        return cls(
            engines,
            default=str(cfg.get("defaultEngine") or DEFAULT_ENGINE),
            label_key=str(cfg.get("engineLabelKey") or ENGINE_LABEL),
        )

    def for_labels(self, labels: Mapping[str, str]) -> EngineConfig:
        """The endpoint's engine; unknown engine names fall back to the default."""
        name = labels.get(self.label_key)
        if not name:
            return self.engines[self.default]
        engine = self.engines.get(name)
        if engine is None:
            if name not in self._warned:
                self._warned.add(name)
                log.warning("unknown engine type %r: using %r metric names", name, self.default)
            return self.engines[self.default]
        return engine
