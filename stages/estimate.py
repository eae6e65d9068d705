"""``distill estimate``: how long each stage of a config will take on this machine, before any of them runs.

It times a few batches of the config's models and views (:mod:`pipeline.train.rates`, well under a minute), counts
the images each stage handles (from the manifest when the shards exist, else from the source's file list), and
adds up: images / rate for every kind of work, plus the start of each command (Python, torch and timm imported).
``make demo`` prints it first. The rates of another machine can be given (``--rates FILE.json``), to see what the
config costs there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import Config
from pipeline.data.shards import MANIFEST_NAME, load_manifest
from pipeline.data.sources import read_source
from pipeline.train.rates import Rates

STARTUP_S = 6.0
"""Seconds a stage's command takes before its work: Python, torch, timm and the project imported."""
STUDENTS = ("none", "soft", "hard")
"""The students the pipeline trains (dvc.yaml's student stage)."""


@dataclass(frozen=True)
class Counts:
    """Images each stage handles."""

    train: int
    """Every ingested training image (the teacher's clean pass covers them all)."""
    used: int
    """The training images the teacher and the students use (``data.train_shards`` of them)."""
    val: int


def counts(cfg: Config) -> Counts:
    """From the manifest when ingest has run, else from the source (its file list, or its IDX headers)."""
    from pipeline.core.files import location

    d = cfg.data
    if (location(d.shards) / MANIFEST_NAME).is_file():
        m = load_manifest(d.shards)
        train, val = m.count("train"), m.count("val")
    else:
        splits = read_source(d).splits
        train = min(len(splits["train"]), d.train_limit or len(splits["train"]))
        val = min(len(splits["val"]), d.val_limit or len(splits["val"]))
    used = min(train, d.train_shards * d.shard_size) if d.train_shards else train
    return Counts(train, used, val)


def predict(cfg: Config, n: Counts, r: Rates, ingest_rate: float = 3000.0) -> dict[str, float]:
    """Seconds per stage (the students one by one, as ``dvc repro`` runs them)."""
    t, s, e = cfg.teacher, cfg.student, cfg.evaluate
    train_view, eval_view = 1 / r.views_train, 1 / r.views_eval
    evals = len({*range(s.eval_every, s.epochs + 1, s.eval_every), s.epochs})
    teacher_eval = 1 / r.teacher_infer + eval_view
    out = {
        "ingest": (n.train + n.val) / ingest_rate,
        "teacher-fit": t.fit.epochs * n.used * (1 / r.teacher_fit + train_view) + n.val * teacher_eval,
        "teacher": t.epochs * n.used * (1 / r.teacher_infer + train_view) + (n.val + n.train) * teacher_eval,
    }
    for name in STUDENTS:
        out[f"student {name}"] = (s.epochs * n.used * (1 / r.student_train + train_view)
                                  + evals * n.val * (1 / r.student_infer + eval_view))
    out["evaluate"] = n.val * (eval_view + 1 / r.teacher_infer + len(STUDENTS) / r.student_infer) \
        + (1 + len(STUDENTS)) * e.throughput_seconds
    out["audit"] = n.train * 20e-6
    return {stage: seconds + STARTUP_S for stage, seconds in out.items()}


def table(cfg: Config, n: Counts, r: Rates, predicted: dict[str, float]) -> str:
    lines = [f"estimate: {cfg.teacher.model} teacher, {cfg.student.model} student, {n.used:,} of {n.train:,} training "
             f"images ({n.val:,} val); rates (images/s): teacher fit {r.teacher_fit:,.0f}, teacher inference "
             f"{r.teacher_infer:,.0f}, student training {r.student_train:,.0f}, student inference "
             f"{r.student_infer:,.0f}, training views {r.views_train:,.0f}, evaluation views {r.views_eval:,.0f}"]
    lines += [f"  {stage:<14} {_clock(sec)}" for stage, sec in predicted.items()]
    lines.append(f"  {'total':<14} {_clock(sum(predicted.values()))}")
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m:3d} min {s:02d} s"


def read_rates(path: Path) -> Rates:
    """Another machine's rates from a JSON object with the keys ``distill estimate`` prints (ValueError naming the
    file otherwise)."""
    try:
        return Rates(**json.loads(path.read_text()))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a JSON object of the rates {list(Rates.__dataclass_fields__)} ({e})") from None


def run(cfg: Config, *, rates: Rates | None = None, seconds: float = 2.0) -> tuple[dict[str, float], str]:
    """The predicted seconds per stage and their table; ``rates`` given (another machine's), nothing is timed."""
    from pipeline.core.files import use_storage_options
    from pipeline.train.rates import measure

    use_storage_options(cfg.storage_options)  # the manifest or the source may be on object storage
    n = counts(cfg)
    num_classes = len(cfg.data.class_names) if cfg.data.class_names else 10
    r = rates if rates is not None else measure(cfg, num_classes, seconds)
    predicted = predict(cfg, n, r)
    return predicted, table(cfg, n, r, predicted)
