"""The full pipeline through DVC on a tiny config: dvc repro end to end, a no-op rerun, a config kept
outside configs/ run with dvc.yaml as it is, and the README's commands as written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import make_idx, readme_block

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _tiny_config(idx: Path) -> dict:
    return {
        "seed": 0,
        "data": {"root": str(idx), "shards": "data/shards", "shard_size": 12, "train_shards": 3},
        "aug": {"img_size": 28, "channels": 1, "mean": [0.5], "std": [0.5], "auto_augment": None,
                "color_jitter": 0.0, "scale": [0.35, 1.0], "window": 8, "crop_pct": 1.0},
        "teacher": {"model": "resnet18", "small_stem": True, "epochs": 2, "topk": 5, "batch_size": 16,
                    "fit": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0, "output": "data/teacher.pt"}},
        "store": {"path": "data/logits.zarr"},
        "student": {"patch_size": 7, "embed_dim": 32, "depth": 1, "num_heads": 2, "epochs": 1, "batch_size": 8,
                    "warmup_epochs": 0, "shuffle": 16, "output": "runs/student"},
        "evaluate": {"batch_size": 16, "throughput_seconds": 0.1, "output": "runs/eval",
                     "students": ["runs/student-none", "runs/student-soft", "runs/student-hard"]},
    }


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("dvc")
    idx = make_idx(tmp / "idx", 30, 12)
    work = tmp / "repo"
    work.mkdir()
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    for code in ("pipeline", "stages", "store", "labels"):  # the code (and relabel files) dvc.yaml lists as deps
        shutil.copytree(ROOT / code, work / code, ignore=shutil.ignore_patterns("__pycache__"))
    (work / "params.yaml").write_text(yaml.safe_dump(_tiny_config(idx)))  # the config dvc.yaml runs
    shutil.copy(ROOT / ".gitignore", work / ".gitignore")  # git keeps the DVC metrics, as in the project
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = str(Path(sys.executable).parent / "dvc")
    _run(["git", "init", "-q"], work, env)
    _run([dvc, "init", "-q"], work, env)
    _run([dvc, "config", "core.analytics", "false"], work, env)
    _run([dvc, "repro"], work, env)
    return work, env


def test_dvc_repro_runs_every_stage(repo):
    work, _ = repo
    models = pd.read_csv(work / "runs" / "eval" / "models.csv", index_col="model")
    assert set(models.index) == {"teacher", "none", "soft", "hard"}
    assert models.loc["none", "head"] == "cls" and models.loc["none", "top1"] == models.loc["none", "cls_top1"]
    assert models.loc["hard", "head"] == "fused" and models.loc["hard", "top1"] == models.loc["hard", "fused_top1"]
    dis = pd.read_csv(work / "runs" / "eval" / "disagreement.csv", index_col=0)
    assert dis.loc["teacher", "teacher"] == 0.0
    assert abs(dis.loc["ground truth", "teacher"] - (1 - models.loc["teacher", "top1"])) < 1e-6
    metrics = json.loads((work / "runs" / "eval" / "metrics.json").read_text())  # a handful of scalars
    assert metrics["top1"] == {m: round(models.loc[m, "top1"], 4) for m in ("teacher", "none", "soft", "hard")}
    assert metrics["hard-none"] == round(metrics["top1"]["hard"] - metrics["top1"]["none"], 4)
    assert set(metrics) == {"top1", "hard-none", "im_per_s"}
    assert (work / "runs" / "eval" / "results.md").read_text().startswith("# Results")
    assert (work / "runs" / "audit" / "audit.json").is_file() and (work / "runs" / "audit" / "suspects.png").is_file()
    assert set(json.loads((work / "runs" / "audit" / "metrics.json").read_text())) == {"suspects", "teacher_vs_label"}
    assert (work / "dvc.lock").is_file()


def test_second_dvc_repro_does_nothing(repo):
    work, env = repo
    out = _run([str(Path(sys.executable).parent / "dvc"), "repro"], work, env)
    assert "Running stage" not in out.stdout
    assert "up to date" in out.stdout


def test_a_change_to_the_view_code_makes_the_stages_that_use_views_stale(repo):
    work, env = repo
    dvc = str(Path(sys.executable).parent / "dvc")
    code = work / "pipeline" / "views" / "rng.py"
    original = code.read_text()
    code.write_text(original + "\n# a change to how views are drawn\n")
    try:
        out = _run([dvc, "status"], work, env).stdout
    finally:
        code.write_text(original)
    for stage in ("teacher-fit:", "teacher:", "student@none:", "student@hard:", "evaluate:"):  # eval views too
        assert stage in out
    assert "ingest:" not in out
    assert "up to date" in _run([dvc, "status"], work, env).stdout


def test_an_edited_relabel_file_makes_ingest_stale(repo):
    """Relabel files live in labels/, a dependency of ingest: an edit re-runs ingest, which rewrites the manifest's
    label layer, and every later stage depends on the shards folder that holds it."""
    work, env = repo
    dvc = str(Path(sys.executable).parent / "dvc")
    fixes = work / "labels" / "fixes.csv"
    fixes.write_text("index,label\n3,drop\n")
    try:
        out = _run([dvc, "status"], work, env).stdout
    finally:
        fixes.unlink()
    assert "ingest:" in out and "labels" in out
    assert "up to date" in _run([dvc, "status"], work, env).stdout


def test_a_config_outside_configs_runs_through_dvc_repro_with_dvc_yaml_as_it_is(repo):
    """A user's own config, kept anywhere (here my-data/config.yaml), written to params.yaml: `dvc repro` runs it and
    its outputs go where it says; dvc.yaml is not touched. (It differs from the pipeline's config in its evaluate
    section only, so that only evaluate runs again.)"""
    work, env = repo
    dvc = str(Path(sys.executable).parent / "dvc")
    pipeline, params, lock = (work / name for name in ("dvc.yaml", "params.yaml", "dvc.lock"))
    before = {path: path.read_bytes() for path in (pipeline, params, lock)}
    own = yaml.safe_load(params.read_text())
    own["evaluate"].update(output="runs/my-eval", batch_size=4)
    mine = work / "my-data" / "config.yaml"
    mine.parent.mkdir()
    mine.write_text(yaml.safe_dump(own))
    try:
        shutil.copy(mine, params)
        out = _run([dvc, "repro"], work, env).stdout
        assert "Running stage 'evaluate'" in out
        assert not any(f"Running stage '{s}'" in out for s in ("ingest", "teacher-fit", "teacher", "student@hard"))
        assert pipeline.read_bytes() == before[pipeline]
        assert set(json.loads((work / "runs" / "my-eval" / "metrics.json").read_text())) == {"top1", "hard-none",
                                                                                            "im_per_s"}
        locked = yaml.safe_load(lock.read_text())["stages"]["evaluate"]
        assert locked["params"]["params.yaml"]["evaluate"]["output"] == "runs/my-eval"
        assert "up to date" in _run([dvc, "status"], work, env).stdout
    finally:
        for path, data in before.items():
            path.write_bytes(data)
        shutil.rmtree(mine.parent)


def test_a_config_naming_the_teachers_weights_runs_teacher_fit_under_dvc(repo):
    """configs/imagenet.yaml's kind of config (teacher.checkpoint or teacher.pretrained): teacher-fit fits nothing,
    but the output dvc.yaml tracks must exist, so it holds the named weights and DVC records the stage."""
    work, env = repo
    dvc = str(Path(sys.executable).parent / "dvc")
    kept = [work / name for name in ("params.yaml", "dvc.lock", "data/teacher.pt", "data/teacher.json")]
    before = {path: path.read_bytes() for path in kept}
    named = work / "data" / "named-teacher.pt"
    shutil.copy(work / "data" / "teacher.pt", named)
    own = yaml.safe_load(kept[0].read_text())
    own["teacher"]["checkpoint"] = "data/named-teacher.pt"
    try:
        kept[0].write_text(yaml.safe_dump(own))
        out = _run([dvc, "repro", "--single-item", "teacher-fit"], work, env).stdout
        assert "Running stage 'teacher-fit'" in out and "nothing to fit" in out
        record = json.loads((work / "data" / "teacher.json").read_text())
        assert record["weights"] == hashlib.sha256(named.read_bytes()).hexdigest() and record["epochs"] == 0
        locked = yaml.safe_load(kept[1].read_text())["stages"]["teacher-fit"]
        assert locked["params"]["params.yaml"]["teacher"]["checkpoint"] == "data/named-teacher.pt"
    finally:
        for path, data in before.items():
            path.write_bytes(data)
        named.unlink()


def test_readme_commands_run_as_written_after_activating_the_venv(repo):
    """As a new user would after `make demo`: a fresh shell without the venv on PATH, the README's block."""
    work, env = repo
    block = readme_block("readme-commands")
    assert block.startswith("source .venv/bin/activate")
    venv = Path(sys.prefix)  # this interpreter's virtual environment is the project's .venv
    if not (venv / "bin" / "activate").is_file():
        pytest.skip(f"{venv} is not a virtual environment with bin/activate")
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, env=env, capture_output=True).returncode:
        _run(["git", "add", "-A"], work, env)  # a clone has a commit (experiments start from one)
        _run(["git", "commit", "-qm", "tiny pipeline"], work, env)
    _run(["git", "checkout", "--", "."], work, env)  # back to the committed pipeline: a new user's state
    _run([str(venv / "bin" / "dvc"), "checkout", "-q"], work, env)
    (work / ".venv").unlink(missing_ok=True)
    (work / ".venv").symlink_to(venv)
    bare = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != venv / "bin")
    shell_env = {**env, "PATH": bare, "COLUMNS": "120"}
    shell_env.pop("VIRTUAL_ENV", None)
    assert subprocess.run(["bash", "-c", "command -v distill"], env=shell_env, cwd=work).returncode != 0
    out = _run(["bash", "-e", "-x", "-c", block], work, shell_env)
    ran = out.stdout[: out.stdout.index("Experiment")]  # dvc exp run's log: only what student.epochs touches
    assert "Running stage 'student@hard'" in ran and "Running stage 'evaluate'" in ran
    assert not any(f"Running stage '{s}'" in ran for s in ("ingest", "teacher-fit", "teacher"))
    shown = out.stdout[out.stdout.index("Experiment") : out.stdout.index("Path ")]  # dvc exp show's table
    # the param that moved and the metrics that moved (on noise images a top-1 may not move: the throughput does)
    assert "student.epochs" in shown and ("top1." in shown or "im_per_s" in shown) and "…" not in shown, shown
    assert max(len(line) for line in shown.splitlines()) <= 120, shown
