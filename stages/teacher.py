"""``distill teacher``: run the teacher once over E augmented epochs and fill the logit store.

Work is split into (epoch, shard) units; a unit is one chunk of every store array, so ranks and
DataLoader workers never share a chunk, and a unit is marked done only after its data is written.
Re-running skips done units, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import store
from pipeline import distributed
from pipeline.config import Config
from pipeline.loading import ReplayDataset, make_loader
from pipeline.models import load_teacher, resolve_teacher, teacher_forward
from pipeline.progress import progress_bar
from pipeline.run_store import store_provenance, store_spec
from pipeline.shards import Manifest, open_shards
from stages.common import StageError


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


class _Collector:
    """Scatters batch rows into per-unit buffers and writes each unit the moment it is complete."""

    def __init__(self, group, manifest: Manifest, split: str, k: int) -> None:
        self.group, self.split, self.k = group, split, k
        self.ranges = manifest.ranges(split)
        self.starts = np.array([a for a, _ in self.ranges])
        self.num_classes = manifest.num_classes
        self.open: dict[tuple[int, int], _UnitBuffer] = {}
        self.written = 0

    def add(self, epoch: np.ndarray, index: np.ndarray, logits: np.ndarray, batch) -> None:
        shard = np.searchsorted(self.starts, index, side="right") - 1
        for e, s in sorted(set(zip(epoch.tolist(), shard.tolist(), strict=True))):
            rows = np.flatnonzero((epoch == e) & (shard == s))
            buf = self.open.get((e, s))
            if buf is None:
                buf = self.open[(e, s)] = _UnitBuffer.new(*self.ranges[s], self.num_classes)
            local = index[rows] - buf.start
            if buf.seen[local].any():
                raise StageError(f"unit (epoch {e}, shard {s}): a sample was replayed twice")
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
            topk_logits, topk_classes, hard, lse = store.topk_from_logits(buf.logits, self.k)
        except ValueError as e:  # NaN/inf logits
            raise StageError(f"teacher output for {self.split} unit (epoch {epoch}, shard {shard}): {e}; "
                             "check the teacher checkpoint and the normalisation (aug.mean/std)") from e
        targets = dict(
            topk_logits=topk_logits, topk_classes=topk_classes, hard_label=hard, logsumexp=lse, label=buf.label
        )
        if self.split == "train":
            store.write_train_unit(
                self.group, epoch, shard, partner=buf.partner, lam=buf.lam, kind=buf.kind, **targets
            )
        else:
            store.write_val_unit(self.group, shard, **targets)
        self.written += 1

    def check_complete(self) -> None:
        if self.open:
            left = ", ".join(f"(epoch {e}, shard {s})" for e, s in sorted(self.open))
            raise StageError(f"{self.split} units ended incomplete: {left}")


def _run_units(
    model, device, ds: ReplayDataset, collector: _Collector, batch_size: int, workers: int, bar: tqdm
) -> None:
    for batch in make_loader(ds, batch_size, workers):
        logits = teacher_forward(model, batch.view, device).numpy()
        collector.add(batch.epoch.numpy(), batch.index.numpy(), logits, batch)
        bar.update(len(batch.index))
    collector.check_complete()


def _count(manifest: Manifest, split: str, units: Iterable[tuple[int, int]]) -> int:
    ranges = manifest.ranges(split)
    return sum(ranges[s][1] - ranges[s][0] for _, s in units)


def run(
    cfg: Config,
    *,
    workers: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    device: str = "auto",
) -> Path:
    """Fill ``cfg.store.path`` with every (epoch, shard) unit not yet done, then the val split."""
    env = distributed.setup(device)
    workers = cfg.teacher.workers if workers is None else workers
    batch_size = batch_size or cfg.teacher.batch_size
    manifest = open_shards(cfg)
    cfg = resolve_teacher(cfg)
    model, sha = load_teacher(cfg.teacher, num_classes=manifest.num_classes, in_chans=cfg.aug.channels)
    model.to(env.device).eval()
    if env.device.type == "cuda":
        model.to(memory_format=torch.channels_last)

    spec, prov = store_spec(cfg, manifest), store_provenance(cfg, manifest, sha)
    path = Path(cfg.store.path)
    if env.is_main:
        store.create_store(path, spec, prov)
    distributed.barrier()
    group = store.create_store(path, spec, prov)

    done, vdone = store.done_mask(group), store.val_done_mask(group)
    distributed.barrier()  # every rank has read the done marks before any rank adds one
    train_units = [(e, s) for e in range(spec.epochs) for s in range(spec.n_shards) if not done[e, s]]
    val_units = [(0, s) for s in range(spec.n_val_shards) if not vdone[s]]
    mine_train = train_units[env.rank :: env.world]
    mine_val = val_units[env.rank :: env.world]
    skipped = int(done.sum() + vdone.sum())
    if env.is_main and skipped:
        print(f"teacher: {skipped} unit(s) already done in {path}, skipping them")

    total = _count(manifest, "train", mine_train) + _count(manifest, "val", mine_val)
    t0 = time.perf_counter()
    with progress_bar(total, f"teacher {cfg.teacher.model}", "im", progress and env.is_main) as bar:
        for split, units in (("train", mine_train), ("val", mine_val)):
            if not units:
                continue
            ds = ReplayDataset(manifest, cfg.aug, cfg.seed, units, split=split)
            collector = _Collector(group, manifest, split, spec.k)
            _run_units(model, env.device, ds, collector, batch_size, workers, bar)
    elapsed = time.perf_counter() - t0

    distributed.barrier()
    try:
        if env.is_main:
            store.finalize(path)
            left = int((~store.done_mask(group)).sum() + (~store.val_done_mask(group)).sum())
            if left:
                raise StageError(f"{path}: {left} unit(s) not done after the run; re-run `distill teacher`")
            rate = total / elapsed if elapsed > 0 else 0.0
            print(f"teacher: wrote {len(mine_train)} train + {len(mine_val)} val unit(s) on rank 0 "
                  f"({total} images, {rate:.0f} im/s) -> {path}")
    finally:
        distributed.teardown()
    return path
