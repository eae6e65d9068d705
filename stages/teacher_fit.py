"""``distill teacher-fit``: train the CNN teacher on the shards, for machines that cannot download weights.

The teacher trains on the same replayed DeiT views as everything else (so it is robust to the mixed,
erased inputs it will later label), in epochs numbered apart from the stored ones. The checkpoint
records a hash of everything that shaped it, so a rerun with the same inputs does nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from timm.scheduler import CosineLRScheduler

from pipeline import distributed
from pipeline.config import Config, canonical_hash
from pipeline.files import atomic_write_json, location, torch_load, use_storage_options
from pipeline.loading import ReplayDataset, loader_batches, make_loader, val_dataset
from pipeline.losses import soft_target_cross_entropy
from pipeline.models import create_teacher, save_teacher_checkpoint
from pipeline.progress import progress_bar
from pipeline.shards import Manifest, open_shards
from stages.common import StageError

FIT_EPOCH_BASE = 1_000_000
"""Fit epoch t replays augmentation epoch FIT_EPOCH_BASE + t: fresh views, never a stored epoch's."""


def fit_hash(cfg: Config, manifest: Manifest) -> str:
    t = cfg.teacher
    return canonical_hash(
        {
            "model": t.model,
            "small_stem": t.small_stem,
            "fit": t.fit.model_dump(mode="json", exclude={"output"}),
            "aug": cfg.fit_aug().model_dump(mode="json"),
            "seed": cfg.seed,
            "manifest": manifest.fingerprint,
            "workers": t.workers,  # each worker ends with its own partial batch: the steps and schedule follow
        }
    )


def _existing_hash(path: Path) -> str | None:
    try:
        return torch_load(path).get("meta", {}).get("fit_hash")
    except (ValueError, OSError, AttributeError):  # not ours, or not readable: fit it again
        return None


@torch.no_grad()
def evaluate_top1(model: torch.nn.Module, manifest: Manifest, cfg: Config, device: torch.device) -> float:
    """Top-1 accuracy on the val shards (evaluation views)."""
    model.eval()
    correct = total = 0
    for batch in make_loader(val_dataset(manifest, cfg.aug, cfg.seed), cfg.evaluate.batch_size, 0):
        pred = model(batch.view.to(device)).argmax(1).cpu()
        correct += int((pred == batch.label).sum())
        total += len(pred)
    return correct / max(total, 1)


def _fit(cfg: Config, manifest: Manifest, model: torch.nn.Module, device: torch.device,
         progress: bool) -> list[dict[str, float]]:
    """SGD (Nesterov) with a cosine schedule over fresh views each epoch; returns the per-epoch losses."""
    fit, n_train, ranges = cfg.teacher.fit, manifest.count("train"), manifest.ranges("train")
    shards = range(len(ranges))
    steps_per_epoch = loader_batches(ranges, [(0, s) for s in shards], fit.batch_size, cfg.teacher.workers)
    lr = fit.lr * fit.batch_size / 256
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=fit.weight_decay)
    sched = CosineLRScheduler(
        opt, t_initial=fit.epochs * steps_per_epoch, lr_min=lr * 1e-3,
        warmup_t=fit.warmup_epochs * steps_per_epoch, warmup_lr_init=lr * 0.01, t_in_epochs=False,
    )
    fit_aug, history, step = cfg.fit_aug(), [], 0
    with progress_bar(fit.epochs * n_train, f"teacher-fit {cfg.teacher.model}", "im", progress) as bar:
        for epoch in range(fit.epochs):
            model.train()
            units = [(FIT_EPOCH_BASE + epoch, s) for s in shards]
            ds = ReplayDataset(manifest, fit_aug, cfg.seed, units, shuffle=min(4096, n_train))
            loss_sum = seen = 0.0
            for batch in make_loader(ds, fit.batch_size, cfg.teacher.workers, device=device):
                x, y = batch.view.to(device), batch.target.to(device)
                loss = soft_target_cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                sched.step_update(step)
                loss_sum += float(loss.detach()) * len(x)
                seen += len(x)
                bar.update(len(x))
                bar.set_postfix(epoch=epoch, loss=f"{loss_sum / seen:.3f}", refresh=False)
            history.append({"epoch": epoch, "loss": loss_sum / max(seen, 1)})
    return history


def run(cfg: Config, *, progress: bool = True, device: str = "auto", force: bool = False) -> Path:
    """Train ``cfg.teacher.model`` from scratch and save it to ``cfg.teacher.fit.output``."""
    use_storage_options(cfg.storage_options)
    env = distributed.setup(device)
    if env.world > 1:
        raise StageError("teacher-fit runs in one process; start it without torchrun")
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
    top1 = evaluate_top1(model, manifest, cfg, env.device)
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
    atomic_write_json(out.with_suffix(".json"), {**meta, "sha256": sha, "history": history}, sort_keys=False)
    print(f"teacher-fit: val top-1 {top1:.4f} after {fit.epochs} epochs ({elapsed:.0f} s) -> {out} (sha256 {sha[:12]})")
    return out
