"""Teacher stage throughput: does writing the logit store slow the teacher down?

Builds a small dataset (Fashion-MNIST with train/val limits when present, else synthetic 28x28 IDX
images), a randomly initialised teacher saved as a checkpoint (throughput does not depend on the
weights) and the demo augmentation recipe, then measures on the very same replayed units, in
alternating order within each round:

  replay        iterate the DataLoader over the teacher's datasets only (augmentation, mixing); views kept in memory
  bare          teacher_forward over those in-memory batches only (pure inference)
  loader+fwd    the stage's loop without the store: DataLoader -> teacher_forward, logits dropped
  store only    the stage's collector (top-k + Zarr writes) fed with the cached logits
  stage         stages.teacher.run into a fresh store (its own loop rate, and the whole call)

The target (stage / loader+fwd >= 0.90) isolates the store's cost; stage / bare also pays for the
augmentation, which bare inference does not, and is printed for honesty, not judged.

    .venv/bin/python -m bench teacher
    .venv/bin/python -m bench teacher --n 2000 --epochs 2 --rounds 3 --workers 0 1
    .venv/bin/python -m bench teacher --no-small-stem       # a fast teacher: store cost is relatively larger
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import store
from bench.common import add_machine_args, at_least, load_average, set_threads
from bench.data import ingest_with_random_teacher, source_root
from pipeline.core.config import Config, load_config
from pipeline.data.shards import load_manifest
from pipeline.train.models import load_teacher
from pipeline.train.run_store import store_spec
from pipeline.views.loading import EvalDataset, UnitDataset, make_loader, val_dataset
from stages import teacher
from stages.teacher_units import Collector

TARGET = 0.90


def build(tmp: Path, args: argparse.Namespace) -> Config:
    root, source = source_root(tmp, args.n, args.val, args.synthetic)
    aug = load_config(None).aug.model_dump(mode="json")  # the demo's DeiT recipe at 28 px
    raw = {
        "seed": 0,
        "data": {"source": "idx", "root": str(root), "shards": str(tmp / "shards"),
                 "shard_size": args.shard_size, "train_limit": args.n, "val_limit": args.val},
        "aug": aug,
        "teacher": {"model": args.model, "small_stem": args.small_stem, "epochs": args.epochs, "topk": args.topk,
                    "batch_size": args.batch_size, "checkpoint": str(tmp / "teacher.pt")},
        "store": {"path": str(tmp / "unused.zarr")},
    }
    cfg = Config.model_validate(raw)
    m = ingest_with_random_teacher(cfg)
    print(f"data: {source}, {m.count('train')} train + {m.count('val')} val images, shards of {args.shard_size}; "
          f"teacher {args.model}{' small-stem' if args.small_stem else ''} (random init), E={args.epochs}, "
          f"K={args.topk}, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    return cfg


def datasets(cfg: Config) -> list[tuple[str, UnitDataset | EvalDataset]]:
    """The stage's work on a fresh store: every (epoch, shard) train unit, then every val shard."""
    m = load_manifest(cfg.data.shards)
    n_tr = len(m.ranges("train"))
    train = [(e, s) for e in range(cfg.teacher.epochs) for s in range(n_tr)]
    bs = cfg.teacher.batch_size
    return [
        ("train", UnitDataset(m, cfg.aug, cfg.seed, train, batch_size=bs)),
        ("val", val_dataset(m, cfg.aug, bs)),
    ]


class Bench:
    def __init__(self, cfg: Config, tmp: Path) -> None:
        self.cfg, self.tmp = cfg, tmp
        self.manifest = load_manifest(cfg.data.shards)
        self.model, _ = load_teacher(cfg.teacher, num_classes=self.manifest.num_classes, in_chans=cfg.aug.channels)
        self.model.eval()
        self.device = torch.device("cpu")
        self.bs = cfg.teacher.batch_size
        self.cache: list[tuple[str, list]] | None = None
        self.logits: list[list[np.ndarray]] | None = None
        self.n = self.manifest.count("train") * cfg.teacher.epochs + self.manifest.count("val")
        self.count = 0

    def replay(self, workers: int) -> float:
        t0 = time.perf_counter()
        cache = []
        for split, ds in datasets(self.cfg):
            cache.append((split, list(make_loader(ds, workers))))
        dt = time.perf_counter() - t0
        self.cache = cache
        assert sum(len(b.index) for _, bs in cache for b in bs) == self.n
        return dt

    def bare(self) -> float:
        assert self.cache is not None
        t0 = time.perf_counter()
        fwd = teacher.teacher_forward
        logits = [[fwd(self.model, b.view, self.device).numpy() for b in bs] for _, bs in self.cache]
        dt = time.perf_counter() - t0
        self.logits = logits
        return dt

    def loader_forward(self, workers: int) -> float:
        t0 = time.perf_counter()
        n = 0
        for _, ds in datasets(self.cfg):
            for b in make_loader(ds, workers):
                teacher.teacher_forward(self.model, b.view, self.device)
                n += len(b.index)
        dt = time.perf_counter() - t0
        assert n == self.n
        return dt

    def _fresh(self, name: str) -> Path:
        self.count += 1
        return self.tmp / f"{name}-{self.count}.zarr"

    def store_only(self) -> float:
        """The stage's own collector (top-k, scatter into unit buffers, Zarr writes) on cached logits."""
        assert self.cache is not None and self.logits is not None
        spec = store_spec(self.cfg, self.manifest)
        prov = {"teacher": "bench", "seed": self.cfg.seed}
        path = self._fresh("store")
        t0 = time.perf_counter()
        group = store.create_store(path, spec, prov)
        claims = store.Claims(store.objects_of(group))  # the collector lets go of each unit's claim
        for (split, batches), logits in zip(self.cache, self.logits, strict=True):
            col = Collector(group, self.manifest, split, spec.k, claims, str(path))
            for b, lg in zip(batches, logits, strict=True):
                col.add(b.epoch.numpy(), b.index.numpy(), lg, b)
            col.check_complete()
        store.finalize(path)
        dt = time.perf_counter() - t0
        assert store.done_mask(group).all() and store.val_done_mask(group).all()
        return dt

    def stage(self, workers: int) -> tuple[float, float]:
        """(whole run() call seconds, seconds computing its units: replay + forward + store, per claimed wave)."""
        path = self._fresh("stage")
        cfg = self.cfg.model_copy(update={"store": self.cfg.store.model_copy(update={"path": path})})
        inner = teacher._compute
        loop = [0.0]

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                loop[0] += time.perf_counter() - t

        out = io.StringIO()
        teacher._compute = timed
        try:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(out):
                teacher.run(cfg, workers=workers, progress=False, device="cpu")
            dt = time.perf_counter() - t0
        finally:
            teacher._compute = inner
        g = store.open_store(path)  # every unit written
        assert store.done_mask(g).all() and store.val_done_mask(g).all()
        return dt, loop[0]


def run_variant(b: Bench, workers: int, rounds: int) -> dict[str, float]:
    names = ["replay", "bare", "loader+fwd", "store only", "stage", "stage loop"]
    times: dict[str, list[float]] = {k: [] for k in names}
    ratios: dict[str, list[float]] = {"stage/bare": [], "stage/(replay+bare)": [], "stage/(loader+fwd)": [],
                                      "stage call/(loader+fwd)": [], "1 - store only/stage loop": []}
    steps = ["replay_bare", "loader", "stage"]
    for r in range(rounds):
        order = steps if r % 2 == 0 else steps[::-1]
        t: dict[str, float] = {}
        for step in order:
            if step == "replay_bare":
                t["replay"] = b.replay(workers)
                t["bare"] = b.bare()
                t["store only"] = b.store_only()
            elif step == "loader":
                t["loader+fwd"] = b.loader_forward(workers)
            else:
                t["stage"], t["stage loop"] = b.stage(workers)
        for k in names:
            times[k].append(t[k])
        # throughput ratios = inverse time ratios, same images in every measurement
        ratios["stage/bare"].append(t["bare"] / t["stage loop"])
        ratios["stage/(replay+bare)"].append((t["replay"] + t["bare"]) / t["stage loop"])
        ratios["stage/(loader+fwd)"].append(t["loader+fwd"] / t["stage loop"])
        ratios["stage call/(loader+fwd)"].append(t["loader+fwd"] / t["stage"])
        ratios["1 - store only/stage loop"].append(1 - t["store only"] / t["stage loop"])
        print(f"  round {r + 1} ({' -> '.join(order)}): "
              + ", ".join(f"{k} {b.n / t[k]:,.0f}" for k in names) + " im/s", flush=True)
    print(f"workers={workers}: {b.n} images per measurement, median of {rounds} round(s)")
    for k in names:
        med = statistics.median(times[k])
        print(f"  {k:<12} {b.n / med:>8,.0f} im/s   ({med:.2f} s)")
    out = {}
    for k, v in ratios.items():
        med = statistics.median(v)
        out[k] = med
        note = ""
        if k == "stage/(loader+fwd)":
            note = f"   target >= {TARGET:.2f}: {'PASS' if med >= TARGET else 'FAIL'}  <- isolates the store"
        elif k == "stage/bare":
            note = "   (includes augmentation, which bare inference does not do)"
        elif k == "1 - store only/stage loop":
            note = "   (the store's share measured alone: collector + Zarr writes; robust to load)"
        elif k == "stage call/(loader+fwd)":
            note = "   (whole run(): + model load, checkpoint hash, store create/finalize)"
        print(f"  {k:<24} {med:.3f}  [{', '.join(f'{x:.3f}' for x in v)}]{note}")
    best = min(times["loader+fwd"]) / min(times["stage loop"])
    print(f"  stage/(loader+fwd) best-of-rounds {best:.3f}   (fastest stage loop vs fastest loader+fwd; "
          "other processes only ever slow a measurement down)")
    out["best stage/(loader+fwd)"] = best
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="train images (default 256)")
    ap.add_argument("--val", type=int, default=64, help="val images (default 64)")
    ap.add_argument("--epochs", type=int, default=1, help="E, stored epochs (default 1)")
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--workers", type=at_least(0), nargs="+", default=[0, 1])
    add_machine_args(ap)
    args = ap.parse_args(argv)

    set_threads(args.threads)
    print(f"load average before: {load_average()} (other processes make single rounds noisy; compare the "
          "per-round ratios)")
    with tempfile.TemporaryDirectory(prefix="bench-teacher-") as tmp:
        cfg = build(Path(tmp), args)
        b = Bench(cfg, Path(tmp))
        b.replay(0)  # warm-up: imports, first-call allocations, page cache
        b.bare()
        results = {w: run_variant(b, w, args.rounds) for w in args.workers}
    print(f"load average after: {load_average()}")
    print("summary: " + "; ".join(
        f"workers={w}: stage/(loader+fwd) {r['stage/(loader+fwd)']:.3f}, stage/bare {r['stage/bare']:.3f}, "
        f"1 - store/stage {r['1 - store only/stage loop']:.3f}"
        for w, r in results.items()
    ))


if __name__ == "__main__":
    main()  # python -m bench.bench_teacher [--option ...] also works
