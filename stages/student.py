"""``distill student``: train the DeiT student from the shards joined with the logit store.

Training epoch t replays stored epoch ``t mod E``: the same views the teacher labelled, so the stored
hard labels and top-k logits are exactly the teacher's answers for the images in the batch. The
online teacher mode (``teacher_mode: online``) runs the teacher inside the step instead, as the
official DeiT code does, for comparison and verification.

Read like facebookresearch/deit's ``main.py``: :func:`pipeline.train.engine.train_one_epoch` (the loop
every model of the project trains with) and :func:`evaluate` do the work, :func:`run` wires up the data, the
model, the loss, the optimiser, resume and checkpoints around them.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import store
from pipeline.core.config import Config, canonical_hash
from pipeline.core.errors import DistillError
from pipeline.core.files import atomic_write_json, atomic_write_text, location, use_storage_options
from pipeline.data.shards import Manifest, open_shards
from pipeline.train import distributed
from pipeline.train.checkpoint import (
    StudentCheckpoint,
    checkpoint_path,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pipeline.train.engine import Criterion, Trainer, cosine_schedule, train_one_epoch
from pipeline.train.evaluation import collect_logits_many, head_accuracies
from pipeline.train.losses import (
    LossParts,
    TeacherTargets,
    distillation_loss,
    teacher_targets_from_logits,
    teacher_targets_from_store,
)
from pipeline.train.models import create_student, load_teacher, resolve_teacher, teacher_forward, teacher_identity
from pipeline.train.reuse import reuse_warning
from pipeline.train.run_store import open_complete_store
from pipeline.views.join import StoreJoin
from pipeline.views.loading import make_loader, train_stream, val_dataset
from pipeline.views.plan import stored_epoch
from pipeline.views.samples import Batch
from pipeline.views.sampling import steps_per_epoch
from store.provenance import differences, short

Targets = Callable[[Batch, torch.Tensor], TeacherTargets | None]
"""(batch, views on the device) -> the teacher's targets for the batch (None without distillation)."""


def evaluate(models: list[torch.nn.Module], loader: Any, device: torch.device) -> dict[str, float]:
    """Val accuracy of every head of the model (and of its EMA, if given), in one pass over val."""
    outs = collect_logits_many(models, loader, device, heads=True)
    row = {f"val_{k}": v for k, v in head_accuracies(outs[0]).items()}
    if len(outs) > 1:
        row["val_ema_fused_top1"] = head_accuracies(outs[1])["fused_top1"]
    return row


# --------------------------------------------------------------------------------------------- set-up


def run_identity(cfg: Config, manifest: Manifest, mode: str, teacher: str) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed (the teacher's targets included), flat:
    ``aug.*`` and ``student.*`` are one key per field, so a refusal can name what changed. The number of
    ranks and workers is not part of it: a run resumes on another one (see student.elastic)."""
    unset = {"seed"} if cfg.student.seed is None else set()  # a run without student.seed: as before it existed
    student = cfg.student.model_dump(mode="json", exclude={"output", "eval_every", "workers", "teacher_mode",
                                                           "elastic"} | unset)
    return {
        "seed": cfg.seed,
        **{f"aug.{k}": v for k, v in cfg.aug.model_dump(mode="json").items()},
        **{f"student.{k}": v for k, v in student.items()},
        "teacher": teacher, "teacher.epochs": cfg.teacher.epochs, "teacher.topk": cfg.teacher.topk,
        "manifest": manifest.fingerprint, "teacher_mode": mode,
    }


def _changed(stored: dict[str, Any] | None, now: dict[str, Any]) -> str:
    if stored is None:
        return "student, aug, teacher or shards differ (an older checkpoint lists no fields)"
    diffs = differences(stored, now, sorted(set(stored) | set(now)))
    return "; ".join(f"{f}: checkpoint {short(s, 40)}, now {short(e, 40)}" for f, s, e in diffs[:6]) + (
        f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else "")


@dataclass(frozen=True)
class Teacher:
    """Where the teacher's answers come from."""

    join: StoreJoin | None
    """The store join for the loader (offline)."""
    targets: Targets
    identity: str
    view_drift: str | None = None
    """What differs between the store's canary views and this environment's (``--allow-view-drift``)."""


def _teacher(cfg: Config, manifest: Manifest, mode: str, dev: torch.device, allow_view_drift: bool,
             is_main: bool) -> Teacher:
    sc, c = cfg.student, manifest.num_classes
    if sc.distillation == "none":
        return Teacher(None, lambda batch, x: None, "none")
    need_soft = sc.distillation == "soft"
    cfg = resolve_teacher(cfg)
    if mode == "offline":
        teacher_id = teacher_identity(cfg.teacher)
        group, drift = open_complete_store(cfg, manifest, teacher_id, allow_view_drift=allow_view_drift,
                                           say=(lambda m: print(m, file=sys.stderr)) if is_main else (lambda m: None))

        def stored(batch: Batch, x: torch.Tensor) -> TeacherTargets:  # checked and built on the CPU, then moved
            s = batch.stored
            return teacher_targets_from_store(s.logits, s.classes, s.logsumexp, s.hard, c, sc.tau,
                                              need_soft).to(dev, non_blocking=True)

        return Teacher(StoreJoin(cfg.store.path, frozenset(store.packed_epochs(group))), stored, teacher_id, drift)
    online, teacher_id = load_teacher(cfg.teacher, num_classes=c, in_chans=cfg.aug.channels)
    online.to(dev).eval()
    if dev.type == "cuda":
        online.to(memory_format=torch.channels_last)
    return Teacher(None, lambda batch, x: teacher_targets_from_logits(
        teacher_forward(online, x, dev, to_cpu=False), sc.tau, need_soft), teacher_id)


def _criterion(cfg: Config, targets: Targets) -> Criterion:
    """The DeiT loss of a batch: the class head against the mixed label, the teacher's term as configured."""
    sc = cfg.student

    def criterion(outputs: Any, batch: Batch, x: torch.Tensor) -> LossParts:
        y = batch.target.to(x.device, non_blocking=True)
        return distillation_loss(outputs, y, targets(batch, x), kind=sc.distillation, alpha=sc.alpha, tau=sc.tau,
                                 token=sc.token, teacher_smoothing=sc.teacher_smoothing)

    return criterion


def student_seed(cfg: Config) -> int:
    """The seed of the student's own draws (init, drop path, order): ``student.seed``, else the top-level one."""
    return cfg.seed if cfg.student.seed is None else cfg.student.seed


def _trainer(cfg: Config, env: distributed.DistEnv, manifest: Manifest, batch: int, targets: Targets) -> Trainer:
    """Model (DDP-wrapped on several ranks), AdamW with the lr scaled to the global batch, cosine schedule, EMA."""
    sc, dev = cfg.student, env.device
    torch.manual_seed(student_seed(cfg))
    model = create_student(sc, num_classes=manifest.num_classes, img_size=cfg.aug.img_size, in_chans=cfg.aug.channels)
    model.set_distilled_training(True)
    model.to(dev)
    forward = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None) \
        if env.world > 1 else model
    opt = create_optimizer_v2(model, opt="adamw", lr=sc.lr * batch * env.world / 512, weight_decay=sc.weight_decay)
    sched = cosine_schedule(opt, epochs=sc.epochs, warmup_epochs=sc.warmup_epochs, lr_min=sc.min_lr,
                            warmup_lr=sc.warmup_lr)
    ema = ModelEmaV3(model, decay=sc.ema_decay) if sc.ema else None
    steps = steps_per_epoch(manifest.count("train"), env.world, batch)
    if steps == 0:
        raise DistillError(
            f"a batch of {batch} on each of {env.world} rank(s) leaves no full global batch in an epoch of "
            f"{manifest.count('train')} samples; lower student.batch_size"
        )
    return Trainer(model, forward, opt, sched, _criterion(cfg, targets), dev, steps, ema, sc.clip_grad)


def _batch(cfg: Config, world: int, ckpt: StudentCheckpoint | None) -> int:
    """The per-rank batch: student.batch_size, or on resuming on another number of ranks with
    ``elastic: keep_global_batch``, the checkpoint's global batch shared by the ranks now."""
    sc = cfg.student
    if ckpt is None or sc.elastic == "rescale_lr":
        return sc.batch_size
    glob = int(ckpt.global_batch)
    if glob % world:
        raise DistillError(f"the checkpoint's global batch {glob} cannot be shared by {world} rank(s); resume on a "
                         "number of ranks that divides it, or set student.elastic: rescale_lr")
    return glob // world


def _resume(tr: Trainer, ckpt: StudentCheckpoint, path: str, identity: dict[str, Any],
            rank: int) -> tuple[int, list]:
    """Load a checkpoint of this very run into ``tr``: (the first epoch to train, the history so far)."""
    if ckpt.run_hash != canonical_hash(identity):
        raise DistillError(
            f"{path} is from another configuration ({_changed(ckpt.run_identity, identity)}); "
            "use --restart to overwrite it, or set student.output to another folder"
        )
    tr.model.load_state_dict(ckpt.model)
    tr.opt.load_state_dict(ckpt.optimizer)
    if tr.ema is not None and ckpt.ema is not None:
        tr.ema.load_state_dict(ckpt.ema)
    tr.step = ckpt.step
    states = ckpt.rng if isinstance(ckpt.rng, list) else [ckpt.rng]
    set_rng_state(states[rank % len(states)])  # another number of ranks: the same draws cannot be replayed
    return ckpt.epoch + 1, ckpt.history


# --------------------------------------------------------------------------------------------- the stage


def run(
    cfg: Config,
    *,
    progress: bool = True,
    device: str = "auto",
    workers: int | None = None,
    teacher_mode: str | None = None,
    until_epoch: int | None = None,
    restart: bool = False,
    allow_view_drift: bool = False,
) -> Path:
    """Train (or resume) the student; returns its output folder. ``until_epoch`` stops after that many epochs.

    A checkpoint from another configuration is refused unless ``restart``, so a mistyped override never
    overwrites a long run; a store whose views this environment does not make is refused unless
    ``allow_view_drift`` (then recorded in the metrics).
    """
    use_storage_options(cfg.storage_options)
    env = distributed.setup(device)
    try:
        return location(_run(cfg, env, progress, workers, teacher_mode, until_epoch, restart, allow_view_drift))
    finally:
        distributed.teardown()


@dataclass(frozen=True)
class RunInfo:
    """What every epoch's checkpoint and metrics say about the run."""

    out: str
    mode: str
    identity: dict[str, Any]
    batch: int
    num_classes: int
    view_drift: str | None


def _run(cfg: Config, env: distributed.DistEnv, progress: bool, workers: int | None, teacher_mode: str | None,
         until_epoch: int | None, restart: bool, allow_view_drift: bool) -> str:
    sc, out = cfg.student, str(cfg.student.output)
    mode, workers = teacher_mode or sc.teacher_mode, sc.workers if workers is None else workers
    manifest = open_shards(cfg)
    warning = reuse_warning(sc.epochs, cfg.teacher.epochs) if mode == "offline" and sc.distillation != "none" else None
    if warning and env.is_main:
        print(f"warning: {warning}", file=sys.stderr)
    teacher = _teacher(cfg, manifest, mode, env.device, allow_view_drift, env.is_main)
    identity = run_identity(cfg, manifest, mode, teacher.identity)
    ckpt = load_checkpoint(checkpoint_path(out)) if location(checkpoint_path(out)).is_file() and not restart else None
    batch = _batch(cfg, env.world, ckpt)
    info = RunInfo(out, mode, identity, batch, manifest.num_classes, teacher.view_drift)
    tr = _trainer(cfg, env, manifest, batch, teacher.targets)
    start, history = _resume(tr, ckpt, checkpoint_path(out), identity, env.rank) if ckpt is not None else (0, [])
    if env.is_main and ckpt is not None:
        print(f"student: resuming {checkpoint_path(out)} after epoch {start} on {env.world} rank(s) x {batch}")
    train, loader = train_stream(manifest, cfg.aug, cfg.seed, order_seed=student_seed(cfg), batch_size=batch,
                                 rank=env.rank, world=env.world,
                                 view_epoch=partial(stored_epoch, stored_epochs=cfg.teacher.epochs),
                                 shuffle=sc.shuffle, workers=workers, join=teacher.join, device=env.device)
    val_loader = make_loader(val_dataset(manifest, cfg.aug, cfg.evaluate.batch_size), workers)
    tr.schedule(start)
    for epoch in range(start, sc.epochs if until_epoch is None else min(sc.epochs, until_epoch)):
        train.set_epoch(epoch)
        t0 = time.perf_counter()
        desc = f"student[{sc.distillation}] epoch {epoch + 1}/{sc.epochs}"
        row: dict[str, Any] = {"epoch": epoch + 1, **train_one_epoch(tr, loader, epoch, desc, progress and env.is_main)}
        row["lr"] = tr.opt.param_groups[0]["lr"]
        row["im_per_s"] = tr.steps * batch * env.world / (time.perf_counter() - t0)
        if ((epoch + 1) % sc.eval_every == 0 or epoch + 1 == sc.epochs) and env.is_main:
            row.update(evaluate([tr.model] if tr.ema is None else [tr.model, tr.ema.module], val_loader, env.device))
        history.append(row)
        _end_of_epoch(cfg, env, tr, info, epoch, history)
    return out


def _end_of_epoch(cfg: Config, env: distributed.DistEnv, tr: Trainer, info: RunInfo, epoch: int,
                  history: list[dict[str, Any]]) -> None:
    """Log the epoch, write the checkpoint (every rank's RNG state in it) and the metrics, then wait for all."""
    rng_states = _gather_rng(env)
    if env.is_main:
        row = history[-1]
        msg = f"epoch {epoch + 1}/{cfg.student.epochs} loss {row['loss']:.4f} {row['im_per_s']:.0f} im/s"
        if "val_fused_top1" in row:
            msg += (f" | val top-1 cls {row['val_cls_top1']:.4f} dist {row['val_dist_top1']:.4f} "
                    f"fused {row['val_fused_top1']:.4f}")
        tqdm.write(f"student[{cfg.student.distillation}] {msg}")
        save_checkpoint(info.out, StudentCheckpoint(
            run_hash=canonical_hash(info.identity), run_identity=info.identity, epoch=epoch, step=tr.step,
            model=tr.model.state_dict(), optimizer=tr.opt.state_dict(),
            ema=tr.ema.state_dict() if tr.ema is not None else None, rng=rng_states, history=history,
            world=env.world, batch_size=info.batch, global_batch=info.batch * env.world,
            student=cfg.student.model_dump(mode="json"), num_classes=info.num_classes,
            img_size=cfg.aug.img_size, in_chans=cfg.aug.channels,
        ))
        _write_outputs(info.out, history, _summary(cfg, info, history))
    distributed.barrier()


def _gather_rng(env: distributed.DistEnv) -> Any:
    """Every rank's RNG state, so a resumed multi-rank run draws exactly what it would have."""
    state = rng_state()
    if env.world == 1:
        return state
    gathered: list[Any] = [None] * env.world
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def _write_outputs(out: str, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    atomic_write_text(location(out) / "history.csv", text.getvalue())
    atomic_write_json(location(out) / "metrics.json", summary)


def _summary(cfg: Config, info: RunInfo, history: list[dict[str, Any]]) -> dict[str, Any]:
    sc = cfg.student
    evaluated = [r for r in history if "val_fused_top1" in r]
    last = evaluated[-1] if evaluated else {}
    return {
        "distillation": sc.distillation, "token": sc.token, "teacher_mode": info.mode,
        **({"view_drift": info.view_drift} if info.view_drift else {}),
        "epochs_done": history[-1]["epoch"] if history else 0,
        "train_im_per_s": float(np.mean([r["im_per_s"] for r in history])) if history else 0.0,
        **{k: v for k, v in last.items() if k.startswith("val_")},
    }
