"""Options and set-up the benchmarks share: rounds, torch threads, data source, machine load."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (a clean usage error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def add_machine_args(ap: argparse.ArgumentParser, *, rounds: int = 3, min_rounds: int = 1) -> None:
    """--rounds, --threads and --synthetic, as every model benchmark takes them."""
    ap.add_argument("--rounds", type=at_least(min_rounds), default=rounds,
                    help=f"rounds, alternating the variants (default {rounds})")
    ap.add_argument("--threads", type=at_least(0), default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core machine 2 OpenMP threads spin "
                         "against other processes and rounds swing 4-10x; 0 = torch's choice)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic images even if Fashion-MNIST is present")


def set_threads(threads: int) -> None:
    """Apply --threads (0 keeps torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


def load_average() -> str:
    """The 1/5/15-minute load average and the CPU count, printed before and after a benchmark."""
    return f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"
