"""Decoding vLLM's KV-cache event messages.

The fixtures are msgpack built by hand (plain lists and maps, not our encoder) from the
layouts in vLLM's `vllm/distributed/kv_events.py`:
EventBatch `[ts, events, data_parallel_rank]`; positional events
`["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
lora_name, extra_keys, group_idx, kv_cache_spec_kind, ...]`,
`["BlockRemoved", block_hashes, medium, group_idx]`, `["AllBlocksCleared"]` (older vLLM:
no medium / lora_name / extra_keys); newer vLLM (PR #42892): tagged maps
`{"type": "BlockStored", ...}`. Block hashes are ints or bytes (`ExternalBlockHash`).
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.kvevents.decode import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodeError,
    decode_batch,
    decode_message,
    encode_batch,
    encode_seq,
)

pack = msgspec.msgpack.encode
TOKENS = list(range(100, 132))  # two blocks of 16


def test_positional_events_of_current_vllm() -> None:
    payload = pack([
        1733.5,
        [
            ["BlockStored", [2**64 - 1, 7], None, TOKENS, 16, None, "GPU", "food-review",
             [["food-review"], None], 0, "full_attention", None],
            ["BlockRemoved", [7], "GPU", 0],
            ["AllBlocksCleared"],
        ],
        0,
    ])
    batch = decode_message([b"kv@pod@model", (41).to_bytes(8, "big"), payload])
    assert batch.seq == 41 and batch.ts == 1733.5 and batch.data_parallel_rank == 0
    stored, removed, cleared = batch.events
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == [2**64 - 1, 7]  # the full uint64 range
    assert list(stored.token_ids) == TOKENS and stored.block_size == 16
    assert stored.lora_name == "food-review" and stored.medium == "GPU" and stored.group_idx == 0
    assert stored.extra_keys == [["food-review"], None]
    assert removed == BlockRemoved([7], "GPU", 0)
    assert cleared == AllBlocksCleared()


def test_positional_events_of_older_vllm_without_trailing_fields() -> None:
    # vLLM 0.9: BlockStored had no medium/lora_name/extra_keys, BlockRemoved no medium,
    # and EventBatch no data_parallel_rank.
    payload = pack([1.0, [["BlockStored", [1, 2], 99, TOKENS, 16, None],
                          ["BlockRemoved", [1]]]])
    batch = decode_batch(0, payload)
    stored, removed = batch.events
    assert isinstance(stored, BlockStored)
    assert stored.parent_block_hash == 99 and stored.medium is None and stored.lora_name is None
    assert removed == BlockRemoved([1], None)
    assert batch.data_parallel_rank is None


def test_map_events_of_newer_vllm_and_bytes_hashes() -> None:
    h1, h2 = b"\x01" * 32, b"\x02" * 32  # sha256 block hashes
    payload = pack([2.0, [
        {"type": "BlockStored", "block_hashes": [h1, h2], "parent_block_hash": None,
         "token_ids": TOKENS, "block_size": 16, "lora_id": None, "medium": "GPU",
         "lora_name": None, "extra_keys": [None, None], "group_idx": 0,
         "kv_cache_spec_kind": "full_attention", "some_future_field": [1, 2, 3]},
        {"type": "BlockRemoved", "block_hashes": [h1], "medium": "GPU"},
        {"type": "AllBlocksCleared"},
    ], 0])
    stored, removed, cleared = decode_batch(5, payload).events
    assert isinstance(stored, BlockStored) and stored.block_hashes == [h1, h2]
    assert isinstance(removed, BlockRemoved) and (removed.block_hashes, removed.medium) == ([h1], "GPU")
    assert isinstance(cleared, AllBlocksCleared)


def test_unknown_event_types_are_skipped_and_counted() -> None:
    payload = pack([1.0, [["BlockStored", [1], None, TOKENS[:16], 16, None],
                          ["BlockOffloaded", [1], "CPU"],
                          {"type": "SomethingNew", "x": 1}]])
    batch = decode_batch(0, payload)
    assert len(batch.events) == 1 and batch.unknown == 2


@pytest.mark.parametrize("payload", [
    b"",
    b"\xc1",  # never used in msgpack
    b"hello world",
    pack({"ts": "yesterday"}),
    pack([1.0, "not a list"]),
    pack([1.0, [["BlockStored", "x", None, [], 16]]]),
    pack([1.0, [["BlockRemoved", [1.5]]]]),
    pack([1.0, [42]]),
])
def test_garbage_raises_decode_error_only(payload: bytes) -> None:
    with pytest.raises(DecodeError) as e:
        decode_batch(0, payload)
    assert e.value.reason == "garbage"


def test_bad_framing() -> None:
    with pytest.raises(DecodeError) as e:
        decode_message([b"topic", b"\x00\x01", pack([1.0, []])])
    assert e.value.reason == "bad_frame"
    with pytest.raises(DecodeError):
        decode_message([b"only one frame"])


@pytest.mark.parametrize("layout", ["array", "map"])
def test_our_encoder_round_trips(layout: str) -> None:
    events = [BlockStored([1, 2], None, TOKENS, 16, medium="GPU", lora_name="adapter"),
              BlockRemoved([2], "GPU"), AllBlocksCleared()]
    batch = decode_message([b"t", encode_seq(3), encode_batch(9.0, events, layout=layout)])
    assert batch.seq == 3
    assert [isinstance(e, t) for e, t in zip(batch.events, (BlockStored, BlockRemoved,
                                                             AllBlocksCleared))] == [True] * 3
    assert batch.events[0].lora_name == "adapter"  # type: ignore[union-attr]


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_else(data: bytes) -> None:
    try:
        decode_batch(0, data)
    except DecodeError:
        pass


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "X"]) .flatmap(
    lambda tag: st.lists(_values, max_size=6).map(lambda rest: [tag, *rest])), max_size=4))
def test_well_formed_msgpack_with_hostile_fields_never_raises_anything_else(events: list) -> None:
    try:
        decode_batch(0, pack([1.0, events, None]))
    except DecodeError:
        pass
