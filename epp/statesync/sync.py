"""Active-active: EPP replicas share what they learn through one Redis (or Valkey) stream.

Nothing here runs on the request path. The request path keeps reading local state; this
module only moves state in the background:

- out: the prefix-cache scorer hands each record to `_on_record` (a dict insert); every
  `interval` the publisher appends one batch to the stream (`wire.py`), with this replica's
  in-flight counts per endpoint, and at least once per heartbeat even when idle. A chain
  goes out as only the blocks not yet sent for its endpoint (a shared system prompt
  crosses the stream once per endpoint every `RESEND` seconds, not once per request);
- in: the reader follows the stream (XREAD BLOCK) and merges the other replicas' prefix
  records into the same scorers (`learn_remote`) and their counts into `RemoteLoad`,
  which `InFlightTracker.extra_waiting` adds to this replica's own;
- bootstrap: before the replica reports ready it replays the stream's bounded look-back
  (the stream is trimmed to about `max_entries`), so a restarted replica does not route
  with an empty index.

Redis faults (down, slow, restarted, garbage answers, auth refused) never reach a client:
the replica routes on local state, counts the fault by reason, logs once per change of
state, reconnects with capped exponential backoff, and resynchronises (records learned
while cut off are kept, bounded, and sent on reconnect; the stream is read on from where
it stopped, or replayed again when Redis lost it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import (AuthenticationError, AuthorizationError, ConnectionError,
                              DataError, InvalidResponse, ResponseError)
from redis.exceptions import TimeoutError as RedisTimeout
from redis.retry import Retry

from epp import observability as obs
from epp.datastore import Datastore
from epp.scheduling.inflight import InFlightTracker
from epp.scheduling.prefix import leading_in
from epp.scheduling.scorers import PrefixCacheScorer
from epp.statesync import wire
from epp.statesync.remote import RemoteLoad
from epp.tasks import cancel_and_wait

log = logging.getLogger(__name__)

READ_BLOCK = 0.25
"""Longest wait of the reader's XREAD: news wakes it at once, so this only sets how often
an idle replica polls (each round trip costs ~0.4 ms of CPU in redis-py)."""

BATCH_RECORDS = 2000
"""Records per stream entry (~1.6 MB at 100 blocks each); more wait for the next interval."""

RESEND = 2.0
"""Seconds after which a replica forgets which blocks it has sent and sends chains whole
again: a receiver that missed a chain's head (it started later and the head was trimmed
from the stream, it did not know the endpoint yet, or it evicted the head) drops the tails
that continue it and learns the chain again within this time."""


@dataclass(frozen=True, slots=True)
class SyncOptions:
    url: str
    """redis://[user:password@]host:port[/db] or rediss:// for TLS."""
    key: str = "epp:state:standalone"
    interval: float = 0.05
    """Seconds between batches (and the reader's longest wait for news)."""
    heartbeat: float = 1.0
    ttl: float = 5.0
    """A peer silent this long has its in-flight contribution dropped."""
    max_entries: int = 20_000
    """Stream length kept (approximate trimming): the bootstrap look-back."""
    bootstrap_timeout: float = 10.0
    command_timeout: float = 2.0
    max_pending: int = 50_000
    """Records kept for sending while Redis is unreachable (oldest dropped first)."""


def replica_id() -> str:
    """Unique per process: a restarted pod is a new replica (its old load expires)."""
    return f"{socket.gethostname()[:200]}-{os.getpid()}-{random.getrandbits(24):06x}"


def fault_reason(e: BaseException) -> str:
    """The `reason` label of a Redis fault."""
    if isinstance(e, (AuthenticationError, AuthorizationError)):
        return "auth"
    if isinstance(e, ResponseError):
        text = str(e).upper()
        if text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
            return "auth"
        return "garbage"  # WRONGTYPE and the like: the key holds something else
    if isinstance(e, (RedisTimeout, asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(e, (InvalidResponse, DataError, wire.WireError)):
        return "garbage"
    if isinstance(e, (ConnectionError, OSError)):
        return "unreachable"
    return "error"


class StateSync:
    """One replica's side of the shared state: publisher, reader, bootstrap, reconnects."""

    def __init__(self, options: SyncOptions, datastore: Datastore, inflight: InFlightTracker,
                 scorers: Mapping[str, PrefixCacheScorer], *, replica: str | None = None) -> None:
        if not options.interval > 0 or not options.heartbeat > 0:
            raise ValueError("state-sync interval and heartbeat must be > 0")
        self.options = options
        self.replica = replica or replica_id()
        self.datastore = datastore
        self.inflight = inflight
        self.scorers = dict(scorers)
        self.remote = RemoteLoad(options.ttl)
        inflight.remote = self.remote
        for s in self.scorers.values():
            s.outbox = self._on_record
        # Records to send, deduplicated per (scorer, endpoint, chain); oldest first.
        self._pending: OrderedDict[tuple[str, str, int, int], tuple[int, list[int]]] = (
            OrderedDict())
        # Per (scorer, endpoint), the blocks sent since `_sent_since` in this session: a
        # chain goes out as its new tail after the last block already sent (the sets are
        # prefix-closed, like the index, so a bisection finds that block).
        self._sent: dict[tuple[str, str], set[int]] = {}
        self._sent_since = 0.0
        self._last_load: dict[str, int] | None = None
        self._last_sent = -1e9
        self._last_id: str | None = None  # stream position read up to; None: bootstrap due
        self.connected = False
        self.bootstrapped = False
        self._degraded_reason: str | None = None
        self._first_attempt = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session_ok = False
        self._closing = False
        self._generation = 0  # of sessions: a loop whose session ended stops
        self.sent_records = 0
        self.received_records = 0

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Start syncing; returns after the bootstrap (or the first failed attempt), so
        that the caller reports ready with what the other replicas know."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="state-sync")
        budget = self.options.bootstrap_timeout + self.options.command_timeout
        try:
            await asyncio.wait_for(self._first_attempt.wait(), budget)
        except asyncio.TimeoutError:
            log.warning("state sync: bootstrap not done within %.0fs; serving on local state",
                        budget)

    async def stop(self) -> None:
        self._closing = True  # the loops also check it: a client may swallow a cancel
        await cancel_and_wait(self._task)
        self._task = None
        for s in self.scorers.values():
            s.outbox = None
        self.inflight.remote = None
        obs.STATE_SYNC_CONNECTED.set(0)
        obs.STATE_SYNC_PEERS.set(0)

    @property
    def replica(self) -> str:
        return self._replica

    @replica.setter
    def replica(self, value: str) -> None:
        self._replica = value
        self._own_id = value.encode()

    @property
    def status(self) -> str:
        return "synced" if self.connected else f"degraded ({self._degraded_reason or 'starting'})"

    # -- the request path's only touch: a bounded append ------------------------------

    def _on_record(self, scorer: str, endpoint: str, capacity: int, hashes: list[int]) -> None:
        key = (scorer, endpoint, len(hashes), hashes[-1])
        pending = self._pending
        if key in pending:
            pending.move_to_end(key)
            return
        pending[key] = capacity, hashes
        if len(pending) > self.options.max_pending:
            pending.popitem(last=False)
            obs.STATE_SYNC_ERRORS.labels("overflow").inc()

    # -- connection loop ------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.1
        while not self._closing:
            client = self._client()
            self._session_ok = False
            try:
                await self._session(client)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # every fault: degrade, count, back off, retry
                self._degrade(fault_reason(e), e)
            finally:
                self._first_attempt.set()
                try:
                    await client.aclose()
                except Exception:
                    pass
            if self._session_ok:
                backoff = 0.1  # it worked for a while: retry soon
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 5.0)

    def _client(self) -> aioredis.Redis:
        o = self.options
        block = max(o.interval, READ_BLOCK)
        return aioredis.Redis.from_url(
            o.url,
            socket_connect_timeout=o.command_timeout,
            socket_timeout=o.command_timeout + block,
            retry=Retry(NoBackoff(), 0),
            client_name=f"epp-{self.replica}"[:100].replace(" ", "_"),
        )

    async def _session(self, client: aioredis.Redis) -> None:
        await client.ping()
        if self._last_id is None:
            await self._bootstrap(client)
        else:
            await self._check_continuity(client)
        self._recovered()
        self._session_ok = True
        self._first_attempt.set()
        self._generation += 1
        pub = asyncio.ensure_future(self._publish_loop(client, self._generation))
        read = asyncio.ensure_future(self._read_loop(client, self._generation))
        try:
            done, _ = await asyncio.wait({pub, read}, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            self._generation += 1
            self.connected = False
            obs.STATE_SYNC_CONNECTED.set(0)
            # Cut off, we cannot hear the others' heartbeats: their load stops counting
            # now rather than going stale (it is re-announced within a second of reconnecting).
            self.remote.clear()
            self._sent.clear()  # Redis may have lost what we sent: send chains whole again
            obs.STATE_SYNC_PEERS.set(0)
            await cancel_and_wait(pub, read)

    def _degrade(self, reason: str, e: BaseException) -> None:
        obs.STATE_SYNC_ERRORS.labels(reason).inc()
        was = self.connected or self._degraded_reason is None
        self.connected = False
        obs.STATE_SYNC_CONNECTED.set(0)
        if was or reason != self._degraded_reason:
            log.warning("state sync degraded (%s: %s): routing on local state, reconnecting",
                        reason, _short(e))
        self._degraded_reason = reason

    def _recovered(self) -> None:
        if self._degraded_reason is not None:
            log.info("state sync restored: exchanging state through Redis again")
        else:
            log.info("state sync connected as replica %s (key %s)", self.replica,
                     self.options.key)
        self._degraded_reason = None
        self.connected = True
        obs.STATE_SYNC_CONNECTED.set(1)

    # -- bootstrap and continuity -----------------------------------------------------

    async def _bootstrap(self, client: aioredis.Redis) -> None:
        """Replay the stream's look-back: prefix records only (load is re-announced by
        every live replica within one heartbeat)."""
        deadline = time.monotonic() + self.options.bootstrap_timeout
        start = "-"
        last = "0-0"
        entries = 0
        while True:
            page = await client.xrange(self.options.key, min=start, max="+", count=1000)
            for entry_id, fields in page:
                last = _id(entry_id)
                self._apply(fields, bootstrap=True)
                entries += 1
            if len(page) < 1000:
                break
            start = "(" + last
            if time.monotonic() > deadline:
                log.warning("state sync: bootstrap stopped after %d entries (time budget)", entries)
                break
            await asyncio.sleep(0)  # let requests through between pages
        self._last_id = last
        self.bootstrapped = True
        log.info("state sync: bootstrapped from %d entries", entries)

    async def _check_continuity(self, client: aioredis.Redis) -> None:
        """After a reconnect: when Redis lost the stream (restart without persistence) or
        trimmed past our position, what we missed is gone; read on from the start of
        what is there."""
        first = await client.xrange(self.options.key, min="-", max="+", count=1)
        if first and _id_tuple(_id(first[0][0])) > _id_tuple(self._last_id or "0-0"):
            obs.STATE_SYNC_ERRORS.labels("gap").inc()
            log.info("state sync: entries missed while disconnected are no longer in Redis")
            self._last_id = "0-0"
        elif not first:
            self._last_id = "0-0"

    # -- publisher --------------------------------------------------------------------

    def _live(self, generation: int) -> bool:
        """A session's loops run while it is the current one (redis-py can swallow the
        cancellation of a blocked read, so the loops check this too)."""
        return generation == self._generation and not self._closing

    async def _publish_loop(self, client: aioredis.Redis, generation: int) -> None:
        o = self.options
        while self._live(generation):
            now = time.monotonic()
            load = self._local_load(now)
            gone = self.remote.expire(now)
            if gone:
                log.info("state sync: replicas %s went silent; their load no longer counts",
                         ", ".join(sorted(gone))[:500])
            obs.STATE_SYNC_PEERS.set(len(self.remote.peers))
            heartbeat_due = now - self._last_sent >= o.heartbeat
            load_changed = load != self._last_load
            if now - self._sent_since >= RESEND:
                self._sent.clear()
                self._sent_since = now
            records, done = self._outgoing()
            if records or load_changed or heartbeat_due:
                fields = wire.encode(self.replica, load if (load_changed or heartbeat_due)
                                     else None, records)
                await client.xadd(o.key, fields, maxlen=o.max_entries, approximate=True)
                self._last_load = load
                self._last_sent = now
                self.sent_records += len(records)
                obs.STATE_SYNC_RECORDS.labels("sent").inc(len(records))
            done()  # only once in Redis: after a failed XADD they stay pending
            await asyncio.sleep(o.interval)

    def _outgoing(self) -> tuple[list[wire.PrefixRecord], Callable[[], None]]:
        """The next batch's records, and what to call once they are in the stream.

        A chain whose head this replica already sent for that endpoint goes as the last
        block sent plus the new ones; a chain sent whole already goes not at all. The
        blocks are marked sent at once: when the XADD fails, the session ends and clears
        the marks, so everything goes whole again."""
        keys = list(itertools.islice(self._pending, BATCH_RECORDS))
        records: list[wire.PrefixRecord] = []
        pending, sent_by = self._pending, self._sent
        for k in keys:
            scorer, endpoint = k[0], k[1]
            capacity, hashes = pending[k]
            sent = sent_by.get((scorer, endpoint))
            if sent is None:
                sent = sent_by[(scorer, endpoint)] = set()
            if hashes[-1] in sent:  # prefix-closed: the whole chain went already
                continue
            lo = leading_in(hashes, sent, len(hashes) - 1)
            if lo:
                records.append(wire.PrefixRecord(scorer, endpoint, capacity, hashes[lo - 1:],
                                                 True))
                sent.update(hashes[lo:])
            else:
                records.append(wire.PrefixRecord(scorer, endpoint, capacity, hashes))
                sent.update(hashes)

        def done() -> None:
            for k in keys:  # records added meanwhile stay for the next batch
                pending.pop(k, None)

        return records, done

    def _local_load(self, now: float) -> dict[str, int]:
        snap = self.datastore.snapshot()
        extra = self.inflight.local_extra_waiting(snap, now)
        if extra is None:
            return {}
        return {snap.endpoints[i].name: int(extra[i]) for i in extra.nonzero()[0].tolist()}

    # -- reader -----------------------------------------------------------------------

    async def _read_loop(self, client: aioredis.Redis, generation: int) -> None:
        block = int(max(self.options.interval, READ_BLOCK) * 1000)
        key = self.options.key
        while self._live(generation):
            resp = await client.xread({key: self._last_id or "0-0"}, count=1000, block=block)
            if not resp:
                continue
            if not isinstance(resp, list):
                raise InvalidResponse("unexpected XREAD answer")
            for stream in resp:
                for entry_id, fields in stream[1]:
                    self._apply(fields, bootstrap=False)
                    self._last_id = _id(entry_id)

    def _apply(self, fields: Any, *, bootstrap: bool) -> None:
        """Merge one entry; a malformed one is counted and skipped."""
        if not bootstrap and isinstance(fields, dict) and fields.get(b"r") == self._own_id:
            return  # our own batch, read back: nothing to merge
        try:
            if not isinstance(fields, dict):
                raise wire.WireError("entry is not a field map")
            batch = wire.decode(fields)
        except wire.WireError as e:
            obs.STATE_SYNC_ERRORS.labels("garbage").inc()
            log.debug("state sync: skipped a malformed entry: %s", e)
            return
        own = batch.replica == self.replica
        if own and not bootstrap:
            return
        if not bootstrap:
            self.remote.update(batch.replica, batch.load, time.monotonic())
        if not batch.records:
            return
        by_name = self.datastore.snapshot().by_name
        merged = unknown_head = 0
        scorers = self.scorers
        for r in batch.records:
            scorer = scorers.get(r.scorer)
            if scorer is None or r.endpoint not in by_name:
                continue  # another config, or an endpoint this replica does not route to
            if scorer.learn_remote(r.endpoint, r.hashes, r.capacity, r.continues):
                merged += 1
            else:
                unknown_head += 1  # learnt whole within RESEND seconds
        self.received_records += merged
        obs.STATE_SYNC_RECORDS.labels("received").inc(merged)
        if unknown_head:
            obs.STATE_SYNC_RECORDS.labels("unknown_head").inc(unknown_head)


def _id(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _id_tuple(v: str) -> tuple[int, int]:
    ms, _, seq = v.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:200]
