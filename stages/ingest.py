"""Ingest: turn the configured images into WebDataset shards and a manifest (the format lives in
pipeline/data/shards.py).

Each split's samples are shuffled once with the config seed (its own stream per split), cut to
data.train_limit / data.val_limit, and given dense indices 0..N-1 in shard order. Everything is
written into a temporary sibling folder that replaces data.shards only when complete, so a crash
never leaves a half-written dataset behind. A rerun with the same data config, seed and unchanged
input files does nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from pipeline.core.config import Config, canonical_hash
from pipeline.core.files import atomic_write_json, is_url, location, sha256_file, use_storage_options
from pipeline.core.progress import progress_bar
from pipeline.data.freshness import shard_files_present, unchanged, verify_shards, write_stamp
from pipeline.data.labels import config_layer
from pipeline.data.noise import draw_flips, load_confusion, matrix_digest
from pipeline.data.shard_index import build_index, index_name, write_index
from pipeline.data.shards import (
    MANIFEST_NAME,
    SPLITS,
    Manifest,
    ShardError,
    data_config_hash,
    encode_sample,
    load_manifest,
    shard_name,
    write_manifest,
)
from pipeline.data.sources import CorruptImage, IngestError, Record, Source, read_source
from store.claims import pid_alive

__all__ = ["IngestError", "run", "shuffle_records", "input_key"]

# Seed stream of each split: the permutation of split s is drawn from
# default_rng(SeedSequence(seed, spawn_key=(SPLIT_STREAM[s],))).
SPLIT_STREAM = {"train": 0, "val": 1}
_SHARD_FILE = re.compile(r"^(train|val)-\d{6}\.(tar|idx)$")


def input_key(source: Source) -> str:
    return canonical_hash([list(x) for x in source.inputs])


def shuffle_records(records: list[Record], seed: int, split: str, limit: int | None) -> list[Record]:
    """The seeded permutation of a split's records, cut to ``limit`` after the shuffle."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLIT_STREAM[split],)))
    order = rng.permutation(len(records))
    if limit is not None:
        order = order[:limit]
    return [records[i] for i in order.tolist()]


def _current(out: Path, config_hash: str, key: str, rehash: bool) -> Manifest | None:
    """The existing manifest when it is whole and was made from this config and these inputs: its files unchanged
    since ingest stamped them (one listing), or, when they may have changed (or ``rehash``), re-hashed."""
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        m = load_manifest(out)
    except ShardError:
        return None
    if m.source.get("config_hash") != config_hash or m.source.get("input_key") != key:
        return None
    if set(m.splits) != set(SPLITS) or not shard_files_present(m):
        return None
    if not rehash and unchanged(m):
        return m
    try:  # the shards are what the manifest says, to the byte (a full read: sizes alone miss a swapped image)
        for split in SPLITS:
            verify_shards(m, split)
    except ShardError as e:
        print(f"shards out of date: {e}")
        return None
    write_stamp(m)  # re-hashed: the next check lists instead
    return m


def _shard_entry(tmp: Path, split: str, n: int, start: int, end: int) -> dict[str, Any]:
    """A finished shard's manifest entry; its offset index is written beside it."""
    name = shard_name(split, n)
    path, idx = tmp / name, tmp / index_name(name)
    write_index(build_index(path), idx)
    return {"file": name, "start": start, "end": end, "count": end - start, "size": path.stat().st_size,
            "sha256": sha256_file(path), "index": idx.name, "index_sha256": sha256_file(idx)}


def noise_matrix(config: Config, num_classes: int) -> np.ndarray | None:
    """The confusion matrix confusable noise draws from (None: uniform noise, or none)."""
    data = config.data
    if data.label_noise == 0 or data.label_noise_kind == "uniform":
        return None
    return load_confusion(data.label_noise_confusion, num_classes)


def plant_label_noise(records: list[Record], config: Config, num_classes: int,
                      confusion: np.ndarray | None) -> dict[int, int]:
    """Positions of a seeded ``data.label_noise`` fraction of the records, each with the class it is flipped to
    (pipeline.data.noise)."""
    labels = np.array([r.label for r in records], dtype=np.int64)
    return draw_flips(labels, config.data.label_noise, config.seed, num_classes, confusion)


def _write_split(tmp: Path, split: str, records: list[Record], shard_size: int, allow_corrupt: bool,
                 progress: bool, flips: dict[int, int] | None = None) -> dict[str, Any]:
    """A split's samples into shards of ``shard_size`` (webdataset's ShardWriter rolls them over), each shard's
    manifest entry and offset index written as it closes."""
    shards: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    planted: list[dict[str, int]] = []
    index, flips = 0, flips or {}

    def closed(fname: str) -> None:
        start = shards[-1]["end"] if shards else 0
        if index > start:
            shards.append(_shard_entry(tmp, split, len(shards), start, index))
        else:  # the writer opens its first shard before any sample: nothing usable was written
            Path(fname).unlink(missing_ok=True)

    writer = wds.ShardWriter(str(tmp / f"{split}-%06d.tar"), maxcount=shard_size, maxsize=float("inf"), post=closed,
                             verbose=0, encoder=False, mtime=0)
    with progress_bar(len(records), f"ingest {split}", "img", progress) as bar:
        try:
            for pos, rec in enumerate(records):
                try:
                    ext, data = rec.load()
                except CorruptImage as e:
                    if not allow_corrupt:
                        raise IngestError(f"{e} (set data.allow_corrupt: true to skip such files)") from e
                    skipped.append({"path": rec.name, "reason": e.reason})
                    bar.update(1)
                    continue
                if pos in flips:
                    planted.append({"index": index, "true": rec.label, "given": flips[pos]})
                writer.write(encode_sample(index, flips.get(pos, rec.label), ext, data))
                index += 1
                bar.update(1)
            writer.close()
        except OSError as e:  # a full disk: the failed write() names no file, so name the shard
            raise OSError(e.errno, e.strerror or str(e), e.filename or writer.fname) from e
        finally:
            if getattr(writer, "tarstream", None) is not None:  # an error mid-shard: release the file; tmp is removed
                writer.post = None
                with contextlib.suppress(Exception):
                    writer.close()
    return {"count": index, "shards": shards, "skipped": skipped, **({"planted": planted} if planted else {})}


def apply_label_layer(manifest: Manifest, relabel: str | None, *, stamp: bool = True) -> Manifest:
    """The manifest with ``data.relabel``'s label layer, rewritten (only the manifest) when that changes it: the
    whole file is checked first, so a bad row changes nothing."""
    layer = config_layer(manifest, relabel)
    if layer == manifest.split("train").relabel:
        return manifest
    m = manifest.with_relabel(layer)
    atomic_write_json(m.file(MANIFEST_NAME), m.to_dict(), ensure_ascii=False)
    if stamp:
        write_stamp(m)
    dropped = sum(r.label is None for r in layer)
    print(f"label layer: {len(layer) - dropped} label(s) corrected, {dropped} dropped, from {relabel} "
          f"(the manifest only; the shards are unchanged)")
    return m


def _remove_stale(out: Path) -> None:
    """Remove tmp/old siblings left by ingest processes that no longer run (e.g. killed ones)."""
    if not out.parent.is_dir():
        return
    pat = re.compile(re.escape(out.name) + r"\.(tmp|old)-(\d+)$")
    for entry in out.parent.iterdir():
        m = pat.match(entry.name)
        if m and int(m.group(2)) != os.getpid() and not pid_alive(int(m.group(2))):
            shutil.rmtree(entry, ignore_errors=True)


def _check_replaceable(out) -> None:
    """Refuse to replace a folder (or an object-store prefix) that does not look like a shards folder."""
    if not is_url(out) and not out.exists() and not out.is_symlink():
        return
    if not is_url(out) and not out.is_dir():
        raise IngestError(f"{out}: data.shards exists and is not a folder")
    ours = (MANIFEST_NAME, f".{MANIFEST_NAME}.")  # the manifest and its temporary file
    names = [e.name for e in out.iterdir()] if not is_url(out) or out.exists() else []
    foreign = sorted(n for n in names if not (n.startswith(ours) or _SHARD_FILE.match(n)))
    if foreign:
        raise IngestError(
            f"{out}: data.shards exists and holds files that are not shards ({', '.join(foreign[:5])}); "
            "remove it or point data.shards elsewhere"
        )


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists() or out.is_symlink():
        aside = out.with_name(f"{out.name}.old-{os.getpid()}")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(out, aside)
        os.replace(tmp, out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _upload(tmp: Path, out) -> None:
    """Put a finished shards folder where the URL says: the old manifest goes first (so no manifest ever
    lists shards that are being replaced), then every shard and index, the manifest last; shard files of an
    earlier ingest that the new one does not list are removed."""
    fs, root = out.fs, out.path.rstrip("/")
    if fs.exists(f"{root}/{MANIFEST_NAME}"):
        fs.rm_file(f"{root}/{MANIFEST_NAME}")
    names = sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST_NAME)
    for name in names:
        fs.put_file(str(tmp / name), f"{root}/{name}")
    for old in ({e.name for e in out.iterdir()} if out.exists() else set()) - set(names) - {MANIFEST_NAME}:
        if _SHARD_FILE.match(old):
            fs.rm_file(f"{root}/{old}")
    fs.put_file(str(tmp / MANIFEST_NAME), f"{root}/{MANIFEST_NAME}")


def _write_all(tmp: Path, config: Config, source: Source, splits: dict[str, list[Record]], config_hash: str,
               key: str, progress: bool) -> Manifest:
    """Every split's shards, their indexes and the manifest, into the local folder ``tmp``."""
    data = config.data
    c = len(source.classes)
    flips = {"train": plant_label_noise(splits["train"], config, c, noise_matrix(config, c))}
    written = {
        split: _write_split(tmp, split, recs, data.shard_size, data.allow_corrupt, progress, flips.get(split))
        for split, recs in splits.items()
    }
    roots = {"train": data.train_root, "val": data.val_root} if data.source == "imagefolder" else {}
    for split, info in written.items():
        if info["count"] == 0:
            raise IngestError(f"{roots.get(split, data.root)}: no usable {split} samples")
    return write_manifest(tmp, {
        "classes": source.classes,
        "num_classes": len(source.classes),
        "source": {"kind": source.kind, "config_hash": config_hash, "input_key": key},
        "splits": written,
        "image": {"channels_hint": source.channels_hint},
    })


def _staging(out) -> Path:
    """A fresh local folder to write into: a sibling of a local ``out`` (renamed into place when complete),
    a temporary folder for a URL (uploaded when complete)."""
    if is_url(out):
        return Path(tempfile.mkdtemp(prefix="distill-ingest-"))
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def run(config: Config, *, progress: bool = True, rehash: bool = False) -> Path:
    """Ingest ``config.data`` into shards + manifest; returns the shards folder (absolute, or the URL). Shards
    already there are kept when their stamp says they are unchanged (``rehash``: re-hash them all instead)."""
    use_storage_options(config.storage_options)
    data = config.data
    out = location(data.shards) if is_url(data.shards) else Path(str(data.shards)).absolute()
    t0 = time.perf_counter()
    source = read_source(data)
    matrix = noise_matrix(config, len(source.classes))
    config_hash = data_config_hash(config) if matrix is None else canonical_hash([data_config_hash(config),
                                                                                 matrix_digest(matrix)])
    key = input_key(source)

    current = _current(out, config_hash, key, rehash)
    if current is not None:
        current = apply_label_layer(current, data.relabel)
        print(f"shards up to date (fingerprint {current.fingerprint[:16]}) in {out}")
        return out

    _check_replaceable(out)
    splits = {
        split: shuffle_records(source.splits[split], config.seed, split, limit)
        for split, limit in (("train", data.train_limit), ("val", data.val_limit))
    }
    tmp = _staging(out)
    try:
        manifest = _write_all(tmp, config, source, splits, config_hash, key, progress)
        manifest = apply_label_layer(manifest, data.relabel, stamp=False)
        _upload(tmp, out) if is_url(out) else _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone by now locally: renamed into place
    write_stamp(load_manifest(out))

    counts = " / ".join(f"{manifest.count(s)} {s}" for s in SPLITS)
    n_shards = sum(len(manifest.shards(s)) for s in SPLITS)
    print(
        f"wrote {counts} samples in {n_shards} shards to {out} "
        f"(fingerprint {manifest.fingerprint[:16]}, {time.perf_counter() - t0:.1f}s)"
    )
    for s in SPLITS:
        skipped = manifest.split(s).skipped
        if skipped:
            print(f"skipped {len(skipped)} corrupt {s} image(s), listed in {out / MANIFEST_NAME}")
    planted = manifest.split("train").planted
    if planted:
        print(f"planted {len(planted)} wrong train labels on purpose (data.label_noise), listed in "
              f"{out / MANIFEST_NAME}")
    return out
