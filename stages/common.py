"""What several stages share: the stage error type, provenance of a run, and the DataLoader settings."""

from __future__ import annotations

import datetime as _dt
import sys
from importlib import metadata
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from pipeline.config import Config
from pipeline.rng import STREAM_VERSION
from pipeline.shards import Manifest

VERSIONED = ("torch", "timm", "zarr", "numcodecs", "webdataset", "numpy", "pillow")


class StageError(RuntimeError):
    """A stage cannot go on; the message says what is wrong and what to do."""


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def store_provenance(cfg: Config, manifest: Manifest, teacher_sha256: str) -> dict[str, Any]:
    """Identity of the targets a teacher run writes (see store.IDENTITY_FIELDS) plus informational keys."""
    return {
        "teacher": cfg.teacher.model,
        "teacher_sha256": teacher_sha256,
        "teacher_small_stem": cfg.teacher.small_stem,
        "aug_hash": cfg.section_hash("aug"),
        "view_stream": STREAM_VERSION,
        "seed": cfg.seed,
        "epochs": cfg.teacher.epochs,
        "topk": cfg.teacher.topk,
        "num_classes": manifest.num_classes,
        "manifest_fingerprint": manifest.fingerprint,
        "aug": cfg.aug.model_dump(mode="json"),
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def make_loader(dataset: IterableDataset, batch_size: int, workers: int, drop_last: bool = False) -> DataLoader:
    """Batches of replayed samples; workers each stream whole units (see ReplayDataset), each ending
    with its own partial batch unless ``drop_last`` (see replay.loader_batches)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        drop_last=drop_last,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers > 0 else None,
    )


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, **kw: Any) -> tqdm:
    """A tqdm bar that redraws in place on a terminal and prints a line every 30 s into logs (dvc repro)."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5 if tty else 30.0, **kw)
