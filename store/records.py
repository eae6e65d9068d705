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
from store.provenance import StoreError

DONE = "done"


class DamagedUnit(StoreError):
    """A unit marked done whose arrays (or record) do not read back as written: a missing chunk, changed bytes,
    a chunk that belongs to another unit, or a record that does not parse. The teacher stage rewrites it;
    nothing may train on it."""


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


def _load(objs: Objects, key: str) -> dict | None:
    """A record's body, None when there is none; a record that exists (it is listed, so the unit counts as
    done) but does not parse is a DamagedUnit, which the teacher stage repairs, never "not done"."""
    data = objs.get(key)
    if data is None:
        return None
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        body = None
    if not isinstance(body, dict):
        raise DamagedUnit(f"logit store {objs.root}: record {key} is damaged (not a JSON object); re-run "
                          "`distill teacher` to rewrite its unit")
    return body


@dataclass(frozen=True)
class Record:
    """What the writer of one unit recorded, and whether the unit lives packed (``train/``) or staged."""

    rows: tuple[int, int]
    digests: dict[str, str]
    plan: str | None
    packed: bool


_EPOCHS: dict[tuple[str, int], dict] = {}
"""Epoch records read by this process (a packed epoch's record only changes when a repair unpacks it)."""


def epoch_record(objs: Objects, epoch: int, fresh: bool = False) -> dict | None:
    """A packed epoch's record, or None. Readers use the copy cached once read; whoever coordinates writers
    (claims, packing, repair) asks for a ``fresh`` one, as another process may have unpacked the epoch."""
    key = (objs.root, epoch)
    if fresh:
        _EPOCHS.pop(key, None)
    if key not in _EPOCHS:
        body = _load(objs, epoch_key(epoch))
        if body is None:
            return None
        _EPOCHS[key] = body
    return _EPOCHS[key]


def forget_epoch(objs: Objects, epoch: int) -> None:
    """Drop an epoch record (a repair unpacks the epoch) from the store and from this process's cache."""
    objs.delete(epoch_key(epoch))
    _EPOCHS.pop((objs.root, epoch), None)


def read_record(objs: Objects, split: str, epoch: int, shard: int, fresh: bool = False) -> Record | None:
    """The unit's record (from its epoch's record when packed), None when the unit is not done; DamagedUnit
    when its record exists but does not parse."""
    if split == "train":
        packed = epoch_record(objs, epoch, fresh)
        if packed is not None:
            units = packed.get("units")
            if not isinstance(units, dict) or str(shard) not in units:
                raise DamagedUnit(f"logit store {objs.root}: record {epoch_key(epoch)} lacks shard {shard}; re-run "
                                  "`distill teacher` to rewrite the epoch")
            return _record(units[str(shard)], True, objs, epoch_key(epoch))
    key = unit_key(split, epoch, shard)
    body = _load(objs, key)
    return _record(body, False, objs, key) if body is not None else None


def _record(body: dict, packed: bool, objs: Objects, key: str) -> Record:
    try:
        return Record(tuple(int(r) for r in body["rows"]), dict(body["digests"]), body.get("plan"), packed)
    except (KeyError, TypeError, ValueError) as e:
        raise DamagedUnit(f"logit store {objs.root}: record {key} is damaged ({type(e).__name__}: {e}); re-run "
                          "`distill teacher` to rewrite its unit") from e


def delete_record(objs: Objects, split: str, epoch: int, shard: int) -> None:
    objs.delete(unit_key(split, epoch, shard))


@dataclass(frozen=True)
class Done:
    """What one listing of ``done/`` says: the units with a unit record (by split), the packed stored epochs."""

    units: dict[str, set[tuple[int, int]]]
    packed: set[int]

    def split(self, split: str, shards: int) -> set[tuple[int, int]]:
        """(epoch, shard) of every done unit of ``split`` (a packed epoch's every shard)."""
        out = set(self.units.get(split, set()))
        if split == "train":
            out |= {(e, s) for e in self.packed for s in range(shards)}
        return out

    def unpacked_complete(self, epochs: int, shards: int) -> list[int]:
        """Stored epochs whose units are all done but that are not packed yet."""
        staged = self.units.get("train", set())
        return [e for e in range(epochs) if e not in self.packed and all((e, s) in staged for s in range(shards))]

    def leftovers(self) -> set[int]:
        """Packed epochs that still have unit records: what a packer killed after its epoch record left."""
        return {e for e, _ in self.units.get("train", set())} & self.packed


def listing(objs: Objects) -> Done:
    """Every done record of the store, from one listing of ``done/``."""
    units: dict[str, set[tuple[int, int]]] = {}
    packed: set[int] = set()
    for key in objs.list(DONE):
        parts = key.split("/")
        name = parts[-1]
        if len(parts) != 3 or not (name.startswith("e") and name.endswith(".json")):
            continue
        stem = name[1:-5]
        e, _, s = stem.partition("-s")
        if s and e.isdigit() and s.isdigit():
            units.setdefault(parts[1], set()).add((int(e), int(s)))
        elif not s and stem.isdigit() and parts[1] == "train":
            packed.add(int(stem))  # anything else in done/ is no record of this store's: not counted
    return Done(units, packed)


def done_units(objs: Objects, split: str, shards: int) -> tuple[set[tuple[int, int]], set[int]]:
    """((epoch, shard) of every done unit of ``split``, the packed epochs): one listing."""
    done = listing(objs)
    return done.split(split, shards), done.packed


def mask(units: Iterable[tuple[int, int]], epochs: int, shards: int) -> np.ndarray:
    """(epochs, shards) bool from a set of (epoch, shard); units outside the shape are ignored."""
    m = np.zeros((epochs, shards), dtype=bool)
    for e, s in units:
        if 0 <= e < epochs and 0 <= s < shards:
            m[e, s] = True
    return m
