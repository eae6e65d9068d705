"""The ``distill`` command: one subcommand per pipeline stage, all driven by the same YAML config.

Stage modules are imported inside each command so ``distill --help`` stays fast, and every known
failure (bad config, bad input, mismatched store) is turned into a one-paragraph message naming the
file, field or value, instead of a traceback.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pipeline.core.config import DEFAULT_CONFIG, Config, ConfigError, load_config
from stages.cli_errors import friendly
from stages.cli_submit import submit as submit_command

MIN_AGREEMENT, MAX_LOGIT_DIFF = 0.99, 0.5
"""verify's defaults (stages.verify's, repeated here so --help does not import the stage; a test checks both)."""


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``-c/--config`` and repeatable ``-s/--set KEY=VALUE``; the command receives ``cfg: Config``."""

    @click.option(
        "-c",
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=f"YAML config (default: the embedded demo, {DEFAULT_CONFIG.name}).",
    )
    @click.option(
        "-s",
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override one config value, e.g. --set student.epochs=10 (repeatable; YAML-typed).",
    )
    @functools.wraps(fn)
    def wrapper(config_path: Path | None, overrides: tuple[str, ...], **kwargs: Any) -> Any:
        try:
            cfg = load_config(config_path, overrides)
        except ConfigError as e:
            raise click.ClickException(str(e)) from e
        return fn(cfg=cfg, **kwargs)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deit-distill")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also: DISTILL_DEBUG=1).")
def main(debug: bool) -> None:
    """Distil a DeiT student from a CNN teacher that runs once, offline.

    \b
    Stages, in pipeline order (dvc repro runs them all from dvc.yaml):
      ingest       images -> WebDataset shards + manifest.json
      teacher-fit  train the CNN teacher on the shards (when no pretrained one is given)
      teacher      run the teacher over E augmented epochs -> Zarr logit store
      verify       re-run the teacher on sampled stored views and compare
      student      train the DeiT student from shards joined with the store
      evaluate     accuracy, disagreement and throughput tables
      audit        teacher/label disagreement reports from the store

    \b
    On SLURM, through submitit: distill submit STAGE (distill submit --help).
    """
    if debug:
        os.environ["DISTILL_DEBUG"] = "1"
    else:  # an object store that went away: the error ends the run in one line, not in asyncio's task dumps
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)


@main.command()
@config_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--rehash", is_flag=True,
              help="Re-hash every existing shard against the manifest before calling it up to date (default: their "
                   "sizes and versions against ingest's stamp, one listing).")
@friendly
def ingest(cfg: Config, quiet: bool, rehash: bool) -> None:
    """Write the dataset as WebDataset shards with dense global indices and a manifest.

    Samples are shuffled once with the config seed, indexed 0..N-1 in shard order and written to
    data.shards/{train,val}-NNNNNN.tar. A rerun with unchanged config and inputs does nothing.
    """
    from stages import ingest as stage

    out = stage.run(cfg, progress=not quiet, rehash=rehash)
    click.echo(f"shards: {out}")


def _part(value: str | None) -> tuple[int, int] | None:
    """``I/N`` as (I, N), 0 <= I < N."""
    if value is None:
        return None
    i, _, n = value.partition("/")
    if not (i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise click.BadParameter(f"{value!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(i), int(n)


def _drift_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--allow-view-drift", is_flag=True,
        help="Go on when this environment makes other views than the store's teacher labelled (its view canary "
             "differs): loudly, and recorded in the outputs. Otherwise such a store is refused before any work.",
    )(fn)


def _device_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
        help="auto: CUDA when available."
    )(fn)


@main.command("teacher-fit")
@config_options
@click.option("--force", is_flag=True, help="Retrain even when the checkpoint is up to date.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_device_option
@friendly
def teacher_fit(cfg: Config, force: bool, quiet: bool, device: str) -> None:
    """Train the configured timm CNN teacher on the train shards (writes teacher.fit.output).

    Fits nothing when the config names the teacher's weights (teacher.checkpoint or teacher.pretrained): the
    later stages use those, and this only copies them to teacher.fit.output (the output dvc.yaml tracks).
    """
    from stages import teacher_fit as stage

    stage.run(cfg, progress=not quiet, device=device, force=force)


@main.command()
@config_options
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader workers (default: teacher.workers).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Inference batch (default: teacher.batch_size).")
@click.option("--part", callback=lambda ctx, p, v: _part(v), default=None, metavar="I/N",
              help="Fill only static part I of N of the units, without claims (a job-array task on storage that "
                   "ignores conditional writes); a last run without --part packs what is left.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_device_option
@friendly
def teacher(cfg: Config, workers: int | None, batch_size: int | None, part: tuple[int, int] | None, quiet: bool,
            device: str) -> None:
    """Run the teacher over E augmented epochs and write the logit store.

    \b
    Each (epoch, shard) unit is replayed exactly as the student will see it, and its top-k logits,
    hard label, logsumexp and mix plan are written, then marked done. A rerun skips done units, so
    an interrupted run resumes. Scale out with: torchrun --nproc-per-node N -m stages teacher
    """
    from stages import teacher as stage

    stage.run(cfg, workers=workers, batch_size=batch_size, progress=not quiet, device=device, part=part)


@main.command()
@config_options
@click.option("--samples", type=click.IntRange(min=1), default=64, show_default=True,
              help="Random (epoch, index) pairs to re-run the teacher on.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for choosing the pairs.")
@click.option(
    "--min-agreement", type=click.FloatRange(0.0, 1.0), default=MIN_AGREEMENT, show_default=True,
    help="Exit non-zero when hard-label agreement is below this fraction (bf16 on CUDA may flip near-ties).",
)
@click.option(
    "--max-logit-diff", type=click.FloatRange(min=0.0), default=MAX_LOGIT_DIFF, show_default=True,
    help="Exit non-zero when a re-computed logit differs from the stored one by more than this (the default "
         "covers fp16 storage and a bf16 teacher against a float32 one; see docs/integrity.md).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_drift_option
@_device_option
@friendly
def verify(cfg: Config, samples: int, seed: int, min_agreement: float, max_logit_diff: float, quiet: bool,
           allow_view_drift: bool, device: str) -> None:
    """Check every stored unit's integrity, then re-run the teacher on sampled stored views and compare.

    Exits non-zero on any damaged unit, any NaN target, agreement below --min-agreement or a logit off by
    more than --max-logit-diff.
    """
    from stages import verify as stage

    report = stage.run(cfg, samples=samples, seed=seed, device=device, progress=not quiet,
                       min_agreement=min_agreement, max_logit_diff=max_logit_diff, allow_view_drift=allow_view_drift)
    click.echo(report.summary())


@main.command()
@config_options
@click.option("--teacher", "teacher_mode", type=click.Choice(["offline", "online"]), default=None,
              help="offline: targets from the logit store (default, student.teacher_mode); online: run the "
                   "teacher inside every step, as the official DeiT code does.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader workers (default: student.workers).")
@click.option("--until-epoch", type=click.IntRange(min=1), default=None,
              help="Stop after this many epochs (resumable).")
@click.option("--restart", is_flag=True, help="Discard a checkpoint from another configuration instead of refusing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_drift_option
@_device_option
@friendly
def student(cfg: Config, teacher_mode: str | None, workers: int | None, until_epoch: int | None, restart: bool,
            quiet: bool, allow_view_drift: bool, device: str) -> None:
    """Train the DeiT student from the shards joined with the logit store.

    \b
    Training epoch t replays stored epoch t mod E, checks each unit's stored mix plan against the
    replayed one, and resumes from student.output/checkpoint.pt when it matches this run.
    Scale out with: torchrun --nproc-per-node N -m stages student
    """
    from stages import student as stage

    out = stage.run(cfg, progress=not quiet, device=device, workers=workers, teacher_mode=teacher_mode,
                    until_epoch=until_epoch, restart=restart, allow_view_drift=allow_view_drift)
    click.echo(f"student: {out}")


@main.command()
@config_options
@click.option("--student", "students", multiple=True, type=click.Path(file_okay=False),
              help="A student output folder or URL (repeatable; default: evaluate.students).")
@_device_option
@friendly
def evaluate(cfg: Config, students: tuple[str, ...], device: str) -> None:
    """Accuracy (class/dist/fused heads), disagreement and throughput of the teacher and the students.

    Writes evaluate.output/{metrics.json, results.md, accuracy_vs_throughput.png} and prints the table.
    """
    from stages import evaluate as stage

    chosen = stage.student_names(students) if students else None
    stage.run(cfg, students=chosen, device=device)
    from pipeline.core.files import location

    click.echo((location(cfg.evaluate.output) / "results.md").read_text())


@main.command()
@config_options
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True,
              help="Rows in the most-confused and suspect lists of audit.md.")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=0.05, show_default=True,
              help="A training image is a suspect when the teacher gives its label less than this probability "
                   "on the image's evaluation view.")
@click.option("--ranking", type=click.Choice(["p_label", "per_class", "cleanlab"]), default="p_label",
              show_default=True,
              help="Order of the suspects: the label's probability (lowest first), that probability over its "
                   "class's mean (per_class), or confident learning's flags first (needs the cleanlab package). "
                   "With planted flips each is scored.")
@click.option("--sheet", type=click.IntRange(min=0), default=32, show_default=True,
              help="Suspects on the contact sheet suspects.png (0: none).")
@click.option("--output", type=click.Path(file_okay=False), default=None,
              help="Report folder or URL (default: runs/audit beside evaluate.output).")
@click.option("--epoch", "epochs", type=click.IntRange(min=0), multiple=True,
              help="Audit only these stored epochs (repeatable; default all). The train frame holds one row "
                   "per stored view, so at ImageNet scale audit a few epochs.")
@click.option("--relabel-out", type=click.Path(dir_okay=False), default=None,
              help="Also write the suspects as a relabel file (CSV: index, key, label = the teacher's class, ...), "
                   "the format data.relabel reads, for a person to review.")
@click.option("--relabel-confidence", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="--relabel-out keeps the suspects whose teacher top-1 has at least this probability.")
@click.option("--relabel-top", type=click.IntRange(min=1), default=None,
              help="--relabel-out keeps only the first N of them, most suspect first.")
@_drift_option
@friendly
def audit(cfg: Config, top: int, threshold: float, ranking: str, sheet: int, output: str | None,
          epochs: tuple[int, ...], relabel_out: str | None, relabel_confidence: float, relabel_top: int | None,
          allow_view_drift: bool) -> None:
    """Which training labels are probably wrong, and where the teacher disagrees with the labels.

    Ranks every ingested training image by the teacher's probability of its label on the image's
    evaluation view (stored by `distill teacher`), and writes suspects.csv, images.csv.gz (every image),
    the contact sheet suspects.png, per-class/per-epoch/confusion CSVs, audit.md, audit.png and audit.json.
    With planted flips (data.label_noise) it prints each ranking's precision and recall on them.
    notebooks/audit.ipynb walks through the same tables with pandas.
    """
    from stages import audit as stage

    result = stage.run(cfg, top=top, output=output, threshold=threshold, ranking=ranking, sheet=sheet,
                       epochs=list(epochs) or None, allow_view_drift=allow_view_drift, relabel_out=relabel_out,
                       relabel_confidence=relabel_confidence, relabel_top=relabel_top)
    click.echo(f"audit: {result['output']}")
    for key in ("clean_disagreement", "val_disagreement", "weighted_agreement", "suspects", "val_suspects",
                "planted", "planted_precision_at_n", "planted_recall_at_2n", "relabel_rows", "relabel_out"):
        if result.get(key) is not None:
            value = result[key]
            click.echo(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")


submit_command.callback = friendly(submit_command.callback)  # its errors as every stage's: one clean line
main.add_command(submit_command)


@main.command()
@config_options
@click.option("--rates", "rates_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Rates (images/s) measured on another machine, as JSON (the keys of the printed rates): predict "
                   "for that machine instead of timing this one.")
@click.option("--seconds", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Timed seconds per measured rate (six rates).")
@friendly
def estimate(cfg: Config, rates_file: Path | None, seconds: float) -> None:
    """How long each stage of the pipeline will take on this machine, before any runs (make demo prints it).

    Times a few batches of the config's teacher and student (training and inference) and of its views, counts
    the images each stage handles, and prints the predicted time of every stage and the total.
    """
    from stages import estimate as stage

    try:
        rates = stage.read_rates(rates_file) if rates_file is not None else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--rates") from None
    click.echo(stage.run(cfg, rates=rates, seconds=seconds)[1])


@main.group("store")
def store_group() -> None:
    """Inspect a logit store, or give an older one its view canary."""


@store_group.command("describe")
@click.argument("path", type=click.Path(), required=False)
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A config: its store.path when no PATH is given, its storage_options, and its student.epochs "
                   "to check against the store (see --student-epochs).")
@click.option("--student-epochs", type=click.IntRange(min=1), default=None,
              help="Also print the reuse factor a student run of this many epochs would have on this store "
                   "(each stored epoch replayed student-epochs / E times), and whether it is above the limit.")
@friendly
def store_describe(path: str | None, config_path: Path | None, student_epochs: int | None) -> None:
    """Print shape, K, E, completed epochs, bytes on disk and provenance of the store at PATH (a folder or a
    URL), or of the config's store.path."""
    import store
    from pipeline.core.files import use_storage_options
    from pipeline.train.reuse import REUSE_LIMIT, reuse_factor, reuse_warning

    if config_path is not None:
        cfg = load_config(config_path)
        use_storage_options(cfg.storage_options)
        path = path or str(cfg.store.path)
        student_epochs = student_epochs or cfg.student.epochs
    if path is None:
        raise click.UsageError("give the store's PATH, or -c CONFIG to describe its store.path")
    click.echo(store.describe(path))
    from pipeline.views.canary import store_canary

    check = store_canary(store.open_store(path))
    click.echo("views here: " + (
        "the store has no view canary (written before views were fingerprinted): `distill store stamp -c CONFIG` "
        "records one" if check is None else
        f"this environment reproduces all {check.total} canary views" if check.same_views else
        f"this environment makes other views: {check.differ} of {check.total} canary views differ"
    ) + (f" ({check.versions_text()})" if check is not None and check.versions else ""))
    if student_epochs is not None:
        e = store.spec_of(store.open_store(path)).epochs
        note = reuse_warning(student_epochs, e) or f"within the limit of {REUSE_LIMIT:g}"
        click.echo(f"reuse: {student_epochs} student epochs / E={e} = {reuse_factor(student_epochs, e):.1f}; {note}")


@store_group.command("stamp")
@config_options
@click.option("--samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="Stored views to replay and re-run the teacher on before the canary is recorded.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_device_option
@friendly
def store_stamp(cfg: Config, samples: int, quiet: bool, device: str) -> None:
    """Record the view canary of a store written before views were fingerprinted (store.path of the config).

    \b
    Readers refuse a store without a canary. This command first checks that this environment makes the
    store's views: every unit reads back whole, and SAMPLES stored views, replayed here and run through the
    teacher, get exactly the stored hard labels (logits within verify's tolerance); only then does it record
    this environment's library versions and canary views in the store. Otherwise it records nothing and
    says why: re-run `distill teacher` into a new store, or install the libraries the store was written with.
    """
    from stages import verify as stage

    stage.stamp(cfg, samples=samples, device=device, progress=not quiet)


if __name__ == "__main__":
    main()
