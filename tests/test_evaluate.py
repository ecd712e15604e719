"""Evaluate stage: metrics against scikit-learn, calibration both ways, report, Grad-CAM, bad input, compare."""

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_TRAIN, run_cli, write_yaml
from sklearn import metrics as skm

from pipeline.config.load import load_config, write_snapshot
from pipeline.core.errors import PipelineError
from pipeline.data.folds import load_folds, run_fold
from pipeline.data.formats import read_table
from pipeline.evaluate.compare import compare
from pipeline.evaluate.evaluator import evaluate
from pipeline.evaluate.scoring import classification_metrics
from pipeline.models.backbones import build_model
from pipeline.models.gradcam import NoFeatureMap, gradcam, mass_inside
from pipeline.runs.predictions import load_temperature
from pipeline.tasks.calibration import MIN_GAIN, apply_temperature, calibrate, ece, fit_temperature
from pipeline.tasks.classification import best_f1_threshold, softmax

quiet = lambda *a: None  # noqa: E731
RUN = Path("runs/comp/exp")


def sk_logloss(y, p, eps=1e-15):
    p = np.clip(p, eps, 1 - eps)
    return skm.log_loss(y, p / p.sum(1, keepdims=True), labels=np.arange(p.shape[1]))


def drawn(rng, probs):
    """Labels drawn from the predicted probabilities: the predictions are calibrated by construction."""
    u = rng.random(len(probs))
    return (u[:, None] > np.cumsum(probs, 1)).sum(1).clip(0, probs.shape[1] - 1)


# ---- metrics against scikit-learn --------------------------------------------------------


def test_binary_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    p1 = rng.random(300)
    y = (rng.random(300) < p1 * 0.8 + 0.1).astype(int)
    probs = np.c_[1 - p1, p1]
    m = classification_metrics(y, probs, eps=1e-3, n_bins=10)
    pred = (p1 > 0.5).astype(int)
    assert m["logloss"] == pytest.approx(sk_logloss(y, probs, 1e-3))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p1))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    np.testing.assert_allclose(m["confusion_matrix_normalized"], skm.confusion_matrix(y, pred, normalize="true"))
    # the F1-optimal threshold is the best of every possible cut
    t, f1 = best_f1_threshold(y, p1)
    brute = max(skm.f1_score(y, (p1 >= c).astype(int)) for c in np.unique(p1))
    assert f1 == pytest.approx(brute) and skm.f1_score(y, (p1 >= t).astype(int)) == pytest.approx(brute)


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    probs = softmax(rng.normal(0, 1.5, (400, 4)))
    y = drawn(rng, probs)
    m = classification_metrics(y, probs, n_bins=15, class_names=list("abcd"))
    pred = probs.argmax(1)
    assert m["logloss"] == pytest.approx(sk_logloss(y, probs))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    for avg in ("macro", "weighted"):
        assert m[f"f1_{avg}"] == pytest.approx(skm.f1_score(y, pred, average=avg))
        assert m[f"precision_{avg}"] == pytest.approx(skm.precision_score(y, pred, average=avg))
        assert m[f"recall_{avg}"] == pytest.approx(skm.recall_score(y, pred, average=avg))
    assert m["f1"] == m["f1_macro"]
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert m["per_class"]["c"]["f1"] == pytest.approx(skm.f1_score(y, pred, average=None)[2])
    conf, right = probs.max(1), (pred == y)  # ECE by hand: 15 equal-width bins (b/15, (b+1)/15]
    bins = [(conf > b / 15) & (conf <= (b + 1) / 15) for b in range(15)]
    by_hand = sum(m_.mean() * abs(right[m_].mean() - conf[m_].mean()) for m_ in bins if m_.any())
    assert m["ece"] == pytest.approx(by_hand) and m["ece"] > 0.01


def test_ece_by_hand():
    # 5 bins: confidence 0.9 right 2 of 2 (gap 0.1), confidence 0.6 right 1 of 2 (gap 0.1)
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 0, 0])
    assert ece(y, probs, 5) == pytest.approx(0.5 * 0.1 + 0.5 * 0.1)
    assert ece(y, probs, 2) == pytest.approx(0.0)  # one bin: confidence 0.75, accuracy 0.75
    assert ece(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]]), 10) == 0.0


# ---- calibration both ways ------------------------------------------------------------------


def test_temperature_helps_overconfident_predictions():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 1.2, (3000, 3))
    y = drawn(rng, softmax(logits))
    over = softmax(3 * logits)  # the same ranking, three times too sure
    summary, nested = calibrate(y, over, np.arange(3000) % 5)
    assert summary["kept"] and summary["temperature"] == pytest.approx(3, rel=0.1)
    assert summary["nested_logloss"] < summary["raw_logloss"] - 0.1
    assert summary["nested_ece"] < summary["raw_ece"] / 2
    assert (nested.argmax(1) == over.argmax(1)).all()  # temperature never changes the predicted class
    # the scaling evaluate measures is exactly the one predict applies
    np.testing.assert_allclose(
        apply_temperature(over, summary["temperature"]), softmax(np.log(over) / summary["temperature"]), atol=1e-9
    )


@pytest.mark.parametrize("seed", [3, 4, 5, 6, 7])
def test_temperature_near_one_and_dropped_on_calibrated_predictions(seed):
    rng = np.random.default_rng(seed)
    probs = softmax(rng.normal(0, 1.5, (4000, 3)))
    y = drawn(rng, probs)
    summary, _ = calibrate(y, probs, np.arange(4000) % 5)
    assert summary["temperature"] == pytest.approx(1, abs=0.06)
    assert not summary["kept"] and summary["nested_logloss"] > summary["raw_logloss"] * (1 - MIN_GAIN)
    assert fit_temperature(y, probs) == pytest.approx(summary["temperature"])


# ---- the stage on hand-made oof.csv files --------------------------------------------------


@pytest.fixture
def hand_run(digits_config):
    """Folds for the 600 sklearn digits and a hand-made, over-confident oof.csv (no training)."""

    def make(**sections):
        path = digits_config(**sections)
        cfg = load_config(path)
        table = read_table(cfg, "train")
        run_fold(cfg, table)
        fold = load_folds(cfg, table)
        rng = np.random.default_rng(4)
        logits = rng.normal(0, 1, (len(table), 10))
        logits[np.arange(len(table)), table.labels] += 1.5
        probs = softmax(3 * logits)
        df = pd.DataFrame({"id": table.ids, "fold": fold, "target": table.labels})
        for k, c in enumerate(table.class_names):
            df[f"p_{c}"] = probs[:, k]
        RUN.mkdir(parents=True, exist_ok=True)
        df.to_csv(RUN / "oof.csv", index=False, float_format="%.8g")
        return path, cfg, df

    return make


def test_metrics_json_from_oof(hand_run):
    path, cfg, df = hand_run()
    m = evaluate(cfg, report=False)
    assert json.loads((RUN / "metrics.json").read_text()) == m
    y, probs = df["target"].to_numpy(), df.filter(like="p_").to_numpy()
    for key in (
        "logloss",
        "accuracy",
        "f1",
        "roc_auc",
        "confusion_matrix",
        "confusion_matrix_normalized",
        "folds",
        "cv_mean",
        "cv_std",
        "calibrated",
        "metric",
        "headline",
        "ece",
        "f1_macro",
        "f1_weighted",
    ):
        assert key in m, key
    assert m["metric"] == "accuracy" and m["headline"] == m["accuracy"] == pytest.approx(
        skm.accuracy_score(y, probs.argmax(1))
    )
    assert m["logloss"] == pytest.approx(sk_logloss(y, probs))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"), abs=1e-6)
    per = [skm.accuracy_score(g["target"], g.filter(like="p_").to_numpy().argmax(1)) for _, g in df.groupby("fold")]
    assert [f["fold"] for f in m["folds"]] == [0, 1, 2]
    assert [f["accuracy"] for f in m["folds"]] == pytest.approx(per)
    assert m["cv_mean"]["accuracy"] == pytest.approx(np.mean(per)) and m["cv_std"]["accuracy"] == pytest.approx(
        np.std(per, ddof=1)
    )
    assert (
        sum(f["n"] for f in m["folds"]) == 600
        and np.array(m["folds"][0]["confusion_matrix"]).sum() == m["folds"][0]["n"]
    )
    # over-confident by construction: the temperature is kept, saved, and predict reads it
    c = m["calibrated"]
    assert c["kept"] and c["temperature"] > 1.5 and c["logloss"] < m["logloss"]
    cal = json.loads((RUN / "calibration.json").read_text())
    assert cal["kept"] and cal["temperature"] == pytest.approx(c["temperature"])
    assert cal["nested_logloss"] < cal["raw_logloss"] == pytest.approx(m["logloss"])
    assert load_temperature(RUN) == pytest.approx(c["temperature"])
    # the stage is recorded as done, and the experiment log reads the CV from metrics.json
    assert (RUN / "config.evaluate.yaml").is_file() and (RUN / "config.evaluate.hash").is_file()
    from pipeline.config.load import read_stage_hash
    from pipeline.config.schema import stage_sections
    from pipeline.evaluate.experiments import cv_score

    assert read_stage_hash(RUN / "config.evaluate.yaml") == cfg.hash(*stage_sections(cfg, "evaluate"))
    assert cv_score(RUN, "accuracy") == (
        pytest.approx(np.mean(per)),
        pytest.approx(np.std(per, ddof=1)),
        "metrics.json",
    )


def test_calibrate_false_writes_kept_false(hand_run):
    path, cfg, _ = hand_run(evaluate={"calibrate": False})
    m = evaluate(cfg, report=False)
    assert m["calibrated"]["skipped"] and not json.loads((RUN / "calibration.json").read_text())["kept"]
    assert load_temperature(RUN) is None


def _mutate_oof(fn):
    df = pd.read_csv(RUN / "oof.csv", dtype={"id": str})
    df = fn(df)
    df.to_csv(RUN / "oof.csv", index=False)


def _set(df, row, col, value):
    df[col] = df[col].astype(object)
    df.loc[row, col] = value
    return df


BAD = {
    "missing rows": (
        lambda df: df.drop(index=[3, 4]),
        r"oof.csv: 2 training row\(s\) missing \(e.g. id '4'\); expected every training id exactly once",
    ),
    "nan": (
        lambda df: _set(df, 5, "p_3", np.nan),
        r"oof.csv: line 7 \(id '6'\): p_3 is NaN or empty; expected a probability in \[0, 1\]",
    ),
    "sum": (
        lambda df: _set(df, 0, "p_0", df.loc[0, "p_0"] + 0.2),
        r"oof.csv: line 2 \(id '1'\): probabilities sum to 1.2; expected 1 \(within 0.001\)",
    ),
    "above one": (
        lambda df: _set(df, 1, "p_2", 1.5),
        r"oof.csv: line 3 \(id '2'\): p_2 is 1.5; expected a probability in \[0, 1\]",
    ),
    "extra class column": (
        lambda df: df.assign(p_cat=0.0),
        r"oof.csv: column 'p_cat' is not a class of the config; expected p_<class> for the classes 0, 1, 2",
    ),
    "missing class column": (
        lambda df: df.drop(columns=["p_9"]),
        r"oof.csv: missing column 'p_9' \(class '9'\); expected one p_<class> column per class",
    ),
    "target not a class": (
        lambda df: _set(df, 2, "target", 12),
        r"oof.csv: line 4 \(id '3'\): target 12 is not a class of the config; "
        r"expected a class index 0..9 \(classes 0, 1,",
    ),
    "target differs": (
        lambda df: _set(df, 2, "target", (df.loc[2, "target"] + 1) % 10),
        r"oof.csv: line 4 \(id '3'\): target \d but the training data has class \d",
    ),
    "unknown id": (
        lambda df: _set(df, 0, "id", "9999"),
        r"oof.csv: line 2: id '9999' is not in the training data \(1 such ids\)",
    ),
    "fold differs": (
        lambda df: _set(df, 0, "fold", (df.loc[0, "fold"] + 1) % 3),
        r"oof.csv: line 2 \(id '1'\): fold \d but folds/comp.csv puts it in fold \d; expected the folds training used",
    ),
    "duplicate id": (
        lambda df: pd.concat([df, df.iloc[[7]]]),
        r"oof.csv: line 602: id '8' appears 2 times; expected each training id once",
    ),
    "missing column": (
        lambda df: df.drop(columns=["fold"]),
        r"oof.csv: missing column 'fold'; expected id,fold,target,p_<class>",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_oof_is_one_line(hand_run, case):
    path, cfg, _ = hand_run()
    fn, msg = BAD[case]
    _mutate_oof(fn)
    with pytest.raises(PipelineError, match=msg) as e:
        evaluate(cfg, report=False)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(RUN / "oof.csv"))
    assert not (RUN / "metrics.json").exists()


def test_missing_oof_and_stale_training_via_cli(hand_run, capsys):
    path, cfg, _ = hand_run()
    os.remove(RUN / "oof.csv")
    assert run_cli("evaluate", path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: {RUN / 'oof.csv'}: file not found; run `pipeline train {path}` first")
    # oof.csv of another training config is refused rather than scored under this one's name
    path, cfg, _ = hand_run()
    write_snapshot(cfg, RUN / "config.train.yaml", "train")
    assert run_cli("evaluate", path, "train.lr=0.5") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.train.yaml: oof.csv was trained under another config" in err


# ---- compare -----------------------------------------------------------------------------


def _oof(dirname, y, fold, probs):
    d = Path(dirname)
    d.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"id": [f"r{i}" for i in range(len(y))], "fold": fold, "target": y})
    df["p_ship"], df["p_iceberg"] = probs[:, 0], probs[:, 1]
    df.to_csv(d / "oof.csv", index=False)
    (d / "metrics.json").write_text(json.dumps({"metric": "logloss"}))
    return d


def test_compare_side_by_side_and_refuses_other_folds(capsys):
    rng = np.random.default_rng(5)
    n = 120
    y = rng.integers(0, 2, n)
    fold = np.arange(n) % 3
    good = np.clip(y * 0.6 + 0.2 + rng.normal(0, 0.1, n), 0.01, 0.99)
    weak = np.clip(0.5 + (y - 0.5) * 0.2 + rng.normal(0, 0.2, n), 0.01, 0.99)
    a = _oof("runs/c/a", y, fold, np.c_[1 - good, good])
    b = _oof("runs/c/b", y, fold, np.c_[1 - weak, weak])
    df = compare([str(a), str(b)])
    out = capsys.readouterr().out
    assert list(df.columns) == ["a", "b"] and df.index[0] == "logloss"
    assert df.loc["logloss", "a"] == pytest.approx(sk_logloss(y, np.c_[1 - good, good]))
    assert df.loc["roc_auc", "b"] == pytest.approx(skm.roc_auc_score(y, weak))
    m = fold == 1
    assert df.loc["fold 1 logloss", "b"] == pytest.approx(sk_logloss(y[m], np.c_[1 - weak, weak][m]))
    assert {"cv logloss mean", "cv logloss std", "fold 0 logloss", "fold 2 logloss"} <= set(df.index)
    assert "logloss" in out and "*" in out  # the better run of each row is marked
    # the CLI prints the same table
    assert run_cli("evaluate", "--compare", a, b) == 0
    assert "fold 2 logloss" in capsys.readouterr().out
    # another fold assignment makes the CV scores incomparable
    c = _oof("runs/c/c", y, (np.arange(n) + 1) % 3, np.c_[1 - good, good])
    with pytest.raises(
        PipelineError,
        match=r"runs/c/c/oof.csv: fold assignments differ from runs/c/a/oof.csv "
        r"\(line 2, id 'r0': fold 1 here, 0 there\); expected runs on the same folds file",
    ):
        compare([str(a), str(c)])
    assert run_cli("evaluate", "--compare", a, "runs/c/missing") == 2
    assert "runs/c/missing: run directory not found" in capsys.readouterr().err


# ---- a real tiny run: report and CLI ----------------------------------------------------------


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, sk_digits_dir):
    """fold + train (3 folds x 2 epochs of simple_cnn on 600 8x8 digits), once for the module."""
    base = tmp_path_factory.mktemp("evaltrained")
    cfg = {
        "competition": "comp",
        "metric": "accuracy",
        "data": {"format": "pixel_csv", "dir": str(sk_digits_dir)},
        "folds": {"n_splits": 3, "seed": 0},
        "model": {"backbone": "simple_cnn", "pretrained": False, "drop_rate": 0.0},
        "train": dict(TINY_TRAIN),
        "evaluate": {"gradcam_samples": 3},
    }
    write_yaml(base / "exp.yaml", cfg)
    old = os.getcwd()
    os.chdir(base)
    try:
        from pipeline.train.cv import train_cv

        c = load_config("exp.yaml")
        run_fold(c)
        train_cv(c)
    finally:
        os.chdir(old)
    return base


def test_report_from_a_trained_run(trained_dir, capsys):
    shutil.copytree(trained_dir, ".", dirs_exist_ok=True)
    assert run_cli("evaluate", "exp.yaml") == 0
    out = capsys.readouterr().out
    assert "fold    n  accuracy  logloss" in out and "\nOOF   600" in out and "calibration: T = " in out
    assert out.rstrip().endswith(f"report: {RUN / 'report' / 'report.html'}")
    report = RUN / "report"
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert pngs == [
        "adversarial_hist.png",
        "adversarial_top.png",
        "confident_errors.png",
        "confusion_matrix.png",
        "gradcam.png",
        "reliability.png",
        "roc_pr.png",
        "training_curves.png",
    ]
    html = (report / "report.html").read_text()
    for name in pngs:
        assert f"src='{name}'" in html
    assert "http" not in html  # opens offline: nothing fetched
    from PIL import Image

    for name in pngs:
        with Image.open(report / name) as im:
            assert im.format == "PNG" and min(im.size) > 200
    m = json.loads((RUN / "metrics.json").read_text())
    assert m["report"] == str(report / "report.html")
    oof = pd.read_csv(RUN / "oof.csv")
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(oof["target"], oof.filter(like="p_").to_numpy().argmax(1)))
    # rerunning replaces the report whole: no stale pictures, no temporary folders
    assert run_cli("evaluate", "exp.yaml", "evaluate.gradcam_samples=0") == 0
    assert not (report / "gradcam.png").exists() and "gradcam.png" not in (report / "report.html").read_text()
    assert not list(RUN.glob(".report.*"))


# ---- Grad-CAM --------------------------------------------------------------------------------


def _net(backbone, in_chans, size):
    cfg = SimpleNamespace(
        model=SimpleNamespace(
            backbone=backbone, pretrained=False, weights=None, use_features=False, input_size=None, drop_rate=0.0
        )
    )
    return build_model(cfg, in_chans, 2, 0, (size, size))[0]


class _Tokens(torch.nn.Module):
    """A ViT in miniature: a patch-embedding conv, then token layers (no spatial map to explain)."""

    def __init__(self):
        super().__init__()
        self.proj, self.mix, self.out = torch.nn.Conv2d(2, 8, 4, 4), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.mix(self.proj(x).flatten(2).transpose(1, 2)).mean(1))


def test_gradcam_feature_map_choice():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 64, 64)
    for backbone, layer in (
        ("simple_cnn", "features.3 (60x60)"),
        ("bn_cnn", "features.18 (16x16)"),
        ("tf_efficientnet_lite0", "bn2.act (2x2)"),
    ):
        net = _net(backbone, 2, 64)
        torch.nn.init.normal_(net.head[1].weight)
        cam, logits, name = gradcam(net, x)
        assert name == layer and cam.shape == (2, 64, 64) and logits.shape == (2, 2)
        assert cam.min() >= 0 and 0 < cam.max() <= 1
    with pytest.raises(NoFeatureMap, match=r"the last Conv2d \(proj\) feeds token layers"):
        gradcam(_Tokens(), torch.randn(1, 2, 32, 32))


def test_gradcam_mass_falls_on_the_patch_that_decides_the_label():
    """Class 1 iff a bright 5x5 square sits somewhere in 20x20 noise: Grad-CAM of class 1 must point at it."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    size, patch = 20, 5

    def make(n):
        x = rng.normal(0, 1, (n, 1, size, size)).astype(np.float32)
        y = rng.integers(0, 2, n)
        pos = rng.integers(0, size - patch + 1, (n, 2))
        for i in np.flatnonzero(y):
            x[i, 0, pos[i, 0] : pos[i, 0] + patch, pos[i, 1] : pos[i, 1] + patch] += 2.5
        return x, y, pos

    x, y, _ = make(400)
    net = _net("simple_cnn", 1, size)
    net.fit_normalisation(x, None)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(3):
        net.train()
        perm = torch.randperm(len(X))
        for s in range(0, len(X), 64):
            i = perm[s : s + 64]
            loss = torch.nn.functional.cross_entropy(net(X[i]), Y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    xt, yt, pos = make(100)
    pos_rows = np.flatnonzero(yt == 1)
    cam, logits, _ = gradcam(net, torch.from_numpy(xt[pos_rows]), classes=np.ones(len(pos_rows), dtype=int))
    assert (logits.argmax(1) == 1).mean() > 0.85  # the model learned the rule
    shares = []
    for c, (r, q) in zip(cam, pos[pos_rows]):
        mask = np.zeros((size, size), bool)
        mask[r : r + patch, q : q + patch] = True
        shares.append(mass_inside(c, mask))
    # the patch is 6% of the image; most of the map's mass falls inside it
    assert np.median(shares) > 0.5, shares


def test_binary_sar_report_without_models(make_config, iceberg_dir, capsys):
    """Hand-made OOF for 2-band SAR data: the binary figures, and a report that says what it could not draw."""
    path = make_config(iceberg_dir, model={"backbone": "simple_cnn", "pretrained": False})
    cfg = load_config(path)
    table = read_table(cfg, "train")
    run_fold(cfg, table)
    fold = load_folds(cfg, table)
    rng = np.random.default_rng(6)
    p1 = np.clip(0.75 * table.labels + 0.125 + rng.normal(0, 0.2, len(table)), 0.001, 0.999)
    df = pd.DataFrame({"id": table.ids, "fold": fold, "target": table.labels, "p_ship": 1 - p1, "p_iceberg": p1})
    RUN.mkdir(parents=True)
    df.to_csv(RUN / "oof.csv", index=False)
    m = evaluate(cfg)
    out = capsys.readouterr().out
    y = table.labels
    assert m["f1"] == pytest.approx(skm.f1_score(y, (p1 > 0.5).astype(int)))  # positive class: iceberg (index 1)
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p1))
    t = m["threshold"]
    assert t["f1_at_0.5"] == m["f1"] and t["f1_at_best_threshold"] >= t["f1_at_0.5"] and len(t["fold_thresholds"]) == 5
    assert "threshold: F1 " in out and "note: No fold_*/history.csv found" in out and "note: Grad-CAM skipped" in out
    report = RUN / "report"
    assert sorted(p.name for p in report.glob("*.png")) == [
        "adversarial_hist.png",
        "adversarial_top.png",
        "confident_errors.png",
        "confusion_matrix.png",
        "reliability.png",
        "roc_pr.png",
    ]
    html = (report / "report.html").read_text()
    assert "Grad-CAM skipped" in html and "positive class <b>iceberg</b>" in html


def test_report_escapes_class_names_and_ids(make_config, folder_dir, tmp_path):
    """Class names and ids come from the user's files: the report shows them as text, never as markup."""
    data = tmp_path / "data"
    shutil.copytree(folder_dir, data)
    evil = "<script>alert(1)</script>"
    tr = pd.read_csv(data / "train.csv")
    tr["label"] = tr["label"].replace({"zero": evil, "one": "a&b"})
    tr.to_csv(data / "train.csv", index=False)
    cfg = load_config(
        make_config(
            data, "image_folder", data={"image_size": 16}, model={"backbone": "simple_cnn", "pretrained": False}
        )
    )
    table = read_table(cfg, "train")
    assert evil in table.class_names
    run_fold(cfg, table)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(table.class_names)), len(table))
    df = pd.DataFrame(
        {
            "id": table.ids,
            "fold": load_folds(cfg, table),
            "target": table.labels,
            **{f"p_{c}": probs[:, i] for i, c in enumerate(table.class_names)},
        }
    )
    RUN.mkdir(parents=True)
    df.to_csv(RUN / "oof.csv", index=False)
    evaluate(cfg)
    html = (RUN / "report" / "report.html").read_text()
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in html  # the per-class table row
    assert "a&amp;b" in html and "a&b" not in html
