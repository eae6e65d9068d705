"""The logit store: teacher top-k targets and mix plans in Zarr v3, one chunk per (epoch, shard).

Knows nothing of models or training: numpy arrays in, numpy arrays out. Every unit read is checked
against the done record its writer left (``store.records``); writers coordinate through claims
(``store.claims``).
"""

from store.claims import ClaimLost, Claims, StaticPart, conditional_writes_hold
from store.create import annotate, create_store, finalize, open_store
from store.describe import describe
from store.frames import split_probs, train_frame, val_frame
from store.layout import (
    CODECS,
    FORMAT,
    KIND_CUTMIX,
    KIND_MIXUP,
    KIND_NAMES,
    KIND_NONE,
    VIEW_SPLITS,
    StoreSpec,
    array_layout,
    finished_objects,
    spec_of,
)
from store.objects import Objects, object_stats, objects_at, objects_of
from store.pack import pack_epoch, tidy, unpack_epoch, unpacked_complete
from store.provenance import IDENTITY_FIELDS, ProvenanceMismatch, StoreError
from store.reader import (
    DamagedUnit,
    MissingUnit,
    TrainUnit,
    ValUnit,
    done_mask,
    packed_epochs,
    read_train_rows,
    read_train_unit,
    read_val,
    read_val_unit,
    val_done_mask,
)
from store.records import Done, delete_record, listing, plan_digest, read_record
from store.targets import dense_soft_target, stored_probs, tail_mass, topk_from_logits
from store.writer import write_train_unit, write_val_unit

__all__ = [
    "annotate",
    "pack_epoch",
    "packed_epochs",
    "plan_digest",
    "tidy",
    "unpack_epoch",
    "unpacked_complete",
    "CODECS",
    "FORMAT",
    "IDENTITY_FIELDS",
    "KIND_CUTMIX",
    "KIND_MIXUP",
    "KIND_NAMES",
    "KIND_NONE",
    "ClaimLost",
    "StaticPart",
    "conditional_writes_hold",
    "Claims",
    "Done",
    "DamagedUnit",
    "MissingUnit",
    "Objects",
    "ProvenanceMismatch",
    "StoreError",
    "StoreSpec",
    "TrainUnit",
    "VIEW_SPLITS",
    "ValUnit",
    "array_layout",
    "create_store",
    "delete_record",
    "listing",
    "dense_soft_target",
    "describe",
    "done_mask",
    "finalize",
    "objects_at",
    "objects_of",
    "open_store",
    "read_record",
    "read_train_rows",
    "read_train_unit",
    "read_val",
    "read_val_unit",
    "spec_of",
    "split_probs",
    "finished_objects",
    "object_stats",
    "stored_probs",
    "tail_mass",
    "topk_from_logits",
    "train_frame",
    "val_done_mask",
    "val_frame",
    "write_train_unit",
    "write_val_unit",
]
