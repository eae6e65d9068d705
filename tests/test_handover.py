"""The uint8 hand-over: views finished in the trainer equal, to the bit, the views one process makes with the
whole transform (``train_transform`` then ``mix_views``, the path every store before the hand-over was
written with), for every erasing mode, gray and colour, through 0 and 2 DataLoader workers; and a store
written from such views is accepted and agrees exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import derive, make_config, make_idx, save_random_teacher

import store
from pipeline.core.config import Config
from pipeline.data.shards import decode_sample, load_manifest, shard_samples
from pipeline.views.augment import train_transform
from pipeline.views.handover import Finisher, mix_views
from pipeline.views.loading import UnitDataset, make_loader, train_stream
from pipeline.views.plan import KIND_CUTMIX, KIND_MIXUP, epoch_plan
from pipeline.views.replay import base_views
from stages import ingest, verify

AUG = {"mix_prob": 1.0, "mixup": 0.8, "cutmix": 1.0, "reprob": 1.0, "recount": 2, "window": 6,
       "auto_augment": "rand-m9-mstd0.5-inc1"}


def shards(tmp_path, channels: int, **aug) -> Config:
    root = make_idx(tmp_path / "idx", 24, 4, size=20, classes=4, channels=channels)
    cfg = make_config(tmp_path, {"source": "idx", "root": str(root), "shard_size": 12},
                      aug={"img_size": 16, "channels": channels, "mean": [0.5] * channels, "std": [0.25] * channels,
                           **AUG, **aug})
    ingest.run(cfg, progress=False)
    return cfg


def one_process_views(cfg: Config, epoch: int) -> dict[int, bytes]:
    """The reference: every view made whole in this process, as before the hand-over."""
    m, transform, out = load_manifest(cfg.data.shards), train_transform(cfg.aug), {}
    for s, (a, b) in enumerate(m.ranges("train")):
        plan = epoch_plan(cfg.aug, cfg.seed, epoch, s, a, b)
        images = [decode_sample(raw)[2] for raw in shard_samples(m, "train", s)]
        base = base_views(transform, images, cfg.seed, epoch, range(a, b))
        for r in range(b - a):
            p = int(plan.partner[r]) - a
            view = mix_views(base[r], base[p], int(plan.kind[r]), float(plan.lam[r]), plan.box[r])
            out[a + r] = view.numpy().tobytes()
    return out


def handed_over(cfg: Config, epoch: int, workers: int) -> dict[int, bytes]:
    m = load_manifest(cfg.data.shards)
    ds = UnitDataset(m, cfg.aug, cfg.seed, [(epoch, s) for s in range(len(m.shards("train")))], batch_size=5)
    loader = make_loader(ds, workers)
    out = {}
    for b in loader:
        assert b.view.dtype == torch.float32
        out.update({int(i): v.numpy().tobytes() for i, v in zip(b.index, b.view, strict=True)})
    pixels = 16 * 16 * cfg.aug.channels  # uint8 own + partner views, their erased boxes, the CutMix box
    assert loader.bytes_per_sample == 2 * pixels + 2 * cfg.aug.recount * 5 * 8 + 4 * 8
    return out


@pytest.mark.parametrize(("channels", "remode"), [(1, "pixel"), (3, "pixel"), (3, "rand"), (3, "const")])
def test_views_finished_in_the_trainer_equal_the_one_process_views_to_the_bit(tmp_path, channels, remode):
    cfg = shards(tmp_path, channels, remode=remode)
    reference = one_process_views(cfg, epoch=1)
    for workers in (0, 2):
        assert handed_over(cfg, 1, workers) == reference


@pytest.mark.parametrize("workers", [0, 2])
def test_the_students_stream_finishes_the_same_views_as_one_process(tmp_path, workers):
    """The student stage's loader (window pieces dealt to workers, shuffle buffer of shared uint8 views)."""
    cfg = shards(tmp_path, 3)
    reference = one_process_views(cfg, epoch=0)
    ds, loader = train_stream(load_manifest(cfg.data.shards), cfg.aug, cfg.seed, batch_size=4, view_epoch=lambda t: 0,
                              rank=0, world=1, shuffle=8, workers=workers)
    ds.set_epoch(0)
    got = {int(i): v.numpy().tobytes() for b in loader for i, v in zip(b.index, b.view, strict=True)}
    assert len(got) == 24 and all(got[i] == reference[i] for i in got)


def test_finishing_a_batch_on_the_cpu_twice_gives_the_same_bits(tmp_path):
    """The finisher keeps no state between batches (noise generators are re-seeded per box)."""
    cfg = shards(tmp_path, 3)
    m = load_manifest(cfg.data.shards)
    raw = next(iter(UnitDataset(m, cfg.aug, cfg.seed, [(0, 0)], batch_size=12)))
    assert raw.view.dtype == torch.uint8 and int((raw.raw.erase[:, :, 2] > 0).sum()) > 0  # boxes were erased
    finish = Finisher(cfg.aug)
    assert torch.equal(finish(raw), finish(raw))


def test_the_devices_batched_finishing_gives_the_cpus_per_sample_bits(tmp_path):
    """A device finishes whole batches, the CPU one sample at a time in place: the same operations per element
    (run here on the CPU, the only device a test has)."""
    cfg = shards(tmp_path, 3)
    m = load_manifest(cfg.data.shards)
    raw = next(iter(UnitDataset(m, cfg.aug, cfg.seed, [(0, 0)], batch_size=12)))
    assert {KIND_MIXUP, KIND_CUTMIX} <= set(raw.kind.tolist()) and int((raw.raw.erase[:, :, 2] > 0).sum()) > 0
    finish = Finisher(cfg.aug)
    assert torch.equal(finish.batched(raw, torch.device("cpu")), finish(raw, "cpu"))


def test_a_store_written_from_one_process_views_is_accepted_and_agrees_exactly(tmp_path):
    """As a store written before the hand-over (and before the view canary): its targets come from whole
    one-process views; stamping it replays through the hand-over and finds every logit again."""
    cfg = shards(tmp_path, 1, reprob=0.25, recount=1)
    ckpt = save_random_teacher(cfg, tmp_path / "teacher.pt", seed=0, num_classes=4)
    cfg = derive(cfg, teacher={"checkpoint": str(ckpt), "epochs": 1, "topk": 4})
    from pipeline.train.models import load_teacher
    from pipeline.train.run_store import store_provenance, store_spec

    m = load_manifest(cfg.data.shards)
    model, sha = load_teacher(cfg.teacher, num_classes=4, in_chans=1)
    group = store.create_store(cfg.store.path, store_spec(cfg, m), store_provenance(cfg, m, sha))
    views = one_process_views(cfg, epoch=0)
    for s, (a, b) in enumerate(m.ranges("train")):
        x = torch.stack([torch.from_numpy(np.frombuffer(views[i], dtype=np.float32).reshape(1, 16, 16).copy())
                         for i in range(a, b)])
        with torch.no_grad():
            logits = model(x).numpy()
        tl, tc, _, lse = store.topk_from_logits(logits, 4)
        plan = epoch_plan(cfg.aug, cfg.seed, 0, s, a, b)
        labels = np.array([decode_sample(r)[1] for r in shard_samples(m, "train", s)])
        store.write_train_unit(group, 0, s, topk_logits=tl, topk_classes=tc, logsumexp=lse, label=labels,
                               plan=(plan.partner, plan.kind, plan.lam))
    report = verify.stamp(cfg, samples=24, device="cpu")
    assert report.units == 2 and report.checked >= 10 and report.agreement == 1.0
    assert report.max_abs_logit_diff <= 2e-3  # the stored top-k logits are float16
    assert report.device_view_diff is None  # a CPU-only run: no device to compare
