"""The Zarr v3 layout of the logit store, and its creation.

One chunk is one (epoch, shard) unit, so the teacher stage's ranks and workers each own whole
chunks and never race on a shared one; each unit's done flag is its own (1, 1) chunk for the same
reason. Creation is idempotent: a second call with the same spec and provenance reopens the store
(resume), a call for another run is refused by ProvenanceMismatch.

Concurrency: let one rank call :func:`create_store` first; the others call it (or open the group
with mode "r+") after a barrier. Concurrent first creation by many processes is not supported.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

from store.provenance import (
    IDENTITY_FIELDS,
    StoreError,
    differences,
    mismatch_error,
    normalize,
)

FORMAT = 1
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


def compressors_for(codec: str, level: int) -> list[Any] | None:
    """The zarr v3 compressor chain for a codec name (None: stored raw)."""
    if codec == "zstd":
        return [ZstdCodec(level=level)]
    if codec == "blosc-lz4":
        return [BloscCodec(cname="lz4", clevel=level, shuffle="shuffle")]
    if codec == "gzip":
        return [GzipCodec(level=level)]
    if codec == "none":
        return None
    raise ValueError(f"unknown codec {codec!r}; expected one of {list(CODECS)}")


def array_layout(spec: StoreSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], np.dtype, Any]]:
    """name -> (shape, chunks, dtype, fill_value) for every array of the store."""
    E, N, k, s = spec.epochs, spec.n_train, spec.k, spec.shard_size
    S, Nv, vs, Sv = spec.n_shards, spec.n_val, spec.val_shard_size, spec.n_val_shards
    lab = spec.label_dtype
    nan = float("nan")
    return {
        "train/topk_logits": ((E, N, k), (1, s, k), np.dtype(np.float16), nan),
        "train/topk_classes": ((E, N, k), (1, s, k), lab, 0),
        "train/hard_label": ((E, N), (1, s), lab, 0),
        "train/logsumexp": ((E, N), (1, s), np.dtype(np.float32), nan),
        "train/partner": ((E, N), (1, s), np.dtype(np.int32), -1),
        "train/lam": ((E, N), (1, s), np.dtype(np.float32), nan),
        "train/kind": ((E, N), (1, s), np.dtype(np.uint8), 0),
        "train/label": ((N,), (s,), lab, 0),
        "train/done": ((E, S), (1, 1), np.dtype(bool), False),
        "val/topk_logits": ((Nv, k), (vs, k), np.dtype(np.float16), nan),
        "val/topk_classes": ((Nv, k), (vs, k), lab, 0),
        "val/hard_label": ((Nv,), (vs,), lab, 0),
        "val/logsumexp": ((Nv,), (vs,), np.dtype(np.float32), nan),
        "val/label": ((Nv,), (vs,), lab, 0),
        "val/done": ((Sv,), (1,), np.dtype(bool), False),
    }


def _is_local(path: str | Path) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _local_path(path: str | Path) -> Path:
    return Path(str(path).removeprefix("file://"))


def store_path(path: str | Path) -> str | Path:
    """What zarr is given: a Path for local stores, the URL string otherwise (fsspec)."""
    return _local_path(path) if _is_local(path) else str(path)


def spec_of(group: zarr.Group) -> StoreSpec:
    """The StoreSpec recorded in a store's root attributes."""
    try:
        return StoreSpec.from_dict(dict(group.attrs["spec"]))
    except KeyError:
        raise StoreError(
            f"{group.store}: no 'spec' attribute; not a logit store (or creation was cut)"
        ) from None


def finalize(path: str | Path) -> None:
    """Re-consolidate metadata (one read opens the store); call once, from one rank, at the end."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        zarr.consolidate_metadata(store_path(path))


def _open_existing(path: str | Path) -> zarr.Group | None:
    try:
        return zarr.open_group(store_path(path), mode="r+", use_consolidated=False)
    except FileNotFoundError:  # zarr's GroupNotFoundError is a FileNotFoundError too
        if _is_local(path):
            p = _local_path(path)
            if p.is_dir() and any(p.iterdir()):
                raise StoreError(
                    f"{path}: a non-empty directory that is not a Zarr store; refusing to write into it"
                ) from None
        return None


def _ensure_arrays(root: zarr.Group, spec: StoreSpec) -> bool:
    """Create missing arrays (a creation cut short resumes); check existing ones. True if any created."""
    created = False
    comp = compressors_for(spec.codec, spec.level)
    for name, (shape, chunks, dtype, fill) in array_layout(spec).items():
        try:
            arr = root[name]
        except KeyError:
            arr = None
        if arr is None:
            root.create_array(
                name,
                shape=shape,
                chunks=chunks,
                dtype=dtype,
                compressors=comp if dtype != np.dtype(bool) else None,
                fill_value=fill,
            )
            created = True
        elif tuple(arr.shape) != shape or tuple(arr.chunks) != chunks or np.dtype(arr.dtype) != dtype:
            raise StoreError(
                f"{root.store}: array {name} has shape {arr.shape}, chunks {arr.chunks}, dtype {arr.dtype}; "
                f"the spec needs {shape}, {chunks}, {dtype}"
            )
    return created


def create_store(path: str | Path, spec: StoreSpec, provenance: dict[str, Any]) -> zarr.Group:
    """Create the store, or reopen it (mode "r+") for a resumed run of the same spec and provenance.

    Raises ProvenanceMismatch naming each differing identity or spec field with both values.
    """
    validate_spec(spec)
    prov = normalize(provenance)
    root = _open_existing(path)
    if root is not None:
        attrs = root.attrs.asdict()
        if attrs.get("format") != FORMAT or "spec" not in attrs or "provenance" not in attrs:
            raise StoreError(
                f"{path}: Zarr group exists but is not a logit store of format {FORMAT} "
                f"(format={attrs.get('format')!r}); use another path or delete it"
            )
        stored_prov = attrs["provenance"]
        fields = [f for f in IDENTITY_FIELDS if f in prov or f in stored_prov]
        diffs = differences(stored_prov, prov, fields)
        stored_spec = attrs["spec"]
        fresh_spec = spec.to_dict()
        diffs += [
            (f"spec.{f}", stored_spec.get(f), fresh_spec[f])
            for f in SPEC_IDENTITY
            if stored_spec.get(f) != fresh_spec[f]
        ]
        if diffs:
            raise mismatch_error(str(path), diffs)
        # The arrays keep the codec they were created with; ensure from the stored spec.
        if _ensure_arrays(root, StoreSpec.from_dict(stored_spec)):
            finalize(path)
        return root
    if _is_local(path):
        _local_path(path).parent.mkdir(parents=True, exist_ok=True)
    # Attributes first: a creation cut short is then recognised and completed by the next call.
    root = zarr.open_group(
        store_path(path),
        mode="w-",
        attributes={"format": FORMAT, "spec": spec.to_dict(), "provenance": prov},
    )
    _ensure_arrays(root, spec)
    finalize(path)
    return zarr.open_group(store_path(path), mode="r+", use_consolidated=False)


def stored_bytes(group: zarr.Group) -> int:
    """Bytes the store's arrays occupy where they are kept (chunks and metadata; zarr's own count, which works
    for local and remote stores alike)."""
    return sum(int(group[name].nbytes_stored()) for name in array_layout(spec_of(group)))
