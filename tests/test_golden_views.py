"""Golden views: an upgrade of a library that makes views (timm, torchvision, Pillow, NumPy, torch) and changes
any view fails here, in CI, before a store written with the old views meets a student with the new ones.

The digests were recorded by ``tests/golden/make.py`` from images kept in ``tests/golden``: the demo's recipe on
gray 28 px PNGs, ``configs/imagenet.yaml``'s (224 px, RandAugment, erasing, Mixup/CutMix) on JPEGs of varied
sizes and aspect ratios.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
import make as golden  # noqa: E402

from pipeline.views import canary  # noqa: E402
from pipeline.views.handover import TrainParts  # noqa: E402


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(golden.DIGESTS.read_text())


@pytest.mark.parametrize("name", sorted(golden.RECIPES))
def test_views_equal_the_golden_ones(recorded, name):
    want, found = recorded[name], golden.digests(name)
    pairs = [(a, b) for ra, rb in zip(want["train"], found["train"], strict=True) for a, b in zip(ra, rb, strict=True)]
    pairs += list(zip(want["eval"], found["eval"], strict=True))
    differ = sum(a != b for a, b in pairs)
    here = canary.library_versions()
    changed = ", ".join(f"{lib} {here.get(lib)} (golden: {v})" for lib, v in recorded["versions"].items()
                        if here.get(lib) != v) or "no library version"
    assert differ == 0, (
        f"{differ} of {len(pairs)} golden {name} views differ; changed: {changed}. How views are made has changed: "
        "stores written before would train students on other views' targets. If the change is meant, bump "
        "STREAM_VERSION in pipeline/views/rng.py (stores with the old view_stream are then refused) and record the "
        "digests again with `python tests/golden/make.py --digests`; otherwise pin the library back.")


@pytest.mark.parametrize("name", sorted(golden.RECIPES))
def test_the_golden_views_show_every_transform_the_recipe_enables(name):
    _, kind, epochs = golden.RECIPES[name]
    p, aug = golden.pool(kind), golden.recipe(name)
    images, parts, seen = p.images(), TrainParts.of(aug), set()
    with canary.recording(parts, seen):
        for e in range(epochs):
            seen |= canary.epoch_digests(images, p, aug, golden.SEED, e, parts)[1]
    want = canary.enabled(aug, parts)
    assert want <= seen, sorted(want - seen)
    if name == "imagenet":
        assert len([f for f in want if f.startswith("op:")]) >= 14  # timm's RandAugment ops
