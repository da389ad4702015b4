"""Approximate prefix-cache index: which endpoints have probably cached which prompt prefix.

Model servers with automatic prefix caching (vLLM) reuse the KV cache of a prompt's leading
blocks. The EPP cannot see those caches, so, like the upstream EPP, it guesses: every
request it routes is cut into fixed-size blocks, each block is hashed together with all the
blocks before it (a chain, so equal hashes mean equal prefixes), and the chosen endpoint is
remembered as holding those blocks. A later request that shares a leading run of blocks
scores higher on the endpoints that hold it.

Facts carried over from the upstream EPP: a block is (block size in tokens x 4) characters
(about 4 characters per token), 16 tokens by default or the endpoint's own scraped block size;
the chain starts from a 64-bit xxhash of the target model so that two models never share
entries; at most 256 blocks per request; a per-endpoint LRU of 31,250 blocks unless the
endpoint reports its GPU block count. On top of that (our addition), the whole index holds
at most 2,000,000 (hash, endpoint) entries, about 330 MB in CPython.

Blocks are cut from the UTF-8 bytes of the prompt text (equal to characters for ASCII), which
costs one encode per request instead of one per block.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from itertools import repeat
from typing import Container, Iterable, Sequence

import xxhash

CHARS_PER_TOKEN = 4
DEFAULT_BLOCK_TOKENS = 16
DEFAULT_MAX_BLOCKS = 256
DEFAULT_LRU_CAPACITY = 31_250
DEFAULT_MAX_INDEXED_BLOCKS = 2_000_000

_xxh64 = xxhash.xxh64_intdigest
_MODEL_SEEDS: dict[str, int] = {}
_MODEL_SEEDS_MAX = 4096


def model_seed(model: str) -> int:
    """The chain's starting value for a model; memoised because models are few."""
    seed = _MODEL_SEEDS.get(model)
    if seed is None:
        seed = _xxh64(model.encode("utf-8", "surrogatepass"))
        if len(_MODEL_SEEDS) >= _MODEL_SEEDS_MAX:
            _MODEL_SEEDS.clear()
        _MODEL_SEEDS[model] = seed
    return seed


def prompt_bytes(text: str) -> bytes:
    """The prompt as bytes; lone surrogates (legal in JSON strings) must not raise."""
    return text.encode("utf-8", "surrogatepass")


def block_hashes(model: str, data: bytes, block_chars: int, max_blocks: int) -> list[int]:
    """Chained 64-bit hashes of the full blocks of `data` (a trailing partial block is ignored).

    Each block is hashed with the previous block's hash as xxhash seed, so hash k identifies
    blocks 0..k together with the model.
    """
    if block_chars <= 0:
        return []
    n = min(len(data) // block_chars, max_blocks)
    h = model_seed(model)
    out: list[int] = []
    append = out.append
    for start in range(0, n * block_chars, block_chars):
        h = _xxh64(data[start : start + block_chars], h)
        append(h)
    return out


def leading_in(hashes: Sequence[int], held: Container[int], most: int) -> int:
    """How many leading blocks of `hashes` (at most `most`) are in `held`, a prefix-closed
    set of chains (holding a block means holding the blocks before it): a bisection."""
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if hashes[mid - 1] in held:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixIndex:
    """Block hash -> endpoint names, bounded by an approximate LRU per endpoint.

    All methods run on the event loop thread; nothing here does I/O. Endpoints are keyed by
    name (stable across snapshots, unlike snapshot indices).

    Layout, chosen for the per-request cost: `_owners` maps a hash to the one endpoint name
    that holds it (the common case) or to a set of names; each endpoint's `_lru` is an
    OrderedDict of its hashes, least recent first. Recording a request costs one C-level
    update for its new blocks, one move per block it already held, and one pop per block
    evicted: O(1) per block, no scans.
    """

    __slots__ = ("_owners", "_lru", "_size", "max_total")

    def __init__(self, max_total: int = DEFAULT_MAX_INDEXED_BLOCKS) -> None:
        self._owners: dict[int, str | set[str]] = {}
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._size = 0
        self.max_total = max(1, max_total)
        """Bound on (hash, endpoint) entries over all endpoints (~165 B each): per-endpoint
        capacities alone would let a pool of thousands of endpoints grow to many GB."""

    @property
    def size(self) -> int:
        """(hash, endpoint) entries held over all endpoints."""
        return self._size

    def __len__(self) -> int:
        """Number of endpoints the index holds blocks for."""
        return len(self._lru)

    def endpoints(self) -> list[str]:
        return list(self._lru)

    def blocks_of(self, name: str) -> int:
        lru = self._lru.get(name)
        return len(lru) if lru is not None else 0

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per endpoint, how many leading blocks of `hashes` it holds (endpoints with 0 omitted).

        An endpoint's blocks are prefix-closed (see `record`), so "holds block k" is monotone
        in k and each holder's length is found by bisection: O(log blocks) lookups per
        distinct length, one lookup for a prompt nobody has seen.
        """
        if not hashes:
            return {}
        owners = self._owners
        first = owners.get(hashes[0])
        if first is None:
            return {}
        n = len(hashes)
        result: dict[str, int] = {}
        names: set[str] = {first} if first.__class__ is str else set(first)
        stack: list[tuple[set[str], int, int]] = [(names, 1, n)]
        while stack:
            names, lo, hi = stack.pop()  # every name holds >= lo blocks and <= hi
            while lo < hi:
                mid = (lo + hi + 1) // 2
                o = owners.get(hashes[mid - 1])
                if o is None:
                    hi = mid - 1
                    continue
                if o.__class__ is str:
                    inside = {o} if o in names else set()
                elif names <= o:  # type: ignore[operator]
                    lo = mid
                    continue
                else:
                    inside = names & o  # type: ignore[operator]
                if not inside:
                    hi = mid - 1
                elif len(inside) == len(names):
                    lo = mid
                else:
                    stack.append((inside, mid, hi))
                    names = names - inside
                    hi = mid - 1
            for name in names:
                result[name] = lo
        return result

    def held(self, name: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` endpoint `name` holds (bisection, as the
        endpoint's blocks are prefix-closed)."""
        lru = self._lru.get(name)
        if lru is None:
            return 0
        return leading_in(hashes, lru, len(hashes))

    def record(
        self, name: str, hashes: Sequence[int], capacity: int, held: int | None = None,
        refresh: bool = True,
    ) -> None:
        """Remember that endpoint `name` now holds `hashes`; evict its least-recent blocks.

        The chain is made most recent back to front, so along any chain an endpoint's
        recency never increases with depth and eviction (least recent first) removes a
        chain's deepest blocks first. Hence each endpoint's blocks stay prefix-closed:
        holding block k means holding blocks 0..k-1, which `match` relies on. `held`, when
        the caller knows it (from `match`), is how many leading blocks the endpoint holds.

        `refresh=False` (what another EPP replica learned, see `epp.statesync`) leaves the
        held blocks' recency alone and adds the new ones as least recent, deepest first:
        the chains stay prefix-closed at a cost of O(new blocks), not O(prompt blocks).
        """
        if not len(hashes):
            return
        lru = self._lru.get(name)
        if lru is None:
            lru = self._lru[name] = OrderedDict()
        if held is None:
            held = 0
            for h in hashes:
                if h not in lru:
                    break
                held += 1
        new = hashes[held:]
        at_back = refresh or not held
        if new:
            before = len(lru)
            lru.update(zip(reversed(new), repeat(None)))
            if not at_back:  # each moved to the front: the deepest ends up least recent
                deque(map(lru.move_to_end, new, repeat(False)), 0)  # a loop in C
            self._size += len(lru) - before
            owners = self._owners
            # Blocks nobody holds yet (a prompt's unique tail) go in with one C-level update.
            shared = [h for h in new if h in owners]
            if not shared:
                owners.update(zip(new, repeat(name)))
            elif len(shared) < len(new):
                owners.update([(h, name) for h in new if h not in owners])
            for h in shared:
                o = owners[h]
                if o.__class__ is str:
                    if o != name:
                        owners[h] = {o, name}
                else:
                    o.add(name)  # type: ignore[union-attr]
        if at_back:
            move = lru.move_to_end
            for k in range(held - 1, -1, -1):
                move(hashes[k])
        capacity = max(1, capacity)
        if len(lru) > capacity:
            self._evict(name, lru, capacity)
        if self._size > self.max_total:
            # Over the global bound: trim every endpoint to a bit under an equal share
            # (rare: at most once per ~10% of the bound in new blocks).
            share = self.max_total // len(self._lru)
            target = max(1, share - share // 10)
            for n, other in list(self._lru.items()):
                if len(other) > target:
                    self._evict(n, other, target)

    def _evict(self, name: str, lru: OrderedDict[int, None], target: int) -> None:
        owners = self._owners
        pop = lru.popitem
        dropped = len(lru) - target
        for _ in range(dropped):
            h, _v = pop(last=False)
            o = owners.get(h)
            if o is None:
                continue
            if o.__class__ is str:
                if o == name:
                    del owners[h]
            else:
                self._drop_owner(h, name)
        self._size -= dropped

    def forget(self, name: str) -> None:
        """Drop everything known about an endpoint (it left the pool or was replaced)."""
        lru = self._lru.pop(name, None)
        if lru is None:
            return
        self._size -= len(lru)
        for h in lru:
            self._drop_owner(h, name)

    def retain(self, names: Iterable[str]) -> None:
        """Forget every endpoint not in `names`."""
        keep = set(names)
        for name in [n for n in self._lru if n not in keep]:
            self.forget(name)

    def _drop_owner(self, h: int, name: str) -> None:
        o = self._owners.get(h)
        if o is None:
            return
        if o.__class__ is str:
            if o == name:
                del self._owners[h]
            return
        o.discard(name)  # type: ignore[union-attr]
        if len(o) == 1:
            self._owners[h] = next(iter(o))
        elif not o:
            del self._owners[h]


DEFAULT_MAX_HOMES = 65_536


class PrefixHomes:
    """Prompt group -> its home endpoint: the first to serve it, kept while it holds it.

    A group is named by the hash of its first block (a shared system prompt). When a hot
    group spills to other endpoints, their caches hold it too and the index cannot tell
    them from the home; preferring the home among equal holders is what brings the group
    back to one endpoint once its load drops. Bounded LRU of `max_size` groups.
    """

    __slots__ = ("_home", "max_size")

    def __init__(self, max_size: int = DEFAULT_MAX_HOMES) -> None:
        self._home: OrderedDict[int, tuple[str, str]] = OrderedDict()
        self.max_size = max(1, max_size)

    def __len__(self) -> int:
        return len(self._home)

    def get(self, root: int) -> str | None:
        v = self._home.get(root)
        return v[0] if v is not None else None

    def settle(self, root: int, picked: str, holders: Iterable[str], request_id: str) -> None:
        """After a pick (or a data plane's report of where request `request_id` was really
        served): the group keeps its home while the home still holds it (is in `holders`);
        otherwise, or when the home was set by this same request (the report corrects the
        pick), `picked` becomes the home."""
        v = self._home.get(root)
        if v is not None and v[1] != request_id and v[0] in holders:
            self._home.move_to_end(root)
            return
        self._home[root] = (picked, request_id)
        self._home.move_to_end(root)
        if len(self._home) > self.max_size:
            self._home.popitem(last=False)
