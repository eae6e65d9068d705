"""The uint8 hand-over: DataLoader workers make the PIL part of every training view and pass it on as
uint8, with what is needed to finish it; the trainer's process finishes the batch (to float, normalise,
erase, mix), on the CPU or on the device.

A 224 px view crosses the worker queue as 150 KB of uint8 instead of 602 KB of float32, and a worker's
shuffle buffer holds uint8 base views (a sample and its Mixup/CutMix partner share theirs). Finishing
does the same float operations in the same order as the one-process view (:func:`pipeline.views.augment.
train_transform`, then :func:`mix_views`), so on the CPU a view is bit-identical to it;
erasing noise still comes from the view's own stream: the worker records each erased box and its noise
seed (:class:`pipeline.views.rng.NoiseSeed`), and the trainer draws that noise on a CPU generator.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing
from torchvision import transforms

from pipeline.core.config import AugConfig
from pipeline.views.augment import train_erasing, train_pil
from pipeline.views.plan import KIND_CUTMIX, KIND_MIXUP, KIND_NONE
from pipeline.views.rng import NoiseSeed, erasing_noise
from pipeline.views.samples import Batch

__all__ = ["ERASE_FIELDS", "Finisher", "RawView", "TrainParts", "ViewLoader", "mix_views", "raw_view"]

ERASE_FIELDS = 5
"""An erased box: top, left, height, width, noise seed (-1: zeros, ``remode: const``); height 0 pads."""


class RawView(NamedTuple):
    """A training view before its tensor stage: the uint8 image (C, H, W) and its erased boxes (R, 5)."""

    image: torch.Tensor
    erase: torch.Tensor


class TrainParts(NamedTuple):
    """The training view split at the process boundary: the PIL part (workers) and the erasing draw."""

    pil: transforms.Compose
    erasing: RandomErasing | None
    channels: int
    max_boxes: int

    @classmethod
    def of(cls, aug: AugConfig) -> TrainParts:
        erasing = train_erasing(aug)
        return cls(train_pil(aug), erasing, aug.channels, erasing.max_count if erasing is not None else 0)


class _Boxes:
    """Stands in for the view tensor while timm's RandomErasing draws (inside a recording views scope): keeps
    each box it would erase and the seed of its noise, in draw order."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int, int, int]] = []

    def __setitem__(self, key: tuple[slice, slice, slice], value: Any) -> None:
        _, ys, xs = key
        seed = int(value) if isinstance(value, NoiseSeed) else -1
        self.rows.append((ys.start, xs.start, ys.stop - ys.start, xs.stop - xs.start, seed))


def _uint8_chw(img: Image.Image) -> torch.Tensor:
    """torchvision's ``to_tensor`` without its division: (C, H, W) uint8."""
    a = np.array(img, np.uint8, copy=True)
    return torch.from_numpy(a.reshape(a.shape[0], a.shape[1], -1)).permute(2, 0, 1).contiguous()


def raw_view(parts: TrainParts, img: Image.Image) -> RawView:
    """The PIL part of one view and its erasing draw; call inside ``views_scope(record_erasing=True)`` with
    the view's stream in use (the draws are the one-process view's, in its order)."""
    u8 = _uint8_chw(parts.pil(img))[: parts.channels]
    erase = torch.zeros((parts.max_boxes, ERASE_FIELDS), dtype=torch.int64)
    if parts.erasing is not None:
        boxes = _Boxes()
        parts.erasing._erase(boxes, u8.shape[0], u8.shape[1], u8.shape[2], torch.float32)  # timm's own draws
        if boxes.rows:
            erase[: len(boxes.rows)] = torch.tensor(boxes.rows, dtype=torch.int64)
    return RawView(u8, erase)


class Finisher:
    """Finishes batches of raw views: uint8 -> float, normalise, erase, mix (see the module's docstring)."""

    def __init__(self, aug: AugConfig) -> None:
        self.mean = torch.as_tensor(aug.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(aug.std, dtype=torch.float32).view(-1, 1, 1)
        self.per_pixel = aug.remode == "pixel"

    def base(self, u8: torch.Tensor, erase: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(B, C, H, W) float32 un-mixed views: ``to_tensor``'s division, ``Normalize``, the erased boxes."""
        x = u8.to(device, non_blocking=True).to(torch.float32).div(255)
        x.sub_(self.mean.to(device)).div_(self.std.to(device))
        for i, r in torch.nonzero(erase[:, :, 2] > 0).tolist():
            top, left, h, w, seed = erase[i, r].tolist()
            x[i, :, top : top + h, left : left + w] = self._noise(seed, x.shape[1], h, w).to(device)
        return x

    def _noise(self, seed: int, c: int, h: int, w: int) -> torch.Tensor:
        """What an erased box holds: zeros (``remode: const``) or the normal noise of its recorded seed."""
        if seed < 0:
            return torch.zeros((c, 1, 1))
        return erasing_noise(seed, (c, h, w) if self.per_pixel else (c, 1, 1))

    def __call__(self, batch: Batch, device: torch.device | str = "cpu") -> torch.Tensor:
        """The float views of a batch of raw training views."""
        device = torch.device(device)
        return self._on_cpu(batch) if device.type == "cpu" else self.batched(batch, device)

    def batched(self, batch: Batch, device: torch.device) -> torch.Tensor:
        """The device's way: whole-batch operations (the same per element as :meth:`_on_cpu`)."""
        raw = batch.raw
        own = self.base(batch.view, raw.erase, device)
        kind = batch.kind.tolist()
        mixed = [i for i, k in enumerate(kind) if k != KIND_NONE]
        if not mixed:
            return own
        partner = self.base(raw.partner_view[mixed], raw.partner_erase[mixed], device)
        lam, box = batch.lam.tolist(), raw.box.numpy()
        for j, i in enumerate(mixed):
            own[i] = mix_views(own[i], partner[j], kind[i], float(lam[i]), box[i])
        return own

    def _on_cpu(self, batch: Batch) -> torch.Tensor:
        """The same operations, one sample at a time in place, so that a view and its partner stay in the
        cache (a whole 224 px batch of float32 does not: converting it batch by batch cost 3x as much)."""
        out = torch.empty(batch.view.shape, dtype=torch.float32)
        scratch = torch.empty(batch.view.shape[1:], dtype=torch.float32)
        raw = batch.raw
        kinds, lams, boxes = batch.kind.tolist(), batch.lam.tolist(), raw.box.tolist()
        for i, kind in enumerate(kinds):
            view = self._base_into(out[i], batch.view[i], raw.erase[i])
            if kind == KIND_MIXUP:
                partner = self._base_into(scratch, raw.partner_view[i], raw.partner_erase[i])
                view.mul_(lams[i]).add_(partner.mul_(1.0 - lams[i]))  # view * lam + partner * (1 - lam)
            elif kind == KIND_CUTMIX:
                y0, y1, x0, x1 = (int(v) for v in boxes[i])
                partner = self._base_into(scratch, raw.partner_view[i], raw.partner_erase[i])
                view[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]
        return out

    def _base_into(self, dst: torch.Tensor, u8: torch.Tensor, erase: torch.Tensor) -> torch.Tensor:
        """One un-mixed view written into ``dst``: what :meth:`base` does to a batch."""
        dst.copy_(u8).div_(255).sub_(self.mean).div_(self.std)
        for top, left, h, w, seed in erase.tolist():
            if h > 0:
                dst[:, top : top + h, left : left + w] = self._noise(seed, dst.shape[0], h, w)
        return dst


def mix_views(
    view: torch.Tensor, partner_view: torch.Tensor, kind: int, lam: float, box: np.ndarray
) -> torch.Tensor:
    """Mixup blends, CutMix pastes the partner's box; the result belongs to the first sample."""
    if kind == KIND_MIXUP:
        return view * lam + partner_view * (1.0 - lam)
    if kind == KIND_CUTMIX:
        y0, y1, x0, x1 = (int(v) for v in box)
        out = view.clone()
        out[:, y0:y1, x0:x1] = partner_view[:, y0:y1, x0:x1]
        return out
    return view


class ViewLoader:
    """A DataLoader whose :class:`Batch` es arrive with finished float views (in this process, on ``device``);
    batches of evaluation views (already float) pass through. ``bytes_per_sample`` of the last batch: what crossed the
    worker queue for one sample's view."""

    def __init__(self, loader: Any, aug: AugConfig, device: torch.device | str = "cpu") -> None:
        self.loader, self.finish, self.device = loader, Finisher(aug), torch.device(device)
        self.bytes_per_sample = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            if batch.raw is None:
                self.bytes_per_sample = batch.view[0].nbytes
                yield batch
                continue
            raw = batch.raw
            self.bytes_per_sample = (batch.view.nbytes + raw.partner_view.nbytes + raw.erase.nbytes
                                     + raw.partner_erase.nbytes + raw.box.nbytes) // max(len(batch), 1)
            yield batch.finished(self.finish(batch, self.device))
