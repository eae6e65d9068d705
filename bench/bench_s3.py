"""Object storage at scale: every request the stages make to an S3 server, counted at the server.

A real S3 protocol server (moto's, on 127.0.0.1) behind a counting middleware (``tests/s3server.py``) holds the
shards and the store of a tiny run: 10 train shards of 400 images, window 40, E = 2, K = 10. The teacher stage
runs with 1 and with 4 cooperating writers (fresh stores), the student for one epoch with 1 rank x 0 workers,
2 x 2 and 4 x 2 (torchrun); each run's requests are tallied by kind and bytes. Then the ImageNet-1k layout at
64 ranks x 10 workers is extrapolated from the project's own planner (who trains what, the mix plans, the
store's block layout). The last line is
``s3: store amplification A, shard amplification B, requests per trained sample C, teacher LISTs per unit D``
(A, B, C for the 4 x 2 student; D for 4 writers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import derive, make_config, make_idx, save_random_teacher, write_yaml  # noqa: E402
from s3server import S3Server, tally  # noqa: E402

from bench.s3_imagenet import extrapolate  # noqa: E402
from pipeline.core.files import location, use_storage_options  # noqa: E402
from stages import ingest  # noqa: E402

BUCKET, SHARDS, TRAIN, VAL, SIZE, WINDOW = "bench", 10, 4000, 400, 400, 40
STUDENTS = ((1, 0), (2, 2), (4, 2))
READS = ("LIST", "HEAD", "GET", "RANGE")
KINDS = (*READS, "PUT", "DELETE", "bytes")


def setup(tmp: Path, s3: S3Server) -> tuple:
    """The tiny run's config on the server (shards ingested, a random teacher), and its YAML."""
    use_storage_options(s3.options)
    location(f"s3://{BUCKET}").fs.mkdir(BUCKET)
    root = make_idx(tmp / "idx", TRAIN, VAL, size=16, classes=10)
    cfg = make_config(tmp, {"source": "idx", "root": str(root), "shards": f"s3://{BUCKET}/shards", "shard_size": SIZE},
                      aug={"img_size": 16, "window": WINDOW},
                      teacher={"model": "test_resnet", "epochs": 2, "topk": 10, "batch_size": 200, "claim_ttl": 20},
                      student={"epochs": 1, "batch_size": 50, "shuffle": 64, "eval_every": 1000,
                               "distillation": "hard", "patch_size": 4},
                      evaluate={"batch_size": 200})
    cfg = derive(cfg, storage_options=s3.options)
    ingest.run(cfg, progress=False)
    ckpt = save_random_teacher(cfg, tmp / "teacher.pt", seed=0)
    return derive(cfg, teacher={"checkpoint": str(ckpt)})


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def teacher_run(cfg, tmp: Path, s3: S3Server, writers: int) -> dict:
    """``writers`` teacher processes started together on a fresh store: their requests, by kind."""
    store = f"s3://{BUCKET}/store-{writers}.zarr"
    yml = write_yaml(derive(cfg, store={"path": store}), tmp / f"teacher{writers}.yaml")
    s3.counting.take()
    cmd = [sys.executable, "-m", "stages", "teacher", "-c", str(yml), "--quiet", "--device", "cpu"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL) for _ in range(writers)]
    if any(p.wait(timeout=600) for p in procs):
        raise SystemExit(f"a teacher writer failed ({writers} writers)")
    units = 2 * SHARDS + 1 + SHARDS  # train (E x S), val, the clean pass
    counts = tally(s3.counting.take(), f"store-{writers}.zarr")
    return {"writers": writers, "units": units, **{k: counts[k] for k in KINDS},
            "lists_per_unit": counts["LIST"] / units}


def student_run(cfg, tmp: Path, s3: S3Server, ranks: int, workers: int, store: str) -> dict:
    """One student epoch on ``ranks`` x ``workers``: requests to the store and to the train shards."""
    out = f"s3://{BUCKET}/student-{ranks}x{workers}"
    yml = write_yaml(derive(cfg, store={"path": store}, student={"output": out}), tmp / f"s{ranks}x{workers}.yaml")
    s3.counting.take()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
           str(29500 + ranks * 10 + workers), "-m", "stages", "student", "-c", str(yml), "--quiet", "--device",
           "cpu", "--workers", str(workers)]
    subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, stdout=subprocess.DEVNULL, timeout=900)
    requests = s3.counting.take()
    key = store.removeprefix(f"s3://{BUCKET}/")
    trained = TRAIN // (ranks * cfg.student.batch_size) * ranks * cfg.student.batch_size
    data = [r for r in requests if r.key.startswith((f"{key}/train/", f"{key}/done/train/e000000"))]
    return {"ranks": ranks, "workers": workers, "trained": trained,
            "store": {k: c[k] for c in [tally(requests, key)] for k in KINDS},
            "store_data_bytes": sum(r.bytes_out for r in data if r.kind in ("GET", "RANGE")),
            "shards": {k: c[k] for c in [tally(requests, "shards/train-")] for k in KINDS},
            "val": tally(requests, "shards/val-")}


def epoch_bytes(store: str, epoch: int) -> int:
    """Bytes of one stored epoch's objects: its packed arrays, its record and block table."""
    fs = location(store).fs
    root = store.removeprefix("s3://")
    sizes = fs.find(root, detail=True)
    mine = [p for p in sizes if f"/c/{epoch}/" in p and "/train/" in p and "/stage/" not in p]
    mine += [p for p in sizes if f"done/train/e{epoch:06d}." in p]
    return sum(int(sizes[p]["size"]) for p in mine)


def shard_bytes() -> int:
    fs = location(f"s3://{BUCKET}").fs
    return sum(int(i["size"]) for p, i in fs.find(f"{BUCKET}/shards", detail=True).items() if "/train-" in p
               and p.endswith(".tar"))


def summarise(teachers: list[dict], students: list[dict], stored: int, shards: int) -> dict:
    for t in teachers:
        print(f"teacher, {t['writers']} writer(s): {t['units']} units; per unit: {t['LIST'] / t['units']:.1f} LIST, "
              f"{t['HEAD'] / t['units']:.1f} HEAD, {(t['GET'] + t['RANGE']) / t['units']:.1f} GET, "
              f"{t['PUT'] / t['units']:.1f} PUT, {t['DELETE'] / t['units']:.1f} DELETE")
    for s in students:
        st, sh = s["store"], s["shards"]
        s["store_requests"] = sum(st[k] for k in READS)
        s["shard_requests"] = sum(sh[k] for k in READS)
        s["A"] = s["store_data_bytes"] / stored
        s["B"] = sh["bytes"] / shards
        s["C"] = (s["store_requests"] + s["shard_requests"]) / s["trained"]
        print(f"student {s['ranks']} x {s['workers']}: {s['trained']} samples; store {st['bytes']:,} B in "
              f"{s['store_requests']} requests (the epoch's data {s['store_data_bytes']:,} B of {stored:,}: "
              f"A = {s['A']:.3f}); train shards {sh['bytes']:,} B of {shards:,} (B = {s['B']:.3f}) in "
              f"{s['shard_requests']} requests; C = {s['C']:.4f} requests per sample")
    return {"teachers": teachers, "students": students, "stored_epoch_bytes": stored, "train_shard_bytes": shards}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench s3", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d, S3Server() as s3:
        tmp = Path(d)
        cfg = setup(tmp, s3)
        teachers = [teacher_run(cfg, tmp, s3, w) for w in (1, 4)]
        store = f"s3://{BUCKET}/store-1.zarr"
        students = [student_run(cfg, tmp, s3, r, w, store) for r, w in STUDENTS]
        result = summarise(teachers, students, epoch_bytes(store, 0), shard_bytes())
    result["imagenet"] = extrapolate()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    s, d4 = students[-1], teachers[-1]["lists_per_unit"]
    print(f"({time.perf_counter() - t0:.0f} s)")
    im = result["imagenet"]
    print(f"ImageNet-1k, {im['ranks']} ranks x {im['workers']} workers, shards of {im['shard_size']:,}, window and "
          f"block {im['window']} (counted from the planner, not run): store amplification "
          f"{im['store_amplification']:.2f}, shard amplification {im['shard_amplification']:.2f}, requests per "
          f"trained sample {im['requests_per_sample']:.4f}")
    print(f"s3: store amplification {s['A']:.2f}, shard amplification {s['B']:.3f}, requests per trained sample "
          f"{s['C']:.3f}, teacher LISTs per unit {d4:.1f}")
