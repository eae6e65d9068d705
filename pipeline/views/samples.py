"""What flows from the shards to a step: one replayed sample, and a batch of them.

A training sample's view is *raw*: the uint8 image a DataLoader worker made (crop, flip, RandAugment), with
what finishing it needs (:class:`Raw`: its erased boxes, its Mixup/CutMix partner's uint8 view and boxes,
the CutMix box); :mod:`pipeline.views.handover` finishes it to float in the trainer. An evaluation sample's
view is float already and has no view epoch. The teacher's stored answer for the view, once the student has
joined it from the logit store, is one sub-record (:class:`Stored`).

Samples are built by keyword; :func:`collate` stacks them into a :class:`Batch`, the loaders' item.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from store.layout import KIND_NONE

__all__ = ["Batch", "Raw", "RawBatch", "Sample", "Stored", "StoredBatch", "collate"]


@dataclass(frozen=True, slots=True)
class Raw:
    """What finishing a raw training view needs besides its uint8 image."""

    erase: torch.Tensor
    """(R, 5) int64 erased boxes: top, left, height, width, noise seed (-1: zeros); height 0 pads."""
    partner_view: torch.Tensor
    """The Mixup/CutMix partner's uint8 view (C, H, W); the sample's own when it is not mixed."""
    partner_erase: torch.Tensor
    box: torch.Tensor
    """(4,) int64 y0, y1, x0, x1 of the pasted CutMix region (zeros otherwise)."""


@dataclass(frozen=True, slots=True)
class Stored:
    """The teacher's stored answer for one view: its top-k logits (descending), their classes, the logsumexp of
    all its logits. The hard label is the first class (the argmax, by construction)."""

    logits: np.ndarray
    classes: np.ndarray
    logsumexp: float


@dataclass(frozen=True, slots=True)
class Sample:
    """One replayed view, with everything needed to train on it and to check its stored targets."""

    index: int
    """The sample's global index in its split."""
    label: int
    target: torch.Tensor
    """(C,) the mixed, smoothed soft label (one-hot for an evaluation view)."""
    view: torch.Tensor
    """uint8 (C, H, W) raw training view, or a float evaluation view."""
    view_epoch: int | None = None
    """The epoch whose augmentation draws made the view (a stored epoch for the store's views); None for an
    evaluation view."""
    partner: int | None = None
    """The Mixup/CutMix partner's global index (the sample's own when it is not mixed; None: the same)."""
    kind: int = KIND_NONE
    lam: float = 1.0
    raw: Raw | None = None
    stored: Stored | None = None

    def with_stored(self, stored: Stored) -> Sample:
        return replace(self, stored=stored)


@dataclass(frozen=True, slots=True)
class RawBatch:
    """:class:`Raw` of a batch, stacked."""

    erase: torch.Tensor
    partner_view: torch.Tensor
    partner_erase: torch.Tensor
    box: torch.Tensor


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """:class:`Stored` of a batch: (B, k) logits and classes, (B,) logsumexp."""

    logits: torch.Tensor
    classes: torch.Tensor
    logsumexp: torch.Tensor

    @property
    def hard(self) -> torch.Tensor:
        """(B,) the teacher's hard labels."""
        return self.classes[:, 0]


@dataclass(frozen=True, slots=True)
class Batch:
    """Samples stacked: ``view`` (B, C, H, W) is raw uint8 until the trainer finishes it (``raw`` is then None)."""

    index: torch.Tensor
    label: torch.Tensor
    target: torch.Tensor
    view: torch.Tensor
    view_epoch: torch.Tensor | None
    partner: torch.Tensor
    kind: torch.Tensor
    lam: torch.Tensor
    """(B,) float64 (the exact float32 λ of the plan, as mixing reads it)."""
    raw: RawBatch | None = None
    stored: StoredBatch | None = None

    def __len__(self) -> int:
        return len(self.index)

    def finished(self, view: torch.Tensor) -> Batch:
        """The batch with its views finished (float): the raw parts are no longer needed."""
        return replace(self, view=view, raw=None)

    def pin_memory(self) -> Batch:
        """Page-locked copies, for the DataLoader's pinning thread (it calls this on custom batch types)."""
        return _map(self, lambda t: t.pin_memory())


def _map(obj, fn):
    """``obj`` (a batch dataclass) with ``fn`` applied to every tensor in it, nested dataclasses included."""
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = fn(v) if isinstance(v, torch.Tensor) else _map(v, fn) if hasattr(v, "__dataclass_fields__") else v
    return type(obj)(**out)


def _stack_stored(stored: Sequence[Stored]) -> StoredBatch:
    return StoredBatch(torch.from_numpy(np.stack([s.logits for s in stored])),
                       torch.from_numpy(np.stack([s.classes for s in stored])),
                       torch.tensor([s.logsumexp for s in stored], dtype=torch.float32))


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack samples of one kind (all training views or all evaluation views) into a :class:`Batch`."""
    first = samples[0]
    raw = None
    if first.raw is not None:
        parts = [s.raw for s in samples]
        raw = RawBatch(*(torch.stack([getattr(p, name) for p in parts]) for name in
                         ("erase", "partner_view", "partner_erase", "box")))
    return Batch(
        index=torch.tensor([s.index for s in samples], dtype=torch.int64),
        label=torch.tensor([s.label for s in samples], dtype=torch.int64),
        target=torch.stack([s.target for s in samples]),
        view=torch.stack([s.view for s in samples]),
        view_epoch=None if first.view_epoch is None else torch.tensor([s.view_epoch for s in samples]),
        partner=torch.tensor([s.index if s.partner is None else s.partner for s in samples], dtype=torch.int64),
        kind=torch.tensor([s.kind for s in samples], dtype=torch.int64),
        lam=torch.tensor([s.lam for s in samples], dtype=torch.float64),
        raw=raw,
        stored=None if first.stored is None else _stack_stored([s.stored for s in samples]),
    )
