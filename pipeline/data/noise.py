"""Planted label noise (``data.label_noise``): which training labels ingest flips on purpose, and to what.

Flips score the label audit on known errors. ``uniform`` moves a label to any other class; ``confusable`` to a
class the data's own confusion makes likely (real label noise sits between classes that look alike): row ``y``
of a C x C matrix (``data.label_noise_confusion``: inline, or a teacher-fit report's ``val_confusion``) gives the
odds of each other class for an image of class ``y``. Both are seeded and recorded in the manifest.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import yaml

from pipeline.core.errors import DistillError
from pipeline.core.files import location

NOISE_STREAM = 2
"""The seed stream of the planted label noise."""


class NoiseError(DistillError, ValueError):
    """A confusion matrix that cannot drive confusable noise; the message names its source."""


def _read(source: str) -> Any:
    loc = location(source)
    if not loc.is_file():
        raise NoiseError(f"{source}: confusion matrix not found (data.label_noise_confusion)")
    try:
        data = yaml.safe_load(loc.read_text())  # JSON is YAML
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise NoiseError(f"{source}: cannot read a confusion matrix: {e}") from None
    return data.get("val_confusion") if isinstance(data, dict) else data


def load_confusion(source: str | list[list[float]], num_classes: int) -> np.ndarray:
    """The C x C matrix of ``data.label_noise_confusion`` as float64, its diagonal zeroed (a flip changes the
    class); refused unless square, of the data's classes, finite and non-negative."""
    where = "data.label_noise_confusion" if isinstance(source, list) else str(source)
    raw = source if isinstance(source, list) else _read(source)
    try:
        m = np.array(raw, dtype=np.float64)
    except (TypeError, ValueError):
        m = np.zeros(0)
    if m.shape != (num_classes, num_classes) or not np.isfinite(m).all() or (m < 0).any():
        raise NoiseError(f"{where}: expected a {num_classes} x {num_classes} matrix of non-negative numbers "
                         f"(rows: true class), got shape {m.shape}" + (" with a negative or non-finite value"
                                                                      if m.ndim == 2 else ""))
    np.fill_diagonal(m, 0.0)
    return m


def matrix_digest(m: np.ndarray) -> str:
    """A canonical text of the matrix, for the shards' config hash (the flips depend on its values)."""
    return json.dumps(m.tolist())


def draw_flips(labels: np.ndarray, fraction: float, seed: int, num_classes: int,
               confusion: np.ndarray | None = None) -> dict[int, int]:
    """Positions of a seeded ``fraction`` of ``labels``, each with the class it is flipped to: any other class
    (``confusion`` None), or one drawn from the label's row of ``confusion`` (only labels whose row has mass)."""
    n = round(fraction * len(labels))
    if n == 0 or num_classes < 2:
        return {}
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(NOISE_STREAM,)))
    if confusion is None:
        positions = rng.choice(len(labels), size=n, replace=False)
        shift = rng.integers(1, num_classes, size=n)
        return {int(p): (int(labels[p]) + int(d)) % num_classes for p, d in zip(positions, shift, strict=True)}
    rows = confusion.sum(axis=1)
    eligible = np.flatnonzero(rows[labels] > 0)
    if len(eligible) < n:
        raise NoiseError(f"data.label_noise {fraction}: {n} flips asked, but only {len(eligible)} images have a class "
                         "whose row of data.label_noise_confusion has mass")
    positions = np.sort(rng.choice(eligible, size=n, replace=False))
    cdf = np.cumsum(confusion, axis=1) / np.where(rows > 0, rows, 1.0)[:, None]
    u = rng.random(n)
    given = [int(np.searchsorted(cdf[labels[p]], x, side="right")) for p, x in zip(positions, u, strict=True)]
    return {int(p): min(g, num_classes - 1) for p, g in zip(positions, given, strict=True)}
