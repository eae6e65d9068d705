"""The audit's tables: pure functions from the store's pandas frames (``store.train_frame``,
``store.val_frame``) and the per-image table (:mod:`pipeline.audit.rankings`) to DataFrames, used by
``distill audit`` and by ``notebooks/audit.ipynb``.

The student's distillation head learns the teacher's hard decision, so every sample where teacher
and label differ pulls the two heads apart. On a Mixup/CutMix view the image blends two samples and
the target is lam*y + (1-lam)*y_partner, so "teacher != label" there is not a disagreement with one
truth: the per-epoch table also gives the λ-weighted agreement (a view agrees with its sample's label
with weight λ and with its partner's with weight 1 − λ). The confusion tables and the suspects use
views that are never mixed: the clean pass (every ingested training image's evaluation view) and val.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

import store
from pipeline.audit.rankings import DEFAULT_RANKING, label_issue_order, planted_scores
from pipeline.core.config import AugConfig
from pipeline.views.plan import epoch_plan

__all__ = [
    "store_plans",
    "AuditTables",
    "audit_frames",
    "confused_pairs",
    "confusion",
    "per_class",
    "per_epoch",
    "rank_images",
]


def store_plans(group: Any) -> Any:
    """The mix plan of every unit of a logit store, re-derived from the augmentation and seed in its
    provenance (the store keeps each plan's digest, and ``store.train_frame`` checks it)."""
    prov = group.attrs["provenance"]
    aug, seed, spec = AugConfig.model_validate(prov["aug"]), int(prov["seed"]), store.spec_of(group)

    def plans(epoch: int, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = epoch_plan(aug, seed, epoch, shard, *spec.train_ranges[shard])
        return p.partner, p.kind, p.lam

    return plans


def _rate(num: pd.Series | float, den: pd.Series | float) -> Any:
    """num / den, NaN where den is 0 (a rate of nothing is undefined, not 0)."""
    if isinstance(den, pd.Series):
        return (num / den.where(den > 0)).astype(float)
    return float(num) / den if den else math.nan


def _unmixed(df: pd.DataFrame) -> pd.Series:
    """Rows whose label is unambiguous: unmixed train views; every val row (val has no kind column)."""
    if "kind" not in df:
        return pd.Series(True, index=df.index)
    return (df["kind"] == "none").astype(bool)


def per_epoch(train: pd.DataFrame) -> pd.DataFrame:
    """Disagreement per stored epoch: all views, unmixed views, and mixed views against the dominant label.

    weighted_agreement: the mean over views of λ·[teacher = label] + (1 − λ)·[teacher = partner label] (λ = 1
    unmixed), the share of each view's target that its teacher top-1 carries. Counts and rates:
    mixed_dominant (its rate mixed_dominant_disagreement) counts mixed views whose teacher differs from the
    label weighing >= 0.5 in the blend; mixed_outside (rate mixed_outside_pair) those whose teacher is
    neither the sample's label nor its partner's. Column sums give the totals.
    """
    d = train["teacher"] != train["label"]
    un = _unmixed(train)
    mixed = ~un
    dom = (train["teacher"] != train["dominant"]).fillna(True).astype(bool)
    lam = np.where(un, 1.0, train["lam"].to_numpy(dtype=np.float64))
    with_partner = (train["teacher"] == train["partner_label"]).fillna(False).to_numpy(dtype=bool)
    weighted = lam * (~d).to_numpy() + (1.0 - lam) * with_partner
    outside = (d & (train["teacher"] != train["partner_label"]).fillna(True)).astype(bool)
    g = pd.DataFrame(
        {
            "epoch": train["epoch"],
            "samples": 1,
            "disagree": d,
            "unmixed_samples": un,
            "unmixed_disagree": d & un,
            "mixed_samples": mixed,
            "mixed_dominant": dom & mixed,
            "mixed_outside": outside & mixed,
            "p_teacher": train["p_teacher"].astype(float),
            "weighted": weighted,
        }
    ).groupby("epoch", sort=True)
    counts = ["samples", "disagree", "unmixed_samples", "unmixed_disagree", "mixed_samples", "mixed_dominant",
              "mixed_outside"]
    out = g[counts].sum().astype("int64")
    out.insert(2, "disagreement", _rate(out["disagree"], out["samples"]))
    out.insert(5, "unmixed_disagreement", _rate(out["unmixed_disagree"], out["unmixed_samples"]))
    out["mixed_dominant_disagreement"] = _rate(out["mixed_dominant"], out["mixed_samples"])
    out["mixed_outside_pair"] = _rate(out["mixed_outside"], out["mixed_samples"])
    out["weighted_agreement"] = g["weighted"].mean()
    out["mean_p_teacher"] = g["p_teacher"].mean()
    return out.reset_index()


def _class_counts(df: pd.DataFrame, mask: pd.Series, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(samples, disagreements) per true class over the rows in ``mask``."""
    lab = df["label"].to_numpy()[mask.to_numpy()]
    dis = (df["teacher"] != df["label"]).to_numpy()[mask.to_numpy()]
    return np.bincount(lab, minlength=num_classes), np.bincount(lab, weights=dis, minlength=num_classes)


def per_class(
    train: pd.DataFrame, val: pd.DataFrame | None, names: Sequence[str], clean: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Disagreement per given class: train (all views), train unmixed, clean (every ingested train image's
    evaluation view), val. One row per class, all classes."""
    c = len(names)
    out = pd.DataFrame({"class": np.arange(c), "name": list(names)})
    parts = [
        ("train", train, pd.Series(True, index=train.index)),
        ("unmixed", train, _unmixed(train)),
    ]
    if clean is not None:
        parts.append(("clean", clean, pd.Series(True, index=clean.index)))
    if val is not None:
        parts.append(("val", val, pd.Series(True, index=val.index)))
    for prefix, df, mask in parts:
        n, d = _class_counts(df, mask, c)
        out[f"{prefix}_samples"] = n.astype("int64")
        out[f"{prefix}_disagree"] = d.astype("int64")
        out[f"{prefix}_disagreement"] = _rate(out[f"{prefix}_disagree"], out[f"{prefix}_samples"])
    return out


def confusion(df: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Counts, rows = true label, columns = teacher top-1, every class on both axes (C x C).

    Axes are labelled by class name when the names are unique, by class id otherwise.
    """
    c = len(names)
    lab = df["label"].to_numpy(dtype=np.int64)
    tea = df["teacher"].to_numpy(dtype=np.int64)
    m = np.bincount(lab * c + tea, minlength=c * c).reshape(c, c)
    axis = list(names) if len(set(names)) == c else list(range(c))
    return pd.DataFrame(
        m, index=pd.Index(axis, name="label"), columns=pd.Index(axis, name="teacher")
    )


def confused_pairs(conf: pd.DataFrame, names: Sequence[str], top: int) -> pd.DataFrame:
    """The ``top`` most frequent label -> teacher confusions (off the diagonal) of a confusion table.

    share: the pair's count over all of the label's samples in the table.
    """
    m = conf.to_numpy()
    rows = m.sum(axis=1)
    off = m.copy()
    np.fill_diagonal(off, 0)
    lab, tea = np.nonzero(off)
    counts = off[lab, tea]
    order = np.lexsort((tea, lab, -counts))[:top]
    lab, tea, counts = lab[order], tea[order], counts[order]
    return pd.DataFrame(
        {
            "label": lab.astype("int64"),
            "label_name": [names[i] for i in lab],
            "teacher": tea.astype("int64"),
            "teacher_name": [names[i] for i in tea],
            "count": counts.astype("int64"),
            "share": counts / np.maximum(rows[lab], 1),
        }
    )


def rank_images(
    images: pd.DataFrame, *, ranking: str = DEFAULT_RANKING, threshold: float = 0.05,
    probs: Callable[[], np.ndarray] | None = None, order: np.ndarray | None = None,
) -> pd.DataFrame:
    """The per-image table most suspect first under ``ranking`` (or in ``order``, when already computed), with
    ``rank`` (1 = most suspect) and ``suspect`` (the teacher gives the label less than ``threshold`` on the
    image's evaluation view)."""
    order = label_issue_order(images, ranking, probs) if order is None else order
    out = images.iloc[order].reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1, dtype=np.int64))
    out["suspect"] = out["p_label"] < threshold
    return out


@dataclass
class AuditTables:
    """Every table of an audit, and the headline figures (JSON-ready: NaN becomes None).

    ``images``: every ingested training image, most suspect first (:func:`rank_images`); ``suspects``
    its rows flagged suspect; ``planted``: each ranking's precision/recall against planted flips (empty
    when the manifest records none).
    """

    headline: dict[str, Any]
    per_epoch: pd.DataFrame
    per_class: pd.DataFrame
    confusion: pd.DataFrame
    confusion_val: pd.DataFrame | None
    confused_pairs: pd.DataFrame
    images: pd.DataFrame
    suspects: pd.DataFrame
    suspects_val: pd.DataFrame | None
    planted: pd.DataFrame


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _pairs(conf: pd.DataFrame, conf_val: pd.DataFrame | None, names: list[str], top: int) -> pd.DataFrame:
    pairs = confused_pairs(conf, names, top)
    pairs.insert(0, "split", "clean")
    if conf_val is None:
        return pairs
    pv = confused_pairs(conf_val, names, top)
    pv.insert(0, "split", "val")
    return pd.concat([pairs, pv], ignore_index=True)


def _headline(train: pd.DataFrame, ep: pd.DataFrame, images: pd.DataFrame, val: pd.DataFrame | None,
              names: list[str]) -> dict[str, Any]:
    total, un = ep.sum(numeric_only=True), _unmixed(train)
    n_mixed = int(total.get("mixed_samples", 0))
    return {
        "num_classes": len(names),
        "epochs": sorted(int(e) for e in train["epoch"].unique()),
        "train_samples": len(train),
        "train_disagreement": _num(_rate(total.get("disagree", 0), len(train))),
        "weighted_agreement": _num(float((ep["weighted_agreement"] * ep["samples"]).sum()) / len(train))
        if len(train) else None,
        "unmixed_samples": int(un.sum()),
        "unmixed_disagreement": _num(_rate(total.get("unmixed_disagree", 0), int(un.sum()))),
        "mixed_samples": n_mixed,
        "mixed_dominant_disagreement": _num(_rate(total.get("mixed_dominant", 0), n_mixed)),
        "mixed_outside_pair": _num(_rate(total.get("mixed_outside", 0), n_mixed)),
        "images": len(images),
        "clean_disagreement": _num(_rate(int((images["teacher"] != images["label"]).sum()), len(images))),
        "val_samples": 0 if val is None else len(val),
        "val_disagreement": None if val is None else _num(_rate((val["teacher"] != val["label"]).sum(), len(val))),
    }


def audit_frames(
    train: pd.DataFrame,
    val: pd.DataFrame | None,
    images: pd.DataFrame,
    names: Sequence[str],
    *,
    top: int = 20,
    threshold: float = 0.05,
    ranking: str = DEFAULT_RANKING,
    compare: Sequence[str] = (),
    probs: Callable[[], np.ndarray] | None = None,
    val_images: pd.DataFrame | None = None,
) -> AuditTables:
    """All audit tables from a train frame, an optional val frame and the per-image tables of the clean pass
    and of val (see :mod:`pipeline.audit.rankings`). ``compare``: further rankings scored against planted flips
    beside ``ranking``; ``probs`` gives the clean pass's dense probabilities when a ranking needs them."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"audit: threshold must be in [0, 1], got {threshold}")
    if top < 1:
        raise ValueError(f"audit: top must be >= 1, got {top}")
    names = [str(n) for n in names]
    val = val if val is not None and len(val) else None
    ep = per_epoch(train)
    conf = confusion(images, names)
    conf_val = confusion(val, names) if val is not None else None
    dense = None if probs is None else functools.cache(probs)  # the clean pass read once, if at all
    wanted = list(dict.fromkeys([ranking, *compare])) if images["planted"].any() else [ranking]
    orders = {r: label_issue_order(images, r, dense) for r in wanted}  # each ranking computed once
    ranked = rank_images(images, ranking=ranking, threshold=threshold, order=orders[ranking])
    ranked_val = (rank_images(val_images, threshold=threshold)
                  if val_images is not None and len(val_images) else None)
    scores = planted_scores(images, orders)
    headline = _headline(train, ep, images, val, names)
    headline.update(ranking=ranking, threshold=float(threshold), suspects=int(ranked["suspect"].sum()),
                    val_suspects=None if ranked_val is None else int(ranked_val["suspect"].sum()),
                    planted=int(images["planted"].sum()))
    if len(scores):
        mine = scores[scores["ranking"] == ranking].iloc[0]
        headline.update(planted_precision_at_n=float(mine["precision_at_n"]),
                        planted_recall_at_2n=float(mine["recall_at_2n"]))
    return AuditTables(
        headline=headline,
        per_epoch=ep,
        per_class=per_class(train, val, names, images),
        confusion=conf,
        confusion_val=conf_val,
        confused_pairs=_pairs(conf, conf_val, names, top),
        images=ranked,
        suspects=ranked[ranked["suspect"]].reset_index(drop=True),
        suspects_val=None if ranked_val is None else ranked_val[ranked_val["suspect"]].reset_index(drop=True),
        planted=scores,
    )
