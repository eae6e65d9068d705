"""The student checkpoint: its file name, what it holds, and how it is written and read back.

One home for the format, used by the student stage (save, resume) and by evaluate (load a trained
student). A checkpoint is written atomically, so a crash or a full disk never leaves a half-written
file under the real name, and it is read with ``torch.load(weights_only=True)``: it holds only
tensors and plain Python values (the RNG states included), so loading someone else's student folder
cannot run code through pickle.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import StudentConfig
from pipeline.errors import DistillError
from pipeline.files import atomic_torch_save, location, torch_load
from pipeline.models import create_student

CHECKPOINT = "checkpoint.pt"
"""The file name of a student checkpoint inside its output folder."""


class CheckpointError(DistillError):
    """A student checkpoint that is missing, unreadable or made for something else."""


def checkpoint_path(folder: str | Path) -> str:
    """The checkpoint file of a student output folder (a local path or a URL)."""
    return str(location(folder) / CHECKPOINT)


def rng_state() -> dict[str, Any]:
    """The global torch, NumPy and Python RNG states, as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [version, list(internal), gauss_next],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(folder: str | Path, payload: dict[str, Any]) -> str:
    """Write ``payload`` as the folder's checkpoint (atomically); returns its path."""
    path = checkpoint_path(folder)
    atomic_torch_save(payload, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU with the safe loader; CheckpointError names the file otherwise."""
    if not location(path).is_file():
        raise CheckpointError(f"no student checkpoint at {path}; run `distill student` for it first")
    try:
        obj = torch_load(path)
    except ValueError as e:  # truncated zip, foreign pickle (refused by weights_only), not a torch file
        raise CheckpointError(f"{path}: not a readable student checkpoint ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a readable student checkpoint (a {type(obj).__name__}, not a dict)")
    return obj


def load_student(
    folder: str | Path, device: torch.device, *, num_classes: int, img_size: int, in_chans: int
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained student from its checkpoint (the architecture is recorded inside), refusing one
    trained for other classes or another input shape than the caller's."""
    path = checkpoint_path(folder)
    ckpt = load_checkpoint(path)
    try:
        sc = StudentConfig.model_validate(ckpt["student"])
        trained = {"num_classes": ckpt["num_classes"], "img_size": ckpt["img_size"], "in_chans": ckpt["in_chans"]}
        epochs = ckpt["epoch"] + 1
        state = ckpt["model"]
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable student checkpoint ({type(e).__name__}: {e})") from e
    here = {"num_classes": num_classes, "img_size": img_size, "in_chans": in_chans}
    diffs = [f"{k} {trained[k]} (this config: {here[k]})" for k in here if trained[k] != here[k]]
    if diffs:
        raise CheckpointError(f"{path}: trained for {', '.join(diffs)}")
    model = create_student(sc, **trained)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the recorded architecture ({e})") from e
    return model.to(device).eval(), {"distillation": sc.distillation, "token": sc.token, "epochs": epochs}
