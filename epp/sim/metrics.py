"""The `/metrics` page of one simulated server, in vLLM V1's exposition.

Names, help texts, label sets and histogram buckets follow real vLLM captures
(tests/fixtures/sim/): `model_name` and `engine` labels on engine metrics,
`vllm:cache_config_info` with `engine` among its labels, and
`vllm:lora_requests_info{max_lora,running_lora_adapters,waiting_lora_adapters}` whose
value is the Unix time the label set was last current. Like vLLM, every label set the
adapters have gone through stays on the page with its old timestamp (the newest few
are kept here), which is why a reader must take the series with the largest value.

Each replica has its own registries, so a fleet in one process keeps separate pages.
Gauges are read from the engine when the page is rendered. Every histogram family has a
registry of its own whose text is kept until the family is observed again: rendering the
page's ~290 samples through prometheus_client costs ~3 ms, and a fleet of simulated pods in
one process scraped every 50 ms by several EPP replicas would otherwise spend a whole core
on its /metrics pages (a real pod renders its own page on its own CPU). The page is
byte-for-byte what one registry would render.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from epp.sim.config import SimConfig
from epp.sim.engine import Engine, Sequence, wall_clock

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket bounds as in vLLM V1 (checked against the captures in tests/fixtures/sim/).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_COUNT_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0,
                       5000.0, 10000.0, 20000.0)
ITERATION_TOKEN_BUCKETS = (1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
                           4096.0, 8192.0, 16384.0)

MAX_LORA_INFO_SERIES = 16
"""Old lora_requests_info label sets kept on the page (vLLM keeps all; bounded here)."""


class SimMetrics:
    """Prometheus families of one replica, fed by the engine's callbacks."""

    def __init__(self, cfg: SimConfig, engine: Engine) -> None:
        self.cfg = cfg
        self.engine = engine
        r = CollectorRegistry(auto_describe=True)
        # The page in order: live registries (rendered every time) and one cached registry
        # per histogram family (re-rendered after an observation).
        self._parts: list[CollectorRegistry] = [r]
        self._cached: dict[int, bytes | None] = {}  # part index -> text, None: stale
        self._part_of: dict[int, int] = {}  # id(histogram) -> part index
        names = ["model_name", "engine"]
        self._lv = (cfg.model, cfg.engine_label)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=r)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, names + list(extra), registry=r)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            own = CollectorRegistry(auto_describe=True)
            h = Histogram(name, doc, names, buckets=buckets, registry=own)
            self._part_of[id(h)] = len(self._parts)
            self._cached[len(self._parts)] = None
            self._parts.append(own)
            return h

        self.running = gauge("vllm:num_requests_running",
                             "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting",
                             "Number of requests waiting to be processed.")
        if cfg.legacy_cache_metric:
            self.kv_usage = gauge("vllm:gpu_cache_usage_perc",
                                  "GPU KV-cache usage. 1 means 100 percent usage.")
        else:
            self.kv_usage = gauge("vllm:kv_cache_usage_perc",
                                  "KV-cache usage. 1 means 100 percent usage.")
        self.prefix_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        self.preemptions = counter("vllm:num_preemptions",
                                   "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.")
        self.success = counter("vllm:request_success",
                               "Count of successfully processed requests.", ("finished_reason",))
        for reason in ("stop", "length", "abort"):
            self.success.labels(*self._lv, reason)
        self.request_prompt_tokens = hist(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.",
            TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = hist(
            "vllm:request_generation_tokens", "Number of generation tokens processed.",
            TOKEN_COUNT_BUCKETS)
        self.iteration_tokens = hist(
            "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
            ITERATION_TOKEN_BUCKETS)
        self.request_max_tokens = hist(
            "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
            TOKEN_COUNT_BUCKETS)
        self.ttft = hist("vllm:time_to_first_token_seconds",
                         "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds",
                        "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self.tpot = hist("vllm:request_time_per_output_token_seconds",
                         "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds",
                        "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS)
        self.queue_time = hist("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.",
                               REQUEST_LATENCY_BUCKETS)
        self.inference_time = hist("vllm:request_inference_time_seconds",
                                   "Histogram of time spent in RUNNING phase for request.",
                                   REQUEST_LATENCY_BUCKETS)
        self.prefill_time = hist("vllm:request_prefill_time_seconds",
                                 "Histogram of time spent in PREFILL phase for request.",
                                 REQUEST_LATENCY_BUCKETS)
        self.decode_time = hist("vllm:request_decode_time_seconds",
                                "Histogram of time spent in DECODE phase for request.",
                                REQUEST_LATENCY_BUCKETS)
        r = CollectorRegistry(auto_describe=True)  # the families after the histograms
        self._parts.append(r)
        cache_labels = {
            "block_size": str(cfg.block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": str(cfg.enable_prefix_caching),
            "engine": cfg.engine_label,
            "gpu_memory_utilization": "0.9",
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(cfg.num_gpu_blocks),
            "num_gpu_blocks_override": "None",
            "prefix_caching_hash_algo": "sha256",
            "sliding_window": "None",
        }
        Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
              list(cache_labels), registry=r).labels(**cache_labels).set(1.0)
        self.lora_info: Gauge | None = None
        if cfg.lora_enabled:  # vLLM registers this family only with --enable-lora
            self.lora_info = Gauge(
                "vllm:lora_requests_info", "Running stats on lora requests.",
                ["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=r)
        # Create every labelled child now, so the page lists all families from the start.
        for fam in (self.running, self.waiting, self.kv_usage, self.prefix_queries,
                    self.prefix_hits, self.preemptions, self.prompt_tokens,
                    self.generation_tokens, self.request_prompt_tokens,
                    self.request_generation_tokens, self.iteration_tokens,
                    self.request_max_tokens, self.ttft, self.itl, self.tpot, self.e2e,
                    self.queue_time, self.inference_time, self.prefill_time, self.decode_time):
            fam.labels(*self._lv)
        self._synced: dict[int, float] = {}
        self._lora_series: list[tuple[str, str, str]] = []
        self._lora_current: tuple[str, str, str] | None = None
        self.lora_changed()

    # -- engine callbacks -----------------------------------------------------------

    def lora_changed(self) -> None:
        """Start a new lora_requests_info series when the adapter sets change."""
        if self.lora_info is None:
            return
        key = (str(self.cfg.max_loras), ",".join(self.engine.waiting_adapters()),
               ",".join(self.engine.running_adapters()))
        if key == self._lora_current:
            return
        self._lora_current = key
        if key in self._lora_series:
            self._lora_series.remove(key)
        self._lora_series.append(key)
        while len(self._lora_series) > MAX_LORA_INFO_SERIES:
            old = self._lora_series.pop(0)
            self.lora_info.remove(*old)
        self.lora_info.labels(*key).set(wall_clock())

    def _observed(self, *hists: Histogram) -> None:
        for h in hists:
            self._cached[self._part_of[id(h)]] = None

    def on_step(self, tokens: int, emitted: list[tuple[Sequence, float]]) -> None:
        self.iteration_tokens.labels(*self._lv).observe(tokens)
        itl = self.itl.labels(*self._lv)
        for _, gap in emitted:
            if gap >= 0:
                itl.observe(gap)
        self._observed(self.iteration_tokens, self.itl)

    def on_finish(self, seq: Sequence) -> None:
        lv = self._lv
        reason = seq.finish_reason or "abort"
        self.success.labels(*lv, reason).inc()
        if reason == "abort":
            return
        self._observed(self.request_prompt_tokens, self.request_generation_tokens,
                       self.request_max_tokens, self.ttft, self.e2e, self.queue_time,
                       self.inference_time, self.prefill_time, self.decode_time, self.tpot)
        assert seq.finished_at is not None and seq.scheduled_at is not None
        assert seq.first_token_at is not None
        self.request_prompt_tokens.labels(*lv).observe(seq.prompt.num_tokens)
        self.request_generation_tokens.labels(*lv).observe(seq.generated)
        if seq.max_tokens_requested is not None:
            self.request_max_tokens.labels(*lv).observe(seq.max_tokens_requested)
        self.ttft.labels(*lv).observe(seq.first_token_at - seq.arrival)
        self.e2e.labels(*lv).observe(seq.finished_at - seq.arrival)
        self.queue_time.labels(*lv).observe(seq.scheduled_at - seq.arrival)
        self.inference_time.labels(*lv).observe(seq.finished_at - seq.scheduled_at)
        self.prefill_time.labels(*lv).observe(seq.first_token_at - seq.scheduled_at)
        self.decode_time.labels(*lv).observe(seq.finished_at - seq.first_token_at)
        if seq.generated > 1:
            self.tpot.labels(*lv).observe(
                (seq.finished_at - seq.first_token_at) / (seq.generated - 1))

    # -- rendering ----------------------------------------------------------------------

    def render(self) -> bytes:
        """The page as vLLM would serve it now."""
        e, lv = self.engine, self._lv
        self.running.labels(*lv).set(e.num_running)
        self.waiting.labels(*lv).set(e.num_waiting)
        self.kv_usage.labels(*lv).set(e.kv.usage)
        s = e.stats
        self._sync(self.prefix_queries, s.prefix_queries)
        self._sync(self.prefix_hits, s.prefix_hits)
        self._sync(self.preemptions, s.preemptions)
        self._sync(self.prompt_tokens, s.prompt_tokens)
        self._sync(self.generation_tokens, s.generation_tokens)
        self.lora_changed()
        if self.lora_info is not None and self._lora_current is not None:
            # vLLM refreshes the current label set's time at every stats update
            self.lora_info.labels(*self._lora_current).set(wall_clock())
        out = []
        cached = self._cached
        for i, part in enumerate(self._parts):
            if i not in cached:
                out.append(generate_latest(part))
                continue
            text = cached[i]
            if text is None:
                text = cached[i] = generate_latest(part)
            out.append(text)
        return b"".join(out)

    def _sync(self, counter: Counter, total: float) -> None:
        """Move a counter up to the engine's running total (counters only go up)."""
        key = id(counter)
        delta = total - self._synced.get(key, 0.0)
        if delta > 0:
            counter.labels(*self._lv).inc(delta)
            self._synced[key] = total
