"""What every stage shares at the stage layer: the error a stage raises when it cannot go on.

Shared machinery (loaders, progress bars, store provenance, checkpoints) lives in ``pipeline/``.
"""

from __future__ import annotations

from pipeline.errors import DistillError

StageError = DistillError
"""A stage cannot go on; the message says what is wrong and what to do. It is the project's common
error base, so a stage-level check and a pipeline helper's refusal read alike at the CLI."""
