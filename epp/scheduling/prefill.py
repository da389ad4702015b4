"""Prefill work an EPP has sent each endpoint and the engine has not yet done.

At saturation a request's time to first token is mostly the prefills queued ahead of it,
and those differ by more than an order of magnitude: a request whose prompt the engine
holds computes a few dozen tokens, a cold one thousands. A queue length counts both
alike, so a pod with three queued cache misses looks as busy as one with three queued
hits. The precise prefix scorer knows, at each pick, how many of the prompt's tokens the
chosen endpoint does not hold, and learns from the engine's KV events when the prefill
is done (its last block is stored; of a prompt longer than `maxPrefixBlocksToMatch` blocks,
the last one matched, so there the entry ends early). `PendingPrefills` keeps that ledger, and
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

Measured on the stale-prefix routing shape (benchmarks/RESULTS.md, "Prefill-aware cold
placement").
"""

from __future__ import annotations

from collections import deque

import numpy as np

from epp.datastore import Snapshot
from epp.scheduling.cycle import CycleState
from epp.scheduling.scorers import Load, queued_load
from epp.scheduling.speculative import Holds

DEFAULT_TOKENS_PER_REQUEST = 800.0
"""Prefill tokens that count as one queued request in cold placement's load: about the
tokens a pod prefills in the ~40 ms one queued request delays the next one's admission
(`scorers.DEFAULT_HIT_QUEUE_WORTH`)."""


class _Entry:
    __slots__ = ("slot", "tokens", "last_key")

    def __init__(self, slot: int, tokens: int, last_key: int) -> None:
        self.slot = slot
        self.tokens = tokens
        self.last_key = last_key


class PendingPrefills:
    """Per endpoint, this EPP's picks whose prefill the engine has not reported done.

    An entry ends when the engine's events show its last block stored on the endpoint
    (`settle`, called by the event intake), when its TTL ends (a request that failed or
    was evicted before its prefill), or when the endpoint leaves the pool.

    Sums are kept per endpoint slot in two arrays, so that a pick reads them for the whole
    pool with one index operation (`per_endpoint`); a slot of an endpoint that left is
    reused."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._slot_of: dict[str, int] = {}
        self._free_slots: list[int] = []
        self._entries: list[dict[int, _Entry]] = []
        """Per slot: entry id -> entry."""
        self._tokens = np.zeros(16)
        self._counts = np.zeros(16)
        self._queue: deque[tuple[float, int, _Entry]] = deque()
        self._ids = 0
        self._slots_gen = 0
        self._view: tuple[Snapshot, int, np.ndarray] | None = None
        """(snapshot, slot generation, slot per snapshot index)."""

    def __len__(self) -> int:
        """Live entries."""
        return int(self._counts.sum())

    def _slot(self, endpoint: str) -> int:
        slot = self._slot_of.get(endpoint)
        if slot is not None:
            return slot
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot = len(self._entries)
            self._entries.append({})
            if slot + 1 == len(self._tokens):  # keep slot n (`per_endpoint`'s zero) in range
                self._tokens = np.concatenate([self._tokens, np.zeros(slot + 1)])
                self._counts = np.concatenate([self._counts, np.zeros(slot + 1)])
        self._slot_of[endpoint] = slot
        self._slots_gen += 1
        return slot

    def record(self, endpoint: str, tokens: int, last_key: int, now: float) -> None:
        """A pick sent `endpoint` a prompt of which it holds all but `tokens` tokens;
        `last_key` is the prompt's last full block."""
        if self.ttl <= 0 or tokens <= 0:
            return
        self.expire(now)  # the ledger stays bounded by the picks of one TTL
        slot = self._slot(endpoint)
        self._ids += 1
        entry = _Entry(slot, tokens, last_key)
        self._entries[slot][self._ids] = entry
        self._tokens[slot] += tokens
        self._counts[slot] += 1
        self._queue.append((now + self.ttl, self._ids, entry))

    def expire(self, now: float) -> None:
        q = self._queue
        while q and q[0][0] <= now:
            _, i, entry = q.popleft()
            self._end(entry.slot, i)

    def _end(self, slot: int, i: int) -> None:
        entry = self._entries[slot].pop(i, None)
        if entry is None:  # settled, or its endpoint left
            return
        self._tokens[slot] -= entry.tokens
        self._counts[slot] -= 1

    def settle(self, endpoint: str, holds: Holds) -> None:
        """The index has just stored blocks on `endpoint`: end the entries there whose
        last block it now holds."""
        slot = self._slot_of.get(endpoint)
        if slot is None:
            return
        entries = self._entries[slot]
        for i in [i for i, e in entries.items() if holds(endpoint, e.last_key)]:
            self._end(slot, i)

    def forget(self, endpoint: str) -> None:
        slot = self._slot_of.pop(endpoint, None)
        if slot is None:
            return
        self._entries[slot].clear()
        self._tokens[slot] = 0.0
        self._counts[slot] = 0.0
        self._free_slots.append(slot)
        self._slots_gen += 1

    def tokens(self, endpoint: str) -> int:
        slot = self._slot_of.get(endpoint)
        return 0 if slot is None else int(self._tokens[slot])

    def count(self, endpoint: str) -> int:
        slot = self._slot_of.get(endpoint)
        return 0 if slot is None else len(self._entries[slot])

    def per_endpoint(self, snapshot: Snapshot) -> tuple[np.ndarray, np.ndarray]:
        """(pending tokens, pending picks) per endpoint of the snapshot (new arrays)."""
        view = self._view
        if view is None or view[0] is not snapshot or view[1] != self._slots_gen:
            # Endpoints with no slot read slot n, past the used ones: always zero.
            n = len(self._entries)
            slots = np.fromiter((self._slot_of.get(e.name, n) for e in snapshot.endpoints),
                                np.int64, len(snapshot))
            view = self._view = (snapshot, self._slots_gen, slots)
        slots = view[2]
        return self._tokens[slots], self._counts[slots]


def prefill_load(state: CycleState, candidates: np.ndarray, pending: PendingPrefills,
                 tokens_per_request: float, running_weight: float) -> Load:
    """Per candidate: own pending prefill tokens / `tokens_per_request` + other waiting
    requests + `running_weight` x running requests; and which candidates' loads are
    known and fresh (None: all), as `scorers.queued_load`.

    Other waiting requests: the scraped waiting count plus this EPP's picks since the
    scrape (`CycleState.waiting`), less this EPP's picks still pending there."""
    pending.expire(state.now)
    toks, counts = pending.per_endpoint(state.snapshot)
    if candidates is not state.derived.all:
        toks, counts = toks[candidates], counts[candidates]
    others = np.maximum(state.take(state.waiting, candidates) - counts, 0.0)
    toks *= 1.0 / tokens_per_request
    return queued_load(state, candidates, running_weight, waiting=others + toks)
