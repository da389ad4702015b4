"""The approximate prefix index: block hashing and the per-endpoint LRU."""

from __future__ import annotations

import xxhash

from epp.scheduling.prefix import PrefixIndex, block_hashes, model_seed, prompt_bytes


def test_blocks_are_chained_and_seeded_by_model() -> None:
    data = b"a" * 64 + b"b" * 64 + b"c" * 10  # two full blocks, a partial one ignored
    hs = block_hashes("llama", data, 64, 256)
    assert len(hs) == 2
    h0 = xxhash.xxh64_intdigest(b"a" * 64, xxhash.xxh64_intdigest(b"llama"))
    assert hs[0] == h0
    assert hs[1] == xxhash.xxh64_intdigest(b"b" * 64, h0)
    # Another model never shares hashes; the same prefix gives the same leading hashes.
    assert block_hashes("mistral", data, 64, 256)[0] != hs[0]
    assert block_hashes("llama", data[:64] + b"x" * 64, 64, 256)[0] == hs[0]
    assert block_hashes("llama", data[:64] + b"x" * 64, 64, 256)[1] != hs[1]


def test_block_count_is_capped_and_short_prompts_have_none() -> None:
    assert len(block_hashes("m", b"x" * 64 * 300, 64, 256)) == 256
    assert block_hashes("m", b"x" * 63, 64, 256) == []
    assert len(block_hashes("m", b"x" * 128, 32, 256)) == 4
    assert model_seed("m") == xxhash.xxh64_intdigest(b"m")


def test_prompt_bytes_accepts_lone_surrogates() -> None:
    # JSON allows "\ud800"; encoding it must not raise on the request path.
    assert prompt_bytes("a\ud800b") == b"a\xed\xa0\x80b"


def test_match_counts_leading_blocks_per_endpoint() -> None:
    idx = PrefixIndex()
    a = block_hashes("m", b"s" * 64 * 4 + b"A" * 64 * 4, 64, 256)
    b = block_hashes("m", b"s" * 64 * 4 + b"B" * 64 * 4, 64, 256)
    idx.record("pod-a", a, 1000)
    idx.record("pod-b", b, 1000)
    assert idx.match(a) == {"pod-a": 8, "pod-b": 4}
    assert idx.match(b) == {"pod-a": 4, "pod-b": 8}
    assert idx.match(block_hashes("m", b"z" * 64 * 8, 64, 256)) == {}
    assert idx.match(a[:2]) == {"pod-a": 2, "pod-b": 2}
    # Three holders with three different lengths.
    c = a[:6] + block_hashes("m", b"q" * 64, 64, 256)
    idx.record("pod-c", a[:6], 1000)
    assert idx.match(a) == {"pod-a": 8, "pod-b": 4, "pod-c": 6}
    assert idx.match(c) == {"pod-a": 6, "pod-b": 4, "pod-c": 6}


def test_lru_evicts_least_recent_deepest_blocks_first() -> None:
    idx = PrefixIndex()
    old = block_hashes("m", b"o" * 64 * 4, 64, 256)
    new = block_hashes("m", b"n" * 64 * 4, 64, 256)
    idx.record("pod", old, 6)
    idx.record("pod", new, 6)  # 8 blocks > 6: the old chain loses its deepest blocks
    assert idx.blocks_of("pod") <= 6
    assert idx.match(new) == {"pod": 4}
    m = idx.match(old).get("pod", 0)
    assert m < 4  # old chain was cut from the end, so what is left is still a prefix
    if m:
        assert all(h in idx._lru["pod"] for h in old[:m])


def test_forget_and_retain_drop_endpoints() -> None:
    idx = PrefixIndex()
    hs = block_hashes("m", b"p" * 64 * 3, 64, 256)
    idx.record("a", hs, 100)
    idx.record("b", hs, 100)
    idx.forget("a")
    assert idx.match(hs) == {"b": 3}
    idx.retain(["c"])
    assert idx.match(hs) == {}
    assert len(idx) == 0 and idx._owners == {}


def test_the_whole_index_is_bounded() -> None:
    idx = PrefixIndex(max_total=100)
    for k in range(40):
        idx.record(f"pod-{k % 8}", block_hashes("m", bytes([k]) * 64 * 10, 64, 256), 1000)
        assert idx.size == sum(idx.blocks_of(f"pod-{i}") for i in range(8))
        assert idx.size <= 100
    # What is left of each endpoint is still usable: the most recent prompts match.
    last = block_hashes("m", bytes([39]) * 64 * 10, 64, 256)
    assert idx.match(last).get("pod-7", 0) >= 1
    idx.forget("pod-7")
    assert idx.size == sum(idx.blocks_of(f"pod-{i}") for i in range(7))


def test_prefix_homes_keep_the_first_holder_until_it_no_longer_holds_the_group() -> None:
    from epp.scheduling.prefix import PrefixHomes

    homes = PrefixHomes(max_size=2)
    homes.settle(1, "a", holders=(), request_id="r1")
    assert homes.get(1) == "a"
    homes.settle(1, "b", holders=("a", "b"), request_id="r2")  # a spill: home stays
    assert homes.get(1) == "a"
    homes.settle(1, "b", holders=("b",), request_id="r3")  # a no longer holds it
    assert homes.get(1) == "b"
    # A data plane reports that r4 was served elsewhere: its own pick is corrected.
    homes.settle(2, "c", holders=(), request_id="r4")
    homes.settle(2, "d", holders=("c",), request_id="r4")
    assert homes.get(2) == "d"
    homes.settle(3, "e", holders=(), request_id="r5")  # bounded: group 1 (least recent) goes
    assert len(homes) == 2 and homes.get(1) is None and homes.get(3) == "e"
