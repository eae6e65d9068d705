"""How the ``distill`` command reports a failure: one line naming the file, field, value or endpoint, exit code 1,
never a traceback (``distill --debug`` or ``DISTILL_DEBUG=1`` shows it)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import click

from pipeline.core.errors import DistillError


def _known_errors() -> tuple[type[BaseException], ...]:
    """The project's own error types, and the operating system's (a full disk, a denied permission, a
    read-only store). The store's are imported only when an error is being matched, so --help stays fast."""
    from store import StoreError

    return (DistillError, StoreError, OSError)


def _message(e: BaseException) -> str:
    """The error in a line or a paragraph: an OS error as "path: reason"; an error re-raised from a DataLoader
    worker (whose text carries the worker's traceback) as its original message."""
    if isinstance(e, OSError) and not isinstance(e, DistillError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    text = str(e)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and "." in last.split(": ", 1)[0] else last
    return text


STORAGE_CLIENTS = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google")
"""Packages whose errors mean an object store did not answer (a server that went away, a refused connection):
fsspec retries what it can, then the run ends with one line naming the endpoint and the object."""


def _storage_error(e: BaseException) -> str | None:
    """The one-line message of an object store that did not answer, from anywhere in ``e``'s chain (or from the
    text of an error a DataLoader worker re-raised); None for anything else."""
    seen: BaseException | None = e
    while seen is not None:
        if type(seen).__module__.split(".")[0] in STORAGE_CLIENTS:
            first = (str(seen).strip().splitlines() or [type(seen).__name__])[0]
            return f"object storage did not answer ({type(seen).__name__}): {first}"
        seen = seen.__cause__ or seen.__context__
    text = str(e)
    if "Original Traceback" in text and any(f"{m}." in text for m in STORAGE_CLIENTS):
        return f"object storage did not answer (in a DataLoader worker): {_message(e)}"
    return None


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the project's own errors (and OS errors, and an object store that does not answer) into a clean message
    and exit code 1; with --debug or DISTILL_DEBUG=1 the traceback is shown instead."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if os.environ.get("DISTILL_DEBUG", "") not in ("", "0"):
                raise
            storage = _storage_error(e)
            if storage is not None:
                raise click.ClickException(storage) from e
            if isinstance(e, _known_errors()):
                raise click.ClickException(_message(e)) from e
            raise

    return wrapper


