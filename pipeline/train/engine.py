"""The one training loop of every model this project trains, the teacher fit and the students alike (as DeiT's
``engine.py`` serves every model): a :class:`Trainer` holds what a step needs, :func:`train_one_epoch` steps it
over one epoch of a training stream (:func:`pipeline.views.loading.train_stream`).

The learning-rate schedule is a function of the fractional epoch (timm's cosine with warm-up, updated every
step), so a run resumed with another global batch, or a fit whose epoch holds another number of steps,
stays on it. Losses are summed on the device and read back only now and then: a step never waits for the
GPU to print a number. On CUDA the forward runs in bf16 autocast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from pipeline.core.progress import progress_bar
from pipeline.train.losses import LossParts, soft_target_cross_entropy
from pipeline.views.samples import Batch

SCHEDULE_UNITS = 1000
"""lr updates per epoch: the warm-up and cosine schedule run on epochs * SCHEDULE_UNITS."""

Criterion = Callable[[Any, Batch, torch.Tensor], LossParts]
"""(the model's outputs, the batch, its views on the device) -> the loss and its terms."""


def cosine_schedule(opt: torch.optim.Optimizer, *, epochs: int, warmup_epochs: int, lr_min: float,
                    warmup_lr: float) -> CosineLRScheduler:
    """timm's cosine schedule with linear warm-up, on fractional epochs (see :data:`SCHEDULE_UNITS`)."""
    return CosineLRScheduler(opt, t_initial=epochs * SCHEDULE_UNITS, lr_min=lr_min,
                             warmup_t=warmup_epochs * SCHEDULE_UNITS, warmup_lr_init=warmup_lr, t_in_epochs=False)


def classification_loss(outputs: torch.Tensor, batch: Batch, x: torch.Tensor) -> LossParts:
    """A plain classifier's loss (the teacher fit): soft-target cross-entropy against the mixed, smoothed label."""
    base = soft_target_cross_entropy(outputs, batch.target.to(outputs.device, non_blocking=True))
    return LossParts(total=base, base=base, distill=torch.zeros((), device=base.device))


@dataclass
class Trainer:
    """What one training step needs."""

    model: torch.nn.Module
    """The bare model (what is saved and evaluated)."""
    forward: torch.nn.Module
    """What a step calls: the model's DistributedDataParallel wrapper on several ranks, the model on one."""
    opt: torch.optim.Optimizer
    sched: CosineLRScheduler
    criterion: Criterion
    device: torch.device
    steps: int
    """Optimiser steps per epoch (the same on every rank)."""
    ema: ModelEmaV3 | None = None
    clip_grad: float | None = None
    step: int = 0

    def schedule(self, epoch: float) -> None:
        """Set the lr for the fractional epoch reached."""
        self.sched.step_update(round(epoch * SCHEDULE_UNITS))

    def train_step(self, batch: Batch) -> LossParts:
        """One optimiser step on a batch whose views are finished."""
        x = batch.view.to(self.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            outputs = self.forward(x)
        parts = self.criterion(outputs, batch, x)
        self.opt.zero_grad(set_to_none=True)
        parts.total.backward()
        if self.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.opt.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        return parts


def train_one_epoch(tr: Trainer, loader: Any, train_epoch: int, desc: str, show: bool) -> dict[str, float]:
    """Training epoch ``train_epoch``: ``tr.steps`` optimiser steps over ``loader``; the epoch's mean losses."""
    steps = tr.steps
    tr.model.train()
    sums = {k: torch.zeros((), dtype=torch.float64, device=tr.device) for k in ("loss", "base", "distill")}
    it = iter(loader)
    with progress_bar(steps, desc, "step", show, leave=False) as bar:
        for step in range(1, steps + 1):
            parts = tr.train_step(next(it))
            tr.schedule(train_epoch + step / steps)
            for k, v in (("loss", parts.total), ("base", parts.base), ("distill", parts.distill)):
                sums[k] += v.detach()
            bar.update(1)
            if not bar.disable and step % 10 == 0:  # a GPU sync, so only now and then
                bar.set_postfix(loss=f"{float(sums['loss']) / step:.3f}", refresh=False)
    del it
    return {"loss": float(sums["loss"]) / steps, "loss_base": float(sums["base"]) / steps,
            "loss_distill": float(sums["distill"]) / steps}
