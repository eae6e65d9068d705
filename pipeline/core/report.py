"""Rendering results for people: the one markdown table writer and the one way to draw and save a figure that
reports (audit, evaluate) and the benchmarks share.

Cells are formatted here (percentages, fixed digits, thousands, "–" for missing values) and the table
is laid out by pandas' ``DataFrame.to_markdown`` (tabulate), numeric columns right-aligned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.files import atomic_write_bytes

MISSING = "–"


def figure(figsize: tuple[float, float], **kw: Any) -> Any:
    """A matplotlib ``Figure`` on the off-screen Agg canvas: no display and no pyplot state, and matplotlib imported
    only by the commands that draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, **kw)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: Any, dpi: int) -> None:
    """Write ``fig`` as a PNG to a path or URL, whole or not at all."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    atomic_write_bytes(path, buf.getvalue())


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
