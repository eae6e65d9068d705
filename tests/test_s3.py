"""The whole chain on S3: a real S3 protocol server (moto's server mode) on 127.0.0.1, s3fs as the client.

Every configured path is an ``s3://`` URL (the IDX inputs, the shards, the teacher checkpoint, the store,
the student's and the audit's outputs): ingest writes the shards there, teacher-fit reads them, a teacher
process killed mid-run is resumed on the store there, the student reads shards and store and writes its
checkpoint there, verify and audit read it. The S3 store equals the same chain's local store array by
array, and the student's weights are the same. And a URL whose scheme has no filesystem is refused.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_store, derive, make_config, make_idx, write_yaml

import store
from pipeline.core.config import ConfigError, load_config
from pipeline.core.files import location, use_storage_options
from stages import audit, ingest, student, teacher, teacher_fit, verify

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "distill"
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def s3():
    """An S3 server on a free loopback port, with a bucket; yields the storage options that reach it."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    options = {"s3": {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}}
    use_storage_options(options)
    location(f"s3://{BUCKET}").fs.mkdir(BUCKET)
    yield options
    server.stop()


def chain_config(tmp: Path, prefix: str, idx: str, options: dict) -> dict:
    """The same tiny pipeline with every path under ``prefix`` (a local folder or an s3:// URL)."""
    cfg = make_config(tmp, {"source": "idx", "root": idx, "shards": f"{prefix}/shards"},
                      teacher={"fit": {"epochs": 1, "output": f"{prefix}/teacher.pt"}},
                      store={"path": f"{prefix}/logits.zarr"},
                      student={"epochs": 1, "output": f"{prefix}/runs/student", "distillation": "hard"},
                      evaluate={"output": f"{prefix}/runs/eval"})
    return derive(cfg, storage_options=options)


@pytest.fixture(scope="module")
def chains(s3, tmp_path_factory):
    """The chain run locally, and run on S3 with the teacher killed once and resumed."""
    tmp = tmp_path_factory.mktemp("s3")
    idx = make_idx(tmp / "idx", 30, 12)
    for f in idx.iterdir():  # the inputs live on S3 too
        location(f"s3://{BUCKET}/idx/{f.name}").write_bytes(f.read_bytes())
    local = chain_config(tmp, str(tmp / "local"), str(idx), s3)
    remote = chain_config(tmp, f"s3://{BUCKET}/run", f"s3://{BUCKET}/idx", s3)
    for cfg in (local, remote):
        ingest.run(cfg, progress=False)
        teacher_fit.run(cfg, progress=False, device="cpu")
    # batch size 1 throughout: a unit's logits do not depend on the batch it was in, to the last float32 bit
    teacher.run(local, batch_size=1, progress=False, device="cpu")
    killed = kill_teacher_mid_run(remote, tmp)
    teacher.run(remote, batch_size=1, progress=False, device="cpu")  # resumes the units the killed process left
    for cfg in (local, remote):
        student.run(cfg, progress=False, device="cpu")
    return local, remote, killed


def kill_teacher_mid_run(cfg, tmp: Path) -> int:
    """Start ``distill teacher`` on the S3 store, SIGKILL it once some units are done; returns how many."""
    cmd = [sys.executable, "-m", "stages", "teacher", "-c", str(write_yaml(cfg, tmp / "remote.yaml")), "--quiet",
           "--batch-size", "1", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    done, deadline = 0, time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = int(store.done_mask(store.open_store(cfg.store.path)).sum())
        except store.StoreError:
            done = 0
        if done >= 1:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    out = proc.communicate(timeout=60)[0].decode(errors="replace")
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"could not kill the teacher mid-run (rc {proc.returncode}):\n{out}")
    return done


def test_the_s3_chain_writes_nothing_local_and_equals_the_local_chain(chains, tmp_path):
    local, remote, killed = chains
    assert 1 <= killed < 6  # the kill landed mid-run: the resumed run finished the rest
    assert not any(p.name.startswith("s3:") for p in Path.cwd().iterdir())  # no local folder named after a URL
    fs = location(f"s3://{BUCKET}").fs
    names = {p.split("/", 2)[2] for p in fs.find(f"{BUCKET}/run")}
    assert {"shards/manifest.json", "teacher.pt", "runs/student/checkpoint.pt", "runs/student/metrics.json"} <= names
    assert any(n.startswith("logits.zarr/done/train/") for n in names)
    copy = tmp_path / "from-s3.zarr"  # the S3 store, array by array, against the local one
    fs.get(f"{BUCKET}/run/logits.zarr", str(copy), recursive=True)
    assert_same_store(Path(local.store.path), copy)
    a = torch.load(Path(local.student.output) / "checkpoint.pt", weights_only=True)
    b = torch.load(io.BytesIO(location(f"{remote.student.output}/checkpoint.pt").read_bytes()), weights_only=True)
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_verify_and_audit_read_the_s3_store(chains):
    _, remote, _ = chains
    report = verify.run(remote, samples=8, device="cpu")
    assert report.units == 11 and not report.damaged and report.agreement == 1.0  # 2 x 3 train, 2 val, 3 clean
    head = audit.run(remote, output=f"s3://{BUCKET}/run/audit")
    assert head["output"] == f"s3://{BUCKET}/run/audit"
    assert location(f"s3://{BUCKET}/run/audit/audit.md").read_text().startswith("# Teacher")
    desc = store.describe(remote.store.path)
    assert "objects: " in desc and "packed epochs: 2/2" in desc


def test_a_url_scheme_without_a_filesystem_is_refused_naming_key_and_package(monkeypatch):
    registry = sys.modules["fsspec.registry"]  # (``fsspec.registry`` itself is the read-only mapping)
    monkeypatch.delitem(registry._registry, "s3", raising=False)
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed
    with pytest.raises(ConfigError, match=r"store.path: no filesystem for 's3://' is installed; install s3fs"):
        load_config(None, ["store.path=s3://bucket/logits.zarr"])
    with pytest.raises(ConfigError, match=r"student.output: unknown URL scheme 'nope://'"):
        load_config(None, ["student.output=nope://x/y"])
    assert not Path("s3:").exists() and not Path("nope:").exists()
