"""Done records: a unit counts as written only once its record exists, and the record says what was written.

Each (split, epoch, shard) unit's arrays are written first; its record, ``done/<split>/eEEEEEE-sSSSSSS.json``,
last. The record holds a CRC32C digest of every array's bytes of the unit (and of the mix plan the teacher
replayed), so a reader checks what it read against what the writer wrote: a flipped or truncated byte, a
chunk that is missing (read back as its fill value) or a chunk copied from another unit is refused,
naming the unit and the array. When a stored epoch is packed, one epoch record,
``done/train/eEEEEEE.json``, takes the place of its unit records. All records are found with one listing
of ``done/``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import google_crc32c
import numpy as np

from store.objects import Objects

DONE = "done"


def digest(a: np.ndarray) -> str:
    """CRC32C (hardware, ~30 GB/s) of an array's dtype, shape and bytes, as 8 hex digits."""
    a = np.ascontiguousarray(a)
    head = f"{a.dtype.str}{a.shape}".encode()
    return f"{google_crc32c.extend(google_crc32c.value(head), a.tobytes()):08x}"


def plan_digest(partner: np.ndarray, kind: np.ndarray, lam: np.ndarray) -> str:
    """The digest of a unit's mix plan (partner, kind, λ), in the dtypes every stage computes it in."""
    parts = (np.asarray(partner, np.int64), np.asarray(kind, np.uint8), np.asarray(lam, np.float32))
    return digest(np.concatenate([p.view(np.uint8).ravel() for p in map(np.ascontiguousarray, parts)]))


def unit_key(split: str, epoch: int, shard: int) -> str:
    return f"{DONE}/{split}/e{epoch:06d}-s{shard:06d}.json"


def epoch_key(epoch: int) -> str:
    return f"{DONE}/train/e{epoch:06d}.json"


def unit_body(rows: tuple[int, int], arrays: dict[str, np.ndarray], plan: str | None = None) -> dict:
    return {"rows": [int(r) for r in rows], "digests": {name: digest(a) for name, a in sorted(arrays.items())},
            "plan": plan}


def write_record(objs: Objects, split: str, epoch: int, shard: int, body: dict) -> None:
    """Mark a unit done (call it after writing its arrays): ``body`` from :func:`unit_body`."""
    objs.put(unit_key(split, epoch, shard), json.dumps({"split": split, "epoch": int(epoch), "shard": int(shard),
                                                        **body}, sort_keys=True).encode())


def write_epoch_record(objs: Objects, epoch: int, units: dict[int, dict]) -> None:
    """Mark a packed stored epoch done: its units' bodies (rows, digests, plan) by shard."""
    body = {"split": "train", "epoch": int(epoch), "packed": True, "units": {str(s): b for s, b in units.items()}}
    objs.put(epoch_key(epoch), json.dumps(body, sort_keys=True).encode())


def _load(data: bytes | None) -> dict | None:
    if data is None:
        return None
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # a damaged record: the unit is not done, and the teacher stage writes it again
    return body if isinstance(body, dict) else None


@dataclass(frozen=True)
class Record:
    """What the writer of one unit recorded, and whether the unit lives packed (``train/``) or staged."""

    rows: tuple[int, int]
    digests: dict[str, str]
    plan: str | None
    packed: bool


_EPOCHS: dict[tuple[str, int], dict] = {}
"""Epoch records read by this process (a packed epoch's record only changes when a repair unpacks it)."""


def epoch_record(objs: Objects, epoch: int) -> dict | None:
    """A packed epoch's record (cached once read), or None."""
    key = (objs.root, epoch)
    if key not in _EPOCHS:
        body = _load(objs.get(epoch_key(epoch)))
        if body is None:
            return None
        _EPOCHS[key] = body
    return _EPOCHS[key]


def forget_epoch(objs: Objects, epoch: int) -> None:
    """Drop an epoch record (a repair unpacks the epoch) from the store and from this process's cache."""
    objs.delete(epoch_key(epoch))
    _EPOCHS.pop((objs.root, epoch), None)


def read_record(objs: Objects, split: str, epoch: int, shard: int) -> Record | None:
    """The unit's record (from its epoch's record when packed), or None when the unit is not done."""
    if split == "train":
        packed = epoch_record(objs, epoch)
        if packed is not None and isinstance(packed.get("units"), dict) and str(shard) in packed["units"]:
            return _record(packed["units"][str(shard)], True)
    body = _load(objs.get(unit_key(split, epoch, shard)))
    return _record(body, False) if body is not None else None


def _record(body: dict, packed: bool) -> Record | None:
    try:
        return Record(tuple(int(r) for r in body["rows"]), dict(body["digests"]), body.get("plan"), packed)
    except (KeyError, TypeError, ValueError):
        return None


def delete_record(objs: Objects, split: str, epoch: int, shard: int) -> None:
    objs.delete(unit_key(split, epoch, shard))


def done_units(objs: Objects, split: str, shards: int) -> tuple[set[tuple[int, int]], set[int]]:
    """((epoch, shard) of every unit of ``split`` with a unit record, the packed epochs): one listing."""
    units, packed = set(), set()
    for key in objs.list(f"{DONE}/{split}"):
        name = key.rsplit("/", 1)[-1]
        if not (name.startswith("e") and name.endswith(".json")):
            continue
        stem = name[1:-5]
        if "-s" in stem:
            e, s = stem.split("-s")
            units.add((int(e), int(s)))
        elif stem.isdigit():
            packed.add(int(stem))
    return units | {(e, s) for e in packed for s in range(shards)}, packed


def mask(units: Iterable[tuple[int, int]], epochs: int, shards: int) -> np.ndarray:
    """(epochs, shards) bool from a set of (epoch, shard); units outside the shape are ignored."""
    m = np.zeros((epochs, shards), dtype=bool)
    for e, s in units:
        if 0 <= e < epochs and 0 <= s < shards:
            m[e, s] = True
    return m
