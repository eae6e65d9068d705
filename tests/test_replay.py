"""The replay contract: a view is a pure function of (image, seed, epoch, index, aug config).

Scoping of global RNGs and the per-view streams are tested in test_rng.py."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_idx
from PIL import Image

from pipeline.core.config import AugConfig, Config
from pipeline.data.shards import ShardError, load_manifest, shard_samples
from pipeline.views.handover import TrainParts, mix_views
from pipeline.views.loading import UnitDataset, make_loader
from pipeline.views.plan import KIND_CUTMIX, KIND_MIXUP, KIND_NONE, epoch_plan, soft_target
from pipeline.views.replay import ReplayError, replay_indices, replay_unit
from stages import ingest

AUG = {
    "img_size": 16, "channels": 1, "mean": [0.5], "std": [0.25], "scale": [0.3, 1.0],
    "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.5, "remode": "pixel", "window": 8,
    "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1, "crop_pct": 1.0,
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Config, Path]:
    tmp = tmp_path_factory.mktemp("replay")
    root = make_idx(tmp / "idx", 40, 8, size=16)
    cfg = Config.model_validate(
        {"seed": 3, "data": {"root": str(root), "shards": str(tmp / "shards"), "shard_size": 12}, "aug": AUG}
    )
    ingest.run(cfg, progress=False)
    return cfg, tmp / "shards"


def _collect(cfg: Config, shards: Path, epoch: int = 0, **kw) -> dict[int, tuple[bytes, bytes, int, int]]:
    m = load_manifest(shards)
    units = kw.pop("units", [(epoch, s) for s in range(len(m.ranges("train")))])
    ds = UnitDataset(m, cfg.aug, cfg.seed, units, batch_size=kw.pop("batch_size", 5))
    loader = make_loader(ds, kw.pop("num_workers", 0))
    out = {}
    for b in loader:
        for j in range(len(b.index)):
            out[int(b.index[j])] = (
                b.view[j].numpy().tobytes(), b.target[j].numpy().tobytes(), int(b.partner[j]), int(b.kind[j])
            )
    return out


def test_views_identical_for_0_and_2_workers(shards):
    cfg, path = shards
    a = _collect(cfg, path, num_workers=0)
    b = _collect(cfg, path, num_workers=2)
    assert sorted(a) == list(range(40))
    assert a == b


def test_views_identical_across_batch_sizes(shards):
    cfg, path = shards
    assert _collect(cfg, path, batch_size=1) == _collect(cfg, path, batch_size=16)


def test_views_identical_across_shard_read_orders(shards):
    cfg, path = shards
    assert _collect(cfg, path, units=[(0, 3), (0, 1), (0, 2), (0, 0)]) == _collect(cfg, path)


def test_views_identical_in_fresh_process(shards):
    cfg, path = shards
    here = hashlib.sha256(repr(sorted(_collect(cfg, path).items())).encode()).hexdigest()
    code = (
        "import hashlib, sys; sys.path.insert(0, 'tests'); from test_replay import _collect;"
        "from pipeline.core.config import Config;"
        "import json; cfg = Config.model_validate(json.loads(sys.argv[1]));"
        "print(hashlib.sha256(repr(sorted(_collect(cfg, __import__('pathlib').Path(sys.argv[2])).items()))"
        ".encode()).hexdigest())"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code, cfg.model_dump_json(), str(path)],
        cwd=root, capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == here


def test_different_epochs_give_different_views(shards):
    cfg, path = shards
    a, b = _collect(cfg, path, epoch=0), _collect(cfg, path, epoch=1)
    assert sum(a[i][0] != b[i][0] for i in a) == len(a)


def test_different_seeds_give_different_plans():
    aug = AugConfig.model_validate(AUG)
    p0, p1 = epoch_plan(aug, 0, 0, 0, 0, 64), epoch_plan(aug, 1, 0, 0, 0, 64)
    assert not np.array_equal(p0.partner, p1.partner)
    assert not np.array_equal(p0.lam, p1.lam)


def test_plan_is_pure_and_partners_stay_in_window():
    aug = AugConfig.model_validate(AUG)
    a, b = epoch_plan(aug, 5, 2, 1, 100, 150), epoch_plan(aug, 5, 2, 1, 100, 150)
    for f in ("partner", "kind", "lam", "box"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    local = a.partner - 100
    assert ((local // aug.window) == (np.arange(50) // aug.window)).all()
    assert (a.partner != np.arange(100, 150))[a.kind != KIND_NONE].all()


def test_mixup_lambda_follows_beta():
    aug = AugConfig.model_validate({**AUG, "cutmix": 0.0, "window": 256})
    lam = epoch_plan(aug, 0, 0, 0, 0, 20000).lam.astype(np.float64)
    ref = np.sort(np.random.default_rng(123).beta(0.8, 0.8, size=20000))
    grid = np.linspace(0.0, 1.0, 101)
    ks = np.max(np.abs(np.searchsorted(np.sort(lam), grid) - np.searchsorted(ref, grid))) / 20000
    assert ks < 0.03, ks
    assert abs(lam.mean() - 0.5) < 0.02


def test_cutmix_lambda_equals_kept_area():
    aug = AugConfig.model_validate({**AUG, "mixup": 0.0, "img_size": 32})
    plan = epoch_plan(aug, 0, 0, 0, 0, 200)
    assert (plan.kind == KIND_CUTMIX).sum() > 150
    for i in np.flatnonzero(plan.kind == KIND_CUTMIX):
        lam = float(plan.lam[i])
        out = mix_views(torch.zeros(1, 32, 32), torch.ones(1, 32, 32), KIND_CUTMIX, lam, plan.box[i])
        assert abs(1.0 - out.mean().item() - float(plan.lam[i])) < 1e-6


def test_soft_target_sums_to_one_and_mixes_labels_with_smoothing():
    t = soft_target(2, 7, 0.3, 10, 0.1)
    assert abs(t.sum() - 1.0) < 1e-6
    off = 0.1 / 10
    assert t[2] == pytest.approx(0.3 * (1 - 0.1) + off)
    assert t[7] == pytest.approx(0.7 * (1 - 0.1) + off)
    assert t[0] == pytest.approx(off)


def test_stream_targets_match_plan_labels(shards):
    cfg, path = shards
    m = load_manifest(path)
    ds = UnitDataset(m, cfg.aug, cfg.seed, [(0, 0), (0, 1)], batch_size=7)
    samples = {int(b.index[j]): SimpleNamespace(label=int(b.label[j]), partner=int(b.partner[j]), kind=int(b.kind[j]),
                                                lam=float(b.lam[j]), target=b.target[j])
               for b in ds for j in range(len(b))}
    mixed = [s for s in samples.values() if s.kind in (KIND_MIXUP, KIND_CUTMIX)]
    assert mixed
    for s in samples.values():
        assert abs(float(s.target.sum()) - 1.0) < 1e-5
        expect = soft_target(s.label, samples[s.partner].label, s.lam, m.num_classes, cfg.aug.smoothing)
        assert np.allclose(s.target.numpy(), expect)


def _unit(shards, shard: int):
    """(cfg, manifest, plan, end, raw samples) of one epoch-0 unit, to tamper with."""
    cfg, path = shards
    m = load_manifest(path)
    start, end = m.ranges("train")[shard]
    plan = epoch_plan(cfg.aug, cfg.seed, 0, shard, start, end)
    return cfg, m, plan, end, list(shard_samples(m, "train", shard))


def _replay(cfg, m, plan, end, samples) -> list:
    return list(replay_unit(samples, plan, end, parts=TrainParts.of(cfg.aug), aug=cfg.aug, seed=cfg.seed,
                            num_classes=m.num_classes))


def test_out_of_order_shard_is_refused(shards):
    cfg, m, plan, end, samples = _unit(shards, 1)
    samples[0], samples[1] = samples[1], samples[0]
    with pytest.raises(ReplayError, match="expected sample index"):
        _replay(cfg, m, plan, end, samples)


@pytest.mark.parametrize(("change", "message"), [("drop", "shard ended at index"), ("extra", "more sample")])
def test_shard_shorter_or_longer_than_the_manifest_is_refused(shards, change, message):
    cfg, m, plan, end, samples = _unit(shards, 1)
    samples = samples[:-1] if change == "drop" else samples + samples[-1:]
    with pytest.raises(ReplayError, match=message):
        _replay(cfg, m, plan, end, samples)


def test_a_sample_with_a_non_integer_index_is_refused_by_name(shards):
    cfg, _, plan, _, samples = _unit(shards, 0)
    samples[2] = {**samples[2], "idx": b"x2"}
    with pytest.raises(ShardError, match="field 'idx' is not an integer: 'x2'"):
        replay_indices(samples, plan, [plan.start], aug=cfg.aug, seed=cfg.seed)


@pytest.mark.parametrize(("img_size", "crop_pct", "channels", "shape"), [
    (28, 1.0, 1, (28, 28)), (32, 0.875, 3, (40, 33, 3)), (64, 0.9, 3, (50, 90, 3)),
])
def test_the_eval_view_is_resize_centre_crop_normalise(img_size, crop_pct, channels, shape):
    """timm's transforms_imagenet_eval gives exactly the view written out by hand (gray models: channel 0)."""
    from torchvision.transforms import functional as F

    from pipeline.views.augment import eval_transform

    stats = {"mean": (0.3,) * channels, "std": (0.4,) * channels}
    aug = AugConfig(img_size=img_size, crop_pct=crop_pct, channels=channels, **stats)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    x = F.to_tensor(F.center_crop(F.resize(img.convert("RGB"), int(img_size / crop_pct),
                                           interpolation=F.InterpolationMode.BICUBIC), img_size))[:channels]
    want = F.normalize(x, stats["mean"], stats["std"])
    assert torch.equal(eval_transform(aug)(img), want)
