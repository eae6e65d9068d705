"""The logit store: bytes per (sample, epoch), what each storage choice saves, the reader, the object count.

Synthetic but teacher-like logits: normal noise x 3, a per-class bias, a margin on the true class and,
for mixed samples, on the partner's class split by lambda. The top-k classes of such logits are close to
uniformly random, which is the hard case (a real teacher's top-k classes cluster, and compress better).

1. Bytes per (sample, epoch) of a finished store (written, packed, all its objects counted), at K = 5
   and 10, C = 10 and 1000, against dense float32 logits. Then each array's bytes under the choices
   measured (raw zstd, byte/bit shuffle, a delta filter on the float16 bits), and what the arrays this
   format derives instead of storing (hard label, mix plan) would cost. The target: <= 24 B at K = 10,
   C = 1000.
2. Reader rows/s on the same data: the packed epochs (one object per array, each unit read by byte
   range) against the staged units (one object per unit, as before packing); target >= 0.90.
3. Objects of a finished store: from the store's own layout code (``store.finished_objects``), checked
   against a small store written for real (its files counted), then for ImageNet-1k (1,281,167 images in
   257 shards, 50,000 val in 10) at E = 10, 100 and 300; target <= 5,000 at E = 300.

    .venv/bin/python -m bench store
    .venv/bin/python -m bench store --n 5000 --classes 10        # quicker
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from numcodecs import Blosc, Delta, Zstd

import store
from bench.common import at_least

KIND_CUTMIX, KIND_MIXUP, KIND_NONE = store.KIND_CUTMIX, store.KIND_MIXUP, store.KIND_NONE


def synth_epoch(rng: np.random.Generator, labels: np.ndarray, c: int, shard: int, window: int):
    """Teacher-like logits and a DeiT-like mix plan (mixup 0.8 / cutmix 1.0, switch 0.5) for one epoch."""
    n = labels.size
    bias = np.linspace(-1.0, 1.0, c, dtype=np.float32)
    logits = rng.normal(size=(n, c)).astype(np.float32) * 3 + bias
    partner = np.empty(n, np.int64)
    for a in range(0, n, shard):  # partners within windows of each shard's own order
        for w in range(a, min(a + shard, n), window):
            e = min(w + window, a + shard, n)
            partner[w:e] = w + rng.permutation(e - w)
    kind = np.where(rng.random(n) < 0.5, KIND_MIXUP, KIND_CUTMIX).astype(np.uint8)
    lam = np.where(kind == KIND_MIXUP, rng.beta(0.8, 0.8, n), rng.beta(1.0, 1.0, n)).astype(np.float32)
    rows = np.arange(n)
    logits[rows, labels] += 6 * lam
    logits[rows, labels[partner]] += 6 * (1 - lam)
    kind[partner == rows] = KIND_NONE
    return logits, (partner, kind, lam)


def write_store(path: Path, c: int, k: int, epochs, labels: np.ndarray, shard: int, val: int = 0):
    n = labels.size
    ranges = tuple((a, min(a + shard, n)) for a in range(0, n, shard))
    vranges = tuple((a, min(a + shard, val)) for a in range(0, val, shard))
    spec = store.StoreSpec(num_classes=c, epochs=len(epochs), topk=k, train_ranges=ranges, val_ranges=vranges)
    g = store.create_store(path, spec, {"teacher": "synthetic", "topk": k, "num_classes": c})
    for e, (top, plan) in enumerate(epochs):
        tl, tc, _, lse = top
        for s, (a, b) in enumerate(ranges):
            store.write_train_unit(g, e, s, topk_logits=tl[a:b, :spec.k], topk_classes=tc[a:b, :spec.k],
                                   logsumexp=lse[a:b], label=labels[a:b], plan=tuple(p[a:b] for p in plan))
    for s, (a, b) in enumerate(vranges):
        tl, tc, _, lse = epochs[0][0]
        store.write_val_unit(g, s, topk_logits=tl[a:b, :spec.k], topk_classes=tc[a:b, :spec.k],
                             logsumexp=lse[a:b], label=labels[a:b])
    return g, spec


def encoded(arr: np.ndarray, codecs: list, shard: int) -> float:
    """Bytes of ``arr`` encoded chunk by chunk (``shard`` rows each) through ``codecs``, per row."""
    total = 0
    for a in range(0, len(arr), shard):
        x = np.ascontiguousarray(arr[a : a + shard])
        for codec in codecs:
            x = codec.encode(x)
        total += len(x)
    return total / len(arr)


def choices(top, plan, shard: int) -> dict[str, dict[str, float]]:
    """Each array's bytes per row under the choices measured (the format's in the first column)."""
    tl, tc, hl, lse = top
    zstd, shuf, bits = Zstd(3), Blosc("zstd", 3, Blosc.SHUFFLE), Blosc("zstd", 3, Blosc.BITSHUFFLE)
    partner, kind, lam = plan
    return {
        "topk_logits": {"fp16 bits, delta, shuffle (kept)": encoded(tl.view(np.uint16), [Delta("<u2"), shuf], shard),
                        "fp16 zstd": encoded(tl, [zstd], shard), "fp16 shuffle": encoded(tl, [shuf], shard)},
        "topk_classes": {"bitshuffle (kept)": encoded(tc, [bits], shard), "zstd": encoded(tc, [zstd], shard),
                         "byte shuffle": encoded(tc, [shuf], shard)},
        "logsumexp": {"shuffle (kept)": encoded(lse, [shuf], shard), "zstd": encoded(lse, [zstd], shard),
                      "lse - top-1 logit as float16 (lossy: not kept)":
                      encoded((lse - tl[:, 0].astype(np.float32)).astype(np.float16), [shuf], shard)},
        "hard_label": {"derived: topk_classes[:, 0] (kept)": 0.0, "stored, zstd": encoded(hl, [zstd], shard)},
        "mix plan": {"derived: a digest per unit (kept)": 0.0,
                     "stored, zstd": sum(encoded(a, [zstd], shard) for a in (partner.astype(np.int32), kind, lam))},
    }


def size_table(tmp: Path, args: argparse.Namespace, rng: np.random.Generator) -> dict:
    results, detail = [], None
    for c in args.classes:
        labels = rng.integers(0, c, args.n)
        epochs = []
        for _ in range(args.epochs):
            logits, plan = synth_epoch(rng, labels, c, args.shard_size, args.window)
            epochs.append((store.topk_from_logits(logits, max(args.topk)), plan))
        for k in args.topk:
            g, spec = write_store(tmp / f"c{c}-k{k}.zarr", c, k, epochs, labels, args.shard_size)
            for e in range(spec.epochs):
                store.pack_epoch(g, e)
            objs, nbytes = store.object_stats(g)
            results.append({"C": c, "K": k, "B/row": nbytes / (args.n * args.epochs), "objects": objs,
                            "dense f32 B/row": 4 * c})
            if c == max(args.classes) and k == max(args.topk):
                tl, tc, hl, lse = epochs[0][0]
                detail = (c, k, choices((tl[:, :k], tc[:, :k], hl, lse), epochs[0][1], args.shard_size))
    print(f"1. bytes per (sample, epoch), a finished store (N={args.n}, E={args.epochs}, shards of {args.shard_size}; "
          "every object counted, records and metadata included)")
    for r in results:
        print(f"   C={r['C']:>5} K={r['K']:>3}: {r['B/row']:6.1f} B/row ({r['objects']} objects), dense float32 "
              f"{r['dense f32 B/row']:,} B/row: {r['dense f32 B/row'] / r['B/row']:.1f}x smaller")
    c, k, table = detail
    print(f"   per array at C={c}, K={k}, B/row under each choice measured:")
    for name, opts in table.items():
        print(f"     {name:<13} " + "; ".join(f"{o} {v:.2f}" for o, v in opts.items()))
    return {(r["C"], r["K"]): r["B/row"] for r in results}


def reader_rates(tmp: Path, args: argparse.Namespace, rng: np.random.Generator) -> None:
    from bench.bench_integrity import read_all, synth_targets, write_both

    c, k = max(args.classes), max(args.topk)
    data = synth_targets(rng, args.n, c, k, args.epochs)
    packed, previous, spec = write_both(tmp, c, k, data, args.shard_size)  # packed: the store's layout, finished
    staged, _ = write_store(tmp / "staged.zarr", c, k, [((d["topk_logits"], d["topk_classes"], d["hard_label"],
                                                         d["logsumexp"]), (d["partner"], d["kind"], d["lam"]))
                                                        for d in data], data[0]["label"], args.shard_size)
    variants = {"packed": lambda: read_all(packed, spec, "checked"),
                "staged": lambda: read_all(store.open_store(tmp / "staged.zarr"), spec, "checked"),
                "previous": lambda: read_all(previous, spec, "concurrent")}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds * 3):
        for name in list(variants) if r % 2 == 0 else list(variants)[::-1]:
            t0 = time.perf_counter()
            rows = variants[name]()
            rates[name].append(rows / (time.perf_counter() - t0))
    med = {name: statistics.median(v) for name, v in rates.items()}
    ratio = statistics.median(p / q for p, q in zip(rates["packed"], rates["previous"], strict=True))
    print(f"\n2. reader, C={c} K={k}: packed (every unit checked, read by byte range) {med['packed']:,.0f} rows/s; "
          f"staged units {med['staged']:,.0f}; the previous format (8 arrays a unit, fetched concurrently, nothing "
          f"checked) {med['previous']:,.0f}. packed / previous = {ratio:.3f} (target >= 0.90: "
          f"{'met' if ratio >= 0.90 else 'NOT met'})")


def object_counts(tmp: Path, rng: np.random.Generator) -> int:
    labels = rng.integers(0, 10, 250)
    epochs = [(store.topk_from_logits(lg, 5), plan) for lg, plan in
              (synth_epoch(rng, labels, 10, 40, 8) for _ in range(3))]
    g, spec = write_store(tmp / "small.zarr", 10, 5, epochs, labels, 40, val=90)
    for e in range(spec.epochs):
        store.pack_epoch(g, e)
    store.finalize(tmp / "small.zarr")
    files = sum(1 for p in (tmp / "small.zarr").rglob("*") if p.is_file())
    predicted = store.finished_objects(spec)
    assert files == predicted, (files, predicted)
    print(f"\n3. objects of a finished store: a small one written for real (E=3, 7 train + 3 val shards): {files} "
          f"files, the layout code says {predicted}")
    sizes = [5000] * 256 + [1167]
    train = tuple((sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes)))
    val = tuple((a, a + 5000) for a in range(0, 50000, 5000))
    worst = 0
    for e in (10, 100, 300):
        n = store.finished_objects(store.StoreSpec(1000, e, 10, train, val))
        worst = max(worst, n)
        print(f"   ImageNet-1k, E={e:>3}: {n:,} objects (one unit per object, as before packing: "
              f"{e * 257 * 4 + 257 + 60:,})")
    return worst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=at_least(1000), default=20000, help="train samples")
    ap.add_argument("--classes", type=at_least(2), nargs="+", default=[10, 1000])
    ap.add_argument("--topk", type=at_least(1), nargs="+", default=[5, 10])
    ap.add_argument("--epochs", type=at_least(1), default=2, help="stored augmented epochs E")
    ap.add_argument("--shard-size", type=at_least(8), default=1000)
    ap.add_argument("--window", type=at_least(2), default=256)
    ap.add_argument("--rounds", type=at_least(1), default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        sizes = size_table(Path(tmp), args, rng)
        reader_rates(Path(tmp), args, rng)
        worst = object_counts(Path(tmp), rng)
    b = sizes.get((1000, 10))
    if b is not None:
        print(f"\nK=10, C=1000: {b:.1f} B per (sample, epoch) (target <= 24: {'met' if b <= 24 else 'NOT met'}); "
              f"ImageNet at E=300: {worst:,} objects (target <= 5,000: {'met' if worst <= 5000 else 'NOT met'})")


if __name__ == "__main__":
    main()
