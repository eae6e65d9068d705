"""Corrections as an input (``data.relabel``: the manifest's label layer, applied without rewriting shards) and
confusable label noise (``data.label_noise_kind: confusable``), on tiny data made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from conftest import derive, make_config, make_idx, save_random_teacher

import store
from pipeline.core.config import ConfigError, overridden
from pipeline.data.labels import RelabelError, read_relabel
from pipeline.data.shards import load_manifest, open_shards, shard_samples
from pipeline.views.loading import train_stream
from pipeline.views.plan import soft_target
from stages import ingest, student, teacher, teacher_fit

CLASSES = 4
N_TRAIN = 30
pytestmark = pytest.mark.usefixtures("single_thread")


def write_relabel(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def read_labels(m, split: str = "train") -> dict[int, int]:
    return {int(s["idx"]): int(s["cls"]) for i in range(len(m.shards(split))) for s in shard_samples(m, split, i)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run (3 train shards of 10, 4 classes) ingested without a layer, a random teacher, and its store."""
    tmp = tmp_path_factory.mktemp("relabel")
    root = make_idx(tmp / "idx", N_TRAIN, 8, classes=CLASSES)
    cfg = make_config(tmp, {"source": "idx", "root": str(root)}, student={"epochs": 1})
    ingest.run(cfg, progress=False)
    ckpt = save_random_teacher(cfg, tmp / "teacher.pt", seed=0, num_classes=CLASSES)
    cfg = derive(cfg, teacher={"checkpoint": str(ckpt)})
    teacher.run(cfg, progress=False, device="cpu")
    return tmp, cfg


@pytest.fixture(scope="module")
def relabelled(run):
    """The same shards, copied, with a relabel file applied: sample 3 to class (its label + 1), key 00000007
    dropped, sample 25 (outside no subset: every ingested image) to class 0."""
    tmp, cfg = run
    shards = tmp / "fixed-shards"
    import shutil

    shutil.copytree(cfg.data.shards, shards)
    before = load_manifest(shards)
    labels = read_labels(before)
    path = write_relabel(tmp / "fixes.csv", [{"index": 3, "label": (labels[3] + 1) % CLASSES, "given": "x"},
                                             {"key": "00000007", "label": "drop"},
                                             {"index": 25, "label": "0"}])
    fixed = overridden(cfg, [f"data.shards={shards}", f"data.relabel={path}", f"store.path={tmp / 'fixed.zarr'}",
                             f"student.output={tmp / 'student-fixed'}"])
    ingest.run(fixed, progress=False)
    return fixed, before, labels


def test_a_relabel_file_changes_the_labels_read_and_the_fingerprint_not_the_shards(relabelled):
    fixed, before, labels = relabelled
    after = load_manifest(fixed.data.shards)
    assert after.fingerprint != before.fingerprint
    assert [s.sha256 for s in after.shards("train")] == [s.sha256 for s in before.shards("train")]
    read = read_labels(after)
    assert read[3] == (labels[3] + 1) % CLASSES and read[7] == CLASSES and read[25] == 0  # CLASSES: dropped
    assert {i: y for i, y in read.items() if i not in (3, 7, 25)} == {i: y for i, y in labels.items()
                                                                        if i not in (3, 7, 25)}
    assert read_labels(after, "val") == read_labels(before, "val")


def test_the_teacher_fit_and_the_students_train_on_the_corrected_labels(relabelled):
    fixed, _, labels = relabelled
    m = open_shards(fixed)
    ds, loader = train_stream(m, fixed.aug, fixed.seed, batch_size=5, view_epoch=lambda t: t, rank=0, world=1,
                              shuffle=0, workers=0)
    ds.set_epoch(0)
    seen = {}
    for batch in loader:
        seen.update(zip(batch.index.tolist(), batch.label.tolist(), strict=True))
        if 7 in batch.index.tolist():  # the dropped sample's own label puts no mass in its target
            assert float(batch.target[batch.index.tolist().index(7)].sum()) < 1.0
    assert seen[3] == (labels[3] + 1) % CLASSES and seen[7] == CLASSES


def test_the_teacher_stores_the_corrected_labels_and_a_student_trains_on_them(relabelled):
    fixed, _, labels = relabelled
    teacher.run(fixed, progress=False, device="cpu")
    root = zarr.open_group(str(fixed.store.path), mode="r")
    clean = store.read_val(root, "clean").label
    assert clean[3] == (labels[3] + 1) % CLASSES and clean[7] == CLASSES and clean[25] == 0
    student.run(fixed, progress=False, device="cpu")  # its join refuses a store label that differs from the shards'
    assert (Path(fixed.student.output) / "checkpoint.pt").is_file()


def test_a_store_written_before_a_relabel_is_refused_after_it(run, relabelled):
    tmp, cfg = run
    fixed, _, _ = relabelled
    stale = overridden(fixed, [f"store.path={cfg.store.path}"])
    with pytest.raises(store.ProvenanceMismatch, match="manifest_fingerprint"):
        student.run(stale, progress=False, device="cpu")


def test_a_stage_refuses_shards_whose_label_layer_is_not_the_configs(run, relabelled):
    tmp, cfg = run
    fixed, _, _ = relabelled
    with pytest.raises(RelabelError, match="run `distill ingest`"):
        open_shards(overridden(cfg, [f"data.relabel={fixed.data.relabel}"]))  # ingest never applied it there
    with pytest.raises(RelabelError, match="run `distill ingest`"):
        open_shards(overridden(fixed, ["data.relabel=null"]))


@pytest.mark.parametrize(("rows", "message"), [
    ([{"index": 1, "label": 0}, {"index": N_TRAIN, "label": 1}], "row 2: unknown sample 30"),
    ([{"key": "00000002", "label": 0}, {"key": "2", "label": 1}], "row 2: key '2' is not a sample key"),
    ([{"index": 1, "label": 0}, {"index": 2, "label": CLASSES}], "row 2: label 4 is out of range"),
    ([{"index": 1, "label": "sock"}], "row 1: label 'sock' is not a class id, a class name or 'drop'"),
    ([{"index": 1, "label": 0}, {"index": 2, "label": 0}, {"index": 1, "label": 2}],
     "row 3: sample 1 is already relabelled by row 1"),
    ([{"index": 1, "key": "00000002", "label": 0}], "row 1: index 1 and key 00000002 name different samples"),
])
def test_a_bad_row_is_refused_by_its_number_and_nothing_is_applied(run, tmp_path, rows, message):
    _, cfg = run
    before = (Path(cfg.data.shards) / "manifest.json").read_bytes()
    bad = overridden(cfg, [f"data.relabel={write_relabel(tmp_path / 'bad.csv', rows)}"])
    with pytest.raises(RelabelError, match=message.replace("(", r"\(")):
        ingest.run(bad, progress=False)
    assert (Path(cfg.data.shards) / "manifest.json").read_bytes() == before


def test_a_relabel_file_names_classes_by_id_or_name():
    names = ["tee", "trouser", "7", "coat"]
    path = Path(__file__).parent / "relabel-names.csv"
    try:
        write_relabel(path, [{"index": 0, "label": "coat"}, {"index": 1, "label": "2"}, {"index": 2, "label": "DROP"}])
        assert [(r.index, r.label) for r in read_relabel(str(path), 5, names)] == [(0, 3), (1, 2), (2, None)]
        write_relabel(path, [{"index": 0, "label": "7"}])  # "7" is a name, but of class 2, and no id 7 exists
        with pytest.raises(RelabelError, match="row 1: label 7 is out of range"):
            read_relabel(str(path), 5, names)
    finally:
        path.unlink(missing_ok=True)


def test_a_dropped_label_puts_no_mass_in_a_mixed_target():
    own_dropped = soft_target(4, 1, 0.7, 4, 0.1)
    assert own_dropped.sum() == pytest.approx(0.3) and own_dropped.argmax() == 1
    assert soft_target(4, 4, 0.7, 4, 0.1).sum() == 0.0
    np.testing.assert_allclose(soft_target(2, 1, 0.7, 4, 0.1).sum(), 1.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------- confusable noise

PAIRS = [[0, 5, 0, 0], [3, 0, 0, 0], [0, 0, 9, 2], [0, 0, 1, 0]]
"""A confusion matrix: 0 <-> 1 and 2 <-> 3 only (the diagonal is ignored)."""


def test_confusable_noise_flips_only_along_the_matrix_seeded_and_recorded(tmp_path):
    root = make_idx(tmp_path / "idx", 200, 4, size=8, classes=CLASSES)
    data = {"source": "idx", "root": str(root), "label_noise": 0.2, "label_noise_kind": "confusable",
            "label_noise_confusion": PAIRS}
    runs = [load_manifest(ingest.run(make_config(tmp_path / f"r{i}", data), progress=False)) for i in range(2)]
    planted = runs[0].split("train").planted
    assert len(planted) == 40 and planted == runs[1].split("train").planted  # seeded, listed in the manifest
    assert all(PAIRS[p.true][p.given] > 0 for p in planted)
    uniform = load_manifest(ingest.run(make_config(tmp_path / "u", {**data, "label_noise_kind": "uniform"}),
                                       progress=False))
    assert uniform.fingerprint != runs[0].fingerprint
    assert any(PAIRS[p.true][p.given] == 0 for p in uniform.split("train").planted)


def test_confusable_noise_reads_the_teacher_fits_val_confusion(run, tmp_path):
    _, cfg = run
    fit = derive(cfg, teacher={"checkpoint": None, "fit": {"epochs": 1, "output": str(tmp_path / "fit.pt")}})
    teacher_fit.run(fit, progress=False, device="cpu")
    report = json.loads((tmp_path / "fit.json").read_text())
    confusion = np.array(report["val_confusion"])
    assert confusion.shape == (CLASSES, CLASSES) and confusion.sum() == 8  # every val image, label x top-1
    np.fill_diagonal(confusion, 0)
    noisy = overridden(cfg, [f"data.shards={tmp_path / 'noisy'}", "data.label_noise=0.2",
                             "data.label_noise_kind=confusable", f"data.label_noise_confusion={tmp_path / 'fit.json'}"])
    if confusion.sum() == 0:  # a teacher that confused nothing: no class to flip to
        pytest.skip("the one-epoch teacher made no val confusion")
    planted = load_manifest(ingest.run(noisy, progress=False)).split("train").planted
    assert planted and all(confusion[p.true, p.given] > 0 for p in planted)


def test_confusable_noise_without_a_matrix_is_refused_naming_the_key(run):
    _, cfg = run
    with pytest.raises(ConfigError, match="label_noise_confusion"):
        overridden(cfg, ["data.label_noise_kind=confusable"])
