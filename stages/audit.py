"""``distill audit``: where the stored teacher disagrees with the labels, and which labels it doubts.

The student's distillation head learns the teacher's hard decision, so every sample where teacher
and label differ pulls the two heads apart. This stage reads the logit store (no model, no images)
and reports those disagreements overall, per epoch, per class and as a confusion table, and lists
the samples the teacher confidently contradicts on unmixed views: candidate label noise, each
with its WebDataset key and shard file so it can be looked at.

On a Mixup/CutMix view the image blends two samples and the target is lam*y + (1-lam)*y_partner,
so "teacher != label" there is not a disagreement with one truth. Figures over all train views
count mixed views anyway (they are what the distillation head sees); the unmixed figures, the
confusion table and the suspects use only views of kind "none", and val (the plain evaluation view,
never mixed) gives the same comparison on held-out images.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import store
from pipeline.config import Config
from pipeline.shards import MANIFEST_NAME, Manifest, load_manifest, open_shards, sample_key, shard_name

__all__ = [
    "AuditTables",
    "audit_frames",
    "confused_pairs",
    "confusion",
    "markdown_table",
    "per_class",
    "per_epoch",
    "run",
    "suspects",
]

CSV_FILES = ("per_class.csv", "per_epoch.csv", "confusion.csv", "confused_pairs.csv", "suspects.csv")
MAX_TICK_CLASSES = 30
"""Above this many classes the heatmap drops its tick labels (they would overlap)."""
MAX_TABLE_CLASSES = 50
"""Above this many classes audit.md and the bar chart show only the ``top`` worst classes."""


# --------------------------------------------------------------------------------------------------
# Tables (pure functions of the frames, usable from a notebook)


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


# --------------------------------------------------------------------------------------------------
# Writing: CSV, markdown, PNG, JSON


def _cell(v: Any, percent: bool, digits: int) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool | np.bool_):
        return str(bool(v))
    if isinstance(v, float | np.floating):
        return f"{100 * v:.1f}%" if percent else f"{v:.{digits}f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame, percent: Sequence[str] = (), digits: int = 3) -> str:
    """A GitHub markdown table (no tabulate needed); columns in ``percent`` print as percentages."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in cols) + " |"]
    lines.append("|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in df.columns) + "|")
    pct = set(percent)
    for row in df.itertuples(index=False, name=None):
        lines.append("| " + " | ".join(_cell(v, str(c) in pct, digits) for c, v in zip(cols, row, strict=True)) + " |")
    return "\n".join(lines) + "\n"


def _percent_cols(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if str(c).endswith(("disagreement", "share", "outside_pair"))]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _clean_split(pc: pd.DataFrame) -> str:
    """The column prefix of the cleanest split with samples: train unmixed, else val, else all train views."""
    for p in ("unmixed", "val"):
        if f"{p}_samples" in pc and pc[f"{p}_samples"].sum() > 0:
            return p
    return "train"


def _worst_classes(pc: pd.DataFrame, top: int) -> pd.DataFrame:
    """All classes when few, else the ``top`` with the highest disagreement on the cleanest split."""
    if len(pc) <= MAX_TABLE_CLASSES:
        return pc
    key = f"{_clean_split(pc)}_disagreement"
    return pc.sort_values([key, "class"], ascending=[False, True], na_position="last").head(top)


def write_png(tables: AuditTables, names: Sequence[str], path: Path, top: int = 20) -> Path:
    """audit.png: row-normalised confusion heatmap and per-class disagreement bars (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = len(names)
    if tables.headline["unmixed_samples"] or tables.confusion_val is None:
        conf, src = tables.confusion, "train, unmixed views"
    else:
        conf, src = tables.confusion_val, "val"
    m = conf.to_numpy().astype(float)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    pc = _worst_classes(tables.per_class, top)
    series = [
        (p, lbl)
        for p, lbl in (("unmixed", "train unmixed"), ("train", "train all views"), ("val", "val"))
        if f"{p}_samples" in pc and tables.per_class[f"{p}_samples"].sum() > 0
    ]
    rows = len(pc)
    fig = Figure(figsize=(13, max(4.5, min(0.28 * rows + 1.5, 30))), layout="constrained")
    FigureCanvasAgg(fig)
    ax0, ax1 = fig.subplots(1, 2, width_ratios=[1.1, 1])
    im = ax0.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax0.set_title(f"teacher vs label ({src}), share of label's samples")
    ax0.set_xlabel("teacher top-1")
    ax0.set_ylabel("label")
    if c <= MAX_TICK_CLASSES:
        ax0.set_xticks(range(c), [str(n) for n in names], rotation=90, fontsize=7)
        ax0.set_yticks(range(c), [str(n) for n in names], fontsize=7)
    fig.colorbar(im, ax=ax0, shrink=0.8)
    y = np.arange(rows)
    h = 0.8 / max(len(series), 1)
    for i, (p, lbl) in enumerate(series):
        ax1.barh(y + (i - (len(series) - 1) / 2) * h, pc[f"{p}_disagreement"].fillna(0.0), height=h, label=lbl)
    ax1.set_yticks(y, [str(n) for n in pc["name"]], fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xlabel("teacher != label (share of the class's samples)")
    ax1.set_title("disagreement per class" + ("" if rows == c else f" (worst {rows} of {c})"))
    if series:
        ax1.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return path


def _markdown(tables: AuditTables, names: Sequence[str], top: int, info: dict[str, Any]) -> str:
    h = tables.headline
    c = len(names)
    out = ["# Teacher–label audit", ""]
    out += [
        f"- store: `{info['store']}`",
        f"- classes: {c}" + ("" if info["names_from_manifest"] else " (names not found: manifest missing, ids used)"),
        f"- train units done: {info['units_done']} of {info['units_total']}, epochs audited: {h['epochs']}",
        f"- train views: {h['train_samples']} ({h['unmixed_samples']} unmixed, {h['mixed_samples']} Mixup/CutMix)",
        f"- val samples: {h['val_samples']}" + ("" if h["val_samples"] else f" ({info.get('val_note', 'none')})"),
        f"- confident contradiction threshold: p_teacher >= {h['threshold']}",
        "",
        "## Headline",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| teacher != label, train, all views | {_pct(h['train_disagreement'])} |",
        f"| teacher != label, train, unmixed views | {_pct(h['unmixed_disagreement'])} |",
        f"| teacher != dominant label (weight >= 0.5), mixed views | {_pct(h['mixed_dominant_disagreement'])} |",
        f"| teacher is neither label nor partner label, mixed views | {_pct(h['mixed_outside_pair'])} |",
        f"| teacher != label, val | {_pct(h['val_disagreement'])} |",
        f"| suspects (train, unmixed, p_teacher >= {h['threshold']}) | {h['suspects']} |",
        f"| suspects (val) | {'–' if h['val_suspects'] is None else h['val_suspects']} |",
        "",
        "**Mixed views.** On a Mixup/CutMix view the image blends two samples and the target is",
        "lam·label + (1 − lam)·partner label, so the \"label\" of the view is ambiguous: a teacher that names the",
        "partner's class is not wrong. The *all views* figures count such views anyway (they are what the",
        "distillation head learns from); the unmixed figures, `confusion.csv`, the train confused pairs and",
        "`suspects.csv` use only unmixed views (kind none), and val is never mixed.",
        "",
    ]
    if not h["unmixed_samples"]:
        out += [
            "> This store has **no unmixed train views** (with `aug.mix_prob: 1` every view is mixed), so the",
            "> unmixed figures, `confusion.csv` and `suspects.csv` are empty: val is the clean comparison here.",
            "",
        ]
    ep = tables.per_epoch.drop(columns=["mean_p_teacher"])
    out += ["## Per stored epoch (train)", "", markdown_table(ep, _percent_cols(ep))]
    pc = _worst_classes(tables.per_class, top)
    title = "## Per class" + ("" if len(pc) == c else f" (worst {len(pc)} of {c}; all in per_class.csv)")
    pc_cols = [col for col in pc.columns if not col.endswith("_disagree")]
    out += [title, "", markdown_table(pc[pc_cols], _percent_cols(pc))]
    out += ["## Most-confused class pairs (label → teacher)", ""]
    if tables.confused_pairs.empty:
        out += ["No off-diagonal confusions.", ""]
    else:
        out += [
            "share: the pair's count over the label's samples of that split.",
            "",
            markdown_table(tables.confused_pairs, ["share"]),
        ]
    for title, sus, split, csv in (
        ("train, unmixed views", tables.suspects, "train", "suspects.csv"),
        ("val", tables.suspects_val, "val", "suspects_val.csv"),
    ):
        if sus is None:
            continue
        out += [f"## Suspected label noise ({title})", ""]
        if sus.empty:
            out += [f"None: no {split} sample is contradicted with p_teacher >= {h['threshold']}.", ""]
            continue
        shown = sus.head(top)
        more = "" if len(sus) <= top else f" (first {top} of {len(sus)}; all in {csv})"
        cols = [col for col in shown.columns if col not in ("shard",)]
        if split == "val":
            cols = [col for col in cols if col not in ("epochs_contradicted", "epochs_unmixed")]
        out += [
            f"The teacher names another class with p_teacher >= {h['threshold']}{more}. "
            "key is the WebDataset key in the shard file.",
            "",
            markdown_table(shown[cols]),
        ]
    out += ["## Files", ""]
    out += [f"- `{f}`" for f in info["files"]]
    out += ["", "![audit](audit.png)", ""]
    return "\n".join(out)


def write_report(
    tables: AuditTables, names: Sequence[str], output: Path, *, top: int = 20, info: dict[str, Any] | None = None
) -> list[str]:
    """Write the CSVs, audit.md, audit.png and audit.json into ``output``; returns the file names."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    info = dict(info or {})
    tables.per_class.to_csv(output / "per_class.csv", index=False)
    tables.per_epoch.to_csv(output / "per_epoch.csv", index=False)
    tables.confusion.to_csv(output / "confusion.csv")
    tables.confused_pairs.to_csv(output / "confused_pairs.csv", index=False)
    tables.suspects.to_csv(output / "suspects.csv", index=False)
    files = list(CSV_FILES)
    if tables.confusion_val is not None:
        tables.confusion_val.to_csv(output / "confusion_val.csv")
        files.append("confusion_val.csv")
    if tables.suspects_val is not None:
        tables.suspects_val.to_csv(output / "suspects_val.csv", index=False)
        files.append("suspects_val.csv")
    files += ["audit.md", "audit.png", "audit.json"]
    write_png(tables, names, output / "audit.png", top=top)
    info.setdefault("store", "?")
    info.setdefault("names_from_manifest", True)
    info.setdefault("units_done", "?")
    info.setdefault("units_total", "?")
    info["files"] = files
    (output / "audit.md").write_text(_markdown(tables, names, top, info))
    (output / "audit.json").write_text(json.dumps(tables.headline, indent=2, sort_keys=True) + "\n")
    return files


# --------------------------------------------------------------------------------------------------
# The stage


def run_manifest(shards: Path | str, n_train_shards: int) -> Manifest:
    """The manifest a teacher run used, from the shard folder and the store's train shard count
    (``data.train_shards`` cuts the manifest, and the cut has its own fingerprint)."""
    return load_manifest(shards).first_train_shards(n_train_shards)


def _manifest_info(cfg: Config) -> tuple[list[str] | None, list[str] | None, list[str] | None, dict[str, Any]]:
    """(class names, train shard files, val shard files, expected provenance) from the shard manifest.

    A missing manifest is not fatal (the store alone holds the figures): names fall back to class ids.
    A manifest that is there but broken is an error.
    """
    if not (Path(cfg.data.shards) / MANIFEST_NAME).is_file():
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
    out = Path(output) if output is not None else Path(cfg.evaluate.output).parent / "audit"
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
    train = store.train_frame(group, classes=names, epochs=epochs)  # all epochs: one row per stored view
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
