"""How often a student replays each stored epoch, and when that is too often.

Student epoch t replays stored epoch t mod E, so a run of ``student.epochs`` sees each of the store's E
augmented epochs, with the teacher's same answers, ``student.epochs / E`` times: the reuse factor. On the
demo recipe the accuracy-vs-E curve (docs/epochs.md) showed no loss up to
:data:`REUSE_LIMIT`, the largest factor measured; above it ``distill student`` warns, as the run is then
in territory where a precomputed teacher is known to over-fit on long schedules (Beyer et al., 2022).
"""

from __future__ import annotations

import math

__all__ = ["REUSE_LIMIT", "reuse_factor", "reuse_warning"]

REUSE_LIMIT = 25.0
"""The largest reuse factor measured without a loss of accuracy: the demo's curve at E = 1 for 25 epochs (66.11 %
top-1 against 66.95 % at E = 25, within 1.3 standard errors of a difference; docs/epochs.md)."""


def reuse_factor(student_epochs: int, stored_epochs: int) -> float:
    """Times each stored epoch is replayed by a run of ``student_epochs``."""
    return student_epochs / stored_epochs


def reuse_warning(student_epochs: int, stored_epochs: int) -> str | None:
    """A one-paragraph warning when the reuse factor exceeds :data:`REUSE_LIMIT`, naming both values and what to
    change; None otherwise."""
    factor = reuse_factor(student_epochs, stored_epochs)
    if factor <= REUSE_LIMIT:
        return None
    need = math.ceil(student_epochs / REUSE_LIMIT)
    return (f"student.epochs {student_epochs} replays each of the store's teacher.epochs {stored_epochs} stored "
            f"epochs {factor:.1f} times, above {REUSE_LIMIT:g}, the most the demo's accuracy-vs-E curve measured "
            f"without a loss (docs/epochs.md); a precomputed teacher over-fits on long "
            f"schedules: store teacher.epochs >= {need} (a new store) or train fewer student epochs")
