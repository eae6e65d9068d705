"""Fallback for machines without Debian's ``dataset-fashion-mnist``: fetch the four IDX files.

Usage: ``python -m pipeline.data.fetch DEST``. Stops with instructions when DEST is not writable or
the download fails, so ``make demo`` never half-runs on missing data.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def fetch(dest: Path) -> None:
    """Download the missing files into ``dest`` (atomic per file)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        target = dest / name
        if target.exists():
            continue
        tmp = target.with_suffix(".part")
        with urllib.request.urlopen(BASE + name, timeout=60) as r, open(tmp, "wb") as f:
            f.write(r.read())
        tmp.replace(target)


def main(argv: list[str]) -> int:
    dest = Path(argv[1]) if len(argv) > 1 else Path("data/fashion-mnist")
    try:
        fetch(dest)
    except OSError as e:
        print(
            f"Fashion-MNIST is not at {dest} and could not be fetched ({e}).\n"
            "Install it with `apt-get install dataset-fashion-mnist` (Debian), or download\n"
            + "".join(f"  {BASE}{n}\n" for n in FILES)
            + "into a folder and point the config at it: `--set data.root=FOLDER`.",
            file=sys.stderr,
        )
        return 1
    print(f"Fashion-MNIST: {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
