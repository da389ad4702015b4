"""The yardstick router: perfect knowledge of every simulated pod, deciding and enqueuing at once.

It runs inside the simulated fleet's process (`fleet_proc.py --oracle`) and serves
`/v1/completions` on its own port. For each request it reads every engine's true state
(its KV cache's prefix hashes, its waiting and running sequences, its adapter slots),
estimates when the request would *finish* on each pod, and hands the request to the
best pod's HTTP handler in the same event-loop turn. Nothing can happen between the
reading and the enqueue, so a burst cannot all read the same state (the EPP, which sees
metrics up to one scrape interval old, can). No network hop to the pod either; Envoy
still sits in front of it in the benchmark, as for every other strategy.

Policy (greedy per request: the pod with the least estimated cost, where cost = the
request's estimated TTFT there + 3 x the seconds of uncached prefill it would add there;
see DEFAULT_OBJECTIVE for why not plain completion time), per pod:

- cached = the longer of the prefix the pod's KV cache holds now and the longest prefix
  shared with a sequence already queued or running there (that one computes and caches
  it first: vLLM schedules first come, first served);
- prefill ahead = the uncached prompt tokens of the waiting sequences (each estimated
  once, when first seen) plus the prefill still left of the running ones, plus ours;
- batch wait = when the pod already holds `max_num_seqs` sequences, the time until
  enough running sequences finish (their remaining tokens, sorted);
- a step costs the engine's own cost model (step_time + per-sequence and per-KV-token
  decode costs at the batch size we would join) and prefill runs through the per-step
  token budget at `prefill_time_per_token`;
- TTFT = max(prefill ahead, batch wait) + an adapter load when the adapter is not in a
  GPU slot (+ a full swap's worth when every slot is busy) + one step; completion = TTFT
  + max_tokens steps. Too few free KV blocks adds the time to drain one batch.

Ties (within 1 ms) go to the pod with the longer cached prefix, then the shorter queue.
The estimate is the simulator's own cost model read from its true state. It is still a
greedy heuristic, not an optimum: it does not look ahead at future arrivals, and the
penalty for a miss (3 x its prefill) stands in for the delay it causes later requests
and the cache it takes from others. Plain least completion time (`completion`) or least
TTFT (`ttft`) are weaker on shared prefixes: at moderate load they spread each group to
idle pods, where its prefix is recomputed (desim.py: 1.2 s p90 TTFT against 0.1 s).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from epp.scheduling.speculative import common_run
from epp.sim.engine import Engine, Sequence
from epp.sim.server import REPLICA_HEADER, ApiError, Replica
from epp.sim.tokens import Prompt, text_prompt

_EST = "_oracle_uncached"  # attribute set on a Sequence: its estimated uncached tokens


@dataclass
class Estimate:
    replica: str
    completion: float
    ttft: float
    cached_tokens: int
    queued: int
    work: float
    """Engine seconds of this request's own uncached prefill on the pod."""


def _uncached(engine: Engine, seq: Sequence) -> int:
    est = getattr(seq, _EST, None)
    if est is None:
        hit = len(engine.kv.cached_prefix(seq.prompt.block_hashes)) * engine.cfg.block_size
        est = max(1, seq.prompt.num_tokens - hit)
        setattr(seq, _EST, est)
    return est


def estimate(e: Engine, prompt: Prompt, max_tokens: int, adapter: str | None) -> Estimate:
    """When a request would get its first token and finish on engine `e` (see the module)."""
    cfg = e.cfg
    bs = cfg.block_size
    hashes = prompt.block_hashes
    cached_blocks = len(e.kv.cached_prefix(hashes))
    ahead = 0
    remaining: list[int] = []
    ctx = 0
    for s in e.running:
        left = s.context_len - s.computed
        if s.generated == 0 or left > 1:
            ahead += left
        remaining.append(max(1, s.max_tokens - s.generated))
        ctx += s.context_len
        if hashes and s.prompt.block_hashes[:1] == hashes[:1]:
            cached_blocks = max(cached_blocks, common_run(s.prompt.block_hashes, hashes))
    for s in e.waiting:
        ahead += _uncached(e, s)
        ctx += s.prompt.num_tokens
        if hashes and s.prompt.block_hashes[:1] == hashes[:1]:
            cached_blocks = max(cached_blocks, common_run(s.prompt.block_hashes, hashes))
    cached = min(cached_blocks * bs, prompt.num_tokens - 1)
    mine = prompt.num_tokens - cached
    batch = min(len(e.running) + len(e.waiting) + 1, cfg.max_num_seqs)
    share = batch / max(1, len(e.running) + len(e.waiting) + 1)
    step = (cfg.step_time + cfg.decode_time_per_seq * batch
            + cfg.decode_time_per_kv_token * (ctx * share + prompt.num_tokens))
    budget = max(1, cfg.max_num_batched_tokens - batch)
    prefill_tokens = ahead + mine
    prefill = (math.ceil(prefill_tokens / budget) * step
               + prefill_tokens * cfg.prefill_time_per_token)
    # Sequences ahead of us beyond the batch limit: we start when `over` running ones end.
    over = len(e.running) + len(e.waiting) + 1 - cfg.max_num_seqs
    slot_wait = 0.0
    if over > 0 and remaining:
        remaining.sort()
        if over <= len(remaining):
            slot_wait = remaining[over - 1] * step
        else:  # more than a whole batch waits: one more batch of max_tokens per batch
            rounds = math.ceil((over - len(remaining)) / cfg.max_num_seqs)
            slot_wait = (remaining[-1] + rounds * max_tokens) * step
    lora = 0.0
    if adapter is not None and adapter not in e.lora_slots:
        lora = cfg.lora_load_time
        if len(e.lora_slots) >= cfg.max_loras and all(
                a in {s.adapter for s in e.running} for a in e.lora_slots):
            lora += (min(remaining) if remaining else 0) * step
    need = e.kv.blocks_for(prompt.num_tokens + max_tokens) - cached_blocks
    kv_wait = max_tokens * step if need > e.kv.num_free else 0.0
    ttft = max(prefill, slot_wait, kv_wait) + lora + step
    return Estimate(cfg.name, ttft + max_tokens * step, ttft, cached,
                    len(e.waiting) + len(e.running), mine * cfg.prefill_time_per_token)


DEFAULT_OBJECTIVE = "ttft+work*3"
"""Estimated TTFT plus 3 x the request's own uncached prefill time: a cache miss also
delays everything queued behind it on that pod and makes a copy of the prefix that later
requests may never use. Measured with desim.py against the alternatives ("ttft",
"completion", other multipliers): the strongest on both shared-prefix shapes and equal
to "ttft" on multi-LoRA (unique prompts cost the same prefill everywhere)."""


def best(engines: list[Engine], prompt_text: str, model: str | None, max_tokens: int,
         adapters: list[set[str] | dict[str, str]], objective: str = DEFAULT_OBJECTIVE) -> int:
    """Index of the engine with the least estimated `objective` (ties: longer cached
    prefix, then fewer queued); `adapters[i]`: the adapter names engine i serves.

    Objectives: "ttft", "completion" (TTFT + max_tokens decode steps), "ttft+work*K"
    (TTFT + K x own uncached prefill seconds)."""
    ranked: tuple[float, int, int, int] | None = None
    prompts: dict[tuple[int, str], Prompt] = {}
    for i, e in enumerate(engines):
        adapter = model if model is not None and model in adapters[i] else None
        key = (e.cfg.block_size, adapter or "")
        p = prompts.get(key)
        if p is None:
            p = prompts[key] = text_prompt(prompt_text, e.cfg.block_size, adapter or "")
        est = estimate(e, p, max_tokens, adapter)
        if objective.startswith("ttft+work"):
            t = est.ttft + float(objective.partition("*")[2] or 1) * est.work
        else:
            t = est.ttft if objective == "ttft" else est.completion
        rank = (round(t, 3), -est.cached_tokens, est.queued, i)
        if ranked is None or rank < ranked:
            ranked = rank
    assert ranked is not None
    return ranked[3]


class OracleRouter:
    """`/v1/completions` on `port`, dispatched in-process to the fleet's replicas."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self.picks: dict[str, int] = {r.name: 0 for r in replicas}
        self._runner: web.AppRunner | None = None
        self.port = 0

    def choose(self, body: dict[str, Any]) -> Replica:
        prompt_text = body.get("prompt")
        if isinstance(prompt_text, list) and len(prompt_text) == 1:
            prompt_text = prompt_text[0]
        if not isinstance(prompt_text, str):
            return self.replicas[0]  # its handler answers the bad request
        model = body.get("model")
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            max_tokens = 16
        i = best([r.engine for r in self.replicas], prompt_text,
                 model if isinstance(model, str) else None, max_tokens,
                 [r.adapters for r in self.replicas])
        return self.replicas[i]

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()  # aiohttp keeps it: the replica's handler re-reads it
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        replica = self.choose(body if isinstance(body, dict) else {}) if self.replicas else None
        if replica is None:
            raise web.HTTPServiceUnavailable()
        self.picks[replica.name] += 1
        request[REPLICA_HEADER] = replica.name
        # No await that can suspend before the replica's engine.submit(): read() is cached.
        try:
            return await replica._completions(request)
        except ApiError as e:
            return e.response()

    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        name = request.get(REPLICA_HEADER)
        if name:
            response.headers[REPLICA_HEADER] = name

    async def start(self, host: str = "127.0.0.1") -> int:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/completions", self._completions)
        app.on_response_prepare.append(self._stamp)
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, host, 0, reuse_address=True)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
