"""Distribution: samples dropped per epoch and their spread over ranks, ImageNet layout, 1 to 64 ranks.

Computed from the code the student uses (``pipeline.views.sampling``): ImageNet-1k as ``configs/imagenet.yaml``
ingests it (1,281,167 images in 257 shards of 5,000, the last 1,167; mixing windows of 512), 10
DataLoader workers per rank, batch 128 per rank. For each world size: the share of an epoch's samples
not trained, against one global batch (world x 128), and the spread of samples over ranks and of
batches over a rank's workers. The rule before this design (whole shards dealt to ranks and workers,
each worker batching its own and dropping its partial batch, every rank stepping the minimum over ranks)
is printed beside it for comparison.

A second part measures the stall at an epoch boundary on the demo data (2 workers, shuffle buffer 2048):
the time from asking for the next epoch to its first batch, with the earlier loader (new workers every
epoch, a shuffle buffer that fills before it yields) and the current one (persistent workers, a buffer
that starts after one batch). The last line is the worst case of the first part.

    .venv/bin/python -m bench distribution
    .venv/bin/python -m bench distribution --no-stall     # the arithmetic only
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from bench.common import add_machine_args, set_threads
from bench.data import ingest_with_random_teacher, source_root
from pipeline.core.config import Config, load_config
from pipeline.data.shards import load_manifest
from pipeline.views.handover import ViewLoader
from pipeline.views.loading import train_stream
from pipeline.views.plan import stored_epoch
from pipeline.views.sampling import steps_per_epoch, worker_pieces, worker_span

SHARDS, SHARD_SIZE, LAST = 257, 5000, 1167
WINDOW, WORKERS, BATCH = 512, 10, 128


def imagenet_ranges() -> list[tuple[int, int]]:
    sizes = [SHARD_SIZE] * (SHARDS - 1) + [LAST]
    ends = np.cumsum(sizes)
    return [(int(e - s), int(e)) for s, e in zip(sizes, ends, strict=True)]


def previous_rule(ranges: list[tuple[int, int]], world: int) -> int:
    """Samples trained per epoch under the earlier rule (units[rank::world][worker::workers], drop_last per
    worker, every rank stepping the minimum), for a seeded shard order."""
    order = np.random.default_rng(0).permutation(len(ranges))
    sizes = [ranges[s][1] - ranges[s][0] for s in order]
    steps = min(sum(sum(sizes[rank::world][w::WORKERS]) // BATCH for w in range(WORKERS)) for rank in range(world))
    return steps * BATCH * world


def arithmetic(check_pieces: tuple[int, ...]) -> tuple[float, int, int]:
    ranges = imagenet_ranges()
    n = ranges[-1][1]
    print(f"ImageNet layout: {n:,} images, {len(ranges)} shards, windows of {WINDOW}, {WORKERS} workers, batch {BATCH}")
    print(f"{'ranks':>5}  {'dropped':>8}  {'share':>7}  {'1 global batch':>14}  {'rank spread':>11}  "
          f"{'worker spread':>13}  {'previous rule':>13}")
    worst = (0.0, 0, 0)
    for world in range(1, 65):
        steps = steps_per_epoch(n, world, BATCH)
        spans = [[worker_span(steps, r, world, w, WORKERS, BATCH) for w in range(WORKERS)] for r in range(world)]
        per_rank = [sum(b - a for a, b in s) for s in spans]
        per_worker = [(b - a) // BATCH for a, b in spans[0]]
        if world in check_pieces:  # the pieces themselves, counted: the spans above are what they cover
            got = [sum(len(p.indices) for w in range(WORKERS)
                       for p in worker_pieces(ranges, WINDOW, 0, 1, BATCH, r, world, w, WORKERS)) for r in range(world)]
            assert got == per_rank, (world, got[:4], per_rank[:4])
        dropped = n - sum(per_rank)
        worst = max(worst, (dropped / n, world, dropped))
        prev = 1 - previous_rule(ranges, world) / n
        if world in (1, 2, 4, 8, 16, 24, 32, 48, 64) or dropped >= world * BATCH:
            print(f"{world:>5}  {dropped:>8,}  {dropped / n:>7.3%}  {world * BATCH / n:>14.3%}  "
                  f"{max(per_rank) - min(per_rank):>11}  {max(per_worker) - min(per_worker):>10} bat  {prev:>13.2%}")
        assert dropped < world * BATCH and max(per_rank) == min(per_rank)
    return worst


def stall(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-distribution-") as tmp:
        root, source = source_root(Path(tmp), args.n, 256, args.synthetic)
        raw = load_config(None).model_dump(mode="json")
        raw["data"].update(root=str(root), shards=str(Path(tmp) / "shards"), shard_size=1000, train_limit=args.n,
                           val_limit=256, train_shards=None)
        raw["teacher"]["checkpoint"] = str(Path(tmp) / "teacher.pt")
        cfg = Config.model_validate(raw)
        with contextlib.redirect_stdout(io.StringIO()):
            ingest_with_random_teacher(cfg)
        m = load_manifest(cfg.data.shards)
        print(f"\nepoch-boundary stall: {source}, {args.n} images, 2 workers, batch 128, shuffle buffer 2048")
        for name, persistent in (("earlier loader", False), ("current loader", True)):
            waits = []
            for _ in range(args.rounds):
                ds, loader = train_stream(m, cfg.aug, cfg.seed, batch_size=128, rank=0, world=1, shuffle=2048,
                                          workers=2, view_epoch=partial(stored_epoch, stored_epochs=1))
                ds.fill_first = not persistent
                if not persistent:  # as before: workers started again for every epoch
                    plain = DataLoader(ds, batch_size=128, num_workers=2, persistent_workers=False)
                    loader = ViewLoader(plain, cfg.aug)
                for epoch in range(3):
                    ds.set_epoch(epoch)
                    t0 = time.perf_counter()
                    it = iter(loader)
                    next(it)
                    if epoch:  # the first epoch starts the workers in both cases
                        waits.append(time.perf_counter() - t0)
                    for _ in it:
                        pass
                del loader
            print(f"  {name}: first batch of a new epoch after {statistics.median(waits):.2f} s "
                  f"(median of {len(waits)}; an epoch of {args.n} images)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-stall", action="store_true", help="skip the epoch-boundary measurement")
    ap.add_argument("--n", type=int, default=8000, help="images for the stall measurement")
    add_machine_args(ap, rounds=2)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    worst = arithmetic(check_pieces=(1, 8, 64))
    if not args.no_stall:
        stall(args)
    share, world, dropped = worst
    print(f"\nworst case, 1-64 ranks: {share:.3%} of an epoch dropped ({dropped:,} samples at {world} ranks, one "
          f"global batch there is {world * BATCH:,}); the previous rule dropped up to 19.43% (64 ranks)")


if __name__ == "__main__":
    main()
