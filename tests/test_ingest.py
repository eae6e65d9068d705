"""Ingest stage and shard format: tiny generated data, one test per behaviour."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import make_config, make_idx, make_imagefolder, write_idx
from PIL import Image

from pipeline.data.freshness import verify_shards
from pipeline.data.shards import (
    FORMAT,
    ShardError,
    decode_sample,
    load_manifest,
)
from stages import ingest
from stages.ingest import IngestError


def idx_config(tmp_path: Path, root: Path, **data):
    return make_config(tmp_path, {"source": "idx", "root": str(root), **data})


def folder_config(tmp_path: Path, roots: tuple[Path, Path], **data):
    return make_config(
        tmp_path, {"source": "imagefolder", "train_root": str(roots[0]), "val_root": str(roots[1]), **data}
    )


def read_samples(path: str) -> list[dict[str, bytes]]:
    """Raw samples of one shard in file order, grouped by key, via tarfile (independent of wds)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, _, field = m.name.partition(".")
            samples.setdefault(key, {"__key__": key})[field] = tf.extractfile(m).read()
    return list(samples.values())


def all_samples(manifest, split):
    return [s for p in manifest.shard_paths(split) for s in read_samples(p)]


def idx_arrays(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    def load(name):
        raw = gzip.decompress((root / f"{name}.gz").read_bytes())
        ndim = raw[3]
        shape = [int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
        return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)

    return load(f"{prefix}-images-idx3-ubyte"), load(f"{prefix}-labels-idx1-ubyte")


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------------------------------
# Sources


@pytest.mark.parametrize("gz", [True, False, "unsuffixed"], ids=["gzipped", "plain", "gzipped-no-suffix"])
def test_idx_ingest_stores_every_image_and_label(tmp_path, gz):
    root = make_idx(tmp_path / "idx", 23, 7, size=12, classes=5, gz=bool(gz))
    if gz == "unsuffixed":  # gzip is detected by its magic bytes, not the file name
        for p in root.glob("*.gz"):
            p.rename(p.with_suffix(""))
    out = ingest.run(idx_config(tmp_path, root), progress=False)
    m = load_manifest(out)
    assert (m.count("train"), m.count("val")) == (23, 7)
    assert m.classes == [str(c) for c in range(5)] and m.num_classes == 5
    assert m.source["kind"] == "idx" and m.channels_hint == 1
    make_idx(tmp_path / "ref", 23, 7, size=12, classes=5, gz=True)  # same seed: same arrays, gzipped
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images, labels = idx_arrays(tmp_path / "ref", prefix)
        expected = sorted((int(lab), img.tobytes()) for img, lab in zip(images, labels, strict=True))
        got = []
        for s in all_samples(m, split):
            assert set(s) == {"__key__", "cls", "idx", "png"}
            im = Image.open(io.BytesIO(s["png"]))
            assert im.format == "PNG" and im.mode == "L" and im.size == (12, 12)
            got.append((int(s["cls"]), np.asarray(im).tobytes()))
        assert sorted(got) == expected


def test_idx_class_names_come_from_config(tmp_path, idx_root):
    names = [f"c{i}" for i in range(10)]
    m = load_manifest(ingest.run(idx_config(tmp_path, idx_root, class_names=names), progress=False))
    assert m.classes == names


def test_idx_rgb_arrays_become_rgb_pngs(tmp_path):
    root = make_idx(tmp_path / "idx", 4, 2, size=8, classes=2, channels=3)
    m = load_manifest(ingest.run(idx_config(tmp_path, root), progress=False))
    assert m.channels_hint == 3
    _, _, im = decode_sample(all_samples(m, "train")[0])
    assert im.mode == "RGB" and im.size == (8, 8)


def test_imagefolder_ingest_keeps_original_bytes(tmp_path, imagefolder_roots):
    train_root, val_root = imagefolder_roots
    # a PNG saved under a .jpg name is stored by its detected format
    disguised = train_root / "dog" / "dog_900.jpg"
    Image.new("RGB", (5, 5), (1, 2, 3)).save(disguised, format="PNG")
    m = load_manifest(ingest.run(folder_config(tmp_path, imagefolder_roots), progress=False))
    assert m.classes == ["cat", "dog", "fish"] and m.channels_hint == 3 and m.source["kind"] == "imagefolder"
    assert (m.count("train"), m.count("val")) == (10, 6)
    for split, root in (("train", train_root), ("val", val_root)):
        originals = {}
        for p in root.rglob("*.*"):
            ext = "png" if p.read_bytes().startswith(b"\x89PNG") else "jpg"
            originals[p.read_bytes()] = (ext, m.classes.index(p.parent.name))
        stored = {}
        for s in all_samples(m, split):
            (ext,) = set(s) & {"jpg", "png"}
            stored[s[ext]] = (ext, int(s["cls"]))
        assert stored == originals
        assert {e for e, _ in stored.values()} == {"jpg", "png"}


# --------------------------------------------------------------------------------------------------
# Layout, order, determinism


def test_same_config_and_inputs_give_byte_identical_output(tmp_path, idx_root):
    a = ingest.run(idx_config(tmp_path, idx_root, shards=str(tmp_path / "a")), progress=False)
    b = ingest.run(idx_config(tmp_path, idx_root, shards=str(tmp_path / "b")), progress=False)
    assert tree_bytes(a) == tree_bytes(b)
    with tarfile.open(a / "train-000000.tar") as tf:
        assert {m.mtime for m in tf.getmembers()} == {0}
    assert sorted(tree_bytes(a)) == [  # each shard with its offset index
        "manifest.json",
        "train-000000.idx",
        "train-000000.tar",
        "train-000001.idx",
        "train-000001.tar",
        "train-000002.idx",
        "train-000002.tar",
        "val-000000.idx",
        "val-000000.tar",
        "val-000001.idx",
        "val-000001.tar",
    ]


def test_shards_hold_equal_counts_and_contiguous_ranges(tmp_path, idx_root):
    m = load_manifest(ingest.run(idx_config(tmp_path, idx_root, shard_size=10), progress=False))
    assert m.ranges("train") == [(0, 10), (10, 20), (20, 25)]
    assert m.ranges("val") == [(0, 10), (10, 12)]
    for split in ("train", "val"):
        for info, path, (start, end) in zip(m.shards(split), m.shard_paths(split), m.ranges(split), strict=True):
            assert os.path.basename(path) == info.file
            assert sorted(int(s["idx"]) for s in read_samples(path)) == list(range(start, end))
            assert info.count == end - start


def test_indices_are_dense_and_keys_zero_padded(tmp_path, idx_root):
    m = load_manifest(ingest.run(idx_config(tmp_path, idx_root), progress=False))
    for split, n in (("train", 25), ("val", 12)):
        samples = all_samples(m, split)
        assert [int(s["idx"]) for s in samples] == list(range(n))  # in shard order
        assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(n)]


def test_shuffle_is_the_seeded_permutation_per_split_and_limit_keeps_its_prefix(tmp_path):
    root = make_idx(tmp_path / "idx", 12, 12, size=4, classes=12)  # label == position in the file

    def order(seed, **data):
        cfg = idx_config(tmp_path, root, shards=str(tmp_path / f"s{seed}-{len(data)}"), **data)
        m = load_manifest(ingest.run(cfg.model_copy(update={"seed": seed}), progress=False))
        return {split: [int(s["cls"]) for s in all_samples(m, split)] for split in ("train", "val")}

    for seed in (0, 7):
        got = order(seed)
        for split, stream in (("train", 0), ("val", 1)):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))
            assert got[split] == rng.permutation(12).tolist()
        assert got["train"] != got["val"]  # distinct streams
    cut = order(7, train_limit=5, val_limit=3)
    full = order(7)
    assert cut["train"] == full["train"][:5] and cut["val"] == full["val"][:3]


def test_progress_bar_only_when_asked(tmp_path, idx_root, capsys):
    ingest.run(idx_config(tmp_path, idx_root, shards=str(tmp_path / "quiet")), progress=False)
    assert "ingest train" not in capsys.readouterr().err
    ingest.run(idx_config(tmp_path, idx_root, shards=str(tmp_path / "loud")), progress=True)
    err = capsys.readouterr().err
    assert "ingest train" in err and "25/25" in err and "12/12" in err


def test_rerun_says_up_to_date_and_rewrites_nothing(tmp_path, idx_root, capsys):
    cfg = idx_config(tmp_path, idx_root)
    out = ingest.run(cfg, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    inode = out.stat().st_ino
    capsys.readouterr()
    assert ingest.run(cfg, progress=False) == out
    fp = load_manifest(out).fingerprint
    assert f"shards up to date (fingerprint {fp[:16]}" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert out.stat().st_ino == inode


def test_rerun_rewrites_after_config_or_input_change(tmp_path, idx_root, capsys):
    ingest.run(idx_config(tmp_path, idx_root), progress=False)
    out = ingest.run(idx_config(tmp_path, idx_root, shard_size=5), progress=False)
    assert load_manifest(out).ranges("val") == [(0, 5), (5, 10), (10, 12)]
    make_idx(idx_root, 30, 12)  # same names, new content
    capsys.readouterr()
    out = ingest.run(idx_config(tmp_path, idx_root, shard_size=5), progress=False)
    assert "up to date" not in capsys.readouterr().out
    assert load_manifest(out).count("train") == 30


# --------------------------------------------------------------------------------------------------
# Bad inputs


def _missing_file(root):
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    return root / "t10k-labels-idx1-ubyte"


def _bad_magic(root):
    p = root / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(p.read_bytes()))
    raw[0:4] = b"\x12\x34\x08\x03"
    p.write_bytes(gzip.compress(bytes(raw)))
    return p


def _bad_shape(root):
    p = root / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-5]))  # header says more pixels
    return p


def _count_mismatch(root):
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(24, np.uint8))
    return root / "train-images-idx3-ubyte.gz"


def _labels_not_1d(root):
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros((25, 2), np.uint8))
    return root / "train-labels-idx1-ubyte.gz"


@pytest.mark.parametrize(
    "breaker",
    [_missing_file, _bad_magic, _bad_shape, _count_mismatch, _labels_not_1d],
    ids=["missing-file", "bad-magic", "bad-shape", "count-mismatch", "labels-not-1d"],
)
def test_bad_idx_input_is_an_error_naming_the_file(tmp_path, idx_root, breaker):
    named = breaker(idx_root)
    cfg = idx_config(tmp_path, idx_root)
    with pytest.raises(IngestError, match=str(named).replace(".", r"\.")):
        ingest.run(cfg, progress=False)
    assert not Path(cfg.data.shards).exists()


def test_missing_idx_root_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(IngestError, match=str(missing)):
        ingest.run(idx_config(tmp_path, missing), progress=False)


def test_idx_label_beyond_class_names_is_an_error(tmp_path, idx_root):
    with pytest.raises(IngestError, match="train-labels-idx1-ubyte"):
        ingest.run(idx_config(tmp_path, idx_root, class_names=["a", "b"]), progress=False)


def _missing_root(train, val):
    missing = train.parent / "nope"
    train.rename(missing)
    return train


def _empty_class(train, val):
    for p in (val / "dog").iterdir():
        p.unlink()
    return val / "dog"


def _val_only_class(train, val):
    (val / "zebra").mkdir()
    Image.new("RGB", (4, 4)).save(val / "zebra" / "z.png")
    return val / "zebra"


def _corrupt(train, val):
    p = train / "cat" / "cat_001.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return p


def _truncated_png(train, val):
    p = train / "fish" / "fish_000.png"
    p.write_bytes(p.read_bytes()[:-20])  # caught by verify(); load() alone would pass it
    return p


def _truncated_jpeg(train, val):
    p = train / "dog" / "dog_001.jpg"
    p.write_bytes(p.read_bytes()[:-60])  # caught by load(); verify() alone would pass it
    return p


def _not_an_image(train, val):
    p = val / "cat" / "cat_000.png"
    p.write_bytes(b"GIF89a...")
    return p


@pytest.mark.parametrize(
    "breaker",
    [_missing_root, _empty_class, _val_only_class, _corrupt, _truncated_png, _truncated_jpeg, _not_an_image],
    ids=[
        "missing-root",
        "empty-class",
        "val-only-class",
        "corrupt",
        "truncated-png",
        "truncated-jpeg",
        "not-jpeg-or-png",
    ],
)
def test_bad_imagefolder_input_is_an_error_naming_the_path(tmp_path, imagefolder_roots, breaker):
    named = breaker(*imagefolder_roots)
    cfg = folder_config(tmp_path, imagefolder_roots)
    with pytest.raises(IngestError, match=str(named).replace(".", r"\.")):
        ingest.run(cfg, progress=False)
    assert not Path(cfg.data.shards).exists()
    assert not list(tmp_path.glob("shards.*"))


def test_allow_corrupt_skips_and_lists_bad_images(tmp_path, imagefolder_roots):
    train, val = imagefolder_roots
    _corrupt(train, val)
    _truncated_png(train, val)
    _not_an_image(train, val)
    cfg = folder_config(tmp_path, imagefolder_roots, allow_corrupt=True)
    m = load_manifest(ingest.run(cfg, progress=False))
    assert m.count("train") == 7 and m.count("val") == 5
    skipped = m.split("train").skipped
    assert sorted(s.path for s in skipped) == ["cat/cat_001.jpg", "fish/fish_000.png"]
    assert m.split("val").skipped[0].path == "cat/cat_000.png"
    assert all(s.reason for s in skipped)
    assert [int(s["idx"]) for s in all_samples(m, "train")] == list(range(7))


# --------------------------------------------------------------------------------------------------
# Crash safety


class Boom(RuntimeError):
    pass


def _explode_after(monkeypatch, n):
    real = wds.TarWriter.write
    calls = {"n": 0}

    def write(self, obj):
        calls["n"] += 1
        if calls["n"] > n:
            raise Boom("simulated crash")
        return real(self, obj)

    monkeypatch.setattr(wds.TarWriter, "write", write)


def test_crash_mid_write_leaves_no_shards_folder(tmp_path, idx_root, monkeypatch):
    cfg = idx_config(tmp_path, idx_root)
    _explode_after(monkeypatch, 13)
    with pytest.raises(Boom):
        ingest.run(cfg, progress=False)
    assert not Path(cfg.data.shards).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no tmp folder left either


def test_crash_mid_write_keeps_the_previous_good_folder(tmp_path, idx_root, monkeypatch):
    out = ingest.run(idx_config(tmp_path, idx_root), progress=False)
    before = tree_bytes(out)
    _explode_after(monkeypatch, 13)
    with pytest.raises(Boom):
        ingest.run(idx_config(tmp_path, idx_root, shard_size=4), progress=False)
    assert tree_bytes(out) == before
    verify_shards(load_manifest(out), "train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "shards"]


def test_refuses_to_replace_a_folder_that_is_not_shards(tmp_path, idx_root):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(IngestError, match=str(foreign)):
        ingest.run(idx_config(tmp_path, idx_root, shards=str(foreign)), progress=False)
    assert (foreign / "thesis.tex").read_text() == "precious"


# --------------------------------------------------------------------------------------------------
# Reading back (pipeline/data/shards.py)


def test_shards_read_back_with_webdataset(tmp_path, idx_root):
    m = load_manifest(ingest.run(idx_config(tmp_path, idx_root), progress=False))
    for split, n in (("train", 25), ("val", 12)):
        seen = []
        for sample in wds.WebDataset(m.shard_paths(split), shardshuffle=False, empty_check=False):
            index, label, image = decode_sample(sample)
            assert 0 <= label < m.num_classes and image.mode == "L" and image.size == (28, 28)
            start, end = m.ranges(split)[m.shard_id_from_path(split, sample["__url__"])]
            assert start <= index < end
            seen.append(index)
        assert seen == list(range(n))


def test_load_manifest_errors_name_the_file(tmp_path, idx_root):
    with pytest.raises(ShardError, match=str(tmp_path / "none" / "manifest.json")):
        load_manifest(tmp_path / "none")
    out = ingest.run(idx_config(tmp_path, idx_root), progress=False)
    path = out / "manifest.json"
    d = json.loads(path.read_text())
    d["classes"][0] = "edited"
    path.write_text(json.dumps(d))
    with pytest.raises(ShardError, match=f"{path}.*fingerprint"):
        load_manifest(out)
    path.write_text("{not json")
    with pytest.raises(ShardError, match=str(path)):
        load_manifest(out)


def test_manifest_is_canonical_json_without_timestamps(tmp_path, idx_root):
    out = ingest.run(idx_config(tmp_path, idx_root), progress=False)
    text = (out / "manifest.json").read_text()
    d = json.loads(text)
    assert text == json.dumps(d, sort_keys=True, indent=2) + "\n"
    assert d["format"] == FORMAT and d["num_classes"] == 10 and d["image"] == {"channels_hint": 1}
    assert set(d["source"]) == {"kind", "config_hash", "input_key"}
    assert set(d["splits"]["train"]["shards"][0]) == {"file", "start", "end", "count", "size", "sha256", "index",
                                                      "index_sha256"}


def test_verify_shards_detects_a_changed_shard(tmp_path, idx_root):
    m = load_manifest(ingest.run(idx_config(tmp_path, idx_root), progress=False))
    verify_shards(m, "train")
    path = Path(m.shard_paths("train")[1])
    raw = bytearray(path.read_bytes())
    raw[600] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=str(path)):
        verify_shards(m, "train")


def test_imagefolder_jpeg_only_and_png_only(tmp_path):
    for fmt in ("jpg", "png"):
        roots = make_imagefolder(tmp_path / fmt, classes=("a", "b"), n_train=2, n_val=1, fmt=fmt)
        cfg = folder_config(tmp_path, roots, shards=str(tmp_path / f"shards-{fmt}"))
        m = load_manifest(ingest.run(cfg, progress=False))
        assert {k for s in all_samples(m, "train") for k in s} == {"__key__", "cls", "idx", fmt}


def test_train_shards_subset_keeps_the_first_shards_and_changes_the_fingerprint(tiny_config):
    from pipeline.data.shards import load_manifest, open_shards

    ingest.run(tiny_config, progress=False)
    full = load_manifest(tiny_config.data.shards)
    sub = open_shards(tiny_config.model_copy(update={"data": tiny_config.data.model_copy(update={"train_shards": 2})}))
    assert sub.ranges("train") == full.ranges("train")[:2]
    assert sub.count("train") == 20 and sub.count("val") == full.count("val")
    assert sub.fingerprint != full.fingerprint


def test_train_shards_beyond_the_manifest_are_refused_naming_the_key(tiny_config):
    from pipeline.data.shards import ShardError, load_manifest, open_shards

    ingest.run(tiny_config, progress=False)
    have = len(load_manifest(tiny_config.data.shards).shards("train"))
    data = tiny_config.data.model_copy(update={"train_shards": have + 1})
    with pytest.raises(ShardError, match=f"data.train_shards is {have + 1}, but .* holds {have} train shards"):
        open_shards(tiny_config.model_copy(update={"data": data}))
    data = tiny_config.data.model_copy(update={"train_shards": have})
    assert open_shards(tiny_config.model_copy(update={"data": data})).fingerprint == load_manifest(
        tiny_config.data.shards).fingerprint


def test_sample_parser_reads_plain_ustar_and_falls_back_to_tarfile_for_pax(tmp_path):
    """The fast header parser and tarfile agree; a pax member (a name over 100 bytes) takes tarfile's path."""
    from pipeline.data.shard_index import _parse

    for fmt, key in ((tarfile.USTAR_FORMAT, "00000007"), (tarfile.PAX_FORMAT, "k" * 120)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for field, data in (("cls", b"3"), ("idx", b"7"), ("png", bytes(range(256)) * 3)):
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        sample = _parse(buf.getvalue(), "test")
        assert sample == {"__key__": key, "cls": b"3", "idx": b"7", "png": bytes(range(256)) * 3}
