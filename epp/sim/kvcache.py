"""A paged KV cache with prefix caching, shaped like vLLM V1's block pool.

`num_blocks` blocks of `block_size` tokens. A block is either held by running
sequences (reference count > 0) or free. Free blocks sit in one LRU queue; a free block
may still hold a cached prefix (its hash stays findable) until allocation takes it from
the head of the queue and drops the hash: that is the LRU eviction. Sequences return
their blocks tail-first, so the ends of prompts are evicted before their shared starts.

Usage, as vLLM reports it, counts only held blocks: cached-but-free blocks are free.

With `record_events` on, the cache keeps the KV events vLLM would publish, in order:
`BlockStored` when blocks become findable (with their token ids and the parent block's
hash), `BlockRemoved` when eviction drops a hash, `AllBlocksCleared` on a reset; the
engine hands them to the publisher after each step (`take_events`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from epp.kvevents.decode import AllBlocksCleared, BlockRemoved, BlockStored


class KVCache:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash_of: list[int | None] = [None] * num_blocks
        self._by_hash: dict[int, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.events: list[Any] | None = None
        """Pending KV events, or None when not recording."""

    # -- queries -------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached(self) -> int:
        """Blocks whose prefix hash is findable (held or free)."""
        return len(self._by_hash)

    def cached_prefix(self, hashes: tuple[int, ...]) -> list[int]:
        """Block ids of the longest cached prefix of `hashes` (no state change)."""
        if not self.enable_prefix_caching:
            return []
        out = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- changes -------------------------------------------------------------------

    def can_allocate(self, hit_blocks: list[int], total_blocks: int) -> bool:
        """Whether `total_blocks` can be held with `hit_blocks` reused from the cache."""
        reclaimed_from_free = sum(1 for b in hit_blocks if self._ref[b] == 0)
        new = total_blocks - len(hit_blocks)
        return new <= len(self._free) - reclaimed_from_free

    def allocate(self, hit_blocks: list[int], total_blocks: int) -> list[int]:
        """Hold the cached `hit_blocks` plus fresh blocks up to `total_blocks`.

        Call `can_allocate` first; raises MemoryError when the pool is short.
        """
        if not self.can_allocate(hit_blocks, total_blocks):
            raise MemoryError("KV cache has too few free blocks")
        for b in hit_blocks:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1
        blocks = list(hit_blocks)
        for _ in range(total_blocks - len(hit_blocks)):
            blocks.append(self._take_free())
        return blocks

    def append_block(self) -> int | None:
        """One more fresh block for a growing sequence, or None when the pool is empty."""
        if not self._free:
            return None
        return self._take_free()

    def _take_free(self) -> int:
        b, _ = self._free.popitem(last=False)
        h = self._hash_of[b]
        if h is not None:  # evict the cached prefix this block held
            self._hash_of[b] = None
            if self._by_hash.get(h) == b:
                del self._by_hash[h]
                if self.events is not None:
                    last = self.events[-1] if self.events else None
                    if isinstance(last, BlockRemoved):
                        last.block_hashes.append(h)
                    else:
                        self.events.append(BlockRemoved([h], "GPU"))
        self._ref[b] = 1
        return b

    def commit(self, blocks: list[int], hashes: tuple[int, ...],
               token_ids: Sequence[int] | None = None, lora_name: str | None = None) -> None:
        """Make the first len(hashes) of `blocks` findable by hash (their KV is computed)."""
        if not self.enable_prefix_caching:
            return
        stored: list[int] = []
        first = 0
        for i, (b, h) in enumerate(zip(blocks, hashes)):
            if self._hash_of[b] is not None or h in self._by_hash:
                self._stored_event(hashes, first, stored, token_ids, lora_name)
                stored = []
                first = i + 1
                continue  # already cached (possibly another block with the same content)
            self._hash_of[b] = h
            self._by_hash[h] = b
            stored.append(h)
        self._stored_event(hashes, first, stored, token_ids, lora_name)

    def _stored_event(self, hashes: tuple[int, ...], first: int, stored: list[int],
                      token_ids: Sequence[int] | None, lora_name: str | None) -> None:
        """One BlockStored for the run of blocks first..first+len(stored)-1."""
        if self.events is None or not stored or token_ids is None:
            return
        bs = self.block_size
        self.events.append(BlockStored(
            block_hashes=stored, parent_block_hash=hashes[first - 1] if first else None,
            token_ids=list(token_ids[first * bs:(first + len(stored)) * bs]), block_size=bs,
            medium="GPU", lora_name=lora_name))

    def take_events(self) -> list[Any]:
        """The events recorded since the last call (empty when not recording)."""
        ev = self.events
        if not ev:
            return []
        self.events = []
        return ev

    def free(self, blocks: list[int]) -> None:
        """Release a sequence's blocks, last block first (it is the first to evict)."""
        for b in reversed(blocks):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None
            elif self._ref[b] < 0:  # a bug in the caller; keep the pool consistent
                self._ref[b] = 0
                raise RuntimeError(f"block {b} freed twice")

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (held blocks keep their contents, unfindable)."""
        for h, b in list(self._by_hash.items()):
            self._hash_of[b] = None
        self._by_hash.clear()
        if self.events is not None:
            self.events.append(AllBlocksCleared())
