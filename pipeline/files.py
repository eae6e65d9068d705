"""Writing and hashing files safely: the one place that knows how an output reaches the disk.

Every output a later stage trusts (checkpoints, reports, the manifest) is written to a temporary
sibling, flushed and renamed into place, so a crash or a full disk never leaves a half-written file
under the real name; the temporary file of a failed write is removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk or a denied write names the file it was for, and leaves no temp file
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, **kw: Any) -> None:
    """Pretty JSON (sorted keys unless ``sort_keys=False``), newline-terminated."""
    kw = {"indent": 2, "sort_keys": True, **kw}
    atomic_write_text(path, json.dumps(obj, **kw) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` that never leaves a partial file behind."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getbuffer())


def torch_load_reason(e: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words (torch's own message is a page of
    advice to turn weights_only off, which this project never does)."""
    text = str(e)
    if "Weights only load failed" in text or "weights_only" in text:
        return "it holds pickled Python objects besides tensors and plain values, which are never loaded " \
               "(no code runs from a checkpoint)"
    if "zip" in text.lower() or "central directory" in text or isinstance(e, EOFError):
        return "not a torch file, or a truncated one"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first}"


def torch_load(path: str | os.PathLike[str]) -> Any:
    """Read a torch file on the CPU with the safe loader (tensors and plain values only).

    Raises ValueError with :func:`torch_load_reason`; FileNotFoundError when there is no file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle, zip and weights_only refusals all mean "not a usable torch file"
        raise ValueError(torch_load_reason(e)) from e
