"""The epoch plan: which partner, mix kind, λ and CutMix box each sample gets in a view epoch.

Partners are paired inside bounded windows of a shard's own sample order (a random cycle over each
window, so nobody is its own partner when the window holds two or more samples), which lets a
streaming reader build every mixed view with one window of buffer and no random access. The plan is
a pure function of (seed, view epoch, shard, shard range, config): it is stored beside the teacher's
targets and re-derived by the student, and the two must agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.config import AugConfig
from pipeline.core.errors import DistillError
from pipeline.views.rng import TAG_PLAN, derive_seed
from store.layout import KIND_CUTMIX, KIND_MIXUP, KIND_NAMES, KIND_NONE
from store.records import plan_digest

__all__ = ["KIND_CUTMIX", "KIND_MIXUP", "KIND_NAMES", "KIND_NONE", "EpochPlan", "PlanMismatch",
           "check_plan", "epoch_plan", "soft_target", "stored_epoch"]


def stored_epoch(train_epoch: int, stored_epochs: int) -> int:
    """The stored epoch (0 .. E-1) whose views student epoch ``train_epoch`` replays: ``t mod E``."""
    return train_epoch % stored_epochs


class PlanMismatch(DistillError):
    """Stored targets were written for another mix plan than the one being replayed."""


@dataclass(frozen=True)
class EpochPlan:
    """Plan arrays for one (view epoch, shard) unit; row i is global index ``start + i``."""

    view_epoch: int  # a stored epoch (0 .. E-1), or a teacher-fit view epoch, which is never stored
    shard: int
    start: int
    partner: np.ndarray  # int64 global index of the partner (itself when unmixed)
    kind: np.ndarray  # uint8 KIND_*
    lam: np.ndarray  # float32 weight of the sample itself (CutMix: the kept area)
    box: np.ndarray  # int32 (n, 4) y0, y1, x0, x1 of the pasted CutMix region (zeros otherwise)

    def __len__(self) -> int:
        return len(self.partner)


def _pairing(rng: np.random.Generator, n: int, window: int) -> np.ndarray:
    partner = np.arange(n, dtype=np.int64)
    for w0 in range(0, n, window):
        w = min(window, n - w0)
        perm = rng.permutation(w)
        if w >= 2:
            partner[w0 + perm] = w0 + np.roll(perm, -1)
    return partner


def _boxes(rng: np.random.Generator, lam: np.ndarray, img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """timm's rand_bbox, vectorised over samples with an explicit generator; λ corrected to the area."""
    ratio = np.sqrt(1.0 - lam)
    cut = (img_size * ratio).astype(np.int64)
    cy = rng.integers(0, img_size, size=len(lam))
    cx = rng.integers(0, img_size, size=len(lam))
    y0 = np.clip(cy - cut // 2, 0, img_size)
    y1 = np.clip(cy + cut // 2, 0, img_size)
    x0 = np.clip(cx - cut // 2, 0, img_size)
    x1 = np.clip(cx + cut // 2, 0, img_size)
    area = (y1 - y0) * (x1 - x0)
    corrected = 1.0 - area / float(img_size * img_size)
    return np.stack([y0, y1, x0, x1], axis=1).astype(np.int32), corrected


def epoch_plan(aug: AugConfig, seed: int, view_epoch: int, shard: int, start: int, end: int) -> EpochPlan:
    """Derive the plan of one unit. Every draw happens for every sample, so the plan is stable."""
    n = end - start
    rng = np.random.default_rng(derive_seed(TAG_PLAN, seed, view_epoch, shard))
    local = _pairing(rng, n, aug.window)
    mixed = rng.random(n) < aug.mix_prob
    use_cutmix = rng.random(n) < aug.switch_prob
    lam_mixup = rng.beta(aug.mixup, aug.mixup, size=n) if aug.mixup > 0 else np.ones(n)
    lam_cutmix = rng.beta(aug.cutmix, aug.cutmix, size=n) if aug.cutmix > 0 else np.ones(n)
    box, lam_box = _boxes(rng, lam_cutmix, aug.img_size)

    if aug.mixup > 0 and aug.cutmix > 0:
        cutmix = use_cutmix
    else:
        cutmix = np.full(n, aug.cutmix > 0)
    mixed &= (aug.mixup > 0) | (aug.cutmix > 0)
    mixed &= local != np.arange(n)

    kind = np.where(mixed, np.where(cutmix, KIND_CUTMIX, KIND_MIXUP), KIND_NONE).astype(np.uint8)
    lam = np.where(kind == KIND_CUTMIX, lam_box, np.where(kind == KIND_MIXUP, lam_mixup, 1.0))
    box = np.where((kind == KIND_CUTMIX)[:, None], box, 0).astype(np.int32)
    partner = np.where(mixed, local, np.arange(n)) + start
    return EpochPlan(view_epoch, shard, start, partner.astype(np.int64), kind, lam.astype(np.float32), box)


def soft_target(
    label: int, partner_label: int, lam: float, num_classes: int, smoothing: float
) -> np.ndarray:
    """timm's mixup_target for one sample: λ·smooth(y) + (1-λ)·smooth(y_partner). A dropped label (``num_classes``:
    pipeline.data.labels) puts no mass in it: its share of the target is left out, so no head learns it."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    own, other = label < num_classes, partner_label < num_classes
    target = np.full(num_classes, off * lam * own + off * (1.0 - lam) * other, dtype=np.float64)
    if own:
        target[label] += (on - off) * lam
    if other:
        target[partner_label] += (on - off) * (1.0 - lam)
    return target.astype(np.float32)


def check_plan(where: str, stored: str | None, plan: EpochPlan) -> None:
    """Refuse stored targets written for another mix plan than the one being replayed (``stored`` is the
    digest the teacher stage recorded): training on targets that describe other images would fail silently,
    so it fails loudly instead. ``where`` names the store."""
    if stored is None or stored == plan_digest(plan.partner, plan.kind, plan.lam):
        return
    mixed = int((plan.kind != KIND_NONE).sum())
    raise PlanMismatch(
        f"logit store {where}: unit (epoch {plan.view_epoch}, shard {plan.shard}) was written with another mix plan "
        f"than the one replayed now ({mixed} of {len(plan)} samples mixed in the replayed plan; the stored plan's "
        "digest differs). Refusing to train on misaligned targets: re-run `distill teacher` for this config."
    )
