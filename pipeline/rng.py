"""Explicit seeds for every random choice, and per-sample scoping of the draws timm makes globally.

timm's transforms draw from the global ``random`` and ``numpy.random`` modules, and torchvision's
and timm's tensor ops from torch's default CPU generator. The replay contract needs each view to be
a pure function of (seed, epoch, index), and the training loop needs its own global RNG streams left
alone. Saving and restoring all three global states per sample costs ~90 µs, a third of a 32 px
view, so instead, for the duration of one view:

* the ``random`` and ``numpy`` names inside timm's transform modules are pointed at generators
  seeded for the sample (and pointed back afterwards), so timm draws from them with no overhead;
* torch's default CPU generator is seeded for the sample and restored afterwards (~2 µs).

The global ``random`` and ``numpy`` states are never touched; torch's is back where it was. Scopes
are serialised by a lock, so threads cannot see each other's generators.
"""

from __future__ import annotations

import hashlib
import random
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numpy as np
import timm.data.auto_augment as auto_augment
import timm.data.random_erasing as random_erasing
import timm.data.transforms as timm_transforms
import torch

# Domain tags keep the seeds of different uses independent even for equal (seed, epoch, x).
TAG_VIEW = 1
TAG_PLAN = 2
TAG_SHUFFLE = 3


def derive_seed(tag: int, *words: int) -> int:
    """A 63-bit seed that is a pure, platform-independent function of its integer arguments."""
    packed = struct.pack(f"<{len(words) + 1}Q", tag, *(w & 0xFFFFFFFFFFFFFFFF for w in words))
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


class _ScopedNumpy:
    """Stands in for ``numpy`` inside timm during a scope: ``np.random`` is the sample's generator."""

    def __init__(self) -> None:
        self.random = np.random.RandomState()

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


_MODULES: tuple[ModuleType, ...] = (auto_augment, random_erasing, timm_transforms)
_lock = threading.Lock()
_py = random.Random()
_np = _ScopedNumpy()


@contextmanager
def sample_scope(seed: int) -> Iterator[None]:
    """Route every random draw of timm/torchvision transforms to generators seeded with ``seed``."""
    modules = _MODULES
    gen = torch.default_generator
    with _lock:
        _py.seed(seed)
        _np.random.seed(seed & 0xFFFFFFFF)  # 32 bits: only RandAugment's op choice (15 ops) draws from it
        saved = gen.get_state()
        gen.manual_seed(seed)
        for mod in modules:
            mod.random = _py
        auto_augment.np = _np
        try:
            yield
        finally:
            for mod in modules:
                mod.random = random
            auto_augment.np = np
            gen.set_state(saved)
