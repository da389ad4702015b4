"""The built-in plugin types, by their upstream type names: one table, as upstream's
runner lists them. The config loader (`epp.config`) instantiates plugins from it.

To add a plugin: write its class (see `epp.scheduling.interface` for the contracts and
`epp.plugins` for parameters) and list it here.
"""

from __future__ import annotations

from typing import Any, Mapping

from epp.datalayer.plugins import CoreMetricsExtractor, MetricsDataSource
from epp.flowcontrol.saturation import ConcurrencyDetector, UtilizationDetector
from epp.scheduling import filters, pickers, scorers
from epp.scheduling.precise_prefix import PrecisePrefixCacheScorer
from epp.scheduling.profile import SingleProfileHandler

_BUILTIN: tuple[type[Any], ...] = (
    # filters
    filters.LeastQueueFilter,
    filters.LeastKVCacheFilter,
    filters.LowQueueFilter,
    filters.LoraAffinityFilter,
    filters.PrefixCacheAffinityFilter,
    # scorers
    scorers.QueueScorer,
    scorers.RunningRequestsSizeScorer,
    scorers.KVCacheUtilizationScorer,
    scorers.LoraAffinityScorer,
    scorers.PrefixCacheScorer,
    PrecisePrefixCacheScorer,
    # pickers
    pickers.MaxScorePicker,
    pickers.RandomPicker,
    pickers.WeightedRandomPicker,
    # profile handlers
    SingleProfileHandler,
    # saturation detectors (used by admission, not by profiles)
    UtilizationDetector,
    ConcurrencyDetector,
    # data layer (read by the scraper and the engine table at start)
    MetricsDataSource,
    CoreMetricsExtractor,
)

PLUGIN_TYPES: Mapping[str, type[Any]] = {
    **{cls.plugin_type: cls for cls in _BUILTIN},
    **filters.ALIASES,
}


def create(type_name: str, name: str, params: Mapping[str, Any] | None) -> Any:
    """A plugin of `type_name` called `name`; ValueError for an unknown type or a bad
    parameter."""
    cls = PLUGIN_TYPES.get(type_name)
    if cls is None:
        raise ValueError(f"unknown plugin type {type_name!r} (known: {', '.join(known_types())})")
    plugin = cls.from_params(name, dict(params or {}))
    if type_name != cls.plugin_type:
        plugin.plugin_type = type_name  # an alias: metrics and Explain show the name used
    return plugin


def known_types() -> list[str]:
    return sorted(PLUGIN_TYPES)
