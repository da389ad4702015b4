"""The upstream EndpointPickerConfig YAML -> plugin instances, profiles and plain settings.

The EPP reads one config (from `--config-file` or `--config-text`) at start. Every problem
found here stops the EPP with a `ConfigError` that names the offending entry, because a
scheduler silently running without the plugin an operator asked for is worse than not
starting.

Shape (apiVersion inference.networking.x-k8s.io/v1alpha1, kind EndpointPickerConfig):

    plugins:                 # instantiated by type; name defaults to the type
    - type: prefix-cache-scorer
      name: prefix
      parameters: {blockSizeTokens: 16}
    schedulingProfiles:      # filters run in listed order; scorers weighted (default 1)
    - name: default
      plugins:
      - pluginRef: prefix
        weight: 3
    featureGates: [...]      # kept for other modules
    saturationDetector: {...}
    flowControl: {...}
    data: {...}

Plugins of kinds the scheduler does not run (a saturation detector, say) are instantiated
and kept by name for the modules that use them. With no config at all the default profile
is `queue-scorer` 2, `kv-cache-utilization-scorer` 2, `prefix-cache-scorer` 3,
`lora-affinity-scorer` 1 and `max-score-picker`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import yaml

from epp import registry
from epp.datalayer.plugins import engine_section, metrics_source
from epp.filewatch import NotReady, read_settled_retrying
from epp.scheduling.interface import Filter, Picker, ProfileHandler, Scorer
from epp.scheduling.pickers import MaxScorePicker
from epp.scheduling.profile import Profile, checked_handler
from epp.scheduling.scorers import PrefixCacheScorer

if TYPE_CHECKING:
    from epp.scheduling.scheduler import Scheduler

log = logging.getLogger(__name__)

API_VERSIONS = frozenset({"inference.networking.x-k8s.io/v1alpha1"})
KIND = "EndpointPickerConfig"
_KNOWN_KEYS = frozenset(
    {
        "apiVersion",
        "kind",
        "plugins",
        "schedulingProfiles",
        "featureGates",
        "saturationDetector",
        "flowControl",
        "data",
        "stateSync",
    }
)
DEFAULT_CONFIG_TEXT = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: lora-affinity-scorer
- type: max-score-picker
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: lora-affinity-scorer
    weight: 1
  - pluginRef: max-score-picker
"""


class ConfigError(ValueError):
    """The EndpointPickerConfig is invalid; the message names the entry at fault."""


@dataclass
class EppConfig:
    """A loaded config: scheduler parts plus plain sections for other modules."""

    plugins: dict[str, Any]
    """Every instantiated plugin by name, whatever its kind."""
    plugin_types: dict[str, str]
    profiles: dict[str, Profile]
    profile_handler: ProfileHandler
    feature_gates: frozenset[str] = frozenset()
    saturation_detector: dict[str, Any] = field(default_factory=dict)
    flow_control: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    """The engine table (`epp.datalayer.engines`); or a `core-metrics-extractor` plugin."""
    state_sync: dict[str, Any] = field(default_factory=dict)
    """Active-active replicas (`epp.statesync.setup`), the config-file form of --state-sync."""
    raw: dict[str, Any] = field(default_factory=dict)

    def plugin(self, name: str) -> Any:
        """The plugin named `name`; KeyError when absent."""
        return self.plugins[name]

    def plugins_of_type(self, type_name: str) -> list[Any]:
        """Plugins of one upstream type, in config order (e.g. "utilization-detector")."""
        return [p for n, p in self.plugins.items() if self.plugin_types[n] == type_name]

    def scheduler(self, **kwargs: Any) -> Scheduler:
        """A `Scheduler` running this config's profiles (kwargs as for `Scheduler`)."""
        from epp.scheduling.scheduler import Scheduler

        return Scheduler.from_config(self, **kwargs)


def load_config_file(path: str | Path) -> EppConfig:
    """A config file; an empty or half-written one is an error, never the default profile."""
    try:
        text = read_settled_retrying(path)
    except (OSError, UnicodeDecodeError, NotReady) as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e}") from None
    return load_config(text)


def load_config(text: str | None) -> EppConfig:
    """Parse and validate a config; None or blank text gives the default profile."""
    if text is None or not text.strip():
        text = DEFAULT_CONFIG_TEXT
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config is not valid YAML: {e}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config must be a YAML mapping, got {type(doc).__name__}")
    return _build(doc)


def _build(doc: dict[str, Any]) -> EppConfig:
    api = doc.get("apiVersion")
    if api is not None and api not in API_VERSIONS:
        raise ConfigError(f"apiVersion {api!r} is not supported (want {sorted(API_VERSIONS)[0]})")
    kind = doc.get("kind")
    if kind is not None and kind != KIND:
        raise ConfigError(f"kind {kind!r} is not {KIND!r}")
    for key in doc:
        if key not in _KNOWN_KEYS:
            log.warning("config: ignoring unknown top-level key %r", key)

    plugins, types = _build_plugins(doc.get("plugins"))
    _link_prefix_filters(plugins, types)
    profiles = _build_profiles(doc.get("schedulingProfiles"), plugins)

    handlers = [n for n, p in plugins.items() if isinstance(p, ProfileHandler)]
    if len(handlers) > 1:
        raise ConfigError(f"plugins: only one profile handler allowed, got {handlers}")
    handler = plugins[handlers[0]] if handlers else None
    try:
        handler = checked_handler(profiles, handler)
    except ValueError as e:
        name = handler.name if handler is not None else "single-profile-handler"
        raise ConfigError(f"profile handler {name!r}: {e}") from None

    data = _section(doc, "data")
    try:
        engine_section(plugins, data)
        metrics_source(plugins)
    except ValueError as e:
        raise ConfigError(f"plugins: {e}") from None

    return EppConfig(
        plugins=plugins,
        plugin_types=types,
        profiles=profiles,
        profile_handler=handler,
        feature_gates=_feature_gates(doc.get("featureGates")),
        saturation_detector=_section(doc, "saturationDetector"),
        flow_control=_section(doc, "flowControl"),
        data=data,
        state_sync=_section(doc, "stateSync"),
        raw=doc,
    )


def _build_plugins(entries: Any) -> tuple[dict[str, Any], dict[str, str]]:
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise ConfigError("plugins must be a list of {type, name, parameters} entries")
    plugins: dict[str, Any] = {}
    types: dict[str, str] = {}
    for i, entry in enumerate(entries):
        where = f"plugins[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a mapping with 'type', got {entry!r}")
        unknown = sorted(set(entry) - {"type", "name", "parameters"})
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}")
        ptype = entry.get("type")
        if not isinstance(ptype, str) or not ptype:
            raise ConfigError(f"{where}: 'type' must be a non-empty string, got {ptype!r}")
        name = entry.get("name", ptype)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where} (type {ptype!r}): 'name' must be a non-empty string")
        where = f"{where} {name!r} (type {ptype!r})"
        if name in plugins:
            raise ConfigError(f"{where}: duplicate plugin name {name!r}")
        params = entry.get("parameters")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ConfigError(f"{where}: 'parameters' must be a mapping, got {params!r}")
        try:
            plugins[name] = registry.create(ptype, name, params)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None
        types[name] = ptype
    return plugins, types


def _link_prefix_filters(plugins: dict[str, Any], types: dict[str, str]) -> None:
    scorers = [n for n, p in plugins.items() if isinstance(p, PrefixCacheScorer)]
    for name, p in plugins.items():
        link = getattr(p, "link", None)
        if link is None or not hasattr(p, "producer_name"):
            continue
        ref = p.producer_name
        if ref is not None:
            target = plugins.get(ref)
            if not isinstance(target, PrefixCacheScorer):
                raise ConfigError(
                    f"plugin {name!r} (type {types[name]!r}): prefixScorerName {ref!r} "
                    "does not name a prefix-cache-scorer plugin"
                )
            link(target)
        elif len(scorers) == 1:
            link(plugins[scorers[0]])


def _classify(plugin: Any) -> str | None:
    if isinstance(plugin, Filter):
        return "filter"
    if isinstance(plugin, Scorer):
        return "scorer"
    if isinstance(plugin, Picker):
        return "picker"
    return None


def _build_profiles(entries: Any, plugins: dict[str, Any]) -> dict[str, Profile]:
    if entries is None or entries == []:
        # Upstream default: one profile with every schedulable plugin, in declared order.
        all_refs = [{"pluginRef": n} for n, p in plugins.items() if _classify(p) is not None]
        entries = [{"name": "default", "plugins": all_refs}]
    if not isinstance(entries, list):
        raise ConfigError("schedulingProfiles must be a list of {name, plugins} entries")
    profiles: dict[str, Profile] = {}
    for i, entry in enumerate(entries):
        where = f"schedulingProfiles[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a mapping with 'name' and 'plugins'")
        unknown = sorted(set(entry) - {"name", "plugins"})
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}")
        pname = entry.get("name")
        if not isinstance(pname, str) or not pname:
            raise ConfigError(f"{where}: 'name' must be a non-empty string, got {pname!r}")
        where = f"{where} {pname!r}"
        if pname in profiles:
            raise ConfigError(f"{where}: duplicate profile name")
        refs = entry.get("plugins")
        if refs is None:
            refs = []
        if not isinstance(refs, list):
            raise ConfigError(f"{where}: 'plugins' must be a list of {{pluginRef, weight}}")
        filters: list[Any] = []
        scorers: list[tuple[Any, float]] = []
        picker = None
        seen: set[str] = set()
        for j, ref in enumerate(refs):
            rwhere = f"{where} plugins[{j}]"
            if not isinstance(ref, dict) or not set(ref) <= {"pluginRef", "weight"}:
                raise ConfigError(f"{rwhere}: must be a mapping with 'pluginRef' and optional 'weight'")
            pref = ref.get("pluginRef")
            if not isinstance(pref, str) or not pref:
                raise ConfigError(f"{rwhere}: 'pluginRef' must be a plugin name, got {pref!r}")
            rwhere = f"{rwhere} (pluginRef {pref!r})"
            if pref not in plugins:
                raise ConfigError(f"{rwhere}: no plugin named {pref!r} in plugins")
            if pref in seen:
                raise ConfigError(f"{rwhere}: plugin listed twice in the profile")
            seen.add(pref)
            plugin = plugins[pref]
            kind = _classify(plugin)
            has_weight = "weight" in ref
            if kind == "scorer":
                weight = ref.get("weight", 1)
                if (
                    isinstance(weight, bool)
                    or not isinstance(weight, (int, float))
                    or not math.isfinite(weight)
                    or weight < 0
                ):
                    raise ConfigError(f"{rwhere}: weight must be a number >= 0, got {weight!r}")
                scorers.append((plugin, float(weight)))
            elif has_weight:
                raise ConfigError(f"{rwhere}: weight given, but {pref!r} is not a scorer")
            elif kind == "filter":
                filters.append(plugin)
            elif kind == "picker":
                if picker is not None:
                    raise ConfigError(f"{rwhere}: profile already has picker {picker.name!r}")
                picker = plugin
            elif isinstance(plugin, ProfileHandler):
                raise ConfigError(f"{rwhere}: a profile handler is not a profile plugin")
            else:
                raise ConfigError(f"{rwhere}: {pref!r} is not a filter, scorer or picker")
        try:
            # A profile that names no picker gets the upstream default.
            profiles[pname] = Profile(pname, filters, scorers,
                                      picker=picker or MaxScorePicker("max-score-picker"))
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return profiles


def _feature_gates(v: Any) -> frozenset[str]:
    if v is None:
        return frozenset()
    if isinstance(v, list) and all(isinstance(x, str) and x for x in v):
        return frozenset(v)
    raise ConfigError(f"featureGates must be a list of names, got {v!r}")


def _section(doc: Mapping[str, Any], key: str) -> dict[str, Any]:
    v = doc.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{key} must be a mapping, got {v!r}")
    return dict(v)
