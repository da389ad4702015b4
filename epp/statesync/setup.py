"""`--state-sync` flags → a `StateSync` wired to the app's in-flight tracker and scorers."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any, Mapping
from urllib.parse import urlsplit

from epp import units
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
    plugins and those other plugins learn through (a filter's `producer`, the precise
    scorer's fallback `approx`). Exact, event-driven state is not shared: every replica
    subscribes to the engines' events itself."""
    found: dict[str, PrefixCacheScorer] = {}
    for p in plugins.values():
        for s in (p, getattr(p, "producer", None), getattr(p, "approx", None)):
            if isinstance(s, PrefixCacheScorer):
                found[s.name] = s
    return found


CONFIG_KEYS = ("url", "urlFromEnv", "key", "interval", "ttl")


def sync_settings(settings: Settings, section: Mapping[str, Any]) -> Settings:
    """Flags merged with the EndpointPickerConfig's `stateSync` section:

        stateSync:
          urlFromEnv: STATE_SYNC_URL   # or url: redis://... (a password is better in a Secret)
          key: epp:state:prod/pool-a   # optional
          interval: 50ms
          ttl: 5s

    A flag given on the command line wins over the file (defaults do not)."""
    unknown = sorted(set(section) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"stateSync: unknown keys {unknown} (known: {', '.join(CONFIG_KEYS)})")
    defaults = Settings()
    url = settings.state_sync
    if not url and section.get("urlFromEnv"):
        name = str(section["urlFromEnv"])
        url = os.environ.get(name)
        if not url:
            raise ValueError(f"stateSync.urlFromEnv: environment variable {name!r} is not set")
    if not url and section.get("url"):
        url = str(section["url"])

    def pick(flag: float, key: str) -> float:
        if flag != getattr(defaults, f"state_sync_{key}") or key not in section:
            return flag
        return units.parse_duration(section[key], f"stateSync.{key}")

    return replace(settings, state_sync=url or None,
                   state_sync_key=settings.state_sync_key or section.get("key") or None,
                   state_sync_interval=pick(settings.state_sync_interval, "interval"),
                   state_sync_ttl=pick(settings.state_sync_ttl, "ttl"))


def state_sync_from_settings(settings: Settings, datastore: Datastore, inflight: InFlightTracker,
                             plugins: Mapping[str, Any],
                             section: Mapping[str, Any] | None = None) -> StateSync | None:
    """None without `--state-sync` (or a `stateSync` config section). Active-active turns
    leader election off: every replica serves. Raises ValueError on bad values."""
    s = sync_settings(settings, section or {})
    if not s.state_sync:
        return None
    check_url(s.state_sync)
    if settings.ha_enable_leader_election:
        log.warning("--state-sync: leader election is off in active-active mode")
        settings.ha_enable_leader_election = False
    if not s.state_sync_interval > 0 or not s.state_sync_ttl > 0:
        raise ValueError("--state-sync-interval and --state-sync-ttl must be > 0")
    scorers = approximate_indexes(plugins)
    options = SyncOptions(
        url=s.state_sync,
        key=s.state_sync_key or default_key(s),
        interval=s.state_sync_interval,
        ttl=s.state_sync_ttl,
        heartbeat=min(1.0, s.state_sync_ttl / 3),
    )
    return StateSync(options, datastore, inflight, scorers)
