"""``distill evaluate``: the paper's tables for the teacher and each student on the val split.

Accuracy of every head (class, distillation, fused; top-1 and top-5), pairwise disagreement between
ground truth, teacher and students (as in DeiT's Table 4) and inference throughput (Table 5). Writes
``metrics.json`` (DVC metrics), ``results.md`` and ``accuracy_vs_throughput.png`` (DVC plots).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pipeline.config import Config, StudentConfig  # noqa: E402
from pipeline.distributed import resolve_device  # noqa: E402
from pipeline.evaluation import collect_logits, head_accuracies, throughput, topk_accuracy  # noqa: E402
from pipeline.models import create_student, load_teacher  # noqa: E402
from pipeline.replay import ReplayDataset  # noqa: E402
from pipeline.shards import open_shards  # noqa: E402
from stages.common import StageError, make_loader  # noqa: E402
from stages.student import CHECKPOINT  # noqa: E402
from stages.teacher import resolve_teacher  # noqa: E402

RESERVED_NAMES = ("teacher", "ground truth")


def student_names(folders: Sequence[Path]) -> dict[str, Path]:
    """Name each student by its folder (``runs/student-hard`` -> ``hard``); names must be unique."""
    named: dict[str, Path] = {}
    for folder in map(Path, folders):
        name = folder.name.removeprefix("student-")
        if name in RESERVED_NAMES or name in named:
            taken = "reserved" if name in RESERVED_NAMES else f"also the name of {named[name]}"
            raise StageError(f"student folder {folder}: its name {name!r} is {taken}; rename the folder")
        named[name] = folder
    return named


def load_student(
    folder: Path, device: torch.device, *, num_classes: int, img_size: int, in_chans: int
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a trained student from its checkpoint (architecture recorded inside), refusing one
    trained for other classes or another input shape than this config's val view."""
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        raise StageError(f"no student checkpoint at {path}; run `distill student` for it first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        sc = StudentConfig.model_validate(ckpt["student"])
        trained = {"num_classes": ckpt["num_classes"], "img_size": ckpt["img_size"], "in_chans": ckpt["in_chans"]}
        epochs = ckpt["epoch"] + 1
        state = ckpt["model"]
    except Exception as e:
        raise StageError(f"{path}: not a readable student checkpoint ({type(e).__name__}: {e})") from e
    here = {"num_classes": num_classes, "img_size": img_size, "in_chans": in_chans}
    diffs = [f"{k} {trained[k]} (this config: {here[k]})" for k in here if trained[k] != here[k]]
    if diffs:
        raise StageError(f"{path}: trained for {', '.join(diffs)}")
    model = create_student(sc, **trained)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise StageError(f"{path}: weights do not fit the recorded architecture ({e})") from e
    return model.to(device).eval(), {"distillation": sc.distillation, "token": sc.token, "epochs": epochs}


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) and v <= 1.0 else (f"{v:,.0f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _plot(models: dict[str, dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in models.items():
        ax.scatter(m["throughput_im_per_s"], m["top1"] * 100, s=40)
        ax.annotate(name, (m["throughput_im_per_s"], m["top1"] * 100), textcoords="offset points", xytext=(5, 3))
    ax.set_xlabel("inference throughput (images/s)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("Accuracy against throughput")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: Config, *, students: dict[str, Path] | None = None, device: str = "auto") -> dict[str, Any]:
    """Evaluate the teacher and every student; ``students`` maps a name to a student output folder."""
    dev = resolve_device(device)
    students = students if students is not None else student_names(cfg.evaluate.students)
    manifest = open_shards(cfg)
    val = ReplayDataset(manifest, cfg.aug, cfg.seed, [(0, s) for s in range(len(manifest.ranges("val")))],
                        split="val")
    example = next(iter(make_loader(val, cfg.evaluate.batch_size, 0))).view

    tcfg = resolve_teacher(cfg)
    teacher, _ = load_teacher(tcfg.teacher, num_classes=manifest.num_classes, in_chans=cfg.aug.channels)
    teacher.to(dev)
    t_out = collect_logits(teacher, make_loader(val, cfg.evaluate.batch_size, 0), dev)
    label = t_out["label"]
    preds: dict[str, torch.Tensor] = {"ground truth": label, "teacher": t_out["logits"].argmax(1)}
    models: dict[str, dict[str, Any]] = {
        "teacher": {
            "model": cfg.teacher.model,
            "top1": topk_accuracy(t_out["logits"], label, 1),
            "top5": topk_accuracy(t_out["logits"], label, 5),
            "throughput_im_per_s": throughput(teacher, example, dev, cfg.evaluate.throughput_seconds),
        }
    }
    for name, folder in students.items():
        model, info = load_student(folder, dev, num_classes=manifest.num_classes, img_size=cfg.aug.img_size,
                                   in_chans=cfg.aug.channels)
        out = collect_logits(model, make_loader(val, cfg.evaluate.batch_size, 0), dev, heads=True)
        acc = head_accuracies(out)
        # A student trained without distillation never trains its distillation head: report its class head.
        head = "cls" if info["distillation"] == "none" or info["token"] == "class" else "fused"
        if not torch.equal(out["label"], label):
            raise StageError("val order differs between teacher and student passes")
        preds[name] = out[head].argmax(1)
        models[name] = {
            **info, "head": head, "top1": acc[f"{head}_top1"], "top5": acc[f"{head}_top5"], **acc,
            "throughput_im_per_s": throughput(model, example, dev, cfg.evaluate.throughput_seconds),
        }

    names = list(preds)
    disagreement = {a: {b: float((preds[a] != preds[b]).float().mean()) for b in names} for a in names}
    out = Path(cfg.evaluate.output)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"val_samples": len(label), "models": models, "disagreement": disagreement}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    _plot(models, out / "accuracy_vs_throughput.png")

    acc_rows = []
    for name, m in models.items():
        if name == "teacher":
            acc_rows.append([name, m["model"], m["top1"], m["top5"], "-", "-", "-", m["throughput_im_per_s"]])
        else:
            how = "none" if m["distillation"] == "none" else f"{m['distillation']} ({m['token']} token)"
            acc_rows.append([name, how, m["top1"], m["top5"],
                             m["cls_top1"], m["dist_top1"], m["fused_top1"], m["throughput_im_per_s"]])
    text = [
        f"# Results on val ({len(label)} images)", "",
        _md_table(["model", "distillation", "top-1", "top-5", "class head", "dist head", "fused", "im/s"], acc_rows),
        "", "Top-1 is the fused head for distilled students and the class head otherwise.", "",
        "## Disagreement (fraction of val images where two models' top-1 differ; paper Table 4)", "",
        _md_table(["", *names], [[a, *[disagreement[a][b] for b in names]] for a in names]), "",
    ]
    (out / "results.md").write_text("\n".join(text))
    return metrics
