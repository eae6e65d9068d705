"""``distill teacher``: run the teacher once over E augmented epochs and fill the logit store.

Work is split into (split, epoch, shard) units; a unit is one chunk of every store array, so writers
never share a chunk, and a unit is marked done (its record, with digests) only after its data is
written. Any number of processes fill one store together: torchrun ranks, a job array, or commands
started by hand on other machines. Each claims a few units at a time (``store.claims``), computes
and writes them, and goes on until every unit is done; a killed process's units are taken over once
its claims expire. Before that, every done unit is read back and a damaged one is computed again.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

import store
from pipeline.core.config import Config
from pipeline.core.errors import DistillError
from pipeline.core.files import location, use_storage_options
from pipeline.core.progress import progress_bar
from pipeline.data.shards import Manifest, load_manifest, open_shards
from pipeline.train import distributed
from pipeline.train.models import load_teacher, resolve_teacher, teacher_fit_samples, teacher_forward
from pipeline.train.run_store import store_provenance, store_spec
from pipeline.views.canary import make_canary, pick_pool, record_canary, require_same_views
from pipeline.views.loading import EvalDataset, UnitDataset, make_loader
from stages.teacher_units import Collector, Unit, drop_damaged_units, log_unit, pack_ready, pending


def _images(manifest: Manifest, units: list[Unit]) -> int:
    return sum(manifest.shards("train" if split == "clean" else split)[s].count for split, _, s in units)


def _claim_wave(claims: store.Claims, objs: store.Objects, todo: list[Unit], size: int, start: int) -> list[Unit]:
    """Claim up to ``size`` units of ``todo`` (claims refreshed), trying them from position ``start`` on (ranks
    start apart)."""
    wave: list[Unit] = []
    for i in range(len(todo)):
        unit = todo[(start + i) % len(todo)]
        if not claims.try_claim(*unit):
            continue
        if store.read_record(objs, *unit, fresh=True) is not None:  # finished meanwhile (after this round's listing)
            claims.release(*unit)
            continue
        log_unit(claims.owner, unit, "claimed")
        wave.append(unit)
        if len(wave) == size:
            break
    return wave


Costs = dict[str, list[float]]
"""split -> [images, seconds] this process spent on it (the clean pass's cost is reported on its own)."""


def _compute(cfg: Config, model, device: torch.device, group, manifests: tuple[Manifest, Manifest],
             wave: list[Unit], claims: store.Claims, batch_size: int, workers: int, bar: tqdm, costs: Costs) -> None:
    """Replay the wave's units, run the teacher on every view and write each unit as it completes
    (``manifests``: the run's, and the full one whose training images the clean pass covers)."""
    manifest, full = manifests
    k = store.spec_of(group).k
    for split in ("train", "val", "clean"):
        units = [(e, s) for sp, e, s in wave if sp == split]
        if not units:
            continue
        t0, cost = time.perf_counter(), costs.setdefault(split, [0, 0.0])
        source = manifest if split != "clean" else full  # every ingested train image
        collector = Collector(group, source, split, k, claims, str(cfg.store.path))
        if split == "train":
            ds = UnitDataset(source, cfg.aug, cfg.seed, units, batch_size=batch_size)
        else:  # val, or the clean pass: evaluation views of every training image
            ds = EvalDataset(source, cfg.aug, "train" if split == "clean" else split, [s for _, s in units],
                             batch_size=batch_size)
        for batch in make_loader(ds, workers, device=device):
            collector.add(batch, teacher_forward(model, batch.view, device).numpy())
            bar.update(len(batch))
            cost[0] += len(batch)
        collector.check_complete()
        cost[1] += time.perf_counter() - t0


def _fill(cfg: Config, model, env: distributed.DistEnv, group, manifest: Manifest, claims: store.Claims,
          batch_size: int, workers: int, progress: bool, costs: Costs, done: store.Done) -> tuple[int, int]:
    """Claim, compute and write units until none is left without a record, packing every stored epoch as it
    completes; returns the units this process wrote and the epochs it packed. Units and epochs other processes
    hold are waited for: their claims either end in a record or die. Each round lists the done records and the
    claims once (two listings), whatever the number of units."""
    spec, objs, full = store.spec_of(group), store.objects_of(group), load_manifest(cfg.data.shards)
    todo = [u for u in pending(spec, done) if claims.wants(u)]
    total, wave_size, written, packs = _images(full, todo), max(4, 2 * workers), 0, 0
    with progress_bar(total, f"teacher {cfg.teacher.model}", "im", progress) as bar:
        while True:
            claims.refresh()
            packed = pack_ready(group, spec, claims, done)
            packs += packed
            if not todo and not packed and not [e for e in done.unpacked_complete(spec.epochs, spec.n_shards)
                                                if claims.wants(("pack", e, 0))]:
                break
            wave = _claim_wave(claims, objs, todo, wave_size, env.rank * len(todo) // env.world) if todo else []
            if wave:
                _compute(cfg, model, env.device, group, (manifest, full), wave, claims, batch_size, workers, bar,
                         costs)
                written += len(wave)
            elif not packed:  # everything left is another process's, for now
                time.sleep(min(2.0, claims.ttl / 4))
            done = store.listing(objs)
            todo = [u for u in pending(spec, done) if claims.wants(u)]
            bar.update(max(0, total - _images(full, todo) - bar.n))  # what every process has written
    return written, packs


def run(
    cfg: Config,
    *,
    workers: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    device: str = "auto",
    part: tuple[int, int] | None = None,
) -> Path:
    """Fill ``cfg.store.path`` with every unit not yet done (alone, or together with other processes); with ``part``
    (i, n), only the units of static part i of n, without claims (it then packs only the stored epochs of its part
    that are complete when it finishes: a later run packs the rest)."""
    use_storage_options(cfg.storage_options)
    env = distributed.setup(device)
    if part is not None and env.world > 1:
        part = (part[0] * env.world + env.rank, part[1] * env.world)  # torchrun ranks split the part again
    try:
        return _run(cfg, env, cfg.teacher.workers if workers is None else workers,
                    batch_size or cfg.teacher.batch_size, progress and env.is_main, part)
    except OSError as e:
        if e.errno is not None and e.filename is None:  # a write() that failed (a full disk): name the store
            raise OSError(e.errno, e.strerror or str(e), str(cfg.store.path)) from e
        raise
    finally:
        distributed.teardown()


def _claims(cfg: Config, objs: store.Objects, spec: store.StoreSpec, part: tuple[int, int] | None,
            done: store.Done) -> store.Claims:
    """How this writer shares the store's units: claims with the other writers, or its static ``part`` (i, n).
    Claims need exclusive creates: on a storage that ignores them, cooperating writers are refused."""
    if part is not None:
        return store.StaticPart(objs, *part)
    if not objs.local and pending(spec, done) and not store.conditional_writes_hold(objs):
        raise DistillError(
            f"logit store {cfg.store.path}: the storage ignores conditional writes (If-None-Match), so writers cannot "
            "claim units exclusively and two could compute one unit; run a single writer, or split the units "
            "statically: `distill teacher --part I/N` for I = 0 .. N-1 (one per job-array task)")
    return store.Claims(objs, ttl=cfg.teacher.claim_ttl)


def _run(cfg: Config, env: distributed.DistEnv, workers: int, batch_size: int, progress: bool,
         part: tuple[int, int] | None) -> Path:
    manifest = open_shards(cfg)
    cfg = resolve_teacher(cfg)
    model, sha = load_teacher(cfg.teacher, num_classes=manifest.num_classes, in_chans=cfg.aug.channels)
    model.to(env.device).eval()
    if env.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    path = cfg.store.path
    pool = pick_pool(manifest)
    canary = make_canary(pool, cfg.aug, cfg.seed)
    prov = store_provenance(cfg, manifest, sha, teacher_fit_samples(cfg.teacher), views=canary)
    group = store.create_store(path, store_spec(cfg, manifest), prov)
    record_canary(group, pool)
    require_same_views(group, str(path), fresh=canary, say=print if env.is_main else lambda _: None)
    spec, objs = store.spec_of(group), store.objects_of(group)
    done = store.listing(objs)
    store.tidy(group, done)
    if drop_damaged_units(group, spec, done, env.rank, env.world, progress):
        done = store.listing(objs)
    n_done = sum(len(done.split(sp, spec.n_shards)) for sp in ("train", *store.VIEW_SPLITS))
    if env.is_main and n_done:
        print(f"teacher: {n_done} unit(s) already done in {path}, skipping them")
    t0, costs = time.perf_counter(), {}
    with _claims(cfg, objs, spec, part, done) as claims:
        written, packs = _fill(cfg, model, env, group, manifest, claims, batch_size, workers, progress, costs, done)
    elapsed = time.perf_counter() - t0
    parts = ", ".join(f"{sp} {int(n)} images in {sec:.1f} s" for sp, (n, sec) in costs.items())
    print(f"teacher: wrote {written} unit(s) on rank {env.rank} in {elapsed:.0f} s "
          f"({claims.taken_over} taken over from writers that stopped) -> {path}" + (f"; {parts}" if parts else ""))
    return location(path)
