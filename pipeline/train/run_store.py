"""What a run expects of its logit store: the spec (shapes, chunks, codec) and the provenance.

The teacher stage creates the store from these; the student, verify and audit open it with the same
provenance, so a store written for another teacher, augmentation, seed, E, K or shard set is refused
by name (see ``store.IDENTITY_FIELDS``).
"""

from __future__ import annotations

import datetime as _dt
from importlib import metadata
from typing import Any

import numpy as np

import store
from pipeline.core.config import Config
from pipeline.data.shards import Manifest, load_manifest
from pipeline.views.canary import require_same_views
from pipeline.views.rng import STREAM_VERSION

VERSIONED = ("torch", "timm", "zarr", "numcodecs", "webdataset", "numpy", "pillow")


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def store_spec(cfg: Config, manifest: Manifest) -> store.StoreSpec:
    """The store a run's teacher stage fills: its train shards (``data.train_shards`` of them), val, and the
    clean pass over every ingested train shard. Packed arrays are chunked in blocks of one mixing window when
    the window divides the shard size (a reader then fetches the windows it trains), else of one shard."""
    shard_size = max(b - a for a, b in manifest.ranges("train"))
    return store.StoreSpec(
        num_classes=manifest.num_classes,
        epochs=cfg.teacher.epochs,
        topk=cfg.teacher.topk,
        train_ranges=tuple(manifest.ranges("train")),
        val_ranges=tuple(manifest.ranges("val")),
        clean_ranges=tuple(load_manifest(cfg.data.shards).ranges("train")),
        codec=cfg.store.codec,
        level=cfg.store.level,
        block=cfg.aug.window if shard_size % cfg.aug.window == 0 else None,
    )


def store_provenance(
    cfg: Config, manifest: Manifest, teacher_sha256: str, fit_samples: int | None = None,
    views: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Identity of the targets a teacher run writes (see store.IDENTITY_FIELDS) plus informational keys
    (``teacher_fit_samples``: the teacher was fit on the first N ingested train images, None if unknown;
    ``views``: the view canary, :mod:`pipeline.views.canary`)."""
    return {
        "teacher": cfg.teacher.model,
        "teacher_sha256": teacher_sha256,
        "teacher_small_stem": cfg.teacher.small_stem,
        "aug_hash": cfg.section_hash("aug"),
        "view_stream": STREAM_VERSION,
        "seed": cfg.seed,
        "epochs": cfg.teacher.epochs,
        "topk": cfg.teacher.topk,
        "num_classes": manifest.num_classes,
        "manifest_fingerprint": manifest.fingerprint,
        "aug": cfg.aug.model_dump(mode="json"),
        "teacher_fit_samples": fit_samples,
        "versions": versions(),
        **({"views": views} if views is not None else {}),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def open_complete_store(cfg: Config, manifest: Manifest, teacher_sha256: str, *, allow_view_drift: bool = False,
                        say: Any = print) -> tuple[Any, str | None]:
    """The run's store, read-only, refused when written for another run, when a train unit is not done, or when
    this environment makes other views (unless ``allow_view_drift``); and what differs then (None: nothing)."""
    group = store.open_store(cfg.store.path, expected=store_provenance(cfg, manifest, teacher_sha256))
    missing = np.argwhere(~store.done_mask(group))
    if len(missing):
        units = ", ".join(f"(epoch {e}, shard {s})" for e, s in missing[:5])
        raise store.MissingUnit(
            f"logit store {cfg.store.path}: {len(missing)} unit(s) not done, e.g. {units}; "
            "run `distill teacher` to complete it"
        )
    return group, require_same_views(group, str(cfg.store.path), allow_drift=allow_view_drift, say=say)
