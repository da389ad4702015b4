"""The native KV index against the Python one, its reference: the same random event streams
(chains, LoRA, CPU blocks, other groups, orphans, reused and duplicated engine hashes,
bytes hashes, malformed blocks, clears, the memory cap) give the same entries in the same
LRU order, the same counts and the same matches; batches the native decoder takes on its
own (`apply_payload`) end exactly as Python's decode + apply, and those it declines
(map-encoded events, unknown tags, extra keys, another block size, garbage) change nothing."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest

from epp.kvevents.decode import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodeError,
    decode_batch,
    encode_batch,
)
from epp.kvevents.index import ApplyResult, KVBlockIndex, block_keys, root_key
from tests.native_index import require_native_index


@pytest.fixture(autouse=True, scope="module")
def _native() -> None:
    require_native_index()


BS = 4
NAMES = ["pod-a", "pod-b", "pod-c"]


class Engine:
    """One endpoint's engine: stores chains of blocks and evicts them, with the oddities
    a real stream has now and then."""

    def __init__(self, rng: random.Random, seed: int) -> None:
        self.rng = rng
        self.held: list[Any] = []
        self.tails: list[Any] = []
        self.next = seed * 1_000_000 + 1

    def _hash(self) -> Any:
        self.next += 1
        return self.next.to_bytes(8, "big") if self.rng.random() < 0.2 else self.next

    def event(self) -> Any:
        rng = self.rng
        x = rng.random()
        if x < 0.5 or not self.held:
            n = rng.randint(0, 4)
            hashes = [self._hash() for _ in range(n)]
            if rng.random() < 0.05 and self.held:  # an engine hash reused for other content
                hashes[:1] = [rng.choice(self.held)] if n else []
            parent = (None if rng.random() < 0.3 or not self.tails else
                      rng.choice(self.tails[-6:]) if rng.random() < 0.9 else 987_654_321)
            tokens = [rng.randrange(8) for _ in range(n * BS)]  # few ids: shared content
            if rng.random() < 0.03:
                tokens.append(1)  # token count is not blocks x block size
            if rng.random() < 0.03 and tokens:
                tokens[0] = 2**64 - 1  # not an int64
            self.held.extend(hashes)
            if hashes:
                self.tails.append(hashes[-1])
            return BlockStored(hashes, parent, tokens, BS,
                               rng.choice([None, 1]),
                               rng.choice(["GPU", "GPU", "GPU", None, "CPU"]),
                               rng.choice([None, None, "", "adapter-1"]),
                               None,
                               rng.choice([None, 0, 0, 1]))
        if x < 0.985:
            n = rng.randint(0, 4)
            gone = [rng.choice(self.held) for _ in range(n)] + ([424242] if rng.random() < 0.1 else [])
            return BlockRemoved(gone, rng.choice(["GPU", None, "CPU"]), rng.choice([None, 0, 1]))
        return AllBlocksCleared()


def batches(seed: int, count: int) -> list[tuple[str, list[Any]]]:
    rng = random.Random(seed)
    engines = {n: Engine(rng, i) for i, n in enumerate(NAMES)}
    return [(name, [engines[name].event() for _ in range(rng.randint(1, 12))])
            for name in (rng.choice(NAMES) for _ in range(count))]


def same_state(native: KVBlockIndex, py: KVBlockIndex, probes: list[list[int]]) -> None:
    assert native.size == py.size
    for n in NAMES:
        assert native.lru_keys(n) == py.lru_keys(n)
        assert native.blocks_of(n) == py.blocks_of(n)
    for keys in probes:
        assert native.match(keys) == py.match(keys)


def probes_for(events: list[Any]) -> list[list[int]]:
    """Key chains of the stored events' tokens from the root, to ask both indexes."""
    out = []
    for ev in events:
        if isinstance(ev, BlockStored) and ev.token_ids:
            try:
                out.append(block_keys(ev.token_ids, BS, root_key(ev.lora_name)))
            except (OverflowError, TypeError):
                pass
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cap", [2_000_000, 40])
def test_native_payloads_index_as_python_decodes_and_applies(seed: int, cap: int) -> None:
    native = KVBlockIndex(cap, backend="native")
    py = KVBlockIndex(cap, backend="python")
    assert type(native) is not type(py)
    taken = 0
    for name, events in batches(seed, 300):
        payload = encode_batch(1.0, events)
        got = native.apply_payload(name, payload, BS)
        want = ApplyResult()
        py.apply(name, decode_batch(0, payload).events, want)
        assert got is not None  # positional events, known tags: the native decoder's case
        taken += 1
        assert got == (len(events), want.stored, want.removed, want.orphans, want.malformed)
        same_state(native, py, probes_for(events))
    assert taken == 300


@pytest.mark.parametrize("seed", range(4))
def test_native_apply_of_decoded_events_matches_python(seed: int) -> None:
    native = KVBlockIndex(60, backend="native")
    py = KVBlockIndex(60, backend="python")
    for name, events in batches(100 + seed, 300):
        a, b = native.apply(name, events), py.apply(name, events)
        assert (a.stored, a.removed, a.orphans, a.malformed) == (b.stored, b.removed, b.orphans,
                                                                 b.malformed)
        same_state(native, py, probes_for(events))
    native.forget("pod-b")
    py.forget("pod-b")
    for name, events in batches(200 + seed, 50):  # "pod-b" comes back in another slot
        native.apply(name, events)
        py.apply(name, events)
        same_state(native, py, probes_for(events))


def test_what_the_native_decoder_declines_changes_nothing() -> None:
    native = KVBlockIndex(backend="native")
    stored = BlockStored([1, 2], None, list(range(8)), BS, None, "GPU")
    assert native.apply_payload("a", encode_batch(1.0, [stored]), BS) == (1, 2, 0, 0, 0)
    before = native.lru_keys("a")
    enc = msgspec.msgpack.encode
    declined = [
        encode_batch(1.0, [stored], layout="map"),                  # newer vLLM's tagged maps
        enc([1.0, [["BlockMoved", [1]]], 0]),                       # a tag from the future
        encode_batch(1.0, [BlockStored([3], None, [1] * 8, 8)]),    # another block size
        encode_batch(1.0, [BlockStored([3], 2, [1] * 4, BS, None, "GPU", None, [["img", 0]])]),
        encode_batch(1.0, [BlockRemoved([1, 2])]) + b"\x00",        # trailing bytes
        encode_batch(1.0, [BlockRemoved([1, 2])])[:-3],             # cut short
        enc([1.0, [["BlockRemoved", ["1"]]], 0]),                   # a hash of the wrong type
        enc({"ts": 1.0, "events": []}),
        b"", b"\xc1", b"\x92\xcb", bytes(range(256)),
    ]
    for payload in declined:
        assert native.apply_payload("a", payload, BS) is None
        assert native.lru_keys("a") == before and native.size == 2
    # Python agrees about which of them are events at all.
    with pytest.raises(DecodeError):
        decode_batch(0, declined[-1])


def test_trailing_fields_from_a_newer_vllm_are_skipped() -> None:
    native = KVBlockIndex(backend="native")
    enc = msgspec.msgpack.encode
    payload = enc([1.0, [["BlockStored", [1], None, [1, 2, 3, 4], BS, None, "GPU", None, None,
                          0, {"new": [1, 2.5, b"x", None, True]}],
                         ["BlockRemoved", [9], "GPU", 0, "later"], ["AllBlocksCleared", 7]],
                   0, "more"])
    assert decode_batch(0, payload).events  # Python accepts it too
    assert native.apply_payload("a", payload, BS) == (3, 1, 0, 0, 0)
    assert native.size == 0  # ... and the clear at the end went through


def test_random_garbage_never_breaks_the_native_decoder() -> None:
    rng = random.Random(7)
    good = encode_batch(1.0, [BlockStored([1, 2], None, list(range(8)), BS, None, "GPU"),
                              BlockRemoved([1], "GPU")])
    native = KVBlockIndex(backend="native")
    py = KVBlockIndex(backend="python")
    for _ in range(3000):
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        payload = bytes(b)
        got = native.apply_payload("a", payload, BS)
        if got is None:
            continue
        # Whatever it took, Python decodes to the same thing and the indexes agree.
        want = py.apply("a", decode_batch(0, payload).events)
        assert got[1:] == (want.stored, want.removed, want.orphans, want.malformed)
        assert native.lru_keys("a") == py.lru_keys("a")
