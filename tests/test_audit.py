"""The audit: store.frames and stages.audit on a tiny store with planted teacher errors, and the notebook.

The store is written without any model: synthetic logits whose argmax the test controls, so every
figure of the audit has an exact expected value computed here, independently of pandas.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, make_config, make_idx

import store
from pipeline import audit_tables
from pipeline.shards import ShardError, load_manifest, open_shards, run_manifest
from stages import audit, audit_report, ingest

C = 4
NAMES = ["ant", "bee", "cat", "dog"]
E = 3
K = 2
UNDONE = (2, 1)  # (epoch, shard) left unwritten: its rows must not appear
# index -> {epoch: strength}: the teacher names (label + 1) % C with a big logit, label pushed out of top-k
CONFIDENT = {3: {0: 9.0, 1: 9.0, 2: 9.0}, 17: {0: 7.0, 1: 7.0}, 22: {2: 5.0}}
WEAK = {7: {0, 1, 2}}  # the teacher names (label + 2) % C with p_teacher < 0.9
CUTMIX_AGREE = {(0, 5)}  # a mixed view where the teacher agrees with the label
MIXED_TO_PARTNER = 12  # mixed in every epoch, lam 0.3, teacher = the partner's label (confidently)
MIXED_CONTRADICTED = {(1, 17)}  # a confident contradiction on a mixed view: not a suspect view
VAL_CONFIDENT, VAL_WEAK = 4, 9


@dataclass
class Planted:
    root: Path
    cfg: object
    store_path: Path
    shards: Path
    labels: np.ndarray
    val_labels: np.ndarray
    views: list[dict]  # one per stored train view: epoch, index, shard, label, teacher, kind, logits
    val_views: list[dict]


def shard_labels(paths: list[str]) -> np.ndarray:
    """Labels in index order, read from the shards' .cls members (independent of the project's reader)."""
    out: dict[int, int] = {}
    for p in paths:
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".cls"):
                    out[int(m.name.split(".")[0])] = int(tf.extractfile(m).read())
    return np.array([out[i] for i in range(len(out))])


def logits_for(rng: np.random.Generator, label: int, teacher: int, how: str) -> np.ndarray:
    x = rng.uniform(-0.5, 0.5, C).astype(np.float32)
    if how == "agree":
        x[label] = 3.0
    elif how == "weak":
        x[teacher], x[label] = 2.0, 1.5
    else:  # confident, strength given as a float string
        x[teacher], x[label] = float(how), -6.0
    return x


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x.astype(np.float64) - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def build(tmp: Path) -> Planted:
    idx = make_idx(tmp / "idx", 25, 12, size=8, classes=C)
    cfg = make_config(
        tmp,
        {"source": "idx", "root": str(idx), "class_names": NAMES},
        teacher={"epochs": E, "topk": K},
    )
    shards = ingest.run(cfg, progress=False)
    m = load_manifest(shards)
    labels = shard_labels(m.shard_paths("train"))
    val_labels = shard_labels(m.shard_paths("val"))
    spec = store.StoreSpec(
        num_classes=C,
        epochs=E,
        topk=K,
        train_ranges=tuple(m.ranges("train")),
        val_ranges=tuple(m.ranges("val")),
    )
    prov = {"manifest_fingerprint": m.fingerprint, "num_classes": C, "epochs": E, "topk": K}
    group = store.create_store(cfg.store.path, spec, prov)
    rng = np.random.default_rng(0)
    partner_of_12 = next(j for j in range(10, 20) if labels[j] != labels[MIXED_TO_PARTNER])
    views = []
    for e in range(E):
        for s, (a, b) in enumerate(spec.train_ranges):
            if (e, s) == UNDONE:
                continue
            rows = []
            for i in range(a, b):
                y = int(labels[i])
                kind, partner, lam, teacher, how = store.KIND_NONE, i, 1.0, y, "agree"
                if e in CONFIDENT.get(i, {}):
                    teacher, how = (y + 1) % C, str(CONFIDENT[i][e])
                elif e in WEAK.get(i, set()):
                    teacher, how = (y + 2) % C, "weak"
                if (e, i) in MIXED_CONTRADICTED:
                    kind, partner, lam = store.KIND_CUTMIX, i - 1, 0.8
                if (e, i) in CUTMIX_AGREE:
                    kind, partner, lam = store.KIND_CUTMIX, i + 1, 0.7
                if i == MIXED_TO_PARTNER:
                    kind, partner, lam = store.KIND_MIXUP, partner_of_12, 0.3
                    teacher, how = int(labels[partner_of_12]), "9.0"
                x = logits_for(rng, y, teacher, how)
                assert int(np.argmax(x)) == teacher
                rows.append(x)
                views.append(
                    dict(epoch=e, index=i, shard=s, label=y, teacher=teacher, kind=kind, partner=partner,
                         lam=lam, logits=x)
                )  # fmt: skip
            tl, tc, hl, lse = store.topk_from_logits(np.stack(rows), K)
            unit = views[-(b - a) :]
            store.write_train_unit(
                group, e, s, topk_logits=tl, topk_classes=tc, hard_label=hl, logsumexp=lse,
                partner=np.array([v["partner"] for v in unit]), lam=np.array([v["lam"] for v in unit]),
                kind=np.array([v["kind"] for v in unit]), label=labels[a:b],
            )  # fmt: skip
    val_views = []
    for s, (a, b) in enumerate(spec.val_ranges):
        rows = []
        for i in range(a, b):
            y = int(val_labels[i])
            teacher, how = y, "agree"
            if i == VAL_CONFIDENT:
                teacher, how = (y + 1) % C, "8.0"
            elif i == VAL_WEAK:
                teacher, how = (y + 2) % C, "weak"
            x = logits_for(rng, y, teacher, how)
            rows.append(x)
            val_views.append(dict(index=i, shard=s, label=y, teacher=teacher, logits=x))
        tl, tc, hl, lse = store.topk_from_logits(np.stack(rows), K)
        store.write_val_unit(
            group, s, topk_logits=tl, topk_classes=tc, hard_label=hl, logsumexp=lse, label=val_labels[a:b]
        )
    store.finalize(cfg.store.path)
    return Planted(tmp, cfg, Path(cfg.store.path), shards, labels, val_labels, views, val_views)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    return build(tmp_path_factory.mktemp("audit"))


def disagreement(views: list[dict]) -> float:
    return sum(v["teacher"] != v["label"] for v in views) / len(views)


# --------------------------------------------------------------------------------------------------
# store.frames


def test_train_frame_has_one_row_per_done_view(planted):
    g = store.open_store(planted.store_path)
    df = store.train_frame(g)
    assert len(df) == E * 25 - 10 == len(planted.views)
    assert list(zip(df["epoch"], df["index"], strict=True)) == [(v["epoch"], v["index"]) for v in planted.views]
    assert not ((df["epoch"] == UNDONE[0]) & (df["shard"] == UNDONE[1])).any()
    assert df["teacher"].tolist() == [v["teacher"] for v in planted.views]
    assert df["label"].tolist() == [v["label"] for v in planted.views]
    assert list(df["kind"].cat.categories) == ["none", "mixup", "cutmix"]
    assert df["kind"].tolist() == [store.KIND_NAMES[v["kind"]] for v in planted.views]
    assert len(store.train_frame(g, [1])) == 25 and set(store.train_frame(g, [2])["shard"]) == {0, 2}
    assert store.train_frame(g, []).empty
    with pytest.raises(ValueError, match="epochs"):
        store.train_frame(g, [E])


def test_train_frame_probabilities_match_the_softmax(planted):
    df = store.train_frame(store.open_store(planted.store_path))
    p = softmax(np.stack([v["logits"] for v in planted.views]))
    top2 = np.sort(p, axis=1)[:, ::-1]
    np.testing.assert_allclose(df["p_teacher"], top2[:, 0], atol=4e-3)
    np.testing.assert_allclose(df["margin"], top2[:, 0] - top2[:, 1], atol=4e-3)
    labels = np.array([v["label"] for v in planted.views])
    p_true = p[np.arange(len(p)), labels]
    in_top = np.argsort(-p, axis=1, kind="stable")[:, :K] == labels[:, None]
    assert df["label_in_topk"].tolist() == in_top.any(axis=1).tolist()
    exact = df["label_in_topk"].to_numpy()
    np.testing.assert_allclose(df["p_label"][exact], p_true[exact], atol=4e-3)
    # not stored: the even-tail estimate (1 - p1 - p2) / (C - k)
    tail = (1 - top2[:, 0] - top2[:, 1]) / (C - K)
    assert (~exact).sum() >= 5  # the planted confident contradictions push the label out of the top-k
    np.testing.assert_allclose(df["p_label"][~exact], tail[~exact], atol=4e-3)


def test_train_frame_mix_plan_and_names(planted):
    df = store.train_frame(store.open_store(planted.store_path), classes=NAMES)
    assert df["partner"].tolist() == [v["partner"] for v in planted.views]
    np.testing.assert_allclose(df["lam"], [v["lam"] for v in planted.views], rtol=1e-6)
    assert df["partner_label"].tolist() == [int(planted.labels[v["partner"]]) for v in planted.views]
    mixed12 = df[df["index"] == MIXED_TO_PARTNER]
    assert (mixed12["dominant"] == mixed12["partner_label"]).all()  # lam 0.3: the partner dominates
    cut = df[(df["epoch"] == 0) & (df["index"] == 5)]
    assert cut["dominant"].item() == cut["label"].item()  # lam 0.7
    assert df["label_name"].tolist() == [NAMES[v["label"]] for v in planted.views]
    assert df["teacher_name"].tolist() == [NAMES[v["teacher"]] for v in planted.views]
    with pytest.raises(ValueError, match="3 names"):
        store.train_frame(store.open_store(planted.store_path), classes=NAMES[:3])


def test_val_frame(planted):
    vf = store.val_frame(store.open_store(planted.store_path), classes=NAMES)
    assert vf["index"].tolist() == list(range(12))
    assert vf["shard"].tolist() == [0] * 10 + [1] * 2
    assert vf["teacher"].tolist() == [v["teacher"] for v in planted.val_views]
    p = softmax(np.stack([v["logits"] for v in planted.val_views]))
    np.testing.assert_allclose(vf["p_teacher"], p.max(axis=1), atol=4e-3)
    assert set(vf.columns) >= {"label", "p_label", "label_in_topk", "margin", "label_name", "teacher_name"}


def test_dense_all_mixed_store_has_no_unmixed_figures(tmp_path):
    """k >= C (every label stored, p_label exact) and every view mixed, as with aug.mix_prob 1."""
    spec = store.StoreSpec(num_classes=3, epochs=1, topk=5, train_ranges=((0, 6),), val_ranges=())
    g = store.create_store(tmp_path / "s.zarr", spec, {"seed": 0})
    x = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    tl, tc, hl, lse = store.topk_from_logits(x, 5)
    label = np.array([0, 1, 2, 0, 1, 2])
    store.write_train_unit(
        g, 0, 0, topk_logits=tl, topk_classes=tc, hard_label=hl, logsumexp=lse, label=label,
        partner=np.array([1, 0, 3, 2, 5, 4]), lam=np.full(6, 0.6), kind=np.array([1, 2] * 3),
    )  # fmt: skip
    df = store.train_frame(g)
    assert df["label_in_topk"].all()
    np.testing.assert_allclose(df["p_label"], softmax(x)[np.arange(6), label], atol=4e-3)
    t = audit_tables.audit_frames(df, None, ["a", "b", "c"], threshold=0.0)
    assert t.headline["unmixed_samples"] == 0 and t.headline["unmixed_disagreement"] is None
    assert t.headline["mixed_samples"] == 6 and t.suspects.empty and t.suspects_val is None
    assert t.headline["val_disagreement"] is None
    files = audit_report.write_report(t, ["a", "b", "c"], tmp_path / "out")
    assert "no unmixed train views" in (tmp_path / "out" / "audit.md").read_text()
    assert all((tmp_path / "out" / f).is_file() for f in files)


# --------------------------------------------------------------------------------------------------
# stages.audit


def expected_per_class(views: list[dict], pred=lambda v: True) -> tuple[list[int], list[int]]:
    n, d = [0] * C, [0] * C
    for v in views:
        if pred(v):
            n[v["label"]] += 1
            d[v["label"]] += v["teacher"] != v["label"]
    return n, d


def test_audit_tables_match_what_was_planted(planted):
    g = store.open_store(planted.store_path)
    t = audit_tables.audit_frames(store.train_frame(g, classes=NAMES), store.val_frame(g, classes=NAMES), NAMES, top=5)
    views, unmixed = planted.views, [v for v in planted.views if v["kind"] == store.KIND_NONE]
    h = t.headline
    mixed = [v for v in views if v["kind"] != store.KIND_NONE]
    assert h["train_samples"] == 65 and h["unmixed_samples"] == len(unmixed) == 65 - 4
    assert h["train_disagreement"] == pytest.approx(disagreement(views))
    assert h["unmixed_disagreement"] == pytest.approx(disagreement(unmixed))
    assert h["val_disagreement"] == pytest.approx(2 / 12)
    # mixed views: index 12 x2 (teacher = the partner's, dominant, label), (0, 5) agrees, (1, 17) contradicts
    assert h["mixed_samples"] == len(mixed) == 4
    assert h["mixed_dominant_disagreement"] == pytest.approx(1 / 4)
    outside = [v["teacher"] not in (v["label"], planted.labels[v["partner"]]) for v in mixed]
    assert h["mixed_outside_pair"] == pytest.approx(sum(outside) / 4)

    pc = t.per_class.set_index("class")
    for prefix, pred in (("train", lambda v: True), ("unmixed", lambda v: v["kind"] == store.KIND_NONE)):
        n, d = expected_per_class(views, pred)
        assert pc[f"{prefix}_samples"].tolist() == n
        assert pc[f"{prefix}_disagree"].tolist() == d
        np.testing.assert_allclose(pc[f"{prefix}_disagreement"], np.array(d) / np.array(n))
    n, d = expected_per_class(planted.val_views)
    assert pc["val_samples"].tolist() == n and pc["val_disagree"].tolist() == d
    assert pc["name"].tolist() == NAMES

    pe = t.per_epoch.set_index("epoch")
    for e in range(E):
        ve = [v for v in views if v["epoch"] == e]
        ue = [v for v in ve if v["kind"] == store.KIND_NONE]
        assert pe.loc[e, "samples"] == len(ve) and pe.loc[e, "unmixed_samples"] == len(ue)
        assert pe.loc[e, "disagreement"] == pytest.approx(disagreement(ve))
        assert pe.loc[e, "unmixed_disagreement"] == pytest.approx(disagreement(ue))

    conf = np.zeros((C, C), dtype=int)
    for v in unmixed:
        conf[v["label"], v["teacher"]] += 1
    np.testing.assert_array_equal(t.confusion.to_numpy(), conf)
    assert list(t.confusion.index) == NAMES and list(t.confusion.columns) == NAMES
    off = conf.copy()
    np.fill_diagonal(off, 0)
    pairs = t.confused_pairs[t.confused_pairs["split"] == "train_unmixed"]
    assert pairs["count"].tolist() == sorted(off[off > 0].tolist(), reverse=True)[:5]
    first = pairs.iloc[0]
    assert first["share"] == pytest.approx(first["count"] / conf[first["label"]].sum())


def test_suspects_are_exactly_the_confident_unmixed_contradictions(planted):
    g = store.open_store(planted.store_path)
    files = [f"train-{s:06d}.tar" for s in range(3)]
    sus = audit_tables.suspects(store.train_frame(g, classes=NAMES), NAMES, 0.9, files)
    # sorted by mean p_teacher: strengths 9 > 7 > 5; 17 is mixed in epoch 1 and undone in epoch 2
    assert sus["index"].tolist() == [3, 17, 22]
    assert sus["key"].tolist() == ["00000003", "00000017", "00000022"]
    assert sus["file"].tolist() == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sus["epochs_contradicted"].tolist() == [3, 1, 1]
    assert sus["epochs_unmixed"].tolist() == [3, 1, 3]
    lab = planted.labels
    assert sus["label"].tolist() == [int(lab[i]) for i in (3, 17, 22)]
    assert sus["teacher"].tolist() == [int(lab[i] + 1) % C for i in (3, 17, 22)]
    assert sus["teacher_name"].tolist() == [NAMES[(lab[i] + 1) % C] for i in (3, 17, 22)]
    assert (sus["mean_p_teacher"] >= 0.9).all() and sus["mean_p_teacher"].is_monotonic_decreasing
    # the threshold: 0.995 drops index 22 (strength 5: p ~ 0.99), 0.4 adds the weak contradiction (p ~ 0.53)
    assert audit_tables.suspects(store.train_frame(g), NAMES, 0.995)["index"].tolist() == [3, 17]
    assert 7 in audit_tables.suspects(store.train_frame(g), NAMES, 0.4)["index"].tolist()
    vs = audit_tables.suspects(store.val_frame(g), NAMES, 0.9, ["val-000000.tar", "val-000001.tar"])
    assert vs["index"].tolist() == [VAL_CONFIDENT] and vs["file"].tolist() == ["val-000000.tar"]


def test_run_writes_the_report(planted, tmp_path):
    out = tmp_path / "report"
    h = audit.run(planted.cfg, top=5, output=out)
    expected_files = [
        "per_class.csv", "per_epoch.csv", "confusion.csv", "confused_pairs.csv", "suspects.csv",
        "confusion_val.csv", "suspects_val.csv", "audit.md", "audit.png", "audit.json",
    ]  # fmt: skip
    for f in expected_files:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "audit.json").read_text()) == h
    assert h["suspects"] == 3 and h["val_suspects"] == 1
    assert h["train_disagreement"] == pytest.approx(disagreement(planted.views))
    assert h["val_disagreement"] == pytest.approx(2 / 12)
    sus = pd.read_csv(out / "suspects.csv", dtype={"key": str})
    assert sus["key"].tolist() == ["00000003", "00000017", "00000022"]
    assert sus["file"].tolist() == [f"train-{s:06d}.tar" for s in range(3)]
    assert (planted.shards / sus["file"][0]).is_file()
    conf = pd.read_csv(out / "confusion.csv", index_col=0)
    assert list(conf.index) == NAMES and int(conf.to_numpy().sum()) == h["unmixed_samples"]
    md = (out / "audit.md").read_text()
    for text in ("# Teacher–label audit", "Mixed views", "Suspected label noise", "00000017", "![audit](audit.png)"):
        assert text in md
    assert "| teacher != label, val | 16.67% |" in md


def test_run_default_output_and_missing_manifest(planted, tmp_path):
    cfg = make_config(
        tmp_path,
        {"source": "idx", "root": str(planted.root / "idx"), "shards": str(tmp_path / "no-shards")},
        store={"path": str(planted.store_path)},
    )
    h = audit.run(cfg, top=3)
    out = tmp_path / "runs" / "audit"  # next to evaluate.output (runs/eval)
    assert h["output"] == str(out) and (out / "audit.json").is_file()
    assert h["suspects"] == 3
    assert pd.read_csv(out / "per_class.csv")["name"].astype(str).tolist() == ["0", "1", "2", "3"]
    assert "manifest missing" in (out / "audit.md").read_text()


def test_run_manifest_is_the_manifest_the_teacher_run_cut(planted, tmp_path):
    full = load_manifest(planted.shards)
    n = len(full.shards("train"))
    assert n >= 2
    cut = make_config(tmp_path, {"source": "idx", "root": str(planted.root / "idx"), "shards": str(planted.shards),
                                 "train_shards": n - 1})
    assert run_manifest(planted.shards, n - 1).fingerprint == open_shards(cut).fingerprint != full.fingerprint
    assert run_manifest(planted.shards, n).fingerprint == full.fingerprint


def test_run_refuses_a_broken_manifest_instead_of_ignoring_it(planted, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{not json")
    cfg = make_config(
        tmp_path,
        {"source": "idx", "root": str(planted.root / "idx"), "shards": str(shards)},
        store={"path": str(planted.store_path)},
    )
    with pytest.raises(ShardError, match="manifest.json"):
        audit.run(cfg, top=3)


def test_run_refuses_a_store_from_other_shards(planted, tmp_path):
    m = load_manifest(planted.shards)
    spec = store.StoreSpec(C, E, K, tuple(m.ranges("train")), tuple(m.ranges("val")))
    store.create_store(tmp_path / "other.zarr", spec, {"manifest_fingerprint": "0" * 64, "num_classes": C})
    other = planted.cfg.store.model_copy(update={"path": tmp_path / "other.zarr"})
    cfg = planted.cfg.model_copy(update={"store": other})
    with pytest.raises(store.ProvenanceMismatch, match="manifest_fingerprint"):
        audit.run(cfg, output=tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# notebooks/audit.ipynb


def test_notebook_runs_against_the_tiny_store(planted, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    kernelspec = pytest.importorskip("jupyter_client.kernelspec")
    if "python3" not in kernelspec.find_kernel_specs():
        pytest.skip("no 'python3' Jupyter kernel: run `.venv/bin/python -m ipykernel install --sys-prefix`")
    nb = nbformat.read(ROOT / "notebooks" / "audit.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit with outputs cleared"
    monkeypatch.setenv("DISTILL_STORE", str(planted.store_path))
    monkeypatch.setenv("DISTILL_SHARDS", str(planted.shards))
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    )
    client.execute()  # raises CellExecutionError naming the cell on any error
    text = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )  # fmt: skip
    assert "3 train suspects" in text and "1 val suspects" in text


def test_run_audits_only_the_chosen_epochs(planted, tmp_path):
    h = audit.run(planted.cfg, top=3, output=tmp_path / "one", epochs=[1])
    assert h["epochs"] == [1] and h["train_samples"] == len([v for v in planted.views if v["epoch"] == 1])
    with pytest.raises(store.StoreError, match=f"holds epochs 0..{E - 1}"):
        audit.run(planted.cfg, top=3, output=tmp_path / "bad", epochs=[E])
