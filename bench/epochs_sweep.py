"""How many epochs to store: the accuracy-vs-E curve and the 3-seed margins (docs/epochs.md). Not a speed
benchmark (``make bench`` does not run it): a sweep of whole training runs.

``python -m bench.epochs_sweep curve``: with the demo recipe, hard distillation from stores of E = 1, 2,
5, 10, 25 augmented epochs (25 = a fresh stored epoch for every student epoch), plus the online teacher
(a fresh answer for every view: the ceiling) and no distillation (the floor). Per point: val top-1,
teacher-stage seconds, the last epoch's train distillation loss and the same loss on val (the student's
dist head against the teacher's top-1 on the val images), whose gap grows when the student memorises
repeated answers.

``python -m bench.epochs_sweep seeds``: the whole demo (ingest, teacher-fit, teacher, none/soft/hard)
with seeds 0, 1, 2 (a seed redraws the ingest order, hence the 5,000-image subset, the teacher's fit and
every view): the hard − none and soft − none margins, their mean and standard error.

Why a script and not ``dvc exp run --queue``: dvc.yaml fans every store out to the three students
(none, soft, hard), so each E point queued through it would also retrain none and soft, which do not
depend on E (three times the compute: about 45 more minutes on 2 cores), and the online student is
no stage of the pipeline. The script calls the same stage functions the CLI does, resumes finished
runs (a student whose checkpoint is complete returns at once), and writes CSV and PNG next to them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.core.config import Config, load_config, overridden
from pipeline.core.files import location
from pipeline.core.report import figure, markdown_table, save_png
from pipeline.data.shards import open_shards
from pipeline.train.checkpoint import load_student
from pipeline.train.evaluation import collect_logits
from pipeline.train.models import load_teacher, resolve_teacher
from pipeline.views.loading import make_loader, val_dataset
from stages import evaluate, ingest, student, teacher, teacher_fit

E_POINTS = (1, 2, 5, 10, 25)


def val_distill_loss(cfg: Config, folder: Path) -> float:
    """Cross-entropy of the student's dist head against the teacher's top-1 on the val images."""
    manifest = open_shards(cfg)
    loader = make_loader(val_dataset(manifest, cfg.aug, cfg.evaluate.batch_size), 0)
    dev = torch.device("cpu")
    t, _ = load_teacher(resolve_teacher(cfg).teacher, num_classes=manifest.num_classes, in_chans=cfg.aug.channels)
    s, _ = load_student(folder, dev, num_classes=manifest.num_classes, img_size=cfg.aug.img_size,
                        in_chans=cfg.aug.channels)
    target = collect_logits(t, loader, dev)["logits"].argmax(1)
    dist = collect_logits(s, loader, dev, heads=True)["dist"]
    return float(torch.nn.functional.cross_entropy(dist, target))


def train(cfg: Config, out: Path, **student_cfg: Any) -> tuple[Config, dict[str, Any]]:
    """One student run (resumed if it exists) and its last history row."""
    cfg = overridden(cfg, [f"student.{k}={v}" for k, v in {**student_cfg, "output": out}.items()])
    student.run(cfg, progress=False)
    history = pd.read_csv(out / "history.csv")
    return cfg, history.iloc[-1].to_dict()


def top1(cfg: Config, folders: dict[str, Path]) -> dict[str, float]:
    models = evaluate.run(overridden(cfg, [f"evaluate.output={folders[next(iter(folders))].parent / 'eval'}"]),
                          students=folders, device="cpu")["models"]
    return {name: float(m["top1"]) for name, m in models.items()}


def curve(cfg: Config, out: Path, points: tuple[int, ...]) -> pd.DataFrame:
    rows = []
    for e in points:
        c = overridden(cfg, [f"teacher.epochs={e}", f"store.path={out / 'stores' / f'E{e}.zarr'}"])
        t0 = time.perf_counter()
        teacher.run(c, progress=False)
        seconds = time.perf_counter() - t0
        rows.append(_point(c, out / f"hard-E{e}", f"hard, E = {e}", e, seconds, distillation="hard"))
        print(rows[-1], flush=True)
    # the ceiling and the floor replay fresh views every epoch (the largest E): no reuse of views either
    c = overridden(cfg, [f"teacher.epochs={max(points)}", f"store.path={out / 'stores' / f'E{max(points)}.zarr'}"])
    rows.append(_point(c, out / "hard-online", "hard, online teacher", None, None, distillation="hard",
                       teacher_mode="online"))
    rows.append(_point(c, out / "none", "none", None, None, distillation="none"))
    df = pd.DataFrame(rows)
    df.to_csv(out / "curve.csv", index=False)
    _plot(df, out / "curve.png", cfg.student.epochs, open_shards(cfg).count("val"))
    return df


def _point(cfg: Config, folder: Path, name: str, e: int | None, seconds: float | None, **student_cfg: Any) -> dict:
    c, last = train(cfg, folder, **student_cfg)
    acc = top1(c, {folder.name: folder})[folder.name]
    distilled = student_cfg.get("distillation") != "none"
    val_loss = val_distill_loss(c, folder) if distilled else float("nan")
    return {"run": name, "E": e, "reuse": c.student.epochs / e if e else None, "teacher_s": seconds,
            "top1": acc, "train_distill_loss": last["loss_distill"] if distilled else float("nan"),
            "val_distill_loss": val_loss}


def _plot(df: pd.DataFrame, path: Path, epochs: int, val_images: int) -> None:
    fig = figure((6.5, 4), layout="constrained")
    ax = fig.subplots()
    pts = df.dropna(subset=["E"])
    se = 100 * np.sqrt(pts["top1"] * (1 - pts["top1"]) / val_images)  # binomial standard error of each point
    ax.errorbar(pts["E"], 100 * pts["top1"], yerr=se, fmt="o-", capsize=3, label="hard, stored teacher (± 1 SE)")
    for run, style in (("hard, online teacher", "--"), ("none", ":")):
        row = df[df["run"] == run]
        if len(row):
            ax.axhline(100 * row["top1"].iloc[0], linestyle=style, color="gray" if run == "none" else "tab:green",
                       label=f"{run} ({100 * row['top1'].iloc[0]:.2f}%)")
    ax.set_xscale("log")
    ax.set_xticks(pts["E"], [str(int(e)) for e in pts["E"]])
    ax.set(xlabel=f"stored epochs E (student: {epochs} epochs, reuse = {epochs}/E)", ylabel="val top-1 (%)",
           title="Accuracy against stored epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path, dpi=110)


def seeds(cfg: Config, out: Path, seed_list: tuple[int, ...], curve_dir: Path) -> pd.DataFrame:
    """The config's own seed reuses its shards and teacher and the curve's store and hard run at the config's E
    (the same run; the curve's none replays E = 25 fresh epochs, so none is trained here, at the config's E,
    as the demo does); every other seed re-makes the whole demo under ``out``."""
    rows = []
    for s in seed_list:
        base = out / f"seed{s}"
        e = cfg.teacher.epochs
        if s == cfg.seed:
            c = overridden(cfg, [f"store.path={curve_dir / 'stores' / f'E{e}.zarr'}"])
            reuse = {"hard": curve_dir / f"hard-E{e}"}
        else:
            c = overridden(cfg, [f"seed={s}", f"data.shards={base / 'shards'}",
                                 f"teacher.fit.output={base / 'teacher.pt'}", f"store.path={base / 'logits.zarr'}"])
            reuse = {}
            ingest.run(c, progress=False)
            teacher_fit.run(c, progress=False)
        teacher.run(c, progress=False)
        folders = {}
        for kind in ("none", "soft", "hard"):
            folders[kind] = reuse.get(kind, base / f"student-{kind}")
            train(c, folders[kind], distillation=kind)
        acc = top1(c, folders)
        rows.append({"seed": s, **acc, "hard-none": acc["hard"] - acc["none"], "soft-none": acc["soft"] - acc["none"]})
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "seeds.csv", index=False)
    return df


def margins(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard error (std / sqrt(n), ddof 1) of each margin over the seeds."""
    out = []
    for col in ("hard-none", "soft-none"):
        x = df[col].to_numpy()
        out.append({"margin": col, "seeds": len(x), "mean": x.mean(),
                    "se": x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")})
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.epochs_sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["curve", "seeds", "all"])
    ap.add_argument("-c", "--config", default="configs/demo.yaml")
    ap.add_argument("--points", type=int, nargs="+", default=list(E_POINTS), help="stored epochs E (curve)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (seeds)")
    ap.add_argument("--out", default="runs/epochs-sweep")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    out = location(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.part in ("curve", "all"):
        df = curve(cfg, out / "curve", tuple(args.points))
        print(markdown_table(df, ["top1"], digits=4))
    if args.part in ("seeds", "all"):
        df = seeds(cfg, out / "seeds", tuple(args.seeds), out / "curve")
        print(markdown_table(df, ["none", "soft", "hard", "teacher", "hard-none", "soft-none"], digits=4))
        print(markdown_table(margins(df), ["mean", "se"], digits=4))


if __name__ == "__main__":
    main()
