"""Augmentation throughput: replayable per-sample seeding against the same timm transforms on global RNGs.

Target (issue 3): determinism costs at most 5%. Both variants run the very same transform objects on
the same images; rounds alternate between them and the ratio is the median of per-round ratios, so a
noisy shared machine affects both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from PIL import Image

from pipeline.augment import train_transform
from pipeline.config import AugConfig
from pipeline.replay import base_view

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


def _rate(fn, images: list[Image.Image]) -> float:
    t0 = time.perf_counter()
    for i, img in enumerate(images):
        fn(i, img)
    return len(images) / (time.perf_counter() - t0)


def measure(aug: AugConfig, n: int, rounds: int, src_size: int) -> tuple[float, float, float]:
    transform = train_transform(aug)
    images = _images(n, src_size)
    plain = lambda i, img: transform(img)  # noqa: E731
    seeded = lambda i, img: base_view(transform, img, 0, 0, i)  # noqa: E731
    _rate(plain, images[:20])
    _rate(seeded, images[:20])
    ratios, r_plain, r_seeded = [], [], []
    for _ in range(rounds):
        a = _rate(plain, images)
        b = _rate(seeded, images)
        r_plain.append(a)
        r_seeded.append(b)
        ratios.append(b / a)
    return statistics.median(r_plain), statistics.median(r_seeded), statistics.median(ratios)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=400, help="images per round")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    print(f"{'recipe':<22}{'global im/s':>12}{'replay im/s':>13}{'ratio':>8}{'cost':>8}")
    for name, aug in RECIPES.items():
        src = 28 if aug.img_size <= 32 else 256
        n = args.n if aug.img_size <= 32 else max(40, args.n // 8)
        plain, seeded, ratio = measure(aug, n, args.rounds, src)
        print(f"{name:<22}{plain:>12.0f}{seeded:>13.0f}{ratio:>8.3f}{(1 - ratio) * 100:>7.1f}%", flush=True)
    print("target: replay/global >= 0.95 (determinism costs at most 5%)")


if __name__ == "__main__":
    main()
