"""vLLM's KV-cache event messages (`--kv-events-config`) -> plain event objects.

Wire format, as vLLM's `vllm/distributed/kv_events.py` publishes it: each ZeroMQ message
has three frames, `topic`, an 8-byte big-endian sequence number and a msgpack `EventBatch`
`[ts, events, data_parallel_rank]`. Each event is a msgspec tagged struct, and vLLM has
used two encodings for them:

- positional arrays (msgspec `array_like=True`, vLLM up to mid-2026):
  `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
  medium, lora_name, extra_keys, group_idx, ...]`, `["BlockRemoved", block_hashes, medium,
  group_idx]`, `["AllBlocksCleared"]`; trailing fields are absent in older versions;
- tagged maps (vLLM PR #42892 and later): `{"type": "BlockStored", "block_hashes": ...}`.

Both are accepted, decided per event from its first msgpack byte. Block hashes are
integers or bytes (vLLM's `ExternalBlockHash`); both are kept as they come, as opaque keys.
Fields added later than those named here are ignored, so a newer vLLM still decodes.

Decoding never raises anything but `DecodeError`, whose `reason` is a bounded label value.
Structural checks that need more than types (token count = blocks x block size) are the
index's (`KVBlockIndex.apply` counts such events as malformed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import msgspec

EngineHash = Union[int, bytes]
"""A block hash as the engine publishes it: opaque, only compared for equality."""

SEQ_BYTES = 8
END_OF_REPLAY = -1
"""The sequence number vLLM's replay socket sends after the last replayed batch."""


class DecodeError(ValueError):
    """A message that is not a valid event batch; `reason` is a metric label value."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# -- the events -----------------------------------------------------------------------
#
# The event classes are msgspec structs in vLLM's field order, so that a whole batch
# decodes in one typed pass (measured: ~2x faster than decoding each event on its own).
# The map-encoded variants subclass them: `isinstance(ev, BlockStored)` holds for both.

_Hash = EngineHash


class BlockStored(msgspec.Struct, array_like=True, tag=True, gc=False):
    block_hashes: list[_Hash]
    parent_block_hash: _Hash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    """One entry per block (multimodal hashes, cache salt, ...), or None."""
    group_idx: int | None = None


class BlockRemoved(msgspec.Struct, array_like=True, tag=True, gc=False):
    block_hashes: list[_Hash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, array_like=True, tag=True, gc=False):
    pass


class _StoredMap(BlockStored, array_like=False, tag_field="type", tag="BlockStored"):
    pass


class _RemovedMap(BlockRemoved, array_like=False, tag_field="type", tag="BlockRemoved"):
    pass


class _ClearedMap(AllBlocksCleared, array_like=False, tag_field="type", tag="AllBlocksCleared"):
    pass


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


@dataclass(frozen=True, slots=True)
class EventBatch:
    seq: int
    ts: float
    events: list[KVEvent]
    unknown: int = 0
    """Events skipped because their tag is not one of the three above (a newer engine)."""
    data_parallel_rank: int | None = None


# -- wire types ---------------------------------------------------------------------


class _ArrayBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[Union[BlockStored, BlockRemoved, AllBlocksCleared]]
    data_parallel_rank: int | None = None


class _MapEventsBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[Union[_StoredMap, _RemovedMap, _ClearedMap]]
    data_parallel_rank: int | None = None


class _RawBatchA(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


class _RawBatchM(msgspec.Struct):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


_fast = (msgspec.msgpack.Decoder(_ArrayBatch), msgspec.msgpack.Decoder(_MapEventsBatch))
_array_events = msgspec.msgpack.Decoder(Union[BlockStored, BlockRemoved, AllBlocksCleared])
_map_events = msgspec.msgpack.Decoder(Union[_StoredMap, _RemovedMap, _ClearedMap])
_array_batch = msgspec.msgpack.Decoder(_RawBatchA)
_map_batch = msgspec.msgpack.Decoder(_RawBatchM)
_any = msgspec.msgpack.Decoder()
_last_layout = 0
"""Which fast decoder worked last (publishers do not change layout between batches)."""

_KNOWN_TAGS = frozenset({"BlockStored", "BlockRemoved", "AllBlocksCleared"})


def _is_map(first: int) -> bool:
    return 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)


def _is_array(first: int) -> bool:
    return 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)


def decode_seq(frame: bytes) -> int:
    """The signed 8-byte big-endian sequence number frame."""
    if len(frame) != SEQ_BYTES:
        raise DecodeError("bad_frame", f"sequence frame of {len(frame)} bytes, want 8")
    return int.from_bytes(frame, "big", signed=True)


def decode_message(frames: list[bytes]) -> EventBatch:
    """A PUB message `[topic, seq, payload]` (or a replay reply `[seq, payload]`)."""
    if len(frames) == 3:
        frames = frames[1:]
    if len(frames) != 2:
        raise DecodeError("bad_frame", f"message of {len(frames)} frames, want 3")
    return decode_batch(decode_seq(frames[0]), frames[1])


def decode_batch(seq: int, payload: bytes) -> EventBatch:
    """One EventBatch. Fast path: the whole batch in one typed pass, in the layout that
    worked last; otherwise event by event (mixed layouts, unknown tags, errors)."""
    global _last_layout
    for k in (_last_layout, 1 - _last_layout):
        try:
            b = _fast[k].decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        _last_layout = k
        return EventBatch(seq, b.ts, b.events, 0, b.data_parallel_rank)  # type: ignore[arg-type]
    return _decode_slow(seq, payload)


def _decode_slow(seq: int, payload: bytes) -> EventBatch:
    if not payload:
        raise DecodeError("garbage", "empty payload")
    try:
        if _is_array(payload[0]):
            raw = _array_batch.decode(payload)
        elif _is_map(payload[0]):
            raw = _map_batch.decode(payload)
        else:
            raise DecodeError("garbage", "payload is not a msgpack array or map")
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise DecodeError("garbage", f"not an event batch: {e}") from None
    events: list[KVEvent] = []
    unknown = 0
    for r in raw.events:
        ev = _decode_event(bytes(r))
        if ev is None:
            unknown += 1
        else:
            events.append(ev)
    return EventBatch(seq, float(raw.ts), events, unknown, raw.data_parallel_rank)


def _decode_event(buf: bytes) -> KVEvent | None:
    """One event; None for a well-formed event with an unknown tag."""
    if not buf:
        raise DecodeError("garbage", "empty event")
    first = buf[0]
    dec = _array_events if _is_array(first) else _map_events if _is_map(first) else None
    if dec is None:
        raise DecodeError("garbage", "event is not a msgpack array or map")
    try:
        return dec.decode(buf)  # type: ignore[no-any-return]
    except msgspec.ValidationError as e:
        if _tag_of(buf) not in _KNOWN_TAGS:
            return None
        raise DecodeError("garbage", f"malformed event: {e}") from None
    except msgspec.DecodeError as e:
        raise DecodeError("garbage", f"malformed event: {e}") from None


def _tag_of(buf: bytes) -> Any:
    try:
        v = _any.decode(buf)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if isinstance(v, list) and v:
        return v[0]
    if isinstance(v, dict):
        return v.get("type")
    return None


# -- encoding (the simulator's publisher and the tests' fixtures) ------------------

_encoder = msgspec.msgpack.Encoder()
_AS_MAP = {BlockStored: _StoredMap, BlockRemoved: _RemovedMap, AllBlocksCleared: _ClearedMap}


def encode_batch(ts: float, events: list[KVEvent], *, layout: str = "array",
                 data_parallel_rank: int | None = 0) -> bytes:
    """A msgpack EventBatch as vLLM writes it; `layout` "array" (positional events, the
    long-standing format) or "map" (tagged maps, newer vLLM)."""
    if layout == "map":
        events = [_AS_MAP[type(ev)](**msgspec.structs.asdict(ev)) if type(ev) in _AS_MAP else ev
                  for ev in events]
    return _encoder.encode([ts, events, data_parallel_rank])


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(SEQ_BYTES, "big", signed=True)
