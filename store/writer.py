"""Writing (epoch, shard) units into the logit store.

A unit's data is written first and its done record last (with the digests of what was written), so a
crash never leaves a unit marked done without its data; re-running the teacher stage skips exactly
the units marked done, and a reader checks every unit against its record.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import zarr

from store.layout import KIND_CUTMIX, STAGE, TRAIN_TARGETS, StoreSpec, array, spec_of
from store.objects import objects_of
from store.records import plan_digest, unit_body, write_record


def _arr(where: str, name: str, value: object, shape: tuple[int, ...], kind: str) -> np.ndarray:
    a = np.asarray(value)
    if a.shape != shape:
        raise ValueError(f"{where}: {name} has shape {a.shape}, expected {shape}")
    ok = np.issubdtype(a.dtype, np.floating) if kind == "f" else np.issubdtype(a.dtype, np.integer)
    if not ok:
        want = "floating point" if kind == "f" else "integer"
        raise ValueError(f"{where}: {name} must be {want}, got dtype {a.dtype}")
    return a


def _ints(where: str, name: str, a: np.ndarray, lo: int, hi: int, dtype: np.dtype) -> np.ndarray:
    """Range-check integers (lo <= v < hi) before casting, so a cast never wraps silently."""
    if a.size and (a.min() < lo or a.max() >= hi):
        raise ValueError(f"{where}: {name} values must be in [{lo}, {hi}), got min {a.min()} max {a.max()}")
    return a.astype(dtype, copy=False)


def _floats(where: str, name: str, a: np.ndarray, dtype: type) -> np.ndarray:
    out = a.astype(dtype, copy=False)
    if not np.isfinite(out).all():
        raise ValueError(f"{where}: {name} has NaN or inf (after conversion to {np.dtype(dtype).name})")
    return out


def _targets(where: str, spec: StoreSpec, n: int, topk_logits, topk_classes, logsumexp, label):
    k, c, lab = spec.k, spec.num_classes, spec.label_dtype
    tl = _floats(where, "topk_logits", _arr(where, "topk_logits", topk_logits, (n, k), "f"), np.float16)
    if k > 1 and not (tl[:, :-1] >= tl[:, 1:]).all():
        raise ValueError(f"{where}: topk_logits rows must be sorted by logit, descending")
    tc = _ints(where, "topk_classes", _arr(where, "topk_classes", topk_classes, (n, k), "i"), 0, c, lab)
    lse = _floats(where, "logsumexp", _arr(where, "logsumexp", logsumexp, (n,), "f"), np.float32)
    lb = _ints(where, "label", _arr(where, "label", label, (n,), "i"), 0, c + 1, lab)  # c: a dropped label
    return {"topk_logits": tl.view(np.uint16), "topk_classes": tc, "logsumexp": lse, "label": lb}


def _plan(where: str, n: int, n_train: int, plan: tuple | None) -> str | None:
    if plan is None:
        return None
    partner, kind, lam = plan
    pa = _ints(where, "partner", _arr(where, "partner", partner, (n,), "i"), 0, n_train, np.int64)
    la = _floats(where, "lam", _arr(where, "lam", lam, (n,), "f"), np.float32)
    if la.size and (la.min() < 0 or la.max() > 1):
        raise ValueError(f"{where}: lam values must be in [0, 1], got min {la.min()} max {la.max()}")
    kd = _ints(where, "kind", _arr(where, "kind", kind, (n,), "i"), 0, KIND_CUTMIX + 1, np.uint8)
    return plan_digest(pa, kd, la)


def write_train_unit(
    group: zarr.Group,
    epoch: int,
    shard: int,
    *,
    topk_logits: np.ndarray,
    topk_classes: np.ndarray,
    logsumexp: np.ndarray,
    label: np.ndarray,
    plan: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    fence: Callable[[], None] | None = None,
) -> None:
    """Write rows [start, end) of one shard for one stored epoch (to ``stage/``), then its done record (last).

    Inputs are numpy arrays for exactly that shard's rows; they are checked (shape, dtype kind, value
    range, sort order) and cast to the store's dtypes. ``plan`` is the (partner, kind, λ) the teacher
    replayed: only its digest is kept, for readers to check theirs against. ``fence`` runs between the data and the
    record, and stops the record by raising (a writer that lost its claim).
    """
    spec = spec_of(group)
    where = f"write_train_unit(epoch={epoch}, shard={shard})"
    if not 0 <= epoch < spec.epochs:
        raise ValueError(f"{where}: epoch out of range [0, {spec.epochs})")
    if not 0 <= shard < spec.n_shards:
        raise ValueError(f"{where}: shard out of range [0, {spec.n_shards})")
    start, end = spec.train_ranges[shard]
    where += f" rows [{start}, {end})"
    arrays = _targets(where, spec, end - start, topk_logits, topk_classes, logsumexp, label)
    body = unit_body((start, end), arrays, _plan(where, end - start, spec.n_train, plan))
    for name in TRAIN_TARGETS:
        array(group, f"{STAGE}/train/{name}")[epoch, start:end] = arrays[name]
    array(group, "train/label")[start:end] = arrays["label"]  # the same values from every epoch: whole-object replaces
    if fence is not None:
        fence()
    # last: the unit counts only once all its data is there, and the record says what that data is
    write_record(objects_of(group), "train", epoch, shard, body)


def write_val_unit(
    group: zarr.Group,
    shard: int,
    *,
    topk_logits: np.ndarray,
    topk_classes: np.ndarray,
    logsumexp: np.ndarray,
    label: np.ndarray,
    split: str = "val",
    fence: Callable[[], None] | None = None,
) -> None:
    """Write one shard of evaluation views (``val``, or the ``clean`` pass over the training images: no
    augmentation, no epochs), then its done record (last)."""
    spec = spec_of(group)
    ranges = spec.view_ranges(split)
    where = f"write_val_unit({split}, shard={shard})"
    if not 0 <= shard < len(ranges):
        raise ValueError(f"{where}: shard out of range [0, {len(ranges)})")
    start, end = ranges[shard]
    where += f" rows [{start}, {end})"
    arrays = _targets(where, spec, end - start, topk_logits, topk_classes, logsumexp, label)
    for name, a in arrays.items():
        array(group, f"{split}/{name}")[start:end] = a
    if fence is not None:
        fence()
    write_record(objects_of(group), split, 0, shard, unit_body((start, end), arrays))  # last
