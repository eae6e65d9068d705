"""Done records: a unit counts as written only once its record exists, and the record says what was written.

Each (split, epoch, shard) unit's arrays are written first; its record, ``done/<split>/eEEEEEE-sSSSSSS.json``,
last. The record holds a CRC32C digest of every array's bytes of the unit, so a reader checks what it
read against what the writer wrote: a flipped or truncated byte, a chunk that is missing (read back as
its fill value) or a chunk copied from another unit is refused, naming the unit and the array. All
records are found with one listing of ``done/``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import google_crc32c
import numpy as np

from store.objects import Objects

DONE = "done"
SPLITS = ("train", "val")


def digest(a: np.ndarray) -> str:
    """CRC32C (hardware, ~30 GB/s) of an array's dtype, shape and bytes, as 8 hex digits."""
    a = np.ascontiguousarray(a)
    head = f"{a.dtype.str}{a.shape}".encode()
    return f"{google_crc32c.extend(google_crc32c.value(head), a.tobytes()):08x}"


def unit_key(split: str, epoch: int, shard: int) -> str:
    return f"{DONE}/{split}/e{epoch:06d}-s{shard:06d}.json"


def write_record(objs: Objects, split: str, epoch: int, shard: int, rows: tuple[int, int],
                 arrays: dict[str, np.ndarray]) -> None:
    """Mark a unit done, with the digests of the arrays just written (call it after writing them)."""
    body = {"split": split, "epoch": int(epoch), "shard": int(shard), "rows": [int(r) for r in rows],
            "digests": {name: digest(a) for name, a in sorted(arrays.items())}}
    objs.put(unit_key(split, epoch, shard), json.dumps(body, sort_keys=True).encode())


def read_record(objs: Objects, split: str, epoch: int, shard: int) -> dict | None:
    """The unit's record, or None when the unit is not done (or its record cannot be read: then it is not
    done either, and the teacher stage writes it again)."""
    data = objs.get(unit_key(split, epoch, shard))
    if data is None:
        return None
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return body if isinstance(body, dict) and isinstance(body.get("digests"), dict) else None


def delete_record(objs: Objects, split: str, epoch: int, shard: int) -> None:
    objs.delete(unit_key(split, epoch, shard))


def done_units(objs: Objects, split: str) -> set[tuple[int, int]]:
    """(epoch, shard) of every unit of ``split`` with a record: one listing."""
    out = set()
    for key in objs.list(f"{DONE}/{split}"):
        name = key.rsplit("/", 1)[-1]
        if name.startswith("e") and name.endswith(".json") and "-s" in name:
            e, s = name[1:-5].split("-s")
            out.add((int(e), int(s)))
    return out


def mask(units: Iterable[tuple[int, int]], epochs: int, shards: int) -> np.ndarray:
    """(epochs, shards) bool from a set of (epoch, shard); units outside the shape are ignored."""
    m = np.zeros((epochs, shards), dtype=bool)
    for e, s in units:
        if 0 <= e < epochs and 0 <= s < shards:
            m[e, s] = True
    return m
