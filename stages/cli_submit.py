"""``distill submit``: the command line of ``stages/submit.py``, registered on the ``distill`` group by ``cli.py``.

Its own module because it is the one command that runs other commands: it checks the stage's options against the
stage's own command (found on the group at run time, so this module imports no stage) before anything is submitted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pipeline.core.config import DEFAULT_CONFIG, ConfigError, load_config
from stages import submit as submission

SLURM_FLAGS = (  # flag, type, help; each sets slurm.<name> (as -s slurm.<name>=VALUE would)
    ("nodes", click.IntRange(min=1), "Nodes of the student's job."),
    ("gpus-per-node", click.IntRange(min=0), "GPUs per node (0: CPU jobs); each teacher writer takes one."),
    ("tasks-per-node", click.IntRange(min=1), "Ranks per node of the student's job (default: one per GPU)."),
    ("writers", click.IntRange(min=1), "Tasks of the teacher's job array (default: nodes x tasks-per-node)."),
    ("partition", str, "SLURM partition."),
    ("time", click.IntRange(min=1), "Minutes a job may run before it is requeued (default 2800)."),
    ("constraint", str, "SLURM constraint, e.g. volta32gb."),
    ("cpus-per-task", click.IntRange(min=1), "CPUs per process (DataLoader workers + 1 or more)."),
    ("mem-gb", click.IntRange(min=1), "Memory per node (GB)."),
    ("logs", str, "Log folder on a filesystem the nodes share (%j: the job id; default runs/slurm/%j)."),
)


def slurm_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for flag, kind, text in reversed(SLURM_FLAGS):
        fn = click.option(f"--{flag}", flag.replace("-", "_"), type=kind, default=None, help=text)(fn)
    return fn


def checked_stage_args(stage: str, args: tuple[str, ...]) -> tuple[str, ...]:
    """The stage's own options, parsed now as ``distill STAGE`` will parse them in the job (a typo fails here, not
    in a job that starts a day later); ``--quiet`` added where the stage has it (no progress bars in a job's log)."""
    ctx = click.get_current_context()
    command = ctx.parent.command.commands[stage]
    command.make_context(stage, ["-c", str(DEFAULT_CONFIG), *args], parent=ctx.parent)
    quiet = any(p.name == "quiet" for p in command.params) and "--quiet" not in args
    return (*args, "--quiet") if quiet else args


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("stage", type=click.Choice(sorted(submission.SHAPES)), metavar="STAGE")
@click.argument("stage_args", nargs=-1, type=click.UNPROCESSED, metavar="[STAGE OPTIONS]...")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"YAML config (default: the embedded demo, {DEFAULT_CONFIG.name}); its slurm section holds the "
                   "resources, which the flags below override.")
@click.option("-s", "--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one config value (repeatable; the jobs get it too).")
@slurm_options
@click.option("--after", multiple=True, metavar="JOB_ID",
              help="Start only once these jobs have succeeded (SLURM's afterok; repeatable), e.g. the teacher's.")
@click.option("--local", is_flag=True,
              help="Run the jobs on this machine with submitit's local executor (one node), to try a submission.")
@click.option("--wait", is_flag=True, help="Wait for the jobs to end; exit 1 naming the log of any that failed.")
def submit(stage: str, stage_args: tuple[str, ...], config_path: Path | None, overrides: tuple[str, ...],
           after: tuple[str, ...], local: bool, wait: bool, **flags: Any) -> None:
    """Submit a stage to SLURM through submitit, as the official DeiT code does (the [slurm] extra).

    \b
    teacher      a job array of one-GPU writers that fill one store together (claims)
    student      one job of nodes x tasks-per-node ranks (torch.distributed from the job's environment)
    ingest, teacher-fit, verify, evaluate, audit: one job of one process

    \b
    Every job is requeued on preemption or timeout and resumes: the student from student.output/checkpoint.pt
    (exactly, on the same ranks), the teacher from the store's done units. The stage's own options follow it:
      distill submit teacher -c configs/imagenet.yaml --nodes 2 --partition gpu --workers 10
      distill submit student -c configs/imagenet.yaml --partition gpu --after JOB_ID --workers 10
    Prints what was submitted, the job ids and where the logs are.
    """
    sets = tuple(f"slurm.{k}={v}" for k, v in flags.items() if v is not None)
    try:
        cfg = load_config(config_path, (*overrides, *sets))
    except ConfigError as e:
        raise click.ClickException(str(e)) from e
    args = checked_stage_args(stage, stage_args)
    sub = submission.submit(cfg, stage, config=config_path, overrides=overrides, args=args, local=local, after=after)
    for line in submission.describe(sub, cfg.slurm, local):
        click.echo(line)
    if wait:
        failed = submission.wait(sub)
        if failed:
            raise click.ClickException("; ".join(failed))
        click.echo(f"distill {stage}: every job ended")
