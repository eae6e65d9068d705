"""``distill audit``: which training labels the teacher doubts, and where it disagrees with the labels.

Reads the logit store and the shard manifest (no model): the teacher's answer on every ingested
training image's evaluation view (the store's clean pass) ranks the images whose label is probably
wrong (``suspects.csv``, and a contact sheet of the first ones, ``suspects.png``); the stored
augmented views and val give the disagreement per epoch, per class and as confusion tables. When
the manifest records planted flips (``data.label_noise``) the report scores each ranking on them.
The frames are :mod:`pipeline.audit.frames`', the tables :mod:`pipeline.audit.tables`' (the notebook
uses both); rendering is :mod:`stages.audit_report`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

import store
from pipeline.audit.corrections import relabel_rows, write_relabel
from pipeline.audit.frames import AuditInputs, load_audit
from pipeline.audit.rankings import DEFAULT_RANKING, available_rankings
from pipeline.audit.tables import audit_frames
from pipeline.core.config import Config
from pipeline.core.files import location, use_storage_options
from pipeline.data.shards import load_images
from stages.audit_report import write_report

SHEET = 32
"""Suspects on the contact sheet."""


def contact_sheet_rows(inputs: AuditInputs, suspects: pd.DataFrame, n: int = SHEET) -> tuple[pd.DataFrame, list]:
    """The first ``n`` suspects and their images read from the shards (none without a manifest)."""
    if inputs.manifest is None or suspects.empty:
        return suspects.head(0), []
    rows = suspects.head(n).copy()
    names = inputs.names
    rows["true_name"] = [names[int(t)] if not pd.isna(t) else "" for t in rows["true_label"]]
    return rows, load_images(inputs.manifest, "train", rows["index"].tolist())


def run(
    cfg: Config,
    *,
    top: int = 20,
    output: Path | None = None,
    threshold: float = 0.05,
    epochs: Sequence[int] | None = None,
    ranking: str = DEFAULT_RANKING,
    sheet: int = SHEET,
    allow_view_drift: bool = False,
    relabel_out: str | None = None,
    relabel_confidence: float = 0.5,
    relabel_top: int | None = None,
) -> dict[str, Any]:
    """Audit the logit store of ``cfg``; write the report into ``output`` (default runs/audit next to
    evaluate.output) and return the headline figures (also written to audit.json).

    The store must come from the shards in cfg.data.shards (same manifest fingerprint), else the class
    names would be wrong: ProvenanceMismatch. Stored views are audited where their units are done; the
    clean pass must be complete (MissingUnit otherwise). ``relabel_out``: also write the suspects the teacher names
    another class for with at least ``relabel_confidence`` (the first ``relabel_top``) as a relabel file.
    """
    use_storage_options(cfg.storage_options)
    out = location(output) if output is not None else location(cfg.evaluate.output).parent / "audit"
    inputs = load_audit(cfg.store.path, cfg.data.shards, epochs=epochs, allow_view_drift=allow_view_drift)
    tables = audit_frames(
        inputs.train, inputs.val, inputs.images, inputs.names, top=top, threshold=threshold, ranking=ranking,
        compare=available_rankings() if inputs.images["planted"].any() else (), probs=inputs.clean_probs,
        val_images=inputs.val_images,
    )
    done = store.done_mask(inputs.group)
    info = {
        "store": str(cfg.store.path),
        "names_from_manifest": inputs.manifest is not None,
        "units_done": int(done.sum()),
        "units_total": int(done.size),
        "val_note": inputs.val_note,
    }
    tables.headline["output"] = str(out)
    if inputs.view_drift:
        tables.headline["view_drift"] = inputs.view_drift
    if relabel_out is not None:
        rows = relabel_rows(tables.images, inputs.names, confidence=relabel_confidence, top=relabel_top)
        tables.headline.update(relabel_out=write_relabel(rows, relabel_out), relabel_rows=len(rows))
    write_report(tables, inputs.names, out, top=top, info=info,
                 sheet=contact_sheet_rows(inputs, tables.suspects, sheet) if sheet else None)
    return tables.headline
