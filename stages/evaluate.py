"""``distill evaluate``: the paper's tables for the teacher and each student on the val split.

Accuracy of every head (class, distillation, fused; top-1 and top-5), pairwise disagreement between
ground truth, teacher and students (as in DeiT's Table 4) and inference throughput (Table 5). Writes
``metrics.json`` (the handful of scalars DVC compares across experiments: each model's top-1, the
hard − none margin, student throughput), ``models.csv`` (every head of
every model), ``disagreement.csv`` (the matrix), ``results.md`` and ``accuracy_vs_throughput.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pipeline.core.config import Config
from pipeline.core.errors import DistillError
from pipeline.core.files import atomic_write_json, atomic_write_text, location, use_storage_options
from pipeline.core.report import figure, markdown_table, save_png
from pipeline.data.shards import open_shards
from pipeline.train.checkpoint import load_student
from pipeline.train.distributed import resolve_device
from pipeline.train.evaluation import collect_logits, head_accuracies, throughput, topk_accuracy
from pipeline.train.models import load_teacher, resolve_teacher
from pipeline.views.loading import make_loader, val_dataset

RESERVED_NAMES = ("teacher", "ground truth")


def student_names(folders: Sequence[Path]) -> dict[str, Path]:
    """Name each student by its folder (``runs/student-hard`` -> ``hard``); names must be unique."""
    named: dict[str, Path] = {}
    for folder in folders:
        name = location(folder).name.removeprefix("student-")
        if name in RESERVED_NAMES or name in named:
            taken = "reserved" if name in RESERVED_NAMES else f"also the name of {named[name]}"
            raise DistillError(f"student folder {folder}: its name {name!r} is {taken}; rename the folder")
        named[name] = folder
    return named


MARKERS = "osD^vP*Xh<>"


def _plot(models: dict[str, dict[str, Any]], path: Path) -> None:
    """Top-1 against throughput, one marker per model named in a legend (labels beside points overlap when
    students sit close together)."""
    fig = figure((6.5, 4))
    ax = fig.subplots()
    for i, (name, m) in enumerate(models.items()):
        ax.scatter(m["throughput_im_per_s"], m["top1"] * 100, s=50, marker=MARKERS[i % len(MARKERS)],
                   label=f"{name} ({100 * m['top1']:.2f}%)")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    ax.set_xlabel("inference throughput (images/s)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("Accuracy against throughput")
    ax.grid(alpha=0.3)
    fig.tight_layout()  # makes room for the legend outside the axes
    save_png(fig, path, dpi=120)


def _results_md(models: dict[str, dict[str, Any]], disagreement: dict[str, dict[str, float]], n: int) -> str:
    rows = []
    for name, m in models.items():
        if name == "teacher":
            rows.append([name, m["model"], m["top1"], m["top5"], "-", "-", "-", m["throughput_im_per_s"]])
        else:
            how = "none" if m["distillation"] == "none" else f"{m['distillation']} ({m['token']} token)"
            rows.append([name, how, m["top1"], m["top5"], m["cls_top1"], m["dist_top1"], m["fused_top1"],
                         m["throughput_im_per_s"]])
    acc = pd.DataFrame(rows, columns=["model", "distillation", "top-1", "top-5", "class head", "dist head", "fused",
                                      "im/s"])
    names = list(disagreement)
    dis = pd.DataFrame([[a, *[disagreement[a][b] for b in names]] for a in names], columns=["", *names])
    return "\n".join([
        f"# Results on val ({n} images)", "",
        markdown_table(acc, digits=4, formats={"im/s": lambda v: f"{v:,.0f}"}),
        "Top-1 is the fused head for distilled students and the class head otherwise.", "",
        "## Disagreement (fraction of val images where two models' top-1 differ; paper Table 4)", "",
        markdown_table(dis, digits=4),
    ])


def _teacher_row(cfg: Config, val: Any, example: torch.Tensor, dev: torch.device, num_classes: int) -> tuple:
    """(the teacher's report row, its val logits and labels)."""
    teacher, _ = load_teacher(resolve_teacher(cfg).teacher, num_classes=num_classes, in_chans=cfg.aug.channels)
    teacher.to(dev)
    out = collect_logits(teacher, make_loader(val, 0), dev)
    row = {
        "model": cfg.teacher.model,
        "top1": topk_accuracy(out["logits"], out["label"], 1),
        "top5": topk_accuracy(out["logits"], out["label"], 5),
        "throughput_im_per_s": throughput(teacher, example, dev, cfg.evaluate.throughput_seconds),
    }
    return row, out


def _student_row(cfg: Config, folder: Path, val: Any, example: torch.Tensor, dev: torch.device, num_classes: int,
                 label: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    """(a student's report row, its val top-1 predictions)."""
    model, info = load_student(folder, dev, num_classes=num_classes, img_size=cfg.aug.img_size,
                               in_chans=cfg.aug.channels)
    out = collect_logits(model, make_loader(val, 0), dev, heads=True)
    acc = head_accuracies(out)
    # A student trained without distillation never trains its distillation head: report its class head.
    head = "cls" if info["distillation"] == "none" or info["token"] == "class" else "fused"
    if not torch.equal(out["label"], label):
        raise DistillError("val order differs between teacher and student passes")
    row = {**info, "head": head, "top1": acc[f"{head}_top1"], "top5": acc[f"{head}_top5"], **acc,
           "throughput_im_per_s": throughput(model, example, dev, cfg.evaluate.throughput_seconds)}
    return row, out[head].argmax(1)


def run(cfg: Config, *, students: dict[str, Path] | None = None, device: str = "auto") -> dict[str, Any]:
    """Evaluate the teacher and every student; ``students`` maps a name to a student output folder."""
    use_storage_options(cfg.storage_options)
    dev = resolve_device(device)
    students = students if students is not None else student_names(cfg.evaluate.students)
    manifest = open_shards(cfg)
    val = val_dataset(manifest, cfg.aug, cfg.evaluate.batch_size)
    example = next(iter(make_loader(val, 0))).view
    c = manifest.num_classes

    teacher_row, t_out = _teacher_row(cfg, val, example, dev, c)
    label = t_out["label"]
    preds: dict[str, torch.Tensor] = {"ground truth": label, "teacher": t_out["logits"].argmax(1)}
    models: dict[str, dict[str, Any]] = {"teacher": teacher_row}
    for name, folder in students.items():
        models[name], preds[name] = _student_row(cfg, folder, val, example, dev, c, label)

    names = list(preds)
    disagreement = {a: {b: float((preds[a] != preds[b]).float().mean()) for b in names} for a in names}
    out = location(cfg.evaluate.output)
    atomic_write_json(out / "metrics.json", headline_metrics(models))
    atomic_write_text(out / "models.csv", pd.DataFrame.from_dict(models, orient="index").rename_axis("model")
                      .to_csv())
    atomic_write_text(out / "disagreement.csv", pd.DataFrame(disagreement).loc[names, names].to_csv())
    _plot(models, out / "accuracy_vs_throughput.png")
    atomic_write_text(out / "results.md", _results_md(models, disagreement, len(label)))
    return {"val_samples": len(label), "models": models, "disagreement": disagreement}


def headline_metrics(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What ``dvc metrics show`` / ``dvc exp show`` compare, with short names so that a table of experiments
    fits 120 columns: top-1 per model, ``hard-none`` (the distillation gain, when both were evaluated) and
    ``im_per_s`` (the students' mean inference throughput). The teacher/label disagreement on val is
    1 − top1.teacher; on the training images it is the audit's metric."""
    top1 = {name: round(m["top1"], 4) for name, m in models.items()}
    out: dict[str, Any] = {"top1": top1}
    if "hard" in top1 and "none" in top1:
        out["hard-none"] = round(top1["hard"] - top1["none"], 4)
    speeds = [m["throughput_im_per_s"] for name, m in models.items() if name != "teacher"]
    if speeds:
        out["im_per_s"] = round(sum(speeds) / len(speeds))
    return out
