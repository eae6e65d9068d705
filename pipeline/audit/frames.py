"""Everything an audit reads, from a store and its shard folder: used by ``distill audit`` and by
``notebooks/audit.ipynb`` alike, so both audit the same rows.

Only the store and the shard manifest are read (no model): the store's frames, the clean pass's
per-image table and its dense probabilities. The manifest gives class names, shard files and any
planted flips; without one the audit still runs on class ids (and has no images to show).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

import store
from pipeline.audit.rankings import image_table
from pipeline.audit.tables import store_plans
from pipeline.core.config import Location
from pipeline.core.files import location
from pipeline.data.shards import MANIFEST_NAME, Manifest, load_manifest, shard_name
from pipeline.views.canary import require_same_views

__all__ = ["AuditInputs", "load_audit"]


@dataclass
class AuditInputs:
    """The frames of one audit. ``images``: one row per ingested training image (clean pass);
    ``val_images`` the same for val (None when val is not done); ``manifest`` the full shard manifest (None
    when the shard folder has none). :meth:`clean_probs` reads the dense probabilities, for rankings that need
    them (N x C floats: 5 GB at ImageNet scale, so only on request)."""

    group: Any
    spec: store.StoreSpec
    names: list[str]
    manifest: Manifest | None
    train: pd.DataFrame
    val: pd.DataFrame | None
    val_note: str
    images: pd.DataFrame
    val_images: pd.DataFrame | None
    view_drift: str | None = None
    """What differs between the store's canary views and this environment's (``allow_view_drift``)."""
    kept: np.ndarray | None = None
    """The clean pass's rows in ``images`` (None: all): a dropped label (the manifest's label layer) is not audited."""

    def clean_probs(self) -> np.ndarray:
        probs = store.split_probs(self.group, "clean")
        return probs if self.kept is None else probs[self.kept]


def without_dropped(df: pd.DataFrame, num_classes: int) -> tuple[pd.DataFrame, np.ndarray | None]:
    """A frame less its rows whose label was dropped (``num_classes``), partner labels of dropped samples missing;
    and the kept rows' positions (None: every row kept)."""
    keep = (df["label"] < num_classes).to_numpy()
    if "partner_label" in df:
        df = df.assign(partner_label=df["partner_label"].mask(df["partner_label"] >= num_classes))
        df = df.assign(dominant=df["dominant"].mask(df["dominant"] >= num_classes))
    if keep.all():
        return df, None
    return df[keep].reset_index(drop=True), np.flatnonzero(keep)


def _manifests(shards: Location) -> Manifest | None:
    """The full manifest, or None when the folder has none (a broken one is an error)."""
    return load_manifest(shards) if (location(shards) / MANIFEST_NAME).is_file() else None


def _split(group: Any, split: str, names: list[str]) -> pd.DataFrame:
    try:
        return store.val_frame(group, classes=names, split=split)
    except store.MissingUnit as e:
        raise store.MissingUnit(f"{e}; run `distill teacher` to complete the store") from None


def load_audit(store_path: Location, shards: Location, *, epochs: Sequence[int] | None = None,
               allow_view_drift: bool = False) -> AuditInputs:
    """Open the store (refused when written from other shards: its class ids would mean something else; or when
    this environment makes other views, unless ``allow_view_drift``) and build the audit's frames; ``epochs``
    limits the train frame (one row per stored view) to those epochs."""
    full = _manifests(shards)
    spec = store.spec_of(store.open_store(store_path))
    run = full.first_train_shards(spec.n_shards) if full is not None else None
    expected = {"manifest_fingerprint": run.fingerprint, "num_classes": run.num_classes} if run else None
    group = store.open_store(store_path, expected=expected)
    drift = require_same_views(group, str(store_path), allow_drift=allow_view_drift)
    names = list(full.classes) if full is not None else [str(i) for i in range(spec.num_classes)]
    if epochs is not None and any(not 0 <= e < spec.epochs for e in epochs):
        raise store.StoreError(f"audit --epoch {sorted(epochs)}: {store_path} holds epochs 0..{spec.epochs - 1}")
    train, _ = without_dropped(store.train_frame(group, store_plans(group), classes=names, epochs=epochs),
                               spec.num_classes)
    clean, kept = without_dropped(_split(group, "clean", names), spec.num_classes)
    files = ([s.file for s in full.shards("train")] if full is not None
             else [shard_name("train", s) for s in range(len(spec.clean_ranges))])
    images = image_table(
        clean, names, train=train, fit_samples=group.attrs["provenance"].get("teacher_fit_samples"),
        train_samples=spec.n_train, files=files, planted=full.split("train").planted if full is not None else (),
    )
    val = val_images = None
    val_note = "the store has no val split"
    if spec.n_val:
        try:
            val = _split(group, "val", names)
        except store.MissingUnit:
            val_note = "val shards not all done in the store"
    if val is not None:
        vfiles = ([s.file for s in full.shards("val")] if full is not None
                  else [shard_name("val", s) for s in range(spec.n_val_shards)])
        val_images = image_table(val, names, fit_samples=0, files=vfiles)
    return AuditInputs(group, spec, names, full, train, val, val_note, images, val_images, drift, kept)
