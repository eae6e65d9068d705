"""Benchmark runner: ``python -m bench [NAME ...]`` runs bench/bench_NAME.py (all when none given; a hyphen in
NAME is an underscore in the file: ``kd-cost`` runs bench_kd_cost.py); ``python -m bench NAME --option ...`` runs
one with its options (``python -m bench NAME --help``).

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
    available = sorted(p.stem.removeprefix("bench_").replace("_", "-") for p in here.glob("bench_*.py"))
    # `python -m bench NAME --opt ...` hands the options to that one benchmark
    split = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    names, options = argv[:split] or available, argv[split:]
    if options and len(names) != 1:
        print("options go to one benchmark: python -m bench NAME [--option ...]", file=sys.stderr)
        return 2
    unknown = [n for n in names if n not in available]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    for name in names:
        print(f"=== bench {name} ===", flush=True)
        t0 = time.perf_counter()
        module = importlib.import_module(f"bench.bench_{name.replace('-', '_')}")
        module.main(options)
        print(f"(bench {name}: {time.perf_counter() - t0:.1f} s)\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
