"""``distill student``: train the DeiT student from the shards joined with the logit store.

Training epoch t replays stored epoch ``t mod E``: the same views the teacher labelled, so the stored
hard labels and top-k logits are exactly the teacher's answers for the images in the batch. The
online teacher mode (``teacher_mode: online``) runs the teacher inside the step instead, as the
official DeiT code does, for comparison and verification.
"""

from __future__ import annotations

import csv
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import store
from pipeline import distributed
from pipeline.config import Config, canonical_hash
from pipeline.evaluation import collect_logits_many, head_accuracies
from pipeline.losses import distillation_loss, teacher_targets_from_logits, teacher_targets_from_store
from pipeline.models import create_student, load_teacher, teacher_identity
from pipeline.replay import ReplayDataset
from pipeline.rng import TAG_SHUFFLE, derive_seed
from pipeline.shards import Manifest, open_shards
from stages.common import StageError, make_loader, progress_bar, store_provenance
from stages.student_data import StoreJoin, steps_per_epoch
from stages.teacher import resolve_teacher, teacher_forward
from store.provenance import differences, short

CHECKPOINT = "checkpoint.pt"


def run_identity(cfg: Config, manifest: Manifest, world: int, workers: int, mode: str, teacher: str) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed (the teacher's targets included), flat:
    ``aug.*`` and ``student.*`` are one key per field, so a refusal can name what changed."""
    student = cfg.student.model_dump(mode="json", exclude={"output", "eval_every", "workers", "teacher_mode"})
    return {
        "seed": cfg.seed,
        **{f"aug.{k}": v for k, v in cfg.aug.model_dump(mode="json").items()},
        **{f"student.{k}": v for k, v in student.items()},
        "teacher": teacher, "teacher.epochs": cfg.teacher.epochs, "teacher.topk": cfg.teacher.topk,
        "manifest": manifest.fingerprint, "ranks": world, "workers": workers, "teacher_mode": mode,
    }


def _changed(stored: dict[str, Any] | None, now: dict[str, Any]) -> str:
    if stored is None:
        return "student, aug, teacher or shards differ (an older checkpoint lists no fields)"
    diffs = differences(stored, now, sorted(set(stored) | set(now)))
    return "; ".join(f"{f}: checkpoint {short(s, 40)}, now {short(e, 40)}" for f, s, e in diffs[:6]) + (
        f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else "")


def _epoch_units(cfg: Config, n_shards: int, epoch: int) -> list[tuple[int, int]]:
    """Stored epoch ``epoch mod E`` over all shards, in a per-epoch seeded shard order."""
    order = np.random.default_rng(derive_seed(TAG_SHUFFLE, cfg.seed, epoch)).permutation(n_shards)
    return [(epoch % cfg.teacher.epochs, int(s)) for s in order]


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_outputs(out: Path, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    tmp = out / "history.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, out / "history.csv")
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def run(
    cfg: Config,
    *,
    progress: bool = True,
    device: str = "auto",
    workers: int | None = None,
    teacher_mode: str | None = None,
    until_epoch: int | None = None,
    restart: bool = False,
) -> Path:
    """Train (or resume) the student; returns its output folder. ``until_epoch`` stops after that many epochs.

    A checkpoint from another configuration is refused unless ``restart``, so a mistyped override never
    overwrites a long run.
    """
    env = distributed.setup(device)
    dev = env.device
    sc = cfg.student
    mode = teacher_mode or sc.teacher_mode
    workers = sc.workers if workers is None else workers
    manifest = open_shards(cfg)
    num_classes = manifest.num_classes
    out = Path(sc.output)
    kind = sc.distillation
    need_soft = kind == "soft"

    join, online, teacher_id = None, None, "none"
    if kind != "none":
        cfg = resolve_teacher(cfg)
        if mode == "offline":
            teacher_id = teacher_identity(cfg.teacher)
            prov = store_provenance(cfg, manifest, teacher_id)
            group = store.open_store(cfg.store.path, expected=prov)
            missing = np.argwhere(~store.done_mask(group))
            if len(missing):
                units = ", ".join(f"(epoch {e}, shard {s})" for e, s in missing[:5])
                raise store.MissingUnit(
                    f"logit store {cfg.store.path}: {len(missing)} unit(s) not done, e.g. {units}; "
                    "run `distill teacher` to complete it"
                )
            join = StoreJoin(cfg.store.path)
        else:
            online, teacher_id = load_teacher(cfg.teacher, num_classes=num_classes, in_chans=cfg.aug.channels)
            online.to(dev).eval()
            if dev.type == "cuda":
                online.to(memory_format=torch.channels_last)

    torch.manual_seed(cfg.seed)
    model = create_student(sc, num_classes=num_classes, img_size=cfg.aug.img_size, in_chans=cfg.aug.channels)
    model.set_distilled_training(True)
    model.to(dev)
    ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None) \
        if env.world > 1 else model
    lr = sc.lr * sc.batch_size * env.world / 512
    opt = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=sc.weight_decay)
    ranges = manifest.ranges("train")
    epoch_units = [_epoch_units(cfg, len(ranges), t) for t in range(sc.epochs)]
    steps = [steps_per_epoch(ranges, units, env.world, workers, sc.batch_size) for units in epoch_units]
    if min(steps) == 0:
        raise StageError(
            f"student.batch_size {sc.batch_size} x {env.world} rank(s) x {max(workers, 1)} worker(s) leaves no full "
            f"batch in an epoch of {manifest.count('train')} samples; lower the batch size or the workers"
        )
    sched = CosineLRScheduler(
        opt, t_initial=sum(steps), lr_min=sc.min_lr, warmup_t=sum(steps[: sc.warmup_epochs]),
        warmup_lr_init=sc.warmup_lr, t_in_epochs=False,
    )
    ema = ModelEmaV3(model, decay=sc.ema_decay) if sc.ema else None

    identity = run_identity(cfg, manifest, env.world, workers, mode, teacher_id)
    h = canonical_hash(identity)
    ckpt_path = out / CHECKPOINT
    start_epoch, global_step, history = 0, 0, []
    if ckpt_path.is_file() and not restart:
        try:
            # On the CPU: the saved RNG states must stay CPU tensors; load_state_dict moves the rest.
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise StageError(f"{ckpt_path}: cannot read the checkpoint ({type(e).__name__}: {e}); "
                             "use --restart to start afresh") from e
        if ckpt.get("run_hash") == h:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            if ema is not None and ckpt.get("ema") is not None:
                ema.load_state_dict(ckpt["ema"])
            start_epoch, global_step, history = ckpt["epoch"] + 1, ckpt["step"], ckpt["history"]
            _set_rng_state(ckpt["rng"][env.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
            if env.is_main:
                print(f"student: resuming {ckpt_path} after epoch {start_epoch}")
        else:
            raise StageError(
                f"{ckpt_path} is from another configuration ({_changed(ckpt.get('run_identity'), identity)}); "
                "use --restart to overwrite it, or set student.output to another folder"
            )
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)

    val_ds = ReplayDataset(manifest, cfg.aug, cfg.seed, [(0, s) for s in range(len(manifest.ranges("val")))],
                           split="val")
    last = sc.epochs if until_epoch is None else min(sc.epochs, until_epoch)
    for epoch in range(start_epoch, last):
        ds = ReplayDataset(manifest, cfg.aug, cfg.seed, epoch_units[epoch], rank=env.rank, world=env.world,
                           shuffle=sc.shuffle, join=join, order_epoch=epoch)
        loader = make_loader(ds, sc.batch_size, workers, drop_last=True)
        model.train()
        sums = {k: torch.zeros((), dtype=torch.float64, device=dev) for k in ("loss", "base", "distill")}
        t0 = time.perf_counter()
        it = iter(loader)
        with progress_bar(steps[epoch], f"student[{kind}] epoch {epoch + 1}/{sc.epochs}", "step",
                          progress and env.is_main, leave=False) as bar:
            for step in range(1, steps[epoch] + 1):
                batch = next(it)
                x, y = batch.view.to(dev, non_blocking=True), batch.target.to(dev, non_blocking=True)
                teacher = None
                if kind != "none" and online is None:
                    teacher = teacher_targets_from_store(  # checked and built on the CPU, then moved
                        batch.t_logits, batch.t_classes, batch.t_lse, batch.t_hard, num_classes, sc.tau,
                        need_soft,
                    ).to(dev, non_blocking=True)
                elif kind != "none":
                    teacher = teacher_targets_from_logits(teacher_forward(online, x, dev, to_cpu=False), sc.tau,
                                                          need_soft)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    outputs = ddp(x)
                parts = distillation_loss(outputs, y, teacher, kind=kind, alpha=sc.alpha, tau=sc.tau,
                                          token=sc.token, teacher_smoothing=sc.teacher_smoothing)
                opt.zero_grad(set_to_none=True)
                parts.total.backward()
                if sc.clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), sc.clip_grad)
                opt.step()
                global_step += 1
                sched.step_update(global_step)
                if ema is not None:
                    ema.update(model, step=global_step)
                for k, v in (("loss", parts.total), ("base", parts.base), ("distill", parts.distill)):
                    sums[k] += v.detach()
                bar.update(1)
                if not bar.disable and step % 10 == 0:  # a GPU sync, so only now and then
                    bar.set_postfix(loss=f"{float(sums['loss']) / step:.3f}", refresh=False)
        del it
        seconds = time.perf_counter() - t0
        n = steps[epoch]
        row: dict[str, Any] = {
            "epoch": epoch + 1, "loss": float(sums["loss"]) / n, "loss_base": float(sums["base"]) / n,
            "loss_distill": float(sums["distill"]) / n, "lr": opt.param_groups[0]["lr"],
            "im_per_s": n * sc.batch_size * env.world / seconds,
        }
        evaluate = (epoch + 1) % sc.eval_every == 0 or epoch + 1 == sc.epochs
        if evaluate and env.is_main:
            models = [model] if ema is None else [model, ema.module]  # one pass over val for both
            outs = collect_logits_many(models, make_loader(val_ds, cfg.evaluate.batch_size, workers), dev, heads=True)
            row.update({f"val_{k}": v for k, v in head_accuracies(outs[0]).items()})
            if ema is not None:
                row["val_ema_fused_top1"] = head_accuracies(outs[1])["fused_top1"]
        history.append(row)
        rng_states = _gather_rng(env)
        if env.is_main:
            msg = f"epoch {epoch + 1}/{sc.epochs} loss {row['loss']:.4f} {row['im_per_s']:.0f} im/s"
            if "val_fused_top1" in row:
                msg += (f" | val top-1 cls {row['val_cls_top1']:.4f} dist {row['val_dist_top1']:.4f} "
                        f"fused {row['val_fused_top1']:.4f}")
            tqdm.write(f"student[{kind}] {msg}")
            _atomic_save({
                "run_hash": h, "run_identity": identity, "epoch": epoch, "step": global_step,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "rng": rng_states, "history": history,
                "student": sc.model_dump(mode="json"), "num_classes": num_classes,
                "img_size": cfg.aug.img_size, "in_chans": cfg.aug.channels,
            }, ckpt_path)
            _write_outputs(out, history, _summary(cfg, mode, history))
        distributed.barrier()
    distributed.teardown()
    return out


def _gather_rng(env: distributed.DistEnv) -> Any:
    """Every rank's RNG state, so a resumed multi-rank run draws exactly what it would have."""
    state = _rng_state()
    if env.world == 1:
        return state
    gathered: list[Any] = [None] * env.world
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def _summary(cfg: Config, mode: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    sc = cfg.student
    evaluated = [r for r in history if "val_fused_top1" in r]
    last = evaluated[-1] if evaluated else {}
    return {
        "distillation": sc.distillation, "token": sc.token, "teacher_mode": mode,
        "epochs_done": history[-1]["epoch"] if history else 0,
        "train_im_per_s": float(np.mean([r["im_per_s"] for r in history])) if history else 0.0,
        **{k: v for k, v in last.items() if k.startswith("val_")},
    }
