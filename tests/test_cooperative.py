"""Cooperative writers: independent ``distill teacher`` processes fill one store together.

Each writes a log line per claimed and written unit (``DISTILL_UNIT_LOG``), so the tests can count:
every unit is written once, no unit is computed by two processes while its first claim is alive, and
the finished store equals one written by a single process, array by array.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import assert_same_store, at, derive, make_config, make_idx, save_random_teacher, undo_unit, write_yaml

from pipeline.core.config import Config
from stages import ingest, teacher

ROOT = Path(__file__).resolve().parent.parent
N_TRAIN, N_VAL, CLASSES = 30, 12, 10
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Config:
    """E=3 over 6 train shards of 5 and 3 val shards: 18 train, 3 val and 6 clean units."""
    tmp = tmp_path_factory.mktemp("coop")
    root = make_idx(tmp / "idx", N_TRAIN, N_VAL, classes=CLASSES)
    cfg = make_config(tmp, {"source": "idx", "root": str(root), "shard_size": 5}, teacher={"epochs": 3})
    ingest.run(cfg, progress=False)
    ckpt = save_random_teacher(cfg, tmp / "teacher.pt", seed=0, num_classes=CLASSES)
    return derive(cfg, teacher={"checkpoint": str(ckpt)})


@pytest.fixture(scope="module")
def reference(base: Config) -> Path:
    """One process, at the writers' batch size: CPU convolutions at batch 1 and at 16 may differ in the last
    bit of a logit outside the top-k (seen in the logsumexp), which is the teacher's numerics, not the store's."""
    path = Path(base.data.shards).parent / "single.zarr"
    teacher.run(at(base, path), batch_size=1, progress=False, device="cpu")
    return path


def start(cfg: Config, path: Path, log: Path, tmp: Path, name: str) -> subprocess.Popen:
    yml = write_yaml(at(cfg, path), tmp / f"{name}.yaml")
    cmd = [sys.executable, "-m", "stages", "teacher", "-c", str(yml), "--quiet", "--batch-size", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILL_UNIT_LOG": str(log)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def events(log: Path) -> list[tuple[float, str, tuple[str, int, int], str]]:
    out = []
    for line in log.read_text().splitlines():
        t, owner, split, e, s, what = line.split()
        out.append((float(t), owner, (split, int(e), int(s)), what))
    return out


def written_once(log: Path) -> dict:
    by_unit = defaultdict(list)
    for _, owner, unit, what in events(log):
        if what == "written":
            by_unit[unit].append(owner)
    assert all(len(v) == 1 for v in by_unit.values()), {u: v for u, v in by_unit.items() if len(v) > 1}
    return by_unit


def finish(*procs: subprocess.Popen) -> None:
    for p in procs:
        out = p.communicate(timeout=240)[0].decode(errors="replace")
        assert p.returncode == 0, out[-3000:]


def test_two_teachers_started_together_on_a_new_store_share_it(base, reference, tmp_path):
    path, log = tmp_path / "shared.zarr", tmp_path / "units.log"
    a, b = start(base, path, log, tmp_path, "a"), start(base, path, log, tmp_path, "b")
    finish(a, b)
    by_unit = written_once(log)
    assert len(by_unit) == 27 and len({o for v in by_unit.values() for o in v}) == 2  # both did some work
    assert_same_store(reference, path)


def test_two_teachers_on_a_partial_store_compute_only_what_is_left_once(base, reference, tmp_path):
    path, log = tmp_path / "partial.zarr", tmp_path / "units.log"
    import shutil

    shutil.copytree(reference, path)
    left = [(0, 1), (1, 3), (2, 0), (2, 5)]
    for e, s in left:
        undo_unit(path, e, s)
    finish(start(base, path, log, tmp_path, "a"), start(base, path, log, tmp_path, "b"))
    assert sorted(written_once(log)) == sorted(("train", e, s) for e, s in left)
    assert_same_store(reference, path)


def test_one_of_two_cooperating_writers_killed_mid_unit_is_taken_over(base, reference, tmp_path):
    path, log = tmp_path / "killed.zarr", tmp_path / "units.log"
    victim, survivor = start(base, path, log, tmp_path, "victim"), start(base, path, log, tmp_path, "survivor")
    mine = f":{victim.pid}:"
    deadline, killed_at = time.monotonic() + 120, None
    while time.monotonic() < deadline and victim.poll() is None:  # kill it holding a claim it has not written
        if log.exists():
            ev = [x for x in events(log) if mine in x[1]]
            written = {u for _, _, u, w in ev if w == "written"}
            if written and any(w == "claimed" and u not in written for _, _, u, w in ev):
                os.kill(victim.pid, signal.SIGKILL)
                killed_at = time.time()
                break
        time.sleep(0.005)
    victim.communicate(timeout=60)
    if killed_at is None:
        pytest.fail("could not kill the first writer while it held a claim")
    finish(survivor)
    ev = events(log)
    by_unit = written_once(log)
    assert len(by_unit) == 27
    victim_claims = {u for _, o, u, w in ev if mine in o and w == "claimed"}
    lost = victim_claims - {u for u, owners in by_unit.items() if mine in owners[0]}
    assert lost, "the victim held no unit when it died"
    for t, o, u, w in ev:  # the survivor computed the victim's units only once the victim had died
        if mine not in o and w == "claimed" and u in victim_claims:
            assert t >= killed_at, (u, t, killed_at)
    assert all(mine not in by_unit[u][0] for u in lost)  # taken over and written by the survivor
    assert_same_store(reference, path)
