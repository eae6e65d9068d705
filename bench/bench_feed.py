"""The feed at 224 px: how many training images/s a CPU core makes, the student's way against timm's.

Generated JPEGs of ImageNet-like size and texture (about 400 x 350 px, ~100 KB, layered noise from coarse
to fine, not flat colour) are ingested to shards, with the recipe of ``configs/imagenet.yaml``
(RandomResizedCrop 0.08-1, flip, RandAugment m9, colour jitter 0.3, erasing 0.25, Mixup 0.8 / CutMix 1.0).
A logit store with synthetic targets for the stored epoch is written, so the student's stream joins real
units. In every round, alternating:

  a  student   the student's input stream as the trainer receives it: ``train_stream`` (workers replay the
               PIL part of each view and hand it over as uint8, the store join attaches the targets, the
               trainer's process finishes the batch: to float, normalise, erase, mix)
  b  timm      timm's own path on the same JPEG bytes: ``create_transform`` in a DataLoader, ``Mixup`` on the
               batch in the trainer's process (as DeiT trains), float32 views across the worker queue
  c  decode    decoding the JPEGs only (PIL, to RGB), nothing crosses the queue but a shape

each with 0 DataLoader workers (one core: torch runs one thread) and 2 (both cores of this machine). The
mixing window is cut to n / 16 so that each worker's span holds many windows, as on ImageNet (16,000
samples per worker at 8 ranks x 10 workers): a worker makes the views of the partners of a window its
span cuts, and with one window per worker that would double its work. Each
measurement times a second pass over the images after a first (workers started, buffers filled). Printed:
images/s and images/s per core (median over rounds), the ratio a/b per round, the bytes per sample that
cross the worker queue, the resident memory of the workers and what the shuffle buffer holds, and how many
cores feed 1,000 and 2,500 images/s at the one-core rate of a.

    .venv/bin/python -m bench feed
    .venv/bin/python -m bench feed --n 256 --rounds 2     # quicker
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from timm.data import Mixup, create_transform
from torch.utils.data import DataLoader, Dataset

import store
from bench.common import at_least, load_average
from pipeline.core.config import Config, load_config
from pipeline.data.shards import IMAGE_FIELDS, decode_sample, load_manifest, shard_samples
from pipeline.train.run_store import store_provenance, store_spec
from pipeline.views.join import StoreJoin
from pipeline.views.loading import train_stream
from pipeline.views.plan import epoch_plan
from stages import ingest

TARGET = 0.97
CLASSES = 8
BATCH = 64


def textured_jpeg(rng: np.random.Generator) -> bytes:
    """An ImageNet-sized JPEG with structure at every scale (smooth regions, edges, grain)."""
    w, h = int(rng.integers(350, 450)), int(rng.integers(300, 400))
    acc = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((3, 60), (8, 40), (24, 30), (64, 30), (160, 60)):
        small = rng.uniform(0, 255, (max(2, cells * h // w), cells, 3)).astype(np.uint8)
        acc += amp / 255 * np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
    acc = acc / acc.max() * 230 + rng.normal(0, 32, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def build(tmp: Path, n: int, shuffle: int) -> tuple[Config, float]:
    """Shards of ``n`` generated JPEGs (ImageFolder ingest), the imagenet recipe, a store of synthetic targets."""
    rng = np.random.default_rng(0)
    sizes = []
    for split, count in (("train", n), ("val", CLASSES)):
        for i in range(count):
            folder = tmp / "images" / split / f"class{i % CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            data = textured_jpeg(rng)
            sizes.append(len(data))
            (folder / f"{i:05d}.jpg").write_bytes(data)
    raw = load_config("configs/imagenet.yaml").model_dump(mode="json")
    raw["data"].update(train_root=str(tmp / "images" / "train"), val_root=str(tmp / "images" / "val"),
                       shards=str(tmp / "shards"), shard_size=n)
    raw["aug"]["window"] = min(raw["aug"]["window"], n // 16)  # many windows per worker, as at scale (see below)
    raw["teacher"].update(epochs=1, pretrained=False, checkpoint=None)
    raw["store"]["path"] = str(tmp / "logits.zarr")
    raw["student"]["shuffle"] = shuffle
    cfg = Config.model_validate(raw)
    ingest.run(cfg, progress=False)
    m = load_manifest(cfg.data.shards)
    group = store.create_store(cfg.store.path, store_spec(cfg, m), store_provenance(cfg, m, "synthetic"))
    for s, (a, b) in enumerate(m.ranges("train")):
        plan = epoch_plan(cfg.aug, cfg.seed, 0, s, a, b)
        labels = np.array([decode_sample(r)[1] for r in shard_samples(m, "train", s)])
        tl, tc, _, lse = store.topk_from_logits(rng.normal(size=(b - a, m.num_classes)).astype(np.float32), 10)
        store.write_train_unit(group, 0, s, topk_logits=tl, topk_classes=tc, logsumexp=lse, label=labels,
                               plan=(plan.partner, plan.kind, plan.lam))
    return cfg, float(np.mean(sizes))


class Jpegs(Dataset):
    """The shards' JPEG bytes, held in memory, through ``fn`` (timm's transform, or decode only)."""

    def __init__(self, items: list[tuple[bytes, int]], fn: Callable) -> None:
        self.items, self.fn = items, fn

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        data, label = self.items[i]
        return self.fn(Image.open(io.BytesIO(data)).convert("RGB")), label


def _shape(img: Image.Image) -> torch.Tensor:
    return torch.tensor(img.size)


def variants(cfg: Config, items: list[tuple[bytes, int]], workers: int) -> dict[str, Callable[[], tuple]]:
    """Each variant: a function that makes its loader and returns (iterate one pass, bytes per sample, loader)."""
    m, a = load_manifest(cfg.data.shards), cfg.aug
    num_classes = m.num_classes

    def student() -> tuple:
        ds, loader = train_stream(m, a, cfg.seed, batch_size=BATCH, view_epoch=lambda t: 0, rank=0, world=1,
                                  shuffle=cfg.student.shuffle, workers=workers, join=StoreJoin(cfg.store.path))
        state = {"epoch": 0}

        def one_pass() -> int:
            ds.set_epoch(state["epoch"])
            state["epoch"] += 1
            return sum(len(b.view) for b in loader)

        return one_pass, lambda: loader.bytes_per_sample, loader.loader

    def timm() -> tuple:
        transform = create_transform(a.img_size, is_training=True, scale=a.scale, ratio=a.ratio, hflip=a.hflip,
                                     color_jitter=a.color_jitter, auto_augment=a.auto_augment,
                                     interpolation=a.interpolation, mean=a.mean, std=a.std, re_prob=a.reprob,
                                     re_mode=a.remode, re_count=a.recount)
        mix = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mix_prob, switch_prob=a.switch_prob,
                    label_smoothing=a.smoothing, num_classes=num_classes)
        loader = _loader(Jpegs(items, transform), workers, drop_last=True)

        def one_pass() -> int:
            n = 0
            for x, y in loader:
                x, y = mix(x, y)
                n += len(x)
            return n

        return one_pass, lambda: 3 * a.img_size * a.img_size * 4, loader

    def decode() -> tuple:
        loader = _loader(Jpegs(items, _shape), workers)
        return (lambda: sum(len(x) for x, _ in loader)), lambda: 0, loader

    return {"a student": student, "b timm": timm, "c decode": decode}


def _loader(ds: Dataset, workers: int, drop_last: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=drop_last,
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))


def worker_rss() -> int:
    """Resident bytes of this process's children (the DataLoader workers)."""
    return sum(c.memory_info().rss for c in psutil.Process().children(recursive=True))


def measure(make: Callable[[], tuple]) -> tuple[float, int, int]:
    """(images/s of a second pass, bytes per sample across the queue, worker RSS)."""
    one_pass, per_sample, loader = make()
    one_pass()  # workers started, shuffle buffers filled
    t0 = time.perf_counter()
    n = one_pass()
    rate = n / (time.perf_counter() - t0)
    rss = worker_rss()
    del loader
    return rate, per_sample(), rss


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench feed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=at_least(BATCH * 2), default=512, help="generated train JPEGs (default 512)")
    ap.add_argument("--rounds", type=at_least(1), default=3, help="rounds, alternating the variants (default 3)")
    ap.add_argument("--shuffle", type=at_least(0), default=256, help="the student's shuffle buffer per worker")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        cfg, jpeg = build(Path(tmp), args.n, args.shuffle)
        m = load_manifest(cfg.data.shards)
        items = [(bytes(next(r[k] for k in IMAGE_FIELDS if k in r)), int(r["cls"]))
                 for r in shard_samples(m, "train", 0)]
        print(f"{args.n} JPEGs, mean {jpeg / 1000:.0f} KB; recipe configs/imagenet.yaml at {cfg.aug.img_size} px; "
              f"batch {BATCH}; {cores} cores; load {load_average()}")
        results: dict[tuple[str, int], list[tuple[float, int, int]]] = {}
        for r in range(args.rounds):
            order = [(name, w) for w in (0, 2) for name in ("a student", "b timm", "c decode")]
            for name, w in order if r % 2 == 0 else order[::-1]:
                results.setdefault((name, w), []).append(measure(variants(cfg, items, w)[name]))
        report(results, cores, cfg)


def report(results: dict, cores: int, cfg: Config) -> None:
    print(f"\n{'variant':10} {'workers':>7} {'im/s':>8} {'im/s/core':>10} {'B/sample':>10} {'worker RSS':>11}")
    per_core = {}
    for (name, w), rows in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        used = 1 if w == 0 else min(w + 1, cores)
        rate = statistics.median(x[0] for x in rows)
        per_core[(name, w)] = rate / used
        print(f"{name:10} {w:>7} {rate:>8.1f} {rate / used:>10.1f} {rows[0][1]:>10,} "
              f"{max(x[2] for x in rows) / 2**20:>9.0f} MB")
    for w in (0, 2):
        ratios = [s[0] / t[0] for s, t in zip(results[("a student", w)], results[("b timm", w)], strict=True)]
        print(f"a/b with {w} workers: median {statistics.median(ratios):.3f} (rounds: "
              f"{', '.join(f'{x:.3f}' for x in ratios)}; target >= {TARGET})")
    one = per_core[("a student", 0)]
    print(f"cores per GPU at {one:.0f} im/s per core (a, one core): {1000 / one:.1f} for 1,000 im/s, "
          f"{2500 / one:.1f} for 2,500 im/s")
    view = cfg.aug.channels * cfg.aug.img_size ** 2
    imagenet = load_config("configs/imagenet.yaml").student
    held = imagenet.workers * imagenet.shuffle
    print(f"shuffle buffer: uint8 base views, a sample and its partner sharing theirs: at most 2 x {view:,} B per "
          f"sample; configs/imagenet.yaml ({imagenet.workers} workers x {imagenet.shuffle}): at most "
          f"{2 * view * held / 1e9:.1f} GB per rank (float32 views: {4 * view * held / 1e9:.1f} GB)")


if __name__ == "__main__":
    main()
