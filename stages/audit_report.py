"""How ``distill audit`` renders its tables: CSV files, audit.md, audit.png and audit.json."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.audit_tables import AuditTables
from pipeline.files import atomic_write_bytes, atomic_write_json, atomic_write_text, location
from pipeline.report import MISSING, markdown_table

CSV_FILES = ("per_class.csv", "per_epoch.csv", "confusion.csv", "confused_pairs.csv", "suspects.csv")
MAX_TICK_CLASSES = 30
"""Above this many classes the heatmap drops its tick labels (they would overlap)."""
MAX_TABLE_CLASSES = 50
"""Above this many classes audit.md and the bar chart show only the ``top`` worst classes."""


def _percent_cols(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if str(c).endswith(("disagreement", "share", "outside_pair"))]


def _pct(x: float | None) -> str:
    return MISSING if x is None else f"{100 * x:.2f}%"


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
    buf = io.BytesIO()
    _draw_png(tables, names, buf, top)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _draw_png(tables: AuditTables, names: Sequence[str], out: io.BytesIO, top: int) -> None:
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
    fig.savefig(out, dpi=100, format="png")


def _md_header(tables: AuditTables, c: int, info: dict[str, Any]) -> list[str]:
    h = tables.headline
    out = [
        "# Teacher–label audit",
        "",
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
        f"| suspects (val) | {MISSING if h['val_suspects'] is None else h['val_suspects']} |",
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
    return out


def _md_tables(tables: AuditTables, c: int, top: int) -> list[str]:
    ep = tables.per_epoch.drop(columns=["mean_p_teacher"])
    out = ["## Per stored epoch (train)", "", markdown_table(ep, _percent_cols(ep))]
    pc = _worst_classes(tables.per_class, top)
    title = "## Per class" + ("" if len(pc) == c else f" (worst {len(pc)} of {c}; all in per_class.csv)")
    pc_cols = [col for col in pc.columns if not col.endswith("_disagree")]
    out += [title, "", markdown_table(pc[pc_cols], _percent_cols(pc))]
    out += ["## Most-confused class pairs (label → teacher)", ""]
    if tables.confused_pairs.empty:
        return out + ["No off-diagonal confusions.", ""]
    return out + [
        "share: the pair's count over the label's samples of that split.",
        "",
        markdown_table(tables.confused_pairs, ["share"]),
    ]


def _md_suspects(tables: AuditTables, top: int) -> list[str]:
    threshold, out = tables.headline["threshold"], []
    for title, sus, split, csv in (
        ("train, unmixed views", tables.suspects, "train", "suspects.csv"),
        ("val", tables.suspects_val, "val", "suspects_val.csv"),
    ):
        if sus is None:
            continue
        out += [f"## Suspected label noise ({title})", ""]
        if sus.empty:
            out += [f"None: no {split} sample is contradicted with p_teacher >= {threshold}.", ""]
            continue
        shown = sus.head(top)
        more = "" if len(sus) <= top else f" (first {top} of {len(sus)}; all in {csv})"
        cols = [col for col in shown.columns if col not in ("shard",)]
        if split == "val":
            cols = [col for col in cols if col not in ("epochs_contradicted", "epochs_unmixed")]
        out += [
            f"The teacher names another class with p_teacher >= {threshold}{more}. "
            "key is the WebDataset key in the shard file.",
            "",
            markdown_table(shown[cols]),
        ]
    return out


def markdown_report(tables: AuditTables, names: Sequence[str], top: int, info: dict[str, Any]) -> str:
    """audit.md: the headline, the per-epoch, per-class and confused-pair tables, the suspects, the files."""
    c = len(names)
    out = _md_header(tables, c, info) + _md_tables(tables, c, top) + _md_suspects(tables, top)
    out += ["## Files", "", *[f"- `{f}`" for f in info["files"]], "", "![audit](audit.png)", ""]
    return "\n".join(out)


def _csv(df: pd.DataFrame, path: Path, index: bool) -> None:
    atomic_write_text(path, df.to_csv(index=index))


def write_report(
    tables: AuditTables, names: Sequence[str], output: Path, *, top: int = 20, info: dict[str, Any] | None = None
) -> list[str]:
    """Write the CSVs, audit.md, audit.png and audit.json into ``output``; returns the file names."""
    output = location(output)
    info = dict(info or {})
    _csv(tables.per_class, output / "per_class.csv", False)
    _csv(tables.per_epoch, output / "per_epoch.csv", False)
    _csv(tables.confusion, output / "confusion.csv", True)
    _csv(tables.confused_pairs, output / "confused_pairs.csv", False)
    _csv(tables.suspects, output / "suspects.csv", False)
    files = list(CSV_FILES)
    if tables.confusion_val is not None:
        _csv(tables.confusion_val, output / "confusion_val.csv", True)
        files.append("confusion_val.csv")
    if tables.suspects_val is not None:
        _csv(tables.suspects_val, output / "suspects_val.csv", False)
        files.append("suspects_val.csv")
    files += ["audit.md", "audit.png", "audit.json"]
    write_png(tables, names, output / "audit.png", top=top)
    info = {"store": "?", "names_from_manifest": True, "units_done": "?", "units_total": "?", **info, "files": files}
    atomic_write_text(output / "audit.md", markdown_report(tables, names, top, info))
    atomic_write_json(output / "audit.json", tables.headline)
    return files
