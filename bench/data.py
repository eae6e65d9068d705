"""Data the benchmarks share: Fashion-MNIST when installed, else synthetic IDX files of the same shape."""

from __future__ import annotations

import contextlib
import gzip
import io
from pathlib import Path

import numpy as np
import torch

from pipeline.core.config import Config
from pipeline.data.shards import Manifest, load_manifest
from pipeline.train.models import create_teacher, save_teacher_checkpoint
from stages import ingest

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + np.ascontiguousarray(array, np.uint8).tobytes(), mtime=0))


def synthetic_idx(root: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """Blurry blobs on noise (compresses like photos, not like pure noise), label i % 10; throughput does
    not depend on what the images show."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        cy, cx, r = rng.uniform(6, 22, (3, n, 1, 1))
        img = 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (r / 2 + 1) ** 2)) + rng.normal(20, 8, (n, 28, 28))
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", np.clip(img, 0, 255).astype(np.uint8))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return root


def source_root(tmp: Path, n_train: int, n_val: int, synthetic: bool) -> tuple[Path, str]:
    """Fashion-MNIST when installed (and not ``synthetic``), else generated IDX files."""
    if FMNIST.is_dir() and not synthetic:
        return FMNIST, "fashion-mnist"
    return synthetic_idx(tmp / "idx", n_train, n_val), "synthetic"


def ingest_with_random_teacher(cfg: Config) -> Manifest:
    """Shards for ``cfg`` and a randomly initialised teacher saved at ``cfg.teacher.checkpoint``
    (throughput does not depend on the weights)."""
    with contextlib.redirect_stdout(io.StringIO()):
        ingest.run(cfg, progress=False)
    m = load_manifest(cfg.data.shards)
    torch.manual_seed(0)
    net = create_teacher(cfg.teacher.model_copy(update={"checkpoint": None}), num_classes=m.num_classes,
                         in_chans=cfg.aug.channels)
    save_teacher_checkpoint(net, cfg.teacher.checkpoint, {"model": cfg.teacher.model, "random": True})
    return m
