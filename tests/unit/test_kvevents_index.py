"""The KV-event block index: our own chained keys, engine-hash translation, LoRA, eviction."""

from __future__ import annotations

import pytest

from epp.kvevents.decode import AllBlocksCleared, BlockRemoved, BlockStored
from epp.kvevents.index import KVBlockIndex, block_keys, root_key

pytestmark = pytest.mark.usefixtures("kv_backend")  # each test over both index implementations

BS = 4
SYSTEM = list(range(1, 13))      # 3 blocks
TAIL_A = list(range(100, 108))   # 2 blocks
TAIL_B = list(range(200, 208))


def keys(tokens: list[int], lora: str | None = None) -> list[int]:
    return block_keys(tokens, BS, root_key(lora))


def stored(hashes: list[int], tokens: list[int], parent: int | None = None,
           lora: str | None = None, **kw: object) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens,
                       block_size=BS, medium="GPU", lora_name=lora, **kw)  # type: ignore[arg-type]


def test_keys_are_chained_and_independent_of_engine_hashes() -> None:
    ks = keys(SYSTEM + TAIL_A + [1, 2])  # a trailing partial block is ignored
    assert len(ks) == 5
    assert keys(SYSTEM + TAIL_B)[:3] == ks[:3]  # shared prefix, shared keys
    assert keys(SYSTEM + TAIL_B)[3] != ks[3]
    assert keys(TAIL_A + SYSTEM)[0] != ks[0]
    assert keys(SYSTEM, lora="food-review")[0] != ks[0]  # another adapter, another block
    assert block_keys(SYSTEM, BS, root_key(None), max_blocks=2) == ks[:2]

    # Two engines with unrelated hash functions land on the same keys.
    idx = KVBlockIndex()
    idx.apply("a", [stored([11, 12, 13], SYSTEM)])
    idx.apply("b", [stored([0xDEAD, 0xBEEF], SYSTEM[:8]), stored([7], SYSTEM[8:], parent=0xBEEF)])
    assert idx.match(ks) == {"a": 3, "b": 3}


def test_longest_leading_run_per_endpoint() -> None:
    idx = KVBlockIndex()
    idx.apply("a", [stored([1, 2, 3], SYSTEM), stored([4, 5], TAIL_A, parent=3)])
    idx.apply("b", [stored([1, 2, 3], SYSTEM), stored([6, 7], TAIL_B, parent=3)])
    idx.apply("c", [stored([1], SYSTEM[:4])])
    assert idx.match(keys(SYSTEM + TAIL_A)) == {"a": 5, "b": 3, "c": 1}
    assert idx.match(keys(SYSTEM + TAIL_B)) == {"a": 3, "b": 5, "c": 1}
    assert idx.match(keys(TAIL_A)) == {}
    assert idx.match([]) == {}
    # A hole: "a" lost its second block; the run stops there even though later ones stay.
    idx.apply("a", [BlockRemoved((2,), "GPU")])
    assert idx.match(keys(SYSTEM + TAIL_A)) == {"a": 1, "b": 3, "c": 1}


def test_removal_translates_engine_hashes_and_respects_lora() -> None:
    idx = KVBlockIndex()
    idx.apply("a", [stored([1, 2, 3], SYSTEM), stored([31, 32, 33], SYSTEM, lora="food-review")])
    assert idx.match(keys(SYSTEM)) == {"a": 3}
    assert idx.match(keys(SYSTEM, "food-review")) == {"a": 3}
    assert idx.match(keys(SYSTEM, "other-adapter")) == {}
    idx.apply("a", [BlockRemoved((31, 32, 33), "GPU")])
    assert idx.match(keys(SYSTEM, "food-review")) == {}
    assert idx.match(keys(SYSTEM)) == {"a": 3}
    assert idx.size == 3
    idx.apply("a", [BlockRemoved((999,), "GPU")])  # unknown hash: nothing happens
    assert idx.size == 3


def test_same_tokens_under_two_engine_hashes_stay_until_both_go() -> None:
    idx = KVBlockIndex()
    idx.apply("a", [stored([1], SYSTEM[:4]), stored([2], SYSTEM[:4])])
    assert idx.size == 1
    idx.apply("a", [BlockRemoved((1,), "GPU")])
    assert idx.match(keys(SYSTEM[:4])) == {"a": 1}
    idx.apply("a", [BlockRemoved((2,), "GPU")])
    assert idx.match(keys(SYSTEM[:4])) == {} and idx.size == 0


def test_orphans_cpu_blocks_and_other_groups_are_not_indexed() -> None:
    idx = KVBlockIndex()
    r = idx.apply("a", [stored([5], TAIL_A[:4], parent=404)])  # parent never seen
    assert r.orphans == 1 and idx.size == 0
    idx.apply("a", [BlockStored([1], None, SYSTEM[:4], BS, None, "CPU")])  # offloaded
    idx.apply("a", [BlockStored([1], None, SYSTEM[:4], BS, medium="GPU", group_idx=1)])
    assert idx.size == 0
    # Structure the types cannot check: token count must be blocks x block size.
    r = idx.apply("a", [BlockStored([1, 2], None, SYSTEM[:4], BS), BlockStored([1], None, [], 0)])
    assert r.malformed == 2 and idx.size == 0


def test_blocks_with_extra_keys_never_match_plain_text() -> None:
    idx = KVBlockIndex()
    # An image's hash in the first block's extra keys: not the text prompt's block.
    idx.apply("a", [stored([1], SYSTEM[:4], extra_keys=[["img-sha", 0]])])
    idx.apply("b", [stored([1], SYSTEM[:4], lora="ad", extra_keys=[["ad"]])])
    assert idx.match(keys(SYSTEM[:4])) == {}
    assert idx.match(keys(SYSTEM[:4], "ad")) == {"b": 1}  # the LoRA name alone adds nothing


def test_cleared_and_forgotten_endpoints() -> None:
    idx = KVBlockIndex()
    idx.apply("a", [stored([1, 2, 3], SYSTEM)])
    idx.apply("b", [stored([1, 2, 3], SYSTEM)])
    idx.apply("a", [AllBlocksCleared()])
    assert idx.match(keys(SYSTEM)) == {"b": 3} and idx.size == 3
    idx.apply("a", [stored([1, 2, 3], SYSTEM)])
    idx.forget("b")
    assert idx.match(keys(SYSTEM)) == {"a": 3}
    idx.apply("c", [stored([1], SYSTEM[:4])])  # reuses b's slot
    assert idx.match(keys(SYSTEM)) == {"a": 3, "c": 1}


def test_memory_is_capped_least_recently_stored_first() -> None:
    idx = KVBlockIndex(max_entries=20)
    seqs = [[1000 * g + t for t in range(8)] for g in range(10)]  # 10 x 2 blocks
    for g, toks in enumerate(seqs):
        idx.apply("a", [stored([2 * g, 2 * g + 1], toks)])
    assert idx.size == 20
    idx.apply("a", [stored([100, 101], [7] * 8)])  # over the cap: trimmed to 90%
    assert idx.size <= 20
    assert idx.match(keys(seqs[0])) == {}          # the oldest went first
    assert idx.match(keys([7] * 8)) == {"a": 2}    # the newest stayed
    idx.apply("a", [BlockRemoved((0, 1), "GPU")])  # removal of trimmed blocks is harmless
    assert idx.size <= 20


def test_many_endpoints() -> None:
    idx = KVBlockIndex()
    for i in range(200):
        idx.apply(f"pod-{i}", [stored([1, 2][: 1 + i % 2], SYSTEM[: 4 * (1 + i % 2)])])
    m = idx.match(keys(SYSTEM))
    assert len(m) == 200 and m["pod-0"] == 1 and m["pod-199"] == 2


def test_a_zero_parent_is_a_first_block_as_llm_d_inference_sim_sends_it() -> None:
    idx = KVBlockIndex()
    assert idx.apply("a", [stored([11, 12, 13], SYSTEM, parent=0)]).stored == 3
    assert idx.match(keys(SYSTEM)) == {"a": 3}
