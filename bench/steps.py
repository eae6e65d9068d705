"""The student's training step and the teacher's forward as the stages run them, on synthetic batches held in
memory (on the device): what ``bench kd-cost`` and ``bench gpu`` time, apart from any input pipeline.

A step is :meth:`pipeline.train.engine.Trainer.train_step` with the student stage's own loss
(``stages.student._criterion``); its teacher term comes from stored top-k targets (``offline``, rebuilt on the
CPU and moved, as the stage does per batch), from the teacher run inside the step (``online``:
``teacher_forward``, bf16 and channels_last on CUDA), or is absent (``none``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from timm.optim import create_optimizer_v2

import store
from pipeline.core.config import Config
from pipeline.train.engine import Trainer, cosine_schedule
from pipeline.train.losses import teacher_targets_from_logits, teacher_targets_from_store
from pipeline.train.models import create_student, create_teacher, teacher_forward
from pipeline.views.samples import Batch, StoredBatch
from stages.student import _criterion

MODES = ("none", "offline", "online")
"""No distillation; hard distillation from stored targets; hard distillation with the teacher in the step."""
K = 10


def synthetic_batch(n: int, img_size: int, classes: int, seed: int = 0) -> Batch:
    """A finished batch: normalised-looking views, smoothed one-hot targets, and stored top-k targets."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(classes, (n,), generator=g)
    target = torch.full((n, classes), 0.1 / classes).scatter_(1, label[:, None], 0.9 + 0.1 / classes)
    logits, classes_k, _, lse = store.topk_from_logits(np.random.default_rng(seed).normal(
        size=(n, classes)).astype(np.float32), K)
    stored = StoredBatch(torch.from_numpy(logits), torch.from_numpy(classes_k.astype(np.int64)),
                         torch.from_numpy(lse))
    zeros = torch.zeros(n, dtype=torch.int64)
    return Batch(index=torch.arange(n), label=label, target=target, view=torch.randn(n, 3, img_size, img_size,
                 generator=g), view_epoch=None, partner=torch.arange(n), kind=zeros, lam=zeros.double() + 1,
                 stored=stored)


def teacher_net(model: str, classes: int, device: torch.device) -> torch.nn.Module:
    """A randomly initialised teacher in eval mode, laid out as the teacher stage lays it out."""
    torch.manual_seed(0)
    net = create_teacher(Config.model_validate({"data": {"root": "-"}, "teacher": {"model": model}}).teacher,
                         num_classes=classes, in_chans=3)
    net.to(device).eval()
    return net.to(memory_format=torch.channels_last) if device.type == "cuda" else net


def _targets(mode: str, classes: int, device: torch.device, teacher: torch.nn.Module | None) -> Callable:
    if mode == "none":
        return lambda batch, x: None
    if mode == "offline":
        return lambda batch, x: teacher_targets_from_store(
            batch.stored.logits, batch.stored.classes, batch.stored.logsumexp, batch.stored.hard, classes, 1.0,
            False).to(device, non_blocking=True)
    assert teacher is not None, "online distillation needs the teacher"
    return lambda batch, x: teacher_targets_from_logits(teacher_forward(teacher, x, device, to_cpu=False), 1.0, False)


def student_trainer(model: str, mode: str, *, classes: int, img_size: int, device: torch.device,
                    teacher: torch.nn.Module | None = None, **arch: int) -> Trainer:
    """A student, its AdamW and the student stage's loss for ``mode`` (hard distillation on the dist token)."""
    cfg = Config.model_validate({"data": {"root": "-"}, "student": {
        "model": model, "distillation": "none" if mode == "none" else "hard", **arch}})
    torch.manual_seed(0)
    net = create_student(cfg.student, num_classes=classes, img_size=img_size, in_chans=3)
    net.set_distilled_training(True)
    net.to(device)
    opt = create_optimizer_v2(net, opt="adamw", lr=5e-4, weight_decay=0.05)
    sched = cosine_schedule(opt, epochs=1, warmup_epochs=0, lr_min=1e-5, warmup_lr=1e-6)
    criterion = _criterion(cfg, _targets(mode, classes, device, teacher))
    return Trainer(net, net, opt, sched, criterion, device, steps=1)


def on(batch: Batch, device: torch.device) -> Batch:
    """The batch's views and targets on ``device`` (stored targets stay on the CPU, as the stage reads them)."""
    return Batch(index=batch.index, label=batch.label, target=batch.target.to(device),
                 view=batch.view.to(device), view_epoch=None, partner=batch.partner, kind=batch.kind, lam=batch.lam,
                 stored=batch.stored)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device, repeat: int = 1) -> float:
    """Wall seconds of ``repeat`` calls of ``fn``, the device's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return time.perf_counter() - t0
