"""``distill submit``: a stage on SLURM through submitit, as the official DeiT code launches (``run_with_submitit.py``).

How a stage maps onto jobs (resources from the config's ``slurm`` section and the command's flags):

- ``teacher``: a job array of ``writers`` one-GPU tasks, each an independent ``distill teacher`` on the same config;
  they fill one store together through claims (``stages/teacher.py``), so a task that starts late, dies or is
  preempted costs only its own units, which another writer (or the requeued task) takes over;
- ``student``: one job of ``nodes`` x ``tasks_per_node`` ranks; each task exports the torch.distributed variables
  from submitit's job environment (``pipeline/train/distributed.py`` reads them);
- ``ingest``, ``teacher-fit``, ``verify``, ``evaluate``, ``audit``: one job of one process (as each runs).

Every job is requeued on preemption or timeout: submitit calls ``StageJob.checkpoint``, which resubmits the same
command, and the stage resumes by itself (the student from ``student.output/checkpoint.pt``, exactly when the ranks
are the same; the teacher from the store's done units). submitit is optional (``pip install 'deit-distill[slurm]'``)
and imported only here, when a stage is submitted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import DEFAULT_CONFIG, Config, SlurmConfig
from pipeline.core.errors import DistillError

SHAPES: dict[str, str] = {
    "teacher": "writers", "student": "ranks",
    "ingest": "one", "teacher-fit": "one", "verify": "one", "evaluate": "one", "audit": "one",
}
"""How each stage runs: a job array of cooperating writers, one job of many ranks, or one process."""

INSTALL = "pip install 'deit-distill[slurm]'"


class SubmitError(DistillError, RuntimeError):
    """A submission that cannot be made: no submitit, no SLURM, resources the executor refuses."""


def require_submitit() -> Any:
    """The submitit module, or a one-line error naming the extra that installs it."""
    try:
        import submitit
    except ImportError:
        raise SubmitError(f"distill submit needs submitit: {INSTALL}") from None
    return submitit


@dataclass(frozen=True)
class StageJob:
    """One task of a submitted stage: ``distill STAGE -c CONFIG -s ... ARGS`` in the directory it was submitted from.

    submitit pickles it, calls it in every task of the job, and on preemption or timeout calls ``checkpoint`` in the
    first task and requeues the job with what it returns: the same command, which resumes where the stage's own
    files say (no state of this object changes while the stage runs)."""

    stage: str
    config: str
    overrides: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    cwd: str = "."
    ranks: bool = False
    """Export torch.distributed's variables (the student's job)."""

    def argv(self) -> list[str]:
        sets = [x for item in self.overrides for x in ("-s", item)]
        return [self.stage, "-c", self.config, *sets, *self.args]

    def __call__(self) -> str:
        os.chdir(self.cwd)
        if self.ranks:
            export_ranks()
        from stages.cli import main

        main(self.argv(), prog_name="distill", standalone_mode=False)
        return "distill " + " ".join(self.argv())

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook on preemption or timeout: requeue the same command (the stage resumes by itself)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


PORTS = (20000, 32767)
"""Where a job's rendezvous port is drawn: below Linux's ephemeral range (32768-60999), where the outgoing
connections of every process on the node (other jobs' gloo pairs, storage clients) take their local ports, so
that a busy node's connections cannot already hold it."""


def rank_variables(job_env: Any) -> dict[str, str]:
    """torch.distributed's variables for this task of a submitit job (as the official DeiT code sets them): the
    first node's host and a port drawn from the job id, so every task, and the job requeued, agree on them."""
    import random

    one_node = job_env.num_nodes == 1
    return {
        "MASTER_ADDR": "127.0.0.1" if one_node else job_env.hostnames[0],
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(random.Random(job_env.job_id).randint(*PORTS)),
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(job_env.num_tasks // job_env.num_nodes),
    }


def export_ranks() -> None:
    import submitit

    os.environ.update(rank_variables(submitit.JobEnvironment()))


# ------------------------------------------------------------------------------------------------ submission


@dataclass(frozen=True)
class Plan:
    """What one submission asks for: the shape of the jobs and the executor's parameters."""

    stage: str
    shape: str
    count: int
    """Jobs submitted: the teacher's writers, else 1."""
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    params: dict[str, Any]


def plan(stage: str, s: SlurmConfig, after: Sequence[str] = ()) -> Plan:
    """The executor parameters of ``stage`` (submitit's generic names, and ``slurm_``-prefixed SLURM options)."""
    shape = SHAPES[stage]
    per_node = s.tasks_per_node or max(s.gpus_per_node, 1)
    many = shape == "ranks"
    nodes, tasks, gpus = (s.nodes, per_node, s.gpus_per_node) if many else (1, 1, min(s.gpus_per_node, 1))
    count = (s.writers or s.nodes * per_node) if shape == "writers" else 1
    params: dict[str, Any] = {
        "name": f"distill-{stage}", "nodes": nodes, "tasks_per_node": tasks, "gpus_per_node": gpus,
        "cpus_per_task": s.cpus_per_task, "timeout_min": s.time, "slurm_signal_delay_s": 120,
        "slurm_setup": list(s.setup), "slurm_additional_parameters": dict(s.additional),
    }
    if s.mem_gb is not None:
        params["mem_gb"] = s.mem_gb if many else max(1, s.mem_gb // per_node)
    for key in ("partition", "constraint", "account", "qos"):
        if getattr(s, key) is not None:
            params[f"slurm_{key}"] = getattr(s, key)
    if count > 1:
        params["slurm_array_parallelism"] = count
    if after:
        params["slurm_dependency"] = "afterok:" + ":".join(after)
    return Plan(stage, shape, count, nodes, tasks, gpus, params)


def executor(p: Plan, s: SlurmConfig, local: bool) -> Any:
    """submitit's executor for the plan: SLURM's, or the local one (``local``: this machine, one node)."""
    submitit = require_submitit()
    if local and p.nodes > 1:
        raise SubmitError(f"--local runs on this machine, one node; this submission asks for {p.nodes} (--nodes 1)")
    if local and "slurm_dependency" in p.params:
        raise SubmitError("--after needs SLURM: the local executor cannot wait for another job")
    try:
        ex = submitit.AutoExecutor(folder=s.logs, cluster="local" if local else "slurm",
                                   slurm_max_num_timeout=s.max_timeouts, local_max_num_timeout=s.max_timeouts)
    except RuntimeError as e:
        if "srun" not in str(e):
            raise
        raise SubmitError("no SLURM here (srun is not on PATH): run distill submit on the cluster's login node, "
                          "or add --local to run the jobs on this machine") from None
    try:
        ex.update_parameters(**p.params)
    except ValueError as e:
        raise SubmitError(f"submitit refused the job's parameters: {e}") from None
    return ex


@dataclass(frozen=True)
class Submitted:
    plan: Plan
    jobs: list[Any]
    """submitit's Job objects (``job_id``, ``paths.stdout``, ``results()``)."""
    resume: str
    """Where a requeued job picks up."""


def submit(cfg: Config, stage: str, *, config: Path | str | None = None, overrides: Sequence[str] = (),
           args: Sequence[str] = (), local: bool = False, after: Sequence[str] = ()) -> Submitted:
    """Submit ``stage`` on ``cfg`` (loaded from ``config`` with ``overrides``, which the jobs load again)."""
    if stage not in SHAPES:
        raise SubmitError(f"distill submit: no stage {stage!r} (one of {', '.join(sorted(SHAPES))})")
    p = plan(stage, cfg.slurm, after)
    ex = executor(p, cfg.slurm, local)
    job = StageJob(stage, str(Path(config or DEFAULT_CONFIG).resolve()), tuple(overrides), tuple(args),
                   os.getcwd(), p.shape == "ranks")
    if p.count > 1:
        with ex.batch():  # SLURM: one job array; the local executor: one job per writer
            jobs = [ex.submit(job) for _ in range(p.count)]
    else:
        jobs = [ex.submit(job)]
    return Submitted(p, jobs, _resume(cfg, stage))


def _resume(cfg: Config, stage: str) -> str:
    if stage == "student":
        return f"resumes from {cfg.student.output}/checkpoint.pt"
    if stage == "teacher":
        return f"keeps the store's done units ({cfg.store.path})"
    return "runs the stage again (ingest and teacher-fit skip what is up to date)"


def describe(sub: Submitted, s: SlurmConfig, local: bool) -> list[str]:
    """What was submitted, in a few lines: the jobs' shape and resources, what a requeue does, job ids and logs."""
    p = sub.plan
    gpu = f"{p.gpus_per_node} GPU{'s' if p.gpus_per_node != 1 else ''}"
    shape = {
        "writers": f"a job array of {p.count} writers filling one store together (one process, {gpu} each)",
        "ranks": f"one job of {p.nodes} node(s) x {p.tasks_per_node} rank(s) ({gpu} per node)",
        "one": f"one job of one process ({gpu})",
    }[p.shape]
    where = "this machine (submitit's local executor)" if local else "SLURM" + "".join(
        f", {k} {v}" for k, v in (("partition", s.partition), ("constraint", s.constraint)) if v)
    ids = [str(j.job_id) for j in sub.jobs]
    head = ids[0].split("_")[0]
    array = head if len(ids) > 1 and all(i.startswith(head + "_") for i in ids) else ""  # SLURM's array id
    logs = Path(sub.jobs[0].paths.stdout)
    return [
        f"distill {p.stage}: {shape}, on {where}, {s.time} min a job",
        f"  requeued on preemption or timeout (up to {s.max_timeouts} timeouts); a requeued job {sub.resume}",
        f"  logs: {logs}" + (" (the other writers' beside it)" if len(ids) > 1 else
                            " (rank 0's; every rank's beside it)" if p.nodes * p.tasks_per_node > 1 else ""),
        *([f"  --after {array} makes a job wait for the whole array"] if array else []),
        "job ids: " + " ".join(ids),
    ]


def wait(sub: Submitted) -> list[str]:
    """Wait for every job; the failures, each naming its job, its error and its log."""
    failed = []
    for job in sub.jobs:
        try:
            job.results()
        except Exception as e:  # submitit's FailedJobError (with the job's traceback) or UncompletedJobError
            failed.append(f"job {job.job_id} failed: {_reason(str(e))} (log: {job.paths.stderr})")
    return failed


def _reason(text: str) -> str:
    """The error's last line, from the traceback submitit quotes between two rules (``----``), without the
    exception's class (``click.exceptions.ClickException: data.root ...`` -> ``data.root ...``)."""
    parts = text.split("-" * 22 + "\n")
    trace = parts[1] if len(parts) > 2 else text
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    last = lines[-1] if lines else "no message"
    head, sep, rest = last.partition(": ")
    return rest if sep and " " not in head and "." in head else last
