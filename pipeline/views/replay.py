"""The one stream function both stages use: shard samples in, replayed training views out.

A view is a pure function of (image bytes, run seed, view epoch, global index, augmentation config). The
batch size, worker count, rank count, shard read order and process never enter it: per-sample draws
come from the stream ``view_keys(seed, view_epoch, index)`` and the mixing comes from the plan of the
sample's (view epoch, shard) unit. Mixed views need the partner's base view, which lives in the same
window of the same shard, so a reader holds at most one window of base views.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.core.config import AugConfig
from pipeline.core.errors import DistillError
from pipeline.data.shards import decode_sample, sample_index
from pipeline.views.handover import Finisher, RawView, TrainParts, raw_view
from pipeline.views.plan import EpochPlan, soft_target
from pipeline.views.rng import streams, view_keys, views_scope
from pipeline.views.samples import Raw, Sample, collate


class ReplayError(DistillError, RuntimeError):
    """The shards do not hold what the manifest and the plan promise."""


def base_view(transform: Callable, img: Image.Image, seed: int, view_epoch: int, index: int) -> torch.Tensor:
    """The un-mixed augmented view of one sample in one view epoch."""
    return base_views(transform, [img], seed, view_epoch, [index])[0]


def base_views(
    transform: Callable, images: Iterable[Image.Image], seed: int, view_epoch: int,
    indices: Sequence[int] | np.ndarray
) -> list[torch.Tensor]:
    """The un-mixed views of ``indices``: equal to :func:`base_view` of each, with their random streams set up
    in one vectorised pass. ``images`` may be lazy (each is dropped once its view is made)."""
    out = []
    draws = streams(view_keys(seed, view_epoch, np.asarray(indices, dtype=np.int64)))
    with views_scope() as use:
        for img, draw in zip(images, draws, strict=True):
            use(draw)
            out.append(transform(img))
    return out


def raw_views(
    parts: TrainParts, images: Iterable[Image.Image], seed: int, view_epoch: int,
    indices: Sequence[int] | np.ndarray
) -> list[RawView]:
    """The raw (uint8, to be finished) base views of ``indices``: :func:`base_views`' draws, handed over."""
    out = []
    draws = streams(view_keys(seed, view_epoch, np.asarray(indices, dtype=np.int64)))
    with views_scope(record_erasing=True) as use:
        for img, draw in zip(images, draws, strict=True):
            use(draw)
            out.append(raw_view(parts, img))
    return out


def piece_needs(plan: EpochPlan, first: int, lo: int, hi: int) -> np.ndarray:
    """Sorted positions (in the window starting at global index ``first``) whose base views replaying positions
    ``lo .. hi - 1`` needs: those, and their Mixup/CutMix partners (always in the same window)."""
    rows = first - plan.start + np.arange(lo, hi)
    return np.union1d(np.arange(lo, hi), plan.partner[rows] - first)


def replay_piece(
    samples: Iterator[dict],
    plan: EpochPlan,
    first: int,
    lo: int,
    hi: int,
    *,
    parts: TrainParts,
    aug: AugConfig,
    seed: int,
    num_classes: int,
    source: str = "shard",
) -> Iterator[Sample]:
    """Replay positions ``lo .. hi - 1`` of the mixing window that starts at global index ``first``, as raw
    views (a sample and its partner share their uint8 base views in memory).

    ``samples`` yields exactly the window's raw samples at ``piece_needs(...)`` (in order; it is advanced past
    them and no further). A view is the same whatever piece of its window it is made in."""
    needed = piece_needs(plan, first, lo, hi)
    labels: dict[int, int] = {}
    images = _decoded(samples, first, needed, labels, source)
    views = dict(zip(needed.tolist(), raw_views(parts, images, seed, plan.view_epoch, first + needed), strict=True))
    for j in range(lo, hi):
        r = first - plan.start + j
        p = int(plan.partner[r]) - first
        target = soft_target(labels[j], labels[p], float(plan.lam[r]), num_classes, aug.smoothing)
        yield training_sample(plan, r, labels[j], torch.from_numpy(target), views[j], views[p])


def training_sample(plan: EpochPlan, row: int, label: int, target: torch.Tensor, own: RawView,
                    partner: RawView) -> Sample:
    """The raw training sample of row ``row`` of a unit's plan, from its and its partner's raw views."""
    return Sample(
        index=plan.start + row, label=label, target=target, view=own.image, view_epoch=plan.view_epoch,
        partner=int(plan.partner[row]), kind=int(plan.kind[row]), lam=float(plan.lam[row]),
        raw=Raw(erase=own.erase, partner_view=partner.image, partner_erase=partner.erase,
                box=torch.from_numpy(plan.box[row].astype(np.int64))),
    )


def replay_unit(
    samples: Iterable[dict],
    plan: EpochPlan,
    end: int,
    *,
    parts: TrainParts,
    aug: AugConfig,
    seed: int,
    num_classes: int,
    source: str = "shard",
) -> Iterator[Sample]:
    """Replay one (view epoch, shard) unit from its samples in shard order, one whole window at a time."""
    it = iter(samples)
    for first in range(plan.start, end, aug.window):
        count = min(aug.window, end - first)
        yield from replay_piece(it, plan, first, 0, count, parts=parts, aug=aug, seed=seed,
                                num_classes=num_classes, source=source)
    extra = sum(1 for _ in it)
    if extra:
        raise ReplayError(f"{source}: {extra} more sample(s) after index {end - 1}, where the manifest ends the shard")


def _decoded(
    it: Iterator[dict], first: int, needed: np.ndarray, labels: dict[int, int], source: str
) -> Iterator[Image.Image]:
    """The images of window positions ``needed`` (sorted) from ``it``, which yields exactly those samples, in
    order (each checked to be the one expected); the labels go to ``labels``."""
    for want in needed.tolist():
        raw = next(it, None)
        if raw is None:
            raise ReplayError(f"{source}: shard ended at index {first + want}, the manifest says more")
        index = sample_index(raw)
        if index != first + want:
            raise ReplayError(f"{source}: expected sample index {first + want}, found {index}")
        _, label, img = decode_sample(raw)
        labels[want] = label
        yield img


def eval_unit(
    samples: Iterable[dict], transform: Callable, num_classes: int, start: int, end: int, source: str = "-"
) -> Iterator[Sample]:
    """Deterministic evaluation views (no augmentation) with one-hot targets."""
    expected = start
    for raw in samples:
        index, label, img = decode_sample(raw)
        if index != expected:
            raise ReplayError(f"{source}: expected sample index {expected}, found {index}")
        target = torch.zeros(num_classes)
        if label < num_classes:  # a dropped label (pipeline.data.labels): no target
            target[label] = 1.0
        yield Sample(index=index, label=label, target=target, view=transform(img))
        expected += 1
    if expected != end:
        raise ReplayError(f"{source}: shard ended at index {expected}, the manifest says {end}")


def replay_indices(
    samples: Iterable[dict],
    plan: EpochPlan,
    indices: Sequence[int],
    *,
    aug: AugConfig,
    seed: int,
) -> dict[int, torch.Tensor]:
    """Rebuild the (finished, CPU) views of a few samples of one unit (for spot checks), with the same functions
    as :func:`replay_unit` and the trainer: only those samples and their partners are decoded and augmented."""
    start = plan.start
    wanted = {int(i) for i in indices}
    outside = [i for i in wanted if not 0 <= i - start < len(plan)]
    if outside:
        raise ReplayError(f"indices {sorted(outside)[:5]} are not in unit (view epoch {plan.view_epoch}, "
                          f"shard {plan.shard})")
    needed = wanted | {int(plan.partner[i - start]) for i in wanted}
    parts, base, labels = TrainParts.of(aug), {}, {}
    for raw in samples:
        if sample_index(raw) not in needed:  # skip decoding the images not needed
            continue
        index, labels[index], img = decode_sample(raw)
        base[index] = raw_views(parts, [img], seed, plan.view_epoch, [index])[0]
    missing = needed - set(base)
    if missing:
        raise ReplayError(f"samples {sorted(missing)[:5]} are not in the shard of view epoch {plan.view_epoch}")
    order = sorted(wanted)
    batch = collate([training_sample(plan, i - start, labels[i], torch.zeros(0), base[i],
                                     base[int(plan.partner[i - start])]) for i in order])
    return dict(zip(order, Finisher(aug)(batch), strict=True))
