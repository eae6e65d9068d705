"""``distill estimate``: the predicted time of every stage, from a few timed batches, before any stage runs."""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from conftest import derive, make_config, make_idx, run_cli

from pipeline.core.config import Config
from pipeline.train.rates import Rates
from stages import estimate, ingest, student, teacher, teacher_fit

ROOT = Path(__file__).resolve().parent.parent

SLOWEST = Rates(teacher_fit=81, teacher_infer=587, student_train=231, student_infer=700, views_train=1200,
                views_eval=2000)
"""The slowest machine of this project's kind met so far (2 cores, AVX2, no AVX-512), the demo's models at batch 128
and 2 threads: teacher fit, teacher inference and student training as measured there (the issue that reported it);
student inference and views not measured there, taken as this machine's divided by the fourfold slowdown of the
student's training."""


def test_the_demo_fits_25_minutes_at_the_slowest_machines_rates():
    cfg = Config.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text()))
    d = cfg.data  # the demo's part of Fashion-MNIST (60,000 training images, 10,000 val)
    train = min(60_000, d.train_limit or 60_000)
    fashion = estimate.Counts(train=train, used=min(train, d.train_shards * d.shard_size), val=10_000)
    predicted = estimate.predict(cfg, fashion, SLOWEST)
    assert sum(predicted.values()) <= 25 * 60, estimate.table(cfg, fashion, SLOWEST, predicted)


def test_the_estimate_is_within_a_factor_of_three_of_the_stages_times(tmp_path):
    """On tiny data, measured on this machine right before the stages run (a shared machine's speed drifts; the
    factor covers that and the per-command costs the estimate adds as one constant)."""
    root = make_idx(tmp_path / "idx", 200, 40)
    cfg = make_config(tmp_path, {"source": "idx", "root": str(root)},
                      teacher={"model": "test_resnet", "small_stem": False, "fit": {"epochs": 2, "batch_size": 32}},
                      student={"epochs": 2, "eval_every": 2, "batch_size": 32, "embed_dim": 64, "depth": 2})
    ingest.run(cfg, progress=False)
    predicted, _ = estimate.run(cfg, seconds=0.5)
    actual = {}
    for name, run in (("teacher-fit", lambda: teacher_fit.run(cfg, progress=False, device="cpu")),
                      ("teacher", lambda: teacher.run(cfg, progress=False, device="cpu")),
                      ("student hard", lambda: student.run(derive(cfg, student={"distillation": "hard"}),
                                                           progress=False, device="cpu"))):
        t0 = time.perf_counter()
        run()
        actual[name] = time.perf_counter() - t0 + estimate.STARTUP_S  # the command's start, which ran in-process
    for name, seconds in actual.items():
        assert predicted[name] / 3 <= seconds <= predicted[name] * 3, (name, predicted[name], seconds)


def test_the_command_prints_every_stage_and_the_total_from_given_rates(tmp_path):
    rates = tmp_path / "rates.json"
    rates.write_text('{"teacher_fit": 81, "teacher_infer": 587, "student_train": 231, "student_infer": 700, '
                     '"views_train": 1200, "views_eval": 2000}')
    root = make_idx(tmp_path / "idx", 20, 10)
    cfg = make_config(tmp_path, {"source": "idx", "root": str(root)})
    from conftest import write_yaml

    result = run_cli("estimate", "-c", write_yaml(cfg, tmp_path / "cfg.yaml"), "--rates", rates)
    assert result.exit_code == 0, result.output
    for stage in ("ingest", "teacher-fit", "teacher", "student hard", "evaluate", "audit", "total"):
        assert stage in result.output
    rates.write_text('{"teacher": 1}')
    bad = run_cli("estimate", "-c", write_yaml(cfg, tmp_path / "cfg.yaml"), "--rates", rates)
    assert bad.exit_code == 2 and "rates.json" in bad.output
