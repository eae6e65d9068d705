"""What checking a store's view canary costs a reader, against the shortest demo student run.

Every reader (student, verify, audit, the teacher resuming a store) recomputes the store's canary views before any
work. This times that check (:func:`pipeline.views.canary.check_canary`, with its pool's decoding) for the demo's
recipe (28 px gray) and for ``configs/imagenet.yaml``'s (224 px, RandAugment), on canaries made the way the teacher
makes them from the golden test images (``tests/golden``), and compares the demo's with the training time of the
shortest demo student run, read from ``runs/student-*/history.csv`` after ``make demo`` (or ``--student-seconds``).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

from bench.common import at_least, set_threads
from pipeline.core.config import load_config
from pipeline.data.shards import open_shards
from pipeline.views import canary

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "golden"))
import make as golden  # noqa: E402


def check_seconds(name: str, rounds: int) -> tuple[float, int]:
    """(median seconds of a check, canary views) for one golden recipe's canary."""
    _, kind, _ = golden.RECIPES[name]
    pool, aug = golden.pool(kind), golden.recipe(name)
    record = canary.make_canary(pool, aug, golden.SEED)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        check = canary.check_canary(record, pool, aug, golden.SEED)
        times.append(time.perf_counter() - t0)
        assert check.same_views
    return statistics.median(times), check.total


def shortest_student_seconds(config: Path) -> float | None:
    """The training time of the shortest demo student run: each epoch's trained samples over its im/s."""
    cfg = load_config(config)
    histories = [Path(f) / "history.csv" for f in cfg.evaluate.students]
    if not all(h.is_file() for h in histories) or not histories:
        return None
    n = open_shards(cfg).count("train") // cfg.student.batch_size * cfg.student.batch_size  # trained an epoch
    return min(sum(n / float(r["im_per_s"]) for r in csv.DictReader(h.open())) for h in histories)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench canary", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=at_least(1), default=5, help="checks timed per recipe (median; default 5)")
    ap.add_argument("--threads", type=at_least(0), default=1, help="torch threads (default 1; 0: torch's choice)")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml",
                    help="the demo config whose students' history.csv give the shortest run")
    ap.add_argument("--student-seconds", type=float, default=None,
                    help="the shortest student run's training seconds, when no demo was run here")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    demo, views = check_seconds("demo", args.rounds)
    print(f"canary check, demo recipe (28 px gray): {demo * 1000:.0f} ms for {views} views")
    big, big_views = check_seconds("imagenet", args.rounds)
    print(f"canary check, configs/imagenet.yaml's recipe (224 px, RandAugment): {big * 1000:.0f} ms for {big_views} "
          "views")
    student = args.student_seconds or shortest_student_seconds(args.config)
    if student is None:
        print("no demo student history here: run `make demo` first, or pass --student-seconds")
        return
    print(f"shortest demo student run: {student:.0f} s of training; canary: demo check / student run = "
          f"{demo / student:.4%} (target < 2 %)")
