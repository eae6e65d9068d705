"""Writers that stay correct when object storage misbehaves, and readers that read little, on a real S3 protocol
server on 127.0.0.1 (moto's, behind the counting middleware of ``tests/s3server.py``).

Racing writers on a fresh store, a 409 on a racing conditional PUT, a server that ignores ``If-None-Match``, a
writer whose claim was taken over, skewed clocks, the server going away mid-run; and what the student, verify and
ingest read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import derive, make_config, make_idx, save_random_teacher, write_yaml
from s3server import S3Server, tally

import store
from pipeline.core.errors import DistillError
from pipeline.core.files import location, use_storage_options
from stages import ingest, student, teacher, verify

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "writers"
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]
FAST_FAIL = {"config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
"""botocore gives up on a server that is gone after one try (s3fs still retries a few times within a second)."""


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    options = {"s3": {**server.options["s3"], **FAST_FAIL}}
    use_storage_options(options)
    location(f"s3://{BUCKET}").fs.mkdir(BUCKET)
    server.options = options
    yield server
    server.stop()


@pytest.fixture(scope="module")
def run(s3, tmp_path_factory):
    """A tiny run whose shards are on the server (40 train in 4 shards of 10, window 5), a random teacher, and a
    reference store written locally by one process."""
    tmp = tmp_path_factory.mktemp("writers")
    root = make_idx(tmp / "idx", 40, 10)
    cfg = make_config(tmp, {"source": "idx", "root": str(root), "shards": f"s3://{BUCKET}/shards"},
                      aug={"window": 5}, teacher={"claim_ttl": 4.0},
                      student={"epochs": 1, "batch_size": 5, "distillation": "hard"})
    cfg = derive(cfg, storage_options=s3.options)
    ingest.run(cfg, progress=False)
    cfg = derive(cfg, teacher={"checkpoint": str(save_random_teacher(cfg, tmp / "t.pt", seed=0))})
    reference = tmp / "reference.zarr"
    teacher.run(derive(cfg, store={"path": str(reference)}), progress=False, device="cpu")
    return cfg, reference, tmp


def arrays(path: str) -> dict[str, np.ndarray]:
    """Every array of train/, val/ and clean/ of a store (local or on the server), and its done units."""
    g = store.open_store(path)
    out = {f"{s}/{name}": a[...] for s in ("train", *store.VIEW_SPLITS) for name, a in g[s].arrays()}
    return {**out, "done": store.done_mask(g)}


def same_store(a: str, b: str) -> None:
    x, y = arrays(a), arrays(b)
    assert sorted(x) == sorted(y)
    for name in x:
        assert x[name].tobytes() == y[name].tobytes(), name


def on(cfg, name: str):
    return derive(cfg, store={"path": f"s3://{BUCKET}/{name}.zarr"})


def writers(cfg, tmp: Path, n: int, log: Path) -> list[subprocess.Popen]:
    yml = write_yaml(cfg, tmp / f"{log.stem}.yaml")
    cmd = [sys.executable, "-m", "stages", "teacher", "-c", str(yml), "--quiet", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILL_UNIT_LOG": str(log)}
    return [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(n)]


def test_two_writers_racing_on_a_fresh_store_compute_every_unit_once(run, tmp_path):
    cfg, reference, _ = run
    cfg = on(cfg, "race")
    log = tmp_path / "race.log"
    for p in writers(cfg, tmp_path, 2, log):
        assert p.wait(timeout=300) == 0, p.stderr.read()
    written = [tuple(line.split()[2:5]) for line in log.read_text().splitlines() if line.endswith("written")]
    assert len(written) == len(set(written))  # no unit twice
    same_store(str(reference), cfg.store.path)


def test_a_409_on_a_racing_conditional_put_is_a_lost_claim(run, s3):
    cfg, _, _ = run
    objs = store.objects_at(f"s3://{BUCKET}/conflict.zarr")
    a, b = store.Claims(objs, ttl=4.0), store.Claims(objs, ttl=4.0)
    s3.behaviour.conflict_keys.add("conflict.zarr/claims/train/e000000-s000000/0000.json")
    a.refresh()
    assert not a.try_claim("train", 0, 0)  # S3 answered 409: another conditional write raced this one
    b.refresh()
    assert b.try_claim("train", 0, 0)  # the race is over: the next claimant wins
    a.refresh()
    assert not a.try_claim("train", 0, 0)  # and holds it


def test_a_server_that_ignores_if_none_match_is_refused_naming_the_static_split(run, s3):
    cfg, reference, _ = run
    s3.behaviour.ignore_if_none_match = True
    try:
        assert not store.conditional_writes_hold(store.objects_at(f"s3://{BUCKET}/probe.zarr"))
        with pytest.raises(DistillError, match="--part I/N"):
            teacher.run(on(cfg, "ignored"), progress=False, device="cpu")
        for i in range(2):  # a job array of two tasks, no claims
            teacher.run(on(cfg, "ignored"), progress=False, device="cpu", part=(i, 2))
    finally:
        s3.behaviour.ignore_if_none_match = False
    teacher.run(on(cfg, "ignored"), progress=False, device="cpu")  # packs what the parts left
    same_store(str(reference), on(cfg, "ignored").store.path)


def claimants(name: str) -> tuple[store.Claims, store.Claims]:
    """Two writers' claims on one store on the server (ttl 4 s), the first already listing."""
    objs = store.objects_at(f"s3://{BUCKET}/{name}.zarr")
    a, b = store.Claims(objs, ttl=4.0), store.Claims(objs, ttl=4.0)
    a.refresh()
    return a, b


def test_a_writer_whose_claim_was_taken_over_writes_no_done_record(run, monkeypatch):
    a, b = claimants("fenced")
    assert a.try_claim("val", 0, 0)
    b.refresh()
    later = time.monotonic() + 10  # a's claim has not changed for longer than ttl on b's clock: a was cut off
    monkeypatch.setattr(time, "monotonic", lambda: later)
    b.refresh()
    assert b.try_claim("val", 0, 0) and b.taken_over == 1
    assert not a.fence("val", 0, 0) and b.fence("val", 0, 0)
    a.release("val", 0, 0)  # a lets go of its own attempt only
    assert b.fence("val", 0, 0)


def test_skewed_clocks_cannot_make_a_live_claim_look_dead(run, monkeypatch):
    a, b = claimants("skew")
    assert a.try_claim("train", 0, 0)
    monkeypatch.setattr(time, "time", lambda: 1e10)  # b's wall clock is centuries ahead
    b.refresh()
    clock = [time.monotonic()]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    for _ in range(3):  # a keeps beating while b watches for 3 x ttl
        clock[0] += 3.0
        a.renew()
        b.refresh()
        assert not b.try_claim("train", 0, 0)
    clock[0] += 5.0  # a stops beating: dead after ttl on b's own clock
    b.refresh()
    clock[0] += 5.0
    b.refresh()
    assert b.try_claim("train", 0, 0)


def test_the_server_going_away_ends_the_run_in_one_line_and_a_rerun_finishes_the_store(run, s3, tmp_path):
    cfg, reference, _ = run
    cfg = on(cfg, "gone")
    (proc,) = writers(derive(cfg, teacher={"batch_size": 1}), tmp_path, 1, tmp_path / "gone.log")
    objs = store.objects_at(cfg.store.path)
    deadline = time.time() + 120
    while not store.listing(objs).units.get("train") and time.time() < deadline:
        time.sleep(0.2)
    port = int(s3.endpoint.rsplit(":", 1)[1])
    s3.stop()
    try:
        assert proc.wait(timeout=120) == 1
        err = [line for line in proc.stderr.read().splitlines() if line.strip()]
        assert len(err) == 1 and "Traceback" not in err[0] and "127.0.0.1" in err[0], err
    finally:
        s3.restart(port)
    teacher.run(cfg, progress=False, device="cpu")
    same_store(str(reference), cfg.store.path)


def test_the_student_reads_each_stored_row_and_each_sample_about_once(run, s3, tmp_path):
    cfg, reference, _ = run
    cfg = on(cfg, "reads")
    teacher.run(cfg, progress=False, device="cpu")
    s3.counting.take()
    student.run(derive(cfg, student={"output": str(tmp_path / "s")}), progress=False, device="cpu", workers=2)
    requests = s3.counting.take()
    shards = tally(requests, "shards/train-")
    total = sum(s.size for s in store_manifest(cfg).shards("train"))
    assert shards["bytes"] <= 1.1 * total  # each sample once, a window's partners included
    packed = tally(requests, "reads.zarr/train/")
    assert 0 < packed["bytes"] and packed["GET"] == 0  # only byte ranges of the packed objects
    assert tally(requests, "reads.zarr/done/train/e000000.json")["RANGE"] == 0  # no record: the block table


def test_verify_fetches_the_samples_it_checks_by_range(run, s3):
    cfg, _, _ = run
    cfg = on(cfg, "reads")
    s3.counting.take()
    verify.run(cfg, samples=4, device="cpu")
    shards = tally(s3.counting.take(), "shards/train-")
    assert shards["bytes"] < 0.5 * sum(s.size for s in store_manifest(cfg).shards("train"))


def store_manifest(cfg):
    from pipeline.data.shards import open_shards

    return open_shards(cfg)


def test_ingest_says_up_to_date_from_one_listing_and_rehashes_on_request(run, s3, monkeypatch, capsys):
    cfg, _, _ = run
    import pipeline.data.freshness as freshness

    hashed = []
    real = freshness.sha256_file
    monkeypatch.setattr(freshness, "sha256_file", lambda p: hashed.append(p) or real(p))
    s3.counting.take()
    ingest.run(cfg, progress=False)
    assert "up to date" in capsys.readouterr().out and hashed == []
    assert tally(s3.counting.take(), "shards/train-")["bytes"] == 0
    ingest.run(cfg, progress=False, rehash=True)
    assert "up to date" in capsys.readouterr().out and len(hashed) >= 4
    assert json.loads(location(freshness.stamp_path(store_manifest(cfg))).read_text())["files"]
