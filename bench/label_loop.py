"""From suspects to a better student (docs/audit.md, "Fixing labels"): what fixing the labels the audit finds is worth,
and how well the audit finds them on uniform and on confusable noise. Not a speed benchmark: whole runs.

Every command first ingests the loop's data and fits its clean teacher (``clean/``): that fit's val confusion
matrix is what confusable noise draws from (``data.label_noise_confusion``).

``loop``: the demo's training subset (5,000 images) with 10 % of its labels flipped (uniform: any other class;
confusable: along the clean fit's val confusion). For each kind the teacher and a hard-distilled student are
trained on the noisy labels; the audit of that teacher's store writes two relabel files: its top N suggestions
(N = the number of flips) and every suspect of its 0.05 threshold. Each (``--top-n-only``: the top-N file) is
applied as a label layer (``data.relabel``; the shards are hard links of the noisy ones) and the teacher and student
trained again; the clean labels are trained once. Tables: ``loop.csv`` (val top-1 of each teacher and student, and
what each relabel file restored and broke) and ``loop-audit.csv`` (each ranking's precision and recall).

``rank-confusable``, ``rank-uniform``: the demo-noisy recipe (``configs/demo-noisy.yaml``: 1,200 flips among 60,000
images, a 30-epoch teacher fit on the first 5,000) with one noise kind, audited: ``rank.csv`` (the goal on
confusable flips: 85 % of them in the top 2N and 65 % precision at N). ``rescore``: score the finished runs again
under every ranking (no training).

The loop's recipe is the demo's with a shorter teacher fit, fewer stored epochs and a shorter student (``LOOP``),
to fit the study in the CPU time it had; ``--seeds`` trains a student per seed on each arm's one teacher and store
(``student.seed``), and ``--kinds`` splits the arms between processes (``none``, the clean run, first: the
confusable noise draws from its fit). Every step resumes: ingest, teacher-fit, the teacher and the students skip
what is done, so a rerun finishes an interrupted study and then only rewrites the tables (``runs/label-loop/*.csv``).
``make label-loop`` runs ``rank-confusable loop rank-uniform`` with three seeds.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import store
from pipeline.audit.frames import load_audit
from pipeline.audit.rankings import available_rankings, label_issue_order, planted_scores
from pipeline.core.config import Config, load_config, overridden
from pipeline.data.shards import load_manifest
from stages import audit, ingest, student, teacher, teacher_fit

ROOT = Path(__file__).resolve().parent.parent
LOOP = ["data.train_limit=5000", "teacher.fit.epochs=8", "teacher.epochs=2", "student.epochs=20",
        "student.distillation=hard"]
"""The loop's recipe: the demo's training subset (the first 5,000 images of its seeded order) ingested alone, so
the audit covers exactly the images the teacher and the student train on; an 8-epoch teacher fit, E = 2 stored
epochs and a 20-epoch student (the demo's: 30, 10 and 25), to fit the study in the CPU time it had."""
NOISE = {"confusable": ["data.label_noise_kind=confusable"], "uniform": []}


def _cfg(base: Config, folder: Path, extra: list[str]) -> Config:
    """The config of one run, every file of it under ``folder``."""
    return overridden(base, [f"data.shards={folder / 'shards'}", f"teacher.fit.output={folder / 'teacher.pt'}",
                             f"store.path={folder / 'logits.zarr'}", f"student.output={folder / 'student'}",
                             f"evaluate.output={folder / 'eval'}", *extra])


def _link_shards(src: Path, dst: Path) -> None:
    """The noisy run's shards for a corrected run: hard links (the label layer rewrites only the manifest)."""
    if dst.exists():
        return
    dst.mkdir(parents=True)
    for f in src.iterdir():
        os.link(f, dst / f.name) if f.name != "manifest.json" else (dst / f.name).write_bytes(f.read_bytes())


def train_run(cfg: Config, *, seeds: tuple[int, ...] = (0,), with_student: bool = True) -> dict[str, Any]:
    """ingest, teacher-fit, teacher (and a student per seed, sharing the teacher and its store): each skips what is
    done. Val top-1 of the teacher, of each seed's student (``student_top1_s<seed>``), and their mean and spread."""
    ingest.run(cfg, progress=False)
    teacher_fit.run(cfg, progress=False)
    teacher.run(cfg, progress=False)
    fit = json.loads(Path(str(cfg.teacher.fit.output)).with_suffix(".json").read_text())
    row: dict[str, Any] = {"teacher_top1": fit["val_top1"]}
    if with_student:
        folder = Path(str(cfg.student.output))
        tops = []
        for seed in seeds:
            out = folder.with_name(f"{folder.name}-s{seed}")
            student.run(overridden(cfg, [f"student.seed={seed}", f"student.output={out}"]), progress=False)
            tops.append(json.loads((out / "metrics.json").read_text())["val_fused_top1"])
            row[f"student_top1_s{seed}"] = tops[-1]
        row["student_top1"] = float(np.mean(tops))
        row["student_std"] = float(np.std(tops, ddof=1)) if len(tops) > 1 else float("nan")
        row["seeds"] = len(tops)
    return row


def _scores(cfg: Config) -> pd.DataFrame:
    """Each ranking's precision and recall against the planted flips of a run's store."""
    return planted_scores_of(cfg.store.path, cfg.data.shards)


def planted_scores_of(store_path: Any, shards: Any) -> pd.DataFrame:
    """Each ranking's precision and recall against the planted flips of a store and its shards."""
    inputs = load_audit(store_path, shards)
    orders = {r: label_issue_order(inputs.images, r, inputs.clean_probs) for r in available_rankings()}
    return planted_scores(inputs.images, orders)


def _fixed(folder: Path, relabel: Path, subset: int) -> dict[str, Any]:
    """What a relabel file did: its rows, those that restored a planted flip's true label, those that changed a
    right label (all images, and within the first ``subset``, which the teacher and the student train on)."""
    planted = {p.index: p.true for p in load_manifest(folder / "shards").split("train").planted}
    rows = pd.read_csv(relabel, dtype={"key": str})
    names = load_manifest(folder / "shards").classes
    new = [names.index(v) if v in names else int(v) for v in rows["label"]]
    right = [planted.get(i) == y for i, y in zip(rows["index"], new, strict=True)]
    harm = [i not in planted for i in rows["index"]]
    inside = rows["index"] < subset
    return {"relabels": len(rows), "restored": sum(right), "broke": sum(harm),
            "relabels_in_subset": int(inside.sum()), "restored_in_subset": int((inside & pd.Series(right)).sum()),
            "broke_in_subset": int((inside & pd.Series(harm)).sum())}


def _corrected(base: Config, noisy: Config, out: Path, kind: str, how: str, n: int, *,
               train: bool = True, seeds: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """Audit the noisy run into a relabel file (``how``: top N, or the threshold's suspects) and (``train``) train
    on it; what the file fixed either way."""
    folder = out / f"{kind}-fix-{how}"
    relabel = out / f"{kind}-noisy" / f"relabel-{how}.csv"
    if not relabel.is_file():
        opts = {"threshold": 1.0, "relabel_top": n} if how == "top-n" else {"threshold": 0.05}
        audit.run(noisy, output=out / f"{kind}-noisy" / f"audit-{how}", sheet=0, relabel_out=str(relabel),
                  relabel_confidence=0.0, **opts)
    fixed = _fixed(out / f"{kind}-noisy", relabel, noisy.data.train_shards * noisy.data.shard_size)
    if not train:
        return {"noise": kind, "labels": f"corrected ({how})", **fixed}
    _link_shards(out / f"{kind}-noisy" / "shards", folder / "shards")
    cfg = _cfg(base, folder, [*NOISE[kind], "data.label_noise=0.1", f"data.relabel={relabel}"])
    return {"noise": kind, "labels": f"corrected ({how})", **train_run(cfg, seeds=seeds), **fixed}


KINDS = ("none", *NOISE)
"""The loop's arms by noise: ``none`` (the clean labels), then each noise kind (noisy, and corrected)."""


def loop(base: Config, out: Path, hows: tuple[str, ...] = ("top-n", "threshold"), *,
         kinds: tuple[str, ...] = KINDS, seeds: tuple[int, ...] = (0,)) -> pd.DataFrame:
    """The loop's arms for ``kinds`` (each kind's table: loop-<kind>.csv; the students of the relabel files in
    ``hows`` are trained, the others' files only written and scored), then loop.csv and loop-audit.csv from every
    kind done so far (so kinds may run in separate processes)."""
    for kind in kinds:
        if kind == "none":
            clean = _cfg(base, out / "clean", [])
            rows = [{"noise": "none", "labels": "clean", **train_run(clean, seeds=seeds)}]
        else:
            confusion = Path(str(_cfg(base, out / "clean", []).teacher.fit.output)).with_suffix(".json")
            extra = [*NOISE[kind], "data.label_noise=0.1"] + ([f"data.label_noise_confusion={confusion}"]
                                                              if kind == "confusable" else [])
            noisy = _cfg(base, out / f"{kind}-noisy", extra)
            rows = [{"noise": kind, "labels": "noisy", **train_run(noisy, seeds=seeds)}]
            scores = _scores(noisy)
            scores.insert(0, "noise", kind)
            scores.to_csv(out / f"{kind}-noisy" / "planted.csv", index=False)
            n = int(scores["planted"].iloc[0])
            base_k = overridden(base, extra[-1:]) if kind == "confusable" else base
            rows += [_corrected(base_k, noisy, out, kind, how, n, train=how in hows, seeds=seeds)
                     for how in ("top-n", "threshold")]
        pd.DataFrame(rows).to_csv(out / f"loop-{kind}.csv", index=False)
        print(pd.DataFrame(rows).to_string(), flush=True)
    done = [k for k in KINDS if (out / f"loop-{k}.csv").is_file()]
    df = pd.concat([pd.read_csv(out / f"loop-{k}.csv") for k in done], ignore_index=True)
    df.to_csv(out / "loop.csv", index=False)
    audits = [out / f"{k}-noisy" / "planted.csv" for k in done if k != "none"]
    if audits:
        pd.concat([pd.read_csv(f) for f in audits]).to_csv(out / "loop-audit.csv", index=False)
    return df


def rank(noisy_base: Config, out: Path, confusion: Path, kind: str) -> pd.DataFrame:
    """The demo-noisy recipe (2 % flips) with one noise kind: teacher-fit, teacher, and the rankings' scores; the
    table of every kind done so far (rank.csv)."""
    tables = [pd.read_csv(f) for f in sorted(out.glob("rank-*/planted.csv")) if f.parent.name != f"rank-{kind}"]
    extra = NOISE[kind] + ([f"data.label_noise_confusion={confusion}"] if kind == "confusable" else [])
    cfg = _cfg(noisy_base, out / f"rank-{kind}", extra)
    train_run(cfg, with_student=False)
    scores = _scores(cfg)
    scores.insert(0, "noise", kind)
    scores.to_csv(out / f"rank-{kind}" / "planted.csv", index=False)
    tables.append(scores)
    df = pd.concat(tables, ignore_index=True)
    df.to_csv(out / "rank.csv", index=False)
    return df


def rescore(out: Path) -> pd.DataFrame:
    """Every finished noisy run's scores again, under every ranking this environment has (a ranking added after the
    runs needs no retraining): each run's planted.csv, and rank.csv and loop-audit.csv rebuilt from them."""
    tables = {}
    for folder in sorted([*out.glob("*-noisy"), *out.glob("rank-*")]):
        if (folder / "logits.zarr").is_dir():
            try:
                scores = planted_scores_of(folder / "logits.zarr", folder / "shards")
            except store.MissingUnit:  # its teacher has not finished
                continue
            scores.insert(0, "noise", folder.name.removeprefix("rank-").removesuffix("-noisy"))
            scores.to_csv(folder / "planted.csv", index=False)
            tables[folder.name] = scores
    for name, prefix in (("rank.csv", "rank-"), ("loop-audit.csv", "")):
        mine = [t for k, t in tables.items() if k.startswith("rank-") == bool(prefix)]
        if mine:
            pd.concat(mine, ignore_index=True).to_csv(out / name, index=False)
    return pd.concat(tables.values(), ignore_index=True) if tables else pd.DataFrame()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["loop", "rank-confusable", "rank-uniform", "rescore"], nargs="+",
                    help="in this order (the clean run comes first); rescore: only score the finished runs again")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "label-loop")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine)")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                    help="loop: the arms to run (none: the clean labels); separate processes may run different kinds")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0],
                    help="loop: a student per seed (student.seed) on each arm's teacher and store")
    ap.add_argument("--top-n-only", action="store_true",
                    help="loop: train only on the top-N relabel file (the threshold's is then only written and scored)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.what == ["rescore"]:
        print(rescore(args.out).to_string())
        return
    base = overridden(load_config(ROOT / "configs" / "demo.yaml"), LOOP)
    clean = _cfg(base, args.out / "clean", [])
    ingest.run(clean, progress=False)
    teacher_fit.run(clean, progress=False)  # its val confusion drives the confusable noise
    confusion = Path(str(clean.teacher.fit.output)).with_suffix(".json")
    for what in args.what:
        if what == "rescore":
            print(rescore(args.out).to_string())
        elif what == "loop":
            hows = ("top-n",) if args.top_n_only else ("top-n", "threshold")
            print(loop(base, args.out, hows, kinds=tuple(args.kinds), seeds=tuple(args.seeds)).to_string())
        else:
            noisy = load_config(ROOT / "configs" / "demo-noisy.yaml")
            print(rank(noisy, args.out, confusion, what.removeprefix("rank-")).to_string())


if __name__ == "__main__":
    main()
