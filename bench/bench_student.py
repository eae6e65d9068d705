"""Student stage throughput: does reading the teacher's targets from the logit store cost anything?

Builds a small dataset (Fashion-MNIST with train/val limits when present, else synthetic 28x28 IDX
images) and the demo recipe (DeiT-style augmentation with Mixup/CutMix, DeiT 6x128 patch 7 student,
ResNet-18 small-stem teacher). The teacher is randomly initialised and saved as a checkpoint
(throughput does not depend on its weights); the teacher stage runs once to fill the store. Then
``stages.student.run`` trains from scratch, in alternating order within each round, as:

  none      no distillation (the replayed views and true targets only)
  offline   hard distillation, targets joined from the logit store (the project's way)
  online    hard distillation, the teacher run inside every step (the official DeiT way)

Training images/s is the stage's own per-epoch figure (history.csv ``im_per_s``: the training loop
only, val evaluation excluded), averaged over a run's epochs; the table gives each round and the
median. Targets: offline / none >= 0.97 (the store join is nearly free); offline / online is the
speed-up over running the teacher in the step. A last measurement times the input stream alone (replay vs
replay + store join + target tensors, no model): the join's cost in microseconds per image, which the
shared machine's noise hardly touches. Ratios are also given per round (the three modes of a
round run back to back, so a change in the machine's load hits them alike).

    .venv/bin/python -m bench student
    .venv/bin/python -m bench student --n 2000 --stored-epochs 2 --epochs 3 --rounds 3
    .venv/bin/python -m bench student --threads 0          # torch's own thread count
    .venv/bin/python -m bench student --depth 2 --synthetic      # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from bench.common import add_machine_args, load_average, set_threads
from bench.data import ingest_with_random_teacher, source_root
from pipeline.core.config import Config, load_config
from pipeline.data.shards import load_manifest
from pipeline.train.losses import teacher_targets_from_store
from pipeline.views.join import StoreJoin
from pipeline.views.loading import train_stream
from pipeline.views.plan import stored_epoch
from stages import student as student_stage
from stages import teacher

TARGET = 0.97
MODES = (("none", "none", "offline"), ("offline", "hard", "offline"), ("online", "hard", "online"))


def build(tmp: Path, args: argparse.Namespace) -> Config:
    """Shards, a random teacher checkpoint and a full logit store for the demo recipe, cut to size."""
    root, source = source_root(tmp, args.n, args.val, args.synthetic)
    raw = load_config(None).model_dump(mode="json")
    raw["data"].update(root=str(root), shards=str(tmp / "shards"), shard_size=args.shard_size,
                       train_limit=args.n, val_limit=args.val, train_shards=None)  # cut by --n instead
    raw["teacher"].update(model=args.teacher, small_stem=True, epochs=args.stored_epochs, topk=args.topk,
                          checkpoint=str(tmp / "teacher.pt"))
    raw["store"]["path"] = str(tmp / "logits.zarr")
    raw["student"].update(depth=args.depth, epochs=args.epochs, batch_size=args.batch_size, workers=args.workers,
                          warmup_epochs=0, eval_every=10**6, output=str(tmp / "runs" / "unused"))
    raw["evaluate"]["batch_size"] = 256
    cfg = Config.model_validate(raw)
    m = ingest_with_random_teacher(cfg)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        teacher.run(cfg, progress=False, device="cpu")
    sc = cfg.student
    print(f"data: {source}, {m.count('train')} train + {m.count('val')} val images, shards of {args.shard_size}; "
          f"store: {args.teacher} small-stem (random init), E={args.stored_epochs}, K={args.topk}, filled in "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"student: DeiT {sc.depth}x{sc.embed_dim} patch {sc.patch_size}, batch {sc.batch_size}, "
          f"{sc.epochs} epoch(s) a run, workers {sc.workers}, torch threads {torch.get_num_threads()}")
    return cfg


def train_rate(cfg: Config, out: Path, kind: str, mode: str) -> float:
    """Mean of the run's per-epoch training images/s (history.csv, evaluation excluded)."""
    student = cfg.student.model_copy(update={"distillation": kind, "output": str(out)})
    run_cfg = cfg.model_copy(update={"student": student})
    with contextlib.redirect_stdout(io.StringIO()):
        student_stage.run(run_cfg, progress=False, device="cpu", teacher_mode=mode)
    with open(out / "history.csv", newline="") as f:
        rates = [float(r["im_per_s"]) for r in csv.DictReader(f)]
    assert len(rates) == cfg.student.epochs, rates
    return float(np.mean(rates))


def loader_us_per_image(cfg: Config, offline: bool) -> float:
    """One epoch of the student's input stream alone (no model): replay, plus the store join when offline."""
    m = load_manifest(cfg.data.shards)
    sc = cfg.student
    ds, loader = train_stream(m, cfg.aug, cfg.seed, batch_size=sc.batch_size, rank=0, world=1, shuffle=sc.shuffle,
                              workers=sc.workers, view_epoch=partial(stored_epoch, stored_epochs=cfg.teacher.epochs),
                              join=StoreJoin(cfg.store.path) if offline else None)
    ds.set_epoch(0)
    n, t0 = 0, time.perf_counter()
    for b in loader:
        if offline:
            s = b.stored
            teacher_targets_from_store(s.logits, s.classes, s.logsumexp, s.hard, m.num_classes, sc.tau, False)
        n += len(b.view)
    return (time.perf_counter() - t0) / n * 1e6


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024, help="train images (default 1024)")
    ap.add_argument("--val", type=int, default=128, help="val images (default 128)")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1, help="student epochs a run (default 1)")
    ap.add_argument("--stored-epochs", type=int, default=1, help="E, epochs in the store (default 1)")
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--depth", type=int, default=6, help="student depth (default 6, as configs/demo.yaml)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0, help="student DataLoader workers (default 0)")
    ap.add_argument("--teacher", default="resnet18")
    add_machine_args(ap)
    args = ap.parse_args(argv)
    set_threads(args.threads)

    print(f"load average before: {load_average()}")
    rates: dict[str, list[float]] = {name: [] for name, _, _ in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-student-") as tmp:
        cfg = build(Path(tmp), args)
        for r in range(args.rounds):
            order = MODES if r % 2 == 0 else MODES[::-1]  # alternate, so drift in load hits every mode alike
            for name, kind, mode in order:
                rates[name].append(train_rate(cfg, Path(tmp) / "runs" / f"{name}-{r}", kind, mode))
        # The store's own cost, without the model's noise: the input stream alone, alternated.
        stream = {"none": [], "offline": []}
        for r in range(args.rounds):
            for name in ("none", "offline") if r % 2 == 0 else ("offline", "none"):
                stream[name].append(loader_us_per_image(cfg, name == "offline"))
    print(f"load average after: {load_average()}")

    med = {k: statistics.median(v) for k, v in rates.items()}
    w = max(len(k) for k in rates)
    rounds = "  ".join(f"round {r + 1:>2}" for r in range(args.rounds))
    print(f"\n{'mode':<{w}}  {rounds}    median  (train im/s)")
    for k, v in rates.items():
        print(f"{k:<{w}}  " + "  ".join(f"{x:8.1f}" for x in v) + f"  {med[k]:8.1f}")
    ratio, speed = med["offline"] / med["none"], med["offline"] / med["online"]
    rr = [o / n for o, n in zip(rates["offline"], rates["none"], strict=True)]
    rs = [o / n for o, n in zip(rates["offline"], rates["online"], strict=True)]
    print(f"\noffline / none   = {ratio:.3f} (per round {', '.join(f'{x:.3f}' for x in rr)}, median "
          f"{statistics.median(rr):.3f}; target >= {TARGET}: {'met' if ratio >= TARGET else 'NOT met'})")
    print(f"offline / online = {speed:.2f}x (per round {', '.join(f'{x:.2f}' for x in rs)}, median "
          f"{statistics.median(rs):.2f}x; the speed-up from not running the teacher in the step)")
    sn, so = statistics.median(stream["none"]), statistics.median(stream["offline"])
    step_us = 1e6 / med["none"]
    print(f"input stream alone: {sn:.0f} us/image replay, {so:.0f} us/image replay + store join; the join adds "
          f"{so - sn:.0f} us/image = {(so - sn) / step_us:.1%} of a training step without distillation "
          f"({step_us:.0f} us/image), i.e. offline / none ~ {step_us / (step_us + so - sn):.3f} on a quiet machine")

if __name__ == "__main__":
    main(sys.argv[1:])
