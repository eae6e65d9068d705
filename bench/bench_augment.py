"""Augmentation throughput: replayable per-sample seeding against the same timm transforms on global RNGs.

Target (issue 3): determinism costs at most 5%. Both variants run the very same transform objects on
the same images, one window (``aug.window``) at a time: the replay side as ``replay_unit`` does it
(``base_views``: per-view streams keyed by (seed, epoch, index)), the global side with every draw from
the global ``random``/``numpy``/torch generators. Rounds alternate between them and the ratio is the
median of per-round ratios, so a noisy shared machine affects both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from PIL import Image

from bench.common import at_least
from pipeline.core.config import AugConfig
from pipeline.views.augment import train_transform
from pipeline.views.replay import base_views

RECIPES = {
    "demo-28px": AugConfig(
        img_size=28, channels=1, scale=(0.35, 1.0), auto_augment=None, color_jitter=0.0,
        mean=(0.286,), std=(0.353,), crop_pct=1.0,
    ),
    "deit-32px-randaug": AugConfig(img_size=32),
    "deit-224px-randaug": AugConfig(img_size=224),
}


def _images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def measure(aug: AugConfig, n: int, rounds: int, src_size: int) -> dict[str, float]:
    """Images/s of both sides and the replay/global ratio (median and quartiles over rounds).

    Within a round the two sides alternate window by window (which goes first alternates too), so a
    burst of load on the shared machine lands on both."""
    transform = train_transform(aug)
    images = _images(n, src_size)
    windows = [(first, images[first : first + aug.window]) for first in range(0, n, aug.window)]
    sides = {
        "global": lambda epoch, first, imgs: [transform(img) for img in imgs],
        "replay": lambda epoch, first, imgs: base_views(transform, imgs, 0, epoch, range(first, first + len(imgs))),
    }
    for fn in sides.values():  # warm-up
        fn(-1, 0, images[:20])
    ratios, totals = [], {"global": 0.0, "replay": 0.0}
    for r in range(rounds):
        spent = {"global": 0.0, "replay": 0.0}
        for k, (first, imgs) in enumerate(windows):
            for name in ("global", "replay") if (r + k) % 2 == 0 else ("replay", "global"):
                t0 = time.perf_counter()
                sides[name](r, first, imgs)  # a new epoch per round: fresh draws, as on the global side
                spent[name] += time.perf_counter() - t0
        ratios.append(spent["global"] / spent["replay"])
        for name in spent:
            totals[name] += spent[name]
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return {"global": n * rounds / totals["global"], "replay": n * rounds / totals["replay"],
            "ratio": median, "q1": q1, "q3": q3}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=at_least(8), default=1024, help="images per round (1/8 of that at 224 px)")
    ap.add_argument("--rounds", type=at_least(2), default=15)
    args = ap.parse_args(argv)
    print(f"{'recipe':<22}{'global im/s':>12}{'replay im/s':>13}{'ratio':>8}{'(IQR)':>14}{'cost':>8}")
    for name, aug in RECIPES.items():
        src = 28 if aug.img_size <= 32 else 256
        n = args.n if aug.img_size <= 32 else max(40, args.n // 8)
        m = measure(aug, n, args.rounds, src)
        iqr = f"{m['q1']:.3f}-{m['q3']:.3f}"
        print(f"{name:<22}{m['global']:>12.0f}{m['replay']:>13.0f}{m['ratio']:>8.3f}{iqr:>14}"
              f"{(1 - m['ratio']) * 100:>7.1f}%", flush=True)
    print("target: replay/global >= 0.95 (determinism costs at most 5%)")
    print("(with RandAugment the replay side can be faster: its op choice is a list comprehension over the view's")
    print(" stream, where timm's draws it with np.random.choice)")


if __name__ == "__main__":
    main()  # python -m bench.bench_augment [--option ...] also works
