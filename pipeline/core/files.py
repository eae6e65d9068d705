"""Where files live and how they are written: local paths and fsspec URLs (``s3://``, ``gs://``, ``memory://``).

Every path the config names goes through :func:`location` (a ``UPath``: pathlib's API on any fsspec
filesystem), so an ``s3://`` path is never taken for a local folder named ``s3:``. Each scheme's
``storage_options`` (endpoint, profile, anonymous access, ...) come from the config's
``storage_options`` section through fsspec's own per-protocol defaults (:func:`use_storage_options`),
or from the filesystem's usual environment variables (``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ...).

Every output a later stage trusts (checkpoints, reports, the manifest) is written atomically through the
project's one I/O layer (:mod:`store.objects`): locally to a temporary sibling, flushed and renamed into
place; on an object store in one PUT, which readers see whole or not at all.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
from upath import UPath

from store.objects import filesystem, is_url, local_path, read_bytes, read_range, write_bytes

__all__ = ["atomic_torch_save", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "check_scheme",
           "is_url", "local_copy", "location", "read_bytes", "read_range", "sha256_file", "size", "torch_load",
           "use_storage_options"]

SCHEME_PACKAGES = {"s3": "s3fs (pip install 'deit-distill[s3]')", "gs": "gcsfs (pip install 'deit-distill[gcs]')",
                   "gcs": "gcsfs (pip install 'deit-distill[gcs]')"}


def location(path: str | os.PathLike[str]) -> UPath:
    """The path as a ``UPath``: a local path, or a file or folder on the URL's filesystem."""
    return UPath(local_path(path) if not is_url(path) else str(path))


def check_scheme(path: str) -> None:
    """Refuse a URL whose scheme has no fsspec filesystem installed, naming the package to install."""
    if not is_url(path):
        return
    scheme = path.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError:
        raise ValueError(f"no filesystem for '{scheme}://' is installed; install "
                         f"{SCHEME_PACKAGES.get(scheme, 'the fsspec implementation for it')}") from None
    except ValueError:
        raise ValueError(f"unknown URL scheme '{scheme}://' (fsspec knows no such filesystem)") from None


def use_storage_options(options: dict[str, dict[str, Any]]) -> None:
    """Make each scheme's options (``{"s3": {"endpoint_url": ...}}``) the defaults of every filesystem of that
    scheme this process (and its DataLoader workers) opens: fsspec's own per-protocol configuration."""
    for scheme, opts in options.items():
        fsspec.config.conf.setdefault(scheme, {}).update(opts)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def local_copy(path: str | os.PathLike[str] | None) -> Iterator[str | None]:
    """A local path to the file (a temporary download for a URL), for libraries that only read local files."""
    if path is None or not is_url(path):
        yield None if path is None else str(path)
        return
    with tempfile.TemporaryDirectory(prefix="distill-") as tmp:
        local = os.path.join(tmp, location(path).name)
        with open(local, "wb") as f:
            f.write(read_bytes(path))
        yield local


def size(path: str | os.PathLike[str]) -> int:
    fs, p = filesystem(path)
    return int(fs.size(p))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` whole: a temporary sibling and a rename locally (parents are created), one
    PUT on an object store (:func:`store.objects.write_object`, the project's one writer)."""
    write_bytes(path, data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, **kw: Any) -> None:
    """Pretty JSON (sorted keys unless ``sort_keys=False``), newline-terminated."""
    kw = {"indent": 2, "sort_keys": True, **kw}
    atomic_write_text(path, json.dumps(obj, **kw) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` that never leaves a partial file behind."""
    import torch  # here, not at the top: ``distill --help`` and the config need no torch

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
        data = read_bytes(path)
    except FileNotFoundError:
        raise
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only refusals all mean "not a usable torch file"
        raise ValueError(torch_load_reason(e)) from e
