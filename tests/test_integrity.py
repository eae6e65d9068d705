"""Damage on disk: every row of the integrity issue's table, on a tiny store, refused or repaired.

A store (E=2, K=5, 3 train shards of 10 and 2 val shards) is written once per module by a random
teacher; each test damages a copy (a flipped, deleted or truncated chunk, a replaced or garbled image,
a full disk) and checks that the student, verify, the teacher and ingest refuse it with a message
naming what broke, or repair it, and that nothing trains on it.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import (
    assert_clean_failure,
    assert_same_store,
    at,
    derive,
    done_mask_at,
    rewrite_unit,
    run_cli,
    write_yaml,
)

import store
from pipeline.core.config import Config
from pipeline.data.shards import load_manifest
from stages import ingest, student, teacher, verify

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def base(random_teacher_run) -> Config:
    return derive(random_teacher_run, student={"epochs": 1, "depth": 1})


@pytest.fixture(scope="module")
def reference(reference_store: Path) -> Path:
    return reference_store


@pytest.fixture
def damaged(base: Config, reference: Path, tmp_path: Path) -> tuple[Config, Path]:
    """A config on a private copy of the reference store (to damage), with its own student output."""
    path = tmp_path / "store.zarr"
    shutil.copytree(reference, path)
    return derive(at(base, path), student={"output": str(tmp_path / "student")}), path


def packed(path: Path, array: str, epoch: int) -> Path:
    """The object that holds one train array of one packed stored epoch (zarr's sharding: one per epoch)."""
    rest = "/0" if array in ("topk_logits", "topk_classes") else ""
    return path / "train" / array / "c" / str(epoch) / f"0{rest}"


def unit_span(path: Path, array: str, epoch: int, shard: int) -> tuple[Path, int, int]:
    """(object, byte offset, byte count) of one unit's chunk inside its packed epoch object, from the shard
    index zarr keeps at the object's end (an offset and a size per chunk, then a CRC32C)."""
    f = packed(path, array, epoch)
    n = 3  # train shards of the module's data
    raw = f.read_bytes()
    index = np.frombuffer(raw[-(16 * n + 4) : -4], dtype="<u8").reshape(n, 2)
    return f, int(index[shard, 0]), int(index[shard, 1])


def flip(file: Path, at_byte: int, n: int) -> None:
    data = bytearray(file.read_bytes())
    for i in range(at_byte, min(at_byte + n, len(data))):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def flip_unit(path: Path, array: str, epoch: int, shard: int) -> None:
    """Flip 16 bytes in the middle of one unit's chunk."""
    f, offset, size = unit_span(path, array, epoch, shard)
    flip(f, offset + size // 2 - 8, 16)


def student_fails(cfg: Config, *needles: str, distillation: str = "soft") -> None:
    cfg = derive(cfg, student={"distillation": distillation})
    with pytest.raises(store.StoreError) as err:
        student.run(cfg, progress=False, device="cpu")
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert not (Path(cfg.student.output) / "checkpoint.pt").exists()


# ---------------------------------------------------------------------------------------------- the store


def test_flipped_bytes_in_a_logits_chunk_are_refused_naming_unit_and_array(damaged):
    cfg, path = damaged
    flip_unit(path, "topk_logits", 0, 1)
    for kind in ("soft", "hard"):
        student_fails(cfg, "(epoch 0, shard 1)", "train/topk_logits", str(path), distillation=kind)
    result = run_cli("verify", "-c", write_yaml(cfg, path.parent / "cfg.yaml"), "--quiet", "--device", "cpu")
    assert_clean_failure(result, "1 damaged", "(epoch 0, shard 1)", "topk_logits")


@pytest.mark.parametrize("array", ["topk_logits", "topk_classes"])
def test_a_deleted_object_is_refused_never_read_as_its_fill_value(damaged, array):
    cfg, path = damaged
    packed(path, array, 0).unlink()  # the student's one epoch replays stored epoch 0
    student_fails(cfg, "(epoch 0, shard", f"train/{array}", "missing", distillation="hard")
    with pytest.raises(verify.VerificationFailed) as failed:
        verify.run(cfg, device="cpu")
    report = failed.value.report
    assert len(report.damaged) == 3 and all("missing" in d for d in report.damaged)  # every unit of the epoch


def test_a_deleted_staged_chunk_is_refused(damaged):
    cfg, path = damaged
    store.unpack_epoch(zarr.open_group(str(path), mode="r+"), 0, set())  # epoch 0 as staged units again
    (path / "stage" / "train" / "logsumexp" / "c" / "0" / "2").unlink()
    student_fails(cfg, "(epoch 0, shard 2)", "stage/train/logsumexp", "missing", distillation="hard")


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_object_is_a_one_line_cli_error(damaged, workers):
    """Also when the unit is read in a DataLoader worker, whose error text carries the worker's traceback."""
    cfg, path = damaged
    f = packed(path, "topk_classes", 0)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # chunks the student reads are gone
    result = run_cli("student", "-c", write_yaml(cfg, path.parent / "cfg.yaml"), "--quiet", "--device", "cpu",
                     "-s", "student.distillation=hard", "--workers", str(workers))
    assert_clean_failure(result, "(epoch 0, shard", "train/topk_classes")
    assert len(result.output.strip().splitlines()) == 1


def test_teacher_recomputes_exactly_the_damaged_units(damaged, reference, capsys):
    cfg, path = damaged
    flip_unit(path, "topk_logits", 0, 1)
    flip_unit(path, "logsumexp", 1, 2)
    teacher.run(cfg, progress=False, device="cpu")
    out = capsys.readouterr().out
    assert "(epoch 0, shard 1)" in out and "(epoch 1, shard 2)" in out and "wrote 2 unit(s)" in out
    assert_same_store(reference, path)  # the rest was kept (unpacked, and packed again), not computed


def test_a_damaged_epoch_record_is_refused_and_the_teacher_recomputes_its_epoch(damaged, reference, capsys):
    """A record that is listed (so its units count as done) but does not parse is damage, never "not done"."""
    cfg, path = damaged
    record = path / "done" / "train" / "e000000.json"
    record.write_bytes(record.read_bytes()[:-9])
    with pytest.raises(store.DamagedUnit, match="e000000.json is damaged"):
        store.read_train_unit(store.open_store(path), 0, 1)
    teacher.run(cfg, progress=False, device="cpu")
    assert "wrote 3 unit(s)" in capsys.readouterr().out  # the epoch's three shards, nothing else
    assert_same_store(reference, path)


def test_a_damaged_unit_record_is_refused_and_its_unit_recomputed(damaged, reference, capsys):
    cfg, path = damaged
    store.unpack_epoch(zarr.open_group(str(path), mode="r+"), 1, set())  # epoch 1 as staged units again
    (path / "done" / "train" / "e000001-s000002.json").write_text('{"rows": [')
    with pytest.raises(store.DamagedUnit, match="e000001-s000002.json is damaged"):
        store.read_train_unit(store.open_store(path), 1, 2)
    teacher.run(cfg, progress=False, device="cpu")
    assert "wrote 1 unit(s)" in capsys.readouterr().out
    assert_same_store(reference, path)


def test_a_storage_error_while_reading_is_no_damage_and_the_teacher_keeps_the_unit(damaged, reference, monkeypatch):
    """A timeout or a throttled read says nothing about the unit: the teacher must not drop it as damaged."""
    cfg, path = damaged
    real = zarr.Array.__getitem__

    def flaky(self, selection):  # the object store times out on the logits
        if self.path.endswith("topk_logits"):
            raise TimeoutError(errno.ETIMEDOUT, "read timed out")
        return real(self, selection)

    monkeypatch.setattr(zarr.Array, "__getitem__", flaky)
    with pytest.raises(store.StoreError, match="cannot be read now") as err:
        store.read_train_unit(store.open_store(path), 0, 0)
    assert not isinstance(err.value, store.DamagedUnit)
    with pytest.raises(store.StoreError, match="cannot be read now"):
        teacher.run(cfg, progress=False, device="cpu")
    monkeypatch.undo()
    assert_same_store(reference, path)  # nothing was unpacked, deleted or computed again


def test_a_damaged_clean_pass_unit_is_refused_by_the_audit_and_recomputed_by_the_teacher(damaged, reference, capsys):
    cfg, path = damaged
    flip(path / "clean" / "topk_logits" / "c" / "1" / "0", 20, 16)
    with pytest.raises(store.DamagedUnit, match="clean/topk_logits"):
        store.read_val_unit(store.open_store(path), 1, split="clean")
    assert_clean_failure(run_cli("audit", "-c", write_yaml(cfg, path.parent / "cfg.yaml"), "--output",
                                 str(path.parent / "audit")), "clean/topk_logits", "shard 1")
    teacher.run(cfg, progress=False, device="cpu")
    assert "wrote 1 unit(s)" in capsys.readouterr().out
    assert_same_store(reference, path)


def test_a_clean_pass_cut_short_resumes_to_the_same_store(damaged, reference, capsys):
    """As after a kill during the clean pass: some of its units have no done record."""
    cfg, path = damaged
    for s in (0, 2):
        store.delete_record(store.objects_at(path), "clean", 0, s)
    assert store.val_done_mask(store.open_store(path), "clean").tolist() == [False, True, False]
    assert_clean_failure(run_cli("audit", "-c", write_yaml(cfg, path.parent / "cfg.yaml"), "--output",
                                 str(path.parent / "audit")), "clean", "run `distill teacher`")
    teacher.run(cfg, progress=False, device="cpu")
    assert "wrote 2 unit(s)" in capsys.readouterr().out
    assert_same_store(reference, path)


def test_verify_fails_on_a_logit_beyond_the_tolerance_and_on_nan(damaged):
    cfg, path = damaged
    yml = write_yaml(cfg, path.parent / "cfg.yaml")
    for e, s in np.argwhere(done_mask_at(path)):  # consistent units (records and all), logits shifted by 2
        rewrite_unit(path, e, s, topk_logits=lambda x: x + 2.0)
    assert_clean_failure(run_cli("verify", "-c", yml, "--quiet", "--device", "cpu"), "above --max-logit-diff")
    g = zarr.open_group(str(path), mode="r+")
    a, b = load_manifest(cfg.data.shards).ranges("train")[0]
    lse = g["stage/train/logsumexp"][0, a:b]
    lse[0] = np.nan
    g["stage/train/logsumexp"][0, a:b] = lse
    from store.records import unit_body, write_record  # the writer refuses NaN: a record written by hand

    record = store.read_record(store.objects_at(path), "train", 0, 0)
    arrays = {k: np.asarray(g[f"stage/train/{k}"][0, a:b]) for k in ("topk_logits", "topk_classes", "logsumexp")}
    write_record(store.objects_at(path), "train", 0, 0,
                 unit_body((a, b), {**arrays, "label": g["train/label"][a:b]}, record.plan))
    assert_clean_failure(run_cli("verify", "-c", yml, "--quiet", "--device", "cpu"), "1 unit(s) hold NaN")


# ---------------------------------------------------------------------------------------------- shards


def replace_image(shards: Path, shard_file: str, position: int) -> None:
    """Overwrite one sample's PNG bytes inside a tar with another valid PNG of exactly the same size."""
    import io
    import tarfile

    from PIL import Image

    tar = shards / shard_file
    with tarfile.open(tar) as tf:
        members = [m for m in tf.getmembers() if m.name.endswith(".png")]
        m = members[position]
        original = tf.extractfile(m).read()
    for seed in range(1000):
        rng = np.random.default_rng(seed)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, format="PNG", compress_level=0)
        data = buf.getvalue()[: len(original)]
        try:
            Image.open(io.BytesIO(data)).load()
        except OSError:
            continue
        if len(data) == len(original) and data != original:
            break
    raw = bytearray(tar.read_bytes())
    raw[m.offset_data : m.offset_data + len(original)] = data
    tar.write_bytes(bytes(raw))


@pytest.fixture
def own_shards(base: Config, reference: Path, tmp_path: Path) -> tuple[Config, Path]:
    """A config on private copies of the shards and the store (the shards to damage)."""
    shards = tmp_path / "shards"
    shutil.copytree(base.data.shards, shards)
    shutil.copytree(reference, tmp_path / "store.zarr")
    cfg = derive(at(base, tmp_path / "store.zarr"), data={"shards": str(shards)},
                 student={"output": str(tmp_path / "student")})
    return cfg, shards


def test_an_image_replaced_by_another_of_the_same_size_is_refused_everywhere(own_shards, capsys):
    cfg, shards = own_shards
    replace_image(shards, "train-000001.tar", 3)
    needles = ("train-000001.tar", "sample 00000013")
    with pytest.raises(Exception) as err:
        student.run(derive(cfg, student={"distillation": "hard"}), progress=False, device="cpu")
    assert all(n in str(err.value) for n in needles), str(err.value)
    with pytest.raises(Exception) as err:
        teacher.run(at(cfg, shards.parent / "fresh.zarr"), progress=False, device="cpu")
    assert all(n in str(err.value) for n in needles), str(err.value)
    with pytest.raises(Exception) as err:
        verify.run(cfg, samples=200, device="cpu")
    assert all(n in str(err.value) for n in needles), str(err.value)
    ingest.run(cfg, progress=False)  # not "up to date": the sha256 differs, so the shards are written again
    out = capsys.readouterr().out
    assert "shards out of date" in out and "train-000001.tar" in out and "wrote" in out


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_truncated_tar_or_a_garbled_image_is_a_one_line_error_naming_shard_and_sample(own_shards, damage):
    cfg, shards = own_shards
    tar = shards / "train-000002.tar"
    raw = tar.read_bytes()
    if damage == "truncate":
        tar.write_bytes(raw[: len(raw) // 2])
        needle = "truncated"
    else:
        flip(tar, len(raw) // 3, 64)
        needle = "differ"
    yml = write_yaml(derive(cfg, student={"distillation": "hard"}), shards.parent / "cfg.yaml")
    result = run_cli("student", "-c", yml, "--quiet", "--device", "cpu")
    assert_clean_failure(result, "train-000002.tar", "sample 000000", needle)
    assert len(result.output.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- writes


def test_disk_full_while_the_teacher_writes_is_one_line_naming_the_store(base, tmp_path, monkeypatch):
    import zarr.storage._local as local

    def full(path, value, exclusive=False):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    path = tmp_path / "full.zarr"
    yml = write_yaml(at(base, path), tmp_path / "cfg.yaml")
    monkeypatch.setattr(local, "_put", full)
    result = run_cli("teacher", "-c", yml, "--quiet", "--device", "cpu")
    assert_clean_failure(result, str(path), "No space left on device")
    assert len(result.output.strip().splitlines()) == 1


def test_disk_full_while_the_student_checkpoints_leaves_no_temp_file(damaged, monkeypatch):
    import pipeline.core.files as files

    cfg, _ = damaged
    cfg = derive(cfg, student={"distillation": "none"})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    result = run_cli("student", "-c", write_yaml(cfg, Path(cfg.student.output).parent / "cfg.yaml"), "--quiet",
                     "--device", "cpu")
    assert_clean_failure(result, str(Path(cfg.student.output) / "checkpoint.pt"), "No space left on device")
    assert not list(Path(cfg.student.output).glob("*tmp*")) and not list(Path(cfg.student.output).glob(".*"))


# ---------------------------------------------------------------------------------------------- files


def test_a_checkpoint_carrying_a_pickled_object_is_refused(base, damaged, tmp_path):
    import fractions

    cfg, _ = damaged
    out = Path(cfg.student.output)
    student.run(derive(cfg, student={"distillation": "none"}), progress=False, device="cpu")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["history"] = fractions.Fraction(1, 3)  # an arbitrary pickled object: the safe loader refuses it
    torch.save(ckpt, out / "checkpoint.pt")
    yml = write_yaml(derive(cfg, evaluate={"students": [str(out)]}), tmp_path / "cfg.yaml")
    for args in (["evaluate"], ["student", "-s", "student.distillation=none"]):
        result = run_cli(*args, "-c", yml, "--device", "cpu")
        assert_clean_failure(result, "checkpoint.pt", "pickled Python objects")
        assert "weights_only" not in result.output and "Traceback" not in result.output
    torch.save({"model": fractions.Fraction(1, 3)}, tmp_path / "teacher.pt")
    yml = write_yaml(derive(cfg, teacher={"checkpoint": str(tmp_path / "teacher.pt")}), tmp_path / "t.yaml")
    result = run_cli("verify", "-c", yml, "--device", "cpu")
    assert_clean_failure(result, "teacher.checkpoint", "pickled Python objects")
    assert "weights_only" not in result.output


def test_a_changed_augmentation_key_is_named(damaged):
    cfg, _ = damaged
    with pytest.raises(store.ProvenanceMismatch) as err:
        teacher.run(derive(cfg, aug={"reprob": 0.5}), progress=False, device="cpu")
    assert "aug_hash" in str(err.value) and "aug.reprob: store has 0.25, this run expects 0.5" in str(err.value)


def test_describe_on_a_folder_that_is_not_a_store_says_so(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("hello")
    assert_clean_failure(run_cli("store", "describe", tmp_path / "folder"), "is not a Zarr store")
    assert_clean_failure(run_cli("store", "describe", tmp_path / "nowhere"), "not found")
