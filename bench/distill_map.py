"""When distillation pays: a measured map on the demo's data (README "When distillation pays", docs/results.md).
Not a speed benchmark (``make bench`` does not run it): a sweep of whole training runs, resumable.

The cells: the **teacher recipe** (``light``: the demo's, fitted without Mixup/CutMix and erasing and with milder
crops, as DeiT's pretrained RegNet was; ``mixed``: fitted on the students' own augmentation, so that its argmax on
a blended, erased view was trained for) x the **student schedule** (epochs) x the **distillation** (none, soft,
hard) x the **student seed** (``student.seed``: initialisation, drop path and order; the views, hence the store,
stay the demo's, so every seed of a teacher shares one store). ``none`` does not depend on the teacher: it is
trained once per schedule and seed.

Every cell is scored on a **selection set** no stage trains on: train shards 5-14 (10,000 Fashion-MNIST
training images outside the students' 5,000; the teacher's clean pass only labels them). The recipe is
chosen there; ``--val`` scores the chosen cells on the official val set, once. Beside accuracy each cell
reports the class-head and dist-head top-1, the student's disagreement with the teacher (the paper's Table 4),
and each teacher its top-1 and its lambda-weighted agreement with the mixed labels on the stored views (the
audit's figure).

``python -m bench.distill_map --schedules 8 25 --seeds 0 1 2`` then, e.g., ``--schedules 100 --seeds 0
--modes none hard`` add cells; each run writes ``cell.json`` in its folder, and ``cells.csv``, ``margins.csv``,
``map.png`` and ``map.md`` under ``--out`` are rebuilt from every cell there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.core.config import Config, load_config, overridden
from pipeline.core.files import atomic_write_json, location
from pipeline.core.report import figure, markdown_table, save_png
from pipeline.data.shards import load_manifest, open_shards
from pipeline.train.checkpoint import load_student
from pipeline.train.evaluation import collect_logits, head_accuracies, topk_accuracy
from pipeline.train.models import load_teacher, resolve_teacher
from pipeline.views.loading import EvalDataset, make_loader, val_dataset
from stages import audit, ingest, student, teacher, teacher_fit

TEACHERS = {"light": None, "mixed": {}}
"""teacher.fit.aug of each recipe: the config's own (light, in configs/demo.yaml), or none (the students')."""
SELECTION = (5, 15)
"""Train shards [first, last) of the selection set (the demo's students and teacher fit use shards 0-4)."""
MODES = ("none", "soft", "hard")


def teachers(cfg: Config, out: Path, names: list[str]) -> dict[str, Config]:
    """Fit each teacher recipe and write its store (both resume, and do nothing once up to date)."""
    ingest.run(cfg, progress=False)
    cfgs = {}
    for name in names:
        sets = [f"teacher.fit.output={out / 'teachers' / f'{name}.pt'}",
                f"store.path={out / 'stores' / f'{name}.zarr'}"]
        if TEACHERS[name] is not None:
            sets.append(f"teacher.fit.aug={json.dumps(TEACHERS[name])}")
        c = overridden(cfg, sets)
        teacher_fit.run(c, progress=False)
        teacher.run(c, progress=False)
        cfgs[name] = c
    return cfgs


def selection(cfg: Config, shards: tuple[int, int] = SELECTION) -> EvalDataset:
    """The selection set's evaluation views, train shards ``[first, last)`` of the whole manifest (``open_shards``
    keeps the first ``data.train_shards``, which must not reach them)."""
    first, last = shards
    m = load_manifest(cfg.data.shards)
    used = cfg.data.train_shards or len(m.shards("train"))
    if first < used or last > len(m.shards("train")):
        raise SystemExit(f"--selection {first} {last}: the selection set must lie after the {used} train shards the "
                         f"stages use and within the {len(m.shards('train'))} ingested")
    return EvalDataset(m, cfg.aug, "train", shards=range(first, last), batch_size=cfg.evaluate.batch_size)


def teacher_scores(cfg: Config, folder: Path, ds: EvalDataset) -> dict[str, Any]:
    """The teacher's top-1 and top-1 predictions on ``ds`` (the selection or the val set), and, on the stored views,
    its lambda-weighted agreement with the mixed labels (the audit's headline; its report goes to ``folder``)."""
    model, _ = load_teacher(resolve_teacher(cfg).teacher, num_classes=ds.manifest.num_classes,
                            in_chans=cfg.aug.channels)
    out = collect_logits(model, make_loader(ds, 0), torch.device("cpu"))
    head = audit.run(cfg, output=folder / "audit", sheet=0)
    return {"top1": topk_accuracy(out["logits"], out["label"], 1), "pred": out["logits"].argmax(1),
            "label": out["label"], "weighted_agreement": head["weighted_agreement"]}


def student_scores(cfg: Config, folder: Path, ds: EvalDataset, t: dict[str, Any]) -> dict[str, float]:
    """Top-1 (the fused heads; the class head of an undistilled student), each head's top-1, and the share of
    images where the student's prediction differs from the teacher's."""
    model, info = load_student(folder, torch.device("cpu"), num_classes=ds.manifest.num_classes,
                               img_size=cfg.aug.img_size, in_chans=cfg.aug.channels)
    out = collect_logits(model, make_loader(ds, 0), torch.device("cpu"), heads=True)
    if not torch.equal(out["label"], t["label"]):
        raise RuntimeError(f"{folder}: images in another order than the teacher's pass")
    acc = head_accuracies(out)
    head = "cls" if info["distillation"] == "none" else "fused"
    return {"top1": acc[f"{head}_top1"], "cls_top1": acc["cls_top1"], "dist_top1": acc["dist_top1"],
            "disagree_teacher": float((out[head].argmax(1) != t["pred"]).float().mean())}


def cell(cfg: Config, folder: Path, *, teacher_name: str, epochs: int, mode: str, seed: int,
         t: dict[str, Any], sel: EvalDataset) -> dict[str, Any]:
    """Train one student (resumed where it stopped; at once if finished) and score it on the selection set, once:
    its ``cell.json`` is the cell's row."""
    done = folder / "cell.json"
    if done.is_file():
        return json.loads(done.read_text())
    c = overridden(cfg, [f"student.distillation={mode}", f"student.epochs={epochs}", f"student.seed={seed}",
                         f"student.eval_every={epochs}", f"student.output={folder}"])
    t0 = time.perf_counter()
    student.run(c, progress=False)
    row = {"teacher": teacher_name if mode != "none" else "-", "epochs": epochs, "distillation": mode, "seed": seed,
           "train_s": round(time.perf_counter() - t0, 1),
           **{f"sel_{k}": v for k, v in student_scores(c, folder, sel, t).items()}}
    atomic_write_json(done, row)
    return row


def margins(cells: pd.DataFrame, col: str = "sel_top1") -> pd.DataFrame:
    """hard - none and soft - none of ``col`` per teacher and schedule, paired by seed: mean and standard error
    (ddof 1), in points."""
    none = cells[cells["distillation"] == "none"].set_index(["epochs", "seed"])[col]
    rows, distilled = [], cells[cells["distillation"] != "none"]
    for (name, epochs, mode), g in distilled.groupby(["teacher", "epochs", "distillation"]):
        paired = [(getattr(r, col) - none[(epochs, r.seed)]) for r in g.itertuples() if (epochs, r.seed) in none.index]
        x = 100 * np.asarray(paired)
        rows.append({"teacher": name, "epochs": epochs, "margin": f"{mode} - none", "seeds": len(x),
                     "mean": x.mean() if len(x) else float("nan"),
                     "se": x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")})
    return pd.DataFrame(rows)


def summary(cells: pd.DataFrame) -> pd.DataFrame:
    """Each cell's mean over seeds (percent) and the seeds it has."""
    cols = ["sel_top1", "sel_cls_top1", "sel_dist_top1", "sel_disagree_teacher"]
    g = cells.groupby(["teacher", "epochs", "distillation"], sort=False)
    out = (100 * g[cols].mean()).round(2)
    out["seeds"] = g.size()
    out["se_top1"] = (100 * g["sel_top1"].std(ddof=1) / np.sqrt(g.size())).round(2)
    return out.reset_index()


def plot(cells: pd.DataFrame, path: Path) -> None:
    fig = figure((6.5, 4), layout="constrained")
    ax = fig.subplots()
    s = summary(cells)
    for (name, mode), g in s.groupby(["teacher", "distillation"]):
        g = g.sort_values("epochs")
        label = "none" if mode == "none" else f"{mode}, {name} teacher"
        ax.errorbar(g["epochs"], g["sel_top1"], yerr=g["se_top1"].fillna(0), fmt="o-" if mode != "none" else "s:",
                    capsize=3, label=label, color="gray" if mode == "none" else None)
    ax.set_xscale("log")
    ax.minorticks_off()
    ticks = sorted(s["epochs"].unique())
    ax.set_xticks(ticks, [str(e) for e in ticks])
    ax.set(xlabel="student epochs", ylabel="selection-set top-1 (%, ± 1 SE over seeds)",
           title="When distillation pays (demo data)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path, dpi=110)


def report(out: Path, cells: pd.DataFrame, m: pd.DataFrame) -> str:
    """``map.md``: the teachers, every cell's mean over its seeds, and the margins (selection set, percent)."""
    teachers = json.loads((out / "teachers.json").read_text())
    t = pd.DataFrame([{"teacher": n, **{k: 100 * v[k] for k in ("sel_top1", "weighted_agreement")}}
                      for n, v in teachers.items()])
    text = "\n".join([
        "# When distillation pays: the map (selection set: train shards outside the students' subset)", "",
        "Teachers (top-1; lambda-weighted agreement with the mixed labels on the stored views):", "",
        markdown_table(t, digits=2),
        "Cells (mean over seeds; disagreement: share of images where student and teacher differ):", "",
        markdown_table(summary(cells), digits=2),
        "Margins (points, paired by seed; se: standard error of the mean, ddof 1):", "",
        markdown_table(m, digits=2)])
    if (out / "val.csv").is_file():  # the chosen recipe's cells, scored once on the val set
        val = pd.read_csv(out / "val.csv")
        cols = ["teacher", "epochs", "distillation", "seed", "val_top1", "val_cls_top1", "val_dist_top1",
                "val_disagree_teacher", "teacher_val_top1"]
        text += "\n".join(["", "The chosen recipe on the val set (once):", "",
                            markdown_table(val[cols], ["val_top1", "val_cls_top1", "val_dist_top1",
                                                       "val_disagree_teacher", "teacher_val_top1"], digits=4),
                            markdown_table(pd.read_csv(out / "val-margins.csv"), digits=2)])
    (out / "map.md").write_text(text)
    return text


def collect(out: Path) -> pd.DataFrame:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("students/*/cell.json"))]
    return pd.DataFrame(rows).sort_values(["epochs", "teacher", "distillation", "seed"]).reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.distill_map", description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", default="configs/demo.yaml")
    ap.add_argument("--teachers", nargs="+", choices=list(TEACHERS), default=list(TEACHERS))
    ap.add_argument("--schedules", type=int, nargs="+", default=[8, 25], help="student epochs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--val", nargs=2, metavar=("TEACHER", "EPOCHS"),
                    help="score this teacher's cells at this schedule on the val set (the chosen recipe, once)")
    ap.add_argument("--selection", type=int, nargs=2, default=list(SELECTION), metavar=("FIRST", "LAST"),
                    help="train shards [FIRST, LAST) of the selection set (after the ones the stages use)")
    ap.add_argument("--out", default="runs/distill-map")
    args = ap.parse_args(argv)
    cfg, out = load_config(args.config), location(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = teachers(cfg, out, args.teachers)
    sel = selection(cfg, tuple(args.selection))
    scores = {name: teacher_scores(c, out / f"teacher-{name}", sel) for name, c in cfgs.items()}
    atomic_write_json(out / "teachers.json", {n: {"sel_top1": s["top1"], "weighted_agreement": s["weighted_agreement"]}
                                              for n, s in scores.items()})
    for epochs in args.schedules:
        for seed in args.seeds:
            for name in args.teachers:
                for mode in args.modes:
                    if mode == "none" and name != args.teachers[0]:
                        continue  # the teacher plays no part
                    folder = out / "students" / f"{mode if mode == 'none' else f'{mode}-{name}'}-e{epochs}-s{seed}"
                    print(cell(cfgs[name], folder, teacher_name=name, epochs=epochs, mode=mode, seed=seed,
                               t=scores[name], sel=sel), flush=True)
    if args.val:
        name, epochs = args.val[0], int(args.val[1])
        ds = val_dataset(open_shards(cfg), cfg.aug, cfg.evaluate.batch_size)
        t = teacher_scores(cfgs[name], out / f"teacher-{name}", ds)
        rows = [{"teacher": name, "epochs": epochs, "teacher_val_top1": t["top1"], **json.loads(p.read_text()),
                 **{f"val_{k}": v for k, v in student_scores(cfgs[name], p.parent, ds, t).items()}}
                for p in sorted(out.glob(f"students/*-e{epochs}-s*/cell.json"))
                if p.parent.name.startswith(("none-", f"soft-{name}-", f"hard-{name}-"))]
        val = pd.DataFrame(rows)
        val.to_csv(out / "val.csv", index=False)
        margins(val, "val_top1").to_csv(out / "val-margins.csv", index=False)
    cells = collect(out)
    cells.to_csv(out / "cells.csv", index=False)
    m = margins(cells)
    m.to_csv(out / "margins.csv", index=False)
    summary(cells).to_csv(out / "summary.csv", index=False)
    plot(cells, out / "map.png")
    print(report(out, cells, m))


if __name__ == "__main__":
    main()
