"""KV-event batches from a hostile or buggy publisher: the native decoder either declines a
batch (changing nothing) or ends exactly where Python's decode + apply ends."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from epp.kvevents.decode import DecodeError, decode_batch
from epp.kvevents.index import KVBlockIndex
from tests.native_index import require_native_index


@pytest.fixture(autouse=True, scope="module")
def _native() -> None:
    require_native_index()


BS = 2
ints = st.one_of(st.integers(-3, 12), st.integers(-(2**63), 2**64 - 1))
hashes = st.one_of(ints, st.binary(max_size=9))
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False), st.text(max_size=4),
                    st.binary(max_size=4))
anything = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(
    st.text(max_size=3), c, max_size=2), max_leaves=6)


@st.composite
def stored(draw: st.DrawFn) -> list[Any]:
    """A BlockStored, well formed more often than not, with 4 to 10 fields after its tag."""
    hs = draw(st.lists(st.one_of(st.integers(0, 5), hashes), max_size=3))
    n_tokens = BS * len(hs) if draw(st.integers(0, 4)) else draw(st.integers(0, 7))
    fields = ["BlockStored", hs, draw(st.one_of(st.none(), st.none(), st.none(), st.integers(0, 5), hashes)),
              draw(st.lists(st.one_of(st.integers(0, 3), ints), min_size=n_tokens,
                            max_size=n_tokens)),
              draw(st.sampled_from([BS, BS, BS, 0, 3])), draw(st.one_of(st.none(), ints)),
              draw(st.sampled_from([None, "GPU", "CPU"])),
              draw(st.sampled_from([None, "", "lora-a"])),
              draw(st.one_of(st.none(), st.lists(st.none(), max_size=2), st.just([["x"]]))),
              draw(st.sampled_from([None, 0, 1])), draw(anything)]
    return fields[:draw(st.integers(5, len(fields)))]


removed = st.tuples(st.just("BlockRemoved"), st.lists(st.one_of(st.integers(0, 5), hashes), max_size=3),
                    st.sampled_from([None, "GPU", "CPU"]), st.sampled_from([None, 0, 1]),
                    anything).flatmap(lambda t: st.integers(2, len(t)).map(lambda n: list(t[:n])))
events = st.lists(st.one_of(stored(), stored(), stored(), removed, removed, st.just(["AllBlocksCleared"]), anything), max_size=6)
batches = st.tuples(st.one_of(st.floats(allow_nan=False), st.floats(allow_nan=False), ints,
                              st.text(max_size=2)), events,
                    st.one_of(st.none(), st.none(), ints, st.text(max_size=2)), anything).flatmap(
    lambda t: st.integers(1, 4).map(lambda n: list(t[:n])))


@given(st.lists(st.tuples(batches, st.binary(max_size=3), st.booleans()), min_size=1, max_size=6))
def test_native_decoder_declines_or_agrees_with_python(seq: list[tuple[Any, bytes, bool]]) -> None:
    native = KVBlockIndex(8, backend="native")
    py = KVBlockIndex(8, backend="python")
    for doc, junk, corrupt in seq:
        payload = msgspec.msgpack.encode(doc) + (junk if corrupt else b"")
        got = native.apply_payload("a", payload, BS)
        if got is None:
            event("declined")
            assert native.lru_keys("a") == py.lru_keys("a")
            continue
        event("taken, blocks stored" if got[1] else "taken")
        try:
            batch = decode_batch(0, payload)
        except DecodeError:
            pytest.fail(f"native took a batch Python rejects: {doc!r}")
        assert batch.unknown == 0
        assert all(getattr(e, "block_size", BS) == BS for e in batch.events)
        want = py.apply("a", batch.events)
        assert got == (len(batch.events), want.stored, want.removed, want.orphans, want.malformed)
        assert native.lru_keys("a") == py.lru_keys("a") and native.size == py.size
