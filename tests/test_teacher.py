"""The teacher stage: a store that is a pure function of the run, resumable, verifiable and guarded.

One tiny dataset (30 train / 12 val 28x28 images, shards of 10) and one randomly initialised
ResNet-18 small-stem teacher saved as a checkpoint are built once per module; a reference store is
written once and every other run is compared with it array by array, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (  # CLASSES, N_TRAIN, N_VAL: the shared run's
    CLASSES,
    N_TRAIN,
    N_VAL,
    assert_clean_failure,
    assert_same_store,
    at,
    derive,
    done_mask_at,
    free_port,
    make_idx,
    rewrite_unit,
    run_cli,
    save_random_teacher,
    store_arrays,
    undo_unit,
    write_yaml,
)

import store
from pipeline.core.config import Config
from pipeline.core.errors import DistillError
from pipeline.core.files import sha256_file, torch_load
from pipeline.train.models import create_teacher, resolve_teacher, save_teacher_checkpoint
from stages import ingest, teacher, teacher_fit, verify

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------- helpers


# ----------------------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread


@pytest.fixture(scope="module")
def base(random_teacher_run) -> Config:
    """Ingested tiny dataset + a random teacher checkpoint; E=2, K=5, store path unset (per test)."""
    return random_teacher_run


@pytest.fixture(scope="module")
def reference(reference_store: Path) -> Path:
    """A clean single-process store: workers 0, batch size 16. Never modified by tests."""
    return reference_store


def test_reference_store_is_complete_and_finite(reference: Path):
    g = store.open_store(reference)
    assert store.done_mask(g).all() and store.val_done_mask(g).all()
    assert store.packed_epochs(g) == {0, 1}  # every stored epoch packed once complete
    units = [store.read_train_unit(g, e, s) for e in range(2) for s in range(len(store.spec_of(g).train_ranges))]
    logits = np.concatenate([u.topk_logits for u in units])
    for name, x in (("topk_logits", logits), ("logsumexp", np.concatenate([u.logsumexp for u in units])),
                    ("val/topk_logits", store.read_val(g).topk_logits), ("val/logsumexp", store.read_val(g).logsumexp)):
        assert np.isfinite(x).all(), name
    assert logits.shape == (2 * N_TRAIN, 5) and all(u.plan for u in units)
    assert (np.diff(logits, axis=-1) <= 0).all()


# ----------------------------------------------------------------------------------------- invariance


def test_store_identical_for_0_and_2_workers(base: Config, reference: Path, tmp_path: Path):
    out = tmp_path / "w2.zarr"
    teacher.run(at(base, out), workers=2, batch_size=16, progress=False, device="cpu")
    assert_same_store(reference, out)


def test_store_identical_for_batch_sizes_16_and_7(base: Config, reference: Path, tmp_path: Path):
    out = tmp_path / "b7.zarr"
    teacher.run(at(base, out), workers=0, batch_size=7, progress=False, device="cpu")
    assert_same_store(reference, out)


SLOW_RANK_1 = """
import sys, time
import store
_done_mask = store.done_mask
def _late(group):  # rank 1 reads the done marks late, as a descheduled or slow-to-start rank would
    time.sleep(2.0)
    return _done_mask(group)
import os
if os.environ.get("RANK") == "1":
    store.done_mask = _late
from stages.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_torchrun_2_ranks_write_the_one_process_store_even_when_one_rank_is_late(base: Config, reference: Path,
                                                                               tmp_path: Path):
    """Two ranks write the store one process writes, bit for bit; and they must agree on which units are left before
    any rank marks one done, so rank 1 reads the done marks late here."""
    out = tmp_path / "late.zarr"
    cfg_yaml = write_yaml(at(base, out), tmp_path / "cfg.yaml")
    script = tmp_path / "late_rank.py"
    script.write_text(SLOW_RANK_1)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()),
        str(script), "teacher", "-c", str(cfg_yaml), "--quiet", "--device", "cpu",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_same_store(reference, out)


# ----------------------------------------------------------------------------------------- crash + resume


@pytest.fixture(scope="module")
def killed(base: Config, tmp_path_factory) -> tuple[Config, Path, Path, np.ndarray]:
    """A ``distill teacher`` (E=4, shards of 5, batch size 1) SIGKILLed once 1 <= units done < all.

    Returns (config, killed store, clean store of the same config, done mask read right after the kill).
    """
    tmp = tmp_path_factory.mktemp("killed")
    cfg = derive(base, data={"shards": str(tmp / "shards5"), "shard_size": 5}, teacher={"epochs": 4})
    ingest.run(cfg, progress=False)
    clean = tmp / "clean.zarr"
    teacher.run(at(cfg, clean), workers=0, batch_size=16, progress=False, device="cpu")

    path = tmp / "killed.zarr"
    cfg_yaml = write_yaml(at(cfg, path), tmp / "cfg.yaml")
    cmd = [sys.executable, "-m", "stages", "teacher", "-c", str(cfg_yaml), "--quiet",
           "--batch-size", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    total = 4 * (N_TRAIN // 5)
    done = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                done = done_mask_at(path)
            except (FileNotFoundError, KeyError, store.StoreError):
                done = None
            if done is not None and 1 <= done.sum() < total:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and (done is None or not 1 <= done.sum() < total):
            proc.kill()
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    if proc.returncode != -signal.SIGKILL or done is None:
        pytest.fail(f"could not kill the teacher mid-run (rc {proc.returncode}, done {done}):\n{out}")
    after = done_mask_at(path)
    assert 1 <= after.sum() < total, "the kill landed after the last unit"
    return cfg, path, clean, after


def test_killed_run_marks_no_unit_done_without_its_data(killed):
    _, path, clean, done = killed
    x, ref = store.open_store(path), store.open_store(clean)
    assert 0 < done.sum() < done.size
    for e, s in np.argwhere(done):  # read back checked: a unit marked done has all its data, as a clean run's
        got, want = store.read_train_unit(x, e, s), store.read_train_unit(ref, e, s)
        for name in ("topk_logits", "topk_classes", "logsumexp", "label", "plan"):
            assert np.array_equal(getattr(got, name), getattr(want, name)), f"done unit ({e}, {s}): {name} differs"


def test_killed_run_resumes_to_the_uninterrupted_store(killed, tmp_path: Path, capsys):
    cfg, path, clean, done = killed
    copy = tmp_path / "resumed.zarr"
    shutil.copytree(path, copy)
    teacher.run(at(cfg, copy), workers=0, batch_size=16, progress=False, device="cpu")
    assert f"{int(done.sum())} unit(s) already done" in capsys.readouterr().out
    assert_same_store(clean, copy)


# ----------------------------------------------------------------------------------------- verify


def test_verify_reports_full_agreement_on_fresh_store(base: Config, reference: Path, tmp_path: Path):
    cfg = at(base, reference)
    report = verify.run(cfg, samples=16, seed=1, device="cpu")
    assert 0 < report.checked <= 16  # picks are (unit, index) draws; repeats are checked once
    assert report.agreement == 1.0
    assert report.max_abs_logit_diff < 0.05  # float16 storage of |logit| < ~32
    result = run_cli("verify", "-c", write_yaml(cfg, tmp_path / "cfg.yaml"), "--samples", "16", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "(100.00%)" in result.output


def test_verify_fails_on_tampered_store(base: Config, reference: Path, tmp_path: Path):
    path = tmp_path / "tampered.zarr"
    shutil.copytree(reference, path)
    for e, s in np.argwhere(done_mask_at(path)):  # other answers, written consistently (records and all)
        rewrite_unit(path, e, s, topk_classes=lambda c: np.roll(c, 1, axis=1))  # another class on top
    cfg = at(base, path)
    with pytest.raises(verify.VerificationFailed) as failed:
        verify.run(cfg, samples=16, device="cpu")
    assert failed.value.report.agreement == 0.0
    result = run_cli("verify", "-c", write_yaml(cfg, tmp_path / "cfg.yaml"), "--samples", "16", "--device", "cpu")
    assert_clean_failure(result, "agreement")


# ----------------------------------------------------------------------------------------- provenance


@pytest.fixture(scope="module")
def mismatches(base: Config, reference: Path, tmp_path_factory) -> dict[str, Config]:
    """Configs aimed at the reference store that differ in exactly one identity field each."""
    tmp = tmp_path_factory.mktemp("mismatch")
    other_ckpt = save_random_teacher(base, tmp / "other_teacher.pt", seed=1, num_classes=CLASSES)
    other_root = make_idx(tmp / "idx", N_TRAIN, N_VAL, classes=CLASSES, seed=1)  # same sizes, other images
    other_data = derive(base, data={"root": str(other_root), "shards": str(tmp / "shards")})
    ingest.run(other_data, progress=False)
    return {
        "teacher_sha256": at(derive(base, teacher={"checkpoint": str(other_ckpt)}), reference),
        "aug_hash": at(derive(base, aug={"reprob": 0.5}), reference),
        "manifest_fingerprint": at(other_data, reference),
    }


FIELDS = ["teacher_sha256", "aug_hash", "manifest_fingerprint"]


@pytest.mark.parametrize("field", FIELDS)
def test_teacher_stage_refuses_store_of_another_run(mismatches, reference: Path, field: str):
    before = store_arrays(reference)
    with pytest.raises(store.ProvenanceMismatch) as exc:
        teacher.run(mismatches[field], progress=False, device="cpu")
    assert isinstance(exc.value, store.StoreError)
    assert exc.value.fields == [field]
    assert f"'{field}'" in str(exc.value)
    after = store_arrays(reference)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_a_store_drawn_with_other_view_streams_is_refused(base: Config, reference: Path, monkeypatch):
    monkeypatch.setattr("pipeline.train.run_store.STREAM_VERSION", 1)  # as a store written before the streams changed
    with pytest.raises(store.ProvenanceMismatch) as exc:
        teacher.run(at(base, reference), progress=False, device="cpu")
    assert exc.value.fields == ["view_stream"]


@pytest.mark.parametrize("field", FIELDS)
def test_verify_refuses_store_of_another_run(mismatches, field: str):
    with pytest.raises(store.ProvenanceMismatch) as exc:
        verify.run(mismatches[field], samples=4, device="cpu")
    assert exc.value.fields == [field]


@pytest.mark.parametrize("command", ["verify", "teacher"])
@pytest.mark.parametrize("field", FIELDS)
def test_cli_refuses_store_of_another_run_with_clean_message(mismatches, tmp_path: Path, field: str, command: str):
    cfg_yaml = write_yaml(mismatches[field], tmp_path / "cfg.yaml")
    result = run_cli(command, "-c", cfg_yaml, "--device", "cpu")
    assert_clean_failure(result, f"provenance field '{field}' differs")


# ----------------------------------------------------------------------------------------- teacher-fit


def test_teacher_fit_rerun_is_up_to_date_and_does_not_rewrite(base: Config, tmp_path: Path, capsys):
    out = tmp_path / "fit.pt"
    cfg = derive(base, teacher={"checkpoint": None, "fit": {"epochs": 1, "output": str(out)}})
    teacher_fit.run(cfg, progress=False, device="cpu")
    stat = out.stat()
    capsys.readouterr()
    assert teacher_fit.run(cfg, progress=False, device="cpu") == out
    assert "up to date" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == stat.st_mtime_ns and out.stat().st_ino == stat.st_ino
    # and the fitted checkpoint is what the teacher stage picks up without teacher.checkpoint
    resolved = resolve_teacher(cfg)
    assert Path(resolved.teacher.checkpoint) == out


def test_teacher_fit_pins_named_weights_to_its_output_without_fitting(base: Config, tmp_path: Path, capsys):
    """configs/imagenet.yaml names timm's weights: nothing is fitted, but dvc.yaml's teacher-fit output must exist,
    so the named weights are written there (timm's pretrained path through a local file here, and a checkpoint)."""
    named = Path(str(base.teacher.checkpoint))
    hub_like = tmp_path / "hub_like.pt"  # timm's pretrained path reads a standard-stem file (its head is replaced)
    save_teacher_checkpoint(create_teacher(derive(base, teacher={"checkpoint": None, "small_stem": False}).teacher,
                                           num_classes=1000, in_chans=base.aug.channels), hub_like, {})
    cases = [({}, named, ""), ({"pretrained": True, "small_stem": False, "checkpoint": str(hub_like)}, hub_like, "fc.")]
    for i, (weights, file, head) in enumerate(cases):  # a checkpoint; timm's weights, from a local file
        out = tmp_path / f"pinned{i}.pt"
        cfg = derive(base, teacher={**weights, "fit": {"epochs": 50, "output": str(out)}})
        assert teacher_fit.run(cfg, progress=False, device="cpu") == out
        assert "nothing to fit" in capsys.readouterr().out
        got, want = torch_load(out), torch_load(file)["model"]
        assert got["meta"]["weights"] == sha256_file(file) and got["meta"]["epochs"] == 0
        assert all(torch.equal(got["model"][k], v) for k, v in want.items() if not (head and k.startswith(head)))
        assert json.loads(out.with_suffix(".json").read_text())["weights"] == sha256_file(file)
        stat = out.stat()
        teacher_fit.run(cfg, progress=False, device="cpu")  # the same weights: not written again
        assert out.stat().st_mtime_ns == stat.st_mtime_ns
        assert resolve_teacher(cfg).teacher.checkpoint == cfg.teacher.checkpoint  # the stages still use the named file
    same = derive(base, teacher={"fit": {"output": str(named)}})  # named weights that are the fit's output
    before = named.stat().st_mtime_ns
    assert teacher_fit.run(same, progress=False, device="cpu") == Path(str(named))
    assert named.stat().st_mtime_ns == before


def test_missing_teacher_raises_stage_error_naming_path(base: Config, tmp_path: Path):
    missing = tmp_path / "nowhere" / "teacher.pt"
    cfg = at(derive(base, teacher={"checkpoint": None, "fit": {"output": str(missing)}}), tmp_path / "s.zarr")
    for stage in (teacher.run, verify.run):
        with pytest.raises(DistillError, match="distill teacher-fit") as exc:
            stage(cfg, device="cpu")
        assert str(missing) in str(exc.value)
    assert not (tmp_path / "s.zarr").exists()


def test_missing_teacher_cli_gives_clean_message(base: Config, tmp_path: Path):
    missing = tmp_path / "nowhere" / "teacher.pt"
    cfg = at(derive(base, teacher={"checkpoint": None, "fit": {"output": str(missing)}}), tmp_path / "s.zarr")
    result = run_cli("teacher", "-c", write_yaml(cfg, tmp_path / "cfg.yaml"), "--quiet", "--device", "cpu")
    assert_clean_failure(result, str(missing), "distill teacher-fit")


# ----------------------------------------------------------------------------------------- describe


def test_store_describe_prints_e_k_and_epochs_complete(reference: Path, tmp_path: Path):
    result = run_cli("store", "describe", reference)
    assert result.exit_code == 0, result.output
    assert "E=2 stored epochs" in result.output
    assert "K=5 requested" in result.output
    assert "epochs complete: 2/2" in result.output

    partial = tmp_path / "partial.zarr"
    shutil.copytree(reference, partial)
    undo_unit(partial, 1, 0)
    result = run_cli("store", "describe", partial)
    assert result.exit_code == 0, result.output
    assert "epochs complete: 1/2" in result.output
    assert "partial epochs: 1 (2/3)" in result.output


def test_a_teacher_giving_nan_logits_is_refused_naming_the_unit(base: Config, tmp_path: Path):
    torch.manual_seed(0)
    net = create_teacher(base.teacher.model_copy(update={"checkpoint": None, "pretrained": False}),
                         num_classes=CLASSES, in_chans=base.aug.channels)
    with torch.no_grad():
        net.get_classifier().bias.fill_(float("nan"))
    ckpt = tmp_path / "nan.pt"
    save_teacher_checkpoint(net, ckpt, {"model": base.teacher.model})
    cfg = at(derive(base, teacher={"checkpoint": str(ckpt)}), tmp_path / "nan.zarr")
    with pytest.raises(DistillError, match=r"teacher output for \w+ unit \(epoch \d+, shard \d+\): .*NaN"):
        teacher.run(cfg, progress=False, device="cpu")
