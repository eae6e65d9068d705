"""The Zarr v3 layout of the logit store: its spec, arrays, chunks, codecs and fill values.

One chunk is one (epoch, shard) unit, so writers (ranks, workers, independent processes) each own
whole chunks and never race on a shared one. Every chunk carries a CRC32C after its compressor, so a
damaged chunk is refused by zarr when it is decoded; fill values are values the teacher never writes
(NaN, the largest integer of the dtype, -1), so a chunk that went missing cannot pass for data. A
unit's done mark is its record (:mod:`store.records`), written after its arrays.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, ZstdCodec

from store.provenance import StoreError, normalize

FORMAT = 2
"""1: done flags in zarr arrays, no checksums. 2: CRC32C per chunk, done records with per-array digests."""
KIND_NONE, KIND_MIXUP, KIND_CUTMIX = 0, 1, 2
KIND_NAMES: tuple[str, ...] = ("none", "mixup", "cutmix")
"""Names of the stored ``kind`` codes (KIND_NONE, KIND_MIXUP, KIND_CUTMIX)."""
CODEC_LEVELS: dict[str, tuple[int, int]] = {"zstd": (0, 22), "blosc-lz4": (0, 9), "gzip": (0, 9), "none": (0, 22)}
"""Each codec the store can use, with its range of compression levels."""
CODECS = tuple(CODEC_LEVELS)
SPEC_IDENTITY = ("num_classes", "epochs", "topk", "train_ranges", "val_ranges")
"""Spec fields that must match on reopen; codec and level only change how bytes are stored."""


def label_dtype(num_classes: int) -> np.dtype:
    """The dtype of class ids in the store: uint16 below 65,536 classes."""
    return np.dtype(np.uint16) if num_classes <= 65535 else np.dtype(np.int32)


@dataclass(frozen=True)
class StoreSpec:
    """Everything that fixes the shapes, chunking and compression of a store."""

    num_classes: int
    epochs: int
    topk: int
    train_ranges: tuple[tuple[int, int], ...]
    val_ranges: tuple[tuple[int, int], ...]
    codec: str = "zstd"
    level: int = 3

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store tuples, so specs compare and hash alike.
        object.__setattr__(self, "train_ranges", tuple((int(a), int(b)) for a, b in self.train_ranges))
        object.__setattr__(self, "val_ranges", tuple((int(a), int(b)) for a, b in self.val_ranges))
        validate_spec(self)

    @property
    def k(self) -> int:
        """Effective top-k: the store is dense (all classes) when topk >= num_classes."""
        return min(self.topk, self.num_classes)

    @property
    def dense(self) -> bool:
        return self.k == self.num_classes

    @property
    def n_train(self) -> int:
        return self.train_ranges[-1][1]

    @property
    def n_val(self) -> int:
        return self.val_ranges[-1][1] if self.val_ranges else 0

    @property
    def n_shards(self) -> int:
        return len(self.train_ranges)

    @property
    def n_val_shards(self) -> int:
        return len(self.val_ranges)

    @property
    def shard_size(self) -> int:
        return max(b - a for a, b in self.train_ranges)

    @property
    def val_shard_size(self) -> int:
        return max((b - a for a, b in self.val_ranges), default=1)

    @property
    def label_dtype(self) -> np.dtype:
        return label_dtype(self.num_classes)

    def to_dict(self) -> dict[str, Any]:
        return normalize(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreSpec:
        return cls(**d)


def _check_ranges(name: str, ranges: tuple[tuple[int, int], ...], allow_empty: bool) -> None:
    if not ranges:
        if allow_empty:
            return
        raise ValueError(f"StoreSpec.{name}: at least one shard range is required")
    size = ranges[0][1] - ranges[0][0]
    expected_start = 0
    for i, (a, b) in enumerate(ranges):
        if a != expected_start:
            raise ValueError(
                f"StoreSpec.{name}: shard {i} starts at {a} but the previous one ends at {expected_start}; "
                "shard ranges must be contiguous from 0"
            )
        if b <= a:
            raise ValueError(f"StoreSpec.{name}: shard {i} range [{a}, {b}) is empty or reversed")
        last = i == len(ranges) - 1
        if (b - a != size and not last) or (last and b - a > size):
            raise ValueError(
                f"StoreSpec.{name}: shard {i} has {b - a} rows but shard 0 has {size}; all shards must be "
                "the same size except the last, which may be smaller"
            )
        expected_start = b


def validate_spec(spec: StoreSpec) -> None:
    """Raise ValueError naming the field when a spec cannot describe a store."""
    for name in ("num_classes", "epochs", "topk"):
        v = getattr(spec, name)
        if not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(f"StoreSpec.{name} must be an integer >= 1, got {v!r}")
    if spec.codec not in CODECS:
        raise ValueError(f"StoreSpec.codec must be one of {list(CODECS)}, got {spec.codec!r}")
    lo, hi = CODEC_LEVELS[spec.codec]
    if not lo <= spec.level <= hi:
        raise ValueError(f"StoreSpec.level for codec {spec.codec!r} must be in [{lo}, {hi}], got {spec.level}")
    _check_ranges("train_ranges", spec.train_ranges, allow_empty=False)
    _check_ranges("val_ranges", spec.val_ranges, allow_empty=True)


def compressors_for(codec: str, level: int) -> list[Any]:
    """The zarr v3 bytes-to-bytes chain for a codec name: the compressor (none for "none"), then a CRC32C."""
    if codec == "zstd":
        return [ZstdCodec(level=level), Crc32cCodec()]
    if codec == "blosc-lz4":
        return [BloscCodec(cname="lz4", clevel=level, shuffle="shuffle"), Crc32cCodec()]
    if codec == "gzip":
        return [GzipCodec(level=level), Crc32cCodec()]
    if codec == "none":
        return [Crc32cCodec()]
    raise ValueError(f"unknown codec {codec!r}; expected one of {list(CODECS)}")


def no_data(dtype: np.dtype) -> Any:
    """The fill value of an array: a value the writer never stores (NaN; the largest unsigned; -1 signed)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return float("nan")
    return int(np.iinfo(dtype).max) if dtype.kind == "u" else -1


def array_layout(spec: StoreSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], np.dtype]]:
    """name -> (shape, chunks, dtype) for every array of the store (fill values: :func:`no_data`)."""
    E, N, k, s = spec.epochs, spec.n_train, spec.k, spec.shard_size
    Nv, vs = spec.n_val, spec.val_shard_size
    lab = spec.label_dtype
    f16, f32 = np.dtype(np.float16), np.dtype(np.float32)
    return {
        "train/topk_logits": ((E, N, k), (1, s, k), f16),
        "train/topk_classes": ((E, N, k), (1, s, k), lab),
        "train/hard_label": ((E, N), (1, s), lab),
        "train/logsumexp": ((E, N), (1, s), f32),
        "train/partner": ((E, N), (1, s), np.dtype(np.int32)),
        "train/lam": ((E, N), (1, s), f32),
        "train/kind": ((E, N), (1, s), np.dtype(np.uint8)),
        "train/label": ((N,), (s,), lab),
        "val/topk_logits": ((Nv, k), (vs, k), f16),
        "val/topk_classes": ((Nv, k), (vs, k), lab),
        "val/hard_label": ((Nv,), (vs,), lab),
        "val/logsumexp": ((Nv,), (vs,), f32),
        "val/label": ((Nv,), (vs,), lab),
    }


def spec_of(group: zarr.Group) -> StoreSpec:
    """The StoreSpec recorded in a store's root attributes."""
    try:
        return StoreSpec.from_dict(dict(group.attrs["spec"]))
    except KeyError:
        raise StoreError(
            f"{group.store}: no 'spec' attribute; not a logit store (or creation was cut)"
        ) from None


def stored_bytes(group: zarr.Group) -> int:
    """Bytes the store's arrays occupy where they are kept (chunks and metadata; zarr's own count, which works
    for local and remote stores alike)."""
    return sum(int(group[name].nbytes_stored()) for name in array_layout(spec_of(group)))
