"""The upstream EPP's data-layer plugins, so that its EndpointPickerConfig loads unchanged.

Since v1.5.0 the upstream config (and its Helm chart's default) names where metrics come
from as two plugins beside the scorers:

    plugins:
    - type: metrics-data-source        # how pods are scraped
      parameters: {scheme: http, path: /metrics, insecureSkipVerify: true}
    - type: core-metrics-extractor     # which metric names each engine type exports
      parameters: {defaultEngine: sglang}

Here they are plain settings: the scraper (`epp.datalayer.scraper`) and the engine table
(`epp.datalayer.engines`) read them at start. Their parameters overlay the flags
(`--model-server-metrics-*`), as upstream's do; the extractor's parameters are the same
as this EPP's `data:` section, which a config gives instead of, not beside, an extractor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from epp.datalayer.engines import EngineRegistry
from epp.plugins import check_params


@dataclass
class MetricsDataSource:
    """Overrides for how endpoints' metrics pages are fetched; None keeps the flag's value."""

    name: str
    scheme: str | None = None
    path: str | None = None
    insecure_skip_verify: bool | None = None

    plugin_type = "metrics-data-source"

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any]) -> "MetricsDataSource":
        check_params(params, ("scheme", "path", "insecureSkipVerify"))
        scheme = params.get("scheme")
        if scheme is not None and scheme not in ("http", "https"):
            raise ValueError(f"parameter 'scheme' must be http or https, got {scheme!r}")
        path = params.get("path")
        if path is not None and (not isinstance(path, str) or not path.startswith("/")):
            raise ValueError(f"parameter 'path' must be a URL path starting with '/', got {path!r}")
        insecure = params.get("insecureSkipVerify")
        if insecure is not None and not isinstance(insecure, bool):
            raise ValueError(f"parameter 'insecureSkipVerify' must be true or false, got {insecure!r}")
        return cls(name, scheme, path, insecure)


@dataclass
class CoreMetricsExtractor:
    """The engine table's config (`EngineRegistry.from_config`), checked when loaded."""

    name: str
    params: dict[str, Any]

    plugin_type = "core-metrics-extractor"

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any]) -> "CoreMetricsExtractor":
        EngineRegistry.from_config(params)  # raises ValueError naming the key at fault
        return cls(name, dict(params))


def engine_section(plugins: Mapping[str, Any], data: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The engine table's config from a `core-metrics-extractor` or the `data:` section;
    ValueError when both (or two extractors) give it."""
    extractors = [p for p in plugins.values() if isinstance(p, CoreMetricsExtractor)]
    if len(extractors) > 1:
        raise ValueError(f"one core-metrics-extractor at most, got {[p.name for p in extractors]}")
    if extractors and data:
        raise ValueError(f"give engine configs once: plugin {extractors[0].name!r} "
                         "(core-metrics-extractor) or the 'data' section, not both")
    if extractors:
        return extractors[0].params
    return data or None


def metrics_source(plugins: Mapping[str, Any]) -> MetricsDataSource | None:
    """The config's `metrics-data-source`, if any; ValueError for more than one."""
    sources = [p for p in plugins.values() if isinstance(p, MetricsDataSource)]
    if len(sources) > 1:
        raise ValueError(f"one metrics-data-source at most, got {[p.name for p in sources]}")
    return sources[0] if sources else None
