"""The benchmarks that must not rot: ``bench gpu`` (what a lent GPU runs) at toy sizes on the CPU, ``bench kd-cost``
at toy sizes, and the runner's names."""

from __future__ import annotations

import json

import pytest
import torch

from bench import bench_gpu, bench_kd_cost
from bench.__main__ import main as runner

pytestmark = pytest.mark.usefixtures("single_thread")


def test_bench_gpu_tiny_runs_every_part_on_the_cpu_and_writes_its_json(tmp_path, capsys):
    result = bench_gpu.main(["--tiny", "--device", "cpu", "--out", str(tmp_path / "gpu.json")])
    assert json.loads((tmp_path / "gpu.json").read_text()) == json.loads(json.dumps(result))
    assert result["teacher"]["stage_train_im_per_s"] > 0 and result["teacher"]["bare_im_per_s"] > 0
    for modes in result["students"].values():
        assert set(modes) == {"none", "offline", "online"} and min(modes.values()) > 0
    assert result["feed"]["im_per_s_per_core"] > 0 and result["finishing"]["max_abs_diff"] == 0.0
    assert "| teacher stage, train views |" in capsys.readouterr().out


def test_bench_gpu_help_explains_what_a_lent_gpu_measures(capsys):
    with pytest.raises(SystemExit) as exc:
        runner(["gpu", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--tiny" in out and "RegNetY-16GF" in out and "cores feed" in out


def test_bench_gpu_without_a_gpu_and_without_tiny_measures_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu.main(["--out", str(tmp_path / "gpu.json")]) is None
    assert "no CUDA device" in capsys.readouterr().out and not (tmp_path / "gpu.json").exists()


def test_bench_kd_cost_runs_under_its_hyphenated_name_and_gives_online_over_offline(capsys):
    assert runner(["kd-cost", "--batch-size", "1", "--rounds", "1", "--img-size", "32", "--classes", "10",
                   "--teacher", "regnety_002", "--students", "deit_tiny_distilled_patch16_224"]) == 0
    assert "online / offline, deit_tiny_distilled_patch16_224:" in capsys.readouterr().out
    ratios = bench_kd_cost.main(["--batch-size", "1", "--rounds", "1", "--img-size", "32", "--classes", "10",
                                 "--teacher", "regnety_002", "--students", "deit_tiny_distilled_patch16_224"])
    assert ratios["deit_tiny_distilled_patch16_224"] > 1
