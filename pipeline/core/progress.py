"""Progress bars for long work: in place on a terminal, a line every 30 s in logs (dvc repro, CI)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, **kw: Any) -> tqdm:
    """A tqdm bar that redraws in place on a terminal and prints a line every 30 s into logs."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5 if tty else 30.0, **kw)
