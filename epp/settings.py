"""Command-line flags (upstream EPP names and defaults) parsed into `Settings`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from epp import units

def parse_duration(text: str) -> float:
    """Go-style durations (`50ms`, `2s`, `1m30s`) or plain seconds, as seconds."""
    try:
        return units.parse_duration(float(text) if _is_number(text) else text, "duration")
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (examples: 50ms, 2s, 1m)") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    v = text.strip().lower().lstrip("=")
    if v in ("1", "t", "true", "yes", "on"):
        return True
    if v in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}")


def _zap_encoder(text: str) -> str:
    """Upstream's `--zap-encoder` (json, console) as a `--log-format` value."""
    formats = {"json": "json", "console": "text"}
    if text not in formats:
        raise argparse.ArgumentTypeError(f"invalid encoder {text!r} (json or console)")
    return formats[text]


def _verbosity(text: str) -> int:
    try:
        return int(text.lstrip("="))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid verbosity {text!r}") from None


@dataclass
class Settings:
    grpc_port: int = 9002
    grpc_health_port: int = 9003
    metrics_port: int = 9090
    metrics_endpoint_auth: bool = True
    bind_address: str = "0.0.0.0"
    secure_serving: bool = True
    cert_path: str | None = None
    pool_name: str = ""
    pool_namespace: str = "default"
    pool_group: str = "inference.networking.k8s.io"
    config_file: str | None = None
    config_text: str | None = None
    verbosity: int = 0
    log_format: str = "text"
    tracing: bool = False
    endpoints: str | None = None
    endpoints_file: str | None = None
    endpoint_selector: str | None = None
    endpoint_target_ports: list[int] = field(default_factory=list)
    kubeconfig: str | None = None
    ha_enable_leader_election: bool = False
    objectives_file: str | None = None
    refresh_metrics_interval: float = 0.05
    metrics_staleness_threshold: float = 2.0
    refresh_prometheus_metrics_interval: float = 5.0
    model_server_metrics_scheme: str = "http"
    model_server_metrics_path: str = "/metrics"
    model_server_metrics_port: int | None = None
    model_server_metrics_https_insecure_skip_verify: bool = True
    max_body_bytes: int = 16 * 1024 * 1024
    drain_timeout: float = 30.0
    metrics_label_cap: int = 64
    passive_health_consecutive_failures: int = 5
    passive_health_cooldown: float = 1.0
    extproc_max_streams: int = 8192
    extproc_request_idle_timeout: float = 30.0
    extproc_response_idle_timeout: float = 600.0
    state_sync: str | None = None
    state_sync_key: str | None = None
    state_sync_interval: float = 0.05
    state_sync_ttl: float = 5.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="epp",
        description="Endpoint Picker for LLM inference gateways (Envoy ext_proc).",
    )
    d = Settings()
    b = dict(type=parse_bool, nargs="?", const=True)
    a = p.add_argument
    a("--grpc-port", type=int, default=d.grpc_port, help="ext_proc and Pick API port")
    a("--grpc-health-port", type=int, default=d.grpc_health_port, help="gRPC health port")
    a("--metrics-port", type=int, default=d.metrics_port, help="Prometheus /metrics port")
    a("--metrics-endpoint-auth", default=d.metrics_endpoint_auth, **b,
      help="require a bearer token allowed to get /metrics (TokenReview + SubjectAccessReview); "
           "only with a Kubernetes source")
    a("--bind-address", default=d.bind_address, help="address the servers listen on")
    a("--secure-serving", default=d.secure_serving, **b,
      help="serve gRPC over TLS (self-signed unless --cert-path); --secure-serving=false for plaintext")
    a("--cert-path", default=None, help="directory holding tls.crt and tls.key")
    a("--pool-name", default=d.pool_name, help="InferencePool this EPP serves")
    a("--pool-namespace", default=d.pool_namespace)
    a("--pool-group", default=d.pool_group,
      help="API group of the pool: inference.networking.k8s.io or inference.networking.x-k8s.io")
    a("--config-file", default=None, help="EndpointPickerConfig YAML")
    a("--config-text", default=None, help="EndpointPickerConfig YAML given inline")
    a("-v", "--v", dest="verbosity", type=_verbosity, default=0,
      help="log verbosity (0-5); 4 logs one line per routing decision")
    a("--log-format", default=d.log_format, choices=["text", "json"],
      help="json: one JSON object per line, with request_id on a request's lines")
    a("--zap-encoder", dest="log_format", type=_zap_encoder, default=argparse.SUPPRESS,
      help="upstream's name: json is --log-format=json, console is --log-format=text")
    a("--tracing", default=d.tracing, **b,
      help="export OpenTelemetry traces over OTLP, configured by the standard OTEL_* "
           "variables (default sampler: parent-based, 10%% of new traces)")
    a("--endpoints", default=None, help="standalone: comma-separated ip:port list")
    a("--endpoints-file", default=None, help="standalone: YAML list of name/address/port/labels, re-read on change")
    a("--endpoint-selector", default=None, help="standalone on Kubernetes: pod label selector, e.g. app=vllm")
    a("--endpoint-target-ports", default="", help="ports for --endpoint-selector, e.g. 8000,8001")
    a("--kubeconfig", default=None, help="kubeconfig path (default: in-cluster, then ~/.kube/config)")
    a("--ha-enable-leader-election", default=False, **b)
    a("--objectives-file", default=None,
      help="standalone: InferenceObjective/InferenceModelRewrite/InferenceModel manifests, re-read on change")
    a("--refresh-metrics-interval", type=parse_duration, default=d.refresh_metrics_interval)
    a("--metrics-staleness-threshold", type=parse_duration, default=d.metrics_staleness_threshold)
    a("--refresh-prometheus-metrics-interval", type=parse_duration,
      default=d.refresh_prometheus_metrics_interval)
    a("--model-server-metrics-scheme", default=d.model_server_metrics_scheme, choices=["http", "https"])
    a("--model-server-metrics-path", default=d.model_server_metrics_path)
    a("--model-server-metrics-port", type=int, default=None,
      help="scrape this port instead of the serving port")
    a("--model-server-metrics-https-insecure-skip-verify", default=True, **b)
    a("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body accepted (413 above)")
    a("--drain-timeout", type=parse_duration, default=d.drain_timeout,
      help="on SIGTERM, how long streams in flight may take to finish")
    a("--metrics-label-cap", type=int, default=d.metrics_label_cap,
      help="distinct model names not known to the pool or its objectives that get their own "
           "metric series; later ones are counted as model_name=\"other\"")
    a("--extproc-max-streams", type=int, default=d.extproc_max_streams,
      help="concurrent ext_proc streams; more are refused with RESOURCE_EXHAUSTED")
    a("--extproc-request-idle-timeout", type=parse_duration,
      default=d.extproc_request_idle_timeout,
      help="longest wait for Envoy's next message before a request is routed (408 after)")
    a("--extproc-response-idle-timeout", type=parse_duration,
      default=d.extproc_response_idle_timeout,
      help="longest wait for Envoy's next message after routing (response headers, chunks); "
           "the stream is then let go")
    a("--passive-health-consecutive-failures", type=int,
      default=d.passive_health_consecutive_failures,
      help="5xx responses in a row (reported on the response path) that stop an endpoint "
           "being picked; a refused connection stops it at once")
    a("--passive-health-cooldown", type=parse_duration, default=d.passive_health_cooldown,
      help="first cool-down of an ejected endpoint (doubled on repeats, up to 30s); it "
           "returns after the cool-down and a good metrics scrape")
    a("--state-sync", default=None, metavar="URL",
      help="active-active replicas: share the prefix index and in-flight load through Redis/"
           "Valkey at redis://[user:password@]host:port[/db] (rediss:// for TLS); "
           "turns leader election off")
    a("--state-sync-key", default=None,
      help="Redis stream key shared by the replicas (default: epp:state:<namespace>/<pool>)")
    a("--state-sync-interval", type=parse_duration, default=d.state_sync_interval,
      help="how often a replica sends what it learned and reads what the others did")
    a("--state-sync-ttl", type=parse_duration, default=d.state_sync_ttl,
      help="a replica silent this long has its in-flight load dropped")
    return p


def parse_settings(argv: list[str] | None) -> Settings:
    ns = build_parser().parse_args(argv)
    values = vars(ns)
    ports = values.pop("endpoint_target_ports") or ""
    s = Settings(**values)
    try:
        s.endpoint_target_ports = [int(x) for x in ports.split(",") if x.strip()]
    except ValueError:
        build_parser().error(f"--endpoint-target-ports: expected comma-separated ports, got {ports!r}")
    if s.config_file and s.config_text:
        build_parser().error("give --config-file or --config-text, not both")
    return s
