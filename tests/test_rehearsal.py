"""The paper's shape, end to end: the README's ImageNet block, run as written on ``configs/rehearsal.yaml``.

``configs/imagenet.yaml``'s recipe (224 px RGB, RandAugment, erasing, Mixup/CutMix, smoothing, bicubic) on generated
ImageFolder JPEGs of varied sizes and aspect ratios (gray and CMYK ones among them) of C = 1,000 classes, K = 10,
E = 2, a RegNetY teacher fitted for one short epoch, a narrow DeiT at 224 px with patch 16, and every path on the
tests' S3 server on 127.0.0.1 (``tests/s3server.py``), which the stages reach through ``AWS_ENDPOINT_URL``.

The block's first line is replaced (``NODES=2 GPUS=1 WORKERS=2``); each ``torchrun`` line is started twice at once,
two "nodes" of one rank meeting through the c10d rendezvous (the teacher and the hard student: 2 ranks x 2
DataLoader workers, DDP over gloo); each ``distill`` line runs through the same click entry point in this process
(a process each would add ~6 s of imports to a test that has to stay cheap); a soft student is trained beside
the hard one before ``evaluate``. One run for the module; the tests check what this shape can break. Its cost
is printed (``pytest -s``).
"""

from __future__ import annotations

import io
import os
import re
import resource
import shlex
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import free_port, readme_block, run_cli, s3_env
from PIL import Image

import store
from pipeline.core.config import Config, load_config
from pipeline.core.files import location, torch_load
from pipeline.data.shards import IMAGE_FIELDS, decode_sample, load_manifest, open_shards, shard_samples
from pipeline.train.models import load_teacher, resolve_teacher, teacher_forward
from pipeline.views.augment import eval_transform
from pipeline.views.loading import UnitDataset, make_loader
from store.targets import stored_probs, tail_mass

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "rehearsal.yaml"
BUCKET = "rehearsal"
CLASSES, VAL, TRAIN, SHARD, NODES = 1000, 16, 32, 32, 2
"""Classes (one train image each), val images, train images ingested (``data.train_limit``), a shard's images,
torchrun "nodes"."""
SOFT = ["student.distillation=soft", f"student.output=s3://{BUCKET}/runs/student-soft"]
pytestmark = pytest.mark.slow


def wnid(c: int) -> str:
    """An ImageNet-like class folder name; sorted, class c is the c-th."""
    return f"n{10_000_000 + 7919 * c:08d}"


def jpeg_mode(c: int) -> str:
    """Some train images are gray or CMYK JPEGs (ImageNet has both)."""
    return {3: "L", 7: "CMYK"}.get(c % 10, "RGB")


def jpeg(rng: np.random.Generator, wide: bool = False, mode: str = "RGB") -> bytes:
    """A small JPEG of random size and aspect ratio (some wide): smooth colour noise, upsampled."""
    w, h = (int(v) for v in rng.integers(16, 96, 2))
    w = int(rng.integers(120, 200)) if wide else w
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def imagenet_like(root: Path, seed: int = 0) -> Path:
    """``root/train/<wnid>/<wnid>_0.JPEG``, one image a class, and ``root/val/<wnid>/*.JPEG`` (``VAL`` images of
    every ``CLASSES // VAL``-th class)."""
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        folder = root / "train" / wnid(c)
        folder.mkdir(parents=True)
        (folder / f"{wnid(c)}_0.JPEG").write_bytes(jpeg(rng, wide=c % 7 == 0, mode=jpeg_mode(c)))
    for j in range(VAL):
        folder = root / "val" / wnid(j * (CLASSES // VAL))
        folder.mkdir(parents=True)
        (folder / f"ILSVRC_val_{j:05d}.JPEG").write_bytes(jpeg(rng, wide=j % 5 == 0))
    return root


def commands(block: str, **settings: object) -> list[list[str]]:
    """The block's commands with its first line (``NAME=value ...``) replaced by ``settings`` (the same names, in
    its order): continued lines joined, ``$NAME`` expanded, comments dropped, as bash would."""
    first, rest = block.split("\n", 1)
    assert [item.split("=", 1)[0] for item in first.split()] == list(settings), f"the settings line changed: {first}"
    values = {k: str(v) for k, v in settings.items()}
    lines = rest.replace("\\\n", " ").splitlines()
    return [words for line in lines if (words := shlex.split(string.Template(line).substitute(values), comments=True))]


def torchrun(words: list[str], env: dict[str, str]) -> str:
    """One torchrun line on ``NODES`` "nodes" of this host at once; their stderr."""
    procs = [subprocess.Popen(words, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(NODES)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, f"{shlex.join(words)}: rc {p.returncode}\n{out[-6000:]}"
    return "".join(outs)


def distill(words: list[str]) -> str:
    """A ``distill`` line through the command-line entry point, in this process."""
    result = run_cli(*words[1:])
    assert result.exit_code == 0, f"{shlex.join(words)}: {result.output}\n{result.exception!r}"
    return result.output


def cpu_seconds() -> float:
    """CPU seconds of this process (the in-process stages, the S3 server) and of its finished children (the ranks
    and their agents and DataLoader workers)."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                          resource.RUSAGE_CHILDREN)))


@dataclass(frozen=True)
class Rehearsal:
    cfg: Config
    images: Path
    out: str
    """What the ``distill`` lines printed."""
    ranks: str
    """What the torchrun lines printed (both nodes, stdout and stderr)."""
    seconds: dict[str, float]
    """Wall seconds of each line, and of everything."""
    cpu: dict[str, float]
    """CPU seconds of each line (all processes), and of everything."""


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, single_thread) -> Rehearsal:
    from s3server import S3Server

    tmp = tmp_path_factory.mktemp("rehearsal")
    t0, c0 = time.time(), cpu_seconds()
    images = imagenet_like(tmp / "imagenet")
    seconds, cpu = {"images": round(time.time() - t0, 1)}, {"images": round(cpu_seconds() - c0, 1)}
    with S3Server() as server, pytest.MonkeyPatch.context() as mp:
        for name, value in s3_env(server.endpoint).items():  # this process's stages, and the ranks
            mp.setenv(name, value)
        mp.setitem(fsspec.config.conf, "s3", dict(server.options["s3"]))  # over any other test's server
        location(f"s3://{BUCKET}").fs.mkdir(BUCKET)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        out, ranks = "", ""
        for words in commands(readme_block("readme-imagenet"), CFG=CONFIG, DATA=images, NODES=NODES, GPUS=1,
                              WORKERS=2, ENDPOINT=f"127.0.0.1:{free_port()}"):
            name = (words[words.index("stages") + 1] if words[0] == "torchrun" else " ".join(words[1:3])).split(" -")[0]
            t, c = time.time(), cpu_seconds()
            if words[0] == "torchrun":
                ranks += torchrun(words, env)
            else:
                out += distill(words)
            seconds[name], cpu[name] = round(time.time() - t, 1), round(cpu_seconds() - c, 1)
            if words[0] == "torchrun" and name == "student":  # the soft student, for evaluate's tables
                t, c = time.time(), cpu_seconds()
                out += distill(["distill", "student", "-c", str(CONFIG), *(a for s in SOFT for a in ("-s", s))])
                seconds["student (soft)"] = round(time.time() - t, 1)
                cpu["student (soft)"] = round(cpu_seconds() - c, 1)
        seconds["all"], cpu["all"] = round(time.time() - t0, 1), round(cpu_seconds() - c0, 1)
        print(f"rehearsal, wall seconds: {seconds}\nrehearsal, CPU seconds: {cpu}")
        yield Rehearsal(load_config(CONFIG), images, out, ranks, seconds, cpu)


def test_rehearsal_runs_every_line_of_the_readme_block_and_writes_only_to_s3(rehearsal):
    assert {"ingest", "teacher-fit", "teacher", "verify", "student", "student (soft)", "evaluate", "audit",
            "store describe"} <= set(rehearsal.seconds), rehearsal.seconds
    names = {p.split("/", 1)[1] for p in location(f"s3://{BUCKET}").fs.find(BUCKET)}
    assert {"shards/manifest.json", "teacher.pt", "runs/student-hard/checkpoint.pt", "runs/student-soft/checkpoint.pt",
            "runs/eval/models.csv", "runs/audit/suspects.png"} <= names
    assert not any(p.name.startswith("s3:") for p in ROOT.iterdir())


def test_rehearsal_describe_shows_k_below_1000_classes_and_both_epochs_packed(rehearsal):
    assert "E=2 stored epochs, K=10 requested, k=10 stored (top-k), C=1000 classes" in rehearsal.out
    assert "packed epochs: 2/2" in rehearsal.out and "reproduces all" in rehearsal.out


AGENT_LOG = re.compile(r"^[EWI]\d{4} [\d:.]+ +\d+ \S*torch/distributed/elastic/\S+\] ")
"""A log line of torchrun's own agent. At the end of a multi-node run the agent hosting the c10d store can exit
while another agent still waits on the exit barrier; that agent logs "Error waiting on exit barrier" with a
traceback and exits 0 all the same (a race inside torch, seen in CI). The ranks' own output has no such prefix."""


def test_rehearsal_ranks_on_s3_print_no_traceback_nor_session_warnings(rehearsal):
    ranks = "\n".join(line for line in rehearsal.ranks.splitlines() if not AGENT_LOG.match(line))
    assert "Traceback" not in ranks and "Unclosed client session" not in ranks


def test_rehearsal_ingest_keeps_the_jpegs_and_1000_class_names(rehearsal):
    m = load_manifest(rehearsal.cfg.data.shards)
    assert m.num_classes == CLASSES and m.classes == [wnid(c) for c in range(CLASSES)]
    assert m.count("train") == TRAIN and m.count("val") == VAL
    for raw in shard_samples(m, "train", 0):
        _, label, img = decode_sample(raw)
        original = (rehearsal.images / "train" / wnid(label) / f"{wnid(label)}_0.JPEG").read_bytes()
        assert bytes(next(raw[k] for k in IMAGE_FIELDS if k in raw)) == original
        assert img.format == "JPEG"


def test_rehearsal_store_holds_uint16_classes_of_1000_and_k_below_c(rehearsal):
    group = store.open_store(rehearsal.cfg.store.path)
    assert group["train"]["topk_classes"].dtype == np.uint16
    unit = store.read_train_unit(group, 1, 0)
    assert unit.topk_classes.shape == (SHARD, 10) and int(unit.topk_classes.max()) > 255
    clean = store.read_val(group, "clean")
    assert len(clean.label) == TRAIN and int(clean.label.max()) > 255 and int(clean.topk_classes.max()) > 255


@pytest.fixture(scope="module")
def teacher(rehearsal):
    model, _ = load_teacher(resolve_teacher(rehearsal.cfg).teacher, num_classes=CLASSES, in_chans=3)
    return model


@pytest.fixture(scope="module")
def replayed(rehearsal, teacher):
    """The first 16 views of stored epoch 1, shard 0, replayed here in one process without workers, the teacher's
    full logits on them, and the unit's rows of those views."""
    cfg = rehearsal.cfg
    batch = next(iter(make_loader(UnitDataset(open_shards(cfg), cfg.aug, cfg.seed, [(1, 0)], batch_size=16), 0)))
    unit = store.read_train_unit(store.open_store(cfg.store.path), 1, 0)
    logits = teacher_forward(teacher, batch.view, torch.device("cpu")).double()
    return batch, logits, unit, batch.index.numpy() - unit.start


def test_rehearsal_rgb_randaugment_views_replay_here_as_the_ranks_workers_made_them(replayed):
    batch, logits, unit, rows = replayed
    assert batch.view.shape == (16, 3, 224, 224) and (batch.kind > 0).any()  # mixed views among them
    top = logits.topk(10, dim=1)
    assert np.array_equal(unit.topk_classes[rows], top.indices.numpy())
    np.testing.assert_allclose(unit.topk_logits[rows], top.values.numpy(), atol=0.01)  # float16 storage


def test_rehearsal_top_k_of_1000_rebuilds_the_teachers_probabilities_and_tail_mass(replayed):
    _, logits, unit, rows = replayed
    expected = np.take_along_axis(logits.softmax(dim=1).numpy(), unit.topk_classes[rows].astype(np.int64), axis=1)
    np.testing.assert_allclose(stored_probs(unit.topk_logits[rows], unit.logsumexp[rows]), expected, rtol=0.01)
    tail = tail_mass(unit.topk_logits[rows], unit.logsumexp[rows])
    np.testing.assert_allclose(tail, 1 - expected.sum(axis=1), atol=1e-4)
    assert (tail > 0.5).all()  # a barely fitted teacher of 1,000 classes: most mass is outside the top 10


def test_rehearsal_clean_pass_is_the_teacher_on_the_224_px_eval_view_of_gray_cmyk_and_wide_jpegs(rehearsal, teacher):
    clean = store.read_val(store.open_store(rehearsal.cfg.store.path), "clean")
    transform = eval_transform(rehearsal.cfg.aug)
    ingested = clean.label.tolist()
    picks = [next(c for c in ingested if jpeg_mode(c) == mode) for mode in ("L", "CMYK")]
    for c in [*picks, next(c for c in ingested if c % 7 == 0 and jpeg_mode(c) == "RGB")]:
        view = transform(Image.open(rehearsal.images / "train" / wnid(c) / f"{wnid(c)}_0.JPEG"))
        assert view.shape == (3, 224, 224)
        row = int(np.flatnonzero(clean.label == c)[0])
        got = teacher_forward(teacher, view[None], torch.device("cpu"))[0]
        assert int(clean.topk_classes[row, 0]) == int(got.argmax())
        np.testing.assert_allclose(clean.topk_logits[row], got.topk(10).values.numpy(), atol=0.01)


def test_rehearsal_verify_replays_stored_views_with_full_agreement(rehearsal):
    line = next(x for x in rehearsal.out.splitlines() if x.startswith("verify:") and "read back" in x)
    assert "0 damaged, 0 with NaN, 0 missing" in line and "hard labels agree (100.00%)" in line, line


def test_rehearsal_hard_student_trained_on_two_nodes_and_the_soft_one_here(rehearsal):
    for output, distillation, world in ((rehearsal.cfg.student.output, "hard", NODES), (SOFT[1].split("=")[1],
                                                                                         "soft", 1)):
        ckpt = torch_load(f"{output}/checkpoint.pt")
        assert ckpt["world"] == world and ckpt["num_classes"] == CLASSES and ckpt["img_size"] == 224
        assert ckpt["student"]["distillation"] == distillation
        assert "val_fused_top1" in ckpt["history"][-1]


def test_rehearsal_evaluate_tables_cover_both_students(rehearsal):
    out = location(rehearsal.cfg.evaluate.output)
    models = pd.read_csv(io.StringIO((out / "models.csv").read_text()), index_col="model")
    assert {"teacher", "hard", "soft"} <= set(models.index)
    assert (models["top5"] >= models["top1"]).all() and models["top1"].between(0, 1).all()
    assert (out / "results.md").read_text().startswith("# Results")
    assert (out / "accuracy_vs_throughput.png").read_bytes().startswith(b"\x89PNG")


def test_rehearsal_audit_names_1000_classes_on_an_rgb_contact_sheet(rehearsal):
    out = location(rehearsal.cfg.evaluate.output).parent / "audit"
    suspects = pd.read_csv(io.StringIO((out / "suspects.csv").read_text()))
    names = {wnid(c) for c in range(CLASSES)}
    assert len(suspects) > 0 and set(suspects["label_name"]) <= names and set(suspects["teacher_name"]) <= names
    sheet = Image.open(io.BytesIO((out / "suspects.png").read_bytes()))
    pixels = np.asarray(sheet.convert("RGB")).reshape(-1, 3).astype(int)
    assert (pixels.max(axis=1) - pixels.min(axis=1) > 60).mean() > 0.01  # colour images, not gray


def test_rehearsal_config_is_the_imagenet_recipe_at_small_counts():
    rehearsal, imagenet = load_config(CONFIG), load_config(ROOT / "configs" / "imagenet.yaml")
    assert rehearsal.aug.model_copy(update={"window": imagenet.aug.window}) == imagenet.aug
    assert rehearsal.teacher.model.startswith("regnety_") and rehearsal.teacher.topk == 10
    assert rehearsal.student.model == imagenet.student.model.replace("small", "tiny")
