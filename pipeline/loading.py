"""The DataLoader side of replay: the datasets that stream views, and the loaders around them.

Views come from :mod:`pipeline.replay`. Two datasets: :class:`EpochDataset` streams a training epoch
(the pieces :mod:`pipeline.sampling` deals to this rank's workers, every worker a whole number of
batches), for the student; :class:`ReplayDataset` streams whole (epoch, shard) units, for the teacher
stage (which needs every sample of a unit), teacher-fit and evaluation. Both add a seeded shuffle
buffer and attach per-unit targets (``join``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.augment import eval_transform
from pipeline.config import AugConfig
from pipeline.handover import TrainParts, ViewLoader
from pipeline.plan import EpochPlan, epoch_plan
from pipeline.replay import ReplaySample, eval_unit, piece_needs, replay_piece, replay_unit
from pipeline.rng import TAG_SHUFFLE, derive_seed
from pipeline.sampling import Piece, steps_per_epoch, worker_pieces
from pipeline.shards import Manifest, shard_samples


def worker_units(
    units: Sequence[tuple[int, int]], rank: int, world: int, worker: int, workers: int
) -> list[tuple[int, int]]:
    """The (epoch, shard) units one DataLoader worker of one rank streams: units[rank::world][worker::workers]."""
    return list(units)[rank::world][worker :: max(workers, 1)]


def loader_batches(
    ranges: Sequence[tuple[int, int]],
    units: Sequence[tuple[int, int]],
    batch_size: int,
    workers: int,
    *,
    rank: int = 0,
    world: int = 1,
    drop_last: bool = False,
) -> int:
    """Batches a DataLoader over :class:`ReplayDataset` yields on ``rank``: every worker batches its own
    units' samples, so each ends with its own partial batch (dropped with ``drop_last``)."""
    counts = (sum(ranges[s][1] - ranges[s][0] for _, s in worker_units(units, rank, world, w, workers))
              for w in range(max(workers, 1)))
    return sum(n // batch_size if drop_last else -(-n // batch_size) for n in counts)


class ReplayDataset(IterableDataset):
    """Streams whole (epoch, shard) units: rank r takes units[r::world], worker w of those [w::workers].

    ``split="val"`` (or ``evaluation=True``, e.g. the teacher's clean pass over the train split) yields
    evaluation views (the epoch in each unit is ignored). ``shuffle`` > 0 adds
    a seeded shuffle buffer of that many samples, seeded by ``order_epoch`` (default: the first
    unit's epoch); only the order changes, never a view. ``join``,
    called once per train unit with its plan (inside the worker), returns a function that maps each
    replayed sample to the item to yield: how the student attaches a unit's stored targets, read once.
    """

    def __init__(
        self,
        manifest: Manifest,
        aug: AugConfig,
        seed: int,
        units: Sequence[tuple[int, int]],
        *,
        split: str = "train",
        rank: int = 0,
        world: int = 1,
        shuffle: int = 0,
        join: Callable[[EpochPlan], Callable[[ReplaySample], Any]] | None = None,
        order_epoch: int | None = None,
        evaluation: bool | None = None,
    ) -> None:
        self.manifest, self.aug, self.seed, self.split = manifest, aug, seed, split
        self.units = list(units)
        self.rank, self.world, self.shuffle, self.join = rank, world, shuffle, join
        self.order_epoch = order_epoch if order_epoch is not None else (self.units[0][0] if self.units else 0)
        self.evaluation = split != "train" if evaluation is None else evaluation

    def my_units(self) -> list[tuple[int, int]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return worker_units(self.units, self.rank, self.world, wid, nw)

    def _stream(self) -> Iterator[Any]:
        paths = self.manifest.shard_paths(self.split)
        ranges = self.manifest.ranges(self.split)
        c = self.manifest.num_classes
        if not self.evaluation:
            parts = TrainParts.of(self.aug)
            for epoch, shard in self.my_units():
                start, end = ranges[shard]
                plan = epoch_plan(self.aug, self.seed, epoch, shard, start, end)
                samples = replay_unit(
                    shard_samples(self.manifest, "train", shard), plan, end,
                    parts=parts, aug=self.aug, seed=self.seed, num_classes=c, source=paths[shard],
                )
                yield from samples if self.join is None else map(self.join(plan), samples)
        else:
            transform = eval_transform(self.aug)
            for _, shard in self.my_units():
                start, end = ranges[shard]
                yield from eval_unit(shard_samples(self.manifest, self.split, shard), transform, c, start, end,
                                     paths[shard])

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        wid = info.id if info is not None else 0
        rng = np.random.default_rng(derive_seed(TAG_SHUFFLE, self.seed, self.order_epoch, self.rank, wid))
        yield from shuffled(self._stream(), self.shuffle, self.shuffle, rng)  # yields once the buffer is full


def _pop_random(buf: list, rng: np.random.Generator):
    k = int(rng.integers(len(buf)))
    buf[k], buf[-1] = buf[-1], buf[k]
    return buf.pop()


class EpochDataset(IterableDataset):
    """One rank's training stream: the pieces of training epoch ``t`` that :mod:`pipeline.sampling` gives
    this rank's DataLoader workers, replayed from stored epoch ``view_epoch(t)``.

    Made once per run: :meth:`set_epoch` (in the main process, before ``iter(loader)``) moves persistent
    workers to the next epoch through shared memory. Each worker yields a multiple of ``batch_size``
    samples, so every batch is full and the rank steps :meth:`steps` times an epoch. ``join`` is as for
    :class:`ReplayDataset` (called once per unit a worker touches). The shuffle buffer starts yielding
    once it holds ``batch_size`` samples and grows to ``shuffle``, so an epoch starts without a refill.
    """

    def __init__(self, manifest: Manifest, aug: AugConfig, seed: int, *, batch_size: int,
                 view_epoch: Callable[[int], int], rank: int = 0, world: int = 1, shuffle: int = 0,
                 join: Callable[[EpochPlan], Callable[[ReplaySample], Any]] | None = None) -> None:
        self.manifest, self.aug, self.seed, self.batch_size = manifest, aug, seed, batch_size
        self.view_epoch, self.rank, self.world, self.shuffle, self.join = view_epoch, rank, world, shuffle, join
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.fill_first = False
        """Fill the whole shuffle buffer before the first sample (the earlier behaviour; benchmarks only)."""

    def set_epoch(self, train_epoch: int) -> None:
        self._epoch.fill_(train_epoch)

    def steps(self) -> int:
        return steps_per_epoch(self.manifest.count("train"), self.world, self.batch_size)

    def pieces(self, train_epoch: int) -> list[Piece]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return worker_pieces(self.manifest.ranges("train"), self.aug.window, self.seed, train_epoch,
                             self.batch_size, self.rank, self.world, wid, nw)

    def _stream(self, train_epoch: int) -> Iterator[Any]:
        parts, ranges, c = TrainParts.of(self.aug), self.manifest.ranges("train"), self.manifest.num_classes
        stored, units, paths = self.view_epoch(train_epoch), {}, self.manifest.shard_paths("train")
        for piece in self.pieces(train_epoch):
            w = piece.window
            if w.shard not in units:  # a unit's plan and targets, once per worker and epoch
                plan = epoch_plan(self.aug, self.seed, stored, w.shard, *ranges[w.shard])
                units[w.shard] = (plan, None if self.join is None else self.join(plan))
            plan, attach = units[w.shard]
            needed = piece_needs(plan, w.first, piece.lo, piece.hi)
            start = ranges[w.shard][0]
            raw = shard_samples(self.manifest, "train", w.shard, w.first - start + int(needed[0]),
                                int(needed[-1] - needed[0]) + 1)
            views = replay_piece(iter(raw), plan, w.first, piece.lo, piece.hi, parts=parts, aug=self.aug,
                                 seed=self.seed, num_classes=c, source=paths[w.shard])
            yield from views if attach is None else map(attach, views)

    def __iter__(self) -> Iterator[Any]:
        t = int(self._epoch)
        info = get_worker_info()
        wid = info.id if info is not None else 0
        rng = np.random.default_rng(derive_seed(TAG_SHUFFLE, self.seed, t, self.rank, wid))
        initial = self.shuffle if self.fill_first else min(self.batch_size, self.shuffle)
        yield from shuffled(self._stream(t), self.shuffle, initial, rng)


def shuffled(stream: Iterator[Any], size: int, initial: int, rng: np.random.Generator) -> Iterator[Any]:
    """A seeded shuffle buffer of ``size`` samples that starts yielding once it holds ``initial`` and grows by
    one sample per yield until it is full (webdataset's scheme: no wait for a full buffer)."""
    if size <= 1:
        yield from stream
        return
    it, buf = iter(stream), []
    for s in it:
        buf.append(s)
        if len(buf) < size:
            extra = next(it, None)
            if extra is not None:
                buf.append(extra)
        if len(buf) >= initial:
            yield _pop_random(buf, rng)
    while buf:
        yield _pop_random(buf, rng)


def train_stream(manifest: Manifest, aug: AugConfig, seed: int, *, batch_size: int, view_epoch: Callable[[int], int],
                 rank: int, world: int, shuffle: int, workers: int,
                 join: Callable[[EpochPlan], Callable[[ReplaySample], Any]] | None = None,
                 device: torch.device | str = "cpu") -> tuple[EpochDataset, ViewLoader]:
    """The student's training input for a whole run: the :class:`EpochDataset` (``set_epoch`` before each
    epoch's ``iter(loader)``) and one loader with persistent workers, full batches only, and its own
    generator, so iterating it never draws from torch's global RNG. Views cross from the workers as uint8 and
    are finished on ``device`` (:mod:`pipeline.handover`)."""
    ds = EpochDataset(manifest, aug, seed, batch_size=batch_size, view_epoch=view_epoch, rank=rank, world=world,
                      shuffle=shuffle, join=join)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=workers,
        drop_last=False,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
    return ds, ViewLoader(loader, aug, device)


def val_units(manifest: Manifest) -> list[tuple[int, int]]:
    """The units of the val split: every val shard once (the epoch is not used for evaluation views)."""
    return [(0, s) for s in range(len(manifest.shards("val")))]


def val_dataset(manifest: Manifest, aug: AugConfig, seed: int) -> ReplayDataset:
    """Evaluation views of the whole val split, in index order."""
    return ReplayDataset(manifest, aug, seed, val_units(manifest), split="val")


def make_loader(dataset: IterableDataset, batch_size: int, workers: int, drop_last: bool = False,
                device: torch.device | str = "cpu") -> ViewLoader:
    """Batches of replayed samples, training views finished on ``device`` (:mod:`pipeline.handover`); workers
    each stream whole units (see ReplayDataset), each ending with its own partial batch unless ``drop_last``
    (see :func:`loader_batches`). It has its own generator, so iterating it never draws from torch's global RNG."""
    aug = getattr(dataset, "aug", None)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        drop_last=drop_last,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(0),
    )
    return ViewLoader(loader, aug, device) if aug is not None else loader
