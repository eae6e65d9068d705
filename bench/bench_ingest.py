"""Ingest throughput (images/s) on Fashion-MNIST IDX files into a temporary shards folder (generated
IDX files of the same shape when Fashion-MNIST is not installed, or with --synthetic).

    .venv/bin/python -m bench ingest                  # all 60,000 train + 10,000 val images
    .venv/bin/python -m bench ingest --limit 5000     # first 5,000 train (and val) after the shuffle

Also times the no-op rerun (the up-to-date check).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import at_least
from bench.data import source_root
from pipeline.core.config import Config
from pipeline.data.shards import load_manifest
from stages import ingest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="folder of IDX files (default: Fashion-MNIST when installed)")
    ap.add_argument("--synthetic", action="store_true", help="generated images even if Fashion-MNIST is present")
    ap.add_argument("--limit", type=at_least(1), default=None, help="train_limit and val_limit (default: all)")
    ap.add_argument("--shard-size", type=at_least(1), default=1000)
    ap.add_argument("--out", default=None, help="parent folder for the shards (default: a temp dir)")
    ap.add_argument("--progress", action="store_true", help="show the tqdm bars")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=args.out) as tmp:
        root = args.root or source_root(Path(tmp), 60000, 10000, args.synthetic)[0]
        config = Config.model_validate(
            {
                "seed": 0,
                "data": {
                    "source": "idx",
                    "root": str(root),
                    "shards": str(Path(tmp) / "shards"),
                    "shard_size": args.shard_size,
                    "train_limit": args.limit,
                    "val_limit": args.limit,
                },
            }
        )
        t0 = time.perf_counter()
        out = ingest.run(config, progress=args.progress)
        dt = time.perf_counter() - t0
        m = load_manifest(out)
        n = m.count("train") + m.count("val")
        size = sum(p.stat().st_size for p in out.iterdir())
        t1 = time.perf_counter()
        ingest.run(config, progress=False)
        rerun = time.perf_counter() - t1
    print(
        f"ingest ({root}): {n} images ({m.count('train')} train + {m.count('val')} val) in {dt:.2f}s = "
        f"{n / dt:,.0f} images/s; {size / 2**20:.1f} MiB of shards; up-to-date rerun {rerun * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()  # python -m bench.bench_ingest [--option ...] also works
