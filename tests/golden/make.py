"""The golden views: digests of a few hundred views, for fixed seeds, of images kept in this folder.

Two recipes: the demo's (``configs/demo.yaml``: 28 px gray, crops, flip, erasing, Mixup/CutMix) on small gray
PNGs, and ``configs/imagenet.yaml``'s (224 px RGB, RandAugment ``rand-m9-mstd0.5-inc1``, erasing, Mixup/CutMix,
bicubic) on JPEGs of varied sizes and aspect ratios. ``tests/test_golden_views.py`` recomputes them with the
functions the stages use (:func:`pipeline.views.canary.epoch_digests`: the uint8 views that cross the worker
queue, the views finished on the CPU, the mix plans; and the evaluation views) and fails on any difference:
an upgrade of timm, torchvision, Pillow, NumPy or torch that changes a view is caught before it meets a store.

Run ``python tests/golden/make.py`` to write the images (once; they are kept in the repository, so their
encoding never changes) and ``python tests/golden/make.py --digests`` to record the digests again, after a
change to how views are made that is meant (then bump ``STREAM_VERSION`` in ``pipeline/views/rng.py``).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.core.config import AugConfig  # noqa: E402
from pipeline.views import canary  # noqa: E402

SEED = 7
RECIPES = {"demo": ("demo.yaml", "gray", 16), "imagenet": ("imagenet.yaml", "rgb", 12)}
"""name: (config, images, view epochs): a view per image and epoch."""
DIGESTS = HERE / "views.json"


def _noise(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Bytes from a hash (the same on any machine and NumPy version)."""
    n, out, i = int(np.prod(shape)), bytearray(), 0
    while len(out) < n:
        out += hashlib.blake2b(f"{name}:{i}".encode(), digest_size=64).digest()
        i += 1
    return np.frombuffer(bytes(out[:n]), np.uint8).reshape(shape)


def _textured(name: str, h: int, w: int, channels: int) -> np.ndarray:
    """Smooth shapes with some grain: images on which every RandAugment op changes something."""
    coarse = _noise(name, (-(-h // 16), -(-w // 16), channels)).astype(np.float32)
    up = np.kron(coarse, np.ones((16, 16, 1), np.float32))[:h, :w]
    grain = _noise(name + "/grain", (h, w, channels)).astype(np.float32) / 8
    img = np.clip(up * 0.8 + grain, 0, 255).astype(np.uint8)
    return img[..., 0] if channels == 1 else img


def write_images() -> None:
    from PIL import Image

    for j in range(8):  # the demo's kind: 28 x 28 gray
        Image.fromarray(_textured(f"gray{j}", 28, 28, 1)).save(HERE / f"gray{j}.png")
    sizes = [(224, 224), (180, 320), (320, 180), (96, 128), (375, 500), (500, 333), (64, 64), (300, 260),
             (240, 90), (90, 240), (256, 384), (150, 150)]
    for j, (h, w) in enumerate(sizes):
        Image.fromarray(_textured(f"rgb{j}", h, w, 3)).save(HERE / f"rgb{j}.jpg", quality=90)


def pool(kind: str) -> canary.Pool:
    files = sorted(HERE.glob(f"{kind}*.*"), key=lambda p: int(p.stem.removeprefix(kind)))
    return canary.Pool(list(range(len(files))), [f.read_bytes() for f in files], [f.suffix[1:] for f in files])


def recipe(name: str) -> AugConfig:
    return AugConfig.model_validate(yaml.safe_load((ROOT / "configs" / RECIPES[name][0]).read_text())["aug"])


def digests(name: str) -> dict:
    """Every view of the recipe's images in its view epochs, and their evaluation views."""
    _, kind, epochs = RECIPES[name]
    p, aug = pool(kind), recipe(name)
    images = p.images()
    train = [canary.epoch_digests(images, p, aug, SEED, e)[0] for e in range(epochs)]
    return {"train": train, "eval": canary.eval_digests(images, aug)}


def main(argv: list[str]) -> int:
    if "--digests" not in argv:
        write_images()
    out = {"versions": canary.library_versions(), **{name: digests(name) for name in RECIPES}}
    DIGESTS.write_text(json.dumps(out, indent=1) + "\n")
    views = sum(len(d) - 1 for name in RECIPES for d in out[name]["train"]) + sum(len(out[n]["eval"]) for n in RECIPES)
    print(f"wrote {DIGESTS} ({views} views)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
