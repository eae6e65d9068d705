"""Shared small-data helpers and fixtures.

Helpers (plain functions, importable as ``from conftest import make_idx`` or used via fixtures):

- ``make_idx(root, n_train, n_val, size=28, classes=10, *, gz=True, channels=1, seed=0)`` writes the
  four MNIST-style IDX files into ``root``; image i of a split is random uint8 noise, label i % classes.
- ``write_idx(path, array, gz=True)`` writes one uint8 IDX file.
- ``make_imagefolder(root, classes=("cat", "dog", "fish"), n_train=3, n_val=2, size=16, fmt="mixed")``
  writes ``root/train/<class>/*`` and ``root/val/<class>/*`` RGB images (fmt "png", "jpg" or
  "mixed" alternating) and returns ``(train_root, val_root)``.
- ``make_config(tmp_path, data, **sections)`` a validated Config whose every output lives under
  ``tmp_path``, with tiny models and epochs; ``data`` and ``sections`` override (deep-merged).
- ``s3_env(endpoint)`` the environment that points a subprocess's S3 clients at a test server
  (``tests/s3server.py``'s ``S3Server``), for stages run as commands.
- ``readme_block(marker)`` the README's bash block after ``<!-- marker``: tests run the README's commands as written.

Fixtures: ``idx_root`` (25 train / 12 val gzipped 28x28 images, 10 classes), ``imagefolder_roots``
(``(train_root, val_root)``, 3 classes, 3 train / 2 val each, PNG and JPEG mixed), ``tiny_config``
(an idx Config on ``idx_root`` with shards in ``tmp_path / "shards"`` and shard_size 10); for the whole
session, ``random_teacher_run`` (30 train / 12 val images ingested, a random teacher) and ``reference_store``
(its store, filled by one process: never modified, copy it to damage it).

Under pytest-xdist (``make test`` runs two workers) every worker and its subprocesses use one torch thread:
two workers on two cores with two OpenMP threads each spin against each other.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the project is not installed in the venv; make it importable
    sys.path.insert(0, str(ROOT))

from pipeline.core.config import Config  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the subprocesses (torchrun, dvc) the tests start
os.environ.setdefault("DISTILL_CACHE", os.path.join(tempfile.gettempdir(), f"distill-test-cache-{os.getpid()}"))
"""Ingest's stamps of the shards folders the tests make stay out of the user's cache."""


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """Write a uint8 array as an IDX file (gzipped when ``gz``)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.tobytes()
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    return path


def make_idx(
    root: Path,
    n_train: int,
    n_val: int,
    size: int = 28,
    classes: int = 10,
    *,
    gz: bool = True,
    channels: int = 1,
    seed: int = 0,
) -> Path:
    """Write train/t10k images and labels IDX files into ``root``; returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        shape = (n, size, size) if channels == 1 else (n, size, size, channels)
        images = rng.integers(0, 256, size=shape, dtype=np.uint8)
        labels = (np.arange(n) % classes).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
    return root


def make_imagefolder(
    root: Path,
    classes: tuple[str, ...] | list[str] = ("cat", "dog", "fish"),
    n_train: int = 3,
    n_val: int = 2,
    size: int = 16,
    fmt: str = "mixed",
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write an ImageNet-style train/val folder pair of RGB images; returns (train_root, val_root)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    roots = (root / "train", root / "val")
    for split_root, n in zip(roots, (n_train, n_val), strict=True):
        for c in classes:
            folder = split_root / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                ext = fmt if fmt != "mixed" else ("png" if i % 2 == 0 else "jpg")
                im = Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))
                im.save(folder / f"{c}_{i:03d}.{ext}", format="PNG" if ext == "png" else "JPEG")
    return roots


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_config(tmp_path: Path, data: dict[str, Any], **sections: Any) -> Config:
    """A tiny, valid Config with every output under ``tmp_path``; keyword sections deep-merge."""
    tmp_path = Path(tmp_path)
    raw: dict[str, Any] = {
        "seed": 0,
        "data": {"shards": str(tmp_path / "shards"), "shard_size": 10},
        "aug": {
            "img_size": 28,
            "channels": 1,
            "mean": [0.5],
            "std": [0.5],
            "auto_augment": None,
            "color_jitter": 0.0,
            "scale": [0.35, 1.0],
            "window": 8,
            "crop_pct": 1.0,
        },
        "teacher": {
            "model": "resnet18",
            "small_stem": True,
            "epochs": 2,
            "topk": 5,
            "batch_size": 16,
            "claim_ttl": 12.0,  # a killed writer's units are taken over after 4 s (ttl / 3), not 40
            "fit": {
                "epochs": 1,
                "batch_size": 16,
                "warmup_epochs": 0,
                "output": str(tmp_path / "teacher.pt"),
            },
        },
        "store": {"path": str(tmp_path / "logits.zarr")},
        "student": {
            "patch_size": 7,
            "embed_dim": 32,
            "depth": 1,
            "num_heads": 2,
            "epochs": 2,
            "batch_size": 8,
            "warmup_epochs": 0,
            "output": str(tmp_path / "runs" / "student"),
        },
        "evaluate": {"batch_size": 16, "output": str(tmp_path / "runs" / "eval")},
    }
    raw = _merge(raw, {"data": data, **sections})
    return Config.model_validate(raw)


def derive(cfg: Config, **sections: Any) -> Config:
    """``cfg`` with some sections deep-merged, re-validated."""
    return Config.model_validate(_merge(cfg.model_dump(mode="json"), sections))


def at(cfg: Config, path: Path) -> Config:
    return derive(cfg, store={"path": str(path)})


def write_yaml(cfg: Config, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def save_random_teacher(cfg: Config, path: Path, seed: int, num_classes: int = 10) -> Path:
    """A randomly initialised teacher of ``cfg.teacher.model``, saved as a checkpoint (tests need no competence)."""
    import torch

    from pipeline.train.models import create_teacher, save_teacher_checkpoint

    torch.manual_seed(seed)
    net = create_teacher(
        cfg.teacher.model_copy(update={"checkpoint": None, "pretrained": False}),
        num_classes=num_classes, in_chans=cfg.aug.channels,
    )
    save_teacher_checkpoint(net, path, {"model": cfg.teacher.model, "seed": seed})
    return path


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of train/, val/ and clean/, and the done masks (from the records), of the store at ``path``."""
    import zarr

    import store

    root = zarr.open_group(str(path), mode="r")
    out = {}
    for split in ("train", *store.VIEW_SPLITS):
        for name, arr in root[split].arrays():
            out[f"{split}/{name}"] = arr[...]
    out["train/done"] = store.done_mask(root)  # the done records
    for split in store.VIEW_SPLITS:
        out[f"{split}/done"] = store.val_done_mask(root, split)
    return out


def assert_same_store(a: Path, b: Path) -> None:
    """Every array of train/, val/ and clean/ (done included) has the same dtype, shape and bytes."""
    xa, xb = store_arrays(a), store_arrays(b)
    assert sorted(xa) == sorted(xb)
    assert "train/done" in xa and "val/done" in xa and "clean/done" in xa
    for name in xa:
        u, v = xa[name], xb[name]
        assert u.dtype == v.dtype and u.shape == v.shape, name
        if not np.array_equal(u, v):  # NaN never equals: an unfilled array cannot pass
            diff = int((u != v).sum())
            pytest.fail(f"{name}: {diff} of {u.size} values differ between {a} and {b}")
        assert u.tobytes() == v.tobytes(), f"{name}: equal values but different bits (-0.0?)"


def run_cli(*args: str):
    """``distill ARGS`` in this process (click's runner); exceptions are caught and kept on the result."""
    from click.testing import CliRunner

    from stages.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def assert_clean_failure(result, *needles: str) -> None:
    """Exit code 1 through click (not an escaped exception), a message naming what is wrong."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), f"escaped exception: {result.exception!r}"
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment that points a subprocess's S3 clients at the test server (botocore reads AWS_ENDPOINT_URL)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


def readme_block(marker: str) -> str:
    """The fenced bash block right after ``<!-- marker ... -->`` in the README (tests run them as written)."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(f"<!-- {marker}") :]
    return after.split("```bash\n", 1)[1].split("```", 1)[0]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LONGEST_FIRST = ("test_pipeline_dvc.py", "test_rehearsal.py", "test_submit.py", "test_distribution.py",
                 "test_teacher.py", "test_s3_writers.py", "test_cooperative.py", "test_s3.py")
"""The files that run stages in subprocesses, longest first (measured): collected first, so that pytest-xdist,
which hands out whole files in collection order (``--dist loadfile --no-loadscope-reorder``; its default order is
by number of tests, which puts these last), starts them first and the short files fill the gaps beside them,
instead of one long file starting last and the suite waiting for it."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


N_TRAIN, N_VAL, CLASSES = 30, 12, 10
"""The shared run's data: train and val images, classes."""


@pytest.fixture(scope="session")
def random_teacher_run(tmp_path_factory) -> Config:
    """Ingested tiny dataset (shards of 10) + a random teacher checkpoint; E=2, K=5, store path unset."""
    tmp = tmp_path_factory.mktemp("random-teacher")
    root = make_idx(tmp / "idx", N_TRAIN, N_VAL, classes=CLASSES)
    cfg = make_config(tmp, {"source": "idx", "root": str(root)})
    from stages import ingest

    ingest.run(cfg, progress=False)
    ckpt = save_random_teacher(cfg, tmp / "random_teacher.pt", seed=0, num_classes=CLASSES)
    return derive(cfg, teacher={"checkpoint": str(ckpt)}, store={"path": str(tmp / "unused.zarr")})


@pytest.fixture(scope="session")
def reference_store(random_teacher_run: Config) -> Path:
    """The shared run's store, written by one process (workers 0, batch 16). Never modified by tests."""
    from stages import teacher

    path = Path(random_teacher_run.data.shards).parent / "reference.zarr"
    teacher.run(at(random_teacher_run, path), workers=0, batch_size=16, progress=False, device="cpu")
    return path


def copy_store(reference: Path, path: Path) -> Path:
    shutil.copytree(reference, path)
    return path


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module: on a shared 2-core machine two OpenMP threads spin against other
    processes and a tiny forward pass gets 10x slower. (torchrun ranks run with OMP_NUM_THREADS=1 too.)"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def idx_root(tmp_path: Path) -> Path:
    """25 train / 12 val gzipped 28x28 grayscale IDX images, 10 classes."""
    return make_idx(tmp_path / "idx", 25, 12)


@pytest.fixture
def imagefolder_roots(tmp_path: Path) -> tuple[Path, Path]:
    """(train_root, val_root): 3 classes, 3 train / 2 val 16x16 RGB images each, PNG and JPEG mixed."""
    return make_imagefolder(tmp_path / "folder")


@pytest.fixture
def tiny_config(tmp_path: Path, idx_root: Path) -> Config:
    """An idx Config on ``idx_root``: shards in ``tmp_path / "shards"`` (shard_size 10), tiny models."""
    return make_config(tmp_path, {"source": "idx", "root": str(idx_root)})


def done_mask_at(path: Path):
    """The (E, S) train done mask of the store at ``path`` (its done records)."""
    import zarr

    import store

    return store.done_mask(zarr.open_group(str(path), mode="r"))


def undo_unit(path: Path, epoch: int, shard: int, split: str = "train") -> None:
    """Un-mark a unit as done (delete its record), as a crash before its record was written leaves it; a packed
    epoch is unpacked first."""
    import zarr

    import store

    g = zarr.open_group(str(path), mode="r+")
    if split == "train" and epoch in store.packed_epochs(g):
        store.unpack_epoch(g, epoch, {shard})
    store.delete_record(store.objects_at(path), split, epoch, shard)


def rewrite_unit(path: Path, epoch: int, shard: int, plan=None, **changes) -> None:
    """Rewrite a done train unit through the store's writer with some arrays changed (``name=function of the
    old array``) or another mix ``plan`` (partner, kind, λ): a consistent unit, with its record, that holds
    other targets or was written for another plan. A packed epoch is unpacked first."""
    import zarr

    import store
    from pipeline.audit.tables import store_plans

    g = zarr.open_group(str(path), mode="r+")
    if epoch in store.packed_epochs(g):
        store.unpack_epoch(g, epoch, set())
    u = store.read_train_unit(g, epoch, shard)
    arrays = {name: getattr(u, name) for name in ("topk_logits", "topk_classes", "logsumexp", "label")}
    arrays.update({name: fn(arrays[name]) for name, fn in changes.items()})
    store.write_train_unit(g, epoch, shard, plan=plan or store_plans(g)(epoch, shard), **arrays)
