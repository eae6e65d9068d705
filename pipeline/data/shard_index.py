"""Reading shards by sample: an offset index per shard, and every sample's bytes checked before use.

Ingest writes, beside each ``<split>-NNNNNN.tar``, an index ``<split>-NNNNNN.idx`` (a NumPy ``.npy``
structured array: one row per sample with its byte ``offset`` in the tar, its ``size`` (all its tar
members, headers and padding included) and the ``crc32c`` of those bytes). The manifest records the
index file and its sha256, so the chain manifest → index → sample covers every byte a stage decodes.

A reader asks for a run of consecutive samples; they come from one byte-range read (whole shards
are read in chunks of about :data:`CHUNK_BYTES`), each sample's bytes are checked against its CRC32C
*before* its image is decoded, and its tar members are parsed with ``tarfile``. So a damaged,
replaced or truncated sample is refused naming the shard and the sample key, before anything trains
on it; and a reader can start in the middle of a shard without reading what comes before.
(webdataset writes the shards; its reader streams whole tars and checks nothing, hence this one.)
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import google_crc32c
import numpy as np

from pipeline.core.errors import DistillError
from pipeline.core.files import read_bytes, read_range, size

INDEX_DTYPE = np.dtype([("offset", "<i8"), ("size", "<i8"), ("crc32c", "<u4")])
CHUNK_BYTES = 64 << 20
"""A read of many consecutive samples fetches about this many bytes a request."""


class ShardDamaged(DistillError):
    """A shard (or its index) that does not hold what ingest wrote; the message names the shard and sample."""


def index_name(shard_file: str) -> str:
    return shard_file.removesuffix(".tar") + ".idx"


def build_index(path: str | os.PathLike[str]) -> np.ndarray:
    """The index of a tar just written: one row per sample (members grouped by key, in file order)."""
    rows: dict[str, list[int]] = {}
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            key = m.name.split("/")[-1].split(".", 1)[0]
            end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            span = rows.setdefault(key, [m.offset, end])
            span[1] = max(span[1], end)
    index = np.zeros(len(rows), dtype=INDEX_DTYPE)
    with open(path, "rb") as f:
        for i, (start, end) in enumerate(rows.values()):
            f.seek(start)
            index[i] = (start, end - start, google_crc32c.value(f.read(end - start)))
    return index


def write_index(index: np.ndarray, path: str | os.PathLike[str]) -> None:
    with open(path, "wb") as f:
        np.save(f, index, allow_pickle=False)


@lru_cache(maxsize=64)
def load_index(path: str, sha256: str, count: int) -> np.ndarray:
    """A shard's index, checked against the manifest's sha256 and sample count (cached per process)."""
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise ShardDamaged(f"{path}: shard index missing (re-run `distill ingest`)") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ShardDamaged(f"{path}: shard index sha256 {digest[:16]}… does not match the manifest ({sha256[:16]}…)")
    index = np.load(io.BytesIO(data), allow_pickle=False)
    if index.dtype != INDEX_DTYPE or len(index) != count:
        raise ShardDamaged(f"{path}: shard index has {len(index)} rows of {index.dtype}, the manifest says {count}")
    return index


def _parse(data: bytes, where: str) -> dict[str, Any]:
    """The raw webdataset sample (``__key__`` and one bytes field per member) in one sample's tar bytes.

    Plain ustar members (what webdataset writes) are read straight from their 512-byte headers; anything
    else (pax or GNU extensions) goes through ``tarfile``."""
    sample: dict[str, Any] = {}
    pos, block = 0, tarfile.BLOCKSIZE
    while pos + block <= len(data):
        header = data[pos : pos + block]
        kind, size_field = header[156:157], header[124:136]
        if not header.strip(b"\0"):
            break  # end-of-archive padding
        if kind not in (b"0", b"\0") or not size_field.strip(b" \0").isdigit():
            return _parse_tarfile(data, where)
        size = int(size_field.strip(b" \0"), 8)
        key, _, field = header[:100].rstrip(b"\0").decode("utf-8", "replace").split("/")[-1].partition(".")
        sample["__key__"] = key
        sample[field] = data[pos + block : pos + block + size]
        pos += block + -(-size // block) * block
    return sample


def _parse_tarfile(data: bytes, where: str) -> dict[str, Any]:
    sample: dict[str, Any] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for m in tf:
                key, _, field = m.name.split("/")[-1].partition(".")
                sample["__key__"] = key
                sample[field] = tf.extractfile(m).read()
    except (tarfile.TarError, OSError) as e:
        raise ShardDamaged(f"{where}: not a tar sample ({e})") from None
    return sample


GAP = 4
"""Samples a precise read (:func:`read_positions`) reads through rather than start another request for, at
least (:func:`gap_for`)."""


def gap_for(window: int) -> int:
    """The gap a worker's reads of mixing windows of ``window`` samples bridge: a window's partners are scattered,
    and a request costs the time of a few samples' bytes (ImageNet, window 512: 16; the tests' tiny windows: 4)."""
    return max(GAP, window // 32)


def read_samples(path: str, index: np.ndarray, first: int = 0, count: int | None = None,
                 first_index: int = 0, check: bool = True) -> Iterator[dict[str, Any]]:
    """Samples ``first .. first + count - 1`` (positions in the shard) as raw webdataset dicts, each checked.

    ``first_index`` is the global index of the shard's first sample (used in messages only); ``check=False``
    skips the CRC32C (only the benchmark that measures its cost does that).
    """
    count = len(index) - first if count is None else count
    return read_positions(path, index, np.arange(first, first + count), first_index, check=check)


def read_positions(path: str, index: np.ndarray, positions: np.ndarray, first_index: int = 0, *, gap: int = GAP,
                   check: bool = True) -> Iterator[dict[str, Any]]:
    """The samples at ``positions`` (sorted, in the shard) and no others, each checked: consecutive ones (or ones
    at most ``gap`` samples apart) come from one byte-range read of at most about :data:`CHUNK_BYTES`."""
    positions = np.asarray(positions, dtype=np.int64)
    i = 0
    while i < len(positions):
        j = i + 1
        base = int(index[positions[i]]["offset"])
        while j < len(positions) and positions[j] - positions[j - 1] <= gap + 1 and \
                index[positions[j]]["offset"] + index[positions[j]]["size"] - base <= CHUNK_BYTES:
            j += 1
        yield from _read_run(path, index, positions[i:j], first_index, check)
        i = j


def _read_run(path: str, index: np.ndarray, positions: np.ndarray, first_index: int,
              check: bool) -> Iterator[dict[str, Any]]:
    """The samples at ``positions`` (close together) from one byte-range read."""
    last = int(positions[-1])
    base, end = int(index[positions[0]]["offset"]), int(index[last]["offset"] + index[last]["size"])
    try:
        data = read_range(path, base, end)
    except FileNotFoundError:
        raise ShardDamaged(f"{path}: the shard is missing") from None
    except OSError as e:  # an object store's "range not satisfiable" for a shard cut short, or a failed read
        first = first_index + int(positions[0])
        raise ShardDamaged(f"{path}: cannot read bytes {base}..{end} of samples {first:08d}.. ({e.strerror or e})") \
            from None
    for j in positions.tolist():
        off, n, crc = int(index[j]["offset"]) - base, int(index[j]["size"]), int(index[j]["crc32c"])
        raw = data[off : off + n]
        where = f"{path}: sample {first_index + j:08d}"
        if len(raw) < n:
            raise ShardDamaged(f"{where}: the shard is truncated ({size(path)} bytes; "
                               f"the sample ends at byte {base + off + n})")
        if check and google_crc32c.value(raw) != crc:
            raise ShardDamaged(f"{where}: its bytes differ from what ingest wrote (CRC32C mismatch)")
        sample = _parse(raw, where)
        sample["__url__"] = path
        yield sample
