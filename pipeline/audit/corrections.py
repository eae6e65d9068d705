"""The audit's suggested corrections, as a relabel file (the format ``data.relabel`` reads, see
:mod:`pipeline.data.labels`): ``distill audit --relabel-out`` and the notebook's export write the same table.

Each row relabels a suspect to the teacher's top-1 on its evaluation view. A person reviews it (changes a
``label``, writes ``drop``, deletes a row), keeps it beside the config (``labels/``, tracked by ``dvc.yaml``)
and points ``data.relabel`` at it; ``distill ingest`` then applies it as the manifest's label layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from pipeline.core.files import atomic_write_text

COLUMNS = ("index", "key", "label", "given", "p_teacher", "p_label", "rank", "file")
"""``index``, ``key`` and ``label`` are read back; the rest is there for the person who reviews the file."""


def _by_name(names: Sequence[str]) -> bool:
    """Whether labels can be written as class names: unique, and none that reads as a class id."""
    return len(set(names)) == len(names) and not any(str(n).strip().lstrip("-").isdigit() for n in names)


def relabel_rows(ranked: pd.DataFrame, names: Sequence[str], *, confidence: float = 0.0,
                 top: int | None = None) -> pd.DataFrame:
    """The corrections a ranked image table (``pipeline.audit.tables.rank_images``) suggests: its suspects whose
    teacher top-1 is another class with at least ``confidence``, most suspect first, the first ``top`` of them.
    ``label`` is the teacher's class (by name when the names allow it, else by id); ``given`` the label now."""
    rows = ranked[ranked["suspect"] & (ranked["teacher"] != ranked["label"]) & (ranked["p_teacher"] >= confidence)]
    if top is not None:
        rows = rows.head(top)
    named = _by_name(names)
    show = (lambda c: str(names[int(c)])) if named else (lambda c: int(c))
    return pd.DataFrame({
        "index": rows["index"].astype("int64").to_numpy(),
        "key": rows["key"].to_numpy(),
        "label": [show(c) for c in rows["teacher"]],
        "given": [show(c) for c in rows["label"]],
        "p_teacher": rows["p_teacher"].round(4).to_numpy(),
        "p_label": rows["p_label"].round(4).to_numpy(),
        "rank": rows["rank"].to_numpy(),
        "file": rows["file"].to_numpy(),
    }, columns=list(COLUMNS))


def write_relabel(rows: pd.DataFrame, path: str) -> str:
    """Write a relabel table as CSV (keys keep their leading zeros); returns the path."""
    atomic_write_text(path, rows.to_csv(index=False))
    return str(path)
