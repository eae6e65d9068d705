"""``distill verify``: check every stored unit, then spot-check the targets by re-running the teacher.

Two checks. Integrity (cheap): every done unit is read back and compared with the digests its writer
recorded, so a missing chunk, a flipped byte or a unit whose arrays do not belong together is found
(and named) before a student trains on it; NaN targets are counted. Exactness (sampled): random stored
views are replayed and the teacher re-run on them; if the replay were not exact (a changed transform,
a library upgrade, another seed path) the stored targets would describe other images.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

import store
from pipeline.core.config import AugConfig, Config
from pipeline.core.errors import DistillError
from pipeline.core.files import use_storage_options
from pipeline.core.progress import progress_bar
from pipeline.data.shards import Manifest, open_shards, shard_positions
from pipeline.train.distributed import resolve_device
from pipeline.train.models import load_teacher, resolve_teacher, teacher_forward
from pipeline.train.run_store import store_provenance
from pipeline.views.canary import make_canary, pick_pool, record_canary, require_same_views
from pipeline.views.handover import Finisher
from pipeline.views.loading import UnitDataset
from pipeline.views.plan import check_plan, epoch_plan
from pipeline.views.replay import replay_indices

MIN_AGREEMENT = 0.99
"""Default least hard-label agreement (bf16 on CUDA may flip near-ties)."""
MAX_LOGIT_DIFF = 0.5
"""Default tolerance on |stored - recomputed| logits (measured: see docs/integrity.md, `distill verify`)."""


class VerificationFailed(DistillError):
    """The store is damaged, incomplete, or does not hold what the teacher computes on the replayed views; the
    message is the report's summary and one line per problem."""

    def __init__(self, report: VerifyReport, problems: list[str]) -> None:
        super().__init__("\n".join([report.summary(), *problems]))
        self.report, self.problems = report, problems


@dataclass(frozen=True)
class VerifyReport:
    units: int
    """Done units read back and checked."""
    damaged: list[str] = field(default_factory=list)
    """One message per damaged unit (store, unit, array, what is wrong)."""
    nan: int = 0
    """Units holding NaN targets."""
    checked: int = 0
    agree: int = 0
    max_abs_logit_diff: float = 0.0
    device_view_diff: float | None = None
    """Largest |CPU-finished − device-finished| over a batch of training views; None on a CPU-only run."""
    missing: list[str] = field(default_factory=list)
    """Units not done (a store is complete, or it fails verification)."""
    view_drift: str | None = None
    """What differs between the store's canary views and this environment's (``--allow-view-drift``)."""

    @property
    def agreement(self) -> float:
        return self.agree / max(self.checked, 1)

    def summary(self) -> str:
        """The report in one line."""
        views = ("views finished on the CPU only (no device to compare)" if self.device_view_diff is None else
                 "CPU- and device-finished views identical: stored targets hold on either"
                 if self.device_view_diff == 0 else
                 f"CPU- and device-finished views differ by up to {self.device_view_diff:.3g}: targets stored from "
                 "one device type are approximate on the other")
        return (f"verify: {self.units} unit(s) read back, {len(self.damaged)} damaged, {self.nan} with NaN, "
                f"{len(self.missing)} missing; "
                f"{self.agree}/{self.checked} hard labels agree ({self.agreement:.2%}), "
                f"max |delta logit| {self.max_abs_logit_diff:.4g}; {views}")

    def problems(self, min_agreement: float = MIN_AGREEMENT, max_logit_diff: float = MAX_LOGIT_DIFF) -> list[str]:
        """Why the store fails verification (none: it passes)."""
        out = [*self.damaged]
        if self.missing:
            out.append(f"{len(self.missing)} unit(s) not done, e.g. {', '.join(self.missing[:5])}: the store is "
                       "incomplete; run `distill teacher` to complete it")
        if self.nan:
            out.append(f"{self.nan} unit(s) hold NaN targets")
        if self.checked and self.agreement < min_agreement:
            out.append(f"hard-label agreement {self.agreement:.2%} is below --min-agreement {min_agreement:.2%}: "
                       "the store does not match what the teacher computes on the replayed views")
        if self.max_abs_logit_diff > max_logit_diff:
            out.append(f"max |delta logit| {self.max_abs_logit_diff:.4g} is above --max-logit-diff "
                       f"{max_logit_diff:g}: the stored logits are not this teacher's on these views")
        return out


def check_units(group, progress: bool = False) -> tuple[int, list[str], int, set[tuple[int, int]]]:
    """Read back every done unit: (units read, messages of the damaged ones, units with NaN, good train
    units)."""
    units = [("train", int(e), int(s)) for e, s in np.argwhere(store.done_mask(group))]
    for split in store.VIEW_SPLITS:  # val, and the clean pass over every training image
        units += [(split, 0, int(s)) for s in np.flatnonzero(store.val_done_mask(group, split))]
    damaged, nan, good = [], 0, set()
    with progress_bar(len(units), "verify: checking units", "unit", progress) as bar:
        for split, e, s in units:
            try:
                u = store.read_train_unit(group, e, s) if split == "train" else store.read_val_unit(group, s, split)
            except store.DamagedUnit as err:
                damaged.append(str(err))
            else:
                bad = bool(np.isnan(u.topk_logits).any() or np.isnan(u.logsumexp).any())
                nan += bad
                if split == "train" and not bad:
                    good.add((e, s))
            bar.update(1)
    return len(units), damaged, nan, good


def _picks(manifest: Manifest, good: set[tuple[int, int]], samples: int, seed: int) -> dict[tuple[int, int], set[int]]:
    """``samples`` random (epoch, index) pairs among the good units, grouped by unit."""
    rng = np.random.default_rng(seed)
    units = sorted(good)
    ranges = manifest.ranges("train")
    by_unit: dict[tuple[int, int], set[int]] = {}
    for i in rng.integers(len(units), size=samples):
        e, s = units[int(i)]
        a, b = ranges[s]
        by_unit.setdefault((e, s), set()).add(int(rng.integers(a, b)))
    return by_unit


def run(cfg: Config, *, samples: int = 64, seed: int = 0, device: str = "auto", progress: bool = False,
        min_agreement: float = MIN_AGREEMENT, max_logit_diff: float = MAX_LOGIT_DIFF,
        allow_view_drift: bool = False) -> VerifyReport:
    """Check every unit, then re-run the teacher on ``samples`` random stored views and compare; the report, or
    VerificationFailed naming every problem."""
    report = _report(cfg, samples, seed, device, progress, "allow" if allow_view_drift else "check")
    problems = report.problems(min_agreement, max_logit_diff)
    if problems:
        raise VerificationFailed(report, problems)
    return report


def stamp(cfg: Config, *, samples: int = 256, seed: int = 0, device: str = "auto", progress: bool = False,
          max_logit_diff: float = MAX_LOGIT_DIFF) -> VerifyReport:
    """Give a store written before views were fingerprinted its view canary, once ``samples`` of its stored views,
    replayed here, get exactly the teacher's stored hard labels (and logits within ``max_logit_diff``), and every
    done unit reads back whole: then this environment makes the views the store was written for, and its canary
    is what every later reader checks against (an incomplete store can then be completed by ``distill teacher``).
    A store that has a canary is only checked."""
    use_storage_options(cfg.storage_options)
    group = store.open_store(cfg.store.path)
    if "views" in group.attrs.asdict()["provenance"]:
        require_same_views(group, str(cfg.store.path))
        print(f"stamp: {cfg.store.path} has a view canary already, and this environment reproduces it")
        return _report(cfg, 0, seed, device, progress, "check")
    report = _report(cfg, samples, seed, device, progress, "skip")
    problems = replace(report, missing=[]).problems(1.0, max_logit_diff)  # views, not completeness (verify's)
    if problems:
        raise VerificationFailed(report, ["not stamped:", *problems])
    pool = pick_pool(open_shards(cfg))
    record_canary(group, pool)
    store.annotate(cfg.store.path, "views", make_canary(pool, cfg.aug, cfg.seed))
    print(f"stamp: {report.agree}/{report.checked} stored views replayed here get the teacher's stored answers; "
          f"recorded this environment's view canary in {cfg.store.path}")
    return report


def missing_units(group) -> list[str]:
    """Every unit the store's layout has and no done record marks, named."""
    out = [f"train (epoch {e}, shard {s})" for e, s in np.argwhere(~store.done_mask(group))]
    for split in store.VIEW_SPLITS:
        out += [f"{split} shard {s}" for s in np.flatnonzero(~store.val_done_mask(group, split))]
    return out


def _report(cfg: Config, samples: int, seed: int, device: str, progress: bool, views: str) -> VerifyReport:
    """``views``: "check" the store's canary, "allow" it to differ (saying so), or "skip" it (a store to stamp)."""
    use_storage_options(cfg.storage_options)
    dev = resolve_device(device)
    manifest = open_shards(cfg)
    cfg = resolve_teacher(cfg)
    model, sha = load_teacher(cfg.teacher, num_classes=manifest.num_classes, in_chans=cfg.aug.channels)
    model.to(dev).eval()
    group = store.open_store(cfg.store.path, expected=store_provenance(cfg, manifest, sha))
    drift = require_same_views(group, str(cfg.store.path), allow_drift=views == "allow") if views != "skip" else None
    n_units, damaged, nan, good = check_units(group, progress)
    if n_units == 0:
        raise store.MissingUnit(f"{cfg.store.path}: no completed units to verify; run `distill teacher`")
    ranges = manifest.ranges("train")
    checked = agree = 0
    max_diff = 0.0
    for (e, s), idx in sorted(_picks(manifest, good, samples, seed).items()) if good else []:
        plan = epoch_plan(cfg.aug, cfg.seed, e, s, *ranges[s])
        needed = sorted(set(idx) | {int(plan.partner[i - plan.start]) for i in idx})  # and their partners: by range
        samples = shard_positions(manifest, "train", s, [i - plan.start for i in needed])
        views = replay_indices(samples, plan, sorted(idx), aug=cfg.aug, seed=cfg.seed)
        order = sorted(views)
        logits = teacher_forward(model, torch.stack([views[i] for i in order]), dev).numpy()
        unit = store.read_train_unit(group, e, s)
        check_plan(str(cfg.store.path), unit.plan, plan)
        rows = np.array(order) - ranges[s][0]
        agree += int((logits.argmax(1) == unit.hard_label[rows]).sum())
        recomputed = np.take_along_axis(logits, unit.topk_classes[rows].astype(np.int64), axis=1)
        max_diff = max(max_diff, float(np.abs(recomputed - unit.topk_logits[rows]).max()))
        checked += len(order)
    view_diff = device_view_diff(manifest, cfg.aug, cfg.seed, min(good), dev) if good else None
    return VerifyReport(n_units, damaged, nan, checked, agree, max_diff, view_diff, missing_units(group), drift)


def device_view_diff(manifest: Manifest, aug: AugConfig, seed: int, unit: tuple[int, int],
                     device: torch.device) -> float | None:
    """Finish one batch of a unit's raw training views on the CPU and on ``device``: the largest difference
    (0 means targets stored from views made on one device type hold for the other). None on the CPU."""
    if device.type == "cpu":
        return None
    raw = next(iter(UnitDataset(manifest, aug, seed, [unit], batch_size=64)))
    finish = Finisher(aug)
    return float((finish(raw, "cpu") - finish(raw, device).cpu()).abs().max())
