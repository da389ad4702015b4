"""Prefill work an EPP has sent each endpoint and the engine has not yet done.

At saturation a request's time to first token is mostly the prefills queued ahead of it,
and those differ by more than an order of magnitude: a request whose prompt the engine
holds computes a few dozen tokens, a cold one thousands. A queue length counts both
alike, so a pod with three queued cache misses looks as busy as one with three queued
hits. The precise prefix scorer knows, at each pick, how many of the prompt's tokens the
chosen endpoint does not hold, and learns from the engine's KV events when the prefill
is done (its last block is stored). `PendingPrefills` keeps that ledger, and
`prefill_load` turns it into the load cold placement compares (`coldplace`): tokens still
to prefill, in units of `tokens_per_request`.

Only cold placement: where a full prefill should start is a question of prefill work
queued. The load discount (a holder too busy to be worth its cache) keeps counting
requests (`scorers.queued_load`); counting them by their prefill there made a hot group's
home look idle behind a queue of cheap hits, and the group stopped spilling (the
skewed-prefix shape's p90 1.5-3.6x worse on the virtual clock).

Requests this EPP did not send (another EPP replica's, a client that bypasses the EPP)
are seen only as scraped waiting requests, and each counts as one unit, as in
`scorers.queued_load`.

Measured on the stale-prefix routing shape (benchmarks/RESULTS.md, "Prefill-aware load").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from epp.scheduling.cycle import CycleState
from epp.scheduling.scorers import Load, running_or_zero

Holds = Callable[[str, int], bool]

DEFAULT_TOKENS_PER_REQUEST = 800.0
"""Prefill tokens that count as one queued request in the load discount's and cold
placement's units: about the tokens a pod prefills in the ~40 ms one queued request delays
the next one's admission (`scorers.DEFAULT_HIT_QUEUE_WORTH`)."""

class _Entry:
    __slots__ = ("endpoint", "tokens", "last_key", "until")

    def __init__(self, endpoint: str, tokens: int, last_key: int, until: float) -> None:
        self.endpoint = endpoint
        self.tokens = tokens
        self.last_key = last_key
        self.until = until


class PendingPrefills:
    """Per endpoint, this EPP's picks whose prefill the engine has not reported done.

    An entry ends when the engine's events show its last block stored on the endpoint
    (`settle`, called by the event intake), when its TTL ends (a request that failed or
    was evicted before its prefill), or when the endpoint leaves the pool."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._by_endpoint: dict[str, dict[int, _Entry]] = {}
        self._tokens: dict[str, int] = {}
        self._queue: deque[tuple[float, int, _Entry]] = deque()
        self._ids = 0
        self.version = 0
        """Changes whenever the ledger does (for caching what is derived from it)."""

    def __len__(self) -> int:
        """Live entries."""
        return sum(map(len, self._by_endpoint.values()))

    def record(self, endpoint: str, tokens: int, last_key: int, now: float) -> None:
        """A pick sent `endpoint` a prompt of which it holds all but `tokens` tokens;
        `last_key` is the prompt's last full block."""
        if self.ttl <= 0 or tokens <= 0:
            return
        self._ids += 1
        entry = _Entry(endpoint, tokens, last_key, now + self.ttl)
        self._by_endpoint.setdefault(endpoint, {})[self._ids] = entry
        self._tokens[endpoint] = self._tokens.get(endpoint, 0) + tokens
        self._queue.append((entry.until, self._ids, entry))
        self.version += 1

    def expire(self, now: float) -> None:
        q = self._queue
        while q and q[0][0] <= now:
            _, i, entry = q.popleft()
            self._end(entry.endpoint, i)

    def _end(self, endpoint: str, i: int) -> None:
        entries = self._by_endpoint.get(endpoint)
        entry = entries.pop(i, None) if entries is not None else None
        if entry is None:
            return
        left = self._tokens[endpoint] - entry.tokens
        if entries:
            self._tokens[endpoint] = left
        else:
            del self._by_endpoint[endpoint]
            del self._tokens[endpoint]
        self.version += 1

    def settle(self, endpoint: str, holds: Holds) -> None:
        """The index has just stored blocks on `endpoint`: end the entries there whose
        last block it now holds."""
        entries = self._by_endpoint.get(endpoint)
        if not entries:
            return
        for i in [i for i, e in entries.items() if holds(endpoint, e.last_key)]:
            self._end(endpoint, i)

    def forget(self, endpoint: str) -> None:
        for i in list(self._by_endpoint.get(endpoint, ())):
            self._end(endpoint, i)

    def tokens(self, endpoint: str) -> int:
        return self._tokens.get(endpoint, 0)

    def count(self, endpoint: str) -> int:
        return len(self._by_endpoint.get(endpoint, ()))

    def per_endpoint(self, state: CycleState) -> tuple[np.ndarray, np.ndarray]:
        """(pending tokens, pending picks) per endpoint of the snapshot."""
        return state.memo(("pending-prefills", id(self), self.version),  # type: ignore[no-any-return]
                          lambda: self._per_endpoint(state))

    def _per_endpoint(self, state: CycleState) -> tuple[np.ndarray, np.ndarray]:
        n = len(state.snapshot)
        toks = np.zeros(n)
        counts = np.zeros(n)
        by_name = state.snapshot.by_name
        for name, t in self._tokens.items():
            i = by_name.get(name)
            if i is not None:
                toks[i] = t
                counts[i] = len(self._by_endpoint[name])
        return toks, counts


def prefill_load(state: CycleState, candidates: np.ndarray, pending: PendingPrefills,
                 tokens_per_request: float, running_weight: float) -> Load:
    """Per candidate: own pending prefill tokens / `tokens_per_request` + other waiting
    requests + `running_weight` x running requests; and which candidates' loads are
    known and fresh (None: all), as `scorers.queued_load`.

    Other waiting requests: the scraped waiting count plus this EPP's picks since the
    scrape (`CycleState.waiting`), less this EPP's picks still pending there."""
    toks, counts = pending.per_endpoint(state)
    waiting = state.take(state.waiting, candidates)
    others = np.maximum(waiting - state.take(counts, candidates), 0.0)
    w = state.take(toks, candidates) / tokens_per_request
    w += others
    if running_weight > 0:
        w += running_weight * state.take(state.derived.get("running-or-0", running_or_zero),
                                         candidates)
    known = ~np.isnan(waiting)
    if not state.all_fresh:
        known &= state.take(state.fresh, candidates)
    if known.all():
        return w, None
    return w, known
