"""The shard format: the single source of truth for every stage that reads or writes shards.

A shards folder holds WebDataset tar files ``train-000000.tar``, ``val-000000.tar``, ... and a
``manifest.json``. Each sample has the key ``f"{index:08d}"`` and the fields

- ``jpg`` or ``png``: the encoded image (original file bytes, or PNG for array sources),
- ``cls``: the class id, ASCII decimal,
- ``idx``: the global dense index 0..N-1 of the sample in its split, ASCII decimal.

Shards of a split hold contiguous index ranges ``[start, end)`` of ``shard_size`` samples each
(the last may be shorter), listed in order in the manifest. The manifest (sorted keys, indent 2,
trailing newline, no timestamps) is::

    {"format": 1, "classes": [...], "num_classes": C,
     "source": {"kind": "idx"|"imagefolder", "config_hash": ..., "input_key": ...},
     "splits": {"train": {"count": N, "shards": [{"file", "start", "end", "count", "size", "sha256",
                                                  "index", "index_sha256"}],
                          "skipped": [{"path", "reason"}],
                          "planted": [{"index", "true", "given"}],    # only with data.label_noise
                          "relabel": [{"index", "label"}]},           # only with data.relabel (label null: dropped)
                "val": {...}},
     "image": {"channels_hint": 1|3},
     "fingerprint": sha256 of the canonical JSON of everything else}
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from pipeline.core.config import Config, canonical_hash
from pipeline.core.errors import DistillError
from pipeline.core.files import atomic_write_json, is_url, location
from pipeline.data.labels import Relabel, check_label_layer, relabelled
from pipeline.data.shard_index import GAP, load_index, read_positions, read_samples
from store.objects import local_path

FORMAT = 2
"""1: shards only. 2: an offset index with per-sample CRC32C beside each shard (pipeline.data.shard_index)."""
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
IMAGE_FIELDS = ("jpg", "png")
LOCATION_FIELDS = ("shards", "root", "train_root", "val_root", "train_shards", "relabel")
"""Data fields left out of config_hash: they do not change the shards (where things are; which shards later stages
use; the label layer, which only the manifest holds)."""
NEW_DEFAULTS = {"label_noise_kind": "uniform", "label_noise_confusion": None}
"""Data fields added later: left out of config_hash at these values, so older shards stay up to date."""


class ShardError(DistillError, ValueError):
    """A shards folder or manifest that cannot be used; the message names the file."""


def shard_name(split: str, shard_id: int) -> str:
    return f"{split}-{shard_id:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:08d}"


def data_config_hash(config: Config) -> str:
    """sha256 of the data section (less its location fields) and the seed: what the shards depend on."""
    data = config.model_dump(mode="json")["data"]
    for k in LOCATION_FIELDS:
        data.pop(k, None)
    for k, default in NEW_DEFAULTS.items():
        if data.get(k) == default:
            data.pop(k, None)
    return canonical_hash({"data": data, "seed": config.seed})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ShardInfo(_Frozen):
    file: str
    start: int
    end: int
    """Exclusive."""
    count: int
    size: int
    """File size in bytes."""
    sha256: str
    index: str
    """The shard's offset index file (pipeline.data.shard_index), beside it."""
    index_sha256: str


class Skipped(_Frozen):
    path: str
    reason: str


class Planted(_Frozen):
    """A label flipped on purpose (``data.label_noise``): the sample's index, its true label, the label given."""

    index: int
    true: int
    given: int


class SplitInfo(_Frozen):
    count: int
    shards: list[ShardInfo]
    skipped: list[Skipped] = []
    planted: list[Planted] = []
    relabel: list[Relabel] = []
    """The label layer (pipeline.data.labels), sorted by index."""

    @model_serializer(mode="wrap")
    def _without_empty_lists(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        for name in ("planted", "relabel"):  # written only when used: older manifests keep their fingerprints
            if not getattr(self, name):
                out.pop(name, None)
        return out


class Manifest(_Frozen):
    root: str = Field(exclude=True)
    """The shards folder (an absolute local path, or a URL); not stored in the file."""
    format: int
    classes: list[str]
    num_classes: int
    source: dict[str, Any]
    splits: dict[str, SplitInfo]
    image: dict[str, Any]
    fingerprint: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.num_classes != len(self.classes):
            raise ValueError(f"num_classes {self.num_classes} != {len(self.classes)} class names")
        for name, sp in self.splits.items():
            pos = 0
            for s in sp.shards:
                if s.start != pos or s.end - s.start != s.count or s.count < 1:
                    raise ValueError(f"{name} shard {s.file} covers [{s.start}, {s.end}) with count {s.count}; "
                                     f"expected a non-empty range starting at {pos}")
                pos = s.end
            if pos != sp.count:
                raise ValueError(f"{name} shards cover {pos} samples but count is {sp.count}")
        return self

    # -- queries -------------------------------------------------------------------------------

    def split(self, split: str) -> SplitInfo:
        try:
            return self.splits[split]
        except KeyError:
            raise ShardError(
                f"{self.file(MANIFEST_NAME)}: no split {split!r} (has {sorted(self.splits)})"
            ) from None

    def count(self, split: str) -> int:
        return self.split(split).count

    def shards(self, split: str) -> list[ShardInfo]:
        return self.split(split).shards

    def shard_paths(self, split: str) -> list[str]:
        """Absolute paths of the split's shards, in index order."""
        return [self.file(s.file) for s in self.split(split).shards]

    def file(self, name: str) -> str:
        """A file of the shards folder (local path or URL)."""
        return str(location(self.root) / name)

    def ranges(self, split: str) -> list[tuple[int, int]]:
        """``[start, end)`` index range of each shard, in order."""
        return [(s.start, s.end) for s in self.split(split).shards]

    def shard_id_from_path(self, split: str, path: str | os.PathLike) -> int:
        """Position of a shard (given by path or URL, e.g. a sample's ``__url__``) in the split."""
        name = os.path.basename(str(path).rstrip("/"))
        for i, s in enumerate(self.split(split).shards):
            if s.file == name:
                return i
        raise ShardError(f"{path}: not a {split} shard of {self.file(MANIFEST_NAME)}")

    def label_layer(self, split: str) -> dict[int, int]:
        """The split's corrected labels by index (``num_classes`` for a dropped one); empty without a layer."""
        return {r.index: self.num_classes if r.label is None else r.label for r in self.split(split).relabel}

    def with_relabel(self, relabel: list[Relabel]) -> Manifest:
        """The same shards with another train label layer, and the fingerprint of that content."""
        splits = {**self.splits, "train": self.split("train").model_copy(update={"relabel": relabel})}
        m = self.model_copy(update={"splits": splits})
        return m.model_copy(update={"fingerprint": canonical_hash(m.body())})

    @property
    def channels_hint(self) -> int:
        return int(self.image["channels_hint"])

    def body(self) -> dict[str, Any]:
        """What the fingerprint covers: the manifest less its root and its fingerprint."""
        return self.model_dump(mode="json", exclude={"fingerprint"})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def first_train_shards(self, n: int) -> Manifest:
        """The same dataset with only its first ``n`` train shards (a subset with its own fingerprint)."""
        train = self.split("train")
        if n >= len(train.shards):
            return self
        kept = train.shards[:n]
        n = sum(s.count for s in kept)
        planted = [p for p in train.planted if p.index < n]
        relabel = [r for r in train.relabel if r.index < n]
        splits = {**self.splits, "train": SplitInfo(count=n, shards=kept, skipped=train.skipped, planted=planted,
                                                    relabel=relabel)}
        fp = hashlib.sha256(f"{self.fingerprint}:train_shards={n}".encode()).hexdigest()
        return self.model_copy(update={"splits": splits, "fingerprint": fp})


# ---------------------------------------------------------------------------------------------
# Reading and writing the manifest


def _from_dict(root: str, d: dict[str, Any], where: str) -> Manifest:
    try:
        return Manifest.model_validate({**d, "root": root})
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ShardError(f"{where}: malformed manifest ({loc}: {first['msg'].removeprefix('Value error, ')})") from None


def open_shards(config: Config) -> Manifest:
    """The manifest a run works on: ``data.shards``, cut to ``data.train_shards`` when set; refused when its label
    layer is not ``data.relabel``'s (ingest applies it)."""
    m = load_manifest(config.data.shards)
    check_label_layer(m, config.data.relabel)
    n = config.data.train_shards
    if n is None:
        return m
    have = len(m.split("train").shards)
    if n > have:
        raise ShardError(f"data.train_shards is {n}, but {config.data.shards} holds {have} train shards")
    return m.first_train_shards(n)


def run_manifest(shards_dir: Path | str, n_train_shards: int) -> Manifest:
    """The manifest a teacher run used, from the shard folder and the store's train shard count
    (``data.train_shards`` cuts the manifest, and the cut has its own fingerprint)."""
    return load_manifest(shards_dir).first_train_shards(n_train_shards)


def _root(shards_dir: Path | str) -> str:
    return str(shards_dir) if is_url(shards_dir) else str(Path(local_path(shards_dir)).absolute())


def load_manifest(shards_dir: Path | str) -> Manifest:
    """Load and check ``<shards_dir>/manifest.json`` (format, ranges, fingerprint)."""
    root = _root(shards_dir)
    path = location(root) / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(f"{path}: shard manifest not found (run `distill ingest` first)")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: cannot read shard manifest: {e}") from None
    if not isinstance(d, dict):
        raise ShardError(f"{path}: shard manifest is not a JSON object")
    if d.get("format") != FORMAT:
        raise ShardError(f"{path}: manifest format {d.get('format')!r}, this code reads format {FORMAT}; "
                         "re-run `distill ingest` to rewrite the shards")
    m = _from_dict(root, d, str(path))
    expected = canonical_hash(m.body())
    if m.fingerprint != expected:
        raise ShardError(
            f"{path}: manifest fingerprint {m.fingerprint!r} does not match its content ({expected}); "
            "the file was edited or is damaged"
        )
    return m


def write_manifest(shards_dir: Path | str, body: dict[str, Any]) -> Manifest:
    """Fill in the fingerprint and write ``manifest.json``; returns the written Manifest.

    ``body`` is the manifest less its fingerprint (``format`` defaults to the current one).
    """
    root = _root(shards_dir)
    body = {"format": FORMAT, **body}
    body.pop("fingerprint", None)
    m = _from_dict(root, body, str(location(root) / MANIFEST_NAME))
    m = m.model_copy(update={"fingerprint": canonical_hash(m.body())})
    atomic_write_json(m.file(MANIFEST_NAME), m.to_dict(), ensure_ascii=False)
    return m


# ---------------------------------------------------------------------------------------------
# Samples


def encode_sample(index: int, label: int, ext: str, data: bytes) -> dict[str, Any]:
    """The raw webdataset sample dict for one image (the inverse of :func:`decode_sample`)."""
    if ext not in IMAGE_FIELDS:
        raise ValueError(f"image field must be one of {IMAGE_FIELDS}, got {ext!r}")
    return {
        "__key__": sample_key(index),
        "cls": str(int(label)).encode("ascii"),
        "idx": str(int(index)).encode("ascii"),
        ext: bytes(data),
    }


def _as_int(v: Any, name: str, key: Any) -> int:
    if isinstance(v, (bytes, bytearray, memoryview)):
        v = bytes(v).decode("ascii")
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ShardError(f"sample {key!r}: field {name!r} is not an integer: {v!r}") from None


def sample_index(sample: dict[str, Any]) -> int:
    """The global index of a raw webdataset sample, without decoding its image."""
    if "idx" not in sample:
        raise ShardError(f"sample {sample.get('__key__')!r} from {sample.get('__url__')}: missing 'idx' field")
    return _as_int(sample["idx"], "idx", sample.get("__key__"))


def decode_sample(sample: dict[str, Any]) -> tuple[int, int, Image.Image]:
    """``(index, label, image)`` from a raw (undecoded) webdataset sample.

    The image is decoded with PIL and loaded, in the mode it was stored in (no conversion).
    """
    key = sample.get("__key__")
    if "idx" not in sample or "cls" not in sample:
        raise ShardError(f"sample {key!r} from {sample.get('__url__')}: missing 'idx' or 'cls' field")
    index = sample_index(sample)
    label = _as_int(sample["cls"], "cls", key)
    for ext in IMAGE_FIELDS:
        if ext in sample:
            data = sample[ext]
            break
    else:
        raise ShardError(f"sample {key!r} from {sample.get('__url__')}: no image field {IMAGE_FIELDS}")
    try:
        image = Image.open(io.BytesIO(bytes(data)))
        image.load()
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ShardError(f"{sample.get('__url__')}: sample {key}: the image cannot be decoded ({e})") from None
    return index, label, image


def shard_samples(manifest: Manifest, split: str, shard: int, first: int = 0,
                  count: int | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples ``first ..`` (positions in the shard) of one shard, each checked against its index
    (see :mod:`pipeline.data.shard_index`); the whole shard by default."""
    info = manifest.shards(split)[shard]
    index = load_index(manifest.file(info.index), info.index_sha256, info.count)
    samples = read_samples(manifest.file(info.file), index, first, count, first_index=info.start)
    return relabelled(samples, manifest.label_layer(split))


def shard_positions(manifest: Manifest, split: str, shard: int, positions: Sequence[int] | np.ndarray,
                    gap: int = GAP) -> Iterator[dict[str, Any]]:
    """The raw samples at ``positions`` (sorted, in the shard) and no others, each checked, read in as few byte
    ranges as they allow (see :func:`pipeline.data.shard_index.read_positions`)."""
    info = manifest.shards(split)[shard]
    index = load_index(manifest.file(info.index), info.index_sha256, info.count)
    samples = read_positions(manifest.file(info.file), index, np.asarray(positions), first_index=info.start, gap=gap)
    return relabelled(samples, manifest.label_layer(split))


def load_images(manifest: Manifest, split: str, indices: Sequence[int]) -> list[Image.Image]:
    """The images of the given global indices of a split, in that order, each read by its byte range
    (one sample, checked against the shard's index) and decoded."""
    ranges = manifest.ranges(split)
    starts = [a for a, _ in ranges]
    out = []
    for i in indices:
        s = bisect.bisect_right(starts, int(i)) - 1
        if s < 0 or not ranges[s][0] <= int(i) < ranges[s][1]:
            raise ShardError(f"{manifest.file(MANIFEST_NAME)}: no {split} sample {i}")
        sample = next(iter(shard_samples(manifest, split, s, int(i) - ranges[s][0], 1)))
        out.append(decode_sample(sample)[2])
    return out
