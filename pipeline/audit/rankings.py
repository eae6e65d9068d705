"""Which training labels are probably wrong: one row per ingested training image, ranked.

The evidence is the teacher's answer on the image's *evaluation view* (no augmentation, the store's
``clean`` split), which exists for every ingested image, not only the subset the students train on.
Images the teacher was fit on are marked (``in_fit_subset``): a teacher that memorised a wrong label
there agrees with it, so those rows are weaker evidence. For images of the students' subset the
stored augmented views add a second opinion: a view counts for each image it shows with that image's
weight in the blend (λ for the sample, 1 − λ for its Mixup/CutMix partner, 1 when unmixed).

Rankings (most suspect first), scored against planted flips by :func:`planted_scores`:

- ``p_label``: the teacher's probability of the given label, lowest first (a plain threshold).
- ``per_class``: p_label over its class's threshold, lowest first: the threshold of class y is the mean p_label of
  the images labelled y (confident learning's per-class threshold), taken apart for the images the teacher was fit
  on (their probabilities are in-sample, higher) and the others. A class the teacher finds hard (Fashion-MNIST's
  shirt) no longer fills the top of the list with its right labels, which is where confusable noise hides.
- ``cleanlab``: confident learning (``cleanlab.filter.find_label_issues``: per-class thresholds from
  the teacher's probabilities) puts the images it flags first, then the rest, each by p_label.
  Needs the optional ``cleanlab`` package (``pip install -e ".[cleanlab]"``).

On Fashion-MNIST with 2 % planted flips the plain ranking found more of them in its top 2N than
confident learning did (docs/audit.md), so it is the default; on confusable flips ``per_class``
does better (docs/audit.md, "Fixing labels"). Suspects are the
images whose label the teacher gives less than a threshold probability, listed in ranking order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from pipeline.core.errors import DistillError
from pipeline.data.shards import Planted, sample_key

__all__ = [
    "DEFAULT_RANKING",
    "RANKINGS",
    "RankingError",
    "image_table",
    "label_issue_order",
    "planted_scores",
    "available_rankings",
    "class_thresholds",
    "view_agreement",
]

class RankingError(DistillError, ValueError):
    """A ranking that is unknown, or whose package is not installed."""


RANKINGS = ("p_label", "per_class", "cleanlab")
DEFAULT_RANKING = "p_label"
"""The ranking the audit lists suspects by; chosen on planted flips (docs/audit.md)."""


def view_agreement(train: pd.DataFrame, n: int) -> pd.DataFrame:
    """Per image ``0..n-1`` of a train frame (``store.train_frame``): views (stored views showing it,
    as sample or as partner), view_weight (its summed weight in them) and view_agreement (the weighted
    share of those views whose teacher top-1 is the image's label; NaN without views)."""
    kind_none = (train["kind"] == "none").to_numpy()
    lam = np.where(kind_none, 1.0, train["lam"].to_numpy(dtype=np.float64))
    idx = train["index"].to_numpy()
    own_hit = (train["teacher"] == train["label"]).to_numpy()
    partner = train["partner"].to_numpy()
    has_partner = ~kind_none & (partner >= 0)
    p_hit = (train["teacher"] == train["partner_label"]).fillna(False).to_numpy(dtype=bool)
    who = np.concatenate([idx, partner[has_partner]])
    weight = np.concatenate([lam, 1.0 - lam[has_partner]])
    hit = np.concatenate([own_hit, p_hit[has_partner]])
    views = np.bincount(who, minlength=n)[:n]
    w = np.bincount(who, weights=weight, minlength=n)[:n]
    agree = np.bincount(who, weights=weight * hit, minlength=n)[:n]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(w > 0, agree / w, np.nan)
    return pd.DataFrame({"views": views.astype("int64"), "view_weight": w, "view_agreement": share})


def _label_margin(frame: pd.DataFrame) -> np.ndarray:
    """p(label) − the largest other probability, from a frame's top-1/top-2 columns (negative exactly when
    the teacher's top-1 is another class); no dense probabilities needed."""
    p1 = frame["p_teacher"].to_numpy(dtype=np.float64)
    m = frame["margin"].to_numpy(dtype=np.float64)
    p2 = np.where(np.isnan(m), 0.0, p1 - m)  # top-2 (taken as 0 when k = 1)
    agree = (frame["teacher"] == frame["label"]).to_numpy()
    return (frame["p_label"].to_numpy(dtype=np.float64) - np.where(agree, p2, p1)).astype(np.float32)


def image_table(
    clean: pd.DataFrame,
    names: Sequence[str],
    *,
    train: pd.DataFrame | None = None,
    fit_samples: int | None = None,
    train_samples: int = 0,
    files: Sequence[str] | None = None,
    planted: Sequence[Planted] = (),
) -> pd.DataFrame:
    """One row per ingested training image, from the clean-view frame (``store.val_frame(split="clean")``).

    Columns: index, key, shard, file, label, label_name, teacher, teacher_name, p_teacher, p_label,
    margin (p_label − the largest other probability), in_fit_subset (nullable: unknown when the teacher's
    checkpoint does not say), in_train (one of the students' ``train_samples``), views, view_weight,
    view_agreement, planted and true_label (the label before a planted flip the label layer has not corrected,
    <NA> elsewhere). ``clean`` may leave images out (dropped labels): rows follow its ``index``.
    """
    n = len(clean)
    labels = clean["label"].to_numpy()
    idx = clean["index"].to_numpy()
    n_all = int(idx.max()) + 1 if n else 0
    out = clean[["index", "shard", "label", "teacher", "p_teacher", "p_label"]].reset_index(drop=True)
    out.insert(1, "key", [sample_key(int(i)) for i in out["index"]])
    out.insert(3, "file", [files[s] if files is not None else "" for s in out["shard"]])
    out.insert(5, "label_name", np.asarray(names, dtype=object)[labels])
    out.insert(7, "teacher_name", np.asarray(names, dtype=object)[out["teacher"].to_numpy()])
    out["margin"] = _label_margin(clean)
    fit = pd.array([pd.NA] * n, dtype="boolean") if fit_samples is None else out["index"] < fit_samples
    out["in_fit_subset"] = fit
    out["in_train"] = out["index"] < train_samples
    views = view_agreement(train, n_all).iloc[idx].reset_index(drop=True) if train is not None and len(train) else None
    out["views"] = views["views"] if views is not None else 0
    out["view_weight"] = views["view_weight"] if views is not None else 0.0
    out["view_agreement"] = views["view_agreement"] if views is not None else np.nan
    true = np.full(n_all, -1, dtype=np.int64)
    for p in planted:
        if p.index < n_all:
            true[p.index] = p.true
    true = true[idx]
    wrong = (true >= 0) & (true != labels)  # a flip the label layer corrected is no longer wrong
    out["planted"] = wrong
    out["true_label"] = pd.Series(true, dtype="Int64").mask(~wrong)
    return out


def available_rankings() -> tuple[str, ...]:
    """The rankings this environment can compute (cleanlab is an optional package)."""
    try:
        import cleanlab.filter  # noqa: F401
    except ImportError:
        return tuple(r for r in RANKINGS if r != "cleanlab")
    return RANKINGS


def _cleanlab_flags(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        raise RankingError('audit --ranking cleanlab needs the cleanlab package: pip install -e ".[cleanlab]"') \
            from None
    present = np.bincount(labels, minlength=probs.shape[1]) > 0
    if present.sum() < 2:  # confident learning needs two classes to contrast
        return np.zeros(len(labels), dtype=bool)
    p = probs.astype(np.float64) + 1e-12
    return find_label_issues(labels, p / p.sum(axis=1, keepdims=True), filter_by="prune_by_noise_rate")


def class_thresholds(images: pd.DataFrame) -> np.ndarray:
    """Per row of an :func:`image_table`, the mean p_label of the images with its label (confident learning's
    per-class threshold), among the images on the same side of the teacher's fit subset when that is known:
    in-sample probabilities run higher, and would set the out-of-sample images' thresholds too high."""
    labels = images["label"].to_numpy()
    p = images["p_label"].to_numpy(dtype=np.float64)
    fit = np.zeros(len(p), dtype=bool)
    if "in_fit_subset" in images:
        fit = images["in_fit_subset"].fillna(False).to_numpy(dtype=bool)
    c = int(labels.max()) + 1 if len(labels) else 0
    out = np.ones(len(p))
    for side in (fit, ~fit):
        sums = np.bincount(labels[side], weights=p[side], minlength=c)
        counts = np.bincount(labels[side], minlength=c)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[side] = (sums / counts)[labels[side]]
    return np.maximum(out, 1e-6)


def label_issue_order(
    images: pd.DataFrame, ranking: str = DEFAULT_RANKING, probs: Callable[[], np.ndarray] | None = None
) -> np.ndarray:
    """Row positions of an :func:`image_table`, most suspect first under ``ranking`` (ties by position).
    ``probs`` gives the dense (N, C) probabilities (``store.split_probs``), read only for ``cleanlab``."""
    if ranking not in RANKINGS:
        raise RankingError(f"audit ranking {ranking!r}: choose one of {', '.join(RANKINGS)}")
    pos, p_label = np.arange(len(images)), images["p_label"].to_numpy()
    if ranking == "p_label":
        return np.lexsort((pos, p_label))
    if ranking == "per_class":
        return np.lexsort((pos, p_label / class_thresholds(images)))
    if probs is None:
        raise RankingError("audit ranking 'cleanlab' needs the teacher's dense probabilities")
    flags = _cleanlab_flags(images["label"].to_numpy(), probs())
    return np.lexsort((pos, p_label, ~flags))


def planted_scores(images: pd.DataFrame, orders: dict[str, np.ndarray]) -> pd.DataFrame:
    """Precision and recall of each ranking's top N and top 2N against the N planted flips
    (one row per ranking; empty without planted flips)."""
    planted = images["planted"].to_numpy(dtype=bool)
    n = int(planted.sum())
    if n == 0:
        return pd.DataFrame()
    rows = []
    for name, order in orders.items():
        row: dict[str, object] = {"ranking": name, "planted": n}
        for k, tag in ((n, "n"), (2 * n, "2n")):
            hits = int(planted[order[:k]].sum())
            row[f"precision_at_{tag}"] = hits / k
            row[f"recall_at_{tag}"] = hits / n
        rows.append(row)
    return pd.DataFrame(rows)
