"""``distill audit``: where the stored teacher disagrees with the labels, and which labels it doubts.

Reads the logit store (no model, no images) and reports those disagreements overall, per epoch, per
class and as a confusion table, and lists the samples the teacher confidently contradicts on unmixed
views: candidate label noise, each with its WebDataset key and shard file so it can be looked at.
The tables are :mod:`pipeline.audit_tables`' (the notebook uses the same); rendering is
:mod:`stages.audit_report`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import store
from pipeline.audit_tables import audit_frames, store_plans
from pipeline.config import Config
from pipeline.files import location, use_storage_options
from pipeline.shards import MANIFEST_NAME, open_shards, shard_name
from stages.audit_report import write_report


def _manifest_info(cfg: Config) -> tuple[list[str] | None, list[str] | None, list[str] | None, dict[str, Any]]:
    """(class names, train shard files, val shard files, expected provenance) from the shard manifest.

    A missing manifest is not fatal (the store alone holds the figures): names fall back to class ids.
    A manifest that is there but broken is an error.
    """
    if not (location(cfg.data.shards) / MANIFEST_NAME).is_file():
        return None, None, None, {}
    m = open_shards(cfg)
    return (
        list(m.classes),
        [s.file for s in m.shards("train")],
        [s.file for s in m.shards("val")] if "val" in m.splits else None,
        {"manifest_fingerprint": m.fingerprint, "num_classes": m.num_classes},
    )


def run(
    cfg: Config,
    *,
    top: int = 20,
    output: Path | None = None,
    threshold: float = 0.9,
    epochs: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Audit the logit store of ``cfg``; write the report into ``output`` (default runs/audit next to
    evaluate.output) and return the headline figures (also written to audit.json).

    The store must come from the shards in cfg.data.shards (same manifest fingerprint), else the class
    names would be wrong: ProvenanceMismatch. Only units marked done are audited.
    """
    use_storage_options(cfg.storage_options)
    out = location(output) if output is not None else location(cfg.evaluate.output).parent / "audit"
    names, train_files, val_files, expected = _manifest_info(cfg)
    group = store.open_store(cfg.store.path, expected=expected or None)
    spec = store.spec_of(group)
    names_from_manifest = names is not None
    if names is None:
        names = [str(i) for i in range(spec.num_classes)]
        train_files = [shard_name("train", s) for s in range(spec.n_shards)]
        val_files = [shard_name("val", s) for s in range(spec.n_val_shards)]
    if epochs is not None and any(not 0 <= e < spec.epochs for e in epochs):
        raise store.StoreError(f"audit --epoch {sorted(epochs)}: {cfg.store.path} holds epochs 0..{spec.epochs - 1}")
    train = store.train_frame(group, store_plans(group), classes=names, epochs=epochs)  # one row per stored view
    val_note = "the store has no val split"
    try:
        val = store.val_frame(group, classes=names) if spec.n_val else None
    except store.MissingUnit:
        val, val_note = None, "val shards not all done in the store"
    tables = audit_frames(
        train, val, names, top=top, threshold=threshold, train_files=train_files, val_files=val_files
    )
    done = store.done_mask(group)
    info = {
        "store": str(cfg.store.path),
        "names_from_manifest": names_from_manifest,
        "units_done": int(done.sum()),
        "units_total": int(done.size),
        "val_note": val_note,
    }
    tables.headline["output"] = str(out)
    write_report(tables, names, out, top=top, info=info)
    return tables.headline
