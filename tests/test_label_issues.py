"""Planted label noise and the audit's ranking: ingest flips a seeded fraction of the training labels and
records them; the teacher's clean pass over every ingested image then finds them.

The recall test runs the real chain (ingest, teacher-fit, teacher, audit) on generated images whose class
is their brightness, so a small CNN learns them in a few epochs: a competent teacher, made here.
"""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_config, make_idx

from pipeline.audit.rankings import RankingError, class_thresholds, label_issue_order
from pipeline.core.errors import DistillError
from pipeline.data.shards import load_manifest, shard_samples
from stages import audit, ingest, teacher, teacher_fit

CLASSES = 4
pytestmark = pytest.mark.usefixtures("single_thread")


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes(), mtime=0))


def make_learnable_idx(root: Path, n_train: int, n_val: int, size: int = 12, seed: int = 0) -> Path:
    """Images whose class is their brightness (four well-separated levels, pixel noise on top)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        labels = rng.integers(0, CLASSES, size=n)
        level = 30 + 60 * labels[:, None, None]
        images = np.clip(level + rng.normal(0, 12, size=(n, size, size)), 0, 255)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def shard_labels(m) -> dict[int, int]:
    return {int(s["idx"]): int(s["cls"]) for i in range(len(m.shards("train")))
            for s in shard_samples(m, "train", i)}


def test_planted_flips_are_seeded_recorded_and_change_the_fingerprint(tmp_path):
    root = make_idx(tmp_path / "idx", 40, 6, size=8, classes=CLASSES)
    data = {"source": "idx", "root": str(root)}
    clean = load_manifest(ingest.run(make_config(tmp_path / "clean", data), progress=False))
    noisy = [load_manifest(ingest.run(make_config(tmp_path / f"noisy{i}", {**data, "label_noise": 0.1}),
                                      progress=False)) for i in range(2)]
    planted = noisy[0].split("train").planted
    assert len(planted) == 4 and planted == noisy[1].split("train").planted  # seeded: the same flips
    assert noisy[0].fingerprint == noisy[1].fingerprint != clean.fingerprint
    assert clean.split("train").planted == []
    before, after = shard_labels(clean), shard_labels(noisy[0])
    flipped = {p.index: p for p in planted}
    for i, y in before.items():
        if i in flipped:
            assert flipped[i].true == y != flipped[i].given == after[i]
        else:
            assert after[i] == y
    reseeded = load_manifest(ingest.run(make_config(tmp_path / "seed1", {**data, "label_noise": 0.1}, seed=1),
                                        progress=False))
    assert reseeded.split("train").planted != planted


RECALL_AT_2N = 0.8
"""The test's bar: at least this share of the planted flips among the audit's top 2N suspects."""


def test_audit_finds_planted_flips_with_a_competent_teacher(tmp_path):
    root = make_learnable_idx(tmp_path / "idx", 400, 40)
    cfg = make_config(
        tmp_path, {"source": "idx", "root": str(root), "shard_size": 100, "label_noise": 0.05, "train_shards": 2},
        aug={"img_size": 12, "scale": [0.8, 1.0], "mix_prob": 0.5},
        teacher={"model": "test_resnet", "small_stem": False, "epochs": 1, "batch_size": 64,
                 "fit": {"epochs": 6, "batch_size": 32, "lr": 0.4, "aug": {"mix_prob": 0.0, "reprob": 0.0}}},
    )
    m = load_manifest(ingest.run(cfg, progress=False))
    assert len(m.split("train").planted) == 20
    teacher_fit.run(cfg, progress=False, device="cpu")
    teacher.run(cfg, progress=False, device="cpu")
    h = audit.run(cfg, output=tmp_path / "audit", top=5)
    assert h["images"] == 400 and h["planted"] == 20  # every ingested image, not only the 2 train shards
    assert h["planted_recall_at_2n"] >= RECALL_AT_2N, h
    assert (tmp_path / "audit" / "suspects.png").is_file() and (tmp_path / "audit" / "planted.csv").is_file()


def test_cleanlab_ranking_without_the_package_is_refused_naming_the_package(monkeypatch):
    """A RankingError is a DistillError: the CLI prints it as one line."""
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # as if cleanlab were not installed
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    images = pd.DataFrame({"label": [0, 1], "p_label": [0.1, 0.9], "planted": [False, False]})
    with pytest.raises(RankingError, match=r'pip install -e "\.\[cleanlab\]"'):
        label_issue_order(images, "cleanlab", lambda: np.eye(2))
    assert issubclass(RankingError, DistillError)


def test_per_class_ranking_divides_p_label_by_its_classs_mean_apart_for_the_fit_subset():
    """Class 0 is hard for the teacher (its right labels get 0.3), class 1 easy (0.9): p_label lists class 0's right
    labels before class 1's flip; per_class puts both flips first. Images the teacher was fit on get thresholds of
    their own (their in-sample probabilities run higher)."""
    p = [0.3] * 6 + [0.2] + [0.9] * 6 + [0.35]
    images = pd.DataFrame({"label": [0] * 7 + [1] * 7, "p_label": p, "in_fit_subset": pd.array([pd.NA] * 14,
                                                                                                 dtype="boolean"),
                           "planted": [False] * 6 + [True] + [False] * 6 + [True]})
    assert set(label_issue_order(images, "p_label")[:2]) != {6, 13}
    assert set(label_issue_order(images, "per_class")[:2]) == {6, 13}
    t = class_thresholds(images)
    assert t[0] == pytest.approx(2.0 / 7) and t[7] == pytest.approx(5.75 / 7)
    fit = images.assign(p_label=[0.3] * 7 + [0.9] * 7, in_fit_subset=pd.array([True] + [False] * 13, dtype="boolean"))
    t = class_thresholds(fit)
    assert t[0] == pytest.approx(0.3) and t[1] == pytest.approx(0.3) and t[7] == pytest.approx(0.9)
