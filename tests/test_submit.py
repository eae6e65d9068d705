"""``distill submit``: the stages through submitit, on SLURM and on submitit's local executor.

- SLURM itself is not here: a stand-in ``sbatch`` (and ``srun``, which submitit looks for) on PATH records the batch
  scripts submitit writes, so the tests read the resources, the teacher's job array and the student's nodes, ranks
  and dependency as SLURM would receive them.
- The local executor runs real jobs, all started at once by one module fixture: the teacher as two cooperating
  writers (their store equals the one-process reference store), and the student twice on 2 ranks (gloo): once
  uninterrupted, and once preempted (SIGUSR2 to its tasks, as SLURM signals them) right after its first epoch's
  checkpoint, requeued by submitit and resumed, ending with the same weights and metrics.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit  # the [slurm] extra, part of the test extras
import torch
from click.testing import CliRunner
from conftest import assert_clean_failure, assert_same_store, at, derive, run_cli, write_yaml

from pipeline.core.config import DEFAULT_CONFIG, Config
from stages import submit as submit_stage
from stages.cli import main

# ------------------------------------------------------------------------------------------------ no job runs


def test_help_explains_the_submission():
    result = CliRunner().invoke(main, ["submit", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for needle in ("SLURM", "submitit", "job array", "requeued on preemption or timeout", "checkpoint.pt",
                   "--nodes", "--gpus-per-node", "--partition", "--time", "--constraint", "--local", "--after"):
        assert needle in text, needle
    assert "distill submit STAGE" in CliRunner().invoke(main, ["--help"]).output


def test_without_submitit_the_error_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit now raises ImportError
    result = run_cli("submit", "student", "--local", "--logs", tmp_path / "logs")
    assert_clean_failure(result, "pip install 'deit-distill[slurm]'")
    assert len(result.output.strip().splitlines()) == 1


def test_a_mistyped_stage_option_fails_at_submission_not_in_the_job(tmp_path):
    result = run_cli("submit", "student", "--local", "--logs", tmp_path / "logs", "--wrokers", "4")
    assert result.exit_code == 2 and "No such option '--wrokers'. Did you mean '--workers'?" in result.output
    assert not (tmp_path / "logs").exists()


def test_without_slurm_the_error_says_so_and_names_local(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    result = run_cli("submit", "teacher", "--logs", tmp_path / "logs")
    assert_clean_failure(result, "no SLURM here", "--local")


def test_rank_variables_come_from_the_job_environment_and_survive_a_requeue():
    env = SimpleNamespace(num_nodes=2, num_tasks=16, global_rank=9, local_rank=1, hostnames=["gpu-a", "gpu-b"],
                          job_id="4242")
    got = submit_stage.rank_variables(env)
    assert got["MASTER_ADDR"] == "gpu-a" and (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"]) == ("9", "16", "1")
    assert got["LOCAL_WORLD_SIZE"] == "8"
    assert submit_stage.rank_variables(env)["MASTER_PORT"] == got["MASTER_PORT"]  # the same job id, the same port
    one = submit_stage.rank_variables(SimpleNamespace(**{**vars(env), "num_nodes": 1, "num_tasks": 2}))
    assert one["MASTER_ADDR"] == "127.0.0.1"


def test_the_rendezvous_port_is_drawn_outside_the_ephemeral_range(monkeypatch):
    """Linux gives outgoing connections local ports in 32768-60999 (ip_local_port_range): a rendezvous port drawn
    there can be held already by any connection on the node (EADDRINUSE, seen with two jobs on one host)."""
    monkeypatch.delenv("MASTER_PORT", raising=False)
    env = SimpleNamespace(num_nodes=1, num_tasks=2, global_rank=0, local_rank=0, hostnames=["vm"], job_id="0")
    ports = {int(submit_stage.rank_variables(SimpleNamespace(**{**vars(env), "job_id": str(j)}))["MASTER_PORT"])
             for j in range(2000)}
    assert len(ports) > 1000 and all(1024 < p < 32768 for p in ports)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """``sbatch`` and ``srun`` stand-ins on PATH: sbatch keeps each batch script in ``scripts/`` and answers as
    SLURM does, with job ids 4242, 4243, ..."""
    bin_dir, scripts = tmp_path / "bin", tmp_path / "scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\n"
        f'n=$(ls "{scripts}" | wc -l); id=$((4242 + n))\n'
        f'cp "$1" "{scripts}/$id.sh"\n'
        'echo "Submitted batch job $id"\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return scripts


def sbatch_flags(script: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script.read_text(), flags=re.M))


def test_on_slurm_the_teacher_is_a_job_array_and_the_student_one_job_of_many_ranks(fake_slurm, tmp_path):
    logs = str(tmp_path / "logs" / "%j")
    common = ("--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "600", "--constraint",
              "volta32gb", "--cpus-per-task", "6", "--mem-gb", "320", "--logs", logs)
    teacher = run_cli("submit", "teacher", *common, "--workers", "5")
    assert teacher.exit_code == 0, teacher.output
    assert "a job array of 8 writers" in teacher.output
    assert teacher.output.strip().splitlines()[-1] == "job ids: " + " ".join(f"4242_{i}" for i in range(8))
    assert "--after 4242 makes a job wait for the whole array" in teacher.output
    flags = sbatch_flags(fake_slurm / "4242.sh")
    assert flags["array"] == "0-7%8" and flags["nodes"] == "1" and flags["ntasks-per-node"] == "1"
    assert flags["gpus-per-node"] == "1" and flags["cpus-per-task"] == "6" and flags["mem"] == "80GB"  # 320 / 4
    assert (flags["partition"], flags["constraint"], flags["time"]) == ("gpu", "volta32gb", "600")
    assert flags["signal"] == "USR2@120"

    student = run_cli("submit", "student", *common, "--after", "4242", "-s", "student.epochs=7", "--workers", "5")
    assert student.exit_code == 0, student.output
    assert "one job of 2 node(s) x 4 rank(s)" in student.output and "checkpoint.pt" in student.output
    flags = sbatch_flags(fake_slurm / "4243.sh")
    assert (flags["nodes"], flags["ntasks-per-node"], flags["gpus-per-node"], flags["mem"]) == ("2", "4", "4", "320GB")
    assert flags["dependency"] == "afterok:4242" and "array" not in flags
    job = submitit.helpers.DelayedSubmission.load(tmp_path / "logs" / "4243" / "4243_submitted.pkl").function
    assert isinstance(job, submit_stage.StageJob) and job.ranks
    assert job.argv() == ["student", "-c", str(DEFAULT_CONFIG.resolve()), "-s", "student.epochs=7", "--workers", "5",
                          "--quiet"]
    assert job.cwd == os.getcwd()


def test_local_runs_one_node(tmp_path):
    result = run_cli("submit", "student", "--local", "--nodes", "2", "--logs", tmp_path / "logs")
    assert_clean_failure(result, "--local runs on this machine, one node")


# ------------------------------------------------------------------------------ jobs on the local executor


@pytest.mark.slow
def test_wait_names_a_failed_job_its_error_and_its_log(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = run_cli("submit", "ingest", "--local", "--gpus-per-node", "0", "--logs", tmp_path / "logs" / "%j",
                     "-s", f"data.root={tmp_path / 'nothing'}", "-s", f"data.shards={tmp_path / 'shards'}", "--wait")
    assert_clean_failure(result, "failed: ", "data.root does not exist or is not a folder", "_0_log.err")
    assert "one job of one process" in result.output and "job ids: " in result.output

STUDENT = {"epochs": 3, "batch_size": 4, "depth": 2, "drop_path": 0.3, "eval_every": 1000}
"""Depth 2 so drop path draws from each rank's RNG, which the checkpoint restores."""


def _preempt_after_first_checkpoint(job, checkpoint: Path, sent: list[float]) -> None:
    """SIGUSR2 to every task of ``job`` (as SLURM signals a job before preempting it) once ``checkpoint`` exists."""
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline and job._process.poll() is None:
        time.sleep(0.02)
    pid = job._process.pid  # submitit's local controller; the tasks are its children
    for task in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        os.kill(int(task), signal.SIGUSR2)
    sent.append(time.monotonic())


@pytest.fixture(scope="module")
def local_jobs(random_teacher_run: Config, reference_store: Path, tmp_path_factory) -> SimpleNamespace:
    """Every local job at once (they share the 2 cores): 2 teacher writers, the student whole and preempted."""
    tmp = tmp_path_factory.mktemp("submit")
    local = {"gpus_per_node": 0, "logs": str(tmp / "logs" / "%j")}
    teacher_cfg = derive(at(random_teacher_run, tmp / "array.zarr"), slurm={**local, "writers": 2})
    student_cfg = derive(at(random_teacher_run, reference_store), slurm={**local, "tasks_per_node": 2},
                         student=STUDENT)
    paths = {name: write_yaml(cfg, tmp / f"{name}.yaml") for name, cfg in
             (("teacher", teacher_cfg), ("student", student_cfg))}
    out = {name: tmp / name for name in ("whole", "preempted")}
    with pytest.MonkeyPatch.context() as mp:  # the jobs inherit this environment
        mp.setenv("DISTILL_UNIT_LOG", str(tmp / "units.log"))
        mp.setenv("DISTILL_PG_TIMEOUT", "120")
        mp.setenv("OMP_NUM_THREADS", "1")  # six processes on two cores
        teacher = submit_stage.submit(teacher_cfg, "teacher", config=paths["teacher"], args=("--device", "cpu"),
                                      local=True)
        students = {name: submit_stage.submit(
            student_cfg, "student", config=paths["student"], overrides=[f"student.output={path}"],
            args=("--device", "cpu", "--quiet"), local=True) for name, path in out.items()}
    sent: list[float] = []
    preempter = threading.Thread(target=_preempt_after_first_checkpoint, daemon=True,
                                 args=(students["preempted"].jobs[0], out["preempted"] / "checkpoint.pt", sent))
    preempter.start()
    return SimpleNamespace(teacher=teacher, students=students, out=out, store=tmp / "array.zarr", sent=sent,
                           preempter=preempter, units=tmp / "units.log")


def _logs(job) -> str:
    return "".join(Path(p).read_text() for p in (job.paths.stdout, job.paths.stderr) if Path(p).exists())


@pytest.mark.slow
def test_a_job_array_of_two_local_writers_fills_the_store_one_process_writes(local_jobs, reference_store):
    assert local_jobs.teacher.plan.count == 2 and len(local_jobs.teacher.jobs) == 2
    assert submit_stage.wait(local_jobs.teacher) == []
    assert_same_store(local_jobs.store, reference_store)
    written = [line.split()[2:5] for line in local_jobs.units.read_text().splitlines() if line.endswith("written")]
    assert len(written) == len({tuple(u) for u in written})  # no unit written twice
    for job in local_jobs.teacher.jobs:
        assert "teacher: " in _logs(job) and "Job completed successfully" in _logs(job)


def _history(out: Path) -> list[dict[str, str]]:
    with open(out / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_preempted_student_job_is_requeued_and_ends_as_the_uninterrupted_one(local_jobs):
    for sub in local_jobs.students.values():
        assert submit_stage.wait(sub) == [], [_logs(sub.jobs[0])]
    local_jobs.preempter.join(timeout=10)
    log = _logs(local_jobs.students["preempted"].jobs[0])
    assert local_jobs.sent and "this job is preempted" in log and "Requeued job" in log, log
    resumed = re.search(r"student: resuming \S+ after epoch (\d) on 2 rank\(s\)", log)
    assert resumed and 1 <= int(resumed.group(1)) < STUDENT["epochs"], log  # the signal came mid-run
    whole, again = (torch.load(local_jobs.out[n] / "checkpoint.pt", weights_only=True) for n in ("whole", "preempted"))
    assert whole["epoch"] == again["epoch"] == STUDENT["epochs"] - 1 and whole["step"] == again["step"]
    assert whole["world"] == again["world"] == 2
    for k in whole["model"]:
        assert torch.equal(whole["model"][k], again["model"][k]), k
    ha, hb = (_history(local_jobs.out[n]) for n in ("whole", "preempted"))
    for col in ("loss", "loss_base", "loss_distill", "lr"):
        assert [r[col] for r in ha] == [r[col] for r in hb], col
    ma, mb = (json.loads((local_jobs.out[n] / "metrics.json").read_text()) for n in ("whole", "preempted"))
    val = [{k: v for k, v in m.items() if k.startswith("val_")} for m in (ma, mb)]
    assert val[0] == val[1] and val[0]
