"""Passive health: stop picking an endpoint the moment it is known to be failing.

Scraped metrics turn a dead server into the worst choice only once they are stale
(`--metrics-staleness-threshold`, 2 s), and until then it was still picked (up to ~1.75 s
of errors in a test). Some signals are definite and come much sooner:

- the scraper's connection to the endpoint is refused (the process is gone): ejected at
  once, within one poll interval (50 ms) of the death;
- `consecutive_failures` responses in a row with a 5xx status (Envoy's own 503 for a
  connect failure included) reported on the response path: ejected at once.

An ejected endpoint is left out of every pick for a cool-down (`base_cooldown`, doubled on
each ejection that follows a return by less than `max_cooldown`: a flapping server stays
out longer), then must pass a probe (a good metrics scrape after the cool-down, which the
scraper does anyway: no I/O here) before it is picked again. If every candidate is ejected, the ejections are ignored for
that pick (as Envoy's panic threshold does): better a likely failure than a certain 503.

Everything runs on the event-loop thread; the request path calls only `filter`, which
costs nothing while no endpoint is ejected.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from epp import observability as obs
from epp.datastore import Endpoint, Snapshot
from epp.labels import safe

log = logging.getLogger(__name__)

REFUSED = "connection_refused"
FAILURES = "consecutive_5xx"


@dataclass(slots=True)
class Ejection:
    """Why and until when one endpoint is left out."""

    endpoint: str
    reason: str
    since: float
    until: float
    """End of the cool-down; after it the endpoint waits for a good probe."""

    def probing(self, now: float) -> bool:
        return now >= self.until


@dataclass(slots=True)
class _Record:
    failures: int = 0
    ejections: int = 0
    """Ejections in a row (each one within `max_cooldown` of the last return)."""
    returned_at: float = float("-inf")


class PassiveHealth:
    """Signals in (`connection_refused`, `response`, `probe_ok`), candidates out (`filter`)."""

    def __init__(
        self,
        *,
        consecutive_failures: int = 5,
        base_cooldown: float = 1.0,
        max_cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if consecutive_failures < 1:
            raise ValueError("consecutive_failures must be >= 1")
        if not 0 < base_cooldown <= max_cooldown:
            raise ValueError("need 0 < base_cooldown <= max_cooldown")
        self.consecutive_failures = consecutive_failures
        self.base_cooldown = base_cooldown
        self.max_cooldown = max_cooldown
        self._clock = clock
        self._records: dict[str, _Record] = {}
        self._ejected: dict[str, Ejection] = {}

    # -- signals -------------------------------------------------------------------

    def connection_refused(self, endpoint: str) -> None:
        """The endpoint refused a connection: nothing listens there any more.

        While it is out, refusals change nothing: it returns with the first good probe
        after its cool-down, so a server that restarts is picked again within a scrape."""
        if endpoint not in self._ejected:
            self._eject(endpoint, REFUSED)

    def response(self, endpoint: str, status: int) -> None:
        """A response's status as the gateway saw it (Envoy's local replies included)."""
        rec = self._records.get(endpoint)
        if status < 500:
            if rec is not None:
                rec.failures = 0
            return
        if rec is None:
            rec = self._records[endpoint] = _Record()
        rec.failures += 1
        if rec.failures >= self.consecutive_failures and endpoint not in self._ejected:
            self._eject(endpoint, FAILURES)

    def probe_ok(self, endpoint: str) -> None:
        """A good metrics scrape: re-admits an ejected endpoint whose cool-down is over."""
        ej = self._ejected.get(endpoint)
        if ej is None:
            return
        now = self._clock()
        if not ej.probing(now):
            return
        del self._ejected[endpoint]
        rec = self._records.setdefault(endpoint, _Record())
        rec.failures = 0
        rec.returned_at = now
        obs.PASSIVE_HEALTH_READMISSIONS.inc()
        obs.PASSIVE_HEALTH_EJECTED.set(len(self._ejected))
        log.info("endpoint %s picked again: probe passed after %.2fs out (%s)",
                 safe(endpoint), now - ej.since, ej.reason)

    def on_endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        """Datastore listener: forget endpoints that left (a new pod may reuse the name)."""
        for ep in removed:
            self._records.pop(ep.name, None)
            if self._ejected.pop(ep.name, None) is not None:
                obs.PASSIVE_HEALTH_EJECTED.set(len(self._ejected))

    # -- reads ---------------------------------------------------------------------

    def filter(self, snapshot: Snapshot, candidates: np.ndarray | None) -> np.ndarray | None:
        """`candidates` (snapshot indices, None = all) without the ejected endpoints."""
        if not self._ejected:
            return candidates
        out_idx = [snapshot.by_name[n] for n in self._ejected if n in snapshot.by_name]
        if not out_idx:
            return candidates
        cand = np.arange(len(snapshot)) if candidates is None else candidates
        kept = cand[~np.isin(cand, out_idx)]
        if len(kept) == 0:
            obs.PASSIVE_HEALTH_PANIC.inc()
            return candidates
        return kept

    def ejected(self) -> list[Ejection]:
        """The endpoints left out now, for Explain."""
        return list(self._ejected.values())

    def is_ejected(self, endpoint: str) -> bool:
        return endpoint in self._ejected

    # -- internals -----------------------------------------------------------------

    def _eject(self, endpoint: str, reason: str) -> None:
        now = self._clock()
        rec = self._records.setdefault(endpoint, _Record())
        first = endpoint not in self._ejected
        if first and now - rec.returned_at > self.max_cooldown:
            rec.ejections = 0  # it stayed well long enough: start again from the base
        rec.ejections += 1
        rec.failures = 0
        cooldown = min(self.max_cooldown, self.base_cooldown * 2 ** (rec.ejections - 1))
        self._ejected[endpoint] = Ejection(endpoint, reason, now, now + cooldown)
        obs.PASSIVE_HEALTH_EJECTIONS.labels(reason).inc()
        obs.PASSIVE_HEALTH_EJECTED.set(len(self._ejected))
        if first:
            log.warning("endpoint %s not picked for %.1fs: %s", safe(endpoint), cooldown, reason)
