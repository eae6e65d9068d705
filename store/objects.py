"""The project's one I/O layer: whole objects on a local disk or any fsspec filesystem (``s3://``, ``gs://``,
``memory://``), by path or, for the files beside a logit store's arrays, by key (:class:`Objects`).

Reading, listing and deleting go through fsspec for every scheme (its local filesystem included). Writing
has one local branch, because fsspec's local ``pipe_file`` writes in place: a whole-object write that
readers never see half done is a temporary sibling, an fsync and a rename locally, and one PUT on an object
store; an *exclusive* create that exactly one of many racing writers wins is ``os.link`` of such a
temporary file locally and a conditional PUT (fsspec's ``mode="create"``) on S3/GCS. A failed write names
the file it was for (a full disk's ``write()`` error carries no file name of its own) and leaves no
temporary file behind.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

LOCAL = LocalFileSystem()


def is_url(path: str | os.PathLike[str]) -> bool:
    """A URL of a filesystem other than the local one (``file://`` paths are local)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def local_path(path: str | os.PathLike[str]) -> str:
    """A local path without its ``file://`` prefix."""
    return str(path).removeprefix("file://")


def filesystem(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(the fsspec filesystem, the path on it) of a local path or a URL; a URL's filesystem takes fsspec's
    per-scheme defaults (see ``pipeline.core.files.use_storage_options``) unless ``storage_options`` are given."""
    if not is_url(path):
        return LOCAL, str(Path(local_path(path)).absolute())
    return fsspec.core.url_to_fs(str(path), **(storage_options or {}))


def _named(e: OSError, path: str) -> OSError:
    return OSError(e.errno, e.strerror or str(e), path)


def _write_local(path: str, data: bytes | memoryview, exclusive: bool) -> bool:
    """A temporary sibling, flushed to disk, then renamed (or, ``exclusive``, hard-linked) into place."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise _named(e, path) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not exclusive:
            os.replace(tmp, target)
            return True
        try:
            os.link(tmp, target)  # fails if the target exists: exactly one racing writer wins
        except FileExistsError:
            return False
        return True
    except OSError as e:  # a full disk or a denied write names the file it was for
        raise _named(e, path) from e
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_object(fs: Any, path: str, data: bytes | memoryview, *, exclusive: bool = False) -> bool:
    """Write ``data`` whole to ``path`` on ``fs`` (parents are created locally). With ``exclusive`` the write
    happens only if nothing is there yet, atomically: False when another writer got there first."""
    if isinstance(fs, LocalFileSystem):
        return _write_local(path, data, exclusive)
    try:
        fs.pipe_file(path, bytes(data), mode="create" if exclusive else "overwrite")
    except FileExistsError:
        return False
    except OSError as e:
        if exclusive and "ConditionalRequestConflict" in str(e):  # S3's 409: another conditional write raced ours
            return False
        raise _named(e, f"{fs.unstrip_protocol(path)}") from e
    return True


def write_bytes(path: str | os.PathLike[str], data: bytes | memoryview) -> None:
    """Write ``data`` whole to a local path or a URL (see :func:`write_object`)."""
    fs, p = filesystem(path)
    write_object(fs, p, data)


def _whole(fs: Any, path: str) -> bytes:
    """A whole object in one GET (a plain ``cat_file`` asks an object store for its size first)."""
    return fs.cat_file(path, start=0)


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    fs, p = filesystem(path)
    return _whole(fs, p)


def read_range(path: str | os.PathLike[str], start: int, end: int) -> bytes:
    """Bytes ``start .. end - 1`` of a file (one ranged GET on an object store); fewer if the file is shorter."""
    fs, p = filesystem(path)
    return fs.cat_file(p, start=start, end=end)


@dataclass(frozen=True)
class Objects:
    """Keys (``"done/train/e000001-s000002.json"``) under ``root`` on ``fs``."""

    root: str
    fs: Any = LOCAL

    @property
    def local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> bool:
        """Write ``data`` whole under ``key`` (see :func:`write_object`)."""
        return write_object(self.fs, self.path(key), data, exclusive=exclusive)

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        try:
            return _whole(self.fs, self.path(key))
        except FileNotFoundError:
            return None

    def get_range(self, key: str, start: int, end: int | None = None) -> bytes | None:
        """Bytes ``start .. end - 1`` of an object (a negative ``start``: its last ``-start`` bytes), one ranged
        GET; None when there is no object."""
        try:
            return self.fs.cat_file(self.path(key), start=start, end=end)
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        """Remove an object; a missing one is fine."""
        try:
            self.fs.rm_file(self.path(key))
        except FileNotFoundError:
            pass

    def _listing(self, prefix: str) -> dict[str, dict]:
        """Every object under ``prefix`` (relative to the root) with fsspec's details, in one listing never served
        from a cache (other writers add records and claims); a local writer's temporary files are left out."""
        base = self.path(prefix).rstrip("/") if prefix else self.root.rstrip("/")
        self.fs.invalidate_cache(base)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        root = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        return {p[len(root):]: info for p, info in found.items() if p.startswith(root) and not p.endswith(".tmp")}

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Every object under ``prefix`` with its size in bytes, from one listing."""
        return {key: int(info.get("size") or 0) for key, info in self._listing(prefix).items()}

    def versions(self, prefix: str) -> dict[str, str]:
        """Every object under ``prefix`` with what changes whenever it is rewritten (an object store's ETag; a local
        file's modification time and inode), from one listing."""
        return {key: str(info.get("ETag") or info.get("etag") or f"{info.get('mtime')}:{info.get('ino')}")
                for key, info in self._listing(prefix).items()}

    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (one listing, recursive), relative to the root, sorted."""
        return sorted(self.sizes(prefix))


def objects_at(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Objects:
    """The :class:`Objects` of a local path or an fsspec URL (``file://`` counts as local)."""
    fs, root = filesystem(url, storage_options)
    return Objects(root, fs)


def objects_of(group: Any) -> Objects:
    """The :class:`Objects` of the folder a zarr group's store lives in (local, fsspec or memory)."""
    st = group.store
    if hasattr(st, "fs") and hasattr(st, "path"):  # zarr's FsspecStore: its filesystem is zarr's asynchronous one
        opts = {k: v for k, v in st.fs.storage_options.items() if k not in ("asynchronous", "loop")}
        fs = fsspec.filesystem(st.fs.protocol[0] if isinstance(st.fs.protocol, tuple) else st.fs.protocol, **opts)
        return Objects(st.path, fs)
    return Objects(str(Path(st.root).absolute()))


def object_stats(group: Any) -> tuple[int, int]:
    """(objects, bytes) of the whole store a zarr group is the root of: one listing, for any filesystem."""
    sizes = objects_of(group).sizes()
    return len(sizes), sum(sizes.values())
