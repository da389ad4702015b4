"""`--state-sync` flags → a `StateSync` wired to the app's in-flight tracker and scorers."""

from __future__ import annotations

import logging
from typing import Any, Mapping
from urllib.parse import urlsplit

from epp.datastore import Datastore
from epp.scheduling.inflight import InFlightTracker
from epp.scheduling.scorers import PrefixCacheScorer
from epp.settings import Settings
from epp.statesync.sync import StateSync, SyncOptions

log = logging.getLogger(__name__)

SCHEMES = ("redis", "rediss", "unix")


def check_url(url: str) -> None:
    """Reject what redis-py would only fail on later; never echoes a password."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError("--state-sync: not a valid URL") from None
    if parts.scheme not in SCHEMES:
        raise ValueError(f"--state-sync: scheme must be one of {', '.join(SCHEMES)}, "
                         f"e.g. redis://redis:6379 (got {parts.scheme or 'none'!r})")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError("--state-sync: the URL names no host")


def default_key(settings: Settings) -> str:
    pool = settings.pool_name or "standalone"
    return f"epp:state:{settings.pool_namespace}/{pool}"


def approximate_indexes(plugins: Mapping[str, Any]) -> dict[str, PrefixCacheScorer]:
    """The approximate prefix indexes to share, by scorer name: `prefix-cache-scorer`
    plugins and those other plugins learn through (the precise scorer's fallback, its
    `producer`). Exact, event-driven state is not shared: every replica subscribes to the
    engines' events itself."""
    found: dict[str, PrefixCacheScorer] = {}
    for p in plugins.values():
        for s in (p, getattr(p, "producer", None)):
            if isinstance(s, PrefixCacheScorer):
                found[s.name] = s
    return found


def state_sync_from_settings(settings: Settings, datastore: Datastore, inflight: InFlightTracker,
                             plugins: Mapping[str, Any]) -> StateSync | None:
    """None without `--state-sync`. Active-active turns leader election off: every
    replica serves (raises ValueError on a bad URL or interval)."""
    if not settings.state_sync:
        return None
    check_url(settings.state_sync)
    if settings.ha_enable_leader_election:
        log.warning("--state-sync: leader election is off in active-active mode")
        settings.ha_enable_leader_election = False
    scorers = approximate_indexes(plugins)
    options = SyncOptions(
        url=settings.state_sync,
        key=settings.state_sync_key or default_key(settings),
        interval=settings.state_sync_interval,
        ttl=settings.state_sync_ttl,
        heartbeat=min(1.0, settings.state_sync_ttl / 3),
    )
    return StateSync(options, datastore, inflight, scorers)
