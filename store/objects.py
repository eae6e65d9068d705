"""Plain objects next to the Zarr arrays: done records and claims, on a local disk or any fsspec filesystem.

Three operations need more than zarr's chunk I/O: a whole-object write that readers never see half
done (a temporary name and a rename locally; one PUT on object stores), an *exclusive* create that
exactly one of many racing writers wins (``os.link`` locally; a conditional PUT, fsspec's
``mode="create"``, on S3/GCS), and one listing of a prefix. :class:`Objects` offers them for the
folder a logit store lives in, whatever the scheme.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec


@dataclass(frozen=True)
class Objects:
    """Keys (``"done/train/e000001-s000002.json"``) under ``root`` on ``fs`` (None: the local disk)."""

    root: str
    fs: Any = None

    @property
    def local(self) -> bool:
        return self.fs is None

    def path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> bool:
        """Write ``data`` whole under ``key``. With ``exclusive`` the write happens only if ``key`` does not
        exist yet, atomically: returns False when another writer got there first."""
        if not self.local:
            try:
                self.fs.pipe_file(self.path(key), data, mode="create" if exclusive else "overwrite")
            except FileExistsError:
                return False
            return True
        path = Path(self.path(key))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if not exclusive:
                os.replace(tmp, path)
                return True
            try:
                os.link(tmp, path)  # fails if path exists: exactly one racing writer wins
            except FileExistsError:
                return False
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        try:
            if self.local:
                return Path(self.path(key)).read_bytes()
            return self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        """Remove an object; a missing one is fine."""
        try:
            if self.local:
                Path(self.path(key)).unlink()
            else:
                self.fs.rm_file(self.path(key))
        except FileNotFoundError:
            pass

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Every object under ``prefix`` with its size in bytes (one listing)."""
        base = self.path(prefix).rstrip("/") if prefix else self.root.rstrip("/")
        if self.local:
            out = {}
            for d, _, files in os.walk(base):
                for f in files:
                    if not f.endswith(".tmp"):
                        full = os.path.join(d, f)
                        out[os.path.relpath(full, self.root).replace(os.sep, "/")] = os.path.getsize(full)
            return out
        root = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        self.fs.invalidate_cache(base)
        found = self.fs.find(base, detail=True)
        return {p[len(root):]: int(info.get("size") or 0) for p, info in found.items() if p.startswith(root)}

    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (one listing, recursive), relative to the root, sorted."""
        base = self.path(prefix).rstrip("/")
        if self.local:
            if not os.path.isdir(base):
                return []
            found = [os.path.relpath(os.path.join(d, f), self.root)
                     for d, _, files in os.walk(base) for f in files if not f.endswith(".tmp")]
            return sorted(p.replace(os.sep, "/") for p in found)
        self.fs.invalidate_cache(base)  # other writers add records and claims: never list from a cache
        try:
            paths = self.fs.find(base)
        except FileNotFoundError:
            return []
        root = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        return sorted(p[len(root):] for p in paths if p.startswith(root))


def objects_at(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Objects:
    """The :class:`Objects` of a local path or an fsspec URL (``file://`` counts as local)."""
    text = str(url)
    if "://" not in text or text.startswith("file://"):
        return Objects(str(Path(text.removeprefix("file://")).absolute()))
    fs, root = fsspec.core.url_to_fs(text, **(storage_options or {}))
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
