"""Replayed views joined with the teacher's stored answers for them: what the student trains on.

Each (stored epoch, shard) unit is read from the logit store once, when its first sample streams in a
worker, and its stored mix plan is checked against the replayed one before any sample is used: training
on targets that describe other images would fail silently, so it fails loudly instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

import store
from pipeline.core.errors import DistillError
from pipeline.views.plan import EpochPlan, check_plan
from pipeline.views.samples import Sample, Stored


class StoreJoin:
    """The per-unit join of a training stream (see :class:`pipeline.views.loading.EpochDataset`); picklable, it
    opens the store lazily inside each worker."""

    def __init__(self, path: str | Path, packed: frozenset[int] = frozenset()) -> None:
        self.path, self.packed = str(path), packed
        """``packed``: the stored epochs the opener found packed (a worker then reads no record)."""
        self._group = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "packed": self.packed, "_group": None}

    def __call__(self, plan: EpochPlan, rows: tuple[int, int] | None = None) -> Callable[[Sample], Sample]:
        """The attach function of one unit's samples: of rows ``lo .. hi - 1`` only (global indices; just their
        blocks are read), or of the whole unit."""
        if self._group is None:
            self._group = store.open_store(self.path)
        if rows is None:
            unit = store.read_train_unit(self._group, plan.view_epoch, plan.shard)
        else:
            unit = store.read_train_rows(self._group, plan.view_epoch, plan.shard, *rows,
                                         packed=True if plan.view_epoch in self.packed else None)
        check_plan(self.path, unit.plan, plan)
        classes = unit.topk_classes.astype(np.int64)
        start = unit.start

        def attach(s: Sample) -> Sample:
            r = s.index - start
            if unit.label is not None and int(unit.label[r]) != s.label:
                raise DistillError(
                    f"logit store {self.path}: sample {s.index} has label {int(unit.label[r])} in the store "
                    f"but {s.label} in the shards; the store was written for other shards"
                )
            return s.with_stored(Stored(unit.topk_logits[r], classes[r], float(unit.logsumexp[r])))

        return attach
