"""The EPP's own Prometheus metrics, with the upstream EPP's names and labels.

Every metric lives here, on one registry, so that a dashboard built for the upstream EPP
works unchanged and a newcomer finds all names in one place. Modules import the metric
objects they update; the metrics server (`serve_metrics`) exposes `REGISTRY`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10,
    15, 20, 30, 45, 60, 120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600,
)
_TOKEN_BUCKETS = tuple(float(2**i) for i in range(0, 18))
_SIZE_BUCKETS = tuple(float(2**i) for i in range(6, 25, 2))
_FAST_BUCKETS = (
    0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01,
    0.02, 0.05, 0.1,
)

# -- per objective (model) ---------------------------------------------------------

REQUEST_TOTAL = Counter(
    "inference_objective_request_total",
    "Requests received, by model as sent, model served and priority.",
    ["model_name", "target_model_name", "priority"],
    registry=REGISTRY,
)
REQUEST_ERROR_TOTAL = Counter(
    "inference_objective_request_error_total",
    "Requests that ended in an error, by error code.",
    ["model_name", "target_model_name", "error_code"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "inference_objective_request_duration_seconds",
    "Time from the request's headers to the end of its response.",
    ["model_name", "target_model_name"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
REQUEST_SIZES = Histogram(
    "inference_objective_request_sizes",
    "Request body size in bytes.",
    ["model_name", "target_model_name"],
    buckets=_SIZE_BUCKETS,
    registry=REGISTRY,
)
INPUT_TOKENS = Histogram(
    "inference_objective_input_tokens",
    "Prompt tokens per request, from the response's usage.",
    ["model_name", "target_model_name"],
    buckets=_TOKEN_BUCKETS,
    registry=REGISTRY,
)
OUTPUT_TOKENS = Histogram(
    "inference_objective_output_tokens",
    "Completion tokens per request, from the response's usage.",
    ["model_name", "target_model_name"],
    buckets=_TOKEN_BUCKETS,
    registry=REGISTRY,
)
RUNNING_REQUESTS = Gauge(
    "inference_objective_running_requests",
    "Requests routed and not yet finished.",
    ["model_name"],
    registry=REGISTRY,
)

# -- per pool ----------------------------------------------------------------------

POOL_READY_PODS = Gauge(
    "inference_pool_ready_pods", "Endpoints in the pool.", ["name"], registry=REGISTRY
)
POOL_AVG_KV_CACHE = Gauge(
    "inference_pool_average_kv_cache_utilization",
    "Mean KV-cache utilization over endpoints with fresh metrics.",
    ["name"],
    registry=REGISTRY,
)
POOL_AVG_QUEUE = Gauge(
    "inference_pool_average_queue_size",
    "Mean waiting requests over endpoints with fresh metrics.",
    ["name"],
    registry=REGISTRY,
)
POOL_AVG_RUNNING = Gauge(
    "inference_pool_average_running_requests",
    "Mean running requests over endpoints with fresh metrics.",
    ["name"],
    registry=REGISTRY,
)
POOL_PER_POD_QUEUE = Gauge(
    "inference_pool_per_pod_queue_size",
    "Waiting requests per endpoint.",
    ["name", "model_server_pod"],
    registry=REGISTRY,
)
# Not in the upstream EPP: per-endpoint KV and running, named like its per-pod queue gauge.
POOL_PER_POD_KV_CACHE = Gauge(
    "inference_pool_per_pod_kv_cache_utilization",
    "KV-cache utilization per endpoint (0-1).",
    ["name", "model_server_pod"],
    registry=REGISTRY,
)
POOL_PER_POD_RUNNING = Gauge(
    "inference_pool_per_pod_running_requests",
    "Running requests per endpoint.",
    ["name", "model_server_pod"],
    registry=REGISTRY,
)

# -- the EPP itself ----------------------------------------------------------------

SCHEDULER_E2E_DURATION = Histogram(
    "inference_extension_scheduler_e2e_duration_seconds",
    "Time to run one scheduling cycle.",
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
SCHEDULER_ATTEMPTS = Counter(
    "inference_extension_scheduler_attempts_total",
    "Routing attempts: success (labelled with the endpoint picked) or failure (the request "
    "got no endpoint: none available, shed or rejected by admission, scheduling error).",
    ["status", "target_model_name", "pod_name", "namespace", "port"],
    registry=REGISTRY,
)
PREFIX_HIT_RATIO = Histogram(
    "inference_extension_prefix_indexer_hit_ratio",
    "Share of the prompt's prefix blocks the picked endpoint already held (0-1).",
    buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    registry=REGISTRY,
)
PLUGIN_DURATION = Histogram(
    "inference_extension_plugin_duration_seconds",
    "Time spent in one plugin per call.",
    ["extension_point", "plugin_type", "plugin_name"],
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
SCRAPE_ERRORS = Counter(
    "inference_extension_scrape_errors_total",
    "Failed metric scrapes of model-server endpoints, by reason.",
    ["endpoint", "reason"],
    registry=REGISTRY,
)
EXTPROC_STREAMS = Gauge(
    "inference_extension_extproc_streams",
    "ext_proc streams open now.",
    registry=REGISTRY,
)
EXTPROC_STREAMS_REFUSED = Counter(
    "inference_extension_extproc_streams_refused_total",
    "ext_proc streams refused at the --extproc-max-streams limit (RESOURCE_EXHAUSTED).",
    registry=REGISTRY,
)
EXTPROC_STREAM_TIMEOUTS = Counter(
    "inference_extension_extproc_stream_idle_timeouts_total",
    "ext_proc streams closed for waiting too long for Envoy's next message, by phase "
    "(request: before routing; response: after).",
    ["phase"],
    registry=REGISTRY,
)
EXTPROC_STREAM_ERRORS = Counter(
    "inference_extension_extproc_stream_errors_total",
    "ext_proc streams ended with a gRPC error (malformed or out-of-order messages).",
    ["reason"],
    registry=REGISTRY,
)

PASSIVE_HEALTH_EJECTIONS = Counter(
    "inference_extension_passive_health_ejections_total",
    "Endpoints left out of picking on a definite failure signal, by reason "
    "(connection_refused, consecutive_5xx).",
    ["reason"],
    registry=REGISTRY,
)
PASSIVE_HEALTH_READMISSIONS = Counter(
    "inference_extension_passive_health_readmissions_total",
    "Ejected endpoints picked again after their cool-down and a good probe.",
    registry=REGISTRY,
)
PASSIVE_HEALTH_EJECTED = Gauge(
    "inference_extension_passive_health_ejected_endpoints",
    "Endpoints left out of picking now.",
    registry=REGISTRY,
)
PASSIVE_HEALTH_PANIC = Counter(
    "inference_extension_passive_health_panic_total",
    "Picks that ignored ejections because every candidate was ejected.",
    registry=REGISTRY,
)
TRACING_SPANS_DROPPED = Counter(
    "inference_extension_tracing_spans_dropped_total",
    "Finished spans dropped because the export queue was full (collector down or slow).",
    registry=REGISTRY,
)

# -- flow control ------------------------------------------------------------------

FLOW_QUEUE_SIZE = Gauge(
    "inference_extension_flow_control_queue_size",
    "Requests waiting in flow control, by priority band.",
    ["priority"],
    registry=REGISTRY,
)
FLOW_QUEUE_BYTES = Gauge(
    "inference_extension_flow_control_queue_bytes",
    "Body bytes waiting in flow control, by priority band.",
    ["priority"],
    registry=REGISTRY,
)
FLOW_QUEUE_DURATION = Histogram(
    "inference_extension_flow_control_request_queue_duration_seconds",
    "Time a request spent in the flow-control queue, by outcome.",
    ["priority", "outcome"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
FLOW_POOL_SATURATION = Gauge(
    "inference_extension_flow_control_pool_saturation",
    "Pool saturation as seen by the saturation detector (1.0 = saturated).",
    registry=REGISTRY,
)
FLOW_DISPATCH_CYCLE = Histogram(
    "inference_extension_flow_control_dispatch_cycle_duration_seconds",
    "Time for one dispatcher cycle.",
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)

# -- precise prefix-cache routing (model servers' KV-cache events) ------------------

KV_EVENTS = Counter(
    "inference_extension_kv_events_total",
    "KV-cache events (BlockStored, BlockRemoved, AllBlocksCleared) applied to the block index.",
    registry=REGISTRY,
)
KV_EVENTS_ERRORS = Counter(
    "inference_extension_kv_events_errors_total",
    "Faults in KV-cache event intake: garbage, bad_frame, unknown_event, unknown_parent, "
    "sequence_gap, sequence_reset, replay_timeout, publisher_gone, block_size_mismatch, "
    "bad_address; with a bound socket also bad_topic, unknown_publisher, ambiguous_publisher, "
    "backlog_full.",
    ["reason"],
    registry=REGISTRY,
)
KV_INDEX_BLOCKS = Gauge(
    "inference_extension_kv_index_blocks",
    "(block, endpoint) entries in the KV-event block index (bounded by maxIndexedBlocks).",
    registry=REGISTRY,
)
PRECISE_PREFIX_FALLBACKS = Counter(
    "inference_extension_precise_prefix_fallbacks_total",
    "Requests the precise-prefix-cache-scorer scored with the approximate index instead: "
    "no_tokenizer, tokenizer_missing, tokenizer_corrupt, no_chat_template, "
    "chat_template_error, untokenizable, no_text.",
    ["reason"],
    registry=REGISTRY,
)

# -- active-active state sync (epp/statesync) -------------------------------------------

STATE_SYNC_ERRORS = Counter(
    "inference_extension_state_sync_errors_total",
    "State-sync faults (routing went on with local state), by reason.",
    ["reason"],
    registry=REGISTRY,
)
STATE_SYNC_CONNECTED = Gauge(
    "inference_extension_state_sync_connected",
    "1 while the replica exchanges state through Redis, 0 while degraded to local state.",
    registry=REGISTRY,
)
STATE_SYNC_PEERS = Gauge(
    "inference_extension_state_sync_peers",
    "Other EPP replicas heard from within the heartbeat TTL.",
    registry=REGISTRY,
)
STATE_SYNC_RECORDS = Counter(
    "inference_extension_state_sync_prefix_records_total",
    "Prefix records shared with other replicas (sent), merged from them (received), or "
    "dropped because this replica lacks the chain's head (unknown_head).",
    ["direction"],
    registry=REGISTRY,
)
