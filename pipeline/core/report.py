"""Rendering tables for people: the one markdown table writer that reports (audit, evaluate) share.

Cells are formatted here (percentages, fixed digits, thousands, "–" for missing values) and the table
is laid out by pandas' ``DataFrame.to_markdown`` (tabulate), numeric columns right-aligned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

MISSING = "–"


def cell(v: Any, percent: bool = False, digits: int = 3) -> str:
    """One value as text: NaN/None/NA as "–", floats with ``digits`` (or as a percentage), text escaped."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    if isinstance(v, bool | np.bool_):
        return str(bool(v))
    if isinstance(v, float | np.floating):
        return f"{100 * v:.1f}%" if percent else f"{v:.{digits}f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    df: pd.DataFrame,
    percent: Sequence[str] = (),
    digits: int = 3,
    formats: Mapping[str, Callable[[Any], str]] | None = None,
) -> str:
    """A GitHub markdown table of ``df`` (without its index); columns in ``percent`` print as percentages,
    ``formats`` maps a column to its own formatter."""
    formats = formats or {}
    shown = pd.DataFrame({
        str(c): [formats[str(c)](v) if str(c) in formats else cell(v, str(c) in percent, digits) for v in df[c]]
        for c in df.columns
    })
    align = ["right" if pd.api.types.is_numeric_dtype(df[c]) else "left" for c in df.columns]
    shown.columns = [str(c).replace("|", "\\|") for c in shown.columns]
    return shown.to_markdown(index=False, colalign=align, disable_numparse=True) + "\n"
