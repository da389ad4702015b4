"""The batch one replica appends to the shared Redis stream, and its strict decoder.

One stream entry carries what a replica learned during one sync interval:

- `v`: format version (`1`);
- `r`: the replica's id (who contributed it; its own entries are skipped when read back);
- `l` (optional): its in-flight load, JSON `{endpoint name: requests}` (see `RemoteLoad`);
  absent in an entry that only carries prefix records;
- `pm` + `ph` (optional): prefix records. `pm` is JSON `[[scorer, endpoint, capacity,
  blocks], ...]`; `ph` holds every record's block hashes back to back as little-endian
  uint64 (8 bytes per block), in the order of `pm`.

Whatever comes out of Redis is untrusted (another program may write the key, a proxy may
mangle bytes): `decode` checks every field and bound and raises `WireError`, which the
reader counts and skips, never crashing and never merging half an entry.
"""

from __future__ import annotations

import json
import sys
from array import array
from dataclasses import dataclass
from typing import Mapping, Sequence

VERSION = b"1"
MAX_NAME = 253
"""Longest replica, scorer or endpoint name accepted (a DNS name's limit)."""
MAX_RECORDS = 50_000
MAX_BLOCKS = 4096
MAX_COUNT = 1_000_000
MAX_CAPACITY = 1 << 31

_SWAP = sys.byteorder != "little"  # the wire is little-endian


class WireError(ValueError):
    """An entry that is not a well-formed batch of this format."""


@dataclass(frozen=True, slots=True)
class PrefixRecord:
    """`endpoint` now holds the chained `hashes`, learned by the scorer named `scorer`."""

    scorer: str
    endpoint: str
    capacity: int
    hashes: Sequence[int]


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
        fields[b"l"] = json.dumps(dict(load), separators=(",", ":")).encode()
    if records:
        meta = [[r.scorer, r.endpoint, r.capacity, len(r.hashes)] for r in records]
        fields[b"pm"] = json.dumps(meta, separators=(",", ":")).encode()
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
        doc = _json(raw_load, "load")
        if not isinstance(doc, dict) or len(doc) > MAX_RECORDS:
            raise WireError("load is not a bounded object")
        load = {}
        for k, v in doc.items():
            load[_name(k, "endpoint")] = _int(v, 0, MAX_COUNT, "load count")
    records: tuple[PrefixRecord, ...] = ()
    meta_raw, hashes_raw = fields.get(b"pm"), fields.get(b"ph")
    if (meta_raw is None) != (hashes_raw is None):
        raise WireError("prefix metadata and hashes must come together")
    if meta_raw is not None and hashes_raw is not None:
        records = _records(meta_raw, hashes_raw)
    return Batch(replica, load, records)


def _records(meta_raw: bytes, hashes_raw: bytes) -> tuple[PrefixRecord, ...]:
    meta = _json(meta_raw, "prefix metadata")
    if not isinstance(meta, list) or len(meta) > MAX_RECORDS:
        raise WireError("prefix metadata is not a bounded list")
    if len(hashes_raw) % 8:
        raise WireError("prefix hashes are not whole uint64 values")
    values = array("Q")
    values.frombytes(hashes_raw)
    if _SWAP:
        values.byteswap()
    flat = values.tolist()
    out: list[PrefixRecord] = []
    pos = 0
    for item in meta:
        if not isinstance(item, list) or len(item) != 4:
            raise WireError("prefix record is not [scorer, endpoint, capacity, blocks]")
        scorer = _name(item[0], "scorer")
        endpoint = _name(item[1], "endpoint")
        capacity = _int(item[2], 1, MAX_CAPACITY, "capacity")
        n = _int(item[3], 1, MAX_BLOCKS, "block count")
        if pos + n > len(flat):
            raise WireError("prefix metadata names more blocks than were sent")
        out.append(PrefixRecord(scorer, endpoint, capacity, flat[pos:pos + n]))
        pos += n
    if pos != len(flat):
        raise WireError("prefix hashes left over after the last record")
    return tuple(out)


def _json(raw: bytes, what: str) -> object:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise WireError(f"{what} is not JSON") from None


def _name(v: object, what: str) -> str:
    if isinstance(v, bytes):
        try:
            v = v.decode()
        except UnicodeDecodeError:
            raise WireError(f"{what} is not UTF-8") from None
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME:
        raise WireError(f"{what} name missing or too long")
    return v


def _int(v: object, lo: int, hi: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise WireError(f"{what} out of range")
    return v
