"""Distribution: every sample of every epoch trains once (but at most one global batch), on any world size
and worker count, views never change with the split, and a run resumes on another number of ranks.

Tiny data with uneven shards (10, 10, 5 samples; windows of 8), a random teacher's store; the torchrun
tests run on the CPU with gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import derive, free_port, make_config, make_idx, save_random_teacher, write_yaml

from pipeline.core.config import Config
from pipeline.data.shards import load_manifest
from pipeline.views.join import StoreJoin
from pipeline.views.loading import UnitDataset, make_loader, train_stream
from pipeline.views.plan import stored_epoch
from pipeline.views.sampling import epoch_order, steps_per_epoch, worker_pieces
from stages import ingest, student, teacher

ROOT = Path(__file__).resolve().parent.parent
N, RANGES = 25, [(0, 10), (10, 20), (20, 25)]
pytestmark = pytest.mark.usefixtures("single_thread")


def trained(world: int, workers: int, batch: int, epoch: int) -> list[list[int]]:
    """The indices each rank replays in a training epoch (all its workers)."""
    return [[i for w in range(max(workers, 1)) for p in worker_pieces(RANGES, 8, 0, epoch, batch, r, world, w, workers)
             for i in p.indices] for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_an_epoch_trains_every_index_once_but_at_most_one_global_batch(world, workers, batch):
    for epoch in range(3):
        ranks = trained(world, workers, batch, epoch)
        flat = [i for r in ranks for i in r]
        assert len(flat) == len(set(flat)) and set(flat) <= set(range(N))
        assert N - len(flat) < world * batch  # at most one global batch dropped
        assert len({len(r) for r in ranks}) == 1  # every rank steps alike
        assert len(flat) == steps_per_epoch(N, world, batch) * world * batch


@pytest.mark.parametrize("world,batch", [(1, 4), (2, 4), (3, 2), (2, 3), (4, 2)])
def test_two_consecutive_epochs_together_train_every_index(world, batch):
    for epoch in range(6):
        a, b = (set(i for r in trained(world, 2, batch, e) for i in r) for e in (epoch, epoch + 1))
        assert a | b == set(range(N)), (epoch, sorted(set(range(N)) - (a | b)))


def test_each_worker_holds_whole_batches_and_the_workers_of_a_rank_share_evenly():
    for workers in (1, 2, 3, 5):
        counts = [sum(len(p.indices) for p in worker_pieces(RANGES, 8, 0, 0, 2, 0, 1, w, workers))
                  for w in range(workers)]
        assert all(c % 2 == 0 for c in counts) and max(counts) - min(counts) <= 2


def test_the_epoch_order_changes_with_the_epoch():
    orders = {tuple(w.first for w in epoch_order(RANGES, 8, 0, e, 4)) for e in range(6)}
    assert len(orders) > 1


# ------------------------------------------------------------------------------------------ the real loader


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Config:
    """The DeiT recipe (RandAugment, erasing, Mixup/CutMix) on 25 images in shards of 10, 10, 5; E = 2."""
    tmp = tmp_path_factory.mktemp("dist")
    root = make_idx(tmp / "idx", N, 12)
    cfg = make_config(tmp, {"source": "idx", "root": str(root)},
                      aug={"auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "mixup": 0.8, "cutmix": 1.0},
                      student={"epochs": 2, "batch_size": 4, "shuffle": 8, "depth": 1})
    ingest.run(cfg, progress=False)
    cfg = derive(cfg, teacher={"checkpoint": str(save_random_teacher(cfg, tmp / "t.pt", seed=0))})
    teacher.run(cfg, progress=False, device="cpu")
    return cfg


def stream(cfg: Config, world: int, rank: int, workers: int, epoch: int, join: bool = True) -> dict:
    m = load_manifest(cfg.data.shards)
    ds, loader = train_stream(m, cfg.aug, cfg.seed, batch_size=cfg.student.batch_size, rank=rank, world=world,
                              view_epoch=partial(stored_epoch, stored_epochs=cfg.teacher.epochs), shuffle=8,
                              workers=workers, join=StoreJoin(cfg.store.path) if join else None)
    ds.set_epoch(epoch)
    out = {}
    for b in loader:
        for j in range(len(b.index)):
            out[int(b.index[j])] = (b.view[j].numpy().tobytes(), int(b.stored.hard[j]) if join else None)
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_pieces_make_the_same_views_and_targets_as_whole_units(mixed, workers):
    """A view is the same whether its window is replayed whole (the teacher stage) or cut into pieces."""
    m = load_manifest(mixed.data.shards)
    whole = {}
    for b in make_loader(UnitDataset(m, mixed.aug, mixed.seed, [(1, s) for s in range(3)], batch_size=5,
                                     join=StoreJoin(mixed.store.path)), 0):
        for j in range(len(b.index)):
            whole[int(b.index[j])] = (b.view[j].numpy().tobytes(), int(b.stored.hard[j]))
    for world in (1, 3):
        for rank in range(world):
            got = stream(mixed, world, rank, workers, epoch=3)  # training epoch 3 replays stored epoch 1
            assert got and all(got[i] == whole[i] for i in got)


def test_persistent_workers_move_to_the_next_epoch(mixed):
    m = load_manifest(mixed.data.shards)
    ds, loader = train_stream(m, mixed.aug, mixed.seed, batch_size=4, rank=0, world=1, shuffle=8, workers=2,
                              view_epoch=partial(stored_epoch, stored_epochs=2))
    seen = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == ds.steps() == 6
        seen.append(sorted(int(i) for b in batches for i in b.index))
        assert seen[-1] == sorted(i for r in trained(1, 2, 4, epoch) for i in r)
    assert loader.loader._iterator is not None and loader.loader._iterator._workers  # the same workers throughout


def test_a_student_seed_reorders_the_views_and_changes_none_of_them(mixed):
    """student.seed draws the student's order (and init), never a view: seeds of a sweep share one store."""
    m = load_manifest(mixed.data.shards)
    runs = {}
    for order_seed in (None, 7):
        ds, loader = train_stream(m, mixed.aug, mixed.seed, batch_size=4, rank=0, world=1, shuffle=8, workers=0,
                                  view_epoch=partial(stored_epoch, stored_epochs=2), order_seed=order_seed,
                                  join=StoreJoin(mixed.store.path))
        ds.set_epoch(1)
        runs[order_seed] = [(int(i), v.numpy().tobytes(), int(h))
                            for b in loader for i, v, h in zip(b.index, b.view, b.stored.hard, strict=True)]
    a, b = ({i: rest for i, *rest in runs[k]} for k in (None, 7))
    assert [i for i, *_ in runs[None]] != [i for i, *_ in runs[7]]  # another order
    assert len(set(a) & set(b)) >= N - 8 and all(a[i] == b[i] for i in set(a) & set(b))  # the same views
    assert "student.seed" not in student.run_identity(mixed, m, "offline", "t")  # earlier checkpoints still resume
    assert student.run_identity(derive(mixed, student={"seed": 7}), m, "offline", "t")["student.seed"] == 7


# ------------------------------------------------------------------------------------------ torchrun

RANK_SCRIPT = """
import json, sys
from functools import partial
import torch.distributed as dist
from pipeline.core.config import load_config
from pipeline.views.loading import train_stream
from pipeline.views.plan import stored_epoch
from pipeline.data.shards import open_shards
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = load_config(sys.argv[1])
m = open_shards(cfg)
out = {}
for workers in (0, 1, 2):
    ds, loader = train_stream(m, cfg.aug, cfg.seed, batch_size=cfg.student.batch_size, rank=rank, world=world,
                              view_epoch=partial(stored_epoch, stored_epochs=cfg.teacher.epochs),
                              shuffle=cfg.student.shuffle, workers=workers)
    for epoch in range(3):
        ds.set_epoch(epoch)
        out[f"{workers}/{epoch}"] = [int(i) for b in loader for i in b.index]
json.dump(out, open(f"{sys.argv[2]}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def torchrun(world: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
           str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_torchrun_ranks_and_workers_train_every_index_once(mixed, tmp_path):
    """On 3 ranks, which divide neither the samples nor the windows (2 ranks: test_student's uneven shards)."""
    world = 3
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    torchrun(world, str(script), str(write_yaml(mixed, tmp_path / "cfg.yaml")), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    batch = mixed.student.batch_size
    for workers in (0, 1, 2):
        epochs = []
        for epoch in range(3):
            per_rank = [r[f"{workers}/{epoch}"] for r in ranks]
            flat = [i for r in per_rank for i in r]
            assert len(flat) == len(set(flat)) and N - len(flat) < world * batch
            assert len({len(r) for r in per_rank}) == 1
            epochs.append(set(flat))
        assert all(a | b == set(range(N)) for a, b in zip(epochs, epochs[1:], strict=False))


@pytest.mark.slow
def test_a_checkpoint_resumes_on_another_number_of_ranks(mixed, tmp_path):
    """2 ranks, then 1 (a plain process), then 2 again: the global batch of the first run is kept throughout."""
    cfg = derive(mixed, student={"epochs": 3, "output": str(tmp_path / "out"), "distillation": "hard"})
    yml = write_yaml(cfg, tmp_path / "cfg.yaml")
    run = ["-m", "stages", "student", "-c", str(yml), "--quiet", "--device", "cpu"]
    torchrun(2, *run, "--until-epoch", "1")
    first = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert first["epoch"] == 0 and first["world"] == 2 and first["global_batch"] == 8
    student.run(cfg, progress=False, device="cpu", until_epoch=2)
    one = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert one["epoch"] == 1 and one["world"] == 1 and one["global_batch"] == 8 and one["batch_size"] == 8
    out = torchrun(2, *run).stdout
    assert "on 2 rank(s) x 4" in out  # the global batch is kept
    done = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert done["epoch"] == 2 and done["world"] == 2 and done["global_batch"] == 8
    assert [r["epoch"] for r in done["history"]] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in done["history"])


def test_rescale_lr_keeps_the_batch_per_rank_and_scales_the_lr(mixed, tmp_path):
    cfg = derive(mixed, student={"epochs": 3, "output": str(tmp_path / "out"), "distillation": "none",
                                 "elastic": "rescale_lr", "warmup_epochs": 0})
    student.run(cfg, progress=False, device="cpu", until_epoch=1)
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    ckpt["world"], ckpt["global_batch"] = 2, 8  # as if written by 2 ranks of 4
    torch.save(ckpt, tmp_path / "out" / "checkpoint.pt")
    student.run(cfg, progress=False, device="cpu")
    done = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert done["batch_size"] == 4 and done["global_batch"] == 4  # per rank kept; lr follows 4 / 512
    lr = {}
    for glob in (4, 8):  # uninterrupted runs at the global batch now and at the checkpoint's
        out = tmp_path / f"plain{glob}"
        student.run(derive(cfg, student={"batch_size": glob, "output": str(out)}), progress=False, device="cpu")
        lr[glob] = torch.load(out / "checkpoint.pt", weights_only=True)["history"][1]["lr"]  # epoch 2 (of 3)
    assert done["history"][1]["lr"] == pytest.approx(lr[4]) and lr[4] != pytest.approx(lr[8])


def test_an_indivisible_global_batch_is_refused_with_a_way_out(mixed):
    from pipeline.core.errors import DistillError

    ckpt = SimpleNamespace(global_batch=8)  # a checkpoint of a run on 2 ranks x 4
    assert student._batch(mixed, 2, ckpt) == 4
    with pytest.raises(DistillError, match="elastic: rescale_lr"):
        student._batch(mixed, 3, ckpt)
    rescale = derive(mixed, student={"elastic": "rescale_lr"})
    assert student._batch(rescale, 3, ckpt) == mixed.student.batch_size
