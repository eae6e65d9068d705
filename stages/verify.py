"""``distill verify``: spot-check the logit store by replaying sampled views and re-running the teacher.

If the replay were not exact (a changed transform, a library upgrade, a different seed path), the
stored targets would silently describe other images; this catches it before a student trains on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import store
from pipeline.augment import train_transform
from pipeline.config import Config
from pipeline.distributed import resolve_device
from pipeline.models import load_teacher, resolve_teacher, teacher_forward
from pipeline.plan import check_plan, epoch_plan
from pipeline.replay import replay_indices
from pipeline.run_store import store_provenance
from pipeline.shards import open_shards, read_shard


@dataclass(frozen=True)
class VerifyReport:
    checked: int
    agree: int
    max_abs_logit_diff: float

    @property
    def agreement(self) -> float:
        return self.agree / max(self.checked, 1)


def run(cfg: Config, *, samples: int = 64, seed: int = 0, device: str = "auto") -> VerifyReport:
    """Re-run the teacher on ``samples`` random stored (epoch, index) pairs; compare with the store."""
    dev = resolve_device(device)
    manifest = open_shards(cfg)
    cfg = resolve_teacher(cfg)
    model, sha = load_teacher(cfg.teacher, num_classes=manifest.num_classes, in_chans=cfg.aug.channels)
    model.to(dev).eval()
    prov = store_provenance(cfg, manifest, sha)
    group = store.open_store(Path(cfg.store.path), expected=prov)
    done = store.done_mask(group)
    ranges = manifest.ranges("train")
    starts = np.array([a for a, _ in ranges])
    rng = np.random.default_rng(seed)
    done_units = np.argwhere(done)
    if len(done_units) == 0:
        raise store.MissingUnit(f"{cfg.store.path}: no completed units to verify; run `distill teacher`")
    picks = done_units[rng.integers(len(done_units), size=samples)]
    by_unit: dict[tuple[int, int], set[int]] = {}
    for e, s in picks:
        a, b = ranges[s]
        by_unit.setdefault((int(e), int(s)), set()).add(int(rng.integers(a, b)))

    transform = train_transform(cfg.aug)
    paths = manifest.shard_paths("train")
    checked = agree = 0
    max_diff = 0.0
    for (e, s), idx in sorted(by_unit.items()):
        a, b = ranges[s]
        plan = epoch_plan(cfg.aug, cfg.seed, e, s, a, b)
        views = replay_indices(read_shard(paths[s]), plan, sorted(idx), transform=transform, seed=cfg.seed)
        order = sorted(views)
        logits = teacher_forward(model, torch.stack([views[i] for i in order]), dev).numpy()
        unit = store.read_train_unit(group, e, s)
        check_plan(str(cfg.store.path), unit, plan)
        rows = np.array(order) - starts[s]
        agree += int((logits.argmax(1) == unit.hard_label[rows]).sum())
        recomputed = np.take_along_axis(logits, unit.topk_classes[rows].astype(np.int64), axis=1)
        max_diff = max(max_diff, float(np.abs(recomputed - unit.topk_logits[rows]).max()))
        checked += len(order)
    return VerifyReport(checked, agree, max_diff)
