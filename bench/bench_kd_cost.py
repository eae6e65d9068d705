"""What the store saves per step at the paper's shape, on the CPU: a DeiT-Ti and a DeiT-S training step at 224 px
(the student stage's step, hard distillation from stored targets) against a RegNetY-16GF forward (random weights)
on the same batch, which the online teacher adds to every step. Alternating in one process, one torch thread;
each round times the teacher's forward and both students' steps in turn (the order reversed every other round).

Printed: seconds per image of each, and per student the ratio online / offline = (step + teacher forward) / step,
per round and its median: how many times longer a step is when the teacher runs in it (the store's saving per
step; the teacher stage's own cost is paid once, see ``bench teacher``).

    python -m bench kd-cost
    python -m bench kd-cost --batch-size 4 --rounds 3      # quicker
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from bench.common import at_least, load_average, set_threads
from bench.steps import on, seconds, student_trainer, synthetic_batch, teacher_net
from pipeline.train.models import teacher_forward

STUDENTS = ("deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224")
TEACHER = "regnety_160"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench kd-cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=at_least(1), default=8, help="images a step (default 8)")
    ap.add_argument("--rounds", type=at_least(1), default=5, help="rounds (default 5)")
    ap.add_argument("--img-size", type=at_least(16), default=224)
    ap.add_argument("--classes", type=at_least(2), default=1000)
    ap.add_argument("--teacher", default=TEACHER, help=f"timm CNN (default {TEACHER}, the paper's)")
    ap.add_argument("--students", nargs="+", default=list(STUDENTS))
    ap.add_argument("--threads", type=at_least(0), default=1, help="torch threads (default 1; 0: torch's choice)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse(argv)
    set_threads(args.threads)
    cpu = torch.device("cpu")
    batch = synthetic_batch(args.batch_size, args.img_size, args.classes)
    teacher = teacher_net(args.teacher, args.classes, cpu)
    trainers = {s: student_trainer(s, "offline", classes=args.classes, img_size=args.img_size, device=cpu)
                for s in args.students}
    print(f"batch {args.batch_size} at {args.img_size} px, {args.classes} classes, torch threads "
          f"{torch.get_num_threads()}; load {load_average()}", flush=True)
    tasks = {"teacher": lambda: teacher_forward(teacher, batch.view, cpu),
             **{s: (lambda tr=tr: tr.train_step(on(batch, cpu))) for s, tr in trainers.items()}}
    for fn in tasks.values():  # warm-up: first-call allocations
        fn()
    times: dict[str, list[float]] = {k: [] for k in tasks}
    for r in range(args.rounds):
        for name in list(tasks) if r % 2 == 0 else list(tasks)[::-1]:
            times[name].append(seconds(tasks[name], cpu) / args.batch_size)
    return report(times, args)


def report(times: dict[str, list[float]], args: argparse.Namespace) -> dict[str, float]:
    fwd = times["teacher"]
    print(f"\n{'':40} {'s / image (median)':>18}   per round")
    for name, t in times.items():
        what = f"{args.teacher} forward" if name == "teacher" else f"{name} step"
        print(f"{what:40} {statistics.median(t):>18.3f}   {', '.join(f'{x:.3f}' for x in t)}")
    out = {}
    for s in args.students:
        ratios = [(step + f) / step for step, f in zip(times[s], fwd, strict=True)]
        out[s] = statistics.median(ratios)
        print(f"online / offline, {s}: {out[s]:.2f}x (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
