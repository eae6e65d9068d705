"""The student's input stream: replayed views joined with the stored teacher targets of their unit.

Each (epoch, shard) unit is read from the store once, when its shard starts streaming in a worker,
and its stored mix plan is checked against the replayed one before any sample is used: training on
targets that describe other images would fail silently, so it must fail loudly instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import store
from pipeline.plan import EpochPlan, check_plan
from pipeline.replay import ReplaySample
from stages.common import StageError


class StudentSample(NamedTuple):
    """A replayed view with its unit's stored teacher targets (top-k, logsumexp, hard label); the view is raw,
    with what :mod:`pipeline.handover` needs to finish it in the trainer."""

    epoch: int
    index: int
    view: torch.Tensor
    target: torch.Tensor
    label: int
    t_hard: int
    t_logits: np.ndarray
    t_classes: np.ndarray
    t_lse: float
    kind: int
    lam: float
    partner_view: torch.Tensor
    erase: torch.Tensor
    partner_erase: torch.Tensor
    box: torch.Tensor


class StoreJoin:
    """Picklable per-unit join for ReplayDataset; opens the store lazily inside each worker."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._group = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_group": None}

    def __call__(self, plan: EpochPlan) -> Callable[[ReplaySample], StudentSample]:
        if self._group is None:
            self._group = store.open_store(self.path)
        unit = store.read_train_unit(self._group, plan.epoch, plan.shard)
        check_plan(self.path, unit.plan, plan)
        classes = unit.topk_classes.astype(np.int64)
        start = plan.start

        def attach(s: ReplaySample) -> StudentSample:
            r = s.index - start
            if int(unit.label[r]) != s.label:
                raise StageError(
                    f"logit store {self.path}: sample {s.index} has label {int(unit.label[r])} in the store "
                    f"but {s.label} in the shards; the store was written for other shards"
                )
            return StudentSample(
                s.epoch, s.index, s.view, s.target, s.label, int(unit.hard_label[r]),
                unit.topk_logits[r], classes[r], float(unit.logsumexp[r]),
                s.kind, s.lam, s.partner_view, s.erase, s.partner_erase, s.box,
            )

        return attach
