"""Upstream's scoring formulas, for users who want the upstream EPP's decisions exactly.

Our default scorers differ from upstream in two places (docs/scoring.md): the queue and
running-requests scorers are proportional to the load (`normalization: scaled`) where
upstream normalises min-max over the candidates, and the prefix-cache scorer discounts a
cached prefix on a pod whose queue runs far ahead of the others (`cacheHitQueueWorth`).
These parameters switch both back.
"""

from __future__ import annotations

UPSTREAM_PARAMS: dict[str, dict[str, object]] = {
    "queue-scorer": {"normalization": "minmax"},
    "running-requests-size-scorer": {"normalization": "minmax"},
    "prefix-cache-scorer": {"cacheHitQueueWorth": 0},
}


def upstream_default_config_text() -> str:
    """The built-in default EndpointPickerConfig with upstream's formulas."""
    from epp.config import DEFAULT_CONFIG_TEXT

    text = DEFAULT_CONFIG_TEXT
    for plugin_type, params in UPSTREAM_PARAMS.items():
        flow = ", ".join(f"{k}: {v}" for k, v in params.items())
        text = text.replace(
            f"- type: {plugin_type}\n", f"- type: {plugin_type}\n  parameters: {{{flow}}}\n"
        )
    return text
