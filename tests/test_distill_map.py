"""``python -m bench.distill_map`` on tiny data: every cell of the map trained and scored on the selection set,
the margins paired by seed, and a second run (with the val scoring of a chosen recipe) trains nothing again."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import make_config, make_idx, write_yaml

from bench import distill_map

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


def test_the_map_runs_every_cell_once_and_a_rerun_trains_nothing(tmp_path):
    idx = make_idx(tmp_path / "idx", 30, 12)
    cfg = make_config(tmp_path, {"source": "idx", "root": str(idx), "shard_size": 5, "train_shards": 3},
                      teacher={"epochs": 1, "fit": {"batch_size": 5, "aug": {"mix_prob": 0.0}}},
                      student={"eval_every": 1000, "batch_size": 5})
    out = tmp_path / "map"
    args = ["-c", str(write_yaml(cfg, tmp_path / "cfg.yaml")), "--schedules", "1", "--seeds", "0", "1",
            "--selection", "3", "6", "--out", str(out)]
    distill_map.main(args)
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == 2 + 2 * 2 * 2  # none per seed; soft and hard per teacher and seed
    assert set(cells[cells["distillation"] != "none"]["teacher"]) == {"light", "mixed"}
    assert cells["sel_top1"].between(0, 1).all() and cells["sel_disagree_teacher"].between(0, 1).all()
    margins = pd.read_csv(out / "margins.csv")
    assert len(margins) == 4 and (margins["seeds"] == 2).all() and margins["se"].notna().all()
    assert (out / "map.png").is_file() and "soft - none" in (out / "map.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("students/*/checkpoint.pt")}
    assert len(stamps) == 10
    distill_map.main([*args, "--val", "light", "1"])
    assert {p: p.stat().st_mtime_ns for p in out.glob("students/*/checkpoint.pt")} == stamps
    val = pd.read_csv(out / "val.csv")
    assert len(val) == 6 and val["val_top1"].between(0, 1).all()  # none, soft and hard of the light teacher
    assert len(pd.read_csv(out / "val-margins.csv")) == 2 and "on the val set" in (out / "map.md").read_text()


def test_a_selection_set_overlapping_the_trained_shards_is_refused(tmp_path):
    idx = make_idx(tmp_path / "idx", 30, 12)
    cfg = make_config(tmp_path, {"source": "idx", "root": str(idx), "shard_size": 5, "train_shards": 3})
    from stages import ingest

    ingest.run(cfg, progress=False)
    with pytest.raises(SystemExit, match="after the 3 train shards"):
        distill_map.selection(cfg, (2, 5))
