"""The view canary: a store remembers how its views were made, so that a reader anywhere can tell whether it
makes the same ones.

A stored target is only right for the view the teacher saw, and a view depends on the code that makes it:
timm's transforms (and the order of their draws), torchvision, Pillow's decoding and resampling, NumPy (the
mix plan), torch (erasing noise, the finishing arithmetic). When the teacher creates a store it records the
versions of those libraries and a *canary*: digests of a fixed, seeded set of views of a small pool of the
run's own training images (their encoded bytes are kept in the store, so a reader needs nothing else). The
views are made with the very functions the stages use (:mod:`pipeline.views.replay`, the plan, the uint8
hand-over, the CPU finishing, the evaluation view), for canary view epochs no stored epoch uses, and chosen
so that every transform the config enables appears: crops, flips, every RandAugment op that can fire,
erasing, Mixup and CutMix. A reader recomputes the digests (well under a second) and compares.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import AutoAugment, RandAugment

import store
from pipeline.core.config import AugConfig
from pipeline.core.errors import DistillError
from pipeline.data.shards import IMAGE_FIELDS, Manifest, decode_sample, shard_samples
from pipeline.views.augment import HorizontalFlip, TorchSeeded, eval_transform
from pipeline.views.handover import Finisher, TrainParts
from pipeline.views.plan import KIND_CUTMIX, KIND_MIXUP, epoch_plan
from pipeline.views.replay import raw_views, training_sample
from pipeline.views.rng import STREAM_VERSION
from pipeline.views.samples import collate

VIEW_LIBRARIES = ("torch", "torchvision", "timm", "pillow", "numpy")
"""The libraries a view depends on, whose versions a store records."""
POOL = 16
"""Training images in the canary's pool (one mixing unit: partners are paired among them)."""
MIN_VIEWS = 64
MAX_EPOCHS = 64
"""Canary view epochs tried at most while looking for every enabled transform."""
CANARY_VIEW_EPOCH0 = 2_000_000
"""Canary view epoch k is CANARY_VIEW_EPOCH0 + k: never a stored epoch, nor a teacher-fit one."""
CANARY_SHARD = 2**32 - 1
"""The shard id the pool's mix plan is drawn for (no real shard has it)."""
POOL_KEY = "canary/pool.npz"
"""Where a store keeps the pool's encoded images (beside its arrays)."""


def library_versions() -> dict[str, str]:
    """The installed version of every library a view depends on, and the project's view-stream version."""
    out = {}
    for name in VIEW_LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    out["view_stream"] = str(STREAM_VERSION)
    return out


@dataclass(frozen=True)
class Pool:
    """The canary's images: their global indices in the train split and their encoded bytes, as ingested."""

    indices: list[int]
    data: list[bytes]
    exts: list[str]

    def images(self) -> list[Image.Image]:
        return [decode_sample({"__key__": str(i), "idx": str(i), "cls": "0", ext: d})[2]
                for i, d, ext in zip(self.indices, self.data, self.exts, strict=True)]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays = {f"image{j}": np.frombuffer(d, np.uint8) for j, d in enumerate(self.data)}
        np.savez(buf, indices=np.asarray(self.indices, np.int64), exts=np.asarray(self.exts), **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Pool:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            n = len(z["indices"])
            return cls([int(i) for i in z["indices"]], [z[f"image{j}"].tobytes() for j in range(n)],
                       [str(e) for e in z["exts"]])


def pick_pool(manifest: Manifest, size: int = POOL) -> Pool:
    """``size`` training images spread over the first train shard (each read by its byte range)."""
    count = manifest.shards("train")[0].count
    start = manifest.ranges("train")[0][0]
    positions = sorted({int(p) for p in np.linspace(0, count - 1, min(size, count))})
    indices, data, exts = [], [], []
    for pos in positions:
        sample = next(iter(shard_samples(manifest, "train", 0, pos, 1)))
        ext = next(f for f in IMAGE_FIELDS if f in sample)
        indices.append(start + pos)
        data.append(bytes(sample[ext]))
        exts.append(ext)
    return Pool(indices, data, exts)


def _digest(*parts: torch.Tensor | np.ndarray | bytes) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p if isinstance(p, bytes) else np.ascontiguousarray(p).tobytes())
    return h.hexdigest()


def epoch_digests(images: list[Image.Image], pool: Pool, aug: AugConfig, seed: int, view_epoch: int,
                  parts: TrainParts | None = None) -> tuple[list[str], set[str]]:
    """The digest of every pool image's training view in one canary view epoch (what crosses the worker queue,
    uint8 view and erased boxes, and the view finished on the CPU, mixed with its partner), the plan's
    digest last; and the mixing and erasing features the epoch shows."""
    parts = parts or TrainParts.of(aug)
    plan = epoch_plan(aug, seed, view_epoch, CANARY_SHARD, 0, len(images))
    raw = raw_views(parts, images, seed, view_epoch, pool.indices)
    samples = [training_sample(plan, r, 0, torch.zeros(0), raw[r], raw[int(plan.partner[r])])
               for r in range(len(images))]
    finished = Finisher(aug)(collate(samples))
    out = [_digest(v.image, v.erase, f) for v, f in zip(raw, finished, strict=True)]
    out.append(_digest(plan.partner, plan.kind, plan.lam, plan.box))
    seen = {name for name, kind in (("mixup", KIND_MIXUP), ("cutmix", KIND_CUTMIX)) if (plan.kind == kind).any()}
    if any(bool((v.erase[:, 2] > 0).any()) for v in raw):
        seen.add("erase")
    return out, seen


def eval_digests(images: list[Image.Image], aug: AugConfig) -> list[str]:
    transform = eval_transform(aug)
    return [_digest(transform(img)) for img in images]


def enabled(aug: AugConfig, parts: TrainParts) -> set[str]:
    """The features a training view of this config can show."""
    out = {name for name, on in (("flip", aug.hflip > 0), ("erase", aug.reprob > 0)) if on}
    mixing = aug.mix_prob > 0
    if mixing and aug.mixup > 0 and (aug.cutmix == 0 or aug.switch_prob < 1):
        out.add("mixup")
    if mixing and aug.cutmix > 0 and (aug.mixup == 0 or aug.switch_prob > 0):
        out.add("cutmix")
    for t in parts.pil.transforms:
        if isinstance(t, TorchSeeded):
            out.add("jitter")
        for op in _ops(t):
            out.add(f"op:{op.name}")
    return out


def _ops(t: Any) -> list[Any]:
    if isinstance(t, RandAugment):
        weights = t.choice_weights
        return [op for j, op in enumerate(t.ops) if (weights is None or weights[j] > 0) and op.prob > 0]
    if isinstance(t, AutoAugment):
        return [op for sub in t.policy for op in sub if op.prob > 0]
    return []


class _Spy:
    """A flip or a colour jitter that reports when it changes the image (the draws are the transform's own)."""

    def __init__(self, transform: Any, seen: set[str]) -> None:
        self.transform, self.seen = transform, seen
        self.name = "jitter" if isinstance(transform, TorchSeeded) else "flip"

    def __call__(self, img: Any) -> Any:
        out = self.transform(img)
        if self.name == "jitter" or out is not img:
            self.seen.add(self.name)
        return out


@contextmanager
def recording(parts: TrainParts, seen: set[str]) -> Iterator[None]:
    """While inside, the PIL part of ``parts`` adds to ``seen`` each feature a view shows (a flip that flipped,
    an augmentation op that ran, colour jitter); the draws and the images are unchanged."""
    ops = [op for t in parts.pil.transforms for op in _ops(t)]
    originals = [op.aug_fn for op in ops]
    for op, fn in zip(ops, originals, strict=True):

        def record(*args: Any, _fn: Any = fn, _name: str = op.name, **kw: Any) -> Any:
            seen.add(f"op:{_name}")
            return _fn(*args, **kw)

        op.aug_fn = record
    listed = list(parts.pil.transforms)
    parts.pil.transforms[:] = [_Spy(t, seen) if isinstance(t, HorizontalFlip | TorchSeeded) else t for t in listed]
    try:
        yield
    finally:
        parts.pil.transforms[:] = listed
        for op, fn in zip(ops, originals, strict=True):
            op.aug_fn = fn


def make_canary(pool: Pool, aug: AugConfig, seed: int) -> dict[str, Any]:
    """The canary record a store keeps: library versions, the pool's indices, the canary view epochs chosen
    (in order, until every enabled feature has appeared and at least :data:`MIN_VIEWS` views are digested),
    their digests, the evaluation views' digests, the features covered and any the search missed."""
    images, parts = pool.images(), TrainParts.of(aug)
    want, covered, epochs, digests = enabled(aug, parts), set(), [], []
    for k in range(MAX_EPOCHS):
        enough = len(epochs) * len(images) >= MIN_VIEWS
        if enough and want <= covered:
            break
        seen: set[str] = set()
        with recording(parts, seen):
            found, shown = epoch_digests(images, pool, aug, seed, CANARY_VIEW_EPOCH0 + k, parts)
        seen |= shown
        if enough and not (seen & want) - covered:
            continue  # this epoch shows nothing new
        epochs.append(CANARY_VIEW_EPOCH0 + k)
        digests.append(found)
        covered |= seen & want
    return {"versions": library_versions(), "pool": pool.indices, "epochs": epochs, "train": digests,
            "eval": eval_digests(images, aug), "covers": sorted(covered), "missed": sorted(want - covered)}


@dataclass(frozen=True)
class CanaryCheck:
    """What recomputing a store's canary in this environment found."""

    differ: int
    """Canary views (training and evaluation) that differ from the recorded ones."""
    total: int
    versions: list[tuple[str, str, str]]
    """(library, recorded version, installed version) for each that differs."""

    @property
    def same_views(self) -> bool:
        return self.differ == 0

    def versions_text(self) -> str:
        return ", ".join(f"{lib} {mine} here, {theirs} in the store" for lib, theirs, mine in self.versions)


def compare(recorded: dict[str, Any], found: dict[str, Any]) -> CanaryCheck:
    """Count the canary views (and mix plans) of ``found`` that differ from ``recorded`` (the same view epochs),
    and the library versions that differ."""
    pairs = [(a, b) for ra, rb in zip(recorded["train"], found["train"], strict=True)
             for a, b in zip(ra, rb, strict=True)]
    pairs += list(zip(recorded["eval"], found["eval"], strict=True))
    here = {lib: str(v) for lib, v in found["versions"].items()}
    versions = [(lib, str(v), here.get(lib, "absent")) for lib, v in sorted(recorded["versions"].items())
                if here.get(lib, "absent") != str(v)]
    return CanaryCheck(sum(a != b for a, b in pairs), len(pairs), versions)


def check_canary(record: dict[str, Any], pool: Pool, aug: AugConfig, seed: int) -> CanaryCheck:
    """Recompute the recorded canary views here and compare."""
    images = pool.images()
    train = [epoch_digests(images, pool, aug, seed, e)[0] for e in record["epochs"]]
    return compare(record, {"train": train, "eval": eval_digests(images, aug), "versions": library_versions()})


# ------------------------------------------------------------------------------------------- in a store


class ViewDrift(DistillError):
    """This environment makes other views than the ones a store's targets were computed for."""


def record_canary(group: Any, pool: Pool) -> None:
    """Keep the pool's images beside a store's arrays (the canary record itself is in its provenance), unless
    they are there already (another writer put them, or the store is complete and maybe read-only)."""
    objs = store.objects_of(group)
    if objs.get(POOL_KEY) is None:
        objs.put(POOL_KEY, pool.to_bytes(), exclusive=True)  # racing writers put the same images: one wins


def store_canary(group: Any) -> CanaryCheck | None:
    """Recompute a store's canary here, with the augmentation and seed it records; None when it has none."""
    prov = group.attrs.asdict().get("provenance", {})
    record = prov.get("views")
    if record is None:
        return None
    data = store.objects_of(group).get(POOL_KEY)
    if data is None:
        raise store.DamagedUnit(f"logit store {store.objects_of(group).root}: the view canary's images "
                                f"({POOL_KEY}) are missing; re-run `distill teacher` or `distill store stamp`")
    return check_canary(record, Pool.from_bytes(data), AugConfig.model_validate(prov["aug"]), int(prov["seed"]))


def _install_hint(check: CanaryCheck) -> str:
    pins = " ".join(f"'{lib}=={theirs}'" for lib, theirs, _ in check.versions if lib != "view_stream")
    return f"pip install {pins}" if pins else ""


def require_same_views(group: Any, where: str, *, allow_drift: bool = False, say: Any = print,
                       fresh: dict[str, Any] | None = None) -> str | None:
    """Refuse (ViewDrift, one line) a store whose canary views this environment does not reproduce, naming how
    many differ, the library versions that differ and the two ways out; with ``allow_drift``, say so loudly
    and return what differs (the run records it). Same views under other versions: a one-line notice.
    ``fresh``: this environment's canary of the same pool, when the caller has just made it (the teacher)."""
    record = group.attrs.asdict().get("provenance", {}).get("views")
    check = compare(record, fresh) if fresh is not None and record is not None else store_canary(group)
    if check is None:
        raise ViewDrift(f"logit store {where} records no view canary (written before views were fingerprinted): "
                        "run `distill store stamp -c CONFIG` to check a sample of it against the teacher and "
                        "record one, or re-run `distill teacher` into a new store")
    if check.same_views:
        if check.versions:
            say(f"views: {check.versions_text()}; all {check.total} canary views are identical, proceeding")
        return None
    drift = (f"{check.differ} of {check.total} canary views differ from the views the teacher labelled"
             + (f" ({check.versions_text()})" if check.versions else " (no recorded library version differs: "
                "the code that makes views changed)"))
    if not allow_drift:
        way = (f"install the recorded versions ({_install_hint(check)})" if _install_hint(check).startswith("pip")
               else "use the environment (and project version) that wrote it")
        raise ViewDrift(f"logit store {where}: {drift}; {way} or re-run `distill teacher` into a new store "
                        "(--allow-view-drift trains on it anyway)")
    say(f"WARNING: logit store {where}: {drift}; going on anyway (--allow-view-drift): its targets describe "
        "views this environment does not make")
    return drift
