"""Benchmark the logit store: bytes per (sample, epoch) per codec and K, and reader throughput.

Synthetic but realistic teacher logits: normal noise * 3, a per-class bias, a margin on the true
class, and for mixed samples the margin split between the two mixed classes by lambda (the teacher
sees the mixed image). The mix plan (partner within a window, lambda, kind) is stored as the
teacher stage would. Compared with keeping dense float32 logits (C * 4 bytes per sample and epoch).

    .venv/bin/python -m bench store                 # defaults: N=20000, C in {10, 1000}
    .venv/bin/python -m bench store --n 2000 --classes 10   # quick
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from store import (
    KIND_CUTMIX,
    KIND_MIXUP,
    KIND_NONE,
    StoreSpec,
    create_store,
    finalize,
    open_store,
    read_train_unit,
    stored_bytes,
    topk_from_logits,
    write_train_unit,
)

TARGET_ARRAYS = ("topk_logits", "topk_classes", "hard_label", "logsumexp")


def synth_epoch(rng: np.random.Generator, labels: np.ndarray, c: int, shard: int, window: int):
    """Teacher-like logits and a DeiT-like mix plan (mixup 0.8 / cutmix 1.0, switch 0.5) for one epoch."""
    n = labels.size
    bias = np.linspace(-1.0, 1.0, c, dtype=np.float32)
    logits = rng.normal(size=(n, c)).astype(np.float32) * 3 + bias
    partner = np.empty(n, np.int32)
    for a in range(0, n, shard):  # partners within windows of each shard's own order
        for w in range(a, min(a + shard, n), window):
            e = min(w + window, a + shard, n)
            partner[w:e] = w + rng.permutation(e - w)
    kind = np.where(rng.random(n) < 0.5, KIND_MIXUP, KIND_CUTMIX).astype(np.uint8)
    lam = np.where(kind == KIND_MIXUP, rng.beta(0.8, 0.8, n), rng.beta(1.0, 1.0, n)).astype(np.float32)
    lam[kind == KIND_CUTMIX] = np.round(lam[kind == KIND_CUTMIX] * 28 * 28) / (28 * 28)  # box-area granular
    rows = np.arange(n)
    logits[rows, labels] += 6 * lam
    logits[rows, labels[partner]] += 6 * (1 - lam)
    kind[partner == rows] = KIND_NONE
    return logits, partner, lam, kind


def dir_bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def run_one(root: Path, c: int, k: int, codec: str, level: int, epochs_data, labels, shard: int) -> dict:
    n = labels.size
    ranges = tuple((a, min(a + shard, n)) for a in range(0, n, shard))
    spec = StoreSpec(
        num_classes=c,
        epochs=len(epochs_data),
        topk=k,
        train_ranges=ranges,
        val_ranges=(),
        codec=codec,
        level=level,
    )
    path = root / f"c{c}-k{k}-{codec}.zarr"
    g = create_store(path, spec, {"teacher": "synthetic", "topk": k, "num_classes": c})
    t0 = time.perf_counter()
    for e, (top, partner, lam, kind) in enumerate(epochs_data):
        tl, tc, hl, lse = top
        for s, (a, b) in enumerate(ranges):
            write_train_unit(
                g,
                e,
                s,
                topk_logits=tl[a:b, : spec.k],
                topk_classes=tc[a:b, : spec.k],
                hard_label=hl[a:b],
                logsumexp=lse[a:b],
                partner=partner[a:b],
                lam=lam[a:b],
                kind=kind[a:b],
                label=labels[a:b],
            )
    write_s = time.perf_counter() - t0
    finalize(path)
    rows = n * len(epochs_data)
    r = open_store(path)
    t0 = time.perf_counter()
    got = 0
    for e in range(spec.epochs):
        for s in range(spec.n_shards):
            u = read_train_unit(r, e, s)
            got += u.end - u.start
    read_s = time.perf_counter() - t0
    assert got == rows
    total = stored_bytes(r)
    targets = sum(dir_bytes(path / "train" / a) for a in TARGET_ARRAYS)
    return {
        "C": c,
        "K": k,
        "k": spec.k,
        "codec": codec,
        "B/row": total / rows,
        "targets B/row": targets / rows,
        "dense f32 B/row": c * 4,
        "ratio": (c * 4) / (total / rows),
        "write rows/s": rows / write_s,
        "read rows/s": rows / read_s,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="train samples")
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 1000])
    ap.add_argument("--topk", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--codecs", nargs="+", default=["zstd", "blosc-lz4", "gzip", "none"])
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2, help="stored augmented epochs E")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None, help="where to write stores (default: a temp dir)")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for c in args.classes:
            labels = rng.integers(0, c, args.n)
            kmax = max(args.topk)
            epochs_data = []
            t0 = time.perf_counter()
            for _ in range(args.epochs):
                logits, partner, lam, kind = synth_epoch(rng, labels, c, args.shard_size, args.window)
                epochs_data.append((topk_from_logits(logits, kmax), partner, lam, kind))
            topk_s = time.perf_counter() - t0
            print(
                f"C={c}: synth + topk_from_logits {args.n * args.epochs / topk_s:,.0f} rows/s "
                f"(N={args.n}, E={args.epochs}, shard {args.shard_size})"
            )
            for k in args.topk:
                for codec in args.codecs:
                    results.append(
                        run_one(Path(tmp), c, k, codec, args.level, epochs_data, labels, args.shard_size)
                    )

    cols = list(results[0])
    fmt = {
        "B/row": "{:.1f}",
        "targets B/row": "{:.1f}",
        "ratio": "{:.1f}x",
        "write rows/s": "{:,.0f}",
        "read rows/s": "{:,.0f}",
    }
    cells = [[fmt.get(col, "{}").format(r[col]) for col in cols] for r in results]
    widths = [max(len(col), *(len(row[i]) for row in cells)) for i, col in enumerate(cols)]
    print()
    print("  ".join(col.rjust(w) for col, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    print()
    print("B/row: whole store bytes on disk per (sample, epoch), incl. mix plan, labels and metadata;")
    print(
        "targets B/row: topk_logits + topk_classes + hard_label + logsumexp only; ratio: dense f32 / B/row."
    )
    for c in args.classes:
        for k in args.topk:
            sub = {r["codec"]: r for r in results if r["C"] == c and r["K"] == k}
            if "none" in sub:
                line = ", ".join(
                    f"{name} {sub['none']['B/row'] / r['B/row']:.2f}x"
                    for name, r in sub.items()
                    if name != "none"
                )
                print(f"C={c} K={k}: compression vs raw: {line}")


if __name__ == "__main__":
    main()  # python -m bench.bench_store [--option ...] also works
