"""What the integrity checks cost: the store reader's rows/s, and the stages' images/s with the shard checks.

1. Store reader. The same synthetic targets (C classes, top-K, E epochs, shards of 1000) are written
   twice: as this project's store (a CRC32C per chunk, a done record with per-array digests, every unit
   checked on read) and as the previous format (the same zarr arrays, zstd only, nothing checked). The
   readers alternate over rounds, reading every unit: the store's (checked), the previous one (one
   synchronous read per array; target: checked / previous >= 0.95), and the store's concurrent fetch
   with nothing checked (the checks' own cost).
2. Shards. Every sample's bytes are checked against the CRC32C ingest wrote before it is decoded. The
   teacher stage (a fresh store each time) and the student stage (hard distillation, one epoch) run on
   the demo recipe with the check on and off, alternating; target: on / off >= 0.98 for both. The input
   stream alone (no model) gives the check's cost in microseconds per image, beyond the machine's noise.
3. verify's tolerance. The demo's fitted teacher (``data/teacher.pt`` after ``make demo``; a random one
   otherwise, whose logits are tiny) on 512 stored-recipe views: how far float16 storage, an fp16 and a
   bf16 autocast teacher move a logit from the float32 one.

    .venv/bin/python -m bench integrity
    .venv/bin/python -m bench integrity --rounds 3 --n 1024      # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

import pipeline.data.shards as shards_module
import store
from bench.common import add_machine_args, at_least, load_average, set_threads
from bench.data import ingest_with_random_teacher, source_root
from pipeline.core.config import Config, load_config
from pipeline.data.shard_index import read_samples
from pipeline.data.shards import load_manifest
from pipeline.views.loading import UnitDataset, make_loader
from stages import student, teacher

READER_TARGET, SHARD_TARGET = 0.95, 0.98


PREVIOUS = {  # the store before the checks (format 1): every array chunked per unit, zstd, nothing recorded
    "topk_logits": "f2", "topk_classes": "u2", "hard_label": "u2", "logsumexp": "f4", "partner": "i4", "lam": "f4",
    "kind": "u1",
}


def synth_targets(rng: np.random.Generator, n: int, c: int, k: int, e: int) -> list[dict[str, np.ndarray]]:
    out, labels = [], rng.integers(0, c, n)  # a sample's label is the same in every stored epoch
    for _ in range(e):
        logits = (rng.normal(size=(n, c)) * 3).astype(np.float32)
        tl, tc, hl, lse = store.topk_from_logits(logits, k)
        out.append({"topk_logits": tl, "topk_classes": tc, "hard_label": hl, "logsumexp": lse,
                    "partner": (np.arange(n) // 8 * 8 + (np.arange(n) + 1) % 8) % n,
                    "lam": rng.random(n).astype(np.float32), "kind": rng.integers(0, 3, n).astype(np.uint8),
                    "label": labels})
    return out


def write_both(tmp: Path, c: int, k: int, data: list[dict[str, np.ndarray]], shard: int) -> tuple:
    """This project's store (packed once complete) and the previous format holding the same targets."""
    n = len(data[0]["label"])
    ranges = tuple((a, min(a + shard, n)) for a in range(0, n, shard))
    spec = store.StoreSpec(num_classes=c, epochs=len(data), topk=k, train_ranges=ranges, val_ranges=())
    checked = store.create_store(tmp / f"checked-{c}.zarr", spec, {"teacher": "synthetic"})
    plain = zarr.open_group(tmp / f"plain-{c}.zarr", mode="w")
    for name, dtype in PREVIOUS.items():
        shape, chunks = ((len(data), n, k), (1, shard, k)) if name.startswith("topk") else ((len(data), n), (1, shard))
        plain.create_array(f"train/{name}", shape=shape, chunks=chunks, dtype=dtype, compressors=[ZstdCodec(level=3)])
    plain.create_array("train/label", shape=(n,), chunks=(shard,), dtype="u2", compressors=[ZstdCodec(level=3)])
    for e, d in enumerate(data):
        for s, (a, b) in enumerate(ranges):
            unit = {name: v[a:b] for name, v in d.items()}
            store.write_train_unit(checked, e, s, topk_logits=unit["topk_logits"], topk_classes=unit["topk_classes"],
                                   logsumexp=unit["logsumexp"], label=unit["label"],
                                   plan=(unit["partner"], unit["kind"], unit["lam"]))
            for name in PREVIOUS:
                plain[f"train/{name}"][e, a:b] = unit[name].astype(PREVIOUS[name])
            plain["train/label"][a:b] = unit["label"]
        store.pack_epoch(checked, e)
    zarr.consolidate_metadata(tmp / f"plain-{c}.zarr")  # as the checked store: array lookups from memory
    return store.open_store(tmp / f"checked-{c}.zarr"), zarr.open_group(tmp / f"plain-{c}.zarr", mode="r"), spec


def read_all(group, spec, how: str) -> int:
    """Read every unit: ``checked`` (the store's reader), ``concurrent`` (the previous format's arrays fetched
    as the store's reader fetches, nothing checked) or ``previous`` (the reader before the checks: one
    synchronous read per array)."""
    rows = 0
    for e in range(spec.epochs):
        for s, (a, b) in enumerate(spec.train_ranges):
            if how == "checked":
                store.read_train_unit(group, e, s)
            elif how == "concurrent":
                reads = {n: (f"train/{n}", (e, slice(a, b))) for n in PREVIOUS}
                store.reader._read(group, {**reads, "label": ("train/label", slice(a, b))}, "")
            else:
                for name in PREVIOUS:
                    group[f"train/{name}"][e, a:b]
                group["train/label"][a:b]
            rows += b - a
    return rows


def alternate(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each variant's rate per round, in alternating order (drift in the machine's load hits all alike)."""
    out: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(variants[name]())
    return out


def rate(fn: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def report(title: str, rates: dict[str, list[float]], unit: str, target: float) -> None:
    (a, ra), (b, rb) = rates.items()
    per_round = [x / y for x, y in zip(ra, rb, strict=True)]
    ratio = statistics.median(per_round)
    print(f"{title}: {a} {statistics.median(ra):,.0f} {unit}, {b} {statistics.median(rb):,.0f} {unit}; "
          f"{a} / {b} = {ratio:.3f} (per round {', '.join(f'{x:.3f}' for x in per_round)}; "
          f"target >= {target}: {'met' if ratio >= target else 'NOT met'})")


def reader_bench(tmp: Path, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    for c in args.classes:
        checked, plain, spec = write_both(tmp, c, 10, synth_targets(rng, args.rows, c, 10, 2), 1000)
        rates = alternate({how: lambda g=(checked if how == "checked" else plain), s=spec, h=how:
                           rate(lambda: read_all(g, s, h)) for how in ("checked", "previous", "concurrent")},
                          args.rounds * 3)
        report(f"store reader, C={c} K=10", {k: rates[k] for k in ("checked", "previous")}, "rows/s", READER_TARGET)
        own = statistics.median(x / y for x, y in zip(rates["checked"], rates["concurrent"], strict=True))
        print(f"  the checks' own cost: checked / the same concurrent reads unchecked = {own:.3f}")


@contextlib.contextmanager
def shard_check(on: bool):
    """The stages with the per-sample shard check on (as always) or off (for this measurement only)."""
    real = shards_module.read_samples
    if not on:
        shards_module.read_samples = functools.partial(read_samples, check=False)
    try:
        yield
    finally:
        shards_module.read_samples = real


def demo_config(tmp: Path, args: argparse.Namespace) -> Config:
    root, source = source_root(tmp, args.n, 256, args.synthetic)
    raw = load_config(None).model_dump(mode="json")
    raw["data"].update(root=str(root), shards=str(tmp / "shards"), shard_size=256, train_limit=args.n,
                       val_limit=256, train_shards=None)
    raw["teacher"].update(small_stem=True, epochs=1, checkpoint=str(tmp / "teacher.pt"))
    raw["store"]["path"] = str(tmp / "logits.zarr")
    raw["student"].update(epochs=1, eval_every=10**6, warmup_epochs=0, output=str(tmp / "student"))
    cfg = Config.model_validate(raw)
    ingest_with_random_teacher(cfg)
    print(f"data: {source}, {args.n} train images; the demo recipe (28 px, DeiT 6x128 student, ResNet-18 teacher)")
    return cfg


def teacher_rate(cfg: Config, tmp: Path, on: bool, count: list[int]) -> float:
    count[0] += 1
    path = tmp / f"teacher-{count[0]}.zarr"
    with shard_check(on), contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        teacher.run(cfg.model_copy(update={"store": cfg.store.model_copy(update={"path": path})}), progress=False,
                    device="cpu")
    m = load_manifest(cfg.data.shards)
    return (m.count("train") + m.count("val")) / (time.perf_counter() - t0)


def student_rate(cfg: Config, on: bool) -> float:
    sc = cfg.student.model_copy(update={"distillation": "hard"})
    with shard_check(on), contextlib.redirect_stdout(io.StringIO()):
        student.run(cfg.model_copy(update={"student": sc}), progress=False, device="cpu", restart=True)
    import csv

    with open(Path(sc.output) / "history.csv", newline="") as f:
        return float(next(csv.DictReader(f))["im_per_s"])


def stream_rate(cfg: Config, on: bool) -> float:
    m = load_manifest(cfg.data.shards)
    ds = UnitDataset(m, cfg.aug, cfg.seed, [(0, s) for s in range(len(m.shards("train")))], batch_size=128)
    with shard_check(on):
        return rate(lambda: sum(len(b.view) for b in make_loader(ds, 0)))


def shard_bench(tmp: Path, args: argparse.Namespace) -> None:
    cfg = demo_config(tmp, args)
    with contextlib.redirect_stdout(io.StringIO()):
        teacher.run(cfg, progress=False, device="cpu")  # the store the student reads
    count = [0]
    report("teacher stage", alternate({"checked": lambda: teacher_rate(cfg, tmp, True, count),
                                       "unchecked": lambda: teacher_rate(cfg, tmp, False, count)}, args.rounds),
           "im/s", SHARD_TARGET)
    report("student stage (train im/s)", alternate({"checked": lambda: student_rate(cfg, True),
                                                    "unchecked": lambda: student_rate(cfg, False)}, args.rounds),
           "im/s", SHARD_TARGET)
    stream = alternate({"checked": lambda: stream_rate(cfg, True), "unchecked": lambda: stream_rate(cfg, False)},
                       args.rounds * 2)
    on, off = (statistics.median(v) for v in stream.values())
    print(f"input stream alone (replayed views, no model): {on:,.0f} vs {off:,.0f} views/s: the check costs "
          f"{1e6 / on - 1e6 / off:.1f} us per image")


def tolerance_bench(tmp: Path, args: argparse.Namespace) -> None:
    import torch

    from pipeline.train.models import load_teacher

    cfg = load_config(None)
    fitted = Path(cfg.teacher.fit.output)
    if fitted.is_file() and (Path(cfg.data.shards) / "manifest.json").is_file():
        cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"checkpoint": fitted})})
        m, what = load_manifest(cfg.data.shards), f"the demo's fitted teacher ({fitted})"
    else:
        cfg = demo_config(tmp / "tol", args)
        m, what = load_manifest(cfg.data.shards), "a random teacher (run `make demo` first for the fitted one)"
    model, _ = load_teacher(cfg.teacher, num_classes=m.num_classes, in_chans=cfg.aug.channels)
    x = next(iter(make_loader(UnitDataset(m, cfg.aug, cfg.seed, [(0, 0)], batch_size=512), 0))).view
    with torch.no_grad():
        f32 = model(x).float()
        low = {}
        for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            with torch.autocast("cpu", dtype=dtype):
                low[name] = model(x).float()
    d = {"float16 storage": (f32.half().float() - f32).abs()}
    d.update({f"{k} autocast": (v - f32).abs() for k, v in low.items()})
    flips = float((low["bf16"].argmax(1) != f32.argmax(1)).float().mean())
    print(f"verify tolerance, {what}, {len(x)} views, max |logit| {float(f32.abs().max()):.2f}: "
          + "; ".join(f"{k} max |d| {float(v.max()):.4f} (p99 {float(v.flatten().quantile(0.99)):.4f})"
                      for k, v in d.items()) + f"; bf16 flips {flips:.1%} of top-1 decisions")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=at_least(1000), default=20000, help="synthetic rows per epoch (reader)")
    ap.add_argument("--classes", type=at_least(2), nargs="+", default=[10, 1000])
    ap.add_argument("--n", type=at_least(256), default=2048, help="train images (stages)")
    add_machine_args(ap)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    print(f"load average before: {load_average()}")
    with tempfile.TemporaryDirectory(prefix="bench-integrity-") as tmp:
        reader_bench(Path(tmp), args)
        shard_bench(Path(tmp), args)
        tolerance_bench(Path(tmp), args)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
