"""How fast this machine runs a config's models and views: a few timed batches of each, in well under a minute.

What ``distill estimate`` (and ``make demo``, before it starts) turns into a predicted time per stage. Every rate
is in images per second, measured the way the stages run: the teacher's and the student's training steps
(forward, loss, backward, optimiser step) at their batch sizes, their inference at the evaluation batch, and the
training and evaluation views (crop, flip, augmentation, the uint8 hand-over and its finishing) on images of the
config's size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.core.config import Config
from pipeline.train.engine import Criterion, Trainer, classification_loss, cosine_schedule
from pipeline.train.losses import LossParts, distillation_loss, teacher_targets_from_logits
from pipeline.train.models import create_student, create_teacher
from pipeline.views.augment import eval_transform
from pipeline.views.handover import Finisher, TrainParts
from pipeline.views.replay import raw_views, training_sample
from pipeline.views.samples import Batch, collate


@dataclass(frozen=True)
class Rates:
    """Images per second of each kind of work a stage does."""

    teacher_fit: float
    teacher_infer: float
    student_train: float
    student_infer: float
    views_train: float
    views_eval: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _rate(step: Callable[[], int], seconds: float, least: int = 3) -> float:
    """Images a second of ``step`` (which returns the images it did), over ``seconds`` and at least ``least`` steps,
    after one untimed step (the first step of a model allocates and picks its kernels)."""
    step()
    n, steps, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or steps < least:
        n += step()
        steps += 1
    return n / (time.perf_counter() - t0)


def _train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, criterion: Criterion) -> Callable[[], int]:
    """One step of the project's own training step (:class:`pipeline.train.engine.Trainer`) on a fixed batch."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    sched = cosine_schedule(opt, epochs=1, warmup_epochs=0, lr_min=1e-5, warmup_lr=1e-6)
    tr = Trainer(model, model, opt, sched, criterion, torch.device("cpu"), steps=1)
    model.train()
    n = len(x)
    zeros = torch.zeros(n, dtype=torch.int64)
    batch = Batch(index=torch.arange(n), label=zeros, target=y, view=x, view_epoch=None, partner=torch.arange(n),
                  kind=zeros, lam=torch.ones(n, dtype=torch.float64))

    def step() -> int:
        tr.train_step(batch)
        tr.schedule(0.5)
        return n

    return step


def _hard(outputs: Any, batch: Batch, x: torch.Tensor) -> LossParts:
    """The students' loss with a teacher term (hard distillation against the batch's own argmax)."""
    teacher = teacher_targets_from_logits(batch.target, 1.0, need_soft=False)
    return distillation_loss(outputs, batch.target, teacher, kind="hard", alpha=0.5, tau=1.0, token="dist")


def _infer_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], int]:
    model.eval()

    def step() -> int:
        with torch.no_grad():
            model(x)
        return len(x)

    return step


def _images(cfg: Config, n: int) -> list[Image.Image]:
    """Textured stand-ins of the source's kind (gray or RGB) and the config's size."""
    rng = np.random.default_rng(0)
    side = cfg.aug.img_size if cfg.aug.img_size <= 64 else int(cfg.aug.img_size * 1.6)  # photos are cropped down
    shape = (side, side) if cfg.aug.channels == 1 else (side, side, 3)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(n)]


def _views_steps(cfg: Config) -> tuple[Callable[[], int], Callable[[], int]]:
    from pipeline.views.plan import epoch_plan

    images, parts, finish = _images(cfg, 32), TrainParts.of(cfg.aug), Finisher(cfg.aug)
    plan = epoch_plan(cfg.aug, 0, 0, 0, 0, len(images))
    evaluate = eval_transform(cfg.aug)

    def train() -> int:
        raw = raw_views(parts, images, 0, 0, range(len(images)))
        finish(collate([training_sample(plan, r, 0, torch.zeros(0), raw[r], raw[int(plan.partner[r])])
                        for r in range(len(images))]))
        return len(images)

    def evaluation() -> int:
        for img in images:
            evaluate(img)
        return len(images)

    return train, evaluation


def measure(cfg: Config, num_classes: int, seconds: float = 2.0) -> Rates:
    """Each rate from ``seconds`` of timed work (about six times that in all, model building included)."""
    torch.manual_seed(0)
    c, s, a = cfg.teacher, cfg.student, cfg.aug
    shape = (a.channels, a.img_size, a.img_size)
    teacher = create_teacher(c.model_copy(update={"checkpoint": None, "pretrained": False}),
                             num_classes=num_classes, in_chans=a.channels)
    fit_x, fit_y = torch.randn(c.fit.batch_size, *shape), torch.softmax(torch.randn(c.fit.batch_size, num_classes), 1)
    student = create_student(s, num_classes=num_classes, img_size=a.img_size, in_chans=a.channels)
    student.set_distilled_training(True)
    sx, sy = torch.randn(s.batch_size, *shape), torch.softmax(torch.randn(s.batch_size, num_classes), 1)
    ex = torch.randn(cfg.evaluate.batch_size, *shape)
    views_train, views_eval = _views_steps(cfg)
    return Rates(
        teacher_fit=_rate(_train_step(teacher, fit_x, fit_y, classification_loss), seconds),
        teacher_infer=_rate(_infer_step(teacher, torch.randn(c.batch_size, *shape)), seconds),
        student_train=_rate(_train_step(student, sx, sy, _hard), seconds),
        student_infer=_rate(_infer_step(student, ex), seconds),
        views_train=_rate(views_train, seconds),
        views_eval=_rate(views_eval, seconds),
    )
