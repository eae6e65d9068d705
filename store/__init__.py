"""The logit store: teacher top-k targets and mix plans in Zarr v3, one chunk per (epoch, shard).

Knows nothing of models or training: numpy arrays in, numpy arrays out.
"""

from store.describe import describe
from store.frames import train_frame, val_frame
from store.layout import (
    CODECS,
    FORMAT,
    KIND_CUTMIX,
    KIND_MIXUP,
    KIND_NAMES,
    KIND_NONE,
    StoreSpec,
    array_layout,
    create_store,
    finalize,
    spec_of,
    stored_bytes,
)
from store.provenance import IDENTITY_FIELDS, ProvenanceMismatch, StoreError
from store.reader import (
    MissingUnit,
    TrainUnit,
    ValUnit,
    done_mask,
    open_store,
    read_train_unit,
    read_val,
    val_done_mask,
)
from store.targets import dense_soft_target, stored_probs, tail_mass, topk_from_logits
from store.writer import write_train_unit, write_val_unit

__all__ = [
    "CODECS",
    "FORMAT",
    "IDENTITY_FIELDS",
    "KIND_CUTMIX",
    "KIND_NAMES",
    "KIND_MIXUP",
    "KIND_NONE",
    "MissingUnit",
    "ProvenanceMismatch",
    "StoreError",
    "StoreSpec",
    "TrainUnit",
    "ValUnit",
    "array_layout",
    "create_store",
    "dense_soft_target",
    "describe",
    "stored_bytes",
    "done_mask",
    "finalize",
    "open_store",
    "read_train_unit",
    "read_val",
    "spec_of",
    "stored_probs",
    "tail_mass",
    "topk_from_logits",
    "train_frame",
    "val_done_mask",
    "val_frame",
    "write_train_unit",
    "write_val_unit",
]
