"""``distill evaluate``'s inputs: student folders and their checkpoints (the full run is in test_pipeline_dvc)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import StudentConfig
from pipeline.models import create_student
from stages.common import StageError
from stages.evaluate import load_student, student_names
from stages.student import CHECKPOINT

TINY = StudentConfig(patch_size=4, embed_dim=16, depth=1, num_heads=2, distillation="hard")


def _checkpoint(folder: Path, **shape: int) -> Path:
    folder.mkdir(parents=True)
    model = create_student(TINY, **shape)
    torch.save({"student": TINY.model_dump(mode="json"), "model": model.state_dict(), "epoch": 2, **shape},
               folder / CHECKPOINT)
    return folder


SHAPE = {"num_classes": 10, "img_size": 16, "in_chans": 1}


def test_students_are_named_by_folder():
    assert student_names([Path("runs/student-hard"), Path("x/soft")]) == {
        "hard": Path("runs/student-hard"), "soft": Path("x/soft")
    }


@pytest.mark.parametrize(("folders", "message"), [
    (["a/student-hard", "b/student-hard"], "also the name of a/student-hard"),
    (["runs/student-teacher"], "'teacher' is reserved"),
])
def test_clashing_or_reserved_student_names_are_refused(folders, message):
    with pytest.raises(StageError, match=message):
        student_names([Path(f) for f in folders])


def test_a_student_checkpoint_loads_in_eval_mode(tmp_path):
    model, info = load_student(_checkpoint(tmp_path / "s", **SHAPE), torch.device("cpu"), **SHAPE)
    assert not model.training
    assert info == {"distillation": "hard", "token": "dist", "epochs": 3}


def test_a_student_trained_for_another_shape_is_refused_naming_it(tmp_path):
    folder = _checkpoint(tmp_path / "s", **SHAPE)
    with pytest.raises(StageError, match=r"num_classes 10 \(this config: 5\)"):
        load_student(folder, torch.device("cpu"), **{**SHAPE, "num_classes": 5})


def test_an_incomplete_checkpoint_is_a_clean_error(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    torch.save({"student": TINY.model_dump(mode="json")}, folder / CHECKPOINT)
    with pytest.raises(StageError, match="not a readable student checkpoint"):
        load_student(folder, torch.device("cpu"), **SHAPE)
