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
from pipeline.audit import rankings, tables
from pipeline.data.labels import read_relabel
from pipeline.data.shards import ShardError, load_manifest, open_shards, run_manifest
from pipeline.views import canary
from stages import audit, audit_report, ingest

C = 4
NAMES = ["ant", "bee", "cat", "dog"]
E = 3
K = 2
UNDONE = (2, 1)  # (epoch, shard) left unwritten: its rows must not appear
STRENGTHS = (9.0, 7.0, 5.0)  # the planted confident contradictions (label pushed out of the top-k)
VAL_CONFIDENT, VAL_WEAK = 4, 9


@dataclass
class Planted:
    root: Path
    cfg: object
    store_path: Path
    shards: Path
    labels: np.ndarray
    val_labels: np.ndarray
    views: list[dict]  # one per stored train view: epoch, index, shard, label, teacher, kind, partner, lam, logits
    val_views: list[dict]
    clean_views: list[dict]  # one per training image: its evaluation view (the clean pass)
    confident: list[int]  # indices contradicted confidently, strongest first
    weak: int  # an index the teacher contradicts with p_teacher < 0.9
    plans: object  # (epoch, shard) -> (partner, kind, lam), as the store's provenance gives them


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


def _choose(plans, ranges, labels) -> tuple[list[int], int]:
    """Three indices (one per shard) that are unmixed in some stored epoch, and another for a weak contradiction."""
    unmixed = {i for e in range(E) for s, (a, b) in enumerate(ranges) for i in range(a, b)
               if plans(e, s)[1][i - a] == store.KIND_NONE and (e, s) != UNDONE}
    confident = [min(i for i in unmixed if a <= i < b) for a, b in ranges]
    weak = min(unmixed - set(confident))
    return confident, weak


def _plant(i: int, e: int, y: int, plan: tuple, labels, confident: list[int], weak: int) -> tuple[int, str]:
    """(teacher, how) for index i's view in epoch e with the given (kind, partner, lam)."""
    kind, partner, lam = plan
    if i in confident:
        return (y + 1) % C, str(STRENGTHS[confident.index(i)])  # on mixed views too: not suspect views there
    if i == weak:
        return (y + 2) % C, "weak"
    if kind != store.KIND_NONE and lam < 0.5 and labels[partner] != y:
        return int(labels[partner]), "9.0"  # the partner dominates the blend, and the teacher names it
    return y, "agree"


def build(tmp: Path) -> Planted:
    idx = make_idx(tmp / "idx", 25, 12, size=8, classes=C)
    cfg = make_config(tmp, {"source": "idx", "root": str(idx), "class_names": NAMES},
                      aug={"mix_prob": 0.4}, teacher={"epochs": E, "topk": K})
    shards = ingest.run(cfg, progress=False)
    m = load_manifest(shards)
    labels, val_labels = shard_labels(m.shard_paths("train")), shard_labels(m.shard_paths("val"))
    spec = store.StoreSpec(num_classes=C, epochs=E, topk=K, train_ranges=tuple(m.ranges("train")),
                           val_ranges=tuple(m.ranges("val")), clean_ranges=tuple(m.ranges("train")))
    pool = canary.pick_pool(m)  # the view canary, as the teacher stage records it
    prov = {"manifest_fingerprint": m.fingerprint, "num_classes": C, "epochs": E, "topk": K,
            "aug": cfg.aug.model_dump(mode="json"), "seed": cfg.seed, "views": canary.make_canary(pool, cfg.aug, 0)}
    group = store.create_store(cfg.store.path, spec, prov)
    canary.record_canary(group, pool)
    plans = tables.store_plans(group)
    confident, weak = _choose(plans, spec.train_ranges, labels)
    rng = np.random.default_rng(0)
    views = []
    for e in range(E):
        for s, (a, b) in enumerate(spec.train_ranges):
            if (e, s) == UNDONE:
                continue
            partner, kind, lam = plans(e, s)
            rows = []
            for i in range(a, b):
                y, view = int(labels[i]), (int(kind[i - a]), int(partner[i - a]), float(lam[i - a]))
                teacher, how = _plant(i, e, y, view, labels, confident, weak)
                x = logits_for(rng, y, teacher, how)
                assert int(np.argmax(x)) == teacher
                rows.append(x)
                views.append(dict(epoch=e, index=i, shard=s, label=y, teacher=teacher, kind=view[0],
                                  partner=view[1], lam=view[2], logits=x))
            tl, tc, _, lse = store.topk_from_logits(np.stack(rows), K)
            store.write_train_unit(group, e, s, topk_logits=tl, topk_classes=tc, logsumexp=lse, label=labels[a:b],
                                   plan=(partner, kind, lam))
    val_views = _write_eval_split(group, "val", spec.val_ranges, val_labels, rng,
                                  {VAL_CONFIDENT: (1, "8.0"), VAL_WEAK: (2, "weak")})
    # the clean pass: the confident indices contradicted (label pushed out of the top-k), the weak one with
    # the label second, every other image agreed with
    plant = {i: (1, str(STRENGTHS[n])) for n, i in enumerate(confident)} | {weak: (2, "weak")}
    clean_views = _write_eval_split(group, "clean", spec.clean_ranges, labels, rng, plant)
    store.finalize(cfg.store.path)
    return Planted(tmp, cfg, Path(cfg.store.path), shards, labels, val_labels, views, val_views, clean_views,
                   confident, weak, plans)


def _write_eval_split(group, split: str, ranges, labels, rng, plant: dict[int, tuple[int, str]]) -> list[dict]:
    """Units of evaluation views: the teacher agrees with every label but the planted ones, which it names
    ``label + offset`` with the given strength."""
    out = []
    for s, (a, b) in enumerate(ranges):
        rows = []
        for i in range(a, b):
            y = int(labels[i])
            offset, how = plant.get(i, (0, "agree"))
            x = logits_for(rng, y, (y + offset) % C, how)
            rows.append(x)
            out.append(dict(index=i, shard=s, label=y, teacher=(y + offset) % C, logits=x))
        tl, tc, _, lse = store.topk_from_logits(np.stack(rows), K)
        store.write_val_unit(group, s, topk_logits=tl, topk_classes=tc, logsumexp=lse, label=labels[a:b],
                             split=split)
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    return build(tmp_path_factory.mktemp("audit"))


def suspect_views(planted: Planted, i: int) -> tuple[int, int]:
    """(unmixed views of index i that are stored, those the teacher contradicts confidently)."""
    un = [v for v in planted.views if v["index"] == i and v["kind"] == store.KIND_NONE]
    return len(un), sum(v["teacher"] != v["label"] and i in planted.confident for v in un)


def disagreement(views: list[dict]) -> float:
    return sum(v["teacher"] != v["label"] for v in views) / len(views)


# --------------------------------------------------------------------------------------------------
# store.frames


def test_train_frame_has_one_row_per_done_view(planted):
    g = store.open_store(planted.store_path)
    df = store.train_frame(g, planted.plans)
    assert len(df) == E * 25 - 10 == len(planted.views)
    assert list(zip(df["epoch"], df["index"], strict=True)) == [(v["epoch"], v["index"]) for v in planted.views]
    assert not ((df["epoch"] == UNDONE[0]) & (df["shard"] == UNDONE[1])).any()
    assert df["teacher"].tolist() == [v["teacher"] for v in planted.views]
    assert df["label"].tolist() == [v["label"] for v in planted.views]
    assert list(df["kind"].cat.categories) == ["none", "mixup", "cutmix"]
    assert df["kind"].tolist() == [store.KIND_NAMES[v["kind"]] for v in planted.views]
    plans = planted.plans
    assert len(store.train_frame(g, plans, [1])) == 25 and set(store.train_frame(g, plans, [2])["shard"]) == {0, 2}
    assert store.train_frame(g, plans, []).empty
    with pytest.raises(ValueError, match="epochs"):
        store.train_frame(g, plans, [E])


def test_train_frame_probabilities_match_the_softmax(planted):
    df = store.train_frame(store.open_store(planted.store_path), planted.plans)
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
    df = store.train_frame(store.open_store(planted.store_path), planted.plans, classes=NAMES)
    assert df["partner"].tolist() == [v["partner"] for v in planted.views]
    np.testing.assert_allclose(df["lam"], [v["lam"] for v in planted.views], rtol=1e-6)
    assert df["partner_label"].tolist() == [int(planted.labels[v["partner"]]) for v in planted.views]
    mixed = df[df["kind"] != "none"]
    assert len(mixed) and (mixed["lam"] < 0.5).any() and (mixed["lam"] >= 0.5).any()
    own = mixed["lam"] >= 0.5  # the label weighing more in the blend dominates
    assert (mixed.loc[own, "dominant"] == mixed.loc[own, "label"]).all()
    assert (mixed.loc[~own, "dominant"] == mixed.loc[~own, "partner_label"]).all()
    assert df["label_name"].tolist() == [NAMES[v["label"]] for v in planted.views]
    assert df["teacher_name"].tolist() == [NAMES[v["teacher"]] for v in planted.views]
    with pytest.raises(ValueError, match="3 names"):
        store.train_frame(store.open_store(planted.store_path), planted.plans, classes=NAMES[:3])
    other = lambda e, s: (planted.plans(e, s)[0], planted.plans(e, s)[1], planted.plans(e, s)[2] * 0.5)  # noqa: E731
    with pytest.raises(store.StoreError, match="not the one stored"):
        store.train_frame(store.open_store(planted.store_path), other)


def test_val_frame(planted):
    vf = store.val_frame(store.open_store(planted.store_path), classes=NAMES)
    assert vf["index"].tolist() == list(range(12))
    assert vf["shard"].tolist() == [0] * 10 + [1] * 2
    assert vf["teacher"].tolist() == [v["teacher"] for v in planted.val_views]
    p = softmax(np.stack([v["logits"] for v in planted.val_views]))
    np.testing.assert_allclose(vf["p_teacher"], p.max(axis=1), atol=4e-3)
    assert set(vf.columns) >= {"label", "p_label", "label_in_topk", "margin", "label_name", "teacher_name"}


def test_dense_all_mixed_store_weighs_each_view_by_its_blend(tmp_path):
    """k >= C (every label stored, p_label exact) and every view mixed, as with aug.mix_prob 1."""
    spec = store.StoreSpec(num_classes=3, epochs=1, topk=5, train_ranges=((0, 6),), val_ranges=(),
                           clean_ranges=((0, 6),))
    g = store.create_store(tmp_path / "s.zarr", spec, {"seed": 0})
    x = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    tl, tc, _, lse = store.topk_from_logits(x, 5)
    label = np.array([0, 1, 2, 0, 1, 2])
    partner = np.array([1, 0, 3, 2, 5, 4])
    plan = (partner, np.array([1, 2] * 3), np.full(6, 0.6))
    store.write_train_unit(g, 0, 0, topk_logits=tl, topk_classes=tc, logsumexp=lse, label=label, plan=plan)
    store.write_val_unit(g, 0, topk_logits=tl, topk_classes=tc, logsumexp=lse, label=label, split="clean")
    df = store.train_frame(g, lambda e, s: plan)
    assert df["label_in_topk"].all()
    np.testing.assert_allclose(df["p_label"], softmax(x)[np.arange(6), label], atol=4e-3)
    images = rankings.image_table(store.val_frame(g, split="clean"), ["a", "b", "c"], train=df)
    t = tables.audit_frames(df, None, images, ["a", "b", "c"], threshold=0.0)
    teacher = x.argmax(1)
    weighted = 0.6 * (teacher == label) + 0.4 * (teacher == label[partner])
    assert t.headline["weighted_agreement"] == pytest.approx(weighted.mean())
    assert t.headline["unmixed_samples"] == 0 and t.headline["unmixed_disagreement"] is None
    assert t.headline["mixed_samples"] == 6 and t.suspects.empty and t.suspects_val is None
    assert t.headline["val_disagreement"] is None and t.planted.empty
    files = audit_report.write_report(t, ["a", "b", "c"], tmp_path / "out")
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
    images = rankings.image_table(store.val_frame(g, classes=NAMES, split="clean"), NAMES)
    t = tables.audit_frames(store.train_frame(g, planted.plans, classes=NAMES), store.val_frame(g, classes=NAMES),
                                  images, NAMES, top=5)
    views, unmixed = planted.views, [v for v in planted.views if v["kind"] == store.KIND_NONE]
    h = t.headline
    mixed = [v for v in views if v["kind"] != store.KIND_NONE]
    assert h["train_samples"] == 65 and h["unmixed_samples"] == len(unmixed) and 0 < len(mixed) < 65
    assert h["train_disagreement"] == pytest.approx(disagreement(views))
    assert h["unmixed_disagreement"] == pytest.approx(disagreement(unmixed))
    assert h["val_disagreement"] == pytest.approx(2 / 12)
    dominant = [v["label"] if v["lam"] >= 0.5 else int(planted.labels[v["partner"]]) for v in mixed]
    assert h["mixed_samples"] == len(mixed)
    assert h["mixed_dominant_disagreement"] == pytest.approx(
        sum(v["teacher"] != d for v, d in zip(mixed, dominant, strict=True)) / len(mixed))
    outside = [v["teacher"] not in (v["label"], planted.labels[v["partner"]]) for v in mixed]
    assert h["mixed_outside_pair"] == pytest.approx(sum(outside) / len(mixed))

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
        lab = planted.labels
        weighted = [float(v["teacher"] == v["label"]) if v["kind"] == store.KIND_NONE else
                    v["lam"] * (v["teacher"] == v["label"]) + (1 - v["lam"]) * (v["teacher"] == lab[v["partner"]])
                    for v in ve]
        assert pe.loc[e, "weighted_agreement"] == pytest.approx(np.mean(weighted))

    conf = np.zeros((C, C), dtype=int)
    for v in planted.clean_views:
        conf[v["label"], v["teacher"]] += 1
    np.testing.assert_array_equal(t.confusion.to_numpy(), conf)
    assert list(t.confusion.index) == NAMES and list(t.confusion.columns) == NAMES
    assert h["clean_disagreement"] == pytest.approx(disagreement(planted.clean_views))
    off = conf.copy()
    np.fill_diagonal(off, 0)
    pairs = t.confused_pairs[t.confused_pairs["split"] == "clean"]
    assert pairs["count"].tolist() == sorted(off[off > 0].tolist(), reverse=True)[:5]
    first = pairs.iloc[0]
    assert first["share"] == pytest.approx(first["count"] / conf[first["label"]].sum())


def test_suspects_are_the_images_whose_label_the_teacher_gives_little(planted):
    g = store.open_store(planted.store_path)
    files = [f"train-{s:06d}.tar" for s in range(3)]
    images = rankings.image_table(store.val_frame(g, classes=NAMES, split="clean"), NAMES, files=files)
    ranked = tables.rank_images(images, threshold=0.05)
    conf = planted.confident  # one per shard, strengths 9 > 7 > 5: the label's probability grows in that order
    sus = ranked[ranked["suspect"]]
    assert sus["index"].tolist() == conf and sus["rank"].tolist() == [1, 2, 3]
    assert sus["key"].tolist() == [f"{i:08d}" for i in conf]
    assert sus["file"].tolist() == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    lab = planted.labels
    assert sus["label"].tolist() == [int(lab[i]) for i in conf]
    assert sus["teacher_name"].tolist() == [NAMES[(lab[i] + 1) % C] for i in conf]
    assert ranked["index"].iloc[3] == planted.weak  # contradicted, but with the label second: next, not a suspect
    assert (ranked["margin"] < 0).sum() == 4 and len(ranked) == len(lab)
    # the threshold: 0.5 adds the weak contradiction (p_label ~ 0.32), 0 leaves none
    assert planted.weak in tables.rank_images(images, threshold=0.5).query("suspect")["index"].tolist()
    assert not tables.rank_images(images, threshold=0.0)["suspect"].any()


def test_view_agreement_weighs_each_view_for_both_images_it_shows(planted):
    g = store.open_store(planted.store_path)
    agree = rankings.view_agreement(store.train_frame(g, planted.plans), len(planted.labels))
    for i in (planted.confident[0], planted.weak, 7):
        w = hit = n = 0.0
        for v in planted.views:
            own = 1.0 if v["kind"] == store.KIND_NONE else v["lam"]
            if v["index"] == i:
                n, w, hit = n + 1, w + own, hit + own * (v["teacher"] == v["label"])
            if v["kind"] != store.KIND_NONE and v["partner"] == i:
                n, w, hit = n + 1, w + 1 - own, hit + (1 - own) * (v["teacher"] == planted.labels[i])
        assert agree.loc[i, "views"] == n and agree.loc[i, "view_weight"] == pytest.approx(w)
        assert agree.loc[i, "view_agreement"] == pytest.approx(hit / w)


def test_run_writes_the_report(planted, tmp_path):
    out = tmp_path / "report"
    h = audit.run(planted.cfg, top=5, output=out)
    expected_files = [
        "per_class.csv", "per_epoch.csv", "confusion.csv", "confused_pairs.csv", "suspects.csv", "images.csv.gz",
        "confusion_val.csv", "suspects_val.csv", "audit.md", "audit.png", "suspects.png", "audit.json", "metrics.json",
    ]  # fmt: skip
    for f in expected_files:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "audit.json").read_text()) == h
    assert h["suspects"] == 3 and h["val_suspects"] == 1
    assert h["train_disagreement"] == pytest.approx(disagreement(planted.views))
    assert h["val_disagreement"] == pytest.approx(2 / 12)
    sus = pd.read_csv(out / "suspects.csv", dtype={"key": str})
    assert sus["key"].tolist() == [f"{i:08d}" for i in planted.confident]
    assert sus["file"].tolist() == [f"train-{s:06d}.tar" for s in range(3)]
    assert (planted.shards / sus["file"][0]).is_file()
    conf = pd.read_csv(out / "confusion.csv", index_col=0)
    assert list(conf.index) == NAMES and int(conf.to_numpy().sum()) == h["images"] == len(planted.labels)
    images = pd.read_csv(out / "images.csv.gz", dtype={"key": str})
    assert len(images) == len(planted.labels) and images["index"].head(3).tolist() == planted.confident
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == {"suspects": 3, "teacher_vs_label": h["clean_disagreement"]}
    assert (out / "suspects.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "audit.md").read_text()
    for text in ("# Teacher–label audit", "Mixed views", "Suspected wrong labels", f"{planted.confident[1]:08d}",
                 "![audit](audit.png)", "![top suspects](suspects.png)"):
        assert text in md
    assert "| teacher != label, val | 16.67% |" in md


def test_relabel_out_writes_the_suspects_in_the_format_data_relabel_reads(planted, tmp_path):
    path = tmp_path / "relabel.csv"
    h = audit.run(planted.cfg, top=3, output=tmp_path / "report", relabel_out=str(path), relabel_confidence=0.0,
                  sheet=0)
    fixes = read_relabel(str(path), len(planted.labels), NAMES)
    assert h["relabel_rows"] == 3 and [r.index for r in fixes] == sorted(planted.confident)
    assert all(r.label == (int(planted.labels[r.index]) + 1) % C for r in fixes)  # the teacher's class
    assert pd.read_csv(path)["label"].tolist()[0] == NAMES[(int(planted.labels[planted.confident[0]]) + 1) % C]
    audit.run(planted.cfg, top=3, output=tmp_path / "report", relabel_out=str(path), relabel_confidence=0.99,
              relabel_top=1, sheet=0)
    assert len(read_relabel(str(path), len(planted.labels), NAMES)) <= 1


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
    other = planted.cfg.store.model_copy(update={"path": str(tmp_path / "other.zarr")})
    cfg = planted.cfg.model_copy(update={"store": other})
    with pytest.raises(store.ProvenanceMismatch, match="manifest_fingerprint"):
        audit.run(cfg, output=tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# notebooks/audit.ipynb


def test_notebook_runs_against_the_tiny_store(planted, monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    kernelspec = pytest.importorskip("jupyter_client.kernelspec")
    if "python3" not in kernelspec.find_kernel_specs():
        pytest.skip("no 'python3' Jupyter kernel: run `.venv/bin/python -m ipykernel install --sys-prefix`")
    nb = nbformat.read(ROOT / "notebooks" / "audit.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit with outputs cleared"
    monkeypatch.setenv("DISTILL_STORE", str(planted.store_path))
    monkeypatch.setenv("DISTILL_SHARDS", str(planted.shards))
    monkeypatch.setenv("DISTILL_AUDIT_OUT", str(tmp_path / "out"))
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    )
    client.execute()  # raises CellExecutionError naming the cell on any error
    text = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )  # fmt: skip
    assert "3 train suspects" in text and "1 val suspects" in text and "wrote 3 rows" in text
    relabel = pd.read_csv(tmp_path / "out" / "relabel.csv", dtype={"key": str})
    assert relabel["index"].tolist() == planted.confident
    assert (tmp_path / "out" / "suspects_notebook.png").is_file()


def test_run_audits_only_the_chosen_epochs(planted, tmp_path):
    h = audit.run(planted.cfg, top=3, output=tmp_path / "one", epochs=[1])
    assert h["epochs"] == [1] and h["train_samples"] == len([v for v in planted.views if v["epoch"] == 1])
    with pytest.raises(store.StoreError, match=f"holds epochs 0..{E - 1}"):
        audit.run(planted.cfg, top=3, output=tmp_path / "bad", epochs=[E])


def test_the_contact_sheet_shows_a_cmyk_jpeg_in_its_colours(tmp_path):
    """ImageNet holds CMYK JPEGs; the sheet shows the image as it looks (pure red stays red), not its CMYK bytes
    taken for RGBA (red's would be fully transparent)."""
    import io

    from PIL import Image

    red = Image.new("RGB", (40, 40), (255, 0, 0)).convert("CMYK")
    buf = io.BytesIO()
    red.save(buf, "JPEG")
    rows = pd.DataFrame([{"rank": 1, "index": 0, "label_name": "n01", "teacher_name": "n02", "p_teacher": 0.9}])
    path = audit_report.write_contact_sheet(rows, [Image.open(buf)], tmp_path / "sheet.png", "suspects")
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
    assert ((pixels[:, 0] > 200) & (pixels[:, 1] < 60) & (pixels[:, 2] < 60)).sum() > 100
