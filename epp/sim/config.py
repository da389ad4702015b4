"""Per-replica settings of the simulator, and the small YAML file that describes a fleet.

One `SimConfig` describes one simulated vLLM server completely (its port, model, cache,
LoRA slots and the cost model). A fleet is a list of them; `load_fleet_file` builds that
list from YAML so that, for example, each replica can hold different adapters.

Times in the cost model are *simulated* seconds: `time_scale` divides them to get wall
time, so a test can run a minute of simulated load in a second. Every latency the
simulator reports (response timing, metric histograms) is in simulated seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class ConfigError(ValueError):
    """A fleet file or an option is invalid; the message says which and why."""


@dataclass(frozen=True)
class SimConfig:
    """Everything one simulated server needs. Defaults look like one 8B model on one GPU."""

    name: str = "sim-0"
    host: str = "127.0.0.1"
    port: int = 8000
    """0 picks a free port (see `Replica.port` once started)."""
    model: str = DEFAULT_MODEL
    lora_modules: Mapping[str, str] = field(default_factory=dict)
    """Adapters this server knows at start: name -> path (the path is only echoed)."""
    enable_lora: bool | None = None
    """Serve LoRA adapters (vLLM's --enable-lora). None: on when `lora_modules` is set.
    Without it the page has no vllm:lora_requests_info, as on a real server, and
    adapters cannot be loaded at runtime."""
    max_loras: int = 1
    """GPU slots for adapters; at most this many distinct adapters run in one batch."""
    lora_load_time: float = 0.1
    """Seconds an engine step stalls to swap an adapter into a GPU slot."""
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    """Token budget of one engine step; long prompts are prefilled in chunks of it."""
    max_waiting: int = 1000
    """Waiting-queue capacity; a request beyond it gets 429."""
    max_model_len: int = 8192
    num_gpu_blocks: int = 4096
    block_size: int = 16
    enable_prefix_caching: bool = True
    # Cost model (simulated seconds).
    step_time: float = 0.012
    """Fixed cost of one engine step (kernel launches, sampling)."""
    decode_time_per_seq: float = 0.0002
    """Extra step time per decoding sequence: decode steps slow down as the batch grows."""
    decode_time_per_kv_token: float = 2e-7
    """Extra step time per token of context read by attention in decode."""
    prefill_time_per_token: float = 0.00005
    """Step time per *uncached* prompt token; prefix-cache hits skip this work."""
    default_max_tokens: int = 64
    """Upper bound of the output length drawn when a request gives no `max_tokens`."""
    time_scale: float = 1.0
    seed: int = 0
    legacy_cache_metric: bool = False
    """Emit vllm:gpu_cache_usage_perc (older vLLM) instead of vllm:kv_cache_usage_perc."""
    engine_label: str = "0"
    tokenizer: str | None = None
    """Directory with tokenizer.json (and tokenizer_config.json for the chat template):
    prompts are then tokenized as vLLM does, instead of ~4 characters a token."""
    kv_events_port: int | None = None
    """Publish KV-cache events on this ZeroMQ PUB port, as vLLM's --kv-events-config
    does (0: any free port; None: off). Needs `tokenizer` (events carry token ids)."""
    kv_events_replay_port: int | None = None
    """The ROUTER port that replays past event batches (0: any free port; None: none)."""
    kv_events_layout: str = "array"
    """How events are encoded: "array" (positional, vLLM until mid-2026) or "map"."""
    kv_events_connect: str | None = None
    """Connect the PUB socket to this address (a SUB that binds, such as the EPP's
    `kvEventsConfig.zmqEndpoint`, llm-d's way) instead of binding `kv_events_port`; the
    topic `kv@<name>@<model>` names this replica. Needs `tokenizer`."""

    @property
    def lora_enabled(self) -> bool:
        return bool(self.lora_modules) if self.enable_lora is None else self.enable_lora

    def validate(self) -> SimConfig:
        """Raise ConfigError on settings that cannot describe a server; return self."""
        positive = ("max_loras", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                    "num_gpu_blocks", "block_size", "default_max_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{self.name}: {name} must be >= 1")
        if self.max_waiting < 0:
            raise ConfigError(f"{self.name}: max_waiting must be >= 0")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{self.name}: port {self.port} out of range")
        if self.max_model_len > self.num_gpu_blocks * self.block_size:
            raise ConfigError(f"{self.name}: max_model_len {self.max_model_len} does not fit "
                              f"the KV cache ({self.num_gpu_blocks} x {self.block_size} tokens)")
        if self.time_scale <= 0:
            raise ConfigError(f"{self.name}: time_scale must be > 0")
        for name in ("lora_load_time", "step_time", "decode_time_per_seq",
                     "decode_time_per_kv_token", "prefill_time_per_token"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{self.name}: {name} must be >= 0")
        if self.step_time == 0 and self.prefill_time_per_token == 0:
            raise ConfigError(f"{self.name}: step_time and prefill_time_per_token are both 0")
        if not self.model:
            raise ConfigError(f"{self.name}: model must be non-empty")
        if self.lora_modules and self.enable_lora is False:
            raise ConfigError(f"{self.name}: lora_modules given but enable_lora is false")
        for name in ("kv_events_port", "kv_events_replay_port"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 65535:
                raise ConfigError(f"{self.name}: {name} {v} out of range")
        if (self.kv_events_port is not None or self.kv_events_connect) and not self.tokenizer:
            raise ConfigError(f"{self.name}: kv_events_port/kv_events_connect needs a "
                              f"tokenizer (events carry token ids)")
        if self.kv_events_layout not in ("array", "map"):
            raise ConfigError(f"{self.name}: kv_events_layout must be 'array' or 'map'")
        if self.model in self.lora_modules:
            raise ConfigError(f"{self.name}: adapter name {self.model!r} equals the base model")
        return self


_FIELDS = {f.name: f for f in fields(SimConfig)}


def parse_lora_modules(value: Any) -> dict[str, str]:
    """Accept vLLM's `name=path` strings, a list of them, or a mapping name -> path."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        items = [(str(k), str(v)) for k, v in value.items()]
    else:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"lora_modules must be a list or mapping, not {type(value).__name__}")
        items = []
        for entry in value:
            if isinstance(entry, Mapping) and "name" in entry:
                items.append((str(entry["name"]), str(entry.get("path", entry["name"]))))
                continue
            if not isinstance(entry, str) or not entry:
                raise ConfigError(f"bad lora module {entry!r}: want name=path")
            name, sep, path = entry.partition("=")
            items.append((name, path if sep else name))
    out: dict[str, str] = {}
    for name, path in items:
        if not name:
            raise ConfigError("lora module with an empty name")
        out[name] = path
    return out


def apply_overrides(base: SimConfig, overrides: Mapping[str, Any], where: str) -> SimConfig:
    """`base` with the fields named in `overrides` (YAML keys; dashes allowed) replaced."""
    changes: dict[str, Any] = {}
    for raw_key, value in overrides.items():
        key = str(raw_key).replace("-", "_")
        f = _FIELDS.get(key)
        if f is None:
            raise ConfigError(f"{where}: unknown option {raw_key!r}")
        if key == "lora_modules":
            changes[key] = parse_lora_modules(value)
            continue
        want = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        try:
            if want == "int":
                if isinstance(value, bool) or not isinstance(value, (int, str)):
                    raise TypeError
                changes[key] = int(value)
            elif want == "float":
                if isinstance(value, bool):
                    raise TypeError
                changes[key] = float(value)
            elif want in ("int | None", "str | None") and value is None:
                changes[key] = None
            elif want == "int | None":
                if isinstance(value, bool) or not isinstance(value, (int, str)):
                    raise TypeError
                changes[key] = int(value)
            elif want in ("bool", "bool | None"):
                if not isinstance(value, bool) and not (want != "bool" and value is None):
                    raise TypeError
                changes[key] = value
            else:
                if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                    raise TypeError
                changes[key] = str(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {raw_key}: expected {want}, got {value!r}") from None
    return replace(base, **changes)


def fleet_configs(
    base: SimConfig,
    replicas: int = 1,
    base_port: int | None = None,
    fleet_file: str | Path | None = None,
) -> list[SimConfig]:
    """The replica configs of a fleet.

    Without a file: `replicas` copies of `base` on consecutive ports from `base_port`
    (or all on port 0 = any free port), named sim-0.., each with its own seed.
    With a file (see `load_fleet_file`), the file's `replicas` list sets the count and
    each entry overrides the file's `defaults`, which override `base`.
    """
    if fleet_file is not None:
        return load_fleet_file(fleet_file, base, base_port)
    if replicas < 1:
        raise ConfigError("replicas must be >= 1")
    start = base.port if base_port is None else base_port
    out = []
    for i in range(replicas):
        port = 0 if start == 0 else start + i
        out.append(_events_ports(replace(base, name=f"sim-{i}", port=port, seed=base.seed + i),
                                 i).validate())
    return out


def _events_ports(cfg: SimConfig, i: int) -> SimConfig:
    """Replica i of a fleet publishes KV events on port + 2i and replays on replay + 2i
    (0, any free port, stays 0)."""
    p, r = cfg.kv_events_port, cfg.kv_events_replay_port
    return replace(cfg, kv_events_port=p + 2 * i if p else p,
                   kv_events_replay_port=r + 2 * i if r else r)


def load_fleet_file(
    path: str | Path, base: SimConfig | None = None, base_port: int | None = None
) -> list[SimConfig]:
    """Read a fleet YAML file.

    ```yaml
    defaults:            # optional, any SimConfig field (dashes or underscores)
      model: meta-llama/Llama-3.1-8B-Instruct
      max_loras: 2
    replicas:            # one entry per server; `port` defaults to base_port + index
      - name: pod-a
        lora_modules: [food-review=/adapters/food-review]
      - name: pod-b
    ```
    """
    try:
        text = Path(path).read_text()
        doc = yaml.safe_load(text)
    except OSError as e:
        raise ConfigError(f"cannot read fleet file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"fleet file {path} is not valid YAML: {e}") from None
    return fleet_from_dict(doc, base or SimConfig(), base_port, where=str(path))


def fleet_from_dict(
    doc: Any, base: SimConfig, base_port: int | None = None, where: str = "fleet"
) -> list[SimConfig]:
    """The fleet described by an already-parsed YAML document (see `load_fleet_file`)."""
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{where}: top level must be a mapping with 'replicas'")
    unknown = set(doc) - {"defaults", "replicas"}
    if unknown:
        raise ConfigError(f"{where}: unknown top-level keys {sorted(unknown)}")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise ConfigError(f"{where}: defaults must be a mapping")
    common = apply_overrides(base, defaults, f"{where}: defaults")
    entries = doc.get("replicas")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: replicas must be a non-empty list")
    start = common.port if base_port is None else base_port
    out: list[SimConfig] = []
    for i, entry in enumerate(entries):
        entry = entry or {}
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: replicas[{i}] must be a mapping")
        port = 0 if start == 0 else start + i
        cfg = _events_ports(replace(common, name=f"sim-{i}", port=port, seed=common.seed + i), i)
        out.append(apply_overrides(cfg, entry, f"{where}: replicas[{i}]").validate())
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: replica names must be unique: {names}")
    ports = [(c.host, c.port) for c in out if c.port]
    if len(set(ports)) != len(ports):
        raise ConfigError(f"{where}: two replicas share a port: {ports}")
    return out
