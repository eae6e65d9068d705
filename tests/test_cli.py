"""The ``distill`` command line: help that explains, clean errors, config overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from stages.cli import main

ROOT = Path(__file__).resolve().parent.parent

STAGES = ("ingest", "teacher-fit", "teacher", "verify", "student", "evaluate", "audit", "store", "submit")


def test_help_lists_every_stage():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in STAGES:
        assert name in result.output


def test_help_imports_neither_torch_nor_timm_so_it_answers_at_once():
    """Their imports take about 6 s on a 2-core machine; the command line, the config and its defaults need none."""
    code = ("import sys; from stages.cli import main; from pipeline.core.config import load_config; load_config(None)"
            "; print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_each_command_has_help():
    for name in STAGES:
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Usage:" in result.output


def test_bad_config_value_is_a_clean_error_naming_the_key():
    result = CliRunner().invoke(main, ["ingest", "--set", "data.shard_size=-3"])
    assert result.exit_code == 1
    assert "data.shard_size" in result.output and "-3" in result.output
    assert "Traceback" not in result.output


def test_missing_input_is_a_clean_error_naming_the_path(tmp_path):
    result = CliRunner().invoke(
        main, ["ingest", "--set", f"data.root={tmp_path / 'absent'}", "--set", f"data.shards={tmp_path / 's'}"]
    )
    assert result.exit_code == 1
    assert str(tmp_path / "absent") in result.output
    assert "Traceback" not in result.output


def test_store_describe_of_a_missing_store_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(main, ["store", "describe", str(tmp_path / "none.zarr")])
    assert result.exit_code == 1
    assert "none.zarr" in result.output


def test_store_describe_takes_the_store_of_a_config(reference_store, tmp_path):
    import yaml

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"root": str(tmp_path)}, "store": {"path": str(reference_store)},
                                   "student": {"epochs": 6}}))
    result = CliRunner().invoke(main, ["store", "describe", "-c", str(cfg)])
    assert result.exit_code == 0, result.output
    assert f"logit store: {reference_store}" in result.output and "reuse: 6 student epochs / E=2" in result.output
    result = CliRunner().invoke(main, ["store", "describe"])
    assert result.exit_code == 2 and "-c CONFIG" in result.output


def test_cuda_on_a_machine_without_it_is_a_clean_error(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(main, ["verify", "--device", "cuda", "--set", f"data.shards={tmp_path}"])
    assert result.exit_code == 1
    assert "no CUDA device" in result.output and "Traceback" not in result.output


def test_audit_options_out_of_range_are_clean_errors_naming_the_option():
    for args, name in ((["--top", "0"], "--top"), (["--threshold", "1.5"], "--threshold")):
        result = CliRunner().invoke(main, ["audit", *args])
        assert result.exit_code == 2
        assert name in result.output and "Traceback" not in result.output


def test_verify_options_default_to_the_stages_own_rules():
    from stages import cli, verify

    assert (cli.MIN_AGREEMENT, cli.MAX_LOGIT_DIFF) == (verify.MIN_AGREEMENT, verify.MAX_LOGIT_DIFF)


def test_openmp_threads_sleep_unless_the_environment_says_how_they_wait():
    """``import stages`` (before torch) sets OMP_WAIT_POLICY=PASSIVE, and leaves a user's own choice alone."""
    import subprocess
    import sys

    probe = "import os, stages; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    cases = (({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"), ({"GOMP_SPINCOUNT": "9"}, "None"))
    for extra, expected in cases:
        out = subprocess.run([sys.executable, "-c", probe], env={**env, **extra}, cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == expected, (extra, out)
