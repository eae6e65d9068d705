"""The Zarr v3 layout of the logit store: its spec, arrays, chunks, codecs and fill values.

One chunk is one (epoch, shard) unit, so writers (ranks, workers, independent processes) each own
whole chunks and never race on a shared one. Units are written to ``stage/``; a stored epoch whose
units are all done is packed by one writer into ``train/`` (one object per array and epoch), so a
finished ImageNet store at E = 300 is about a thousand objects, and a reader fetches a unit's bytes
by range. Every chunk carries a CRC32C after its compressor, so a
damaged chunk is refused by zarr when it is decoded; fill values are values the teacher never writes
(NaN, the largest integer of the dtype, -1), so a chunk that went missing cannot pass for data. A
unit's done mark is its record (:mod:`store.records`), written after its arrays.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec
from zarr.codecs.numcodecs import Delta

from store.provenance import StoreError, normalize

warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")
# the logits' Delta filter is numcodecs' (zarr-python reads it; the warning would repeat on every open)

FORMAT = 3
"""1: done flags in zarr arrays, no checksums. 2: CRC32C per chunk, done records with per-array digests.
3: staged units packed per stored epoch; logits delta-coded; no hard_label or mix-plan arrays (derived)."""
KIND_NONE, KIND_MIXUP, KIND_CUTMIX = 0, 1, 2
KIND_NAMES: tuple[str, ...] = ("none", "mixup", "cutmix")
"""Names of the stored ``kind`` codes (KIND_NONE, KIND_MIXUP, KIND_CUTMIX)."""
CODEC_LEVELS: dict[str, tuple[int, int]] = {"zstd": (0, 22), "blosc-lz4": (0, 9), "gzip": (0, 9), "none": (0, 22)}
"""Each codec the store can use, with its range of compression levels."""
CODECS = tuple(CODEC_LEVELS)
SPEC_IDENTITY = ("num_classes", "epochs", "topk", "train_ranges", "val_ranges", "clean_ranges")
"""Spec fields that must match on reopen; codec and level only change how bytes are stored."""


def label_dtype(num_classes: int) -> np.dtype:
    """The dtype of class ids in the store: uint16 below 65,535 classes (a label may be ``num_classes``, a dropped one,
    and the largest uint16 is the fill value)."""
    return np.dtype(np.uint16) if num_classes < 65535 else np.dtype(np.int32)


@dataclass(frozen=True)
class StoreSpec:
    """Everything that fixes the shapes, chunking and compression of a store."""

    num_classes: int
    epochs: int
    topk: int
    train_ranges: tuple[tuple[int, int], ...]
    val_ranges: tuple[tuple[int, int], ...]
    clean_ranges: tuple[tuple[int, int], ...] = ()
    """The clean pass: every *ingested* training image's evaluation view (all train shards, also those a
    ``data.train_shards`` run leaves out), labelled once for the label audit."""
    codec: str = "zstd"
    level: int = 3
    block: int | None = None
    """Rows per chunk of the packed arrays (a reader fetches whole blocks): divides every shard; None, the shard
    size (stores written before blocks: one chunk per unit)."""

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store tuples, so specs compare and hash alike.
        object.__setattr__(self, "train_ranges", tuple((int(a), int(b)) for a, b in self.train_ranges))
        object.__setattr__(self, "val_ranges", tuple((int(a), int(b)) for a, b in self.val_ranges))
        object.__setattr__(self, "clean_ranges", tuple((int(a), int(b)) for a, b in self.clean_ranges))
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
    def block_rows(self) -> int:
        return self.block or self.shard_size

    @property
    def val_shard_size(self) -> int:
        return max((b - a for a, b in self.val_ranges), default=1)

    @property
    def label_dtype(self) -> np.dtype:
        return label_dtype(self.num_classes)

    def view_ranges(self, split: str) -> tuple[tuple[int, int], ...]:
        """The shard ranges of a split of evaluation views: ``val`` or ``clean``."""
        return {"val": self.val_ranges, "clean": self.clean_ranges}[split]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; a spec without blocks keeps the form stores written before blocks have."""
        d = normalize(asdict(self))
        if d.get("block") is None:
            d.pop("block", None)
        return d

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
    if spec.block is not None and (spec.block < 1 or spec.shard_size % spec.block):
        raise ValueError(f"StoreSpec.block {spec.block} must divide the shard size {spec.shard_size}")
    _check_ranges("val_ranges", spec.val_ranges, allow_empty=True)
    _check_ranges("clean_ranges", spec.clean_ranges, allow_empty=True)


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store: shape, chunks, dtype, zarr shards (packed arrays only), and what it holds."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    shards: tuple[int, ...] | None = None
    holds: str = "values"
    """"logits" (float16 bits, delta-coded along a sorted row), "classes" (small integers), "values"."""


def codecs_for(codec: str, level: int, holds: str, dtype: np.dtype) -> dict[str, list[Any]]:
    """zarr v3 ``filters`` and ``compressors`` for an array: what it holds picks the shuffle (bytes for floats,
    bits for class ids) and, for the sorted float16 logits, a delta filter on their bits; a CRC32C ends every
    chain, so zarr refuses a damaged chunk when it decodes it."""
    filters = [Delta(dtype=np.dtype(dtype).str)] if holds == "logits" else []
    shuffle = "bitshuffle" if holds == "classes" else "shuffle"
    if codec == "zstd":
        comp: list[Any] = [BloscCodec(cname="zstd", clevel=level, shuffle=shuffle)]
    elif codec == "blosc-lz4":
        comp = [BloscCodec(cname="lz4", clevel=level, shuffle=shuffle)]
    elif codec == "gzip":
        comp = [GzipCodec(level=level)]
    elif codec == "none":
        comp = []
    else:
        raise ValueError(f"unknown codec {codec!r}; expected one of {list(CODECS)}")
    return {"filters": filters, "compressors": [*comp, Crc32cCodec()]}


def no_data(dtype: np.dtype) -> Any:
    """The fill value of an array: a value the writer never stores (NaN; the largest unsigned; -1 signed)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return float("nan")
    return int(np.iinfo(dtype).max) if dtype.kind == "u" else -1


STAGE = "stage"
"""Where the teacher stage writes train units, one chunk each; a finished stored epoch is packed into
``train/``, one object per array and epoch (zarr's sharding), and its staged chunks go."""
TRAIN_TARGETS = ("topk_logits", "topk_classes", "logsumexp")
"""The per-epoch arrays of a train unit. ``hard_label`` is ``topk_classes[:, 0]`` (the argmax of the full
logits, by construction), and the mix plan is a pure function of (seed, epoch, shard): the unit's record
keeps its digest."""
VAL_TARGETS = ("topk_logits", "topk_classes", "logsumexp", "label")
VIEW_SPLITS = ("val", "clean")
"""Splits of evaluation views (no augmentation, no epoch): one unit per shard, not packed."""


def array_layout(spec: StoreSpec) -> dict[str, ArraySpec]:
    """Every array of the store. Float16 logits are stored as their bits (uint16), so a delta filter codes
    them without loss; fill values: :func:`no_data`."""
    E, N, k, s, S, b = spec.epochs, spec.n_train, spec.k, spec.shard_size, spec.n_shards, spec.block_rows
    lab, bits, f32 = spec.label_dtype, np.dtype(np.uint16), np.dtype(np.float32)
    per_epoch = {
        "topk_logits": ((E, N, k), (k,), bits, "logits"),
        "topk_classes": ((E, N, k), (k,), lab, "classes"),
        "logsumexp": ((E, N), (), f32, "values"),
    }
    out: dict[str, ArraySpec] = {}
    for name, (shape, tail, dtype, holds) in per_epoch.items():
        out[f"{STAGE}/train/{name}"] = ArraySpec(shape, (1, s, *tail), dtype, None, holds)  # a chunk per unit
        out[f"train/{name}"] = ArraySpec(shape, (1, b, *tail), dtype, (1, S * s, *tail), holds)  # blocks, by epoch
    out["train/label"] = ArraySpec((N,), (s,), lab, None, "classes")
    for split in VIEW_SPLITS:
        ranges = spec.view_ranges(split)
        n, size = (ranges[-1][1] if ranges else 0), max((b - a for a, b in ranges), default=1)
        out[f"{split}/topk_logits"] = ArraySpec((n, k), (size, k), bits, None, "logits")
        out[f"{split}/topk_classes"] = ArraySpec((n, k), (size, k), lab, None, "classes")
        out[f"{split}/logsumexp"] = ArraySpec((n,), (size,), f32, None, "values")
        out[f"{split}/label"] = ArraySpec((n,), (size,), lab, None, "classes")
    return out


_ARRAYS: dict[int, tuple[weakref.ref, dict[str, zarr.Array]]] = {}


def array(group: zarr.Group, name: str) -> zarr.Array:
    """The group's array ``name``, looked up once per open group (zarr fetches an array's metadata at every
    ``group[name]``; groups are not hashable: keyed by id, with a weak reference to tell a reused id apart)."""
    ref, arrays = _ARRAYS.get(id(group), (None, None))
    if ref is None or ref() is not group:
        if len(_ARRAYS) > 64:  # a long-lived process opening many stores
            _ARRAYS.clear()
        ref, arrays = weakref.ref(group), {}
        _ARRAYS[id(group)] = (ref, arrays)
    if name not in arrays:
        arrays[name] = group[name]
    return arrays[name]


def spec_of(group: zarr.Group) -> StoreSpec:
    """The StoreSpec recorded in a store's root attributes."""
    try:
        return StoreSpec.from_dict(dict(group.attrs["spec"]))
    except KeyError:
        raise StoreError(
            f"{group.store}: no 'spec' attribute; not a logit store (or creation was cut)"
        ) from None


def finished_objects(spec: StoreSpec) -> int:
    """Objects of a finished store (every epoch packed, no claims left): the figure object stores, inode quotas
    and DVC care about. Metadata (the root, 5 groups, every array), one object per packed array and epoch,
    the label chunks, the val and clean chunks, and the done records (one per packed epoch, one per val and
    clean shard)."""
    packed = sum(1 for a in array_layout(spec).values() if a.shards is not None)
    metadata = 1 + 5 + len(array_layout(spec))
    views = sum(len(spec.view_ranges(split)) for split in VIEW_SPLITS)
    return metadata + packed * spec.epochs + spec.n_shards + len(VAL_TARGETS) * views + spec.epochs + views
