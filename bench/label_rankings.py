"""The label-issue scores tried for the ranking goal on confusable noise (docs/audit.md, "Fixing labels"), scored on a
finished noisy run of ``bench.label_loop`` (its store and shards; no training): the audit's rankings and the
variants that did not become one, with the recall at 2N inside and outside the teacher's fit subset.

``python -m bench.label_rankings runs/label-loop/rank-confusable``

Every score is lower = more suspect. ``views``: each stored view's probability of the image's label, capped at the
image's weight in the blend (λ as the sample, 1 − λ as the partner) and divided by it, averaged over the E stored
views and with the clean view's p_label. ``fit: views, mapped``: the images of the teacher's fit subset ordered by
that average, their scores replaced by the outside images' p_label quantiles of their class (the subset keeps its
share of the ranks; only its order changes). ``posterior``: the odds of the given label against the others under a
noise model (the transition matrix counted from the teacher's top-1 against the label). ``val p-value``: p_label as
a quantile among the clean val images of that class (their labels are right; the fit subset's images among the fit
subset's of the same label, as ``per_class`` splits them). ``val confusion``: the odds of the given label against
the classes that flip into it, weighted by the teacher's val confusion (half of it uniform) after a temperature
fitted on val. ``--tta``: the clean views again, mirrored, through the run's teacher (``teacher.pt``): the mean
of the two views' probabilities, as p_label and per class (evidence the store does not hold; a teacher pass).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

import store
from pipeline.audit.frames import load_audit
from pipeline.audit.rankings import class_thresholds, label_issue_order
from pipeline.audit.tables import store_plans
from store.targets import dense_soft_target

ROOT = Path(__file__).resolve().parent.parent


def view_scores(inputs, labels: np.ndarray) -> np.ndarray:  # noqa: ANN001 (AuditInputs)
    """Per image, Σ min(p_view(label), w) / Σ w over the stored views showing it (NaN without views)."""
    group, spec, plans = inputs.group, inputs.spec, store_plans(inputs.group)
    num, den = np.zeros(len(labels)), np.zeros(len(labels))
    for e in range(spec.epochs):
        for s in range(spec.n_shards):
            u = store.read_train_unit(group, e, s)
            d = dense_soft_target(u.topk_logits, u.topk_classes, u.logsumexp, spec.num_classes)
            rows, idx = np.arange(u.end - u.start), np.arange(u.start, u.end)
            partner, kind, lam = plans(e, s)
            lam = np.where(kind == 0, 1.0, lam)
            np.add.at(num, idx, np.minimum(d[rows, labels[idx]], lam))
            np.add.at(den, idx, lam)
            mixed = (kind != 0) & (partner >= 0)
            w = 1.0 - lam[mixed]
            np.add.at(num, partner[mixed], np.minimum(d[rows[mixed], labels[partner[mixed]]], w))
            np.add.at(den, partner[mixed], w)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _mapped(score: np.ndarray, p: np.ndarray, labels: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """Fit-subset images ordered by ``score``, given the outside images' p_label quantiles of their class."""
    out = p.copy()
    for k in np.unique(labels):
        mf, mo = (labels == k) & fit, (labels == k) & ~fit
        if mf.any() and mo.any():
            out[mf] = np.quantile(p[mo], (np.argsort(np.argsort(score[mf])) + 0.5) / mf.sum())
    return out


def _posterior(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Odds of the given label under a transition matrix counted from (teacher top-1, label)."""
    c = probs.shape[1]
    counts = np.zeros((c, c))
    np.add.at(counts, (probs.argmax(1), labels), 1)
    t = counts / np.maximum(counts.sum(1, keepdims=True), 1) + 1e-3
    rows = np.arange(len(labels))
    given = probs[rows, labels] * t[labels, labels]
    return given / ((probs * t[:, labels].T).sum(1) - given + 1e-12)


def _quantile_in(p: np.ndarray, labels: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray) -> np.ndarray:
    """Per image, the share of the reference images of its class whose p_label is at most its own."""
    out = np.ones(len(p))
    for k in np.unique(labels):
        r = np.sort(ref[ref_labels == k])
        if len(r):
            out[labels == k] = np.searchsorted(r, p[labels == k], side="right") / len(r)
    return out


def _val_p_value(p: np.ndarray, labels: np.ndarray, fit: np.ndarray, val_p: np.ndarray,
                 val_labels: np.ndarray) -> np.ndarray:
    out = _quantile_in(p, labels, val_p, val_labels)
    out[fit] = _quantile_in(p[fit], labels[fit], p[fit], labels[fit])
    return out


def _tempered(probs: np.ndarray, t: float) -> np.ndarray:
    z = np.log(np.maximum(probs, 1e-12)) / t
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def _val_confusion(probs: np.ndarray, labels: np.ndarray, val_probs: np.ndarray, val_labels: np.ndarray,
                   uniform: float = 0.5) -> np.ndarray:
    """Odds of the given label against the classes that flip into it: T[j, y] from the val confusion (rows without
    the diagonal, mixed with uniform), the probabilities tempered to the val NLL's best temperature."""
    c = probs.shape[1]
    temps = np.linspace(0.3, 3.0, 28)
    nll = [-np.log(np.maximum(_tempered(val_probs, t)[np.arange(len(val_labels)), val_labels], 1e-12)).mean()
           for t in temps]
    q = _tempered(probs, float(temps[int(np.argmin(nll))]))
    conf = np.zeros((c, c))
    np.add.at(conf, (val_labels, val_probs.argmax(1)), 1)
    np.fill_diagonal(conf, 0)
    t = (1 - uniform) * conf / np.maximum(conf.sum(1, keepdims=True), 1) + uniform * (1 - np.eye(c)) / (c - 1)
    rows = np.arange(len(labels))
    return q[rows, labels] / np.maximum((q * t[:, labels].T).sum(1), 1e-12)


def _mirrored_probs(folder: Path, inputs, order: np.ndarray) -> np.ndarray:  # noqa: ANN001 (AuditInputs)
    """The run's teacher on the mirrored clean views of every training image, rows in ``order`` (image indices)."""
    import torch

    from pipeline.core.config import load_config, overridden
    from pipeline.train.models import load_teacher, teacher_forward
    from pipeline.views.loading import EvalDataset, make_loader

    cfg = overridden(load_config(ROOT / "configs" / "demo-noisy.yaml"), [f"teacher.checkpoint={folder / 'teacher.pt'}"])
    model, _ = load_teacher(cfg.teacher, num_classes=len(inputs.names), in_chans=cfg.aug.channels)
    out, seen = [], []
    for b in make_loader(EvalDataset(inputs.manifest, cfg.aug, "train", batch_size=512), 0, device=torch.device("cpu")):
        out.append(torch.softmax(teacher_forward(model, torch.flip(b.view, dims=[3]), torch.device("cpu")), 1).numpy())
        seen.append(b.index.numpy())
    probs, seen = np.concatenate(out), np.concatenate(seen)
    return probs[np.argsort(seen)][order]


def scores(folder: Path, *, tta: bool = False) -> pd.DataFrame:
    """Each score's precision at N and recall at 2N, and its recall at 2N inside and outside the fit subset."""
    inputs = load_audit(folder / "logits.zarr", folder / "shards")
    img, probs = inputs.images, inputs.clean_probs().astype(np.float64)
    labels, p = img["label"].to_numpy(), img["p_label"].to_numpy(dtype=np.float64)
    fit = img["in_fit_subset"].fillna(False).to_numpy(dtype=bool)
    views = view_scores(inputs, labels)
    both = np.where(np.isnan(views), p, (views + p) / 2)
    t = class_thresholds(img)
    other = np.where(np.arange(probs.shape[1])[None, :] == labels[:, None], -1.0, probs).max(1)
    variants = {
        "margin": p - other,
        "views (mean with the clean view)": both,
        "fit: views, mapped": _mapped(both, p, labels, fit),
        "fit: views, mapped, per class": (m := _mapped(both, p, labels, fit)) / class_thresholds(img.assign(p_label=m)),
        "per class, squared": p / t**2,
        "posterior": _posterior(probs, labels),
    }
    if inputs.val_images is not None:
        val_probs = store.split_probs(inputs.group, "val").astype(np.float64)
        val_labels = inputs.val_images["label"].to_numpy()
        variants["val p-value"] = _val_p_value(p, labels, fit, inputs.val_images["p_label"].to_numpy(), val_labels)
        variants["val confusion"] = _val_confusion(probs, labels, val_probs, val_labels)
    if tta:
        both_views = (probs + _mirrored_probs(folder, inputs, img["index"].to_numpy())) / 2
        p2 = both_views[np.arange(len(labels)), labels]
        variants["mirrored too (mean)"] = p2
        variants["mirrored too (mean), per class"] = p2 / class_thresholds(img.assign(p_label=p2))
    pos = np.arange(len(img))
    orders = {r: label_issue_order(img, r, inputs.clean_probs) for r in ("p_label", "per_class", "cleanlab")}
    orders |= {k: np.lexsort((pos, v)) for k, v in variants.items()}
    planted = img["planted"].to_numpy(dtype=bool)
    n = int(planted.sum())
    rows = []
    for name, order in orders.items():
        top_n, top_2n = np.zeros(len(img), bool), np.zeros(len(img), bool)
        top_n[order[:n]], top_2n[order[: 2 * n]] = True, True
        rows.append({"score": name, "precision_at_n": planted[top_n].mean(), "recall_at_2n": planted[top_2n].mean() * 2,
                     "recall_at_2n_fit": (top_2n & planted & fit).sum() / max((planted & fit).sum(), 1),
                     "recall_at_2n_outside": (top_2n & planted & ~fit).sum() / max((planted & ~fit).sum(), 1)})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished noisy run of bench.label_loop (logits.zarr and shards)")
    ap.add_argument("--tta", action="store_true", help="also the mirrored clean views through the run's teacher")
    args = ap.parse_args(argv)
    df = scores(args.run, tta=args.tta)
    df.to_csv(args.run / "rankings.csv", index=False)
    print(df.to_string(float_format=lambda x: f"{x:.4f}"))


if __name__ == "__main__":
    main()
