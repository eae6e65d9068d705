"""Reading a few rows of a packed stored epoch: the blocks they fall in, in a handful of range requests.

A packed epoch holds each array in one object (zarr's sharding), chunked in blocks of ``spec.block`` rows (the
mixing window when it divides the shard size), and the packer writes beside the epoch's record a *block
table*, ``done/train/eEEEEEE.blocks``: for every block and array, the byte offset and size of its chunk in the
object and a CRC32C digest of its decoded rows. A reader that trains rows ``lo .. hi - 1`` of a unit fetches
their entries of the table (one range request; they also hold the digest of the unit's mix plan), then each
array's chunks for those blocks (one range request per array: a shard's chunks are contiguous), checks every
chunk's own CRC32C and the digest of its rows, and decodes it with the same codecs zarr wrote it with
(numcodecs' Blosc, GZip and Delta). Nothing else is read: no record, no shard index, no whole unit.
"""

from __future__ import annotations

import zlib
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr

from store.layout import TRAIN_TARGETS, array, array_layout, spec_of
from store.objects import Objects, objects_of
from store.records import DONE, DamagedUnit, digest

ENTRY = np.dtype([("offset", "<u8"), ("nbytes", "<u8"), ("digest", "<u4"), ("plan", "<u4")])
"""One chunk's entry in a block table: where its bytes are, the digest of its rows, and the digest of the mix plan
of the unit it belongs to (so a reader of a few rows needs no record)."""
PACKED = len(TRAIN_TARGETS)


def table_key(epoch: int) -> str:
    return f"{DONE}/train/e{epoch:06d}.blocks"


def packed_key(group: zarr.Group, name: str, epoch: int) -> str:
    """The object of one packed array of one stored epoch."""
    arr = array(group, f"train/{name}")
    return f"train/{name}/{arr.metadata.encode_chunk_key((epoch,) + (0,) * (arr.ndim - 1))}"


def _crc(a: np.ndarray) -> int:
    return int(digest(a), 16)


def write_table(group: zarr.Group, epoch: int, columns: dict[str, np.ndarray], plans: list[str | None]) -> None:
    """Write the block table of a stored epoch just packed from ``columns`` (every array's rows of the epoch):
    the chunks' places, from the shard index zarr wrote at the end of each object, their rows' digests, and the
    digest of each block's unit's mix plan (``plans``, by shard)."""
    spec, objs = spec_of(group), objects_of(group)
    b, n = spec.block_rows, -(-spec.n_train // spec.block_rows)
    per_shard = array_layout(spec)[f"train/{TRAIN_TARGETS[0]}"].shards[1] // b
    table = np.zeros((n, PACKED), dtype=ENTRY)
    unit = np.arange(n) * b // spec.shard_size  # blocks divide shards: a block is in one unit
    table["plan"] = np.array([int(plans[s] or "0", 16) for s in unit], dtype=np.uint32)[:, None]
    for j, name in enumerate(TRAIN_TARGETS):
        raw = objs.get_range(packed_key(group, name, epoch), -(16 * per_shard + 4))
        index = np.frombuffer(raw[:-4], "<u8").reshape(per_shard, 2)
        rows = columns[name]
        table["offset"][:, j], table["nbytes"][:, j] = index[:n, 0], index[:n, 1]
        table["digest"][:, j] = [_crc(rows[k * b : (k + 1) * b]) for k in range(n)]
    objs.put(table_key(epoch), table.tobytes())


def _decoder(spec: Any, name: str) -> tuple[np.dtype, tuple[int, ...], Any]:
    a = array_layout(spec)[f"train/{name}"]
    return np.dtype(a.dtype), a.chunks[1:], numcodecs.Delta(dtype=np.dtype(a.dtype).str) if a.holds == "logits" \
        else None


def _decode(raw: bytes, codec: str, dtype: np.dtype, shape: tuple[int, ...], delta: Any, where: str) -> np.ndarray:
    """One chunk's rows: its CRC32C checked, then decompressed and un-filtered as zarr encoded it."""
    body, crc = raw[:-4], int.from_bytes(raw[-4:], "little")
    if len(raw) < 4 or google_crc32c.value(body) != crc:
        raise DamagedUnit(f"{where}: a chunk's CRC32C does not match its bytes; re-run `distill teacher` to "
                          "rewrite the unit")
    try:
        data = (numcodecs.Blosc().decode(body) if codec in ("zstd", "blosc-lz4")
                else zlib.decompress(body, 31) if codec == "gzip" else body)
        a = np.frombuffer(data, dtype=dtype.newbyteorder("<"))
        a = np.asarray(delta.decode(a)) if delta is not None else a
        return a.astype(dtype, copy=False).reshape(shape)
    except Exception as e:  # a decompressor that cannot read it
        raise DamagedUnit(f"{where}: a chunk cannot be decoded ({type(e).__name__}: {e}); re-run `distill "
                          "teacher` to rewrite the unit") from e


def read_rows(group: zarr.Group, epoch: int, lo: int, hi: int,
              where: str) -> tuple[dict[str, np.ndarray], str] | None:
    """Rows ``lo .. hi - 1`` (of one unit) of every packed array of a stored epoch, each chunk checked, and the
    digest of the unit's mix plan; None when the epoch has no block table (not packed, or packed before tables
    existed: read whole units instead)."""
    spec, objs = spec_of(group), objects_of(group)
    b = spec.block_rows
    b0, b1 = lo // b, (hi - 1) // b
    raw = objs.get_range(table_key(epoch), b0 * PACKED * ENTRY.itemsize, (b1 + 1) * PACKED * ENTRY.itemsize)
    if raw is None:
        return None
    if len(raw) != (b1 - b0 + 1) * PACKED * ENTRY.itemsize:
        raise DamagedUnit(f"{where}: its epoch's block table {table_key(epoch)} is cut short; re-run `distill "
                          "teacher` to rewrite the epoch")
    table = np.frombuffer(raw, dtype=ENTRY).reshape(-1, PACKED)
    arrays = {name: _column(objs, group, spec, name, j, epoch, table, b0, where)[lo - b0 * b : hi - b0 * b]
              for j, name in enumerate(TRAIN_TARGETS)}
    return arrays, f"{int(table['plan'][0, 0]):08x}"


def _column(objs: Objects, group: zarr.Group, spec: Any, name: str, j: int, epoch: int, table: np.ndarray,
            b0: int, where: str) -> np.ndarray:
    """One array's blocks ``b0 ..`` of the table, from one range request, decoded and checked."""
    entries = table[:, j]
    start, end = int(entries["offset"][0]), int(entries["offset"][-1] + entries["nbytes"][-1])
    raw = objs.get_range(packed_key(group, name, epoch), start, end)
    if raw is None or len(raw) != end - start:
        raise DamagedUnit(f"{where}, array train/{name}: its packed object is missing or cut short; re-run "
                          "`distill teacher` to rewrite the epoch")
    dtype, shape, delta = _decoder(spec, name)
    out = []
    for k, e in enumerate(entries):
        off = int(e["offset"]) - start
        rows = _decode(raw[off : off + int(e["nbytes"])], spec.codec, dtype, shape, delta, f"{where}, array "
                       f"train/{name}")
        n = min(spec.block_rows, spec.n_train - (b0 + k) * spec.block_rows)
        if _crc(rows[:n]) != int(e["digest"]):
            raise DamagedUnit(f"{where}, array train/{name}: block {b0 + k}'s rows differ from what the packer "
                              "recorded (damaged, or from another block); re-run `distill teacher` to rewrite the "
                              "epoch")
        out.append(rows[:n])
    return np.concatenate(out)
