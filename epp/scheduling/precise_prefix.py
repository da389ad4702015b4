"""`precise-prefix-cache-scorer`: prefix-cache affinity from what the model servers report.

The approximate `prefix-cache-scorer` guesses which endpoint holds a prompt's KV blocks
from where the EPP sent it, and cannot see evictions. This scorer reads the engines' own
KV-cache events (`epp.kvevents`), tokenizes the request as the engine will
(`epp.tokenization`), keys its blocks the same way the index keys the engines' blocks, and
scores each endpoint by the longest run of leading blocks it really holds / the prompt's
blocks.

"Unknown" is never scored as "holds nothing": for an endpoint whose event stream is not
healthy (not connected yet, publisher gone, block size mismatch) the score is the
approximate scorer's for that endpoint, and for a request whose model has no usable
tokenizer (none configured, file missing or corrupt, no chat template) the whole request
is scored by the approximate scorer; each reason is counted in
`inference_extension_precise_prefix_fallbacks_total` and logged once. The approximate
index keeps learning from picks for that purpose.

Parameters:

```yaml
- type: precise-prefix-cache-scorer
  parameters:
    blockSize: 16                  # tokens per KV block; must equal the engines' --block-size
    maxPrefixBlocksToMatch: 256
    kvEventsPort: 5557             # per endpoint override: label kv-events.epp/port
    kvEventsReplayPort: 5558       # 0: engines have no replay socket; label kv-events.epp/replay-port
    maxIndexedBlocks: 2000000      # (block, endpoint) entries, LRU beyond
    speculativeTTLSeconds: 10      # a pick's blocks count as held until events confirm them
    coldPromptScore: 0.3           # a prompt no endpoint holds: this for the least loaded one
    coldPromptThreshold: 0.5       # "holds": this share of the prompt's blocks
    prefillTokensPerRequest: 800   # cold placement's load unit; 0: count queued requests
    tokenizers:                    # model name -> directory with tokenizer.json
      meta-llama/Llama-3.1-8B-Instruct: /models/llama-3.1-8b
```

A prompt no endpoint holds (`coldPromptThreshold`) is a full prefill wherever it goes;
the endpoint `coldplace.least_loaded` names gets `coldPromptScore` for it: the one with the
least prefill work pending (`prefill.prefill_load`: the tokens this EPP sent it that it did
not hold, until the engine's events show them stored, in units of
`prefillTokensPerRequest`, plus other waiting requests), ties broken by a rendezvous hash
that every EPP replica computes alike.

Two ways to get the events. By default (above) the EPP connects a SUB socket to every
endpoint at `kvEventsPort`, where vLLM binds (`"endpoint": "tcp://*:5557"`,
`epp.kvevents.subscriber`). With `kvEventsConfig.zmqEndpoint` (llm-d's parameter names
and defaults) the EPP binds one SUB socket and every engine connects to it, naming itself
in the topic (`"endpoint": "tcp://<epp>:5557", "topic": "kv@<pod-ip>@<model>"`,
`epp.kvevents.bound`); `kvEventsPort` then does not apply, and replay is used only when
`kvEventsReplayPort` is set:

```yaml
- type: precise-prefix-cache-scorer
  parameters:
    blockSize: 16
    kvEventsConfig:
      zmqEndpoint: tcp://*:5557    # bound by the EPP
      topicFilter: kv@             # subscription prefix; topics are kv@<pod-ip>@<model>
    tokenizers:
      meta-llama/Llama-3.1-8B-Instruct: /models/llama-3.1-8b
```
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import numpy as np

from epp import observability as obs
from epp.datastore import Snapshot
from epp.kvevents.bound import DEFAULT_TOPIC_FILTER, BoundKVEventsSubscriber
from epp.kvevents.index import DEFAULT_MAX_ENTRIES, KVBlockIndex, block_keys, root_key
from epp.kvevents.subscriber import DEFAULT_PORT, DEFAULT_REPLAY_PORT, KVEventsSubscriber
from epp.plugins import check_params, param_float, param_int
from epp.scheduling import prefix as _prefix
from epp.scheduling.coldplace import least_loaded
from epp.scheduling.cycle import CycleState
from epp.scheduling.interface import SchedulingRequest
from epp.scheduling.prefill import DEFAULT_TOKENS_PER_REQUEST, PendingPrefills, prefill_load
from epp.scheduling.prefix import PrefixHomes
from epp.scheduling.scorers import (Load, PrefixCacheScorer, load_discount, lora_affinity,
                                    prefer_home, queued_load)
from epp.scheduling.speculative import SpeculativePicks
from epp.tokenization import TokenizerError, TokenizerPool, prompt_of

log = logging.getLogger(__name__)

SPECULATIVE_TTL = 10.0
"""Seconds a pick's blocks count as held on its endpoint before the engine's events
must confirm them: blocks are stored only when the prefill ends, which under load (a
queue, chunked prefill of a long prompt) takes seconds."""

COLD_PROMPT_SCORE = 0.3
"""The score (of 1) a cold prompt gives the endpoint `coldplace.least_loaded` names (among
the candidates with the best LoRA affinity); 0 turns cold placement off. At the default
weights (prefix 3, queue 2, KV 2, LoRA 1) its 0.9 outweighs KV-utilization differences
up to 0.45."""

COLD_PROMPT_THRESHOLD = 0.5
"""A prompt is cold when no candidate holds this share of its blocks."""


KV_EVENTS_CONFIG_KEYS = ("zmqEndpoint", "topicFilter")
_BIND = re.compile(r"tcp://(\*|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})|ipc://.+")


def _kv_events_config(params: Mapping[str, Any]) -> tuple[str, str] | None:
    """(bind address, topic filter) from `kvEventsConfig`, or None for the connect mode."""
    kv = params.get("kvEventsConfig")
    if kv is None:
        return None
    if not isinstance(kv, Mapping):
        raise ValueError("parameter 'kvEventsConfig' must be a mapping: "
                         "{zmqEndpoint: tcp://*:5557, topicFilter: kv@}")
    unknown = sorted(set(kv) - set(KV_EVENTS_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"kvEventsConfig: unknown key(s) {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(KV_EVENTS_CONFIG_KEYS)}; without zmqEndpoint "
                         f"the EPP connects to each endpoint at kvEventsPort)")
    bind = kv.get("zmqEndpoint")
    if not isinstance(bind, str) or not bind:
        raise ValueError("kvEventsConfig.zmqEndpoint is required: the address the EPP binds "
                         "for engines to publish to, such as tcp://*:5557")
    m = _BIND.fullmatch(bind)
    if m is None or (m.group(2) is not None and not 0 < int(m.group(2)) < 65536):
        raise ValueError(f"kvEventsConfig.zmqEndpoint must be tcp://<host, IP or *>:<port 1-65535>"
                         f" or ipc://<path>, got {bind!r}")
    topic = kv.get("topicFilter", DEFAULT_TOPIC_FILTER)
    if not isinstance(topic, str):
        raise ValueError(f"kvEventsConfig.topicFilter must be a string, got {topic!r}")
    if "kvEventsPort" in params:
        raise ValueError("kvEventsPort is where the EPP connects to each engine; with "
                         "kvEventsConfig.zmqEndpoint the engines connect to the EPP instead: "
                         "set one of them")
    return bind, topic


class _Fallback:
    """Why a request could not be scored precisely (a metric label value)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


_GIVEN = object()
"""Stands for the tokenizer when the request carries its token ids itself."""


def _token_id_prompt(req: SchedulingRequest) -> list[int] | None:
    """A completions prompt given as token ids (vLLM uses them as they are)."""
    if req.api != "completions" or req.body is None:
        return None
    p = req.body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], list):
        p = p[0]
    if isinstance(p, list) and p and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**63 for t in p):
        return p
    return None


class PrecisePrefixCacheScorer:
    """Leading KV blocks an endpoint reports holding / blocks in the prompt."""

    plugin_type = "precise-prefix-cache-scorer"
    bounded = True
    PARAMS = ("blockSize", "maxPrefixBlocksToMatch", "kvEventsPort", "kvEventsReplayPort",
              "maxIndexedBlocks", "tokenizers", "speculativeTTLSeconds", "kvEventsConfig",
              "coldPromptScore", "coldPromptThreshold", "prefillTokensPerRequest")

    def __init__(
        self,
        name: str = "precise-prefix-cache-scorer",
        *,
        block_size: int = _prefix.DEFAULT_BLOCK_TOKENS,
        max_blocks: int = _prefix.DEFAULT_MAX_BLOCKS,
        port: int = DEFAULT_PORT,
        replay_port: int = DEFAULT_REPLAY_PORT,
        max_indexed_blocks: int = DEFAULT_MAX_ENTRIES,
        tokenizers: Mapping[str, str] | None = None,
        replay_timeout: float = 0.5,
        speculative_ttl: float = SPECULATIVE_TTL,
        kv_events_bind: str | None = None,
        topic_filter: str = DEFAULT_TOPIC_FILTER,
        cold_score: float = COLD_PROMPT_SCORE,
        cold_threshold: float = COLD_PROMPT_THRESHOLD,
        tokens_per_request: float = DEFAULT_TOKENS_PER_REQUEST,
    ) -> None:
        self.name = name
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.index = KVBlockIndex(max_indexed_blocks)
        self.subscriber: KVEventsSubscriber
        if kv_events_bind is not None:  # engines connect to us (llm-d's deployment)
            self.subscriber = BoundKVEventsSubscriber(
                self.index, block_size=block_size, bind=kv_events_bind,
                topic_filter=topic_filter, replay_port=replay_port,
                replay_timeout=replay_timeout)
        else:  # we connect to each engine
            self.subscriber = KVEventsSubscriber(self.index, block_size=block_size, port=port,
                                                 replay_port=replay_port,
                                                 replay_timeout=replay_timeout)
        self.tokenizers = TokenizerPool(tokenizers or {})
        for err in self.tokenizers.load_all().values():
            obs.PRECISE_PREFIX_FALLBACKS.labels(err.reason).inc(0)  # the series exists at once
        self.approx = PrefixCacheScorer(f"{name}/approximate", block_tokens=block_size,
                                        max_blocks=max_blocks)
        """The fallback for endpoints and models we cannot score precisely; it learns
        only their picks (`post_pick`)."""
        self.homes = PrefixHomes()
        """Prompt group (its first block key) -> home endpoint, as the approximate
        scorer keeps it."""
        self._said: set[str] = set()
        self._view: Any = None
        self.speculative = SpeculativePicks(speculative_ttl)
        """Recent picks, until the engine's events confirm them (or not): a burst of one
        prompt then goes where its first request went, instead of being spread before
        the first one's blocks are stored."""
        self.speculative_ttl = speculative_ttl
        self.subscriber.on_stored = self.blocks_stored
        self.cold_score = cold_score
        self.cold_threshold = cold_threshold
        self.tokens_per_request = tokens_per_request
        self.pending = PendingPrefills(speculative_ttl if tokens_per_request > 0 else 0.0)
        """Prefill work sent to each endpoint and not yet reported done: cold placement's
        load (`prefill.prefill_load`)."""

    @classmethod
    def from_params(cls, name: str, params: dict[str, Any]) -> "PrecisePrefixCacheScorer":
        check_params(params, cls.PARAMS)
        toks = params.get("tokenizers") or {}
        if not isinstance(toks, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) and k and v for k, v in toks.items()):
            raise ValueError("parameter 'tokenizers' must map model names to directories")
        bound = _kv_events_config(params)
        port = param_int(params, "kvEventsPort", DEFAULT_PORT, minimum=1)
        # Bound: engines deployed llm-d's way usually have no replay socket; ask only if told.
        replay = param_int(params, "kvEventsReplayPort",
                           DEFAULT_REPLAY_PORT if bound is None else 0, minimum=0)
        if port > 65535 or replay > 65535:
            raise ValueError("kvEventsPort and kvEventsReplayPort must be <= 65535")
        return cls(
            name,
            block_size=param_int(params, "blockSize", _prefix.DEFAULT_BLOCK_TOKENS, minimum=1),
            max_blocks=param_int(params, "maxPrefixBlocksToMatch", _prefix.DEFAULT_MAX_BLOCKS,
                                 minimum=1),
            port=port,
            replay_port=replay,
            max_indexed_blocks=param_int(params, "maxIndexedBlocks", DEFAULT_MAX_ENTRIES,
                                         minimum=1),
            tokenizers=dict(toks),
            speculative_ttl=param_float(params, "speculativeTTLSeconds", SPECULATIVE_TTL,
                                        minimum=0.0, maximum=3600.0),
            kv_events_bind=bound[0] if bound is not None else None,
            topic_filter=bound[1] if bound is not None else DEFAULT_TOPIC_FILTER,
            cold_score=param_float(params, "coldPromptScore", COLD_PROMPT_SCORE,
                                   minimum=0.0, maximum=1.0),
            cold_threshold=param_float(params, "coldPromptThreshold", COLD_PROMPT_THRESHOLD,
                                       minimum=0.0, maximum=1.0),
            tokens_per_request=param_float(params, "prefillTokensPerRequest",
                                           DEFAULT_TOKENS_PER_REQUEST, minimum=0.0),
        )

    # -- lifecycle (the app starts and stops it) ------------------------------------

    async def start_background(self, datastore: Any) -> None:
        await self.subscriber.start(datastore)

    async def stop(self) -> None:
        await self.subscriber.stop()
        self.tokenizers.close()

    # -- tokens ----------------------------------------------------------------------

    def _prompt(self, req: SchedulingRequest) -> tuple[Any, Any] | _Fallback:
        ids = _token_id_prompt(req)
        if ids is not None:
            return _GIVEN, ids
        try:
            tok = self.tokenizers.get(req.target_model)
            prompt = prompt_of(tok, req.api, req.body)
        except TokenizerError as e:
            return self._fallback(e.reason, req.target_model)
        if prompt is None or not prompt.text:
            return self._fallback("no_text", req.target_model)
        return tok, prompt

    async def prepare_request_data(self, req: SchedulingRequest) -> None:
        """Tokenize before the (synchronous) cycle, long prompts off the event loop."""
        got = self._prompt(req)
        if isinstance(got, _Fallback):
            req.prepared[self.name] = got
            return
        tok, prompt = got
        if tok is _GIVEN:
            req.prepared[self.name] = prompt
            return
        try:
            req.prepared[self.name] = await self.tokenizers.encode_async(req.target_model, prompt)
        except TokenizerError as e:
            req.prepared[self.name] = self._fallback(e.reason, req.target_model)

    def tokens(self, req: SchedulingRequest) -> list[int] | _Fallback:
        """The request's token ids (prepared, or computed now for a dry run)."""
        v = req.prepared.get(self.name)
        if v is not None:
            return v  # type: ignore[no-any-return]
        got = self._prompt(req)
        if isinstance(got, _Fallback):
            v = got
        elif got[0] is _GIVEN:
            v = got[1]
        else:
            try:
                v = self.tokenizers.encode(req.target_model, got[1])
            except TokenizerError as e:
                v = self._fallback(e.reason, req.target_model)
        req.prepared[self.name] = v
        return v

    def _fallback(self, reason: str, model: str) -> _Fallback:
        obs.PRECISE_PREFIX_FALLBACKS.labels(reason).inc()
        if reason not in self._said:
            self._said.add(reason)
            log.warning("%s: scoring requests for model %r with the approximate prefix "
                        "index (%s); said once per reason", self.name, model[:200], reason)
        return _Fallback(reason)

    # -- scoring ---------------------------------------------------------------------

    def keys(self, state: CycleState, lora: str | None) -> list[int]:
        ids = self.tokens(state.request)
        assert not isinstance(ids, _Fallback)
        return state.memo(  # type: ignore[no-any-return]
            ("precise-keys", id(self), lora),
            lambda: block_keys(ids, self.block_size, root_key(lora), self.max_blocks))

    def match_scores(self, state: CycleState) -> np.ndarray | None:
        """Full-pool scores for this request, or None when it falls back entirely."""
        return state.memo(("precise-scores", id(self)), lambda: self._match_scores(state))  # type: ignore[no-any-return]

    def _match_scores(self, state: CycleState) -> np.ndarray | None:
        if isinstance(self.tokens(state.request), _Fallback):
            return None
        now = state.now
        self.speculative.expire(now)
        snap: Snapshot = state.snapshot
        by_name = snap.by_name
        unknown, base = self._pool_view(state)
        out = np.zeros(len(snap))
        for lora, members in ((None, base), (state.request.target_model, ~base)):
            if not members.any():
                continue
            keys = self.keys(state, lora)
            if not keys:
                continue
            total = len(keys)
            for name, k in self.index.match(keys).items():
                i = by_name.get(name)
                if i is not None and members[i]:
                    out[i] = k / total
            if self.speculative:
                for name, k in self.speculative.match(keys, now, self.index.holds).items():
                    i = by_name.get(name)
                    if i is not None and members[i] and k / total > out[i]:
                        out[i] = k / total
        if unknown.any():
            out[unknown] = 0.0
            approx = self.approx.match_scores(state)
            if approx is not None:
                out[unknown] = approx[unknown]
        return out

    def _pool_view(self, state: CycleState) -> tuple[np.ndarray, np.ndarray]:
        """Per endpoint: stream unknown (not healthy); request runs on the base model there
        (else under the adapter it names). Cached per snapshot, health and model."""
        snap: Snapshot = state.snapshot
        model = state.request.target_model
        key = (id(snap), self.subscriber.health_version, model)
        cached = self._view
        if cached is not None and cached[0] == key and cached[1] is snap:
            return cached[2]
        healthy = self.subscriber.healthy
        unknown = np.fromiter((not healthy(e.name) for e in snap.endpoints), np.bool_, len(snap))
        base = np.fromiter((self._is_base(snap, i, model) for i in range(len(snap))),
                           np.bool_, len(snap))
        self._view = (key, snap, (unknown, base))
        return unknown, base

    def _is_base(self, snap: Snapshot, i: int, model: str) -> bool:
        """Whether a request for `model` runs on endpoint i's base model (no adapter)."""
        models = snap.models[i] if snap.models else frozenset()
        if model in models:
            return True
        return not models and model in self.tokenizers.paths

    # -- learning --------------------------------------------------------------------

    def post_pick(self, state: CycleState, index: int) -> None:
        """The picked endpoint will store this prompt's blocks: count them as held there
        for `speculative_ttl` seconds, and settle the group's home. The approximate
        index learns the pick only where it is the fallback."""
        name = state.snapshot.endpoints[index].name
        if isinstance(self.tokens(state.request), _Fallback):
            self.approx.post_pick(state, index)
            return
        if not self.subscriber.healthy(name):
            self.approx.post_pick(state, index)
        _unknown, base = self._pool_view(state)
        keys = self.keys(state, None if base[index] else state.request.target_model)
        if not keys:
            return
        self.speculative.record(name, keys, state.now)
        full = self.match_scores(state)
        if self.tokens_per_request > 0 and self.subscriber.healthy(name):
            held = int(round(full[index] * len(keys))) if full is not None else 0
            ids = self.tokens(state.request)
            self.pending.record(name, max(len(ids) - held * self.block_size, 0),  # type: ignore[arg-type]
                                keys[-1], state.now)
        if self.approx.hit_queue_worth > 0:
            endpoints = state.snapshot.endpoints
            holders = ([endpoints[i].name for i in np.flatnonzero(full)]
                       if full is not None else ())
            group = self._group(state)
            if group is not None:
                self.homes.settle(group, name, holders, state.request.request_id)

    def blocks_stored(self, name: str) -> None:
        """The intake applied events that stored blocks on `name`: the picks there whose
        blocks are now in the index are settled (`SpeculativePicks.settle`)."""
        if self.speculative:
            self.speculative.settle(name, self.index.holds)
        self.pending.settle(name, self.index.holds)

    def forget_endpoint(self, name: str) -> None:
        self.speculative.forget(name)
        self.pending.forget(name)
        self.approx.forget_endpoint(name)

    def score(self, state: CycleState, candidates: np.ndarray) -> np.ndarray:
        full = self.match_scores(state)
        if full is None:
            return self.approx.score(state, candidates)
        s = state.take(full, candidates)
        held = float(s.max(initial=0.0))
        approx = self.approx
        if approx.hit_queue_worth > 0 and s.any():
            # The same load-aware policy as the approximate scorer (docs/scoring.md): a
            # holder far busier than the best alternative has nothing left to offer, and
            # the group's home wins among equal holders.
            s = s * load_discount(queued_load(state, candidates, approx.running_weight),
                                  approx.hit_queue_worth)
            group = self._group(state)
            home = self.homes.get(group) if group is not None else None
            i = state.snapshot.by_name.get(home) if home is not None else None
            if i is not None and full[i] > 0:  # only a home that still holds the group
                prefer_home(state, candidates, s, home)
        if held < self.cold_threshold and self.cold_score > 0:
            s = self._place_cold(state, candidates, s, held)
        return s

    def _cold_load(self, state: CycleState, candidates: np.ndarray) -> Load:
        """Per candidate, the load cold placement compares: prefill work pending."""
        rw = self.approx.running_weight
        if self.tokens_per_request > 0:
            return prefill_load(state, candidates, self.pending, self.tokens_per_request, rw)
        return queued_load(state, candidates, rw)

    def _place_cold(self, state: CycleState, candidates: np.ndarray, s: np.ndarray,
                    held: float) -> np.ndarray:
        """A prompt no candidate holds `coldPromptThreshold` of: `coldPromptScore` for the
        endpoint `coldplace.least_loaded` names, keyed by the first block nobody holds
        (the same on every replica)."""
        keys = self.keys(state, None)
        if not keys:
            return s
        key = keys[min(int(round(held * len(keys))), len(keys) - 1)]
        # Only among the candidates that serve the request's adapter best (all of them
        # for a base-model request): a cold prompt is no reason to load an adapter.
        affinity = state.take(lora_affinity(state), candidates)
        best = np.flatnonzero(affinity == affinity.max())
        whole = len(best) == len(candidates)
        among = candidates if whole else candidates[best]
        j = least_loaded(state, among, key, self._cold_load(state, among))
        if j is None:
            return s
        if not whole:
            j = int(best[j])
        s = s.copy()
        s[j] = max(s[j], self.cold_score)
        return s

    def _group(self, state: CycleState) -> int | None:
        """The request's prompt group: the key of its first block on the base model."""
        ids = self.tokens(state.request)
        assert not isinstance(ids, _Fallback)
        first = state.memo(("precise-group", id(self)),
                           lambda: block_keys(ids, self.block_size, root_key(None), 1))
        return first[0] if first else None
