"""How ``distill audit`` renders its tables: CSV files, audit.md, audit.png, suspects.png (the contact
sheet of the top suspects) and audit.json."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.audit.tables import AuditTables
from pipeline.core.files import atomic_write_bytes, atomic_write_json, atomic_write_text, location
from pipeline.core.report import MISSING, figure, markdown_table, save_png

CSV_FILES = ("per_class.csv", "per_epoch.csv", "confusion.csv", "confused_pairs.csv", "images.csv.gz",
             "suspects.csv")
METRICS = {"suspects": "suspects", "clean_disagreement": "teacher_vs_label", "planted_recall_at_2n": "planted_recall"}
"""audit.json's keys that go to metrics.json (which DVC compares across experiments), and their names there."""
SHEET_COLUMNS = 8
"""Images per row of the contact sheet."""
MAX_TICK_CLASSES = 30
"""Above this many classes the heatmap drops its tick labels (they would overlap)."""
MAX_TABLE_CLASSES = 50
"""Above this many classes audit.md and the bar chart show only the ``top`` worst classes."""


def _percent_cols(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if str(c).endswith(("disagreement", "agreement", "share", "outside_pair"))]


def _pct(x: float | None) -> str:
    return MISSING if x is None else f"{100 * x:.2f}%"


def _clean_split(pc: pd.DataFrame) -> str:
    """The column prefix of the cleanest split with samples: train unmixed, else val, else all train views."""
    for p in ("clean", "unmixed", "val"):
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
    save_png(_draw_png(tables, names, top), path, dpi=100)
    return path


def _draw_png(tables: AuditTables, names: Sequence[str], top: int) -> Any:

    c = len(names)
    conf, src = tables.confusion, "every training image, evaluation view"
    m = conf.to_numpy().astype(float)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    pc = _worst_classes(tables.per_class, top)
    series = [
        (p, lbl)
        for p, lbl in (("clean", "train, evaluation view"), ("train", "train, stored views"), ("val", "val"))
        if f"{p}_samples" in pc and tables.per_class[f"{p}_samples"].sum() > 0
    ]
    rows = len(pc)
    fig = figure((13, max(4.5, min(0.28 * rows + 1.5, 30))), layout="constrained")
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
    return fig


def _md_header(tables: AuditTables, c: int, info: dict[str, Any]) -> list[str]:
    h = tables.headline
    return [
        "# Teacher–label audit",
        "",
        f"- store: `{info['store']}`",
        f"- classes: {c}" + ("" if info["names_from_manifest"] else " (names not found: manifest missing, ids used)"),
        f"- train units done: {info['units_done']} of {info['units_total']}, epochs audited: {h['epochs']}",
        f"- train views: {h['train_samples']} ({h['unmixed_samples']} unmixed, {h['mixed_samples']} Mixup/CutMix)",
        f"- training images audited (evaluation view, every ingested image): {h['images']}",
        f"- val samples: {h['val_samples']}" + ("" if h["val_samples"] else f" ({info.get('val_note', 'none')})"),
        f"- suspect: the teacher gives the label less than {h['threshold']} on the evaluation view; "
        f"ranked by `{h['ranking']}`",
        "",
        "## Headline",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| teacher != label, training images, evaluation view | {_pct(h['clean_disagreement'])} |",
        f"| teacher != label, val | {_pct(h['val_disagreement'])} |",
        f"| λ-weighted agreement, stored train views | {_pct(h['weighted_agreement'])} |",
        f"| teacher != label, stored train views (mixed ones count for their own label) | "
        f"{_pct(h['train_disagreement'])} |",
        f"| teacher != label, unmixed stored views | {_pct(h['unmixed_disagreement'])} |",
        f"| suspects (training images) | {h['suspects']} |",
        f"| suspects (val) | {MISSING if h['val_suspects'] is None else h['val_suspects']} |",
        "",
        "**Mixed views.** On a Mixup/CutMix view the image blends two samples and the target is",
        "λ·label + (1 − λ)·partner label, so a teacher that names the partner's class is not wrong. The",
        "λ-weighted agreement credits a view's teacher top-1 with the weight of the label it names; the",
        "suspects and confusion tables use each training image's evaluation view (no augmentation, never",
        "mixed), which the teacher stage stores for every ingested image (the store's `clean` split).",
        "",
    ]


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
        "share: the pair's count over the label's samples of that split (clean: every training image's",
        "evaluation view).",
        "",
        markdown_table(tables.confused_pairs, ["share"]),
    ]


SUSPECT_SHOWN = ("rank", "index", "key", "file", "label_name", "teacher_name", "p_teacher", "p_label",
                 "in_fit_subset", "views", "view_agreement")


def _md_suspects(tables: AuditTables, top: int) -> list[str]:
    threshold, out = tables.headline["threshold"], []
    for title, sus, csv in (("training images", tables.suspects, "suspects.csv"),
                            ("val", tables.suspects_val, "suspects_val.csv")):
        if sus is None:
            continue
        out += [f"## Suspected wrong labels ({title})", ""]
        if sus.empty:
            out += [f"None: the teacher gives every label at least {threshold}.", ""]
            continue
        more = "" if len(sus) <= top else f" (first {top} of {len(sus)}; all in {csv})"
        cols = [col for col in SUSPECT_SHOWN if col in sus and (csv == "suspects.csv" or col not in
                                                                ("in_fit_subset", "views", "view_agreement"))]
        out += [f"Most suspect first{more}. key is the WebDataset key in the shard file.", "",
                markdown_table(sus.head(top)[cols], ["view_agreement"])]
    if len(tables.planted):
        out += ["## Planted flips found", "",
                f"The manifest records {tables.headline['planted']} labels flipped on purpose "
                "(`data.label_noise`); each ranking's top N and 2N against them:", "",
                markdown_table(tables.planted, [c for c in tables.planted if c.startswith(("precision", "recall"))])]
    return out


def markdown_report(tables: AuditTables, names: Sequence[str], top: int, info: dict[str, Any]) -> str:
    """audit.md: the headline, the per-epoch, per-class and confused-pair tables, the suspects, the files."""
    c = len(names)
    out = _md_header(tables, c, info) + _md_tables(tables, c, top) + _md_suspects(tables, top)
    out += ["## Files", "", *[f"- `{f}`" for f in info["files"]], "", "![audit](audit.png)", ""]
    if "suspects.png" in info["files"] and tables.headline["suspects"]:
        out += ["![top suspects](suspects.png)", ""]
    return "\n".join(out)


def write_contact_sheet(rows: pd.DataFrame, images: Sequence[Any], path: Path, title: str) -> Path:
    """A grid of images, each titled with its rank, index, given label and the teacher's label and probability
    (a planted flip is marked with its true label)."""

    n = len(images)
    if n == 0:
        title += ": none to show"
    cols = min(SHEET_COLUMNS, max(n, 1))
    nrows = max(1, -(-n // cols))
    fig = figure((1.9 * cols, 2.3 * nrows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, (_, r), img in zip(axes, rows.iterrows(), images, strict=False):
        arr = np.asarray(img if img.mode in ("L", "RGB") else img.convert("RGB"))  # CMYK or palette: as seen
        ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, interpolation="nearest")
        text = (f"#{r['rank']} · {r['index']}\ngiven: {r['label_name']}\n"
                f"teacher: {r['teacher_name']} {r['p_teacher']:.2f}")
        planted = bool(r.get("planted", False))
        if planted:
            text += f"\n(planted; true {r['true_name']})"
        ax.set_title(text, fontsize=7, color="tab:green" if planted else "black")
    fig.suptitle(title, fontsize=9)
    save_png(fig, path, dpi=100)
    return path


def _csv(df: pd.DataFrame, path: Path, index: bool) -> None:
    """A CSV file, gzipped (reproducibly: no timestamp) when its name ends in .gz."""
    if not path.name.endswith(".gz"):
        atomic_write_text(path, df.to_csv(index=index))
        return
    buf = io.BytesIO()
    df.to_csv(buf, index=index, compression={"method": "gzip", "mtime": 0})
    atomic_write_bytes(path, buf.getvalue())


def write_report(
    tables: AuditTables, names: Sequence[str], output: Path, *, top: int = 20, info: dict[str, Any] | None = None,
    sheet: tuple[pd.DataFrame, Sequence[Any]] | None = None,
) -> list[str]:
    """Write the CSVs, audit.md, audit.png, suspects.png (``sheet``: the rows and their images) and audit.json
    into ``output``; returns the file names."""
    output = location(output)
    info = dict(info or {})
    for name, df, index in (("per_class.csv", tables.per_class, False), ("per_epoch.csv", tables.per_epoch, False),
                            ("confusion.csv", tables.confusion, True),
                            ("confused_pairs.csv", tables.confused_pairs, False),
                            ("images.csv.gz", tables.images, False), ("suspects.csv", tables.suspects, False)):
        _csv(df, output / name, index)
    files = list(CSV_FILES)
    for name, df, index in (("confusion_val.csv", tables.confusion_val, True),
                            ("suspects_val.csv", tables.suspects_val, False),
                            ("planted.csv", tables.planted if len(tables.planted) else None, False)):
        if df is not None:
            _csv(df, output / name, index)
            files.append(name)
    files += ["audit.md", "audit.png"]
    write_png(tables, names, output / "audit.png", top=top)
    if sheet is not None:
        write_contact_sheet(sheet[0], sheet[1], output / "suspects.png",
                            f"Top {len(sheet[1])} suspected wrong labels (teacher's evaluation view)")
        files.append("suspects.png")
    files += ["audit.json", "metrics.json"]
    info = {"store": "?", "names_from_manifest": True, "units_done": "?", "units_total": "?", **info, "files": files}
    atomic_write_text(output / "audit.md", markdown_report(tables, names, top, info))
    atomic_write_json(output / "audit.json", tables.headline)
    h = tables.headline
    atomic_write_json(output / "metrics.json", {name: h[k] for k, name in METRICS.items() if h.get(k) is not None})
    return files
