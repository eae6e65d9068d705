"""A store that travels: it records how its views were made (library versions and a view canary), and every reader
refuses, before any work, to use it in an environment that makes other views; plus the faults a store meets on the
way (a truncated packed object, a full disk, an incomplete store, read-only storage).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import (
    assert_clean_failure,
    assert_same_store,
    at,
    derive,
    rewrite_unit,
    run_cli,
    write_yaml,
)

import store
from pipeline.core.config import Config
from pipeline.core.errors import DistillError
from pipeline.views import canary
from stages import student, teacher, verify

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("single_thread")

OFF_BY_ONE = '''"""Pillow's resize, one pixel value off: what a changed resampling filter in an upgrade looks like."""
import PIL.Image as _I

_resize = _I.Image.resize


def _off_by_one(self, *args, **kwargs):
    out = _resize(self, *args, **kwargs)
    px = out.load()
    v = px[0, 0]
    px[0, 0] = tuple((c + 1) % 256 for c in v) if isinstance(v, tuple) else (v + 1) % 256
    return out


_I.Image.resize = _off_by_one
'''


@pytest.fixture
def copied(random_teacher_run: Config, reference_store: Path, tmp_path: Path) -> tuple[Config, Path]:
    """A config on a private copy of the shared reference store, with its own student output."""
    path = tmp_path / "store.zarr"
    shutil.copytree(reference_store, path)
    cfg = derive(at(random_teacher_run, path), student={"epochs": 1, "output": str(tmp_path / "student")})
    return cfg, path


@pytest.fixture
def other_views(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process makes other views: Pillow's resize one pixel value off (the sitecustomize's patch)."""
    namespace: dict = {}
    import PIL.Image

    real = PIL.Image.Image.resize
    exec(compile(OFF_BY_ONE, "off_by_one", "exec"), namespace)
    patched = PIL.Image.Image.resize
    PIL.Image.Image.resize = real
    monkeypatch.setattr(PIL.Image.Image, "resize", patched)


def strip_canary(path: Path) -> None:
    """The store as written before views were fingerprinted: no canary in its provenance, no pool images."""
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    prov = root.attrs.asdict()["provenance"]
    prov.pop("views")
    root.attrs["provenance"] = prov
    store.finalize(path)
    (path / canary.POOL_KEY).unlink()


# ------------------------------------------------------------------------------------------ the canary


def test_a_new_store_records_the_libraries_and_a_canary_of_every_enabled_transform(reference_store):
    record = store.open_store(reference_store).attrs.asdict()["provenance"]["views"]
    assert set(record["versions"]) == {*canary.VIEW_LIBRARIES, "view_stream"}
    assert {"flip", "erase", "mixup", "cutmix"} <= set(record["covers"]) and record["missed"] == []
    assert sum(len(d) - 1 for d in record["train"]) >= canary.MIN_VIEWS  # the last digest of an epoch: its plan
    assert (reference_store / canary.POOL_KEY).is_file()
    check = canary.store_canary(store.open_store(reference_store))
    assert check.same_views and check.versions == [] and check.total == sum(map(len, record["train"])) + len(
        record["eval"])


def test_a_student_where_views_differ_stops_before_a_step_and_trains_as_before_where_they_do_not(copied, tmp_path):
    cfg, path = copied
    yml = write_yaml(derive(cfg, student={"distillation": "hard"}), tmp_path / "cfg.yaml")
    patch = tmp_path / "patched"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(OFF_BY_ONE)
    cmd = [sys.executable, "-m", "stages", "student", "-c", str(yml), "--quiet", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": f"{patch}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "canary views differ from the views the teacher labelled" in lines[0] and "distill teacher" in lines[0]
    assert not (Path(cfg.student.output) / "checkpoint.pt").exists() and "epoch 1" not in proc.stdout


def test_the_canary_check_leaves_training_as_it_was(copied, tmp_path, monkeypatch):
    cfg, _ = copied
    runs = {}
    for name in ("checked", "unchecked"):
        if name == "unchecked":
            monkeypatch.setattr("pipeline.train.run_store.require_same_views", lambda *a, **k: None)
        out = tmp_path / name
        student.run(derive(cfg, student={"distillation": "hard", "output": str(out)}), progress=False, device="cpu")
        runs[name] = json.loads((out / "metrics.json").read_text())
    runs["checked"].pop("train_im_per_s"), runs["unchecked"].pop("train_im_per_s")
    assert runs["checked"] == runs["unchecked"]  # every figure to the last digit


@pytest.mark.usefixtures("other_views")
def test_verify_and_audit_refuse_the_same_patch(copied, tmp_path):
    cfg, _ = copied
    yml = write_yaml(cfg, tmp_path / "cfg.yaml")
    for args in (("verify", "-c", yml, "--quiet", "--device", "cpu"), ("audit", "-c", yml, "--output", tmp_path / "a")):
        assert_clean_failure(run_cli(*args), "canary views differ", "distill teacher", "--allow-view-drift")
    assert not (tmp_path / "a").exists()


def test_other_library_versions_with_the_same_views_proceed_with_a_notice(copied, monkeypatch, capsys):
    cfg, _ = copied
    real = canary.library_versions
    monkeypatch.setattr(canary, "library_versions", lambda: {**real(), "timm": "9.9.9"})
    student.run(derive(cfg, student={"distillation": "hard"}), progress=False, device="cpu")
    err = capsys.readouterr().err
    assert err.count("timm 9.9.9 here") == 1 and "canary views are identical, proceeding" in err


@pytest.mark.usefixtures("other_views")
def test_allow_view_drift_goes_on_loudly_and_the_run_records_it(copied, capsys):
    cfg, _ = copied
    out = student.run(derive(cfg, student={"distillation": "hard"}), progress=False, device="cpu",
                      allow_view_drift=True)
    assert "WARNING" in capsys.readouterr().err
    assert "canary views differ" in json.loads((Path(out) / "metrics.json").read_text())["view_drift"]


def test_a_store_from_before_the_canary_is_refused_naming_stamp_then_stamped(copied, tmp_path):
    cfg, path = copied
    strip_canary(path)
    with pytest.raises(DistillError, match="distill store stamp"):
        student.run(derive(cfg, student={"distillation": "hard"}), progress=False, device="cpu")
    result = run_cli("store", "stamp", "-c", write_yaml(cfg, tmp_path / "cfg.yaml"), "--samples", "16", "--quiet",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "recorded this environment's view canary" in result.output
    assert canary.store_canary(store.open_store(path)).same_views
    verify.run(cfg, samples=8, device="cpu")  # accepted now


def test_stamp_refuses_a_store_whose_targets_are_not_this_teachers_on_these_views(copied, tmp_path):
    cfg, path = copied
    strip_canary(path)
    rewrite_unit(path, 1, 0, topk_classes=lambda c: np.roll(c, 1, axis=1))  # another class on top
    result = run_cli("store", "stamp", "-c", write_yaml(cfg, tmp_path / "cfg.yaml"), "--samples", "64", "--quiet",
                     "--device", "cpu")
    assert_clean_failure(result, "not stamped", "agreement")
    assert "views" not in store.open_store(path).attrs.asdict()["provenance"]


def test_describe_prints_the_recorded_versions_and_whether_they_are_reproduced_here(reference_store):
    result = run_cli("store", "describe", reference_store)
    assert result.exit_code == 0, result.output
    assert '"timm": "' in result.output and "this environment reproduces all" in result.output


# ------------------------------------------------------------------------------------------ four faults


def test_a_truncated_packed_object_is_repaired_to_the_reference(copied, reference_store, capsys):
    cfg, path = copied
    obj = path / "train" / "topk_logits" / "c" / "1" / "0" / "0"  # stored epoch 1's one logits object
    obj.write_bytes(obj.read_bytes()[: obj.stat().st_size // 2])
    teacher.run(cfg, progress=False, device="cpu")
    assert "computing it again" in capsys.readouterr().out
    assert_same_store(reference_store, path)


def test_a_full_disk_names_the_path(copied, tmp_path, monkeypatch):
    cfg, path = copied
    store.delete_record(store.objects_at(path), "val", 0, 1)  # something for the teacher to write

    async def full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")  # as write(): no file name of its own

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full)
    assert_clean_failure(run_cli("teacher", "-c", write_yaml(cfg, tmp_path / "cfg.yaml"), "--quiet", "--device",
                                 "cpu"), "No space left on device", str(path))
    monkeypatch.undo()

    import webdataset

    def full_tar(self, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(webdataset.TarWriter, "write", full_tar)
    fresh = derive(cfg, data={"shards": str(tmp_path / "shards")})
    assert_clean_failure(run_cli("ingest", "-c", write_yaml(fresh, tmp_path / "in.yaml"), "--quiet"),
                         "No space left on device", "train-000000.tar")


def test_verify_fails_on_an_incomplete_store_naming_what_is_missing(copied, tmp_path):
    cfg, path = copied
    (path / "done" / "train" / "e000001.json").unlink()  # stored epoch 1's record: its units are not done
    result = run_cli("verify", "-c", write_yaml(cfg, tmp_path / "cfg.yaml"), "--quiet", "--device", "cpu")
    assert_clean_failure(result, "not done", "train (epoch 1, shard 0)", "distill teacher")


def test_the_teacher_on_a_complete_store_on_read_only_storage_does_nothing(copied, monkeypatch, capsys):
    cfg, path = copied

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    async def read_only_async(*args, **kwargs):
        read_only()

    monkeypatch.setattr(store.objects, "write_object", read_only)
    monkeypatch.setattr(zarr.storage.LocalStore, "set", read_only_async)
    monkeypatch.setattr(zarr.storage.LocalStore, "delete", read_only_async)
    teacher.run(cfg, progress=False, device="cpu")
    assert "wrote 0 unit(s)" in capsys.readouterr().out
