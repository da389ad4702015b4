"""The simulator's KV cache reports what vLLM's would: stored blocks with their tokens and
parent, evictions, resets. (Publishing them over ZeroMQ, replay included, is exercised by
tests/unit/test_kvevents_stream.py and the e2e test with a real Envoy.)

No cross-check against llm-d-inference-sim v0.10.2's events: it has `--enable-kvcache`,
`--zmq-endpoint` (its PUB socket connects there, so the consumer binds) and
`--use-vllm-map-event-format`, and needs `POD_IP` set; run offline with
`--force-dummy-tokenizer` (no tokenizer download is possible here) it served completions,
but no event batch reached a SUB socket bound at its `--zmq-endpoint` within 3 s after three
requests, in either event format (tried 2026-12-02). Why was not found in the time
available; the decoding tests use fixtures built from vLLM's documented layouts instead.
"""

from __future__ import annotations

from epp.kvevents.decode import AllBlocksCleared, BlockRemoved, BlockStored
from epp.sim.kvcache import KVCache


def test_store_evict_and_reset_events() -> None:
    kv = KVCache(num_blocks=4, block_size=2)
    kv.events = []
    tokens = [1, 2, 3, 4, 5]  # two full blocks and a partial one
    blocks = kv.allocate([], 3)
    kv.commit(blocks, (11, 12), tokens, "food-review")
    (ev,) = kv.take_events()
    assert isinstance(ev, BlockStored)
    assert (ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size,
            ev.lora_name, ev.medium) == ([11, 12], None, [1, 2, 3, 4], 2, "food-review", "GPU")
    kv.free(blocks)
    # A prompt sharing block 11 stores only its new block, with 11 as the parent.
    hit = kv.cached_prefix((11, 13))
    blocks2 = kv.allocate(hit, 2)
    kv.commit(blocks2, (11, 13), [1, 2, 9, 9])
    (ev,) = kv.take_events()
    assert (ev.block_hashes, ev.parent_block_hash, ev.token_ids) == ([13], 11, [9, 9])
    kv.free(blocks2)
    # Allocating every block evicts the cached ones, least recently freed first.
    kv.allocate([], 4)
    removed = kv.take_events()
    assert len(removed) == 1 and isinstance(removed[0], BlockRemoved)
    assert sorted(removed[0].block_hashes) == [11, 12, 13]
    kv.reset_prefix_cache()
    assert [type(e) for e in kv.take_events()] == [AllBlocksCleared]
    assert kv.take_events() == []


def test_no_events_unless_recording() -> None:
    kv = KVCache(num_blocks=4, block_size=2)
    kv.commit(kv.allocate([], 1), (1,), [1, 2])
    assert kv.events is None and kv.take_events() == []
