"""The audit's tables: pure functions from the store's pandas frames (``store.train_frame``,
``store.val_frame``) to DataFrames, used by ``distill audit`` and by ``notebooks/audit.ipynb``.

The student's distillation head learns the teacher's hard decision, so every sample where teacher
and label differ pulls the two heads apart. On a Mixup/CutMix view the image blends two samples and
the target is lam*y + (1-lam)*y_partner, so "teacher != label" there is not a disagreement with one
truth. Figures over all train views count mixed views anyway (they are what the distillation head
sees); the unmixed figures, the confusion table and the suspects use only views of kind "none", and
val (the plain evaluation view, never mixed) gives the same comparison on held-out images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

import store
from pipeline.config import AugConfig
from pipeline.plan import epoch_plan
from pipeline.shards import sample_key

__all__ = [
    "SUSPECT_COLUMNS",
    "store_plans",
    "AuditTables",
    "audit_frames",
    "confused_pairs",
    "confusion",
    "per_class",
    "per_epoch",
    "suspects",
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

    Counts and rates: mixed_dominant (its rate mixed_dominant_disagreement) counts mixed views whose
    teacher differs from the label weighing >= 0.5 in the blend; mixed_outside (rate mixed_outside_pair)
    those whose teacher is neither the sample's label nor its partner's. Column sums give the totals.
    """
    d = train["teacher"] != train["label"]
    un = _unmixed(train)
    mixed = ~un
    dom = (train["teacher"] != train["dominant"]).fillna(True).astype(bool)
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
        }
    ).groupby("epoch", sort=True)
    counts = ["samples", "disagree", "unmixed_samples", "unmixed_disagree", "mixed_samples", "mixed_dominant",
              "mixed_outside"]
    out = g[counts].sum().astype("int64")
    out.insert(2, "disagreement", _rate(out["disagree"], out["samples"]))
    out.insert(5, "unmixed_disagreement", _rate(out["unmixed_disagree"], out["unmixed_samples"]))
    out["mixed_dominant_disagreement"] = _rate(out["mixed_dominant"], out["mixed_samples"])
    out["mixed_outside_pair"] = _rate(out["mixed_outside"], out["mixed_samples"])
    out["mean_p_teacher"] = g["p_teacher"].mean()
    return out.reset_index()


def _class_counts(df: pd.DataFrame, mask: pd.Series, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(samples, disagreements) per true class over the rows in ``mask``."""
    lab = df["label"].to_numpy()[mask.to_numpy()]
    dis = (df["teacher"] != df["label"]).to_numpy()[mask.to_numpy()]
    return np.bincount(lab, minlength=num_classes), np.bincount(lab, weights=dis, minlength=num_classes)


def per_class(
    train: pd.DataFrame, val: pd.DataFrame | None, names: Sequence[str]
) -> pd.DataFrame:
    """Disagreement per true class: train (all views), train unmixed, val. One row per class, all classes."""
    c = len(names)
    out = pd.DataFrame({"class": np.arange(c), "name": list(names)})
    parts = [
        ("train", train, pd.Series(True, index=train.index)),
        ("unmixed", train, _unmixed(train)),
    ]
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


SUSPECT_COLUMNS = (
    "index", "key", "shard", "file", "label", "label_name", "teacher", "teacher_name",
    "epochs_contradicted", "epochs_unmixed", "mean_p_teacher", "max_p_teacher", "mean_p_label",
)  # fmt: skip
_SUSPECT_DTYPES = {
    **dict.fromkeys(("index", "shard", "label", "teacher", "epochs_contradicted", "epochs_unmixed"), "int64"),
    **dict.fromkeys(("key", "file", "label_name", "teacher_name"), "object"),
}


def suspects(
    df: pd.DataFrame, names: Sequence[str], threshold: float = 0.9, files: Sequence[str] | None = None
) -> pd.DataFrame:
    """Samples the teacher confidently contradicts on unmixed views: candidate label noise.

    A view counts when its kind is none (val rows always), teacher != label and p_teacher >=
    ``threshold``. Aggregated per sample over epochs: epochs_contradicted (views counted),
    epochs_unmixed (unmixed views stored), the teacher class it chose most often, mean and max
    p_teacher and mean p_label over the contradicting views. Sorted by mean_p_teacher, descending
    (then more epochs first, then by index). ``files`` names each shard's file (``key`` is the
    sample's WebDataset key).
    """
    un = _unmixed(df)
    hit = df[un & (df["teacher"] != df["label"]) & (df["p_teacher"] >= threshold)]
    if hit.empty:
        return pd.DataFrame({c: pd.Series(dtype=_SUSPECT_DTYPES.get(c, "float64")) for c in SUSPECT_COLUMNS})
    seen = df.loc[un, "index"].value_counts()
    per = (
        hit.groupby(["index", "teacher"], sort=False)
        .agg(
            n=("p_teacher", "size"),
            p=("p_teacher", "mean"),
            pmax=("p_teacher", "max"),
            plab=("p_label", "mean"),
            shard=("shard", "first"),
            label=("label", "first"),
        )
        .reset_index()
    )
    per["p"] = per["p"].astype(float)
    # the teacher class chosen most often per sample (ties: the more confident one)
    best = per.sort_values(["index", "n", "p"], ascending=[True, False, False]).drop_duplicates("index")
    tot = hit.groupby("index").agg(
        epochs_contradicted=("p_teacher", "size"),
        mean_p_teacher=("p_teacher", "mean"),
        max_p_teacher=("p_teacher", "max"),
        mean_p_label=("p_label", "mean"),
    )
    out = best.set_index("index")[["shard", "label", "teacher"]].join(tot).reset_index()
    out["epochs_unmixed"] = out["index"].map(seen).astype("int64")
    out["key"] = [sample_key(int(i)) for i in out["index"]]
    out["file"] = [files[s] if files is not None else "" for s in out["shard"]]
    out["label_name"] = [names[i] for i in out["label"]]
    out["teacher_name"] = [names[i] for i in out["teacher"]]
    for c in ("mean_p_teacher", "max_p_teacher", "mean_p_label"):
        out[c] = out[c].astype(float)
    out = out.sort_values(
        ["mean_p_teacher", "epochs_contradicted", "index"], ascending=[False, False, True], kind="stable"
    )
    return out[list(SUSPECT_COLUMNS)].reset_index(drop=True).astype(_SUSPECT_DTYPES)


@dataclass
class AuditTables:
    """Every table of an audit, and the headline figures (JSON-ready: NaN becomes None)."""

    headline: dict[str, Any]
    per_epoch: pd.DataFrame
    per_class: pd.DataFrame
    confusion: pd.DataFrame
    confusion_val: pd.DataFrame | None
    confused_pairs: pd.DataFrame
    suspects: pd.DataFrame
    suspects_val: pd.DataFrame | None


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def audit_frames(
    train: pd.DataFrame,
    val: pd.DataFrame | None,
    names: Sequence[str],
    *,
    top: int = 20,
    threshold: float = 0.9,
    train_files: Sequence[str] | None = None,
    val_files: Sequence[str] | None = None,
) -> AuditTables:
    """All audit tables from a train frame and an optional val frame (see store.frames)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"audit: threshold must be in [0, 1], got {threshold}")
    if top < 1:
        raise ValueError(f"audit: top must be >= 1, got {top}")
    names = [str(n) for n in names]
    val = val if val is not None and len(val) else None
    un = _unmixed(train)
    ep = per_epoch(train)
    conf = confusion(train[un], names)
    conf_val = confusion(val, names) if val is not None else None
    pairs = confused_pairs(conf, names, top)
    pairs.insert(0, "split", "train_unmixed")
    if conf_val is not None:
        pv = confused_pairs(conf_val, names, top)
        pv.insert(0, "split", "val")
        pairs = pd.concat([pairs, pv], ignore_index=True)
    sus = suspects(train, names, threshold, train_files)
    sus_val = suspects(val, names, threshold, val_files) if val is not None else None
    total = ep.sum(numeric_only=True)
    n_mixed = int(total.get("mixed_samples", 0))
    headline = {
        "num_classes": len(names),
        "epochs": sorted(int(e) for e in train["epoch"].unique()),
        "train_samples": len(train),
        "train_disagreement": _num(_rate(total.get("disagree", 0), len(train))),
        "unmixed_samples": int(un.sum()),
        "unmixed_disagreement": _num(_rate(total.get("unmixed_disagree", 0), int(un.sum()))),
        "mixed_samples": n_mixed,
        "mixed_dominant_disagreement": _num(_rate(total.get("mixed_dominant", 0), n_mixed)),
        "mixed_outside_pair": _num(_rate(total.get("mixed_outside", 0), n_mixed)),
        "val_samples": 0 if val is None else len(val),
        "val_disagreement": None if val is None else _num(_rate((val["teacher"] != val["label"]).sum(), len(val))),
        "threshold": float(threshold),
        "suspects": len(sus),
        "val_suspects": None if sus_val is None else len(sus_val),
    }
    return AuditTables(
        headline=headline,
        per_epoch=ep,
        per_class=per_class(train, val, names),
        confusion=conf,
        confusion_val=conf_val,
        confused_pairs=pairs,
        suspects=sus,
        suspects_val=sus_val,
    )
