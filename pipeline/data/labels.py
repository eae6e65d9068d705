"""The manifest's label layer: corrections to the training labels, applied as samples are read, never written
into the shards.

A shard holds each sample's ``cls`` as ingest wrote it (with any planted flip). The layer (``data.relabel``,
recorded by ingest in the manifest, so the run's fingerprint covers it) maps a sample's global index to its
corrected label, or drops its label. Every reader of a split's samples goes through :func:`relabelled`, so the
teacher fit, the teacher stage (and the labels the store keeps) and the students all see the same labels.

A dropped sample keeps its place (its views are a function of its index, and it is still a Mixup/CutMix partner)
but has no label: its ``cls`` reads as ``num_classes`` (:func:`is_dropped`), which puts no mass in any target,
so no class head is trained on it; the teacher still labels its views.

The relabel file is a table (CSV, or parquet with pyarrow installed), one row per corrected sample: ``index``
(the global index) or ``key`` (the WebDataset key, ``%08d`` of the index), and ``label``: a class id, a class
name, or ``drop``. Other columns (the given label, the teacher's probability, ...) are kept for people and
ignored here. :func:`read_relabel` refuses the first bad row by its number, before anything is applied.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
from pydantic import BaseModel, ConfigDict

from pipeline.core.errors import DistillError
from pipeline.core.files import location

if TYPE_CHECKING:
    from pipeline.data.shards import Manifest

DROP = "drop"
"""A relabel file's ``label`` that drops the sample's label."""
_KEY = re.compile(r"^\d{8,}$")


class RelabelError(DistillError, ValueError):
    """A relabel file that cannot be applied; the message names the file and the row."""


class Relabel(BaseModel):
    """One correction of the label layer: the sample's global index and its new label (None: dropped)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    index: int
    label: int | None


def is_dropped(label: int, num_classes: int) -> bool:
    """Whether a read label is a dropped one (``num_classes``: no class)."""
    return label >= num_classes


def relabelled(samples: Iterable[dict[str, Any]], layer: Mapping[int, int]) -> Iterator[dict[str, Any]]:
    """Raw samples with the layer's labels in their ``cls`` (``layer``: index -> label, ``num_classes`` for a
    dropped one); samples the layer does not name pass unchanged."""
    for raw in samples:
        label = layer.get(int(bytes(raw["idx"]).decode("ascii"))) if "idx" in raw and layer else None
        yield raw if label is None else {**raw, "cls": str(label).encode("ascii")}


def _table(path: str) -> pd.DataFrame:
    loc = location(path)
    if not loc.is_file():
        raise RelabelError(f"{path}: relabel file not found (data.relabel)")
    try:
        with loc.open("rb") as f:
            if str(path).endswith(".parquet"):
                return pd.read_parquet(f)
            return pd.read_csv(f, dtype=str, keep_default_na=False)
    except ImportError as e:
        raise RelabelError(f"{path}: reading parquet needs pyarrow ({e}): pip install pyarrow") from None
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise RelabelError(f"{path}: not a CSV or parquet table: {e}") from None


def _whole(text: str) -> int | None:
    """An integer written as one (``3``) or as pandas writes one beside missing cells (``3.0``); else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() and text.strip().lstrip("-").replace(".", "", 1).isdigit() else None


def _index(row: pd.Series, count: int) -> int:
    """The row's global index, from ``index`` and/or ``key`` (which must agree)."""
    found = []
    if "index" in row and str(row["index"]).strip() != "":
        text = str(row["index"]).strip()
        if text.lower() != "nan":
            if _whole(text) is None:
                raise ValueError(f"index {text!r} is not a sample index")
            found.append(_whole(text))
    if "key" in row and str(row["key"]).strip().lower() not in ("", "nan"):
        text = str(row["key"]).strip()
        if not _KEY.match(text):
            raise ValueError(f"key {text!r} is not a sample key (8 digits or more)")
        found.append(int(text))
    if not found:
        raise ValueError("no index or key")
    if len(set(found)) > 1:
        raise ValueError(f"index {found[0]} and key {found[1]:08d} name different samples")
    if not 0 <= found[0] < count:
        raise ValueError(f"unknown sample {found[0]} (the train split holds 0..{count - 1})")
    return found[0]


def _label(value: Any, classes: Sequence[str]) -> int | None:
    """A class id, a class name (unique), or ``drop`` (None)."""
    text = str(value).strip()
    if text.lower() == DROP:
        return None
    names = [i for i, name in enumerate(classes) if name == text]
    cid = _whole(text)
    if cid is not None:
        if not 0 <= cid < len(classes):
            raise ValueError(f"label {cid} is out of range (classes 0..{len(classes) - 1})")
        if names and names != [cid]:
            raise ValueError(f"label {text!r} is class id {cid} and the name of class {names[0]}: ambiguous")
        return cid
    if len(names) != 1:
        why = "names several classes" if names else f"is not a class id, a class name or {DROP!r}"
        raise ValueError(f"label {text!r} {why}")
    return names[0]


def read_relabel(path: str, count: int, classes: Sequence[str]) -> list[Relabel]:
    """The corrections of a relabel file for a train split of ``count`` samples, sorted by index; the first bad
    row (an unknown sample, a class out of range, a sample named twice) is refused by its number."""
    df = _table(str(path))
    if "label" not in df.columns or not ({"index", "key"} & set(df.columns)):
        raise RelabelError(f"{path}: a relabel file needs a 'label' column and an 'index' or 'key' column; it has "
                           f"{', '.join(map(str, df.columns)) or 'none'}")
    seen: dict[int, int] = {}
    out = []
    for row_number, (_, row) in enumerate(df.iterrows(), start=1):
        try:
            index = _index(row, count)
            if index in seen:
                raise ValueError(f"sample {index} is already relabelled by row {seen[index]}")
            out.append(Relabel(index=index, label=_label(row["label"], classes)))
        except ValueError as e:
            raise RelabelError(f"{path}: row {row_number}: {e}; nothing applied") from None
        seen[index] = row_number
    return sorted(out, key=lambda r: r.index)


def config_layer(manifest: Manifest, relabel: str | None) -> list[Relabel]:
    """The train label layer ``data.relabel`` gives this manifest (empty without one)."""
    if relabel is None:
        return []
    return read_relabel(relabel, manifest.count("train"), manifest.classes)


def check_label_layer(manifest: Manifest, relabel: str | None) -> None:
    """Refuse a manifest whose label layer is not the config's ``data.relabel``: ingest has not applied it."""
    if manifest.split("train").relabel != config_layer(manifest, relabel):
        have = len(manifest.split("train").relabel)
        raise RelabelError(f"{manifest.file('manifest.json')} applies {have} label correction(s), not those of "
                           f"data.relabel ({relabel}): run `distill ingest` to apply them")
