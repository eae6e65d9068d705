"""The student stage: offline == online, resume, DDP, refusing the wrong store, and distillation helping.

Two tiny synthetic datasets of 16 px grayscale textures (4 classes: horizontal stripes, vertical
stripes, checkerboard, flat; random period, phase and noise), so a small CNN learns them in seconds:

- ``mixed``: 25 train images in 3 uneven shards (10, 10, 5) and 12 val, under the full DeiT recipe
  (RandAugment, random erasing, Mixup/CutMix, smoothing), E = 2 stored epochs, top-3 of 4 classes;
- ``noisy``: 160 train images, 60% of two classes labelled as their neighbour, 80 clean val, light aug.

One competent teacher (timm ``test_resnet`` with a small stem, trained for a few seconds on clean
labels) is saved with ``save_teacher_checkpoint`` and its logit stores are filled once per module.
Torch runs single-threaded here: on 2 shared cores, 2 OpenMP threads are ~10x slower than one.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_config, rewrite_unit, undo_unit, write_idx

import store
from pipeline.audit.tables import store_plans
from pipeline.core.config import Config
from pipeline.core.errors import DistillError
from pipeline.data.shards import load_manifest
from pipeline.train.models import create_teacher, save_teacher_checkpoint
from pipeline.views.join import StoreJoin
from pipeline.views.loading import UnitDataset, make_loader, train_stream
from stages import ingest
from stages import student as student_stage
from stages import teacher as teacher_stage
from stages.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
SIZE = 16
CLASSES = 4

STUDENT = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, "warmup_epochs": 0, "eval_every": 1000}
TEACHER = {"model": "test_resnet", "small_stem": True, "batch_size": 32}
FULL_AUG = {  # the DeiT recipe, scaled to 16 px
    "img_size": SIZE, "scale": [0.35, 1.0], "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25,
    "remode": "pixel", "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1, "window": 8,
}
REAL_LOSS = student_stage.distillation_loss
LIGHT_AUG = {"img_size": SIZE, "scale": [0.6, 1.0], "hflip": 0.0, "reprob": 0.0, "mixup": 0.0, "cutmix": 0.0,
             "smoothing": 0.0}


# ------------------------------------------------------------------------------------------- helpers


def textures(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n, 16, 16) uint8 textures and their labels i % 4."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    labels = np.arange(n) % CLASSES
    images = np.empty((n, SIZE, SIZE), np.float32)
    for i, c in enumerate(labels):
        period, a, b = rng.uniform(3.5, 5.0), *rng.uniform(0, 2 * np.pi, 2)
        pattern = (
            np.sin(2 * np.pi * yy / period + a),
            np.sin(2 * np.pi * xx / period + a),
            np.sign(np.sin(2 * np.pi * xx / period + a) * np.sin(2 * np.pi * yy / period + b)),
            np.zeros_like(xx),
        )[c]
        images[i] = 128 + 70 * pattern + rng.normal(0, 25, (SIZE, SIZE))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def write_dataset(root: Path, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, (x, y) in (("train", train), ("t10k", val)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y.astype(np.uint8))
    return root


def with_student(cfg: Config, **kw: Any) -> Config:
    if "output" in kw:
        kw["output"] = str(kw["output"])
    return cfg.model_copy(update={"student": cfg.student.model_copy(update=kw)})


def with_teacher(cfg: Config, checkpoint: Path) -> Config:
    return cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"checkpoint": str(checkpoint)})})


def with_store(cfg: Config, path: Path) -> Config:
    return cfg.model_copy(update={"store": cfg.store.model_copy(update={"path": str(path)})})


def write_yaml(cfg: Config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def history(out: Path) -> list[dict[str, str]]:
    with open(out / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_store(cfg: Config, tmp: Path) -> tuple[Config, Path]:
    path = tmp / "logits.zarr"
    shutil.copytree(cfg.store.path, path)
    return with_store(cfg, path), path


# ------------------------------------------------------------------------------------------ fixtures


pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A competent test_resnet teacher: trained on clean textures (light aug views), BN stats recomputed."""
    tmp = tmp_path_factory.mktemp("teacher")
    rng = np.random.default_rng(100)
    root = write_dataset(tmp / "idx", textures(160, rng), textures(16, rng))
    cfg = make_config(tmp, {"source": "idx", "root": str(root), "shard_size": 40}, aug=LIGHT_AUG, teacher=TEACHER)
    ingest.run(cfg, progress=False)
    m = load_manifest(cfg.data.shards)
    shards = range(len(m.ranges("train")))
    torch.manual_seed(0)
    model = create_teacher(cfg.teacher, num_classes=CLASSES, in_chans=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    ds, loader = train_stream(m, cfg.aug, cfg.seed, batch_size=32, view_epoch=lambda t: 1000 + t, rank=0, world=1,
                              shuffle=64, workers=0)
    for epoch in range(4):
        ds.set_epoch(epoch)
        for b in loader:
            loss = torch.nn.functional.cross_entropy(model(b.view), b.label)
            opt.zero_grad()
            loss.backward()
            opt.step()
    # Fresh running statistics for the final weights (a few fast AdamW steps leave them stale).
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    with torch.no_grad():
        for b in make_loader(UnitDataset(m, cfg.aug, cfg.seed, [(2000, s) for s in shards], batch_size=40), 0):
            model(b.view)
    model.eval()
    path = tmp / "teacher.pt"
    save_teacher_checkpoint(model, path, {"model": TEACHER["model"], "small_stem": True})
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, teacher_ckpt) -> Config:
    """Full DeiT aug, 25 train samples in shards of 10, 10, 5; store filled for E = 2, top-3 of 4."""
    tmp = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(1)
    root = write_dataset(tmp / "idx", textures(25, rng), textures(12, rng))
    cfg = make_config(
        tmp, {"source": "idx", "root": str(root), "shard_size": 10}, aug=FULL_AUG,
        teacher={**TEACHER, "epochs": 2, "topk": 3, "checkpoint": str(teacher_ckpt)},
        student={**STUDENT, "epochs": 4, "batch_size": 4, "shuffle": 8},
    )
    ingest.run(cfg, progress=False)
    teacher_stage.run(cfg, progress=False, device="cpu")
    g = store.open_store(cfg.store.path)
    hard = np.concatenate([store.read_train_unit(g, e, s).hard_label for e in range(2) for s in range(3)])
    assert len(np.unique(hard)) >= 3, "teacher labels too uniform for the tests to see a misalignment"
    return cfg


@pytest.fixture(scope="module")
def noisy(tmp_path_factory, teacher_ckpt) -> Config:
    """160 train textures with a systematic label confusion, 80 clean val; light aug, store filled.

    60% of the horizontal-stripe and checkerboard images are labelled as the next class, so plain
    training learns the confusion (about 50% val accuracy at best) while a teacher trained on clean
    labels knows better. (Uniformly random noise is learned through given enough epochs: the margin
    would then depend on the training length, not on distillation.)
    """
    tmp = tmp_path_factory.mktemp("noisy")
    rng = np.random.default_rng(2)
    x, y = textures(160, rng)
    y = np.where(np.isin(y, (0, 2)) & (rng.random(len(y)) < 0.6), y + 1, y)  # 0 -> 1, 2 -> 3 mostly
    root = write_dataset(tmp / "idx", (x, y), textures(80, rng))
    cfg = make_config(
        tmp, {"source": "idx", "root": str(root), "shard_size": 40}, aug=LIGHT_AUG,
        teacher={**TEACHER, "epochs": 2, "topk": 4, "checkpoint": str(teacher_ckpt)},
        student={**STUDENT, "epochs": 10, "batch_size": 16, "lr": 0.1, "drop_path": 0.0, "shuffle": 64},
    )
    ingest.run(cfg, progress=False)
    teacher_stage.run(cfg, progress=False, device="cpu")
    return cfg


def record_losses(monkeypatch) -> list[tuple[float, float, float]]:
    """Patch the student's loss to log every step's (total, base, distill)."""
    steps: list[tuple[float, float, float]] = []

    def recording(*args, **kwargs):
        parts = REAL_LOSS(*args, **kwargs)
        steps.append((parts.total.item(), parts.base.item(), parts.distill.item()))
        return parts

    monkeypatch.setattr(student_stage, "distillation_loss", recording)
    return steps


# -------------------------------------------------------------------------------------------- tests


def test_offline_and_online_hard_distillation_give_identical_losses(mixed, tmp_path, monkeypatch):
    """The stored hard labels are exactly the live teacher's on the replayed (mixed, erased) views."""
    losses = {}
    for mode in ("offline", "online"):
        steps = record_losses(monkeypatch)
        cfg = with_student(mixed, distillation="hard", output=tmp_path / mode)
        student_stage.run(cfg, progress=False, device="cpu", teacher_mode=mode)
        losses[mode] = steps
    # 25 samples in batches of 4: 6 steps an epoch, 24 in 4 epochs over E = 2 stored epochs
    assert len(losses["offline"]) >= 20
    assert losses["offline"][:20] == losses["online"][:20]
    assert losses["offline"] == losses["online"]
    assert all(d > 0 for _, _, d in losses["offline"])


def test_training_epoch_t_reads_stored_epoch_t_mod_e(mixed, tmp_path, monkeypatch):
    """4 training epochs over E = 2 stored ones read every shard of stored epochs 0, 1, 0, 1 in turn."""
    real, read = StoreJoin.__call__, []

    def recording(self, plan, *rows):
        read.append((plan.view_epoch, plan.shard))
        return real(self, plan, *rows)

    monkeypatch.setattr(StoreJoin, "__call__", recording)
    student_stage.run(with_student(mixed, distillation="hard", output=tmp_path / "out"), progress=False, device="cpu")
    assert [e for e, _ in read] == [0] * 3 + [1] * 3 + [0] * 3 + [1] * 3
    assert all(sorted(s for _, s in read[i : i + 3]) == [0, 1, 2] for i in range(0, 12, 3))


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(mixed, tmp_path):
    # depth 2 so drop path (rates linspace(0, 0.3, depth)) draws from the global RNG the checkpoint restores
    base = with_student(mixed, depth=2, drop_path=0.3)
    whole = student_stage.run(with_student(base, output=tmp_path / "whole"), progress=False, device="cpu")
    cfg = with_student(base, output=tmp_path / "resumed")
    student_stage.run(cfg, progress=False, device="cpu", until_epoch=2)
    stopped = torch.load(Path(cfg.student.output) / "checkpoint.pt", weights_only=False)
    assert stopped["epoch"] == 1 and len(stopped["history"]) == 2
    resumed = student_stage.run(cfg, progress=False, device="cpu")

    a = torch.load(whole / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ha, hb = history(whole), history(resumed)
    assert len(ha) == len(hb) == 4
    for col in ("loss", "loss_base", "loss_distill", "lr"):
        assert [r[col] for r in ha] == [r[col] for r in hb], col
    ma, mb = (json.loads((o / "metrics.json").read_text()) for o in (whole, resumed))
    assert {k: v for k, v in ma.items() if k.startswith("val_")} == {
        k: v for k, v in mb.items() if k.startswith("val_")
    }


@pytest.mark.slow
def test_two_process_torchrun_finishes_with_uneven_shards(mixed, tmp_path):
    """Shards of 10, 10, 5 over 2 ranks: ranks stream 20 vs 5 or 15 vs 10 samples and must step alike."""
    cfg = with_student(mixed, epochs=2, output=tmp_path / "ddp")
    path = write_yaml(cfg, tmp_path / "cfg.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "stages", "student", "-c", str(path), "--quiet", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = Path(cfg.student.output)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and isinstance(ckpt["rng"], list) and len(ckpt["rng"]) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_done"] == 2 and "val_fused_top1" in metrics
    assert len(history(out)) == 2


def test_refuses_a_store_from_another_teacher(mixed, tmp_path):
    torch.manual_seed(123)
    other = create_teacher(mixed.teacher.model_copy(update={"checkpoint": None}), num_classes=CLASSES, in_chans=1)
    path = tmp_path / "other_teacher.pt"
    save_teacher_checkpoint(other, path, {"model": TEACHER["model"]})
    cfg = with_student(with_teacher(mixed, path), output=tmp_path / "out")
    with pytest.raises(store.ProvenanceMismatch, match="teacher_sha256") as err:
        student_stage.run(cfg, progress=False, device="cpu")
    assert err.value.fields == ["teacher_sha256"]
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


@pytest.mark.parametrize("array", ["partner", "lam"])
def test_refuses_a_store_whose_mix_plan_differs(mixed, tmp_path, array):
    cfg, path = copy_store(mixed, tmp_path)
    a, b = load_manifest(mixed.data.shards).ranges("train")[1]

    plan = list(store_plans(store.open_store(path))(0, 1))
    row = plan[0 if array == "partner" else 2].copy()
    row[3] = (a + (int(row[3]) - a + 1) % (b - a)) if array == "partner" else float(row[3]) * 0.5 + 0.01
    plan[0 if array == "partner" else 2] = row
    rewrite_unit(path, 0, 1, plan=tuple(plan))  # a consistent unit written for another plan
    with pytest.raises(DistillError, match=r"mix plan") as err:
        student_stage.run(with_student(cfg, output=tmp_path / "out"), progress=False, device="cpu")
    assert "(epoch 0, shard 1)" in str(err.value)


def test_refuses_a_store_with_missing_units(mixed, tmp_path):
    cfg, path = copy_store(mixed, tmp_path)
    undo_unit(path, 1, 2)
    with pytest.raises(store.MissingUnit, match=r"\(epoch 1, shard 2\)"):
        student_stage.run(with_student(cfg, output=tmp_path / "out"), progress=False, device="cpu")


@pytest.mark.parametrize("problem", ["teacher", "plan", "missing"])
def test_cli_reports_store_refusals_cleanly_with_exit_code_1(mixed, tmp_path, problem):
    cfg, path = copy_store(mixed, tmp_path)
    cfg = with_student(cfg, output=tmp_path / "out")
    if problem == "teacher":
        torch.manual_seed(7)
        other = create_teacher(mixed.teacher.model_copy(update={"checkpoint": None}), num_classes=CLASSES, in_chans=1)
        save_teacher_checkpoint(other, tmp_path / "t.pt", {})
        cfg, expected = with_teacher(cfg, tmp_path / "t.pt"), "teacher_sha256"
    elif problem == "plan":
        partner, kind, lam = store_plans(store.open_store(path))(0, 0)
        rewrite_unit(path, 0, 0, plan=(partner, kind, np.r_[np.float32(0.3125), lam[1:]]))
        expected = "mix plan"
    else:
        undo_unit(path, 0, 0)
        expected = "not done"
    yml = write_yaml(cfg, tmp_path / "cfg.yaml")
    result = CliRunner().invoke(cli_main, ["student", "-c", str(yml), "--quiet", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # handled, not a crash
    assert "Error: " in result.output and expected in result.output and "Traceback" not in result.output


def test_hard_distillation_from_a_competent_teacher_beats_no_distillation(noisy, tmp_path):
    """Train labels are systematically wrong for 2 of 4 classes; the clean teacher's stored labels fix that."""
    val = store.read_val(store.open_store(noisy.store.path))
    assert (val.hard_label == val.label).mean() >= 0.9, "the teacher is not competent; the test proves nothing"
    metrics = {}
    for kind in ("none", "hard"):
        out = student_stage.run(with_student(noisy, distillation=kind, output=tmp_path / kind), progress=False,
                                device="cpu")
        metrics[kind] = json.loads((out / "metrics.json").read_text())
    none = max(metrics["none"]["val_cls_top1"], metrics["none"]["val_fused_top1"])
    hard = metrics["hard"]["val_dist_top1"]
    assert hard >= none + 0.2, (metrics["none"], metrics["hard"])
    assert metrics["hard"]["val_fused_top1"] > metrics["none"]["val_fused_top1"]


def test_soft_distillation_runs_end_to_end_with_a_positive_distill_loss(mixed, tmp_path):
    out = student_stage.run(with_student(mixed, distillation="soft", epochs=2, tau=2.0, output=tmp_path / "soft"),
                            progress=False, device="cpu")
    rows = history(out)
    assert len(rows) == 2
    for r in rows:
        assert np.isfinite(float(r["loss"])) and float(r["loss_distill"]) > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distillation"] == "soft" and metrics["epochs_done"] == 2


def test_online_soft_distillation_trains(mixed, tmp_path):
    """Online teacher targets feed the loss outside the teacher's no-grad block (soft needs its log-probs)."""
    out = student_stage.run(with_student(mixed, distillation="soft", epochs=1, output=tmp_path / "online-soft"),
                            progress=False, device="cpu", teacher_mode="online")
    assert float(history(out)[0]["loss_distill"]) > 0


def test_store_join_in_two_workers_gives_the_same_samples(mixed):
    """StoreJoin pickles into DataLoader workers and joins each unit's targets there."""
    m = load_manifest(mixed.data.shards)
    units = [(0, s) for s in range(len(m.ranges("train")))]
    got = {}
    for workers in (0, 2):
        ds = UnitDataset(m, mixed.aug, mixed.seed, units, batch_size=4, join=StoreJoin(mixed.store.path))
        rows = {}
        for b in make_loader(ds, workers):
            for j in range(len(b.index)):
                rows[int(b.index[j])] = (int(b.stored.hard[j]), b.stored.logits[j].numpy().tobytes(),
                                         b.view[j].numpy().tobytes())
        got[workers] = rows
    assert got[0] == got[2] and len(got[0]) == m.count("train")


def test_checkpoint_from_another_configuration_is_refused_unless_restart(mixed, tmp_path):
    out = tmp_path / "out"
    student_stage.run(with_student(mixed, distillation="hard", epochs=1, output=out), progress=False, device="cpu")
    other = with_student(mixed, distillation="hard", epochs=1, alpha=0.3, output=out)
    with pytest.raises(DistillError, match=r"another configuration \(student.alpha: checkpoint 0.5, now 0.3\)"):
        student_stage.run(other, progress=False, device="cpu")
    student_stage.run(other, progress=False, device="cpu", restart=True)
    assert json.loads((out / "metrics.json").read_text())["epochs_done"] == 1


# ---------------------------------------------------------------------------------------------- reuse


def test_reuse_warning_fires_above_the_measured_limit_and_not_at_or_below_it():
    from pipeline.train.reuse import REUSE_LIMIT, reuse_warning

    e = 4
    at_limit, above = int(REUSE_LIMIT * e), int(REUSE_LIMIT * e) + 1
    assert reuse_warning(at_limit, e) is None and reuse_warning(1, e) is None
    msg = reuse_warning(above, e)
    assert msg is not None and f"student.epochs {above}" in msg and f"teacher.epochs {e}" in msg
    assert f"teacher.epochs >= {-(-above // REUSE_LIMIT):.0f}" in msg


def test_student_stage_warns_once_about_reuse_and_describe_prints_the_factor(mixed, tmp_path, capsys):
    from pipeline.train.reuse import REUSE_LIMIT

    e = mixed.teacher.epochs
    many = with_student(mixed, epochs=int(REUSE_LIMIT * e) + 1, distillation="hard", output=str(tmp_path / "many"))
    student_stage.run(many, progress=False, device="cpu", until_epoch=1)
    assert capsys.readouterr().err.count("warning: student.epochs") == 1
    few = with_student(many, epochs=e, output=str(tmp_path / "few"))
    student_stage.run(few, progress=False, device="cpu", until_epoch=1)
    assert "warning" not in capsys.readouterr().err
    result = CliRunner().invoke(cli_main, ["store", "describe", str(mixed.store.path), "--student-epochs",
                                           str(int(REUSE_LIMIT * e) + 1)])
    assert result.exit_code == 0 and f"reuse: {int(REUSE_LIMIT * e) + 1} student epochs / E={e}" in result.output
    assert "above" in result.output
