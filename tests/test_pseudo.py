"""Pseudo-labels (pipeline/train/pseudo.py) on the tiny iceberg demo with simple_cnn: fold k's pseudo rows come from
the source's fold-k model, never enter validation, respect threshold and max_share, and are recorded; a
changed source retrains; bad input is one line and exit 2."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cli_error, run_cli, write_yaml
from helpers import RUN, SRC, TRAIN, _tables, confident, craft_source, fold_pattern
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import pipeline.train.cv as cv
from pipeline.config.load import load_config
from pipeline.data.formats import read_table
from pipeline.data.table import Table
from pipeline.runs.predictions import read_predictions
from pipeline.train.job import FoldTrainer
from pipeline.train.pseudo import StackedImages, select
from pipeline.train.trainer import TRAIN_ONLY, UNUSED, batch_loss, mixed_loss


@pytest.fixture
def ice_config(make_config, iceberg_dir):
    """A config for the 120-row iceberg demo (3 folds, simple_cnn, one step per epoch)."""

    def make(name="exp", **sections):
        base = {
            "folds": {"n_splits": 3, "seed": 0},
            "model": {"backbone": "simple_cnn", "pretrained": False, "drop_rate": 0.0},
            "train": dict(TRAIN),
        }
        for k, v in sections.items():
            base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
        return make_config(iceberg_dir, "statoil_json", name=name, **base)

    return make


@pytest.fixture
def spy(monkeypatch):
    """What each job's trainer was given: {fold: (table, tr_idx, va_idx)}."""
    seen = {}

    class Spy(FoldTrainer):
        def __init__(self, **kw):
            super().__init__(**kw)
            seen[self.job.fold] = (self.table, self.tr_idx, self.va_idx)

    monkeypatch.setattr(cv, "FoldTrainer", Spy)  # the refits
    monkeypatch.setattr("pipeline.train.executors.FoldTrainer", Spy)  # the fold jobs
    return seen


def test_fold_k_trains_on_fold_k_labels_never_validates_them(ice_config, spy, capsys):
    path = ice_config(
        pseudo={"from": str(SRC), "threshold": 0.95, "weight": 0.3, "max_share": 1.0}, train={"refit": True}
    )
    assert run_cli("fold", path) == 0
    n_test = len(read_table(load_config(path), "test"))
    refit_rows = np.arange(0, n_test, 5)
    train, test, fold_of = craft_source(path, all_probs=confident(n_test, refit_rows, np.ones(len(refit_rows), int)))
    assert run_cli("train", path) == 0
    out = capsys.readouterr().out
    assert "pseudo: fold 1 trains on 10 test rows labelled by runs/comp/src's fold-1 model" in out
    real = set(train.ids)
    for k in (0, 1, 2):
        table, tr, va = spy[k]
        rows, labels = fold_pattern(n_test, k)
        assert set(table.ids[va]) == set(train.ids[fold_of == k])  # validation: fold k's real rows only
        pseudo_tr = [i for i in tr if table.ids[i] not in real]
        assert sorted(table.ids[pseudo_tr]) == sorted(test.ids[rows])  # this fold's own confident rows
        want = dict(zip(test.ids[rows], labels))
        assert all(table.labels[i] == want[table.ids[i]] for i in pseudo_tr)
        np.testing.assert_allclose(table.sample_weights[pseudo_tr], 0.3)
        assert (table.sample_weights[tr[np.isin(table.ids[tr], list(real))]] == 1).all()
        done = json.loads((RUN / f"fold_{k}" / "done.json").read_text())
        assert done["pseudo"]["rows"] == len(rows) and done["pseudo"]["per_class"] == {
            "ship": int((labels == 0).sum()),
            "iceberg": int((labels == 1).sum()),
        }
    table, tr, va = spy[-1]  # the refit: every real row and the all-fold file's confident rows
    assert len(va) == 0 and sorted(table.ids[tr]) == sorted(list(train.ids) + list(test.ids[refit_rows]))
    oof = read_predictions(RUN / "oof.csv", "oof")
    assert len(oof) == len(train) and set(oof["id"]) == real  # OOF: exactly the training rows, real labels
    assert (oof.set_index("id").loc[train.ids, "target"].to_numpy() == train.labels).all()
    info = json.loads((RUN / "pseudo.json").read_text())
    assert info["source"] == str(SRC) and info["threshold"] == 0.95 and info["weight"] == 0.3
    assert {k: v["rows"] for k, v in info["jobs"].items()} == {
        "fold_0": 10,
        "fold_1": 10,
        "fold_2": 10,
        "refit": len(refit_rows),
    }
    assert "from: runs/comp/src" in (RUN / "config.train.yaml").read_text()


def test_soft_labels_max_share_with_mixup_smoothing_class_weights(ice_config, spy):
    path = ice_config(
        pseudo={"from": str(SRC), "threshold": 0.7, "max_share": 0.1, "soft": True},
        train={"mixup_alpha": 0.4, "label_smoothing": 0.1, "class_weights": "balanced"},
    )
    assert run_cli("fold", path) == 0
    n_test = len(read_table(load_config(path), "test"))
    rng = np.random.default_rng(0)
    probs = {}
    for k in range(3):
        c = rng.uniform(0.55, 1.0, n_test)
        probs[k] = np.column_stack([c, 1 - c])
    train, test, fold_of = craft_source(path, fold_probs=probs)
    assert run_cli("train", path) == 0
    for k in range(3):
        table, tr, va = spy[k]
        n_real = int((fold_of != k).sum())
        cap = int(0.1 * n_real / 0.9 + 1e-9)
        conf = probs[k].max(1)
        want = np.argsort(-conf, kind="stable")[:cap]
        assert (conf[want] >= 0.7).all() and cap < (conf >= 0.7).sum()  # max_share bites
        pseudo_tr = tr[tr >= len(train)]
        assert sorted(table.ids[pseudo_tr]) == sorted(test.ids[want])
        assert len(pseudo_tr) / len(tr) <= 0.1
        assert not np.isin(va, pseudo_tr).any() and (va < len(train)).all()
        np.testing.assert_allclose(table.soft_targets[pseudo_tr], probs[k][pseudo_tr - len(train)], atol=1e-6)
    assert len(read_predictions(RUN / "oof.csv", "oof")) == len(train)


def test_changed_source_or_settings_retrain(ice_config, capsys):
    path = ice_config(pseudo={"from": str(SRC), "threshold": 0.95})
    assert run_cli("fold", path) == 0
    craft_source(path)
    assert run_cli("train", path) == 0
    assert run_cli("train", path) == 0
    assert capsys.readouterr().out.count("done, skipping") == 3
    plain = load_config(path).model_copy(update={"pseudo": None})
    from pipeline.runs.layout import RunDir

    assert RunDir.of(plain).train_hash != RunDir.of(load_config(path)).train_hash  # the section is in the train hash
    f1 = SRC / "test_pred_fold1.csv"
    df = pd.read_csv(f1, dtype={"id": str})
    df.loc[0, ["p_ship", "p_iceberg"]] = [0.02, 0.98]
    df.to_csv(f1, index=False)
    assert run_cli("status", path) == 0
    assert "train     stale" in capsys.readouterr().out
    assert run_cli("train", path, "--folds", "0") == 0  # one fold is enough to see it retrain
    assert capsys.readouterr().out.count("finished under another config; kept in") == 1
    assert run_cli("train", path, "--folds", "1", "pseudo.threshold=0.9") == 0
    assert capsys.readouterr().out.count("finished under another config; kept in") == 1


def _files() -> dict:
    return {str(p): p.stat().st_mtime_ns for p in Path(".").rglob("*") if p.is_file() and ".cache" not in p.parts}


def _no_fold1(cfg_path):
    (SRC / "test_pred_fold1.csv").unlink()


def _other_folds(cfg_path):
    df = pd.read_csv(SRC / "oof.csv", dtype={"id": str})
    df.loc[3, "fold"] = (df.loc[3, "fold"] + 1) % 3
    df.to_csv(SRC / "oof.csv", index=False)


def _ensemble(cfg_path):  # an ensemble is a source like any other, and is refused like any other without fold k's file
    (SRC / "ensemble.json").write_text("{}")
    (SRC / "test_pred_fold1.csv").unlink()


def _ensemble_file(cfg_path):
    write_yaml(Path("blend.yaml"), {"competition": "comp", "config": str(cfg_path), "members": ["a.yaml", "b.yaml"]})


def _no_all_fold(cfg_path):
    (SRC / "test_pred.csv").unlink()


@pytest.mark.parametrize(
    "mutate,overrides,culprits",
    [
        (None, ["pseudo.from=nowhere"], ["pseudo.from", "nowhere not found"]),
        (_no_fold1, [], ["pseudo.from", "test_pred_fold1.csv not found", "fold-k model"]),
        (_other_folds, [], ["pseudo.from", "oof.csv was trained on other folds"]),
        (_ensemble, [], ["pseudo.from", "test_pred_fold1.csv not found", "pipeline ensemble"]),
        (_ensemble_file, ["pseudo.from=blend.yaml"], ["pseudo.from", "blend.yaml"]),
        (_no_all_fold, ["train.refit=true"], ["pseudo.from", "test_pred.csv not found", "refit"]),
        (None, ["pseudo.threshold=0"], ["pseudo.threshold"]),
        (None, ["pseudo.threshold=1.5"], ["pseudo.threshold"]),
        (None, ["pseudo.weight=0"], ["pseudo.weight"]),
        (None, ["pseudo.weight=-1"], ["pseudo.weight"]),
        (None, ["pseudo.max_share=0"], ["pseudo.max_share"]),
        (None, ["pseudo.max_share=1.5"], ["pseudo.max_share"]),
        (None, ["pseudo.soft=1"], ["pseudo.soft"]),
        (None, ["pseudo.source=x"], ["pseudo.source"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(ice_config, capsys, mutate, overrides, culprits):
    path = ice_config(pseudo={"from": str(SRC)})
    assert run_cli("fold", path) == 0
    craft_source(path)
    if mutate is not None:
        mutate(path)
    before = _files()
    err = cli_error(capsys, "train", path, *overrides)
    assert all(c in err for c in culprits), err
    assert _files() == before and not RUN.exists()


def test_missing_from_is_named(ice_config, capsys):
    path = ice_config(pseudo={"threshold": 0.9})
    assert "missing required key 'pseudo.from'" in cli_error(capsys, "train", path)


def test_real_source_then_predict_and_blend(ice_config, capsys):
    """A source trained and predicted by the pipeline, named by its config; the pseudo run predicts and blends."""
    src = ice_config("src", folds={"n_splits": 2})
    path = ice_config(pseudo={"from": "src.yaml", "threshold": 0.5, "max_share": 0.3}, folds={"n_splits": 2})
    for argv in (("fold", src), ("train", src), ("predict", src), ("train", path), ("predict", path)):
        assert run_cli(*argv) == 0, argv
    train = read_table(load_config(path), "train")
    oof = read_predictions(RUN / "oof.csv", "oof")
    assert len(oof) == len(train) and set(oof["id"]) == set(train.ids)
    info = json.loads((RUN / "pseudo.json").read_text())
    assert info["source"] == "runs/comp/src" and all(v["rows"] > 0 for v in info["jobs"].values())
    blend = write_yaml(
        Path("blend.yaml"), {"competition": "comp", "config": "src.yaml", "members": ["src.yaml", "exp.yaml"]}
    )
    assert run_cli("ensemble", blend) == 0
    assert "member exp" in capsys.readouterr().out
    # the blend kept each fold's test blend (by weights fitted without that fold), so it is a source too
    assert all(Path(f"runs/comp/blend/test_pred_fold{k}.csv").is_file() for k in (0, 1))
    assert run_cli("train", path, "pseudo.from=runs/comp/blend") == 0
    info = json.loads((RUN / "pseudo.json").read_text())
    assert info["source"] == "runs/comp/blend" and all(v["rows"] > 0 for v in info["jobs"].values())
    assert len(read_predictions(RUN / "oof.csv", "oof")) == len(train)
    # the source trains again (its oof.csv rewritten) and is not re-predicted: its fold files may be of models
    # that saw today's fold k, so it is refused as a source, and a blend of it keeps no fold files
    src_oof = Path("runs/comp/src/oof.csv")
    pd.read_csv(src_oof, dtype={"id": str}).iloc[::-1].to_csv(src_oof, index=False)
    capsys.readouterr()
    before = _files()
    err = cli_error(capsys, "train", path, "pseudo.threshold=0.6")
    assert "pseudo.from" in err and "older than its training" in err and "pipeline predict" in err, err
    assert _files() == before
    assert run_cli("ensemble", blend) == 0
    assert "keeps no per-fold test predictions" in capsys.readouterr().out
    assert not list(Path("runs/comp/blend").glob("test_pred_fold*.csv"))


@pytest.mark.slow
def test_fold_jobs_match_sequential(ice_config, tmp_path):
    path = ice_config(pseudo={"from": str(SRC), "threshold": 0.95})
    assert run_cli("fold", path) == 0
    craft_source(path)
    assert run_cli("train", path) == 0
    a = read_predictions(RUN / "oof.csv", "oof")
    done = json.loads((RUN / "fold_1" / "done.json").read_text())
    for k in range(3):
        (RUN / f"fold_{k}" / "done.json").unlink()
    assert run_cli("train", path, "train.fold_jobs=3") == 0
    pd.testing.assert_frame_equal(a, read_predictions(RUN / "oof.csv", "oof"), atol=1e-4)
    assert json.loads((RUN / "fold_1" / "done.json").read_text())["pseudo"] == done["pseudo"]


# ---- the parts, without training -------------------------------------------------------------


@given(
    probs=arrays(np.float64, st.tuples(st.integers(1, 40), st.just(3)), elements=st.floats(0.01, 1)),
    threshold=st.floats(0.3, 1.0),
    max_share=st.floats(0.05, 1.0),
    n_real=st.integers(1, 100),
)
def test_select_keeps_the_most_confident_within_threshold_and_share(probs, threshold, max_share, n_real):
    probs = probs / probs.sum(1, keepdims=True)
    ids = np.array([f"id{i:03d}" for i in range(len(probs))])
    sel = select(probs, ids, threshold=threshold, max_share=max_share, n_real=n_real, soft=False)
    conf = probs.max(1)
    assert (conf[sel.rows] >= threshold).all() and sel.candidates == (conf >= threshold).sum()
    assert len(sel.rows) <= sel.candidates
    if max_share < 1:
        assert len(sel.rows) / (n_real + len(sel.rows)) <= max_share + 1e-9
        assert len(sel.rows) == min(sel.candidates, int(max_share * n_real / (1 - max_share) + 1e-9))
    left = np.setdiff1d(np.flatnonzero(conf >= threshold), sel.rows)
    if len(sel.rows) and len(left):  # nothing left out is more confident (ties: the smaller id is kept)
        worst = min(sel.rows, key=lambda i: (conf[i], -int(ids[i][2:])))
        assert all((conf[i], -int(ids[i][2:])) < (conf[worst], -int(ids[worst][2:])) for i in left)
    assert (sel.targets.argmax(1) == probs[sel.rows].argmax(1)).all() and (sel.targets.sum(1) == 1).all()
    soft = select(probs, ids, threshold=threshold, max_share=max_share, n_real=n_real, soft=True)
    np.testing.assert_allclose(soft.targets, probs[soft.rows], rtol=1e-6)


@given(a=st.integers(0, 6), b=st.integers(0, 6), idx=st.lists(st.integers(0, 11), max_size=8), data=st.data())
def test_stacked_images_read_like_a_concatenation(a, b, idx, data):
    x = np.arange(a * 2 * 4, dtype=np.float32).reshape(a, 2, 2, 2)
    y = -np.arange(1, b * 8 + 1, dtype=np.float32).reshape(b, 2, 2, 2)
    both, s = np.concatenate([x, y]), StackedImages(x, y)
    idx = np.array([i for i in idx if i < a + b], dtype=int)
    assert s.shape == both.shape and len(s) == len(both) and s.ndim == 4
    np.testing.assert_array_equal(s[idx], both[idx])
    lo = data.draw(st.integers(0, a + b))
    np.testing.assert_array_equal(s[lo : lo + 3], both[lo : lo + 3])


def _table(n, k, weights=None, targets=None) -> Table:
    return Table(
        ids=np.arange(n).astype(str),
        images=np.zeros((n, 1, 2, 2), np.float32),
        class_names=[f"c{i}" for i in range(k)],
        labels=np.arange(n) % k,
        sample_weights=weights,
        soft_targets=targets,
    )


@pytest.mark.parametrize(
    "class_weight,smoothing,lam", [(None, 0.0, 1.0), ([0.5, 2.0, 1.0], 0.1, 1.0), ([0.5, 2.0, 1.0], 0.1, 0.7)]
)
def test_weights_of_one_and_one_hot_targets_give_the_plain_loss(class_weight, smoothing, lam):
    n, k = 8, 3
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, k, generator=g)
    idx = np.arange(n)
    y = torch.from_numpy(idx % k)
    partner = torch.from_numpy(np.random.default_rng(0).permutation(n))
    fn = torch.nn.CrossEntropyLoss(
        weight=None if class_weight is None else torch.tensor(class_weight), label_smoothing=smoothing
    )
    plain = mixed_loss(fn, logits, y, y[partner], lam)
    table = _table(n, k, np.ones(n, np.float32), np.eye(k, dtype=np.float32)[idx % k])
    torch.testing.assert_close(batch_loss(fn, logits, table, idx, y, partner, lam), plain)
    assert torch.equal(batch_loss(fn, logits, _table(n, k), idx, y, partner, lam), plain)


def test_soft_weighted_loss_by_hand():
    n, k = 6, 2
    logits = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    t = np.random.default_rng(1).dirichlet([1, 1], n).astype(np.float32)
    s = np.array([1, 1, 1, 0.5, 0.5, 0.5], np.float32)
    cw = torch.tensor([2.0, 1.0])
    fn = torch.nn.CrossEntropyLoss(weight=cw, label_smoothing=0.2)
    got = batch_loss(fn, logits, _table(n, k, s, t), np.arange(n), torch.from_numpy(t.argmax(1)), torch.arange(n), 1.0)
    tt = torch.from_numpy(t) * 0.8 + 0.1  # smoothed toward uniform
    per_row = -(tt * cw * torch.log_softmax(logits, 1)).sum(1)
    want = (torch.from_numpy(s) * per_row).sum() / (torch.from_numpy(t) @ cw).sum()
    torch.testing.assert_close(got, want)


def test_fold_view_marks_rows(ice_config):
    """Unit view of the driver's data: real rows keep their folds, selected test rows TRAIN_ONLY, the rest UNUSED."""
    from pipeline.train.pseudo import PseudoLabels, Selection

    path = ice_config()
    assert run_cli("fold", path) == 0
    cfg, train, test, fold_of = _tables(path)
    sel = Selection(rows=np.array([4, 1]), targets=np.eye(2, dtype=np.float32)[[1, 0]], candidates=2)
    p = PseudoLabels(
        source="s",
        digest="d",
        weight=0.5,
        soft=False,
        threshold=0.9,
        max_share=0.5,
        class_names=train.class_names,
        by_fold={0: sel},
    )
    base = p.combine(train, test)
    t, f = p.fold_view(base, fold_of, 0)
    n = len(train)
    assert (f[:n] == fold_of).all() and f[n + 4] == TRAIN_ONLY and f[n + 1] == TRAIN_ONLY
    assert (np.delete(f[n:], [1, 4]) == UNUSED).all()
    assert t.labels[n + 4] == 1 and t.labels[n + 1] == 0 and t.soft_targets is None
    np.testing.assert_array_equal(t.images[[n + 4]], test.images[[4]])
    assert base.images is t.images  # one stacked view shared by every job, never a copy per fold


def test_the_plan_times_the_pseudo_rows(ice_config):
    """A budgeted pseudo-labelled run is planned for its real rows plus the most pseudo rows any fold takes
    (counted from the source's fold files as training counts them): fewer epochs than without them."""
    from pipeline.plan.facts import data_facts
    from pipeline.plan.search import make_plan
    from pipeline.plan.speed import Speed
    from pipeline.train.pseudo import check_source, prepare

    path = ice_config(
        pseudo={"from": str(SRC), "threshold": 0.95, "max_share": 1.0},
        train={"epochs": "auto", "time_budget_s": 60, "max_steps_per_epoch": None},
    )
    assert run_cli("fold", path, "pseudo=null", "train.time_budget_s=null") == 0  # the folds file the source trained on
    train, test, fold_of = craft_source(path)
    cfg = load_config(path)
    facts = data_facts(cfg)
    want = prepare(cfg, check_source(cfg), train, fold_of, test).by_fold
    assert facts.n_pseudo == max(len(s.rows) for s in want.values()) > 0 and facts.n_test == len(test)
    plain = data_facts(load_config(path, ["pseudo=null"]))
    assert plain.n_pseudo == 0

    def speed(c, size, threads):
        return Speed(train_img_s=200, val_img_s=2000, build_s=0.5, epoch_s=0.0)

    with_rows = make_plan(cfg, facts, device_type="cpu", cores=2, speed=speed)
    without = make_plan(cfg, plain, device_type="cpu", cores=2, speed=speed)
    per_epoch = lambda rows: 3 * (rows / 200 + 40 / 2000)  # noqa: E731 (3 folds of 80 real rows, 40 validated)
    for plan, rows in ((with_rows, 80 + facts.n_pseudo), (without, 80)):
        e = plan["values"]["train.epochs"]
        assert "train.max_steps_per_epoch" not in plan["values"]  # many short epochs: none is cut
        assert plan["expected_train_s"] == pytest.approx(3 * 0.5 + e * per_epoch(rows), abs=0.1)
    assert with_rows["values"]["train.epochs"] < without["values"]["train.epochs"]
