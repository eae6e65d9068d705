"""Which samples every rank and DataLoader worker replays in a training epoch, and in what order.

An epoch's order is a seeded permutation of the split's shards (units), each shard's *mixing windows* (the
plan pairs Mixup/CutMix partners inside windows of ``aug.window`` samples of a shard) in shard order, as
webdataset streams shards: a worker's part of an epoch is then a few contiguous runs of samples of a few
units, which it reads from the shards and the logit store in a handful of range requests (the seeded shuffle
buffer of each worker mixes them; ingest shuffled the samples into shards once).
The first ``steps * world * batch`` positions of that sequence are trained, where ``steps`` is the most
full global batches the split holds: at most one global batch is dropped, and which samples fall in
the dropped tail changes with the epoch (the windows the previous epoch's tail cut go first). Rank r
takes the r-th of ``world`` equal contiguous parts; its workers share the part in whole batches (each
worker's count is a multiple of the batch size, so no worker ends with a partial batch). A part may
start or end inside a window: its worker then also makes the views of the partners that lie outside
its part, never a different view.

Everything here is a pure function of (the shard ranges, window, seed, epoch, world, workers, batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.views.rng import TAG_SHUFFLE, derive_seed


@dataclass(frozen=True)
class Window:
    """One mixing window: ``count`` consecutive samples of ``shard`` from global index ``first``."""

    shard: int
    first: int
    count: int


@dataclass(frozen=True)
class Piece:
    """Samples ``lo .. hi - 1`` (positions inside ``window``) that one worker replays."""

    window: Window
    lo: int
    hi: int

    @property
    def indices(self) -> range:
        return range(self.window.first + self.lo, self.window.first + self.hi)


def windows(ranges: list[tuple[int, int]], window: int) -> list[Window]:
    """Every mixing window of a split, shard by shard (windows start at their shard's first sample)."""
    out = []
    for shard, (start, end) in enumerate(ranges):
        out += [Window(shard, a, min(window, end - a)) for a in range(start, end, window)]
    return out


def epoch_order(ranges: list[tuple[int, int]], window: int, seed: int, train_epoch: int,
                global_batch: int) -> list[Window]:
    """The windows of a training epoch, in its seeded order: the shards in a seeded permutation, each one's windows
    in order.

    The windows that lost samples to the previous epoch's dropped tail come first (in that order), so no sample
    is dropped in two consecutive epochs whenever the other windows hold a tail's worth."""
    return list(_orders(tuple(ranges), window, seed, global_batch, train_epoch))


_LAST: dict[tuple, tuple[int, tuple[Window, ...]]] = {}
"""The last epoch order computed per layout (each epoch's order needs the one before)."""


def _orders(ranges: tuple[tuple[int, int], ...], window: int, seed: int, global_batch: int,
            train_epoch: int) -> tuple[Window, ...]:
    key = (ranges, window, seed, global_batch)
    done, order = _LAST.get(key, (-1, ()))
    if done > train_epoch:
        done, order = -1, ()
    ws = windows(list(ranges), window)
    kept = steps_per_epoch(sum(w.count for w in ws), 1, global_batch) * global_batch
    for t in range(done + 1, train_epoch + 1):
        ends = np.cumsum([w.count for w in order]) if order else np.zeros(0)
        cut = {w for w, e in zip(order, ends, strict=True) if e > kept}  # windows of the previous epoch's tail
        perm = np.random.default_rng(derive_seed(TAG_SHUFFLE, seed, t, 1)).permutation(len(ranges))
        rank = np.empty(len(ranges), dtype=np.int64)
        rank[perm] = np.arange(len(ranges))
        fresh = sorted(ws, key=lambda w: (rank[w.shard], w.first))
        order = tuple([w for w in fresh if w in cut] + [w for w in fresh if w not in cut])
    _LAST[key] = (train_epoch, order)
    return order


def steps_per_epoch(n: int, world: int, batch: int) -> int:
    """Full global batches of ``world * batch`` samples in ``n``: every rank steps this many times."""
    return n // (world * batch)


def worker_span(steps: int, rank: int, world: int, worker: int, workers: int, batch: int) -> tuple[int, int]:
    """[start, end) positions of the epoch's sequence that one worker of one rank replays."""
    workers = max(workers, 1)
    per_rank = steps * batch
    q, r = divmod(steps, workers)
    first_batch = worker * q + min(worker, r)
    n_batches = q + (worker < r)
    start = rank * per_rank + first_batch * batch
    return start, start + n_batches * batch


def pieces(order: list[Window], start: int, end: int) -> list[Piece]:
    """The window pieces that cover positions [start, end) of the sequence of ``order``'s windows."""
    ends = np.cumsum([w.count for w in order])
    out, i = [], int(np.searchsorted(ends, start, side="right"))
    while start < end and i < len(order):
        w0 = int(ends[i]) - order[i].count
        lo, hi = start - w0, min(end, int(ends[i])) - w0
        out.append(Piece(order[i], lo, hi))
        start, i = w0 + hi, i + 1
    return out


def worker_pieces(ranges: list[tuple[int, int]], window: int, seed: int, train_epoch: int, batch: int,
                  rank: int, world: int, worker: int, workers: int) -> list[Piece]:
    """What one worker of one rank replays in a training epoch."""
    n = ranges[-1][1] if ranges else 0
    steps = steps_per_epoch(n, world, batch)
    start, end = worker_span(steps, rank, world, worker, workers, batch)
    return pieces(epoch_order(ranges, window, seed, train_epoch, world * batch), start, end)


def runs(pieces: list[Piece]) -> list[list[Piece]]:
    """``pieces`` cut into runs of consecutive pieces of one shard in increasing order: what a worker reads with
    one pass over the shard's bytes and the store's rows."""
    out: list[list[Piece]] = []
    for p in pieces:
        last = out[-1][-1] if out else None
        if last is not None and last.window.shard == p.window.shard and last.window.first < p.window.first:
            out[-1].append(p)
        else:
            out.append([p])
    return out
