"""Shared by the KV-event intake tests (connected and bound): block ids, keys, one-block
stores, the fault counter, and waiting for a condition on the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from epp import observability as obs
from epp.kvevents.decode import BlockStored
from epp.kvevents.index import block_keys, root_key

BS = 4


def blocks(first: int, n: int) -> list[int]:
    """Token ids of `n` full blocks starting at `first`."""
    return list(range(first, first + n * BS))


def keys(tokens: list[int]) -> list[int]:
    return block_keys(tokens, BS, root_key(None))


def store(h: int, tokens: list[int], parent: int | None = None) -> list[object]:
    """One `BlockStored` of engine hash `h`, as an event list for a publisher."""
    return [BlockStored((h,), parent, tokens, BS, None, "GPU")]


def errors(reason: str) -> float:
    return obs.REGISTRY.get_sample_value("inference_extension_kv_events_errors_total",
                                         {"reason": reason}) or 0.0


async def until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)
