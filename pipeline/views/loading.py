"""The DataLoader side of replay: the datasets that stream views, and the loaders around them.

Views come from :mod:`pipeline.views.replay`. Three datasets, one per way of reading:

- :class:`EpochDataset` streams a training epoch (the pieces :mod:`pipeline.views.sampling` deals to this
  rank's workers, every worker a whole number of batches) through a seeded shuffle buffer: the student and
  the teacher fit;
- :class:`UnitDataset` streams whole (view epoch, shard) units of training views: the teacher stage, which
  needs every sample of a unit;
- :class:`EvalDataset` streams evaluation views of whole shards: val, and the teacher's clean pass.

Units and shards are batched on their own (a batch never holds two units), so a unit's batches are the same
whatever other units a process computes with it: a CPU convolution's last bit depends on its batch, and a
resumed or shared store must equal one written in one go. A ``join`` (called once per unit, inside the
worker, with the unit's plan) attaches what the store holds for each sample.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.core.config import AugConfig
from pipeline.data.shard_index import gap_for
from pipeline.data.shards import Manifest, shard_positions, shard_samples
from pipeline.views.augment import eval_transform
from pipeline.views.handover import TrainParts, ViewLoader
from pipeline.views.plan import epoch_plan
from pipeline.views.replay import eval_unit, piece_needs, replay_piece, replay_unit
from pipeline.views.rng import TAG_SHUFFLE, derive_seed
from pipeline.views.samples import Batch, Sample, collate
from pipeline.views.sampling import Piece, runs, steps_per_epoch, worker_pieces

Join = Callable[..., Callable[[Sample], Sample]]
"""Called with a unit's plan (and the rows a worker trains of it, or none: the whole unit), inside the worker: a
function that completes each of those samples."""


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def worker_units(units: Sequence[tuple[int, int]], rank: int, world: int, worker: int,
                 workers: int) -> list[tuple[int, int]]:
    """The units one DataLoader worker of one rank streams: units[rank::world][worker::workers]."""
    return list(units)[rank::world][worker :: max(workers, 1)]


def batched(samples: Iterable[Sample], size: int) -> Iterator[Batch]:
    """Batches of at most ``size`` consecutive samples."""
    chunk: list[Sample] = []
    for s in samples:
        chunk.append(s)
        if len(chunk) == size:
            yield collate(chunk)
            chunk = []
    if chunk:
        yield collate(chunk)


class UnitDataset(IterableDataset):
    """Whole (view epoch, shard) units of raw training views, in batches of at most ``batch_size`` of one unit:
    rank r takes units[r::world], worker w of those [w::workers]."""

    def __init__(self, manifest: Manifest, aug: AugConfig, seed: int, units: Sequence[tuple[int, int]], *,
                 batch_size: int, rank: int = 0, world: int = 1, join: Join | None = None) -> None:
        self.manifest, self.aug, self.seed, self.units = manifest, aug, seed, list(units)
        self.batch_size, self.rank, self.world, self.join = batch_size, rank, world, join

    def __iter__(self) -> Iterator[Batch]:
        paths, ranges = self.manifest.shard_paths("train"), self.manifest.ranges("train")
        parts = TrainParts.of(self.aug)
        for view_epoch, shard in worker_units(self.units, self.rank, self.world, *_worker()):
            start, end = ranges[shard]
            plan = epoch_plan(self.aug, self.seed, view_epoch, shard, start, end)
            samples = replay_unit(shard_samples(self.manifest, "train", shard), plan, end, parts=parts, aug=self.aug,
                                  seed=self.seed, num_classes=self.manifest.num_classes, source=paths[shard])
            yield from batched(samples if self.join is None else map(self.join(plan), samples), self.batch_size)


class EvalDataset(IterableDataset):
    """Evaluation views (no augmentation) of whole shards of a split, in batches of at most ``batch_size`` of one
    shard: rank r takes shards[r::world], worker w of those [w::workers]."""

    def __init__(self, manifest: Manifest, aug: AugConfig, split: str, shards: Sequence[int] | None = None, *,
                 batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.manifest, self.aug, self.split, self.batch_size = manifest, aug, split, batch_size
        self.shards = list(range(len(manifest.shards(split)))) if shards is None else list(shards)
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[Batch]:
        paths, ranges = self.manifest.shard_paths(self.split), self.manifest.ranges(self.split)
        transform, c = eval_transform(self.aug), self.manifest.num_classes
        units = [(0, s) for s in self.shards]
        for _, shard in worker_units(units, self.rank, self.world, *_worker()):
            samples = eval_unit(shard_samples(self.manifest, self.split, shard), transform, c, *ranges[shard],
                                paths[shard])
            yield from batched(samples, self.batch_size)


class EpochDataset(IterableDataset):
    """One rank's training stream: the pieces of training epoch ``t`` that :mod:`pipeline.views.sampling` gives
    this rank's DataLoader workers, replayed from view epoch ``view_epoch(t)``.

    Made once per run: :meth:`set_epoch` (in the main process, before ``iter(loader)``) moves persistent
    workers to the next epoch through shared memory. Each worker yields a multiple of ``batch_size``
    samples, so every batch is full and the rank steps :meth:`steps` times an epoch. The shuffle buffer
    (webdataset's) starts yielding once it holds ``batch_size`` samples and grows to ``shuffle``, so an epoch
    starts without a refill.
    """

    def __init__(self, manifest: Manifest, aug: AugConfig, seed: int, *, batch_size: int,
                 view_epoch: Callable[[int], int], rank: int = 0, world: int = 1, shuffle: int = 0,
                 join: Join | None = None, order_seed: int | None = None) -> None:
        self.manifest, self.aug, self.seed, self.batch_size = manifest, aug, seed, batch_size
        self.order_seed = seed if order_seed is None else order_seed
        """Draws the order of the windows and the shuffle, not the views (``seed``)."""
        self.view_epoch, self.rank, self.world, self.shuffle, self.join = view_epoch, rank, world, shuffle, join
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.fill_first = False
        """Fill the whole shuffle buffer before the first sample (the earlier behaviour; benchmarks only)."""

    def set_epoch(self, train_epoch: int) -> None:
        self._epoch.fill_(train_epoch)

    def steps(self) -> int:
        return steps_per_epoch(self.manifest.count("train"), self.world, self.batch_size)

    def pieces(self, train_epoch: int) -> list[Piece]:
        return worker_pieces(self.manifest.ranges("train"), self.aug.window, self.order_seed, train_epoch,
                             self.batch_size, self.rank, self.world, *_worker())

    def _stream(self, train_epoch: int) -> Iterator[Sample]:
        """The worker's pieces, a run of consecutive pieces of one unit at a time: their samples (and their
        partners) read in one pass of precise range reads; the stored rows the worker trains of a unit in one
        read, when it first meets the unit."""
        parts, ranges = TrainParts.of(self.aug), self.manifest.ranges("train")
        paths, view_epoch, plans, attach = self.manifest.shard_paths("train"), self.view_epoch(train_epoch), {}, {}
        pieces = self.pieces(train_epoch)
        rows = {}  # shard -> the rows this worker trains of it this epoch
        for p in pieces:
            lo, hi = rows.get(p.window.shard, (p.window.first + p.lo, p.window.first + p.hi))
            rows[p.window.shard] = (min(lo, p.window.first + p.lo), max(hi, p.window.first + p.hi))
        for run in runs(pieces):
            shard = run[0].window.shard
            if shard not in plans:
                plans[shard] = epoch_plan(self.aug, self.seed, view_epoch, shard, *ranges[shard])
                attach[shard] = None if self.join is None else self.join(plans[shard], rows[shard])
            plan, start = plans[shard], ranges[shard][0]
            positions = np.concatenate([p.window.first - start + piece_needs(plan, p.window.first, p.lo, p.hi)
                                        for p in run])
            samples = shard_positions(self.manifest, "train", shard, positions, gap_for(self.aug.window))
            for p in run:
                views = replay_piece(samples, plan, p.window.first, p.lo, p.hi, parts=parts, aug=self.aug,
                                     seed=self.seed, num_classes=self.manifest.num_classes, source=paths[shard])
                yield from views if attach[shard] is None else map(attach[shard], views)

    def __iter__(self) -> Iterator[Sample]:
        t = int(self._epoch)
        rng = random.Random(derive_seed(TAG_SHUFFLE, self.order_seed, t, self.rank, _worker()[0]))
        if self.shuffle <= 1:
            return self._stream(t)
        initial = self.shuffle if self.fill_first else min(self.batch_size, self.shuffle)
        return wds.shuffle(self.shuffle, initial, rng=rng)(self._stream(t))


def _not_inherited_session(record: logging.LogRecord) -> bool:
    return "Unclosed client session" not in record.getMessage()


def _worker_init(worker: int) -> None:
    """In a DataLoader worker: the object-store sessions (aiohttp, under s3fs or gcsfs) forked from the parent
    belong to the parent's event-loop thread, which the worker lacks, so they cannot be closed here; when the
    garbage collector meets them aiohttp logs "Unclosed client session" (a few times a run, with shards or store on
    S3). That message is dropped in workers: their own sessions live until they exit."""
    logging.getLogger("asyncio").addFilter(_not_inherited_session)


def _loader(dataset: IterableDataset, batch_size: int | None, workers: int, persistent: bool, seed: int,
            collate_fn: Callable | None) -> DataLoader:
    """A DataLoader with its own generator, so iterating it never draws from torch's global RNG."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_fn,
                      persistent_workers=persistent and workers > 0, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if workers > 0 else None, generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=_worker_init)


def train_stream(manifest: Manifest, aug: AugConfig, seed: int, *, batch_size: int, view_epoch: Callable[[int], int],
                 rank: int, world: int, shuffle: int, workers: int, join: Join | None = None,
                 device: torch.device | str = "cpu", order_seed: int | None = None) -> tuple[EpochDataset, ViewLoader]:
    """The training input of a whole run: the :class:`EpochDataset` (``set_epoch`` before each epoch's
    ``iter(loader)``) and one loader with persistent workers and full batches. Views cross from the workers as
    uint8 and are finished on ``device`` (:mod:`pipeline.views.handover`)."""
    ds = EpochDataset(manifest, aug, seed, batch_size=batch_size, view_epoch=view_epoch, rank=rank, world=world,
                      shuffle=shuffle, join=join, order_seed=order_seed)
    return ds, ViewLoader(_loader(ds, batch_size, workers, True, seed, collate), aug, device)


def make_loader(dataset: UnitDataset | EvalDataset, workers: int, device: torch.device | str = "cpu") -> ViewLoader:
    """The batches of a :class:`UnitDataset` or :class:`EvalDataset`, training views finished on ``device``."""
    return ViewLoader(_loader(dataset, None, workers, False, 0, None), dataset.aug, device)


def val_dataset(manifest: Manifest, aug: AugConfig, batch_size: int) -> EvalDataset:
    """Evaluation views of the whole val split, in index order."""
    return EvalDataset(manifest, aug, "val", batch_size=batch_size)
