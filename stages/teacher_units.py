"""The teacher stage's units: collecting a unit's rows from batches, writing it, and checking done ones.

A unit is one (split, stored epoch, shard); its rows arrive in batches in any order, are gathered
here, and the unit is written (arrays, then its done record) the moment its last row arrives, then
its claim is released. Before filling, every done unit is read back and checked, and a damaged one
loses its record so that it is computed again.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

import store
from pipeline.core.errors import DistillError
from pipeline.core.progress import progress_bar
from pipeline.data.shards import Manifest
from pipeline.views.samples import Batch

Unit = tuple[str, int, int]
"""(split, stored epoch, shard); val units have epoch 0."""


def log_unit(owner: str, unit: Unit, event: str) -> None:
    """Append one line to the file named by ``DISTILL_UNIT_LOG`` (which process did what, when), if set."""
    path = os.environ.get("DISTILL_UNIT_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{time.time():.3f} {owner} {unit[0]} {unit[1]} {unit[2]} {event}\n")


@dataclass
class _UnitBuffer:
    """Full teacher logits and replayed plan of one unit, filled as its samples arrive in any order."""

    start: int
    logits: np.ndarray
    label: np.ndarray
    partner: np.ndarray
    lam: np.ndarray
    kind: np.ndarray
    seen: np.ndarray

    @classmethod
    def new(cls, start: int, end: int, num_classes: int) -> _UnitBuffer:
        n = end - start
        return cls(start, np.zeros((n, num_classes), np.float32), np.zeros(n, np.int64), np.zeros(n, np.int64),
                   np.ones(n, np.float32), np.zeros(n, np.uint8), np.zeros(n, bool))

    @property
    def complete(self) -> bool:
        return bool(self.seen.all())


class Collector:
    """Scatters batch rows into per-unit buffers and writes each unit the moment it is complete, then lets
    go of its claim."""

    def __init__(self, group, manifest: Manifest, split: str, k: int, claims: store.Claims, path: str) -> None:
        self.group, self.split, self.k, self.claims, self.path = group, split, k, claims, path
        self.ranges = manifest.ranges("train" if split == "clean" else split)  # the clean pass: train images
        self.starts = np.array([a for a, _ in self.ranges])
        self.num_classes = manifest.num_classes
        self.open: dict[tuple[int, int], _UnitBuffer] = {}
        self.written = 0

    def add(self, batch: Batch, logits: np.ndarray) -> None:
        """Scatter a batch's teacher logits (and its samples' labels and plan) into the units they belong to."""
        index = batch.index.numpy()
        epoch = batch.view_epoch.numpy() if batch.view_epoch is not None else np.zeros_like(index)
        shard = np.searchsorted(self.starts, index, side="right") - 1
        for e, s in sorted(set(zip(epoch.tolist(), shard.tolist(), strict=True))):
            rows = np.flatnonzero((epoch == e) & (shard == s))
            buf = self.open.get((e, s))
            if buf is None:
                buf = self.open[(e, s)] = _UnitBuffer.new(*self.ranges[s], self.num_classes)
            local = index[rows] - buf.start
            if buf.seen[local].any():
                raise DistillError(f"unit (epoch {e}, shard {s}): a sample was replayed twice")
            buf.seen[local] = True
            buf.logits[local] = logits[rows]
            buf.label[local] = batch.label.numpy()[rows]
            buf.partner[local] = batch.partner.numpy()[rows]
            buf.lam[local] = batch.lam.numpy()[rows]
            buf.kind[local] = batch.kind.numpy()[rows]
            if buf.complete:
                self._write(e, s, self.open.pop((e, s)))

    def _write(self, epoch: int, shard: int, buf: _UnitBuffer) -> None:
        try:
            topk_logits, topk_classes, _, lse = store.topk_from_logits(buf.logits, self.k)
        except ValueError as e:  # NaN/inf logits
            raise DistillError(f"teacher output for {self.split} unit (epoch {epoch}, shard {shard}): {e}; "
                             "check the teacher checkpoint and the normalisation (aug.mean/std)") from e
        targets = dict(topk_logits=topk_logits, topk_classes=topk_classes, logsumexp=lse, label=buf.label)

        def fence() -> None:  # right before the done record: a writer that lost its claim marks nothing done
            if not self.claims.fence(self.split, epoch, shard):
                raise store.ClaimLost(f"logit store {self.path}: {self.split} unit (epoch {epoch}, shard {shard}) "
                                      "was taken over by another writer while this one computed it")
        try:
            if self.split == "train":
                store.write_train_unit(self.group, epoch, shard, plan=(buf.partner, buf.kind, buf.lam), fence=fence,
                                       **targets)
            else:
                store.write_val_unit(self.group, shard, split=self.split, fence=fence, **targets)
        except store.ClaimLost as e:
            print(f"teacher: {e}; not marking it done")
            log_unit(self.claims.owner, (self.split, epoch, shard), "lost")
            return
        except OSError as e:  # disk full, permission denied, a read-only store
            raise DistillError(f"logit store {self.path}: cannot write {self.split} unit (epoch {epoch}, shard "
                             f"{shard}): {e.strerror or e}{f' ({e.filename})' if e.filename else ''}") from e
        log_unit(self.claims.owner, (self.split, epoch, shard), "written")
        self.claims.release(self.split, epoch, shard)
        self.written += 1

    def check_complete(self) -> None:
        if self.open:
            left = ", ".join(f"(epoch {e}, shard {s})" for e, s in sorted(self.open))
            raise DistillError(f"{self.split} units ended incomplete: {left}")


def pending(spec: store.StoreSpec, done: store.Done) -> list[Unit]:
    """Every unit without a done record: train units by epoch then shard, then val and the clean pass."""
    train = done.split("train", spec.n_shards)
    views = [(split, 0, s) for split in store.VIEW_SPLITS for s in range(len(spec.view_ranges(split)))
             if (0, s) not in done.split(split, 0)]
    return [("train", e, s) for e in range(spec.epochs) for s in range(spec.n_shards) if (e, s) not in train] + views


def drop_damaged_units(group, spec: store.StoreSpec, done: store.Done, rank: int, world: int,
                       progress: bool) -> list[Unit]:
    """Read back every done unit (this rank's share) and drop the done mark of each damaged one, so it is computed
    again: a staged unit loses its record; a packed epoch goes back to staged units, all but the damaged;
    returns the damaged units."""
    units = [("train", e, s) for e, s in sorted(done.split("train", spec.n_shards))]
    units += [(split, 0, s) for split in store.VIEW_SPLITS for _, s in sorted(done.split(split, 0))]
    # dealt by the unit's own place in the store, not by its place in this rank's listing: ranks list at
    # different moments (a late one sees more units done), and every unit must be checked by exactly one
    place = {"train": 0, "val": spec.epochs * spec.n_shards}
    place["clean"] = place["val"] + len(spec.view_ranges("val"))
    mine = [(sp, e, s) for sp, e, s in units if (place[sp] + e * spec.n_shards + s) % world == rank]
    damaged = []
    with progress_bar(len(mine), "teacher: checking done units", "unit", progress and len(mine) > 0) as bar:
        for split, e, s in mine:
            try:
                store.read_train_unit(group, e, s) if split == "train" else store.read_val_unit(group, s, split)
            except store.DamagedUnit as err:
                print(f"teacher: {err}; computing it again")
                damaged.append((split, e, s))
            bar.update(1)
    objs, packed = store.objects_of(group), set(done.packed)
    for split, e, s in damaged:
        if split == "train" and e in packed:
            store.unpack_epoch(group, e, {d for sp, ep, d in damaged if sp == "train" and ep == e})
            packed.discard(e)
        store.delete_record(objs, split, e, s)
    return damaged


def pack_ready(group, spec: store.StoreSpec, claims: store.Claims, done: store.Done) -> int:
    """Pack every stored epoch that ``done`` shows complete and whose packing this process can claim (claims
    refreshed); returns how many."""
    n = 0
    for epoch in done.unpacked_complete(spec.epochs, spec.n_shards):
        if not claims.wants(("pack", epoch, 0)) or not claims.try_claim("pack", epoch, 0):
            continue
        try:
            if epoch in store.unpacked_complete(group):  # not packed by the claim's last holder meanwhile
                store.pack_epoch(group, epoch)
                log_unit(claims.owner, ("pack", epoch, 0), "packed")
                n += 1
        finally:
            claims.release("pack", epoch, 0)
    return n
