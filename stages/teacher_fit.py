"""``distill teacher-fit``: train the CNN teacher on the shards, for machines that cannot download weights.

The teacher trains on the same replayed DeiT views as everything else (so it is robust to the mixed,
erased inputs it will later label), in epochs numbered apart from the stored ones. The checkpoint
records a hash of everything that shaped it, so a rerun with the same inputs does nothing.
"""

from __future__ import annotations

import operator
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from tqdm import tqdm

from pipeline.core.config import Config, canonical_hash
from pipeline.core.errors import DistillError
from pipeline.core.files import atomic_write_json, location, torch_load, use_storage_options
from pipeline.data.shards import Manifest, open_shards
from pipeline.train import distributed
from pipeline.train.engine import Trainer, classification_loss, cosine_schedule, train_one_epoch
from pipeline.train.evaluation import collect_logits, topk_accuracy
from pipeline.train.models import create_teacher, load_teacher, save_teacher_checkpoint, teacher_identity
from pipeline.views.loading import make_loader, train_stream, val_dataset
from pipeline.views.sampling import steps_per_epoch

FIT_VIEW_EPOCH0 = 1_000_000
"""Fit epoch t trains on the views of view epoch FIT_VIEW_EPOCH0 + t: fresh views, never a stored epoch's."""


def fit_hash(cfg: Config, manifest: Manifest) -> str:
    """What a fitted teacher depends on. Not the number of DataLoader workers, as for the students: the views and
    the steps do not depend on it (the order of the samples does, through each worker's shuffle buffer)."""
    t = cfg.teacher
    return canonical_hash(
        {
            "model": t.model,
            "small_stem": t.small_stem,
            "fit": t.fit.model_dump(mode="json", exclude={"output"}),
            "aug": cfg.fit_aug().model_dump(mode="json"),
            "seed": cfg.seed,
            "manifest": manifest.fingerprint,
        }
    )


def _existing_hash(path: Path) -> str | None:
    try:
        return torch_load(path).get("meta", {}).get("fit_hash")
    except (ValueError, OSError, AttributeError):  # not ours, or not readable: fit it again
        return None


def evaluate_top1(model: torch.nn.Module, manifest: Manifest, cfg: Config,
                  device: torch.device) -> tuple[float, list[list[int]]]:
    """Top-1 accuracy on the val shards (evaluation views), and the val confusion matrix (rows: label, columns:
    the model's top-1), which confusable label noise can draw from (``data.label_noise_confusion``)."""
    out = collect_logits(model, make_loader(val_dataset(manifest, cfg.aug, cfg.evaluate.batch_size), 0), device)
    c = manifest.num_classes
    pairs = out["label"].long() * c + out["logits"].argmax(1).long()
    return topk_accuracy(out["logits"], out["label"], 1), torch.bincount(pairs, minlength=c * c).view(c, c).tolist()


def _trainer(cfg: Config, manifest: Manifest, model: torch.nn.Module, device: torch.device) -> Trainer:
    """SGD (timm's: Nesterov momentum, no weight decay on norms and biases), lr scaled to the batch, and a cosine
    schedule with warm-up over fractional epochs; the loss is soft-target cross-entropy on the mixed labels."""
    fit = cfg.teacher.fit
    lr = fit.lr * fit.batch_size / 256
    opt = create_optimizer_v2(model, opt="sgd", lr=lr, momentum=0.9, weight_decay=fit.weight_decay)
    sched = cosine_schedule(opt, epochs=fit.epochs, warmup_epochs=fit.warmup_epochs, lr_min=lr * 1e-3,
                            warmup_lr=lr * 0.01)
    steps = steps_per_epoch(manifest.count("train"), 1, fit.batch_size)
    if steps == 0:
        raise DistillError(f"teacher.fit.batch_size {fit.batch_size} is larger than the {manifest.count('train')} "
                           "training samples; lower it")
    return Trainer(model, model, opt, sched, classification_loss, device, steps)


def _fit(cfg: Config, manifest: Manifest, model: torch.nn.Module, device: torch.device,
         progress: bool) -> list[dict[str, float]]:
    """Train on fresh views every epoch, with the students' loader and training step; the per-epoch losses."""
    fit = cfg.teacher.fit
    tr = _trainer(cfg, manifest, model, device)
    train, loader = train_stream(manifest, cfg.fit_aug(), cfg.seed, batch_size=fit.batch_size,
                                 view_epoch=partial(operator.add, FIT_VIEW_EPOCH0), rank=0, world=1,
                                 shuffle=fit.shuffle, workers=cfg.teacher.workers, device=device)
    tr.schedule(0)
    history = []
    for epoch in range(fit.epochs):
        train.set_epoch(epoch)
        t0 = time.perf_counter()
        desc = f"teacher-fit {cfg.teacher.model} epoch {epoch + 1}/{fit.epochs}"
        row = train_one_epoch(tr, loader, epoch, desc, progress)
        history.append({"epoch": epoch, "loss": row["loss"]})
        rate = tr.steps * fit.batch_size / (time.perf_counter() - t0)
        tqdm.write(f"teacher-fit epoch {epoch + 1}/{fit.epochs} loss {row['loss']:.4f} {rate:.0f} im/s")
    return history


def _same_file(a: Any, b: Any) -> bool:
    """Whether two locations name one file (local paths resolved; URLs compared as written)."""
    if isinstance(a, Path) and isinstance(b, Path):
        return a.resolve() == b.resolve()
    return str(a) == str(b)


def pin_named_weights(cfg: Config, *, force: bool = False) -> Path:
    """No fit when the config names the teacher's weights (``teacher.pretrained`` or ``teacher.checkpoint``): the
    later stages use those. They are written to ``teacher.fit.output`` all the same (and its record beside it), so
    the output ``dvc.yaml`` tracks exists and pins the weights the store was made from, whatever the hub later
    serves. A rerun with the same weights does nothing."""
    t = cfg.teacher
    named = f"teacher.checkpoint {t.checkpoint}" if t.checkpoint is not None else f"timm's {t.model} weights"
    manifest = open_shards(cfg)
    out = location(t.fit.output)
    if t.checkpoint is not None and _same_file(location(t.checkpoint), out):  # named weights are the fit's output
        print(f"teacher-fit: nothing to fit, the config names the teacher's weights ({named})")
        return out
    identity = teacher_identity(t)
    h = canonical_hash({"weights": identity, "model": t.model, "small_stem": t.small_stem, "pretrained": t.pretrained,
                        "num_classes": manifest.num_classes, "in_chans": cfg.aug.channels})
    if not force and out.is_file() and _existing_hash(out) == h:
        print(f"teacher-fit: nothing to fit, the config names the teacher's weights ({named}); {out} holds them")
        return out
    model, _ = load_teacher(t, num_classes=manifest.num_classes, in_chans=cfg.aug.channels)
    meta = {"model": t.model, "small_stem": t.small_stem, "num_classes": manifest.num_classes,
            "in_chans": cfg.aug.channels, "fit_hash": h, "weights": identity, "epochs": 0, "val_top1": None}
    sha = save_teacher_checkpoint(model, out, meta)
    atomic_write_json(out.with_suffix(".json"), {**meta, "sha256": sha}, sort_keys=False)
    print(f"teacher-fit: nothing to fit, the config names the teacher's weights ({named}); pinned to {out} "
          f"(sha256 {sha[:12]})")
    return out


def run(cfg: Config, *, progress: bool = True, device: str = "auto", force: bool = False) -> Path:
    """Train ``cfg.teacher.model`` from scratch and save it to ``cfg.teacher.fit.output``; with named weights,
    only pin them there (:func:`pin_named_weights`)."""
    use_storage_options(cfg.storage_options)
    if cfg.teacher.pretrained or cfg.teacher.checkpoint is not None:
        return pin_named_weights(cfg, force=force)
    env = distributed.setup(device)
    if env.world > 1:
        raise DistillError("teacher-fit runs in one process; start it without torchrun")
    fit = cfg.teacher.fit
    manifest = open_shards(cfg)
    out = location(fit.output)
    h = fit_hash(cfg, manifest)
    if not force and out.is_file() and _existing_hash(out) == h:
        print(f"teacher-fit: {out} is up to date (fit hash {h[:12]}), nothing to do")
        return out

    torch.manual_seed(cfg.seed)
    model = create_teacher(cfg.teacher, num_classes=manifest.num_classes, in_chans=cfg.aug.channels)
    model.to(env.device)
    t0 = time.perf_counter()
    history = _fit(cfg, manifest, model, env.device, progress)
    top1, confusion = evaluate_top1(model, manifest, cfg, env.device)
    elapsed = time.perf_counter() - t0
    meta = {
        "model": cfg.teacher.model,
        "small_stem": cfg.teacher.small_stem,
        "num_classes": manifest.num_classes,
        "in_chans": cfg.aug.channels,
        "fit_hash": h,
        "val_top1": top1,
        "epochs": fit.epochs,
        "fit_samples": manifest.count("train"),  # the first N ingested train images: the audit marks them
        "seconds": round(elapsed, 1),
    }
    model.cpu()
    sha = save_teacher_checkpoint(model, out, meta)
    atomic_write_json(out.with_suffix(".json"), {**meta, "sha256": sha, "history": history, "val_confusion": confusion},
                      sort_keys=False)
    print(f"teacher-fit: val top-1 {top1:.4f} after {fit.epochs} epochs ({elapsed:.0f} s) -> {out} (sha256 {sha[:12]})")
    return out
