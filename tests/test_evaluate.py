"""``distill evaluate``'s inputs: student folders and their checkpoints (the full run is in test_pipeline_dvc)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from pipeline.core.config import StudentConfig
from pipeline.core.errors import DistillError
from pipeline.train.checkpoint import CHECKPOINT, StudentCheckpoint, load_student, save_checkpoint
from pipeline.train.evaluation import collect_logits, collect_logits_many, topk_accuracy
from pipeline.train.models import create_student
from stages.evaluate import student_names

TINY = StudentConfig(patch_size=4, embed_dim=16, depth=1, num_heads=2, distillation="hard")


def _checkpoint(folder: Path, **shape: int) -> Path:
    """A student checkpoint as the student stage writes it, after 3 epochs."""
    model = create_student(TINY, **shape)
    save_checkpoint(folder, StudentCheckpoint(
        run_hash="", run_identity={}, epoch=2, step=30, model=model.state_dict(), optimizer={}, ema=None, rng=None,
        history=[], world=1, batch_size=8, global_batch=8, student=TINY.model_dump(mode="json"), **shape))
    return folder


SHAPE = {"num_classes": 10, "img_size": 16, "in_chans": 1}


class Batch(NamedTuple):
    view: torch.Tensor
    index: torch.Tensor
    label: torch.Tensor


def test_students_are_named_by_folder():
    assert student_names([Path("runs/student-hard"), Path("x/soft")]) == {
        "hard": Path("runs/student-hard"), "soft": Path("x/soft")
    }


@pytest.mark.parametrize(("folders", "message"), [
    (["a/student-hard", "b/student-hard"], "also the name of a/student-hard"),
    (["runs/student-teacher"], "'teacher' is reserved"),
])
def test_clashing_or_reserved_student_names_are_refused(folders, message):
    with pytest.raises(DistillError, match=message):
        student_names([Path(f) for f in folders])


def test_a_student_checkpoint_loads_in_eval_mode(tmp_path):
    model, info = load_student(_checkpoint(tmp_path / "s", **SHAPE), torch.device("cpu"), **SHAPE)
    assert not model.training
    assert info == {"distillation": "hard", "token": "dist", "epochs": 3}


def test_a_student_trained_for_another_shape_is_refused_naming_it(tmp_path):
    folder = _checkpoint(tmp_path / "s", **SHAPE)
    with pytest.raises(DistillError, match=r"num_classes 10 \(this config: 5\)"):
        load_student(folder, torch.device("cpu"), **{**SHAPE, "num_classes": 5})


def test_an_incomplete_checkpoint_is_a_clean_error(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    torch.save({"student": TINY.model_dump(mode="json")}, folder / CHECKPOINT)
    with pytest.raises(DistillError, match="not a readable student checkpoint"):
        load_student(folder, torch.device("cpu"), **SHAPE)


def test_topk_accuracy_is_a_fraction_and_clamps_k():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    label = torch.tensor([1, 2, 0])
    assert topk_accuracy(logits, label, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, label, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, label, 5) == 1.0


def test_one_pass_for_several_models_equals_one_pass_each(tmp_path):
    torch.manual_seed(0)
    a, b = (create_student(TINY, **SHAPE) for _ in range(2))
    a.train()
    batches = [Batch(torch.randn(4, 1, 16, 16), torch.arange(4) + 4 * i, torch.arange(4) % 10) for i in range(3)]
    both = collect_logits_many([a, b], batches, torch.device("cpu"), heads=True)
    assert a.training  # modes are restored
    for model, got in zip((a, b), both, strict=True):
        alone = collect_logits(model, batches, torch.device("cpu"), heads=True)
        assert all(torch.equal(got[k], alone[k]) for k in ("index", "label", "cls", "dist", "fused"))
