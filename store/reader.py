"""Reading the logit store: whole units, each checked against its done record before a row is used.

The student joins its replayed views with stored targets by (epoch, global index); a unit is read
with one slice per array (one chunk each), never row by row, and refused (naming the store, the unit
and the array) when a chunk is missing, damaged or from another unit.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from store.blocks import read_rows
from store.create import open_store
from store.layout import STAGE, TRAIN_TARGETS, VAL_TARGETS, array, no_data, spec_of
from store.objects import objects_of
from store.provenance import ProvenanceMismatch, StoreError
from store.records import DamagedUnit, Record, digest, done_units, mask, read_record

__all__ = [
    "DamagedUnit",
    "MissingUnit",
    "ProvenanceMismatch",
    "StoreError",
    "TrainUnit",
    "ValUnit",
    "done_mask",
    "packed_epochs",
    "open_store",
    "read_train_rows",
    "read_train_unit",
    "read_val",
    "read_val_unit",
    "val_done_mask",
]


class MissingUnit(StoreError):
    """A unit asked for is not marked done (the teacher stage has not written it, or crashed on it)."""


@dataclass
class TrainUnit:
    epoch: int
    shard: int
    start: int
    end: int
    topk_logits: np.ndarray  # (n, k) float32 (stored as float16)
    topk_classes: np.ndarray  # (n, k)
    logsumexp: np.ndarray  # (n,) float32, full logits at temperature 1
    label: np.ndarray | None  # (n,) true labels (None from a read of a few rows: the labels are not fetched)
    plan: str | None  # digest of the mix plan the teacher replayed (store.records.plan_digest)

    @property
    def hard_label(self) -> np.ndarray:
        """(n,) the argmax of the full teacher logits: the first stored class (stable top-k)."""
        return self.topk_classes[:, 0]


@dataclass
class ValUnit:
    start: int
    end: int
    topk_logits: np.ndarray
    topk_classes: np.ndarray
    logsumexp: np.ndarray
    label: np.ndarray

    @property
    def hard_label(self) -> np.ndarray:
        return self.topk_classes[:, 0]


def _where(group: zarr.Group, split: str, epoch: int, shard: int) -> str:
    unit = f"epoch {epoch}, shard {shard}" if split == "train" else f"shard {shard}"
    return f"logit store {objects_of(group).root}: {split} unit ({unit})"


_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _pool() -> ThreadPoolExecutor:
    """Threads that wait on zarr's reads (one pool per process: a forked DataLoader worker makes its own)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=8, thread_name_prefix="store-read"))
    return _POOL[1]


def _read(group: zarr.Group, reads: dict[str, tuple[str, Any]], where: str) -> dict[str, np.ndarray]:
    """Every ``name: (array, selection)`` at once (zarr's event loop fetches and decodes them concurrently: one
    round trip of latency on an object store, not eight); a chunk zarr cannot read is a DamagedUnit naming the
    array."""
    futures = {name: _pool().submit(array(group, path).__getitem__, sel) for name, (path, sel) in reads.items()}
    out = {}
    for name, future in futures.items():
        path = reads[name][0]
        try:
            got = future.result()
        except OSError as e:
            if isinstance(e, FileNotFoundError):
                raise _damaged(where, path, e) from e
            # a timeout, throttling, an expired credential, a permission: the store may be fine, so this is no
            # damage for the teacher to "repair" (it would drop good units), but an error naming the array
            raise StoreError(f"{where}, array {path}: cannot be read now ({type(e).__name__}: {e}); the "
                             "unit is not known to be damaged: retry when the storage answers") from e
        except Exception as e:  # zarr's CRC32C, the decompressor or a chunk gone from under its record
            raise _damaged(where, path, e) from e
        out[name] = np.asarray(got)
    return out


def _damaged(where: str, path: str, e: BaseException) -> DamagedUnit:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return DamagedUnit(f"{where}, array {path}: cannot be read ({type(e).__name__}: {first}); "
                       "re-run `distill teacher` to rewrite the unit")


def _check(where: str, prefix: str, record: Record, rows: tuple[int, int], arrays: dict[str, np.ndarray]) -> None:
    """Refuse the unit unless every array matches the digest its writer recorded (``prefix``: where the
    unit's arrays are, for the message)."""
    if record.rows != rows:
        raise DamagedUnit(f"{where}: its record covers rows {list(record.rows)}, the store's layout {list(rows)}")
    for name, a in arrays.items():
        if record.digests.get(name) == digest(a):
            continue
        fill = no_data(a.dtype)
        missing = bool(np.isnan(a).all()) if a.dtype.kind == "f" else bool((a == fill).all())
        cause = ("its chunk is missing (it reads back as the fill value)" if missing
                 else "its bytes differ from what the writer recorded (damaged, or from another unit)")
        path = "train/label" if name == "label" and prefix.endswith("train") else f"{prefix}/{name}"
        raise DamagedUnit(f"{where}, array {path}: {cause}; re-run `distill teacher` to rewrite the unit")


def done_mask(group: zarr.Group) -> np.ndarray:
    """(E, S) bool: which (epoch, shard) train units are complete (one listing of the done records)."""
    spec = spec_of(group)
    return mask(done_units(objects_of(group), "train", spec.n_shards)[0], spec.epochs, spec.n_shards)


def packed_epochs(group: zarr.Group) -> set[int]:
    """The stored epochs that are packed (one object per array)."""
    return done_units(objects_of(group), "train", spec_of(group).n_shards)[1]


def val_done_mask(group: zarr.Group, split: str = "val") -> np.ndarray:
    """(S,) bool: which shards of a split of evaluation views (``val``, ``clean``) are complete."""
    n = len(spec_of(group).view_ranges(split))
    return mask(done_units(objects_of(group), split, n)[0], 1, n)[0]


def _unit_arrays(group: zarr.Group, epoch: int, shard: int, record: Record, where: str) -> dict[str, np.ndarray]:
    a, b = spec_of(group).train_ranges[shard]
    base = "train" if record.packed else f"{STAGE}/train"
    reads = {name: (f"{base}/{name}", (epoch, slice(a, b))) for name in TRAIN_TARGETS}
    arrays = _read(group, {**reads, "label": ("train/label", slice(a, b))}, where)
    _check(where, base, record, (a, b), arrays)
    return arrays


def read_train_unit(group: zarr.Group, epoch: int, shard: int) -> TrainUnit:
    """All stored targets of one (epoch, shard) and the digest of its mix plan, checked against the unit's
    record: MissingUnit if it is not done, DamagedUnit if it does not read back as written."""
    spec = spec_of(group)
    if not 0 <= epoch < spec.epochs or not 0 <= shard < spec.n_shards:
        raise StoreError(
            f"read_train_unit: (epoch={epoch}, shard={shard}) outside the store's {spec.epochs} epochs "
            f"x {spec.n_shards} shards"
        )
    where, objs = _where(group, "train", epoch, shard), objects_of(group)
    record = read_record(objs, "train", epoch, shard)
    if record is None:
        raise MissingUnit(f"{where}: no data (not marked done); re-run the teacher stage to fill it")
    try:
        arrays = _unit_arrays(group, epoch, shard, record, where)
    except DamagedUnit:
        packed = read_record(objs, "train", epoch, shard)  # packed by another writer while this one read?
        if record.packed or packed is None or not packed.packed:
            raise
        record, arrays = packed, _unit_arrays(group, epoch, shard, packed, where)
    a, b = spec.train_ranges[shard]
    return TrainUnit(epoch, shard, a, b, arrays["topk_logits"].view(np.float16).astype(np.float32),
                     arrays["topk_classes"], arrays["logsumexp"], arrays["label"], record.plan)


def read_train_rows(group: zarr.Group, epoch: int, shard: int, lo: int, hi: int,
                    packed: bool | None = None) -> TrainUnit:
    """Rows ``lo .. hi - 1`` (global indices inside the unit) of one (epoch, shard) unit, checked: from a packed
    epoch, only the blocks they fall in (:mod:`store.blocks`: a handful of range requests, no record, labels not
    fetched); otherwise the whole unit, checked against its record, cut to the rows. ``packed``: whether the
    epoch is packed, when the caller knows (from its listing of the done records); None: read the record."""
    spec = spec_of(group)
    a, b = spec.train_ranges[shard]
    if not a <= lo < hi <= b:
        raise StoreError(f"read_train_rows: rows [{lo}, {hi}) are not in shard {shard}'s [{a}, {b})")
    where = _where(group, "train", epoch, shard)
    if packed is None:
        record = read_record(objects_of(group), "train", epoch, shard)
        if record is None:
            raise MissingUnit(f"{where}: no data (not marked done); re-run the teacher stage to fill it")
        packed = record.packed
    found = read_rows(group, epoch, lo, hi, where) if packed else None
    if found is None:  # staged, or packed before block tables: the whole unit
        u = read_train_unit(group, epoch, shard)
        cut = slice(lo - a, hi - a)
        return TrainUnit(epoch, shard, lo, hi, u.topk_logits[cut], u.topk_classes[cut], u.logsumexp[cut],
                         u.label[cut], u.plan)
    arrays, plan = found
    return TrainUnit(epoch, shard, lo, hi, arrays["topk_logits"].view(np.float16).astype(np.float32),
                     arrays["topk_classes"], arrays["logsumexp"], None, plan)


def read_val_unit(group: zarr.Group, shard: int, split: str = "val") -> ValUnit:
    """One shard of evaluation views (``val``, or the ``clean`` pass over the training images), checked against
    its record (MissingUnit, DamagedUnit)."""
    spec = spec_of(group)
    where = _where(group, split, 0, shard)
    record = read_record(objects_of(group), split, 0, shard)
    if record is None:
        raise MissingUnit(f"{where}: no data (not marked done); re-run the teacher stage to fill it")
    a, b = spec.view_ranges(split)[shard]
    arrays = _read(group, {name: (f"{split}/{name}", slice(a, b)) for name in VAL_TARGETS}, where)
    _check(where, split, record, (a, b), arrays)
    return ValUnit(a, b, arrays["topk_logits"].view(np.float16).astype(np.float32), arrays["topk_classes"],
                   arrays["logsumexp"], arrays["label"])


def read_val(group: zarr.Group, split: str = "val") -> ValUnit:
    """All rows of a split of evaluation views, every unit checked; MissingUnit naming the shards not done."""
    ranges = spec_of(group).view_ranges(split)
    done = val_done_mask(group, split)
    if not done.all():
        raise MissingUnit(f"logit store: {split} shards {np.flatnonzero(~done).tolist()} are not marked done")
    units = [read_val_unit(group, s, split) for s in range(len(ranges))]
    fields = ("topk_logits", "topk_classes", "logsumexp", "label")
    n = ranges[-1][1] if ranges else 0
    return ValUnit(0, n, **{f: np.concatenate([getattr(u, f) for u in units]) for f in fields})
