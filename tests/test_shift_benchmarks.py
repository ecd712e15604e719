"""benchmarks/baseline_loop.py (the hand-written rival of issue 11) and benchmarks/shift_folder.py: their results
and tables, checked in-process (tests/test_benchmarks.py runs every benchmark as a script)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_shift(tmp_path_factory):
    from pipeline.data.demo_shift import write_shift_folder

    out = tmp_path_factory.mktemp("shift")
    write_shift_folder(out, n_train=34, n_test=10, seed=0)  # 4 rows per class, 2 in the half-count ones
    return out


def test_baseline_loop_smoke(tiny_shift, tmp_path):
    res = _load("baseline_loop").main(
        [
            "--data",
            str(tiny_shift),
            "--budget",
            "60",
            "--folds",
            "2",
            "--epochs",
            "1",
            "--size",
            "16",
            "--model",
            "resnet10t",
            "--no-pretrained",
            "--json",
            str(tmp_path / "r.jsonl"),
        ]
    )
    assert res["epochs_run"] == [1, 1] and res["folds"] == 2 and res["size"] == 16
    assert 0 <= res["test_accuracy"] <= 1 and res["test_logloss"] > 0 and res["train_s"] <= res["total_s"]
    assert json.loads((tmp_path / "r.jsonl").read_text().splitlines()[-1]) == res


def test_baseline_loop_fits_epochs_to_budget(tiny_shift, capsys):
    res = _load("baseline_loop").main(
        [
            "--data",
            str(tiny_shift),
            "--budget",
            "1",
            "--folds",
            "2",
            "--size",
            "16",
            "--model",
            "resnet10t",
            "--no-pretrained",
        ]
    )
    out = capsys.readouterr().out
    # the count is fixed from the first epoch's time (how many fit, a fact of this machine's speed) ...
    assert "one epoch took " in out and f"{res['epochs']} epochs per fold fit the 1s budget" in out
    # ... and a fold stops at its share of the budget, never past the count
    assert len(res["epochs_run"]) == 2 and all(1 <= e <= res["epochs"] for e in res["epochs_run"])


def test_shift_folder_skips_missing_configs_and_tabulates(tmp_path, capsys):
    bench = _load("shift_folder")
    data = tmp_path / "sf"
    assert (
        bench.main(
            [
                "--budget",
                "5",
                "--data",
                str(data),
                "--n-train",
                "20",
                "--n-test",
                "10",
                "--no-baseline",
                "--config",
                str(tmp_path / "missing.yaml"),
                "--work",
                str(tmp_path / "w"),
            ]
        )
        == {}
    )
    out = capsys.readouterr().out
    assert f"writing {data}" in out and "[missing] skipped" in out and (data / "solution.csv").is_file()
    base = {"train_s": 100.0, "total_s": 120.0, "test_accuracy": 0.8, "test_logloss": 0.5}
    text = bench.table(
        {"auto": {**base, "test_accuracy": 0.9, "test_logloss": 0.25}, "broken": None, "baseline_loop": base}, 100
    )
    assert (
        "failed or skipped" in text
        and "auto vs baseline_loop: accuracy +0.1000, log-loss x0.50, training time x1.00" in text
    )


def test_both_read_the_digit_csv_stand_in(tmp_path, capsys):
    """--kind shift-digits: the stand-in written as digit-recognizer CSVs; the plain loop reads and scores them."""
    bench = _load("shift_folder")
    data = tmp_path / "sd"
    assert (
        bench.main(
            [
                "--kind",
                "shift-digits",
                "--budget",
                "5",
                "--data",
                str(data),
                "--n-train",
                "20",
                "--n-test",
                "10",
                "--no-baseline",
                "--config",
                str(tmp_path / "missing.yaml"),
                "--work",
                str(tmp_path / "w"),
            ]
        )
        == {}
    )
    assert f"writing {data}: 20 train and 10 test 28x28 digit-recognizer rows" in capsys.readouterr().out
    res = _load("baseline_loop").main(
        [
            "--data",
            str(data),
            "--budget",
            "60",
            "--folds",
            "2",
            "--epochs",
            "1",
            "--size",
            "16",
            "--model",
            "resnet10t",
            "--no-pretrained",
        ]
    )
    assert res["epochs_run"] == [1, 1] and 0 <= res["test_accuracy"] <= 1 and res["test_logloss"] > 0


def test_baseline_loop_reads_ids_and_labels_as_text(tmp_path):
    """Folder ids without an extension and labels like "007" stay text; a digit solution.csv in another
    row order is matched by ImageId, not by position."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    load_data = _load("baseline_loop").load_data
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
    ids, labels = ["001", "002", "003", "004"], ["007", "010", "007", "010"]
    for i, name in enumerate(ids):
        Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(tmp_path / "train" / name, format="PNG")
        Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(tmp_path / "test" / f"t{name}", format="PNG")
    pd.DataFrame({"id": ids, "label": labels}).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"id": [f"t{i}" for i in ids]}).to_csv(tmp_path / "test.csv", index=False)
    pd.DataFrame({"id": [f"t{i}" for i in ids[::-1]], "label": labels[::-1]}).to_csv(
        tmp_path / "solution.csv", index=False
    )
    X, y, classes, X_test, y_test = load_data(tmp_path, 8)
    assert classes == ["007", "010"] and y.tolist() == [0, 1, 0, 1] and y_test.tolist() == [0, 1, 0, 1]
    assert X.shape == X_test.shape == (4, 8, 8) and X[3, 0, 0] == 180

    digits = tmp_path / "digits"
    digits.mkdir()
    cols = [f"pixel{i}" for i in range(784)]
    train = pd.DataFrame(np.zeros((4, 784), np.uint8), columns=cols)
    train.insert(0, "label", [3, 5, 3, 5])
    train.to_csv(digits / "train.csv", index=False)
    pd.DataFrame(np.zeros((3, 784), np.uint8), columns=cols).to_csv(digits / "test.csv", index=False)
    pd.DataFrame({"ImageId": [3, 1, 2], "Label": [5, 3, 3]}).to_csv(digits / "solution.csv", index=False)
    X, y, classes, X_test, y_test = load_data(digits, 28)
    assert classes == ["3", "5"] and y.tolist() == [0, 1, 0, 1] and y_test.tolist() == [0, 0, 1]
