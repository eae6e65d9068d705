"""Creating and opening a logit store, safely under many writers and on any filesystem.

Creation is race-free: the root metadata (format, spec, provenance) is written with an exclusive
create, so of many processes starting on one new path exactly one creates the store and the others
find it and check that it is theirs; arrays are created idempotently (an array another process
created meanwhile is checked, not overwritten). Re-creating a store of the same spec and provenance
reopens it (resume); a store of another run is refused by ProvenanceMismatch naming every field.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.errors import ContainsArrayError, ContainsGroupError

from store.layout import FORMAT, SPEC_IDENTITY, StoreSpec, array_layout, codecs_for, no_data, validate_spec
from store.objects import is_url, local_path, objects_at
from store.provenance import IDENTITY_FIELDS, StoreError, check_identity, differences, mismatch_error, normalize


def _open(path: str | Path, mode: str, storage_options: dict[str, Any] | None, **kw: Any) -> zarr.Group:
    """zarr's group at a local path (a Path) or a URL (a string, through fsspec)."""
    if not is_url(path):  # zarr_format 3: no probing for version 2 metadata (three requests each on a bucket)
        return zarr.open_group(Path(local_path(path)), mode=mode, zarr_format=3, **kw)
    opts = {"storage_options": storage_options} if storage_options else {}
    return zarr.open_group(str(path), mode=mode, zarr_format=3, **opts, **kw)


def finalize(path: str | Path, storage_options: dict[str, Any] | None = None) -> None:
    """Consolidate the metadata, so one read opens the store (idempotent: any writer may call it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        # the done records and claims beside the arrays are plain objects, not zarr nodes
        warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component")
        zarr.consolidate_metadata(_open(path, "r+", storage_options, use_consolidated=False).store)


def _check_attrs(path: str | Path, attrs: dict[str, Any], spec: StoreSpec, prov: dict[str, Any]) -> None:
    if attrs.get("format") != FORMAT or "spec" not in attrs or "provenance" not in attrs:
        raise StoreError(
            f"{path}: Zarr group exists but is not a logit store of format {FORMAT} "
            f"(format={attrs.get('format')!r}); use another path or delete it"
        )
    stored_prov, stored_spec, fresh_spec = attrs["provenance"], attrs["spec"], spec.to_dict()
    fields = [f for f in IDENTITY_FIELDS if f in prov or f in stored_prov]
    diffs = differences(stored_prov, prov, fields)
    diffs += [(f"spec.{f}", stored_spec.get(f), fresh_spec[f]) for f in SPEC_IDENTITY
              if stored_spec.get(f) != fresh_spec[f]]
    if diffs:
        raise mismatch_error(str(path), diffs, stored_prov.get("aug"), prov.get("aug"))


def _ensure_arrays(root: zarr.Group, spec: StoreSpec) -> bool:
    """Create missing arrays (a creation cut short, or racing with another writer's); check existing ones."""
    created = False
    for name, a in array_layout(spec).items():
        try:
            root.create_array(name, shape=a.shape, chunks=a.chunks, shards=a.shards, dtype=a.dtype,
                              fill_value=no_data(a.dtype), **codecs_for(spec.codec, spec.level, a.holds, a.dtype))
            created = True
            continue
        except (ContainsArrayError, ContainsGroupError):
            arr = root[name]
        if tuple(arr.shape) != a.shape or tuple(arr.chunks) != a.chunks or np.dtype(arr.dtype) != a.dtype:
            raise StoreError(
                f"{root.store}: array {name} has shape {arr.shape}, chunks {arr.chunks}, dtype {arr.dtype}; "
                f"the spec needs {a.shape}, {a.chunks}, {a.dtype}"
            )
    return created


def _write_hierarchy(objs: Any, spec: StoreSpec, attributes: dict[str, Any]) -> None:
    """The creator's way: every node's metadata made in memory (zarr's own create_array, consolidated), then put
    whole, one object each, the root (with the consolidated metadata) last. On an object store this costs a PUT per
    node, not zarr's probing of every path (a HEAD and a listing each) before it creates a node."""
    docs: dict[str, Any] = {}
    mem = zarr.storage.MemoryStore(docs)
    root = zarr.open_group(mem, mode="w", zarr_format=3, attributes=attributes)
    for name, a in array_layout(spec).items():
        root.create_array(name, shape=a.shape, chunks=a.chunks, shards=a.shards, dtype=a.dtype,
                          fill_value=no_data(a.dtype), **codecs_for(spec.codec, spec.level, a.holds, a.dtype))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        zarr.consolidate_metadata(mem)
    for key in sorted(docs, key=lambda k: k == "zarr.json"):
        objs.put(key, docs[key].to_bytes())


def _foreign(root: Path) -> bool:
    """A folder that holds files but no store: not ours to write into. (Another writer creating the store at this
    moment has at most its temporary file there before ``zarr.json`` appears.)"""
    if not root.is_dir():
        return False
    entries = [e for e in root.iterdir() if not (e.name.startswith(".") and e.name.endswith((".tmp", ".partial")))]
    return bool(entries) and not (root / "zarr.json").exists()


def create_store(path: str | Path, spec: StoreSpec, provenance: dict[str, Any],
                 storage_options: dict[str, Any] | None = None) -> zarr.Group:
    """Create the store, or reopen it (mode "r+") for a resumed run of the same spec and provenance."""
    validate_spec(spec)
    prov = normalize(provenance)
    objs = objects_at(path, storage_options)
    if objs.local and _foreign(Path(objs.root)):
        raise StoreError(f"{path}: a non-empty directory that is not a Zarr store; refusing to write into it")
    meta = {"zarr_format": 3, "node_type": "group",
            "attributes": {"format": FORMAT, "spec": spec.to_dict(), "provenance": prov}}
    # a store that exists is only read (it may be complete on read-only storage); a new one is created by exactly one
    # of the writers racing for it
    created = objs.get("zarr.json") is None and objs.put("zarr.json", json.dumps(meta).encode(), exclusive=True)
    if created:
        _write_hierarchy(objs, spec, meta["attributes"])
        return _open(path, "r+", storage_options, use_consolidated=True)
    root = _await_creator(path, storage_options)  # another writer's store: its consolidated metadata says it all
    attrs = root.attrs.asdict()
    _check_attrs(path, attrs, spec, prov)
    stored = StoreSpec.from_dict(attrs["spec"])
    if all(name in root for name in array_layout(stored)):
        return root
    root = _open(path, "r+", storage_options, use_consolidated=False)  # a creation cut short: what is missing
    _ensure_arrays(root, stored)
    finalize(path, storage_options)
    return _open(path, "r+", storage_options, use_consolidated=True)


def _await_creator(path: str | Path, storage_options: dict[str, Any] | None, wait: float = 60.0) -> zarr.Group:
    """The store another writer is creating, once its root carries the consolidated metadata (the creator writes it
    last), or after ``wait`` seconds (a creator that died: the caller completes the store)."""
    deadline = time.monotonic() + wait
    while True:
        root = _open(path, "r+", storage_options, use_consolidated=None)
        if root.metadata.consolidated_metadata is not None or time.monotonic() > deadline:
            return root
        time.sleep(0.5)


def open_store(path: str | Path, expected: dict[str, Any] | None = None,
               storage_options: dict[str, Any] | None = None) -> zarr.Group:
    """Open read-only; with ``expected``, refuse a store written for another run (ProvenanceMismatch).

    Each IDENTITY field present in ``expected`` is compared; every differing one is named with both
    values. A missing path, a non-store or an incomplete store raises StoreError.
    """
    try:
        root = _open(path, "r", storage_options)
    except FileNotFoundError:
        objs = objects_at(path, storage_options)
        if objs.fs.exists(objs.root):
            raise StoreError(f"logit store {path}: exists but is not a Zarr store (no zarr.json); "
                             "is it the right path?") from None
        raise StoreError(f"logit store {path}: not found (run the teacher stage to create it)") from None
    except Exception as e:  # corrupt metadata and the like
        raise StoreError(f"logit store {path}: cannot be opened as a Zarr v3 group: {e}") from e
    attrs = root.attrs.asdict()
    if attrs.get("format") != FORMAT or "spec" not in attrs or "provenance" not in attrs:
        raise StoreError(
            f"logit store {path}: not a logit store of format {FORMAT} (format={attrs.get('format')!r}"
            f"{'; written by an older version: run `distill teacher` into a new path' if attrs.get('format') else ''})"
        )
    missing = [name for name in array_layout(StoreSpec.from_dict(attrs["spec"])) if name not in root]
    if missing:
        raise StoreError(f"logit store {path}: incomplete, missing arrays {missing} (creation was cut short?)")
    if expected is not None:
        check_identity(str(path), attrs["provenance"], expected)
    return root


def annotate(path: str | Path, field: str, value: Any, storage_options: dict[str, Any] | None = None) -> None:
    """Add or replace one informational provenance field of an existing store (never an identity field: those
    say what the targets are), and consolidate the metadata again."""
    if field in IDENTITY_FIELDS:
        raise StoreError(f"logit store {path}: provenance field {field!r} identifies the targets; it is never changed")
    root = _open(path, "r+", storage_options, use_consolidated=False)
    root.attrs["provenance"] = {**root.attrs.asdict()["provenance"], field: normalize(value)}
    finalize(path, storage_options)
