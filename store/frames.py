"""pandas views of the logit store, for audits and notebooks: one row per stored (epoch, sample).

Frames are built from whole units (one slice per array and unit, see :func:`read_train_unit`) and
concatenated once, so building a frame costs the same reads as one pass of the student's loader.
Only units marked done appear: a store that the teacher stage is still filling can be audited.

Probabilities are the teacher's at temperature 1, rebuilt from the stored top-k logits and the
logsumexp of the full logits (``exp(logit - lse)``), so they are exact up to float16 storage.

``p_label`` when the true label is not among the stored top-k classes: the exact value is unknown;
the frame gives the *even-tail estimate* ``tail / (C - k)`` with ``tail = 1 - sum(stored probs)``,
the same value :func:`store.dense_soft_target` gives that class at tau 1 (what a soft-distilled
student is trained towards). It is an estimate, not a bound (the true value lies in
``[0, min(tail, p_k)]``); ``label_in_topk`` says which rows are exact. In a dense store (k = C) every
row is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import zarr

from store.layout import KIND_NAMES, KIND_NONE, spec_of
from store.provenance import StoreError
from store.reader import done_mask, read_train_unit, read_val
from store.records import plan_digest
from store.targets import dense_soft_target, stored_probs, tail_mass

__all__ = ["split_probs", "train_frame", "val_frame"]



def _teacher_columns(
    topk_logits: np.ndarray, topk_classes: np.ndarray, logsumexp: np.ndarray, label: np.ndarray, num_classes: int
) -> dict[str, np.ndarray]:
    """teacher, p_teacher, p_label, label_in_topk, margin for a block of rows (numpy, vectorised)."""
    probs = stored_probs(topk_logits, logsumexp)  # (n, k) float32
    n, k = probs.shape
    classes = np.asarray(topk_classes).astype(np.int64)
    label = np.asarray(label).astype(np.int64)
    hit = classes == label[:, None]
    in_topk = hit.any(axis=1)
    exact = np.where(hit, probs, 0.0).sum(axis=1)
    if k < num_classes:
        estimate = np.maximum(tail_mass(topk_logits, logsumexp), 0.0) / (num_classes - k)
        p_label = np.where(in_topk, exact, estimate)
    else:
        p_label = exact
    margin = probs[:, 0] - probs[:, 1] if k > 1 else np.full(n, np.nan, dtype=np.float32)
    return {
        "teacher": classes[:, 0],
        "p_teacher": probs[:, 0].astype(np.float32),
        "p_label": p_label.astype(np.float32),
        "label_in_topk": in_topk,
        "margin": margin.astype(np.float32),
    }


def _check_classes(classes: Sequence[str] | None, num_classes: int) -> list[str] | None:
    if classes is None:
        return None
    names = [str(c) for c in classes]
    if len(names) != num_classes:
        raise ValueError(f"classes: {len(names)} names given, the store has {num_classes} classes")
    return names


def _add_names(df: pd.DataFrame, names: list[str] | None) -> pd.DataFrame:
    """label_name / teacher_name: categoricals over all class names (plain strings if names repeat); missing for a
    dropped label (``num_classes``: no class)."""
    if names is None:
        return df
    unique = len(set(names)) == len(names)
    for col in ("label", "teacher"):
        codes = df[col].to_numpy()
        codes = np.where(codes < len(names), codes, -1)
        if unique:
            df[f"{col}_name"] = pd.Categorical.from_codes(codes, categories=names)
        else:
            named = np.append(np.asarray(names, dtype=object), None)[codes]
            df[f"{col}_name"] = pd.Series(named, index=df.index, dtype="string")
    return df


Plans = Callable[[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]]
"""(stored epoch, shard) -> the unit's mix plan (partner, kind, λ): the store keeps only its digest."""


def _unit_columns(u, plans: Plans, num_classes: int) -> dict[str, np.ndarray]:
    """A train unit's rows, with its mix plan (checked against the digest stored with the unit)."""
    e, s, n = u.epoch, u.shard, u.end - u.start
    partner, kind, lam = plans(e, s)
    if u.plan is not None and plan_digest(partner, kind, lam) != u.plan:
        raise StoreError(f"train_frame: the plan given for unit (epoch {e}, shard {s}) is not the one stored")
    return {
        "epoch": np.full(n, e, dtype=np.int32),
        "index": np.arange(u.start, u.end, dtype=np.int64),
        "shard": np.full(n, s, dtype=np.int32),
        "label": u.label.astype(np.int64),
        **_teacher_columns(u.topk_logits, u.topk_classes, u.logsumexp, u.label, num_classes),
        "kind": np.asarray(kind).astype(np.int8),
        "partner": np.asarray(partner).astype(np.int64),
        "lam": np.asarray(lam).astype(np.float32),
    }


def train_frame(
    group: zarr.Group, plans: Plans, epochs: Sequence[int] | None = None, *, classes: Sequence[str] | None = None
) -> pd.DataFrame:
    """One row per stored (epoch, index) over the done units of ``epochs`` (all stored epochs if None).

    ``plans`` gives each unit's mix plan (the store keeps its digest, and a plan that does not match it is
    refused); ``pipeline.audit.tables.store_plans`` derives it from the store's provenance.

    Columns: epoch, index, shard, label, teacher (top-1 class, = hard_label), p_teacher, p_label,
    label_in_topk, margin (p1 - p2, NaN when k = 1), kind (categorical none/mixup/cutmix), partner
    (stored global index), lam (weight of the sample itself), partner_label (nullable, <NA> when
    partner < 0), dominant (the label carrying weight >= 0.5 in the view: label when unmixed or
    lam >= 0.5, else partner_label); with ``classes`` also label_name and teacher_name. Rows are ordered by (epoch,
    index).
    """
    spec = spec_of(group)
    names = _check_classes(classes, spec.num_classes)
    wanted = list(range(spec.epochs)) if epochs is None else [int(e) for e in epochs]
    bad = [e for e in wanted if not 0 <= e < spec.epochs]
    if bad:
        raise ValueError(f"train_frame: epochs {bad} outside the store's range [0, {spec.epochs})")
    mask = done_mask(group)
    units = [read_train_unit(group, e, s) for e in sorted(set(wanted)) for s in np.flatnonzero(mask[e]).tolist()]
    all_labels = np.full(spec.n_train, -1, dtype=np.int64)  # labels of the units read, for partner labels
    for u in units:
        all_labels[u.start : u.end] = u.label

    parts: dict[str, list[np.ndarray]] = {}
    for u in units:
        for k, v in _unit_columns(u, plans, spec.num_classes).items():
            parts.setdefault(k, []).append(v)
    empty = {
        "epoch": np.int32, "index": np.int64, "shard": np.int32, "label": np.int64, "teacher": np.int64,
        "p_teacher": np.float32, "p_label": np.float32, "label_in_topk": bool, "margin": np.float32,
        "kind": np.int8, "partner": np.int64, "lam": np.float32,
    }  # fmt: skip
    cols = {k: (np.concatenate(parts[k]) if k in parts else np.zeros(0, dtype=t)) for k, t in empty.items()}

    df = pd.DataFrame({k: v for k, v in cols.items() if k != "kind"})
    df.insert(df.columns.get_loc("partner"), "kind", pd.Categorical.from_codes(cols["kind"], KIND_NAMES))
    partner = cols["partner"]
    valid = (partner >= 0) & (partner < len(all_labels))
    valid &= all_labels[np.where(valid, partner, 0)] >= 0
    plabel = pd.Series(all_labels[np.where(valid, partner, 0)], dtype="Int64").mask(~valid)
    df["partner_label"] = plabel
    own = (cols["kind"] == KIND_NONE) | (cols["lam"] >= 0.5)
    df["dominant"] = pd.Series(cols["label"], dtype="Int64").where(own, plabel)
    return _add_names(df, names)


def val_frame(group: zarr.Group, *, classes: Sequence[str] | None = None, split: str = "val") -> pd.DataFrame:
    """One row per image of a split of evaluation views (never mixed): ``val``, or ``clean``, the teacher's
    pass over every ingested training image.

    Columns: index, shard, label, teacher, p_teacher, p_label, label_in_topk, margin; with ``classes``
    also label_name and teacher_name. Raises MissingUnit when a shard of the split is not done (it is read
    whole, as :func:`store.read_val` does).
    """
    spec = spec_of(group)
    names = _check_classes(classes, spec.num_classes)
    v = read_val(group, split)
    index = np.arange(v.start, v.end, dtype=np.int64)
    ends = np.array([b for _, b in spec.view_ranges(split)], dtype=np.int64)
    df = pd.DataFrame(
        {
            "index": index,
            "shard": np.searchsorted(ends, index, side="right").astype(np.int32),
            "label": v.label.astype(np.int64),
            **_teacher_columns(v.topk_logits, v.topk_classes, v.logsumexp, v.label, spec.num_classes),
        }
    )
    return _add_names(df, names)


def split_probs(group: zarr.Group, split: str = "clean") -> np.ndarray:
    """(N, C) the teacher's probabilities on a split of evaluation views (``clean``: every ingested training
    image; ``val``): exact for the stored classes, the tail spread evenly over the rest (as
    ``dense_soft_target`` at tau 1). Dense: at ImageNet scale (1.28 M x 1000) that is 5 GB of float32."""
    v = read_val(group, split)
    return dense_soft_target(v.topk_logits, v.topk_classes, v.logsumexp, spec_of(group).num_classes)
