"""The queueing model of one simulated vLLM server: continuous batching on a virtual clock.

One asyncio task runs the engine loop. Each iteration is one engine step, as in vLLM V1:

1. schedule: running sequences first (one decode token each, or their next prefill
   chunk), then waiting ones in arrival order while there is room: `max_num_seqs`
   sequences, `max_num_batched_tokens` tokens per step, KV blocks for the prompt, and a
   LoRA slot (at most `max_loras` distinct adapters in a batch). A waiting request whose
   adapter cannot get a slot is skipped, not blocking the ones behind it; a request that
   cannot get KV blocks stops admission (first come, first served).
2. cost: step time = `step_time` + `prefill_time_per_token` x uncached prompt tokens
   in this step + `decode_time_per_seq` x decoding sequences + `decode_time_per_kv_token`
   x their context length + `lora_load_time` per adapter swapped into a slot.
3. sleep until the step's end on the virtual clock, then emit one token to every
   sequence that decoded or finished its prefill, and retire finished sequences.

Prefix caching (see `kvcache.py`) makes cached prompt blocks free to prefill. When a
growing sequence finds no free block, the most recently admitted running sequence is
preempted (its blocks freed, it goes back to the head of the queue and is recomputed),
as vLLM does.

The virtual clock runs at `time_scale` x wall time and never runs ahead of it: a step
that would end in the future is slept for, a step that starts late starts at the wall
time. So timings are repeatable when the machine keeps up, and an idle engine costs
nothing (it waits on an event).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from epp.sim.config import SimConfig
from epp.sim.kvcache import KVCache
from epp.sim.tokens import Prompt

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at `max_waiting`; the server answers 429."""


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. Times are on the engine's virtual clock."""

    request_id: str
    prompt: Prompt
    max_tokens: int
    adapter: str | None = None
    finish_reason_at_end: str = "length"
    max_tokens_requested: int | None = None
    arrival: float = 0.0
    # progress
    computed: int = 0
    """Tokens whose KV is in the cache (prefill progress, cached tokens included)."""
    generated: int = 0
    committed: bool = False
    """Whether the prompt's full blocks have been offered to the prefix cache."""
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache at (first) admission."""
    blocks: list[int] = field(default_factory=list)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    preemptions: int = 0
    # signalling to the HTTP layer
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def context_len(self) -> int:
        """Prompt plus generated tokens: what must be in the KV cache to decode."""
        return self.prompt.num_tokens + self.generated

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    """Counters the metrics page and the tests read."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    steps: int = 0
    lora_loads: int = 0
    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})


Observer = Callable[[Sequence], None]


class Engine:
    """Continuous batching over a paged KV cache; see the module docstring."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.kv = KVCache(cfg.num_gpu_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.lora_slots: OrderedDict[str, None] = OrderedDict()
        """Adapters resident on the GPU, least recently used first."""
        self.stats = EngineStats()
        self.on_finish: Observer | None = None
        """Called once per request when it finishes (stop, length or abort)."""
        self.on_step: Callable[[int, list[tuple[Sequence, float]]], None] | None = None
        """Called after each step with (tokens in the step, [(seq, inter-token gap)])."""
        self.on_kv_events: Callable[[list[object]], None] | None = None
        """Called after each step with the KV events of the step (see kvcache.py)."""
        self.on_lora_change: Callable[[], None] | None = None
        """Called when the running or waiting adapter sets may have changed."""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._t0 = 0.0
        self.clock = 0.0

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._t0 = loop.time()
        self.clock = 0.0
        self._task = loop.create_task(self._run(), name=f"sim-engine-{self.cfg.name}")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        for seq in list(self.waiting) + list(self.running):
            self._finish(seq, "abort", self.now())
        self.waiting.clear()
        self.running.clear()

    def now(self) -> float:
        """Virtual time: wall time since start x time_scale."""
        return (asyncio.get_running_loop().time() - self._t0) * self.cfg.time_scale

    # -- requests ------------------------------------------------------------------

    def submit(self, seq: Sequence) -> Sequence:
        """Queue a request; raises QueueFull when `max_waiting` requests already wait."""
        if len(self.waiting) >= self.cfg.max_waiting:
            raise QueueFull(f"waiting queue is full ({self.cfg.max_waiting})")
        seq.arrival = self.now()
        self.waiting.append(seq)
        self._lora_changed()
        self._wake.set()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Drop a request (for example, its client went away) and free what it holds."""
        if seq.finished:
            return
        if seq in self.running:
            self.running.remove(seq)
            self.kv.free(seq.blocks)
            seq.blocks = []
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self._finish(seq, "abort", self.now())
        self._lora_changed()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def running_adapters(self) -> list[str]:
        return sorted({s.adapter for s in self.running if s.adapter})

    def waiting_adapters(self) -> list[str]:
        return sorted({s.adapter for s in self.waiting if s.adapter})

    # -- the loop ------------------------------------------------------------------

    async def _run(self) -> None:
        scale = self.cfg.time_scale
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
            try:
                start = max(self.clock, self.now())
                plan = self._schedule(start)
                if plan is None:  # nothing could be scheduled: wait for a change
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                work, duration = plan
                end = start + duration
                delay = (end - self.now()) / scale
                await asyncio.sleep(max(0.0, delay))
                self.clock = end
                self._complete(work, end)
            except asyncio.CancelledError:
                raise
            except Exception:  # a model bug must not kill the server; log and go on
                log.exception("sim engine %s: step failed", self.cfg.name)
                await asyncio.sleep(0.5)  # do not flood the log if it keeps failing

    def _schedule(self, now: float) -> tuple[list[tuple[Sequence, int]], float] | None:
        """Pick this step's work: [(seq, tokens to compute)] and the step's duration."""
        cfg = self.cfg
        budget = cfg.max_num_batched_tokens
        work: list[tuple[Sequence, int]] = []
        prefill_tokens = 0
        decode_seqs = 0
        decode_ctx = 0
        loads = 0

        # Running sequences: make room for each decode token, preempting if needed.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            remaining = seq.context_len - seq.computed
            if seq.generated > 0 and remaining <= 1:  # decoding: the last token's KV
                if not self._grow(seq, seq.context_len):
                    continue  # preempted itself; the next one moved up to index i
                work.append((seq, 1))
                budget -= 1
                decode_seqs += 1
                decode_ctx += seq.context_len
            else:  # still prefilling (a long prompt in chunks, or a recompute)
                n = min(remaining, budget)
                work.append((seq, n))
                budget -= n
                prefill_tokens += n
            i += 1

        # Waiting sequences, in order.
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            if (seq.adapter is not None and seq.adapter not in self.lora_slots
                    and not self._lora_slot_available()):
                skipped.append(self.waiting.popleft())  # let later requests go first
                continue
            hits = self.kv.cached_prefix(seq.prompt.block_hashes)
            hit_tokens = len(hits) * cfg.block_size
            if hit_tokens >= seq.context_len:  # always compute at least the last token
                hits = hits[:-1]
                hit_tokens = len(hits) * cfg.block_size
            total_blocks = self.kv.blocks_for(seq.context_len)
            if not self.kv.can_allocate(hits, total_blocks):
                break
            self.waiting.popleft()
            if seq.adapter is not None:
                if seq.adapter not in self.lora_slots:
                    self._load_adapter(seq.adapter)
                    loads += 1
                else:
                    self.lora_slots.move_to_end(seq.adapter)
            seq.blocks = self.kv.allocate(hits, total_blocks)
            seq.computed = hit_tokens
            if seq.scheduled_at is None:
                seq.scheduled_at = now
                seq.cached_tokens = hit_tokens
                self.stats.prefix_queries += seq.prompt.num_tokens
                self.stats.prefix_hits += hit_tokens
            self.running.append(seq)
            n = min(seq.context_len - seq.computed, budget)
            work.append((seq, n))
            budget -= n
            prefill_tokens += n
        for seq in reversed(skipped):
            self.waiting.appendleft(seq)
        if skipped or loads:
            self._lora_changed()

        if not work:
            return None
        duration = (cfg.step_time + cfg.prefill_time_per_token * prefill_tokens
                    + cfg.decode_time_per_seq * decode_seqs
                    + cfg.decode_time_per_kv_token * decode_ctx
                    + cfg.lora_load_time * loads)
        return work, duration

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Ensure `seq` has blocks for `tokens`; preempt the newest others if short."""
        need = self.kv.blocks_for(tokens) - len(seq.blocks)
        while need > 0:
            b = self.kv.append_block()
            if b is not None:
                seq.blocks.append(b)
                need -= 1
                continue
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.blocks)
        seq.blocks = []
        seq.computed = 0
        seq.committed = False
        seq.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(seq)
        self._lora_changed()

    def _lora_slot_available(self) -> bool:
        if len(self.lora_slots) < self.cfg.max_loras:
            return True
        busy = {s.adapter for s in self.running}
        return any(a not in busy for a in self.lora_slots)

    def _load_adapter(self, name: str) -> None:
        if len(self.lora_slots) >= self.cfg.max_loras:
            busy = {s.adapter for s in self.running}
            for a in self.lora_slots:  # least recently used first
                if a not in busy:
                    del self.lora_slots[a]
                    break
        self.lora_slots[name] = None
        self.stats.lora_loads += 1

    def evict_adapter(self, name: str) -> None:
        """Forget a resident adapter (it was unloaded); running requests keep using it."""
        self.lora_slots.pop(name, None)

    def _complete(self, work: list[tuple[Sequence, int]], end: float) -> None:
        """Apply one finished step: computed KV, emitted tokens, retirements."""
        self.stats.steps += 1
        tokens_in_step = 0
        emitted: list[tuple[Sequence, float]] = []
        finished: list[Sequence] = []
        for seq, n in work:
            if seq.finished or seq not in self.running:
                continue  # aborted during the step
            tokens_in_step += n
            seq.computed += n
            if seq.computed < seq.context_len:
                continue  # more prefill chunks to go
            if not seq.committed:  # the prompt's KV is now complete: cache its blocks
                self.kv.commit(seq.blocks, seq.prompt.block_hashes, seq.prompt.token_ids,
                               seq.adapter)
                seq.committed = True
            # a token is produced: the first one after prefill, or the next decode token
            gap = end - seq.last_token_at if seq.last_token_at is not None else -1.0
            if seq.first_token_at is None:
                seq.first_token_at = end
                self.stats.prompt_tokens += seq.prompt.num_tokens
            seq.generated += 1
            seq.last_token_at = end
            self.stats.generation_tokens += 1
            emitted.append((seq, gap))
            seq.changed.set()
            if seq.generated >= seq.max_tokens:
                finished.append(seq)
        for seq in finished:
            self.running.remove(seq)
            self.kv.free(seq.blocks)
            seq.blocks = []
            self._finish(seq, seq.finish_reason_at_end, end)
        if self.on_step is not None:
            self.on_step(tokens_in_step, emitted)
        if self.on_kv_events is not None:
            events = self.kv.take_events()
            if events:
                self.on_kv_events(events)
        if finished:
            self._lora_changed()

    def _finish(self, seq: Sequence, reason: str, at: float) -> None:
        if seq.finished:
            return
        seq.finish_reason = reason
        seq.finished_at = at
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        seq.changed.set()
        seq.done.set()
        if self.on_finish is not None:
            self.on_finish(seq)

    def _lora_changed(self) -> None:
        if self.on_lora_change is not None:
            self.on_lora_change()


def wall_clock() -> float:
    """Unix time, for the metrics that carry timestamps (lora_requests_info)."""
    return time.time()
