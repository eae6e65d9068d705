"""Packing: a stored epoch whose units are all done becomes one object per array.

Writers fill ``stage/`` one unit (one chunk per array) at a time. Once every unit of a stored epoch is
done, one writer (it holds the epoch's "pack" claim) reads them back, checked, writes each array's
epoch whole into ``train/`` (zarr's sharding codec: one object per array and epoch, every chunk still
readable by byte range), writes the epoch's record with every unit's digests, and deletes the unit
records and staged chunks. A packer killed half-way leaves either the staged epoch (packed again
later) or both (the leftovers are deleted by :func:`tidy`); a reader always finds one complete copy.
"""

from __future__ import annotations

import numpy as np
import zarr

from store.blocks import packed_key, table_key, write_table
from store.layout import STAGE, TRAIN_TARGETS, array, spec_of
from store.objects import objects_of
from store.reader import MissingUnit, _unit_arrays, _where, done_mask, packed_epochs
from store.records import (
    DamagedUnit,
    Done,
    delete_record,
    forget_epoch,
    listing,
    read_record,
    unit_body,
    write_epoch_record,
    write_record,
)


def unpacked_complete(group: zarr.Group) -> list[int]:
    """Stored epochs whose units are all done but not packed yet."""
    done, packed = done_mask(group), packed_epochs(group)
    return [int(e) for e in np.flatnonzero(done.all(axis=1)) if int(e) not in packed]


def _staged_keys(group: zarr.Group, epoch: int, shard: int) -> list[str]:
    keys = []
    for name in TRAIN_TARGETS:
        arr = array(group, f"{STAGE}/train/{name}")
        coords = (epoch, shard) + (0,) * (arr.ndim - 2)
        keys.append(f"{STAGE}/train/{name}/{arr.metadata.encode_chunk_key(coords)}")
    return keys


def _drop_packed(group: zarr.Group, epoch: int) -> None:
    """Delete a stored epoch's packed objects and block table: zarr would read a damaged object back before
    overwriting it."""
    objs = objects_of(group)
    objs.delete(table_key(epoch))
    for name in TRAIN_TARGETS:
        objs.delete(packed_key(group, name, epoch))


def _drop_staged(group: zarr.Group, epoch: int) -> None:
    objs = objects_of(group)
    for shard in range(spec_of(group).n_shards):
        for key in _staged_keys(group, epoch, shard):
            objs.delete(key)
        delete_record(objs, "train", epoch, shard)


def pack_epoch(group: zarr.Group, epoch: int) -> None:
    """Pack one complete stored epoch (every unit checked as it is read back)."""
    spec, objs = spec_of(group), objects_of(group)
    records, columns = {}, {name: [] for name in TRAIN_TARGETS}
    for shard in range(spec.n_shards):
        record = read_record(objs, "train", epoch, shard, fresh=shard == 0)  # not a copy cached before a repair
        if record is None:
            raise MissingUnit(f"{_where(group, 'train', epoch, shard)}: not done, so epoch {epoch} cannot be packed")
        if record.packed:
            return  # another writer packed it meanwhile
        arrays = _unit_arrays(group, epoch, shard, record, _where(group, "train", epoch, shard))
        for name in TRAIN_TARGETS:
            columns[name].append(arrays[name])
        records[shard] = {"rows": list(record.rows), "digests": record.digests, "plan": record.plan}
    _drop_packed(group, epoch)  # what a packer killed half-way, or a damaged copy, left: written anew, whole
    columns = {name: np.concatenate(parts) for name, parts in columns.items()}
    for name in TRAIN_TARGETS:
        array(group, f"train/{name}")[epoch] = columns[name]  # one writer writes the epoch's object whole
    write_table(group, epoch, columns, [records[s]["plan"] for s in range(spec.n_shards)])
    write_epoch_record(objs, epoch, records)
    _drop_staged(group, epoch)


def tidy(group: zarr.Group, done: Done | None = None) -> None:
    """Delete the unit records and staged chunks that a packer killed after its epoch record left behind
    (``done``: a listing of the done records just made)."""
    done = done if done is not None else listing(objects_of(group))
    for epoch in sorted(done.leftovers()):
        _drop_staged(group, epoch)


def unpack_epoch(group: zarr.Group, epoch: int, damaged: set[int]) -> None:
    """Turn a packed epoch back into staged units, all but the damaged shards (those known, ``damaged``, and
    any found on the way: they are computed again and the epoch packed anew). The epoch record is dropped
    first, so a packer's tidying never takes the restaged units for leftovers; a crash on the way leaves the
    shards not yet restaged to be computed again. A damaged epoch record drops the whole epoch."""
    spec, objs = spec_of(group), objects_of(group)
    try:
        records = {s: read_record(objs, "train", epoch, s, fresh=s == 0) for s in range(spec.n_shards)}
    except DamagedUnit:
        forget_epoch(objs, epoch)
        _drop_packed(group, epoch)
        return
    if not any(r is not None and r.packed for r in records.values()):
        return  # unpacked by another process meanwhile
    forget_epoch(objs, epoch)
    for shard, record in records.items():
        if shard in damaged or record is None:
            continue
        try:
            arrays = _unit_arrays(group, epoch, shard, record, _where(group, "train", epoch, shard))
        except DamagedUnit:
            continue
        a, b = spec.train_ranges[shard]
        for name in TRAIN_TARGETS:
            array(group, f"{STAGE}/train/{name}")[epoch, a:b] = arrays[name]
        write_record(objs, "train", epoch, shard, unit_body((a, b), arrays, record.plan))
    _drop_packed(group, epoch)  # restaged: the packed copy (maybe damaged) is no longer any unit's
