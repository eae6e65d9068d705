"""The one script a lent GPU runs (made for one H200; well under 10 minutes), printing a table and writing JSON.

At the paper's shape (224 px, configs/imagenet.yaml's recipe, 1,000 classes, random weights: speed does not
depend on them), on generated ImageNet-like JPEGs:

  a  teacher   the teacher stage (``distill teacher``: replay, RegNetY-16GF forward in bf16 and channels_last, the
               store) in images/s of its training views (the stage's own figure; E = workers / 2 stored epochs of
               2 units each, so every DataLoader worker replays one unit), against a bare forward of the teacher
               on the views of one epoch cached on the device
  b  students  training images/s of DeiT-Ti and DeiT-S at 224 px (the student stage's step, bf16 autocast) on
               batches held on the device: no distillation, offline hard (stored top-k targets), online hard
               (RegNetY-16GF run inside the step, as the official code does)
  c  feed      images/s one CPU core makes of the student's input (replay, uint8 hand-over, store join, finished on
               the device), and so how many cores feed each measured student rate
  d  finishing the largest difference between a batch of training views finished on the CPU (one sample at a
               time) and on the device (batched), and the time of each: stored targets hold on either when 0

``--tiny`` runs the same code at toy sizes on whatever device there is (the CPU in a test). Without a GPU and
without ``--tiny`` it says so and measures nothing.

    python -m bench gpu --out runs/bench/gpu.json
    python -m bench gpu --tiny --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.bench_feed import textured_jpeg
from bench.common import at_least
from bench.data import ingest_with_random_teacher
from bench.steps import MODES, on, seconds, student_trainer, synthetic_batch, teacher_net
from pipeline.core.config import Config, load_config
from pipeline.data.shards import Manifest, load_manifest
from pipeline.train.distributed import resolve_device
from pipeline.train.models import load_teacher, teacher_forward
from pipeline.views.handover import Finisher
from pipeline.views.join import StoreJoin
from pipeline.views.loading import UnitDataset, make_loader, train_stream
from stages import teacher as teacher_stage

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Shape:
    """What is measured, and at which sizes."""

    img_size: int = 224
    teacher: str = "regnety_160"
    students: dict[str, dict[str, int]] = field(default_factory=lambda: {
        "deit_tiny_distilled_patch16_224": {}, "deit_small_distilled_patch16_224": {}})
    images: int = 2048
    classes: int = 1000
    teacher_batch: int = 256
    student_batch: int = 128
    steps: int = 20
    warmup: int = 5
    workers: int = max(1, min(16, os.cpu_count() or 1) - 2)

    @property
    def stored_epochs(self) -> int:
        """E: two train shards (of images / 2) an epoch, so that E = workers / 2 gives every worker one unit."""
        return max(1, self.workers // 2)


TINY = Shape(img_size=64, teacher="regnety_002", students={
    "deit_tiny_distilled_patch16_224": {"embed_dim": 32, "depth": 1, "num_heads": 2},
    "deit_small_distilled_patch16_224": {"embed_dim": 48, "depth": 1, "num_heads": 3}},
    images=32, classes=8, teacher_batch=8, student_batch=8, steps=2, warmup=1, workers=0)


def _jpeg(seed: int) -> bytes:
    return textured_jpeg(np.random.default_rng(seed))


def imagefolder(root: Path, shape: Shape) -> None:
    """Generated JPEGs (about 400 x 350 px, ~100 KB, textured), every class holding train images; 1/8 as many val."""
    val = max(shape.classes // 8, shape.images // 8)
    with Pool(min(os.cpu_count() or 1, 16)) as pool:
        data = pool.map(_jpeg, range(shape.images + val), chunksize=16)
    for i, blob in enumerate(data):
        split, j = ("train", i) if i < shape.images else ("val", i - shape.images)
        folder = root / split / f"c{j % shape.classes:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{j:06d}.jpg").write_bytes(blob)


def build(tmp: Path, shape: Shape) -> Config:
    """Shards of the generated images, configs/imagenet.yaml's recipe, a random teacher checkpoint."""
    imagefolder(tmp / "images", shape)
    raw = load_config(ROOT / "configs" / "imagenet.yaml").model_dump(mode="json")
    raw["data"].update(train_root=str(tmp / "images" / "train"), val_root=str(tmp / "images" / "val"),
                       shards=str(tmp / "shards"), shard_size=shape.images // 2)
    raw["aug"].update(img_size=shape.img_size, window=min(raw["aug"]["window"], max(2, shape.images // 16)))
    raw["teacher"].update(model=shape.teacher, pretrained=False, checkpoint=str(tmp / "teacher.pt"),
                          epochs=shape.stored_epochs,
                          batch_size=shape.teacher_batch, workers=shape.workers)
    raw["store"]["path"] = str(tmp / "logits.zarr")
    cfg = Config.model_validate(raw)
    ingest_with_random_teacher(cfg)
    return cfg


def stage_costs(cfg: Config, device: torch.device) -> tuple[dict[str, list[float]], float]:
    """Run the teacher stage; (its own images and seconds per split, the whole call's seconds). The costs are the
    dict the stage fills (its printed line rounds them to 0.1 s)."""
    inner, seen = teacher_stage._compute, []

    def compute(*args):
        seen.append(args[-1])  # the stage's costs: {split: [images, seconds]}
        return inner(*args)

    teacher_stage._compute = compute
    try:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            teacher_stage.run(cfg, progress=False, device=device.type)
        return (seen[0] if seen else {}), time.perf_counter() - t0
    finally:
        teacher_stage._compute = inner


def teacher_part(cfg: Config, manifest: Manifest, device: torch.device) -> dict[str, Any]:
    """(a): the stage's own train-view rate and a bare forward on the same views, cached on the device."""
    costs, call = stage_costs(cfg, device)
    rates = {split: n / s for split, (n, s) in costs.items()}
    model, _ = load_teacher(cfg.teacher, num_classes=manifest.num_classes, in_chans=3)
    model.to(device).eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    units = [(0, s) for s in range(len(manifest.ranges("train")))]
    ds = UnitDataset(manifest, cfg.aug, cfg.seed, units, batch_size=cfg.teacher.batch_size)
    views = [b.view for b in make_loader(ds, cfg.teacher.workers, device=device)]
    n = sum(len(v) for v in views)
    teacher_forward(model, views[0], device)  # warm-up (cuDNN picks its kernels)
    bare = min(seconds(lambda: [teacher_forward(model, v, device) for v in views], device) for _ in range(3))
    return {"stage_train_im_per_s": rates.get("train"), "stage_clean_im_per_s": rates.get("clean"),
            "stage_call_s": call, "bare_im_per_s": n / bare,
            "stage_over_bare": rates["train"] / (n / bare) if "train" in rates else None,
            "workers": cfg.teacher.workers, "batch": cfg.teacher.batch_size}


def student_part(shape: Shape, device: torch.device) -> dict[str, dict[str, float]]:
    """(b): training images/s of each student in each mode, on device-resident batches."""
    teacher = teacher_net(shape.teacher, shape.classes, device)
    batch = on(synthetic_batch(shape.student_batch, shape.img_size, shape.classes), device)
    out: dict[str, dict[str, float]] = {}
    for name, arch in shape.students.items():
        for mode in MODES:
            tr = student_trainer(name, mode, classes=shape.classes, img_size=shape.img_size, device=device,
                                 teacher=teacher if mode == "online" else None, **arch)
            seconds(lambda tr=tr: tr.train_step(batch), device, shape.warmup)
            s = seconds(lambda tr=tr: tr.train_step(batch), device, shape.steps)
            out.setdefault(name, {})[mode] = shape.steps * shape.student_batch / s
            del tr
    return out


def feed_part(cfg: Config, manifest: Manifest, device: torch.device, students: dict) -> dict[str, Any]:
    """(c): one core's rate of the student's input stream (no workers), and the cores each student rate needs."""
    ds, loader = train_stream(manifest, cfg.aug, cfg.seed, batch_size=min(64, manifest.count("train")),
                              view_epoch=lambda t: 0, rank=0, world=1, shuffle=256, workers=0,
                              join=StoreJoin(cfg.store.path), device=device)
    ds.set_epoch(0)
    threads, count = torch.get_num_threads(), []
    torch.set_num_threads(1)  # one core
    try:
        next(iter(loader))  # warm-up: first reads
        spent = seconds(lambda: count.extend(len(b) for b in loader), device)
    finally:
        torch.set_num_threads(threads)
    per_core = sum(count) / spent
    cores = {s: {m: rate / per_core for m, rate in modes.items()} for s, modes in students.items()}
    return {"im_per_s_per_core": per_core, "cores_per_gpu": cores}


def finishing_part(cfg: Config, manifest: Manifest, device: torch.device) -> dict[str, float]:
    """(d): a batch of raw training views finished on the CPU and on the device: largest difference, times."""
    ds = UnitDataset(manifest, cfg.aug, cfg.seed, [(0, 0)], batch_size=min(64, manifest.shards("train")[0].count))
    raw = next(iter(make_loader(ds, 0).loader))
    finish = Finisher(cfg.aug)
    on_cpu, batched = finish(raw, "cpu"), finish.batched(raw, device)
    return {"max_abs_diff": float((on_cpu - batched.cpu()).abs().max()), "batch": len(raw),
            "cpu_ms": 1000 * seconds(lambda: finish(raw, "cpu"), torch.device("cpu"), 3) / 3,
            "device_ms": 1000 * seconds(lambda: finish.batched(raw, device), device, 3) / 3}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy sizes (regnety_002, narrow students, 64 px, 32 images)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/gpu.json"), help="the JSON (default %(default)s)")
    ap.add_argument("--images", type=at_least(16), default=None, help="generated train images (default 2048)")
    ap.add_argument("--workers", type=at_least(0), default=None, help="the teacher stage's DataLoader workers "
                    "(default: the cores less 2, at most 14)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse(argv)
    device = resolve_device(args.device)
    if device.type != "cuda" and not args.tiny:
        print("bench gpu: no CUDA device here, nothing measured (`python -m bench gpu --tiny` runs the same code on "
              "the CPU at toy sizes)")
        return None
    shape = TINY if args.tiny else Shape()
    shape = Shape(**{**asdict(shape), **{k: v for k, v in (("images", args.images), ("workers", args.workers))
                                          if v is not None}})
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "cpu_cores": os.cpu_count(), "torch": torch.__version__,
                              "shape": {**asdict(shape), "stored_epochs": shape.stored_epochs}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        cfg = build(Path(tmp), shape)
        manifest = load_manifest(cfg.data.shards)
        result["data_s"] = time.perf_counter() - t0
        for part, fn in (("teacher", lambda: teacher_part(cfg, manifest, device)),
                         ("students", lambda: student_part(shape, device)),
                         ("feed", lambda: feed_part(cfg, manifest, device, result["students"])),
                         ("finishing", lambda: finishing_part(cfg, manifest, device))):
            t = time.perf_counter()
            result[part] = fn()
            result[f"{part}_s"] = time.perf_counter() - t
            print(f"bench gpu: {part} measured in {result[f'{part}_s']:.1f} s", flush=True)
    result["total_s"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result) + f"\n(JSON: {args.out})")
    return result


def table(r: dict[str, Any]) -> str:
    """The figures as a markdown table."""
    t, f, d, s = r["teacher"], r["feed"], r["finishing"], r["shape"]
    rows = [("teacher stage, train views", f"{t['stage_train_im_per_s']:,.0f} im/s ({t['workers']} workers, batch "
             f"{t['batch']}); clean pass {t['stage_clean_im_per_s']:,.0f} im/s"),
            (f"bare {s['teacher']} forward, cached views", f"{t['bare_im_per_s']:,.0f} im/s; stage / bare "
             f"{t['stage_over_bare']:.3f}")]
    for name, modes in r["students"].items():
        rows.append((f"{name}, batch {s['student_batch']}", ", ".join(f"{m} {v:,.0f}" for m, v in modes.items())
                     + f" im/s; offline / online {modes['offline'] / modes['online']:.2f}x"))
        rows.append((f"  cores to feed it ({f['im_per_s_per_core']:,.0f} im/s a core)", ", ".join(
            f"{m} {v:.1f}" for m, v in f["cores_per_gpu"][name].items())))
    rows.append((f"finishing a batch of {d['batch']}: CPU vs device", f"largest difference {d['max_abs_diff']:.3g}; "
                 f"{d['cpu_ms']:.1f} ms vs {d['device_ms']:.1f} ms"))
    head = f"| {r['device']}, {r['cpu_cores']} cores, torch {r['torch']} | figure |\n|---|---|\n"
    return head + "\n".join(f"| {a} | {b} |" for a, b in rows)


if __name__ == "__main__":
    main(sys.argv[1:])
