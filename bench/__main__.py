"""Benchmark runner: ``python -m bench [NAME ...]`` runs bench/bench_NAME.py (all when none given).

Each benchmark prints its figures and, where it has a target, a ratio measured within one run, so
the noise of a shared machine cancels out.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    available = sorted(p.stem.removeprefix("bench_") for p in here.glob("bench_*.py"))
    names = argv or available
    unknown = [n for n in names if n not in available]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    for name in names:
        print(f"=== bench_{name} ===", flush=True)
        t0 = time.perf_counter()
        module = importlib.import_module(f"bench.bench_{name}")
        module.main([])
        print(f"(bench_{name}: {time.perf_counter() - t0:.1f} s)\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
