"""Whether a shards folder still is what its manifest says, cheaply: ImageNet's shards are 150 GB.

Ingest records in this machine's cache (``$DISTILL_CACHE``, else ``$XDG_CACHE_HOME/deit-distill`` or
``~/.cache/deit-distill``: outside the shards folder, which stays byte-identical across reruns) the size and the
version of every file it wrote: an object store's ETag, a local file's modification time and inode. The next
ingest lists the folder once and compares: the same sizes and versions mean the same bytes, and nothing is read.
Anything else (or ``--rehash``) re-hashes every shard against the manifest's sha256, as before, and says which
file differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from pipeline.core.files import atomic_write_json, sha256_file, size
from pipeline.data.shards import MANIFEST_NAME, Manifest, ShardError
from store.objects import filesystem


def stamp_path(manifest: Manifest) -> str:
    """This machine's stamp of a shards folder (by its absolute path or URL)."""
    cache = os.environ.get("DISTILL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "deit-distill")
    name = hashlib.sha256(manifest.root.rstrip("/").encode()).hexdigest()[:24]
    return os.path.join(cache, "stamps", f"{name}.json")


def listing(manifest: Manifest) -> dict[str, list[Any]]:
    """Every file of the shards folder: name -> [size, version], from one listing."""
    fs, root = filesystem(manifest.root)
    fs.invalidate_cache(root)
    found = fs.find(root, detail=True)
    out = {}
    for path, info in found.items():
        version = info.get("ETag") or info.get("etag") or f"{info.get('mtime')}:{info.get('ino')}"
        out[path.rsplit("/", 1)[-1]] = [int(info.get("size") or 0), str(version)]
    return out


def write_stamp(manifest: Manifest) -> None:
    """Record what the shards folder holds now (after ingest wrote it)."""
    atomic_write_json(stamp_path(manifest), {"fingerprint": manifest.fingerprint, "files": listing(manifest)})


def unchanged(manifest: Manifest) -> bool:
    """The folder lists exactly the files ingest stamped, with their sizes and versions (one listing, no reads)."""
    try:
        with open(stamp_path(manifest)) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return False
    files = listing(manifest)
    wanted = {MANIFEST_NAME, *(s.file for sp in manifest.splits.values() for s in sp.shards),
              *(s.index for sp in manifest.splits.values() for s in sp.shards)}
    return recorded.get("fingerprint") == manifest.fingerprint and all(
        name in files and files[name] == recorded["files"].get(name) for name in wanted)


def verify_shards(manifest: Manifest, split: str) -> None:
    """Re-hash every shard file of the split (and its index); raises ShardError naming the first bad one."""
    for s, path in zip(manifest.shards(split), manifest.shard_paths(split), strict=True):
        try:
            n = size(path)
        except FileNotFoundError:
            raise ShardError(f"{path}: shard file missing") from None
        if n != s.size:
            raise ShardError(f"{path}: size {n} bytes, manifest says {s.size}")
        digest = sha256_file(path)
        if digest != s.sha256:
            raise ShardError(f"{path}: sha256 {digest} does not match the manifest ({s.sha256})")
        index = manifest.file(s.index)
        try:
            ok = sha256_file(index) == s.index_sha256
        except FileNotFoundError:
            ok = False
        if not ok:
            raise ShardError(f"{index}: shard index missing or not the one the manifest lists")


def shard_files_present(manifest: Manifest) -> bool:
    """Every shard of every split exists with its recorded size (a cheap completeness check)."""
    for split in manifest.splits:
        for s, path in zip(manifest.shards(split), manifest.shard_paths(split), strict=True):
            try:
                if size(path) != s.size:
                    return False
            except OSError:
                return False
    return True
