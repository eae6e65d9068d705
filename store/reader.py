"""Reading the logit store: open with a provenance check, read whole units, rebuild soft targets.

The student joins its replayed views with stored targets by (epoch, global index); a unit is read
with one slice per array (one chunk each), never row by row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from store.layout import FORMAT, StoreSpec, array_layout, spec_of, store_path
from store.provenance import ProvenanceMismatch, StoreError, check_identity

__all__ = [
    "MissingUnit",
    "ProvenanceMismatch",
    "StoreError",
    "TrainUnit",
    "ValUnit",
    "done_mask",
    "open_store",
    "read_train_unit",
    "read_val",
    "val_done_mask",
]


class MissingUnit(StoreError):
    """A unit asked for is not marked done (the teacher stage has not written it, or crashed on it)."""


@dataclass
class TrainUnit:
    epoch: int
    shard: int
    start: int
    end: int
    topk_logits: np.ndarray  # (n, k) float32 (stored as float16)
    topk_classes: np.ndarray  # (n, k)
    hard_label: np.ndarray  # (n,) argmax of the full teacher logits
    logsumexp: np.ndarray  # (n,) float32, full logits at temperature 1
    partner: np.ndarray  # (n,) int32 global index of the mix partner
    lam: np.ndarray  # (n,) float32
    kind: np.ndarray  # (n,) uint8: KIND_NONE / KIND_MIXUP / KIND_CUTMIX
    label: np.ndarray  # (n,) true labels


@dataclass
class ValUnit:
    start: int
    end: int
    topk_logits: np.ndarray
    topk_classes: np.ndarray
    hard_label: np.ndarray
    logsumexp: np.ndarray
    label: np.ndarray


def open_store(path: str | Path, expected: dict[str, Any] | None = None) -> zarr.Group:
    """Open read-only; with ``expected``, refuse a store written for another run (ProvenanceMismatch).

    Each IDENTITY field present in ``expected`` is compared; every differing one is named with
    both values. A missing path, a non-store or an incomplete store raises StoreError.
    """
    try:
        root = zarr.open_group(store_path(path), mode="r")
    except FileNotFoundError:
        raise StoreError(f"logit store {path}: not found (run the teacher stage to create it)") from None
    except Exception as e:  # corrupt metadata and the like
        raise StoreError(f"logit store {path}: cannot be opened as a Zarr v3 group: {e}") from e
    attrs = root.attrs.asdict()
    if attrs.get("format") != FORMAT or "spec" not in attrs or "provenance" not in attrs:
        raise StoreError(
            f"logit store {path}: not a logit store of format {FORMAT} (format={attrs.get('format')!r})"
        )
    missing = [name for name in array_layout(spec_of(root)) if name not in root]
    if missing:
        raise StoreError(
            f"logit store {path}: incomplete, missing arrays {missing} (creation was cut short?)"
        )
    if expected is not None:
        check_identity(str(path), attrs["provenance"], expected)
    return root


def done_mask(group: zarr.Group) -> np.ndarray:
    """(E, S) bool: which (epoch, shard) train units are complete."""
    return np.asarray(group["train/done"][...], dtype=bool)


def val_done_mask(group: zarr.Group) -> np.ndarray:
    """(S_val,) bool: which val shards are complete."""
    return np.asarray(group["val/done"][...], dtype=bool)


def read_train_unit(group: zarr.Group, epoch: int, shard: int) -> TrainUnit:
    """All stored targets and the mix plan of one (epoch, shard); MissingUnit if it is not done."""
    spec = spec_of(group)
    if not 0 <= epoch < spec.epochs or not 0 <= shard < spec.n_shards:
        raise StoreError(
            f"read_train_unit: (epoch={epoch}, shard={shard}) outside the store's {spec.epochs} epochs "
            f"x {spec.n_shards} shards"
        )
    if not bool(group["train/done"][epoch, shard]):
        raise MissingUnit(
            f"logit store has no data for epoch {epoch}, shard {shard} (not marked done); "
            "re-run the teacher stage to fill it"
        )
    return train_unit_arrays(group, spec, epoch, shard)


def train_unit_arrays(
    group: zarr.Group, spec: StoreSpec, epoch: int, shard: int, label: np.ndarray | None = None
) -> TrainUnit:
    """:func:`read_train_unit` without its checks, for a caller that has the spec and the done mask
    already (and, as ``label``, the unit's labels): one read per array of the unit."""
    a, b = spec.train_ranges[shard]
    return TrainUnit(
        epoch=epoch,
        shard=shard,
        start=a,
        end=b,
        topk_logits=group["train/topk_logits"][epoch, a:b].astype(np.float32),
        topk_classes=group["train/topk_classes"][epoch, a:b],
        hard_label=group["train/hard_label"][epoch, a:b],
        logsumexp=group["train/logsumexp"][epoch, a:b],
        partner=group["train/partner"][epoch, a:b],
        lam=group["train/lam"][epoch, a:b],
        kind=group["train/kind"][epoch, a:b],
        label=group["train/label"][a:b] if label is None else label,
    )


def read_val(group: zarr.Group) -> ValUnit:
    """All val rows; MissingUnit naming the val shards that are not done."""
    spec = spec_of(group)
    mask = val_done_mask(group)
    if not mask.all():
        raise MissingUnit(f"logit store: val shards {np.flatnonzero(~mask).tolist()} are not marked done")
    n = spec.n_val
    return ValUnit(
        start=0,
        end=n,
        topk_logits=group["val/topk_logits"][:n].astype(np.float32),
        topk_classes=group["val/topk_classes"][:n],
        hard_label=group["val/hard_label"][:n],
        logsumexp=group["val/logsumexp"][:n],
        label=group["val/label"][:n],
    )
