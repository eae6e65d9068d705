"""Provenance of a logit store: which fields identify the run that wrote it, and how a mismatch reads.

Stored targets are only right for the exact teacher, augmentation, seed, epoch count, top-k and
shard manifest that produced them. Those are the *identity* fields: a store whose identity differs
from the run asking for it must be refused, loudly, naming the field. Everything else the caller
records (library versions, creation time, host, checkpoint path, the full augmentation config for
humans, ...) is *informational*: kept in the store for audits, never compared, so that upgrading a
library or moving a checkpoint file does not invalidate a store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

IDENTITY_FIELDS: tuple[str, ...] = (
    "teacher",
    "teacher_sha256",
    "teacher_small_stem",
    "aug_hash",
    "view_stream",
    "seed",
    "epochs",
    "topk",
    "num_classes",
    "manifest_fingerprint",
)
"""Fields compared when a store is opened for a run. Any other provenance key is informational."""


_ABSENT = "<absent>"


class StoreError(Exception):
    """A logit store that cannot be used as asked (missing, incomplete, wrong format, bad request)."""


class ProvenanceMismatch(StoreError):
    """The store was written by a different run than the one asking for it.

    ``differences`` holds ``(field, stored_value, expected_value)`` for every differing field.
    """

    def __init__(self, message: str, differences: list[tuple[str, Any, Any]]):
        super().__init__(message)
        self.differences = differences

    @property
    def fields(self) -> list[str]:
        return [d[0] for d in self.differences]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"value {obj!r} of type {type(obj).__name__} is not JSON-serialisable")


def normalize(obj: Any) -> Any:
    """JSON round trip, so stored and fresh values compare alike (tuples -> lists, numpy -> python)."""
    return json.loads(json.dumps(obj, default=_jsonable, sort_keys=True))


def short(value: Any, limit: int = 100) -> str:
    """repr of a value, cut to ``limit`` characters so a message about a long list stays readable."""
    text = "<absent>" if value is _ABSENT else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def differences(
    stored: dict[str, Any], expected: dict[str, Any], fields: list[str]
) -> list[tuple[str, Any, Any]]:
    """(field, stored, expected) for each of ``fields`` whose values differ; a missing key differs."""
    out = []
    for f in fields:
        s = stored.get(f, _ABSENT)
        e = normalize(expected[f]) if f in expected else _ABSENT
        if s != e:
            out.append((f, s, e))
    return out


def aug_differences(stored: Any, expected: Any) -> list[tuple[str, Any, Any]]:
    """(aug.key, stored, expected) for each augmentation key that differs, when both sides recorded theirs."""
    if not isinstance(stored, dict) or not isinstance(expected, dict):
        return []
    return [(f"aug.{k}", s, e) for k, s, e in differences(stored, expected, sorted(set(stored) | set(expected)))]


def mismatch_error(where: str, diffs: list[tuple[str, Any, Any]], stored_aug: Any = None,
                   expected_aug: Any = None) -> ProvenanceMismatch:
    """One ProvenanceMismatch listing every differing field with both values; a differing ``aug_hash`` is
    explained by the augmentation keys that changed, when both augmentation configs are known."""
    lines = []
    for f, s, e in diffs:
        changed = aug_differences(stored_aug, expected_aug) if f == "aug_hash" else []
        if changed:
            keys = "; ".join(f"{k}: store has {short(a, 40)}, this run expects {short(b, 40)}" for k, a, b in changed)
            lines.append(f"provenance field '{f}' differs, in the augmentation keys {keys}")
        else:
            lines.append(f"provenance field '{f}' differs: store has {short(s)}, this run expects {short(e)}")
    if len(lines) == 1:
        msg = f"logit store {where}: {lines[0]}"
    else:
        msg = f"logit store {where}: {len(lines)} provenance fields differ:\n  " + "\n  ".join(lines)
    msg += "\n(use another store path, or delete this store to rebuild it for this run)"
    return ProvenanceMismatch(msg, diffs)


def check_identity(where: str, stored: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise ProvenanceMismatch if any IDENTITY field given in ``expected`` differs from ``stored``."""
    fields = [f for f in IDENTITY_FIELDS if f in expected]
    diffs = differences(stored, expected, fields)
    if diffs:
        raise mismatch_error(where, diffs, stored.get("aug"), expected.get("aug"))
