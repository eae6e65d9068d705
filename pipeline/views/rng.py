"""Explicit seeds for every random choice, and per-sample scoping of the draws timm makes globally.

timm's transforms draw from the global ``random`` and ``numpy.random`` modules. The replay contract
needs each view to be a pure function of (seed, epoch, index), and the training loop needs its own
global RNG streams left alone; and a small view is cheap, so the determinism must cost little per
view (re-seeding Python's Mersenne Twister, NumPy's and torch's per sample cost too much: docs/benchmarks.md
has the figures). So instead:

* every view draws from its own SplitMix64 stream, keyed by (seed, epoch, index). The first
  ``STREAM_HEAD`` uniforms of a window's streams are computed in one vectorised NumPy pass; a view
  that needs more continues its stream in Python, with the very same numbers;
* for the duration of a window of views, the ``random`` and ``numpy`` names inside timm's transform
  modules point at :class:`SampleRandom`, a stand-in with the methods timm calls (``random``, ``uniform``,
  ``randint``, ``choice``, ``gauss``; NumPy's ``choice``), and anything else is served by a Mersenne
  Twister seeded from the stream on first use;
* random-erasing noise, which timm draws from torch's generator, comes from a ``torch.Generator``
  seeded from the stream; the flip is the project's own (:class:`pipeline.views.augment.HorizontalFlip`,
  drawing from :data:`draws`), and other transforms that use torch's global generator
  (torchvision's ``ColorJitter``) run under :func:`torch_scope`, which seeds it and restores it.

The global ``random`` and ``numpy`` states are never touched; torch's is back where it was. Scopes
are serialised by a lock, so threads cannot see each other's streams; a timm transform run *outside*
a scope in another thread while a window is being made would draw from it, so views are made only
through :func:`views_scope` (DataLoader workers are processes, each with its own modules).
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from itertools import chain
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

STREAM_HEAD = 32
"""Uniforms per view drawn in the vectorised pass. A 224 px DeiT view (crop, flip, RandAugment with
two ops and magnitude noise, erasing) draws 14 on average, 24 at most over 300 views."""

STREAM_VERSION = 2
"""Bumped whenever the numbers a view draws change; stored in the teacher store's provenance."""

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_TO_UNIT = 2.0**-53


def derive_seed(tag: int, *words: int) -> int:
    """A 63-bit seed that is a pure, platform-independent function of its integer arguments."""
    packed = struct.pack(f"<{len(words) + 1}Q", tag, *(int(w) & _MASK for w in words))
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


def _mix(z: int) -> int:
    """SplitMix64's output function (Python ints)."""
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def _mix_array(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 arrays (which wrap modulo 2**64, like the masks above)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))


def view_keys(seed: int, epoch: int, indices: np.ndarray | Sequence[int]) -> np.ndarray:
    """The stream keys (uint64) of the views of ``indices`` in ``epoch``: SplitMix64 outputs at the
    indices of a stream seeded by (seed, epoch), so a key depends on nothing but (seed, epoch, index)."""
    base = np.uint64(derive_seed(TAG_VIEW, seed, epoch))
    steps = (np.asarray(indices, dtype=np.int64).astype(np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN)
    return _mix_array(base + steps)


def stream_heads(keys: np.ndarray, n: int = STREAM_HEAD) -> np.ndarray:
    """The first ``n`` uniforms in [0, 1) of each key's stream (float64, one row per key)."""
    steps = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
    z = _mix_array(np.asarray(keys, dtype=np.uint64)[:, None] + steps[None, :])
    return (z >> np.uint64(11)).astype(np.float64) * _TO_UNIT


Stream = Callable[[], float]
"""Returns the next uniform in [0, 1) of one view's stream (a C ``__next__``, so a draw is cheap)."""


def streams(keys: np.ndarray, n: int = STREAM_HEAD) -> list[Stream]:
    """The streams of many views, their first ``n`` uniforms computed in one vectorised pass.

    Each iterates a ``memoryview`` slice of the heads, so a Python float is made only when drawn (a
    window's worth of float objects up front slows the transforms measurably), then goes on in Python.
    """
    heads = memoryview(stream_heads(keys, n).ravel())
    return [chain(heads[j * n : (j + 1) * n], _stream_tail(k, n)).__next__ for j, k in enumerate(keys.tolist())]


def _stream_tail(key: int, start: int) -> Iterator[float]:
    """Uniforms ``start``, ``start + 1``, ... of ``key``'s stream: the same numbers as
    :func:`stream_heads` would give there."""
    j = start
    while True:
        j += 1
        yield (_mix((key + j * _GOLDEN) & _MASK) >> 11) * _TO_UNIT


def _no_stream() -> float:
    raise RuntimeError("a random draw outside a view: call use(stream) first (pipeline.views.rng.views_scope)")


class SampleRandom:
    """The ``random`` module as timm's transforms use it, drawing from one view's stream.

    ``random`` is a bound C ``__next__`` over the stream, so a draw costs little. Integers and choices
    scale a 53-bit uniform (bias below 2**-40 for any range a transform uses). Methods timm does not
    call today are answered by a Mersenne Twister seeded from the stream when first asked.
    """

    random: Stream
    _owner: Stream | None = None  # the stream the fallbacks below were seeded from
    _mt: random.Random | None = None
    _nps: np.random.RandomState | None = None

    def __init__(self) -> None:
        self.random = _no_stream
        # Switching views is one C-level attribute store; the fallbacks notice the new stream.
        self.use: Callable[[Stream], None] = partial(setattr, self, "random")

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.random()

    def randint(self, a: int, b: int) -> int:
        if b < a:
            raise ValueError(f"empty range for randint({a}, {b})")
        return a + int(self.random() * (b - a + 1))

    def choice(self, seq: Sequence[Any]) -> Any:
        if not seq:
            raise IndexError("cannot choose from an empty sequence")
        return seq[int(self.random() * len(seq))]

    def gauss(self, mu: float = 0.0, sigma: float = 1.0) -> float:
        u1, u2 = self.random(), self.random()
        return mu + sigma * math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2.0 * math.pi * u2)

    def bits53(self) -> int:
        """A 53-bit integer from one draw, to seed other generators."""
        return int(self.random() * 9007199254740992.0)

    def _fresh(self) -> None:
        if self._owner is not self.random:
            self._owner, self._mt, self._nps = self.random, None, None

    def mersenne(self) -> random.Random:
        """A Mersenne Twister seeded from this view's stream (made on first use per view)."""
        self._fresh()
        if self._mt is None:
            self._mt = random.Random(self.bits53())
        return self._mt

    def numpy_state(self) -> np.random.RandomState:
        """A NumPy ``RandomState`` seeded from this view's stream (made on first use per view)."""
        self._fresh()
        if self._nps is None:
            seed = self.bits53()
            self._nps = np.random.RandomState([seed & 0xFFFFFFFF, seed >> 32])
        return self._nps

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.mersenne(), name)


class _NumpyRandom:
    """``np.random`` as timm's RandAugment uses it (unweighted op choice); the rest from the stream's
    NumPy fallback."""

    def __init__(self, draws: SampleRandom) -> None:
        self._draws = draws

    def choice(self, a: Any, size: Any = None, replace: bool = True, p: Any = None) -> Any:
        if replace and p is None and isinstance(size, int) and isinstance(a, (list, tuple)):
            r, n = self._draws.random, len(a)
            return [a[int(r() * n)] for _ in range(size)]
        return self._draws.numpy_state().choice(a, size, replace, p)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._draws.numpy_state(), name)


class _ScopedNumpy:
    """Stands in for ``numpy`` inside timm during a scope: ``np.random`` is the view's stream."""

    def __init__(self, draws: SampleRandom) -> None:
        self.random = _NumpyRandom(draws)

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


class NoiseSeed(int):
    """An erased box's noise, not drawn but recorded by its seed (the uint8 hand-over: see
    :func:`erasing_noise`, which draws the very same numbers later, in the trainer)."""


def erasing_noise(seed: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normal noise an erased box of ``shape`` gets from ``seed``: what :func:`_erasing_pixels` draws, on a
    CPU generator wherever the view is finished (a CUDA generator would give other numbers)."""
    gen = _generators.get("cpu")
    if gen is None:
        gen = _generators["cpu"] = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return torch.empty(tuple(shape), dtype=dtype).normal_(generator=gen)


def _erasing_pixels(per_pixel: bool, rand_color: bool, patch_size: Any, dtype: torch.dtype = torch.float32,
                    device: Any = "cuda") -> torch.Tensor | NoiseSeed:
    """timm's ``random_erasing._get_pixels`` with the normal noise drawn from the view's stream (or only its
    seed, when the scope records erasing)."""
    if not (per_pixel or rand_color):
        return torch.zeros((patch_size[0], 1, 1), dtype=dtype, device=device)
    seed = _draws.bits53()
    if _recording:
        return NoiseSeed(seed)
    shape = patch_size if per_pixel else (patch_size[0], 1, 1)
    if str(device) == "cpu":
        return erasing_noise(seed, shape, dtype)
    gen = _generators.get(device)
    if gen is None:
        gen = _generators[device] = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.empty(shape, dtype=dtype, device=device).normal_(generator=gen)


_MODULES: tuple[ModuleType, ...] = (auto_augment, random_erasing, timm_transforms)
_lock = threading.Lock()
_draws = SampleRandom()
_np = _ScopedNumpy(_draws)
_timm_pixels = random_erasing._get_pixels
_generators: dict[Any, torch.Generator] = {}  # one per device, re-seeded per use
_recording = False  # inside views_scope(record_erasing=True): erasing noise is recorded by seed, not drawn

draws: Any = random
"""What the project's own random transforms draw from: the global ``random`` module, or the view's
:class:`SampleRandom` inside :func:`views_scope` (as timm's modules do)."""


@contextmanager
def views_scope(record_erasing: bool = False) -> Iterator[Callable[[Stream], None]]:
    """Route every random draw of timm's transforms (and ours) to :class:`SampleRandom` for a block of
    views; the block calls the yielded ``use(stream)`` before each view to switch to its stream. With
    ``record_erasing`` timm's erasing gets a :class:`NoiseSeed` for each box instead of its noise."""
    global draws, _recording
    modules = _MODULES
    with _lock:
        for mod in modules:
            mod.random = _draws
        auto_augment.np = _np
        random_erasing._get_pixels = _erasing_pixels
        draws, _recording = _draws, record_erasing
        try:
            yield _draws.use
        finally:
            draws, _recording = random, False
            random_erasing._get_pixels = _timm_pixels
            auto_augment.np = np
            for mod in modules:
                mod.random = random


@contextmanager
def torch_scope(seed: int) -> Iterator[None]:
    """Seed torch's default CPU generator for the block and put its state back afterwards."""
    gen = torch.default_generator
    saved = gen.get_state()
    gen.manual_seed(seed)
    try:
        yield
    finally:
        gen.set_state(saved)
