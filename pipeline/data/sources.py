"""Input readers for ingest: MNIST-family IDX files and ImageNet-style class folders.

Each reader returns a :class:`Source`: the class names, and per split a list of :class:`Record`
(label, a name for messages, and a loader returning ``(ext, bytes)`` with ``ext`` "png" or "jpg"),
in a canonical order (file order for IDX, sorted relative paths for folders) that ingest then
shuffles with the config seed. It also lists every input file with its size and mtime so a rerun
can tell cheaply whether the inputs changed.

Bad inputs raise :class:`IngestError` naming the path. A single image that cannot be read or
decoded raises :class:`CorruptImage` from its loader, so the caller can skip it when asked to.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.errors import DistillError
from pipeline.core.files import is_url, location

GZIP_MAGIC = b"\x1f\x8b"
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})

# IDX split prefixes (the MNIST names: "t10k" is the test/val split).
IDX_PREFIX = {"train": "train", "val": "t10k"}
_IDX_UBYTE = 0x08


class IngestError(DistillError, ValueError):
    """An input that cannot be ingested; the message names the path."""


class CorruptImage(IngestError):
    """One image file that cannot be read or decoded (skippable with data.allow_corrupt)."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: unreadable or corrupt image: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class Record:
    label: int
    name: str
    """Where the sample comes from: a path relative to the split root, or ``file[i]`` for IDX."""
    load: Callable[[], tuple[str, bytes]] = field(repr=False, compare=False)
    """Returns ``(ext, encoded bytes)``; raises :class:`CorruptImage` for a bad file."""


@dataclass(frozen=True)
class Loaded:
    classes: list[str]
    splits: dict[str, list[Record]]
    channels_hint: int


class Source:
    """An input dataset: its file list at once; its records on first use (reading may be slow).

    ``inputs`` lists every input file as (relative path, size, mtime_ns), sorted: the basis of the
    input key that tells a rerun whether anything changed, without reading the images.
    """

    def __init__(self, kind: str, inputs: list[tuple[str, int, int]], load: Callable[[], Loaded]):
        self.kind = kind
        self.inputs = inputs
        self._load = load
        self._loaded: Loaded | None = None

    def _get(self) -> Loaded:
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded

    @property
    def classes(self) -> list[str]:
        return self._get().classes

    @property
    def splits(self) -> dict[str, list[Record]]:
        return self._get().splits

    @property
    def channels_hint(self) -> int:
        return self._get().channels_hint


# ---------------------------------------------------------------------------------------------
# Image helpers


def detect_format(data: bytes) -> str | None:
    """'jpg' or 'png' from the magic bytes; None for anything else."""
    if data.startswith(JPEG_MAGIC):
        return "jpg"
    if data.startswith(PNG_MAGIC):
        return "png"
    return None


def check_image(data: bytes, path: Path | str) -> str:
    """Verify that ``data`` is a whole JPEG/PNG image; returns its ext or raises CorruptImage."""
    ext = detect_format(data)
    if ext is None:
        raise CorruptImage(path, "not a JPEG or PNG file (by its magic bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise CorruptImage(path, f"{type(e).__name__}: {e}") from e
    return ext


def array_to_png(arr: np.ndarray) -> bytes:
    """PNG bytes for a uint8 image: mode "L" for (H, W), "RGB" for (H, W, 3). Deterministic."""
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"expected an (H, W) or (H, W, 3) array, got shape {arr.shape}")
    im = Image.fromarray(np.ascontiguousarray(arr))  # uint8 (H, W) -> "L", (H, W, 3) -> "RGB"
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _idx_png(images: np.ndarray, i: int) -> tuple[str, bytes]:
    return "png", array_to_png(images[i])


def _file_loader(path: Path) -> tuple[str, bytes]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorruptImage(path, f"cannot read: {e.strerror or e}") from e
    return check_image(data, path), data


# ---------------------------------------------------------------------------------------------
# IDX


def _find_idx(root: Path, prefix: str, kind: str) -> Path:
    dims = "idx3" if kind == "images" else "idx1"
    names = [f"{prefix}-{kind}-{dims}-ubyte", f"{prefix}-{kind}.{dims}-ubyte"]
    for name in names:
        for cand in (root / name, root / f"{name}.gz"):
            if cand.is_file():
                return cand
    raise IngestError(f"{root / (names[0] + '[.gz]')}: IDX file not found in data.root {root}")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not, detected by its magic bytes) as a uint8 array."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise IngestError(f"{path}: cannot read IDX file: {e.strerror or e}") from e
    if raw.startswith(GZIP_MAGIC):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise IngestError(f"{path}: corrupt gzip data: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IngestError(f"{path}: bad IDX magic number {raw[:4].hex() or '(empty file)'}")
    dtype, ndim = raw[2], raw[3]
    if dtype != _IDX_UBYTE:
        raise IngestError(f"{path}: IDX element type 0x{dtype:02x} is not unsigned byte (0x08)")
    if ndim == 0:
        raise IngestError(f"{path}: IDX file declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IngestError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise IngestError(f"{path}: IDX shape {list(shape)} needs {expected} bytes, file has {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_split(img_path: Path, lab_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
        raise IngestError(
            f"{img_path}: expected images of shape (N, H, W) or (N, H, W, 3), got {list(images.shape)}"
        )
    if min(images.shape[1:3]) < 1:
        raise IngestError(f"{img_path}: empty images of shape {list(images.shape)}")
    if labels.ndim != 1:
        raise IngestError(f"{lab_path}: expected labels of shape (N,), got {list(labels.shape)}")
    if len(images) != len(labels):
        raise IngestError(f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels")
    return images, labels


def read_idx_source(root: str | None, class_names: list[str] | None = None) -> Source:
    if root is None or not location(root).is_dir():
        raise IngestError(f"{root}: data.root does not exist or is not a folder")
    root = location(root)
    paths = {
        split: (_find_idx(root, prefix, "images"), _find_idx(root, prefix, "labels"))
        for split, prefix in IDX_PREFIX.items()
    }

    def load() -> Loaded:
        splits: dict[str, list[Record]] = {}
        channels = 1
        max_label = -1
        for split, (img_path, lab_path) in paths.items():
            images, labels = _idx_split(img_path, lab_path)
            channels = 3 if images.ndim == 4 else channels
            if len(labels):
                top = int(labels.max())
                if class_names is not None and top >= len(class_names):
                    raise IngestError(
                        f"{lab_path}: label {top} is out of range for {len(class_names)} data.class_names"
                    )
                max_label = max(max_label, top)
            splits[split] = [
                Record(int(lab), f"{img_path.name}[{i}]", partial(_idx_png, images, i))
                for i, lab in enumerate(labels.tolist())
            ]
        names = list(class_names) if class_names is not None else [str(c) for c in range(max_label + 1)]
        return Loaded(names, splits, channels)

    files = [p for pair in paths.values() for p in pair]
    return Source("idx", _stat_inputs(root, files), load)


# ---------------------------------------------------------------------------------------------
# ImageFolder


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _class_dirs(root: Path, what: str) -> list[str]:
    if not root.is_dir():
        raise IngestError(f"{root}: {what} does not exist or is not a folder")
    names = sorted(e.name for e in root.iterdir() if _visible(e.name) and e.is_dir())
    if not names:
        raise IngestError(f"{root}: {what} holds no class folders")
    return names


def _images_in(folder: Path) -> list[Path]:
    """The images under a class folder, in sorted order (one listing on an object store)."""
    if is_url(folder):
        root = folder.path.rstrip("/") + "/"
        rels = [p[len(root):] for p in folder.fs.find(folder.path) if p.startswith(root)]
    else:
        rels = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if _visible(d))
            rels += [os.path.relpath(os.path.join(dirpath, f), folder).replace(os.sep, "/") for f in filenames]
    keep = [r for r in rels if all(_visible(part) for part in r.split("/"))
            and os.path.splitext(r)[1].lower() in IMAGE_SUFFIXES]
    return [folder / r for r in sorted(keep)]


def read_imagefolder_source(
    train_root: str | None, val_root: str | None, class_names: list[str] | None = None
) -> Source:
    if train_root is None or val_root is None:
        raise IngestError("data.train_root and data.val_root must both be set for an imagefolder source")
    roots = {"train": location(train_root), "val": location(val_root)}
    classes = _class_dirs(roots["train"], "data.train_root")
    if class_names is not None and list(class_names) != classes:
        raise IngestError(
            f"{roots['train']}: data.class_names {list(class_names)} differ from the sorted class "
            f"folders {classes} (an imagefolder source takes its class names from the folders)"
        )
    val_classes = _class_dirs(roots["val"], "data.val_root")
    index = {c: i for i, c in enumerate(classes)}
    for c in val_classes:
        if c not in index:
            raise IngestError(
                f"{roots['val'] / c}: class folder {c!r} in data.val_root is not in data.train_root "
                f"{roots['train']}"
            )
    splits: dict[str, list[Record]] = {}
    inputs: list[tuple[str, int, int]] = []
    for split, names in (("train", classes), ("val", val_classes)):
        root = roots[split]
        recs: list[Record] = []
        for c in names:
            files = _images_in(root / c)
            if not files:
                raise IngestError(f"{root / c}: empty class folder (no .jpg/.jpeg/.png files)")
            for p in files:
                recs.append(Record(index[c], _relative(p, root), partial(_file_loader, p)))
        splits[split] = recs
        stats = _stat_inputs(root, [root / r.name for r in recs])
        inputs += [(f"{split}/{rel}", size, mtime) for rel, size, mtime in stats]
    loaded = Loaded(classes, splits, 3)
    return Source("imagefolder", sorted(inputs), lambda: loaded)


def _relative(p: Path, root: Path) -> str:
    return str(p)[len(str(root).rstrip("/")) + 1 :]


def _stat_inputs(root: Path, files: list[Path]) -> list[tuple[str, int, int]]:
    """(relative path, size, modification time in ns) of every input file: what tells a rerun that nothing
    changed, without reading the images."""
    out = []
    for p in files:
        try:
            st = p.stat()
        except OSError as e:
            raise IngestError(f"{p}: cannot stat input file: {e.strerror or e}") from e
        mtime = getattr(st, "st_mtime_ns", None) or int(float(st.st_mtime) * 1e9)
        out.append((_relative(p, root), int(st.st_size), int(mtime)))
    return sorted(out)


def read_source(data) -> Source:
    """The source named by a DataConfig."""
    if data.source == "idx":
        return read_idx_source(data.root, data.class_names)
    if data.source == "imagefolder":
        return read_imagefolder_source(data.train_root, data.val_root, data.class_names)
    raise IngestError(f"data.source {data.source!r} is not supported")
