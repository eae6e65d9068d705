"""The DeiT view transforms (timm's), built once from the config and applied per sample.

Grayscale inputs are converted to RGB before the PIL stage, because timm's RandAugment fills with a
3-channel mean; a 1-channel model input then takes channel 0 back after ``ToTensor`` (colour ops on
a replicated gray image keep the channels equal).

For replay, every random draw must go through :mod:`pipeline.views.rng`'s per-view streams: timm's own
transforms already draw through names it scopes; torchvision's flip is swapped for
:class:`HorizontalFlip`, and any other transform (torchvision's ``ColorJitter``) is wrapped in
:class:`TorchSeeded`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from timm.data.auto_augment import AugMixAugment, AutoAugment, RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from timm.data.transforms_factory import transforms_imagenet_eval, transforms_imagenet_train
from torchvision import transforms
from torchvision.transforms import functional as F

from pipeline.core.config import AugConfig
from pipeline.views import rng


class _Channels:
    """Keep the first ``n`` channels of a CHW tensor (1 for gray models)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x[: self.n] if x.shape[0] != self.n else x

    def __repr__(self) -> str:
        return f"Channels({self.n})"


class HorizontalFlip:
    """Flip with probability ``p``, drawing like timm's transforms do (see :data:`pipeline.views.rng.draws`)
    rather than from torch's global generator as torchvision's flip does."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return F.hflip(img) if rng.draws.random() < self.p else img

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p})"


class TorchSeeded:
    """Runs a transform that draws from torch's global generator (torchvision's ``ColorJitter``) on a
    seed from the view's stream inside a view, and as is outside one."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, img: Any) -> Any:
        draws = rng.draws
        if draws is random:
            return self.transform(img)
        with rng.torch_scope(draws.bits53()):
            return self.transform(img)

    def __repr__(self) -> str:
        return f"TorchSeeded({self.transform!r})"


# Transforms that draw only through the names pipeline.views.rng scopes (timm's ``random``/``np``).
_SCOPED = (RandomResizedCropAndInterpolation, RandAugment, AutoAugment, AugMixAugment, MaybeToTensor,
           transforms.ToTensor, transforms.Normalize, RandomErasing)


def _replayable(t: Callable) -> Callable:
    if isinstance(t, transforms.RandomHorizontalFlip):
        return HorizontalFlip(t.p)
    return t if isinstance(t, _SCOPED) else TorchSeeded(t)


def _rgb_stats(values: tuple[float, ...]) -> tuple[float, ...]:
    return values * 3 if len(values) == 1 else values


def _tensor_tail(aug: AugConfig, erase: bool) -> list:
    tail: list = [MaybeToTensor(), _Channels(aug.channels), transforms.Normalize(aug.mean, aug.std)]
    if erase and aug.reprob > 0:
        tail.append(RandomErasing(aug.reprob, mode=aug.remode, max_count=aug.recount, device="cpu"))
    return tail


def train_transform(aug: AugConfig) -> transforms.Compose:
    """RandomResizedCrop, flip, RandAugment or colour jitter (timm), normalise, random erasing: the whole view
    in one process (the reference the uint8 hand-over of :mod:`pipeline.views.handover` is tested against)."""
    return transforms.Compose([*train_pil(aug).transforms, *_tensor_tail(aug, True)])


def train_pil(aug: AugConfig) -> transforms.Compose:
    """The PIL part of the training view: RGB, RandomResizedCrop, flip, RandAugment or colour jitter (timm)."""
    primary, secondary, _ = transforms_imagenet_train(
        img_size=aug.img_size,
        scale=aug.scale,
        ratio=aug.ratio,
        hflip=aug.hflip,
        color_jitter=aug.color_jitter if aug.color_jitter > 0 else None,
        auto_augment=aug.auto_augment,
        interpolation=aug.interpolation,
        mean=_rgb_stats(aug.mean),
        std=_rgb_stats(aug.std),
        re_prob=0.0,
        separate=True,
    )
    timm_part = [_replayable(t) for t in (*primary.transforms, *secondary.transforms)]
    return transforms.Compose([_to_rgb, *timm_part])


def train_erasing(aug: AugConfig) -> RandomErasing | None:
    """timm's random erasing as the training view applies it (after normalisation), or None."""
    tail = _tensor_tail(aug, True)
    return tail[-1] if isinstance(tail[-1], RandomErasing) else None


def eval_transform(aug: AugConfig) -> transforms.Compose:
    """timm's evaluation view: resize to img_size / crop_pct, centre crop, normalise; no randomness."""
    interp = "bicubic" if aug.interpolation == "random" else aug.interpolation
    timm_eval = transforms_imagenet_eval(img_size=aug.img_size, crop_pct=aug.crop_pct, interpolation=interp,
                                         mean=_rgb_stats(aug.mean), std=_rgb_stats(aug.std))
    return transforms.Compose([_to_rgb, *timm_eval.transforms, _Channels(aug.channels)])


def _to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")

