"""The student checkpoint: its file name, what it holds, and how it is written and read back.

One home for the format, used by the student stage (save, resume) and by evaluate (load a trained
student). A checkpoint is written atomically, so a crash or a full disk never leaves a half-written
file under the real name, and it is read with ``torch.load(weights_only=True)``: it holds only
tensors and plain Python values (the RNG states included), so loading someone else's student folder
cannot run code through pickle.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.config import StudentConfig
from pipeline.core.errors import DistillError
from pipeline.core.files import atomic_torch_save, location, torch_load
from pipeline.train.models import create_student

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


@dataclass
class StudentCheckpoint:
    """What a student checkpoint holds: written by the student stage after every epoch, read back to resume it
    and by evaluate to rebuild the trained model. Tensors and plain values only (``weights_only``-safe)."""

    run_hash: str
    """sha256 of ``run_identity``: a checkpoint resumes only the run it came from."""
    run_identity: dict[str, Any]
    epoch: int
    """The last training epoch completed (0-based): a resumed run starts at ``epoch + 1``."""
    step: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    ema: dict[str, Any] | None
    rng: Any
    """Every rank's RNG state (:func:`rng_state`; a list on several ranks)."""
    history: list[dict[str, Any]]
    world: int
    batch_size: int
    global_batch: int
    student: dict[str, Any]
    """The student section it was trained with (its architecture)."""
    num_classes: int
    img_size: int
    in_chans: int


def save_checkpoint(folder: str | Path, ckpt: StudentCheckpoint) -> str:
    """Write ``ckpt`` as the folder's checkpoint (atomically); returns its path."""
    path = checkpoint_path(folder)
    atomic_torch_save(asdict(ckpt), path)
    return path


def load_checkpoint(path: str | Path) -> StudentCheckpoint:
    """Read a checkpoint on the CPU with the safe loader; CheckpointError names the file and what is wrong."""
    if not location(path).is_file():
        raise CheckpointError(f"no student checkpoint at {path}; run `distill student` for it first")
    try:
        obj = torch_load(path)
    except ValueError as e:  # truncated zip, foreign pickle (refused by weights_only), not a torch file
        raise CheckpointError(f"{path}: not a readable student checkpoint ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a readable student checkpoint (a {type(obj).__name__}, not a dict)")
    missing = [f.name for f in fields(StudentCheckpoint) if f.name not in obj]
    if missing:
        raise CheckpointError(f"{path}: not a readable student checkpoint (no {', '.join(missing[:5])})")
    return StudentCheckpoint(**{f.name: obj[f.name] for f in fields(StudentCheckpoint)})


def load_student(
    folder: str | Path, device: torch.device, *, num_classes: int, img_size: int, in_chans: int
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained student from its checkpoint (the architecture is recorded inside), refusing one
    trained for other classes or another input shape than the caller's."""
    path = checkpoint_path(folder)
    ckpt = load_checkpoint(path)
    try:
        sc = StudentConfig.model_validate(ckpt.student)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable student checkpoint ({type(e).__name__}: {e})") from e
    trained = {"num_classes": ckpt.num_classes, "img_size": ckpt.img_size, "in_chans": ckpt.in_chans}
    epochs, state = ckpt.epoch + 1, ckpt.model
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
