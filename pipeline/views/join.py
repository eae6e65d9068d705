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

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._group = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_group": None}

    def __call__(self, plan: EpochPlan) -> Callable[[Sample], Sample]:
        if self._group is None:
            self._group = store.open_store(self.path)
        unit = store.read_train_unit(self._group, plan.view_epoch, plan.shard)
        check_plan(self.path, unit.plan, plan)
        classes = unit.topk_classes.astype(np.int64)
        start = plan.start

        def attach(s: Sample) -> Sample:
            r = s.index - start
            if int(unit.label[r]) != s.label:
                raise DistillError(
                    f"logit store {self.path}: sample {s.index} has label {int(unit.label[r])} in the store "
                    f"but {s.label} in the shards; the store was written for other shards"
                )
            return s.with_stored(Stored(unit.topk_logits[r], classes[r], float(unit.logsumexp[r])))

        return attach
