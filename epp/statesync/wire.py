"""The batch one replica appends to the shared Redis stream, and its strict decoder.

One stream entry carries what a replica learned during one sync interval:

- `v`: format version (`2`; entries of another version are counted and skipped);
- `r`: the replica's id (who contributed it; its own entries are skipped when read back);
- `l` (optional): its in-flight load, a MessagePack map `{endpoint name: requests}` (see
  `RemoteLoad`); absent in an entry that only carries prefix records;
- `pm` + `ph` (optional): prefix records. `pm` is a MessagePack array of
  `[scorer, endpoint, capacity, blocks, continues]`; `ph` holds every record's block hashes
  back to back as little-endian uint64 (8 bytes per block), in the order of `pm`.
  `continues` (a record's first hash is a block the sender already sent for that endpoint,
  followed by the new ones) lets a shared prefix cross the stream once per endpoint
  instead of once per request (see `StateSync`).

MessagePack (msgspec) rather than JSON: the metadata is validated in C against the types
and bounds below, which halves the decoding cost per record.

Whatever comes out of Redis is untrusted (another program may write the key, a proxy may
mangle bytes): `decode` checks every field and bound and raises `WireError`, which the
reader counts and skips, never crashing and never merging half an entry.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass
from typing import Annotated, Mapping, Sequence

import msgspec

VERSION = b"2"
MAX_NAME = 253
"""Longest replica, scorer or endpoint name accepted (a DNS name's limit)."""
MAX_RECORDS = 50_000
MAX_BLOCKS = 4096
MAX_COUNT = 1_000_000
MAX_CAPACITY = 1 << 31

_SWAP = sys.byteorder != "little"  # the wire is little-endian

_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
_Row = tuple[_Name, _Name, Annotated[int, msgspec.Meta(ge=1, le=MAX_CAPACITY)],
             Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCKS)], bool]
_LOAD = msgspec.msgpack.Decoder(Annotated[
    dict[_Name, Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]],
    msgspec.Meta(max_length=MAX_RECORDS)])
_META = msgspec.msgpack.Decoder(Annotated[list[_Row], msgspec.Meta(max_length=MAX_RECORDS)])
_encode = msgspec.msgpack.Encoder().encode


class WireError(ValueError):
    """An entry that is not a well-formed batch of this format."""


@dataclass(frozen=True, slots=True)
class PrefixRecord:
    """`endpoint` now holds the chained `hashes`, learned by the scorer named `scorer`.

    `continues`: `hashes[0]` was sent before (the receiver must hold it already; the
    record then adds the blocks after it), else the chain starts at the prompt's start."""

    scorer: str
    endpoint: str
    capacity: int
    hashes: Sequence[int]
    continues: bool = False


@dataclass(frozen=True, slots=True)
class Batch:
    replica: str
    load: dict[str, int] | None
    records: tuple[PrefixRecord, ...]


def encode(replica: str, load: Mapping[str, int] | None,
           records: Sequence[PrefixRecord]) -> dict[bytes, bytes]:
    """The stream entry's fields for one batch."""
    fields: dict[bytes, bytes] = {b"v": VERSION, b"r": replica.encode()}
    if load is not None:
        fields[b"l"] = _encode(load)
    if records:
        fields[b"pm"] = _encode([(r.scorer, r.endpoint, r.capacity, len(r.hashes), r.continues)
                                 for r in records])
        hashes = array("Q")
        for r in records:
            hashes.extend(r.hashes)
        if _SWAP:
            hashes.byteswap()
        fields[b"ph"] = hashes.tobytes()
    return fields


def decode(fields: Mapping[bytes, bytes]) -> Batch:
    """Parse one stream entry; raises `WireError` for anything but a valid batch."""
    if fields.get(b"v") != VERSION:
        raise WireError("unknown format version")
    replica = _name(fields.get(b"r"), "replica")
    load = None
    raw_load = fields.get(b"l")
    if raw_load is not None:
        load = _msgpack(_LOAD, raw_load, "load")
    records: tuple[PrefixRecord, ...] = ()
    meta_raw, hashes_raw = fields.get(b"pm"), fields.get(b"ph")
    if (meta_raw is None) != (hashes_raw is None):
        raise WireError("prefix metadata and hashes must come together")
    if meta_raw is not None and hashes_raw is not None:
        records = _records(meta_raw, hashes_raw)
    return Batch(replica, load, records)


def _records(meta_raw: bytes, hashes_raw: bytes) -> tuple[PrefixRecord, ...]:
    meta = _msgpack(_META, meta_raw, "prefix metadata")
    if len(hashes_raw) % 8:
        raise WireError("prefix hashes are not whole uint64 values")
    values = array("Q")
    values.frombytes(hashes_raw)
    if _SWAP:
        values.byteswap()
    flat = values.tolist()
    if sum(row[3] for row in meta) != len(flat):
        raise WireError("prefix metadata and hashes disagree on the number of blocks")
    out: list[PrefixRecord] = []
    pos = 0
    for scorer, endpoint, capacity, n, continues in meta:
        if continues and n < 2:
            raise WireError("a continuing record needs its known block and a new one")
        out.append(PrefixRecord(scorer, endpoint, capacity, flat[pos:pos + n], continues))
        pos += n
    return tuple(out)


def _msgpack(decoder: msgspec.msgpack.Decoder, raw: bytes, what: str) -> object:
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as e:
        raise WireError(f"{what}: {str(e)[:200]}") from None
    except msgspec.DecodeError:
        raise WireError(f"{what} is not MessagePack") from None


def _name(v: object, what: str) -> str:
    if isinstance(v, bytes):
        try:
            v = v.decode()
        except UnicodeDecodeError:
            raise WireError(f"{what} is not UTF-8") from None
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME:
        raise WireError(f"{what} name missing or too long")
    return v
