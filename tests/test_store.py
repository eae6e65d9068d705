"""The logit store: layout, writer, reader, provenance checks, describe. Tiny data, fast."""

from __future__ import annotations

import multiprocessing as mp
import shutil

import numpy as np
import pytest
import zarr

from store import (
    KIND_CUTMIX,
    KIND_MIXUP,
    KIND_NONE,
    MissingUnit,
    ProvenanceMismatch,
    StoreError,
    StoreSpec,
    create_store,
    dense_soft_target,
    describe,
    done_mask,
    open_store,
    plan_digest,
    read_train_unit,
    read_val,
    stored_probs,
    topk_from_logits,
    write_train_unit,
    write_val_unit,
)

C = 10
RANGES = ((0, 4), (4, 8), (8, 10))
VAL = ((0, 3), (3, 5))
PROV = {
    "teacher": "resnet18",
    "teacher_sha256": "ab12" * 16,
    "aug_hash": "aa" * 32,
    "seed": 0,
    "epochs": 2,
    "topk": 3,
    "num_classes": C,
    "manifest_fingerprint": "ff" * 32,
    "versions": {"zarr": zarr.__version__},
    "created": "2025-01-01T00:00:00Z",
}


def make_spec(**kw) -> StoreSpec:
    args = dict(num_classes=C, epochs=2, topk=3, train_ranges=RANGES, val_ranges=VAL)
    args.update(kw)
    return StoreSpec(**args)


def softmax(x: np.ndarray, tau: float = 1.0) -> np.ndarray:
    z = x.astype(np.float64) / tau
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def logits_for(n: int, c: int = C, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, c)) * 3).astype(np.float32)


def unit_data(spec: StoreSpec, shard: int, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    a, b = spec.train_ranges[shard]
    n = b - a
    logits = logits_for(n, spec.num_classes, seed)
    tl, tc, _, lse = topk_from_logits(logits, spec.topk)
    data = dict(
        topk_logits=tl,
        topk_classes=tc,
        logsumexp=lse,
        label=np.arange(n) % spec.num_classes,
        plan=(np.arange(a, b)[::-1].copy(), np.array([KIND_NONE, KIND_MIXUP, KIND_CUTMIX] * n)[:n],
              np.linspace(0.1, 1.0, n)),
    )
    return logits, data


def write_unit(group: zarr.Group, spec: StoreSpec, epoch: int, shard: int) -> dict[str, np.ndarray]:
    _, data = unit_data(spec, shard, seed=100 * epoch + shard)
    write_train_unit(group, epoch, shard, **data)
    return data


def test_round_trip_of_a_train_unit(tmp_path):
    spec = make_spec()
    g = create_store(tmp_path / "s.zarr", spec, PROV)
    data = write_unit(g, spec, 1, 2)
    u = read_train_unit(open_store(tmp_path / "s.zarr"), 1, 2)
    assert (u.epoch, u.shard, u.start, u.end) == (1, 2, 8, 10)
    assert u.topk_logits.dtype == np.float32
    np.testing.assert_array_equal(u.topk_logits, data["topk_logits"].astype(np.float32))
    for name in ("topk_classes", "logsumexp", "label"):
        np.testing.assert_array_equal(getattr(u, name), data[name], err_msg=name)
    np.testing.assert_array_equal(u.hard_label, data["topk_classes"][:, 0])  # the argmax, by construction
    assert u.plan == plan_digest(*data["plan"])
    assert done_mask(g).tolist() == [[False, False, False], [False, False, True]]


def test_done_mark_is_written_last(tmp_path, monkeypatch):
    spec = make_spec()
    g = create_store(tmp_path / "s.zarr", spec, PROV)
    real_setitem = zarr.Array.__setitem__

    def failing_setitem(self, key, value):
        if self.path == "train/label":  # the last data array written before the done mark
            raise OSError("simulated crash mid-unit")
        real_setitem(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", failing_setitem)
    with pytest.raises(OSError, match="simulated"):
        write_unit(g, spec, 0, 1)
    monkeypatch.undo()
    r = open_store(tmp_path / "s.zarr")
    assert not done_mask(r).any()
    with pytest.raises(MissingUnit, match="epoch 0, shard 1"):
        read_train_unit(r, 0, 1)


def test_dense_store_gives_exact_probabilities(tmp_path):
    spec = make_spec(topk=50)  # K >= C: dense
    assert spec.k == C
    g = create_store(tmp_path / "s.zarr", spec, PROV | {"topk": 50})
    logits, data = unit_data(spec, 0)
    write_train_unit(g, 0, 0, **data)
    u = read_train_unit(g, 0, 0)
    p = stored_probs(u.topk_logits, u.logsumexp)
    expected = np.take_along_axis(softmax(logits), u.topk_classes.astype(int), axis=1)
    np.testing.assert_allclose(p, expected, atol=2e-3)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=5e-3)


@pytest.mark.parametrize("tau", [1.0, 3.0, 0.5])
def test_dense_soft_target_equals_softmax_when_dense(tau):
    logits = logits_for(6)
    tl, tc, _, lse = topk_from_logits(logits, C)
    t = dense_soft_target(tl, tc, lse, C, tau=tau)
    assert t.shape == (6, C) and t.dtype == np.float32
    np.testing.assert_allclose(t.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(t, softmax(logits, tau), atol=4e-3)


def test_dense_soft_target_spreads_tail_evenly_when_topk():
    logits = logits_for(6)
    k = 3
    tl, tc, _, lse = topk_from_logits(logits, k)
    t = dense_soft_target(tl, tc, lse, C, tau=1.0)
    np.testing.assert_allclose(t.sum(axis=1), 1.0, atol=1e-6)
    # stored classes keep their exact probabilities
    got = np.take_along_axis(t, tc.astype(int), axis=1)
    np.testing.assert_allclose(got, stored_probs(tl, lse), rtol=1e-5)
    # the rest share the tail evenly
    mask = np.ones((6, C), bool)
    np.put_along_axis(mask, tc.astype(int), False, axis=1)
    rest = t[mask].reshape(6, C - k)
    tail = 1 - stored_probs(tl, lse).sum(axis=1)
    np.testing.assert_allclose(rest, np.repeat(tail[:, None] / (C - k), C - k, axis=1), rtol=1e-4)
    # higher tau flattens the distribution but keeps the stored classes on top
    hot = dense_soft_target(tl, tc, lse, C, tau=4.0)
    assert (hot.max(axis=1) < t.max(axis=1)).all()
    np.testing.assert_array_equal(hot.argmax(axis=1), tc[:, 0])


def test_dense_soft_target_guards_nonpositive_tail():
    # float16 rounding can make stored probs sum to >= 1; result must stay finite and normalised
    tl = np.array([[0.0, -30.0]], np.float16)
    tc = np.array([[2, 0]])
    lse = np.array([-1e-4], np.float32)  # stored probs sum slightly above 1
    t = dense_soft_target(tl, tc, lse, 3)
    assert np.isfinite(t).all()
    np.testing.assert_allclose(t.sum(), 1.0, atol=1e-6)


def test_topk_sorted_descending_and_ties_broken_by_lowest_class():
    x = np.array([[1.0, 5.0, 5.0, 0.0, 5.0], [2.0, 2.0, 2.0, 2.0, 2.0]], np.float32)
    tl, tc, hl, lse = topk_from_logits(x, 3)
    assert tl.dtype == np.float16 and lse.dtype == np.float32
    np.testing.assert_array_equal(tc, [[1, 2, 4], [0, 1, 2]])
    np.testing.assert_array_equal(hl, [1, 0])
    np.testing.assert_array_equal(hl, np.argmax(x, axis=1))
    np.testing.assert_allclose(lse, np.log(np.exp(x.astype(np.float64)).sum(axis=1)), rtol=1e-6)
    np.testing.assert_array_equal(topk_from_logits(x, 2)[1], [[1, 2], [0, 1]])  # ties across the k-th place
    y = logits_for(20)
    tl, tc, _, _ = topk_from_logits(y, 4)
    assert (np.diff(tl.astype(np.float32), axis=1) <= 0).all()
    np.testing.assert_array_equal(tc, np.argsort(-y, axis=1, kind="stable")[:, :4])
    z = np.random.default_rng(1).integers(-2, 2, size=(50, 12)).astype(np.float32)  # many ties
    for k in (1, 3, 12):
        np.testing.assert_array_equal(topk_from_logits(z, k)[1], np.argsort(-z, axis=1, kind="stable")[:, :k])


def test_reopen_with_same_provenance_resumes_and_keeps_data(tmp_path):
    spec = make_spec()
    g = create_store(tmp_path / "s.zarr", spec, PROV)
    data = write_unit(g, spec, 0, 0)
    later = PROV | {"created": "2026-06-01", "versions": {"zarr": "9.9"}}  # informational fields differ
    g2 = create_store(tmp_path / "s.zarr", spec, later)
    assert done_mask(g2)[0, 0]
    np.testing.assert_array_equal(read_train_unit(g2, 0, 0).topk_classes, data["topk_classes"])
    write_unit(g2, spec, 1, 1)
    assert done_mask(open_store(tmp_path / "s.zarr")).sum() == 2
    assert open_store(tmp_path / "s.zarr").attrs["provenance"]["created"] == PROV["created"]


def test_create_store_with_other_provenance_names_field_and_values(tmp_path):
    create_store(tmp_path / "s.zarr", make_spec(), PROV)
    with pytest.raises(ProvenanceMismatch) as err:
        create_store(tmp_path / "s.zarr", make_spec(), PROV | {"teacher_sha256": "cd34" * 16})
    msg = str(err.value)
    assert "'teacher_sha256'" in msg and "ab12ab12" in msg and "cd34cd34" in msg
    assert err.value.fields == ["teacher_sha256"]


def test_create_store_with_other_spec_is_refused(tmp_path):
    create_store(tmp_path / "s.zarr", make_spec(), PROV)
    with pytest.raises(ProvenanceMismatch, match=r"spec\.epochs.*store has 2, this run expects 3"):
        create_store(tmp_path / "s.zarr", make_spec(epochs=3), PROV)


@pytest.mark.parametrize("field", ["teacher_sha256", "aug_hash", "manifest_fingerprint"])
def test_open_store_refuses_other_identity(tmp_path, field):
    create_store(tmp_path / "s.zarr", make_spec(), PROV)
    open_store(tmp_path / "s.zarr", expected=PROV)  # same run: accepted
    with pytest.raises(ProvenanceMismatch, match=f"provenance field '{field}' differs: store has") as err:
        open_store(tmp_path / "s.zarr", expected=PROV | {field: "0123"})
    assert "this run expects '0123'" in str(err.value)


def test_open_store_lists_every_differing_field(tmp_path):
    create_store(tmp_path / "s.zarr", make_spec(), PROV)
    with pytest.raises(ProvenanceMismatch) as err:
        open_store(tmp_path / "s.zarr", expected={"seed": 1, "aug_hash": "x", "created": "ignored"})
    assert err.value.fields == ["aug_hash", "seed"]


def test_open_store_missing_path_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="not found"):
        open_store(tmp_path / "nope.zarr")
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(StoreError, match="not a logit store"):
        open_store(tmp_path / "plain.zarr")


def test_describe_reports_epochs_k_and_bytes(tmp_path):
    spec = make_spec()
    g = create_store(tmp_path / "s.zarr", spec, PROV)
    for s in range(3):
        write_unit(g, spec, 1, s)
    write_unit(g, spec, 0, 0)
    text = describe(tmp_path / "s.zarr")
    assert "E=2" in text and "K=3" in text and "C=10" in text
    assert "epochs complete: 1/2 (units done 4/6)" in text
    assert "fully done epochs: [1]" in text
    assert "val done: 0/2" in text
    assert "bytes on disk: " in text and "teacher_sha256: " + PROV["teacher_sha256"] in text


def test_label_dtype_follows_class_count(tmp_path):
    assert make_spec().label_dtype == np.uint16
    big = StoreSpec(num_classes=70000, epochs=1, topk=2, train_ranges=((0, 2),), val_ranges=())
    assert big.label_dtype == np.int32
    g = create_store(tmp_path / "big.zarr", big, {"num_classes": 70000})
    assert g["train/topk_classes"].dtype == np.int32 and g["train/label"].dtype == np.int32
    assert create_store(tmp_path / "s.zarr", make_spec(), PROV)["train/topk_classes"].dtype == np.uint16


@pytest.mark.parametrize(
    "ranges, match",
    [
        (((0, 4), (5, 8)), "contiguous"),
        (((1, 4), (4, 8)), "contiguous"),
        (((0, 4), (4, 6), (6, 10)), "same size except the last"),
        (((0, 4), (4, 9)), "same size except the last"),
        ((), "at least one"),
    ],
)
def test_bad_spec_is_a_clear_value_error(ranges, match):
    with pytest.raises(ValueError, match=match):
        make_spec(train_ranges=ranges)


def test_writer_rejects_bad_shapes_and_unsorted_topk(tmp_path):
    spec = make_spec()
    g = create_store(tmp_path / "s.zarr", spec, PROV)
    _, data = unit_data(spec, 0)
    with pytest.raises(ValueError, match=r"shard=0\).*topk_logits has shape \(3, 3\), expected \(4, 3\)"):
        write_train_unit(g, 0, 0, **(data | {"topk_logits": data["topk_logits"][:3]}))
    with pytest.raises(ValueError, match="sorted"):
        write_train_unit(g, 0, 0, **(data | {"topk_logits": data["topk_logits"][:, ::-1]}))
    with pytest.raises(ValueError, match=r"topk_classes values must be in \[0, 10\)"):
        write_train_unit(g, 0, 0, **(data | {"topk_classes": data["topk_classes"].astype(int) + 10}))
    assert not done_mask(g).any()


def test_val_round_trip_and_missing_val_shard(tmp_path):
    spec = make_spec()
    g = create_store(tmp_path / "s.zarr", spec, PROV)
    logits = logits_for(5, seed=7)
    tl, tc, hl, lse = topk_from_logits(logits, 3)
    label = np.arange(5)
    write_val_unit(
        g, 1, topk_logits=tl[3:], topk_classes=tc[3:], logsumexp=lse[3:], label=label[3:]
    )
    with pytest.raises(MissingUnit, match=r"val shards \[0\]"):
        read_val(g)
    write_val_unit(
        g, 0, topk_logits=tl[:3], topk_classes=tc[:3], logsumexp=lse[:3], label=label[:3]
    )
    v = read_val(open_store(tmp_path / "s.zarr"))
    np.testing.assert_array_equal(v.topk_classes, tc)
    np.testing.assert_array_equal(v.label, label)
    np.testing.assert_array_equal(v.topk_logits, tl.astype(np.float32))


def test_interrupted_creation_is_completed_on_reopen(tmp_path):
    spec = make_spec()
    create_store(tmp_path / "s.zarr", spec, PROV)
    shutil.rmtree(tmp_path / "s.zarr" / "train" / "logsumexp")  # as if creation stopped before this array
    g = create_store(tmp_path / "s.zarr", spec, PROV)
    write_unit(g, spec, 0, 0)
    assert read_train_unit(open_store(tmp_path / "s.zarr"), 0, 0).logsumexp.shape == (4,)


def _write_in_child(path: str, epoch: int, shard: int) -> None:
    spec = make_spec()
    g = create_store(path, spec, PROV)
    write_unit(g, spec, epoch, shard)


@pytest.mark.slow
def test_concurrent_writes_from_two_processes_both_land(tmp_path):
    path = str(tmp_path / "s.zarr")
    create_store(path, make_spec(), PROV)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_in_child, args=(path, e, s)) for e, s in [(0, 1), (1, 1)]]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    r = open_store(path)
    assert done_mask(r).tolist() == [[False, True, False], [False, True, False]]
    expected = unit_data(make_spec(), 1, seed=101)[1]
    np.testing.assert_array_equal(read_train_unit(r, 1, 1).topk_classes, expected["topk_classes"])
    np.testing.assert_array_equal(r["train/label"][4:8], expected["label"])


def _files(path) -> list[str]:
    import os

    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def test_a_complete_epoch_packs_into_one_object_per_array_and_reads_back_the_same(tmp_path):
    from store import pack_epoch, packed_epochs, unpacked_complete

    spec = make_spec()
    g = create_store(tmp_path / "s.zarr", spec, PROV)
    written = {s: write_unit(g, spec, 0, s) for s in range(3)}
    write_unit(g, spec, 1, 0)
    before = {s: read_train_unit(g, 0, s) for s in range(3)}
    assert unpacked_complete(g) == [0]
    pack_epoch(g, 0)
    assert packed_epochs(g) == {0} and unpacked_complete(g) == [] and done_mask(g)[0].all()
    files = _files(tmp_path / "s.zarr")
    for name in ("topk_logits", "topk_classes", "logsumexp"):
        assert sum(f.startswith(f"train/{name}/c/") for f in files) == 1  # the epoch is one object
        assert not any(f.startswith(f"stage/train/{name}/c/0/") for f in files)  # its staged chunks are gone
    assert "done/train/e000000.json" in files and not any(f.startswith("done/train/e000000-") for f in files)
    for s in range(3):
        after = read_train_unit(open_store(tmp_path / "s.zarr"), 0, s)
        for name in ("topk_logits", "topk_classes", "logsumexp", "label"):
            np.testing.assert_array_equal(getattr(after, name), getattr(before[s], name))
        assert after.plan == before[s].plan == plan_digest(*written[s]["plan"])
    assert read_train_unit(g, 1, 0).plan == plan_digest(*unit_data(spec, 0, seed=100)[1]["plan"])  # still staged


def test_damage_in_a_packed_epoch_is_found_and_the_epoch_unpacked_but_for_that_unit(tmp_path):
    from store import DamagedUnit, pack_epoch, packed_epochs, unpack_epoch

    spec = make_spec()
    path = tmp_path / "s.zarr"
    g = create_store(path, spec, PROV)
    for s in range(3):
        write_unit(g, spec, 0, s)
    pack_epoch(g, 0)
    obj = path / "train" / "logsumexp" / "c" / "0" / "0"
    raw = bytearray(obj.read_bytes())
    raw[10] ^= 0xFF  # inside the first unit's chunk
    obj.write_bytes(bytes(raw))
    with pytest.raises(DamagedUnit, match=r"\(epoch 0, shard 0\)"):
        read_train_unit(open_store(path), 0, 0)
    read_train_unit(open_store(path), 0, 2)  # the other units' bytes are intact: a chunk is read by its range
    unpack_epoch(g, 0, {0})
    assert packed_epochs(g) == set() and done_mask(g)[0].tolist() == [False, True, True]
    write_unit(g, spec, 0, 0)
    pack_epoch(g, 0)
    assert read_train_unit(open_store(path), 0, 0).plan is not None


def test_a_packer_killed_after_its_record_leaves_leftovers_that_tidy_removes(tmp_path, monkeypatch):
    import store.pack as pack

    spec = make_spec()
    g = create_store(tmp_path / "s.zarr", spec, PROV)
    for s in range(3):
        write_unit(g, spec, 0, s)
    monkeypatch.setattr(pack, "_drop_staged", lambda group, epoch: None)  # killed right after the epoch record
    pack.pack_epoch(g, 0)
    monkeypatch.undo()
    assert any(f.startswith("done/train/e000000-") for f in _files(tmp_path / "s.zarr"))
    pack.tidy(g)
    files = _files(tmp_path / "s.zarr")
    assert not any(f.startswith("done/train/e000000-") or f.startswith("stage/train/topk_logits/c/0/") for f in files)
    assert done_mask(g)[0].all()
