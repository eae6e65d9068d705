"""A human summary of a logit store: what it holds, how complete it is, what it costs on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from store.create import open_store
from store.layout import array_layout, spec_of
from store.objects import object_stats
from store.reader import done_mask, packed_epochs, val_done_mask


def _human(n: int) -> str:
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    raise AssertionError  # unreachable


def describe(path: str | Path) -> str:
    """Path, format, sizes, dtypes and shapes, completion per epoch, val, bytes on disk, codec, provenance."""
    root = open_store(path)
    attrs = root.attrs.asdict()
    spec = spec_of(root)
    done = done_mask(root)
    vdone = val_done_mask(root)
    full = [int(e) for e in np.flatnonzero(done.all(axis=1))]
    lines = [
        f"logit store: {path}",
        f"format: {attrs.get('format')}",
        f"train: N={spec.n_train} in {spec.n_shards} shards of {spec.shard_size}; "
        f"val: N={spec.n_val} in {spec.n_val_shards} shards",
        f"E={spec.epochs} stored epochs, K={spec.topk} requested, k={spec.k} stored "
        f"({'dense' if spec.dense else 'top-k'}), C={spec.num_classes} classes",
        f"epochs complete: {len(full)}/{spec.epochs} (units done {int(done.sum())}/{done.size}); "
        f"fully done epochs: {full if full else 'none'}",
        f"val done: {int(vdone.sum())}/{vdone.size} shards",
    ]
    partial = [int(e) for e in np.flatnonzero(done.any(axis=1) & ~done.all(axis=1))]
    if partial:
        lines.append(
            "partial epochs: " + ", ".join(f"{e} ({int(done[e].sum())}/{done.shape[1]})" for e in partial)
        )
    objects, nbytes = object_stats(root)
    sizes = np.array([b - a for a, b in spec.train_ranges])
    rows = max(int((done * sizes).sum()), 1)
    lines.append(f"objects: {objects}; bytes on disk: {nbytes} ({_human(nbytes)}); ~{nbytes / rows:.1f} per done "
                 f"(sample, epoch); packed epochs: {len(packed_epochs(root))}/{spec.epochs}")
    lines.append(f"codec: {spec.codec} level {spec.level}")
    lines.append("arrays:")
    for name, a in array_layout(spec).items():
        shards = f" shards={a.shards}" if a.shards else ""
        lines.append(f"  {name:<24} shape={a.shape} chunks={a.chunks}{shards} dtype={a.dtype}")
    lines.append("provenance:")
    for key, value in sorted(attrs.get("provenance", {}).items()):
        if key == "views" and isinstance(value, dict):  # the view canary: its versions and size, not its digests
            value = {"versions": value.get("versions"),
                     "canary views": sum(map(len, value.get("train", []))) + len(value.get("eval", [])),
                     "covers": value.get("covers")}
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        lines.append(f"  {key}: {text}")
    return "\n".join(lines)
