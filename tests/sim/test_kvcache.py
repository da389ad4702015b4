"""The paged KV cache: prefix hits, LRU eviction of free cached blocks, usage."""

from __future__ import annotations

from epp.sim.kvcache import KVCache
from epp.sim.tokens import text_prompt


def test_a_shared_prefix_is_found_block_by_block():
    kv = KVCache(num_blocks=16, block_size=4)
    a = text_prompt("x" * 16 * 3 + "tail-a", block_size=4)  # 3 full blocks of 16 chars
    b = text_prompt("x" * 16 * 2 + "y" * 16 + "tail-b", block_size=4)
    blocks = kv.allocate([], kv.blocks_for(a.num_tokens))
    kv.commit(blocks, a.block_hashes)
    assert len(kv.cached_prefix(a.block_hashes)) == 3
    assert len(kv.cached_prefix(b.block_hashes)) == 2  # diverges in the third block
    other_adapter = text_prompt("x" * 16 * 3, block_size=4, salt="food-review")
    assert kv.cached_prefix(other_adapter.block_hashes) == []


def test_usage_counts_held_blocks_only_and_freed_blocks_stay_cached():
    kv = KVCache(num_blocks=10, block_size=4)
    p = text_prompt("z" * 16 * 4, block_size=4)
    blocks = kv.allocate([], 4)
    kv.commit(blocks, p.block_hashes)
    assert kv.usage == 0.4
    kv.free(blocks)
    assert kv.usage == 0.0
    assert len(kv.cached_prefix(p.block_hashes)) == 4  # still findable
    hits = kv.cached_prefix(p.block_hashes)
    again = kv.allocate(hits, 5)  # reuse 4, take 1 fresh
    assert again[:4] == blocks
    assert kv.usage == 0.5


def test_least_recently_freed_blocks_are_evicted_first_tail_before_head():
    kv = KVCache(num_blocks=4, block_size=4)
    old = text_prompt("o" * 16 * 2, block_size=4)
    new = text_prompt("n" * 16 * 2, block_size=4)
    b_old = kv.allocate([], 2)
    kv.commit(b_old, old.block_hashes)
    kv.free(b_old)
    b_new = kv.allocate([], 2)  # takes the two never-used blocks
    kv.commit(b_new, new.block_hashes)
    kv.free(b_new)
    kv.allocate([], 1)  # one more block: evicts the old prompt's *last* block
    assert len(kv.cached_prefix(old.block_hashes)) == 1
    assert len(kv.cached_prefix(new.block_hashes)) == 2


def test_allocation_refuses_when_short():
    kv = KVCache(num_blocks=3, block_size=4)
    kv.allocate([], 2)
    assert not kv.can_allocate([], 2)
    assert kv.append_block() is not None
    assert kv.append_block() is None
