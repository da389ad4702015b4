"""Which endpoint holds which KV blocks, as the model servers themselves report it.

Keys are our own: block k of a token sequence is keyed by a 64-bit xxhash of its token ids
chained on block k-1's key, starting from a root that names the LoRA adapter (the same
tokens under another adapter are another block). The EPP computes the same keys from a
request's tokens, so it never has to reproduce an engine's hash function or seed. The
engine's own block hashes are kept per endpoint only to translate `BlockRemoved` and the
next `BlockStored`'s parent into our keys.

Layout, chosen for the request path's cost: `_owners` maps a key to a bitmask of endpoint
slots, so "how many leading blocks does each endpoint hold" is one dict lookup and one AND
per block for the whole pool. Each endpoint's keys sit in an LRU (least recently stored
first); the whole index holds at most `max_entries` (key, endpoint) entries, and trimming
drops each endpoint's least recently stored blocks first (the index then under-reports,
which costs a cache hit, never a wrong claim).

Only GPU blocks (medium absent or "GPU") of the first KV-cache group are indexed: blocks
offloaded to CPU or disk, and hybrid models' other groups, are ignored.

Two implementations with one behaviour: `KVBlockIndex` here, in Python, is the reference
and the fallback; `NativeKVBlockIndex` keeps the same index in Rust (`native/src/lib.rs`,
built by `make venv` into `epp/kvevents/_native.abi3.so` when cargo is there). Why: in
CPython, indexing costs ~1.5 µs per event (a Python int per token id, a dozen dict
operations per block), and intake at 64 endpoints x 2,000 events/s must stay under a
quarter of a core (benchmarks/RESULTS.md, issue 14). The native index also decodes the
common msgpack batch itself (`apply_payload`), so token ids never become Python objects;
whatever it is not sure about it declines, unchanged, and the caller decodes in Python.
`KVBlockIndex(...)` returns the native one when it is built, unless
`EPP_KV_INDEX=python` (or `backend="python"`); the unit tests run over both.

Everything here runs on the event loop thread and does no I/O.
"""

from __future__ import annotations

import os
import struct
from itertools import islice
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import xxhash

from epp.kvevents.decode import AllBlocksCleared, BlockRemoved, BlockStored, EngineHash, KVEvent

try:
    from epp.kvevents import _native  # type: ignore[attr-defined]
except ImportError:  # not built (no cargo when the venv was made): the Python index serves
    _native = None

BACKENDS = ("native", "python")
DEFAULT_BACKEND = os.environ.get("EPP_KV_INDEX", "native")
"""Which index `KVBlockIndex()` makes: "native" (when built; else Python) or "python"."""


def native_available() -> bool:
    return _native is not None

_xxh64 = xxhash.xxh64_intdigest
NO_PARENT = (None, 0)
"""Parent hashes that mean "first block of the sequence": vLLM sends None;
llm-d-inference-sim's default (array) event format sends 0, as llm-d's own indexer
accepts. A real engine hash of 0 has odds of 2**-64 (at worst one block keyed as a root)."""
DEFAULT_MAX_ENTRIES = 2_000_000
_GPU = (None, "GPU")


_ROOTS: dict[str | None, int] = {}


def root_key(lora_name: str | None) -> int:
    """The chain's start: base model and each adapter have their own (memoised: few)."""
    k = _ROOTS.get(lora_name)
    if k is None:
        k = (_xxh64(b"lora:" + lora_name.encode("utf-8", "surrogatepass")) if lora_name
             else _xxh64(b"base"))
        if len(_ROOTS) > 4096:
            _ROOTS.clear()
        _ROOTS[lora_name] = k
    return k


_PACKERS: dict[int, Any] = {}


def _pack(token_ids: Sequence[int], count: int) -> bytes:
    """The first `count` ids as native int64s (struct packing is ~3x faster than array()
    from a list); OverflowError/TypeError for ids that are not 64-bit integers."""
    pack = _PACKERS.get(count)
    if pack is None:
        if len(_PACKERS) > 1024:
            _PACKERS.clear()
        pack = _PACKERS[count] = struct.Struct(f"{count}q").pack
    try:
        if len(token_ids) == count:
            return pack(*token_ids)  # type: ignore[no-any-return]
        return pack(*token_ids[:count])  # type: ignore[no-any-return]
    except struct.error as e:
        raise OverflowError(str(e)) from None


def block_keys(token_ids: Sequence[int], block_size: int, parent: int,
               max_blocks: int | None = None, extras: Sequence[bytes | None] | None = None) -> list[int]:
    """Chained keys of the full blocks of `token_ids` (a trailing partial block is ignored).

    Raises OverflowError/TypeError for token ids that are not 64-bit integers.
    """
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n <= 0:
        return []
    raw = _pack(token_ids, n * block_size)
    width = block_size * 8
    out: list[int] = []
    append = out.append
    h = parent
    if extras is None:
        for start in range(0, n * width, width):
            h = _xxh64(raw[start:start + width], h)
            append(h)
    else:
        for i, start in enumerate(range(0, n * width, width)):
            extra = extras[i] if i < len(extras) else None
            chunk = raw[start:start + width]
            h = _xxh64(chunk + extra if extra else chunk, h)
            append(h)
    return out


def _extra_bytes(entry: Any, lora_name: str | None) -> bytes | None:
    """A block's extra keys (multimodal hashes, cache salt) as bytes mixed into its key;
    the LoRA name is already in the root, so an entry holding only that adds nothing.
    Requests cannot reproduce these, so such blocks never match a text request."""
    if entry is None:
        return None
    items = entry if isinstance(entry, (list, tuple)) else (entry,)
    rest = [x for x in items if x != lora_name and x is not None]
    if not rest:
        return None
    return repr(rest).encode("utf-8", "surrogatepass")


def _indexed(ev: BlockStored | BlockRemoved) -> bool:
    """Whether an event is about blocks this index keeps: GPU, first KV-cache group."""
    return ev.medium in _GPU and ev.group_idx in (None, 0)


def _extras_of(ev: BlockStored) -> list[bytes | None] | None:
    """Per block, the extra bytes mixed into its key (None when no block has any)."""
    if ev.extra_keys is None:
        return None
    extras = [_extra_bytes(e, ev.lora_name) for e in ev.extra_keys]
    return extras if any(extras) else None


@dataclass(slots=True)
class _Endpoint:
    slot: int
    keys: dict[int, Any] = field(default_factory=dict)
    """Our key -> the engine hash that stored it (a list when several did), in order of
    last store: the dict's order is the LRU order, least recently stored first."""
    by_engine: dict[EngineHash, int] = field(default_factory=dict)


@dataclass(slots=True)
class ApplyResult:
    stored: int = 0
    removed: int = 0
    orphans: int = 0
    """Stored blocks skipped because their parent block is unknown (missed or evicted)."""
    malformed: int = 0


class KVBlockIndex:
    """Our block key -> endpoints that hold it; see the module docstring.

    Constructing it gives a `NativeKVBlockIndex` when that is built and chosen."""

    def __new__(cls, max_entries: int = DEFAULT_MAX_ENTRIES, *,
                backend: str | None = None) -> KVBlockIndex:
        b = backend or DEFAULT_BACKEND
        if b not in BACKENDS:
            raise ValueError(f"unknown KV index backend {b!r}; want one of {BACKENDS}")
        if cls is KVBlockIndex and b == "native" and _native is not None:
            return object.__new__(NativeKVBlockIndex)
        return object.__new__(cls)

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, *,
                 backend: str | None = None) -> None:
        self.max_entries = max(1, max_entries)
        self._owners: dict[int, int] = {}
        self._eps: dict[str, _Endpoint] = {}
        self._names: dict[int, str] = {}
        self._free_slots: list[int] = []
        self._size = 0

    # -- reading (the request path) -------------------------------------------------

    @property
    def size(self) -> int:
        """(key, endpoint) entries held over all endpoints."""
        return self._size

    def blocks_of(self, name: str) -> int:
        ep = self._eps.get(name)
        return len(ep.keys) if ep is not None else 0

    def holds(self, name: str, key: int) -> bool:
        ep = self._eps.get(name)
        return ep is not None and key in ep.keys

    def lru_keys(self, name: str) -> list[int]:
        """An endpoint's keys, least recently stored first (tests compare implementations)."""
        ep = self._eps.get(name)
        return list(ep.keys) if ep is not None else []

    def match(self, keys: Sequence[int]) -> dict[str, int]:
        """Per endpoint, the longest run of leading blocks of `keys` it holds (0 omitted)."""
        if not keys:
            return {}
        owners = self._owners
        mask = owners.get(keys[0], 0)
        if not mask:
            return {}
        out: dict[str, int] = {}
        names = self._names
        k = 1
        for key in keys[1:]:
            m = mask & owners.get(key, 0)
            if m != mask:
                gone = mask ^ m
                while gone:
                    low = gone & -gone
                    out[names[low.bit_length() - 1]] = k
                    gone ^= low
                mask = m
                if not mask:
                    return out
            k += 1
        while mask:
            low = mask & -mask
            out[names[low.bit_length() - 1]] = k
            mask ^= low
        return out

    # -- writing (the event intake) -------------------------------------------------

    def apply_payload(self, name: str, payload: bytes,
                      block_size: int) -> tuple[int, int, int, int, int] | None:
        """Decode and apply a msgpack EventBatch in one step, when this index can: returns
        (events, stored, removed, orphans, malformed), or None having changed nothing (the
        caller then decodes with `decode.decode_batch` and calls `apply`). The Python index
        always declines; the native one takes the common case."""
        return None

    def apply(self, name: str, events: Iterable[KVEvent], result: ApplyResult | None = None) -> ApplyResult:
        r = result if result is not None else ApplyResult()
        for ev in events:
            if isinstance(ev, BlockStored):
                self._stored(name, ev, r)
            elif isinstance(ev, BlockRemoved):
                self._removed(name, ev, r)
            elif isinstance(ev, AllBlocksCleared):
                self.clear(name)
        if self._size > self.max_entries:
            self._trim()
        return r

    def _endpoint(self, name: str) -> _Endpoint:
        ep = self._eps.get(name)
        if ep is None:
            slot = self._free_slots.pop() if self._free_slots else len(self._eps)
            ep = self._eps[name] = _Endpoint(slot)
            self._names[slot] = name
        return ep

    def _stored(self, name: str, ev: BlockStored, r: ApplyResult) -> None:
        if not _indexed(ev):
            return
        hashes = ev.block_hashes
        bs = ev.block_size
        if bs < 1 or len(ev.token_ids) != bs * len(hashes):
            r.malformed += 1
            return
        ep = self._endpoint(name)
        by_engine = ep.by_engine
        if ev.parent_block_hash in NO_PARENT:
            parent = root_key(ev.lora_name)
        else:
            p = by_engine.get(ev.parent_block_hash)
            if p is None:
                r.orphans += len(hashes)
                return
            parent = p
        try:
            keys = block_keys(ev.token_ids, bs, parent, extras=_extras_of(ev))
        except (OverflowError, TypeError):
            r.malformed += 1
            return
        bit = 1 << ep.slot
        owners = self._owners
        held = ep.keys
        for engine_hash, key in zip(hashes, keys):
            old = by_engine.get(engine_hash)
            if old is not None and old != key:  # an engine hash reused for other content
                self._drop(ep, engine_hash, old)
            by_engine[engine_hash] = key
            h = held.pop(key, None)
            if h is None:
                held[key] = engine_hash
                owners[key] = owners.get(key, 0) | bit
                self._size += 1
            elif h == engine_hash or (h.__class__ is list and engine_hash in h):
                held[key] = h  # stored again: most recent now
            elif h.__class__ is list:
                h.append(engine_hash)
                held[key] = h
            else:
                held[key] = [h, engine_hash]
        r.stored += len(keys)

    def _removed(self, name: str, ev: BlockRemoved, r: ApplyResult) -> None:
        if not _indexed(ev):
            return
        ep = self._eps.get(name)
        if ep is None:
            return
        pop = ep.by_engine.pop
        keys = ep.keys
        owners = self._owners
        keep = ~(1 << ep.slot)
        for engine_hash in ev.block_hashes:
            key = pop(engine_hash, None)
            if key is None:
                continue
            r.removed += 1
            if keys.get(key) != engine_hash:  # held under several engine hashes
                self._drop(ep, engine_hash, key)
                continue
            del keys[key]  # the common case, inline
            m = owners.get(key, 0) & keep
            if m:
                owners[key] = m
            else:
                owners.pop(key, None)
            self._size -= 1

    def _drop(self, ep: _Endpoint, engine_hash: EngineHash, key: int) -> None:
        """`engine_hash` no longer holds `key` on `ep`; the key goes when none does."""
        h = ep.keys.get(key)
        if h is None:
            return
        if h.__class__ is list:
            if engine_hash in h:
                h.remove(engine_hash)
            if len(h) > 1:
                return
            if h:
                ep.keys[key] = h[0]
                return
        elif h != engine_hash:
            return
        del ep.keys[key]
        self._unown(key, 1 << ep.slot)
        self._size -= 1

    def _unown(self, key: int, bit: int) -> None:
        m = self._owners.get(key, 0) & ~bit
        if m:
            self._owners[key] = m
        else:
            self._owners.pop(key, None)

    def clear(self, name: str) -> None:
        """Forget an endpoint's blocks (it restarted, or its stream had a gap); keep its slot."""
        ep = self._eps.get(name)
        if ep is None:
            return
        bit = 1 << ep.slot
        for key in ep.keys:
            self._unown(key, bit)
        self._size -= len(ep.keys)
        ep.keys.clear()
        ep.by_engine.clear()

    def forget(self, name: str) -> None:
        """Drop an endpoint entirely (it left the pool); its slot is reused."""
        if name not in self._eps:
            return
        self.clear(name)
        ep = self._eps.pop(name)
        del self._names[ep.slot]
        self._free_slots.append(ep.slot)

    def _trim(self) -> None:
        """Over the global bound: every endpoint down to a bit under an equal share,
        least recently stored first (rare: once per ~10% of the bound in new blocks)."""
        share = self.max_entries // max(1, len(self._eps))
        target = max(1, share - share // 10)
        for ep in self._eps.values():
            excess = len(ep.keys) - target
            if excess <= 0:
                continue
            bit = 1 << ep.slot
            for key in list(islice(ep.keys, excess)):
                h = ep.keys.pop(key)
                for e in (h if h.__class__ is list else (h,)):
                    if ep.by_engine.get(e) == key:
                        del ep.by_engine[e]
                self._unown(key, bit)
                self._size -= 1


class NativeKVBlockIndex(KVBlockIndex):
    """The same index in Rust (`native/src/lib.rs`); see the module docstring. Reads and
    `apply_payload` go straight to the native object; `apply` (decoded events: replays,
    batches the native decoder declined, tests) filters and translates here, as above."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, *,
                 backend: str | None = None) -> None:
        if _native is None:
            raise RuntimeError("the native KV index is not built (make venv, with cargo)")
        n = self._n = _native.Index(max(1, max_entries))
        # Bound once: no Python frame between the caller and Rust.
        self.match = n.match  # type: ignore[method-assign]
        self.blocks_of = n.blocks_of  # type: ignore[method-assign]
        self.holds = n.holds  # type: ignore[method-assign]
        self.lru_keys = n.lru_keys  # type: ignore[method-assign]
        self.clear = n.clear  # type: ignore[method-assign]
        self.apply_payload = n.apply_payload  # type: ignore[method-assign]

    @property  # type: ignore[override]
    def max_entries(self) -> int:
        return self._n.max_entries  # type: ignore[no-any-return]

    @max_entries.setter
    def max_entries(self, v: int) -> None:
        self._n.max_entries = max(1, v)

    @property
    def size(self) -> int:
        return self._n.size  # type: ignore[no-any-return]

    def forget(self, name: str) -> None:
        self._n.forget(name)

    def apply(self, name: str, events: Iterable[KVEvent], result: ApplyResult | None = None) -> ApplyResult:
        r = result if result is not None else ApplyResult()
        n = self._n
        for ev in events:
            if isinstance(ev, BlockStored):
                if not _indexed(ev):
                    continue
                stored, orphans, malformed = n.store_blocks(
                    name, ev.block_hashes, ev.parent_block_hash, root_key(ev.lora_name),
                    ev.token_ids, ev.block_size, _extras_of(ev))
                r.stored += stored
                r.orphans += orphans
                r.malformed += malformed
            elif isinstance(ev, BlockRemoved):
                if not _indexed(ev):
                    continue
                r.removed += n.remove_blocks(name, ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                n.clear(name)
        n.trim_if_over()
        return r
