"""Submission writer (never overwrites), validator on broken files (each check's message), lb and experiments."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_error, run_cli
from helpers import DIGITS, NOW, digits_probs, fake_run

from pipeline.config.load import load_config
from pipeline.core.errors import PipelineError
from pipeline.evaluate.experiments import cv_score, list_experiments, record_lb
from pipeline.predict.submission import validate_submission, write_submission

quiet = lambda *a: None  # noqa: E731


@pytest.fixture
def digits_cfg(make_config, sk_digits_dir):
    return load_config(make_config(sk_digits_dir, "pixel_csv", metric="accuracy"))


@pytest.fixture(scope="session")
def statoil_dir(tmp_path_factory):
    """A tiny statoil test.json (5 records) and train.json: enough for the validator."""
    out = tmp_path_factory.mktemp("statoil")
    rng = np.random.default_rng(0)

    def rec(i, label=None):
        r = {
            "id": f"img{i}",
            "band_1": rng.normal(-20, 3, 75 * 75).round(2).tolist(),
            "band_2": rng.normal(-25, 3, 75 * 75).round(2).tolist(),
            "inc_angle": 38.5,
        }
        if label is not None:
            r["is_iceberg"] = label
        return r

    (out / "train.json").write_text(json.dumps([rec(100 + i, i % 2) for i in range(4)]))
    (out / "test.json").write_text(json.dumps([rec(i) for i in range(5)]))
    return out


def good_digits(path="good.csv"):
    pd.DataFrame({"ImageId": range(1, 101), "Label": np.arange(100) % 10}).to_csv(path, index=False)
    return Path(path)


# ---- writer ------------------------------------------------------------------------------


def test_write_submission_names_validates_and_never_overwrites(digits_cfg):
    ids = [str(i) for i in range(1, 101)]
    p1 = write_submission(
        digits_cfg, ids, digits_probs(seed=1), DIGITS, "exp", {"weights": [1.0], "oof_score": 0.9}, now=NOW
    )
    assert p1 == Path("submissions/comp-exp-20240102T030405Z.csv")
    first = p1.read_bytes()
    p2 = write_submission(digits_cfg, ids, digits_probs(seed=2), DIGITS, "exp", {}, now=NOW)
    p3 = write_submission(digits_cfg, ids, digits_probs(seed=3), DIGITS, "exp", {}, now=NOW)
    assert [p2.name, p3.name] == ["comp-exp-20240102T030405Z-2.csv", "comp-exp-20240102T030405Z-3.csv"]
    assert p1.read_bytes() == first  # untouched
    assert p2.read_bytes() != first
    meta = json.loads(p1.with_suffix(".json").read_text())
    assert (
        meta["file"] == p1.name
        and meta["experiment"] == "exp"
        and meta["weights"] == [1.0]
        and meta["oof_score"] == 0.9
    )
    assert meta["rows"] == 100 and meta["columns"] == ["ImageId", "Label"] and meta["created_utc"] == "20240102T030405Z"
    for p in (p1, p2, p3):
        assert validate_submission(digits_cfg, p) == []
    assert not list(Path("submissions").glob(".*tmp"))  # no temporary files left


def test_writer_refuses_an_invalid_frame(digits_cfg):
    with pytest.raises(
        PipelineError, match=r"refusing to write an invalid submission for exp: .*1 test ids missing \(e.g. '100'\)"
    ):
        write_submission(digits_cfg, [str(i) for i in range(1, 100)], digits_probs(99), DIGITS, "exp", {}, now=NOW)
    assert list(Path("submissions").iterdir()) == []


def test_statoil_submission_is_probabilities(make_config, statoil_dir):
    cfg = load_config(make_config(statoil_dir))
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.0, 1.0], [1.0, 0.0]])
    p = write_submission(cfg, [f"img{i}" for i in range(5)], probs, ["ship", "iceberg"], "exp", {}, now=NOW)
    df = pd.read_csv(p)
    assert list(df.columns) == ["id", "is_iceberg"] and df["is_iceberg"].tolist() == [0.1, 0.8, 0.5, 1.0, 0.0]


# ---- validator -----------------------------------------------------------------------------


def broken_digits(mutate, path="bad.csv"):
    df = pd.read_csv(good_digits(), dtype=str)
    df = mutate(df)
    df.to_csv(path, index=False)
    return Path(path)


BROKEN_DIGITS = [  # (mutation, expected messages)
    (
        lambda d: d.rename(columns={"Label": "label"}),
        [r"bad.csv: columns are ImageId,label; expected exactly ImageId,Label"],
    ),
    (lambda d: d.drop(columns="Label"), [r"columns are ImageId; expected exactly ImageId,Label"]),
    (
        lambda d: d.iloc[:97],
        [
            r"bad.csv: 97 rows; expected 100 \(one per test image\)",
            r"bad.csv: 3 test ids missing \(e.g. '98', '99', '100'\)",
        ],
    ),
    (
        lambda d: d.assign(ImageId=d["ImageId"].where(~d.index.isin([5, 6, 7, 8]), "1")),
        [
            r"bad.csv: 4 duplicate ids \(e.g. '1'\); expected each test id once",
            r"4 test ids missing \(e.g. '6', '7', '8'\)",
        ],
    ),
    (
        lambda d: d.assign(ImageId=[str(i) for i in range(1, 96)] + ["0", "101", "102", "103", "104"]),
        [
            r"bad.csv: 5 test ids missing \(e.g. '96', '97', '98'\)",
            r"bad.csv: 5 ids not in the test data \(e.g. '0', '101', '102'\)$",
        ],
    ),
    (
        lambda d: d.assign(Label=d["Label"].where(d.index != 3, "")),
        [r"bad.csv: 1 empty or NaN values in Label \(e.g. ids '4'\)"],
    ),
    (
        lambda d: d.assign(Label=d["Label"].where(~d.index.isin([0, 1, 2, 3]), "11")),
        [
            r"bad.csv: 4 labels not among the classes in Label \(e.g. '1: 11', '2: 11', '3: 11'\); "
            r"expected one of 0, 1, 2, 3, 4, 5, 6, 7, 8, 9$"
        ],
    ),
    (
        lambda d: d.assign(ImageId=d["ImageId"].where(d.index != 0, "")),
        [r"bad.csv: 1 empty or NaN ids \(e.g. data rows 1\)", r"1 test ids missing \(e.g. '1'\)"],
    ),
]


@pytest.mark.parametrize("mutate,messages", BROKEN_DIGITS)
def test_validator_reports_each_failed_check(digits_cfg, mutate, messages):
    problems = validate_submission(digits_cfg, broken_digits(mutate))
    assert problems, "a broken file passed"
    for pattern in messages:
        assert any(pd.Series([p]).str.contains(pattern, regex=True).iloc[0] for p in problems), (pattern, problems)
    assert all("\n" not in p for p in problems)


def test_duplicates_count_and_examples(digits_cfg):
    bad = broken_digits(lambda d: d.assign(ImageId=d["ImageId"].where(~d.index.isin([10, 11, 12, 13, 20]), "1")))
    problems = validate_submission(digits_cfg, bad)
    assert "bad.csv: 5 duplicate ids (e.g. '1'); expected each test id once" in problems
    assert "bad.csv: 5 test ids missing (e.g. '11', '12', '13')" in problems


def test_validator_on_unreadable_files(digits_cfg):
    assert validate_submission(digits_cfg, "nope.csv") == ["nope.csv: file not found"]
    Path("empty.csv").write_text("")
    assert validate_submission(digits_cfg, "empty.csv")[0].startswith("empty.csv: cannot parse as CSV")
    assert validate_submission(digits_cfg, good_digits()) == []


def test_validator_probabilities(make_config, statoil_dir):
    cfg = load_config(make_config(statoil_dir))
    ok = pd.DataFrame({"id": [f"img{i}" for i in range(5)], "is_iceberg": [0.1, 0.5, 0.9, 0.0, 1.0]})
    ok.to_csv("ok.csv", index=False)
    assert validate_submission(cfg, "ok.csv") == []
    ok.assign(is_iceberg=["0.1", "abc", "0.9", "1.5", "-0.2"]).to_csv("bad.csv", index=False)
    problems = validate_submission(cfg, "bad.csv")
    assert problems == [
        "bad.csv: 1 non-numeric values in is_iceberg (e.g. 'img1: abc'); expected probabilities",
        "bad.csv: 2 probabilities outside [0, 1] in is_iceberg (e.g. 'img3: 1.5', 'img4: -0.2')",
    ]
    ok.assign(is_iceberg=[0.1, np.nan, 0.9, np.nan, 1.0]).to_csv("nan.csv", index=False)
    assert validate_submission(cfg, "nan.csv") == [
        "nan.csv: 2 empty or NaN values in is_iceberg (e.g. ids 'img1', 'img3')"
    ]
    ok.assign(is_iceberg=[0.1, "inf", 0.9, 0.2, 1.0]).to_csv("inf.csv", index=False)
    assert validate_submission(cfg, "inf.csv") == [
        "inf.csv: 1 non-numeric values in is_iceberg (e.g. 'img1: inf'); expected probabilities"
    ]


def test_validate_submission_cli_exit_codes(digits_cfg, capsys):
    good = good_digits()
    assert run_cli("validate-submission", digits_cfg.path, good) == 0
    assert "good.csv: valid comp submission (100 rows)" in capsys.readouterr().out
    bad = broken_digits(lambda d: d.iloc[:98].assign(Label=d["Label"].iloc[:98].where(d.index[:98] != 0, "x")))
    assert run_cli("validate-submission", digits_cfg.path, bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "bad.csv: 98 rows; expected 100 (one per test image)",
        "bad.csv: 2 test ids missing (e.g. '99', '100')",
        "bad.csv: 1 labels not among the classes in Label (e.g. '1: x'); expected one of 0, 1, 2, 3, 4, 5, 6, 7, 8, 9",
        "error: bad.csv: 3 check(s) failed; not a valid comp submission",
    ]


def test_validate_submission_scores_against_a_solution(digits_cfg, statoil_dir, make_config, capsys):
    good = good_digits()
    sol = pd.DataFrame({"ImageId": range(1, 101), "Label": np.where(np.arange(100) < 90, np.arange(100) % 10, 0)})
    sol.to_csv("solution.csv", index=False)
    assert run_cli("validate-submission", digits_cfg.path, good, "--solution", "solution.csv") == 0
    assert "good.csv: accuracy 0.91000 against solution.csv" in capsys.readouterr().out  # rows 91..99 differ
    sol.rename(columns={"Label": "label"}).to_csv("wrong.csv", index=False)
    assert run_cli("validate-submission", digits_cfg.path, good, "--solution", "wrong.csv") == 2
    assert capsys.readouterr().err.strip() == "error: wrong.csv: columns are ImageId,label; expected ImageId,Label"
    # probabilities are scored by log-loss
    cfg = load_config(make_config(statoil_dir, "statoil_json"))
    pd.DataFrame({"id": [f"img{i}" for i in range(5)], "is_iceberg": [0.9, 0.1, 0.8, 0.2, 0.5]}).to_csv(
        "p.csv", index=False
    )
    pd.DataFrame({"id": [f"img{i}" for i in range(5)], "is_iceberg": [1, 0, 1, 0, 1]}).to_csv("s.csv", index=False)
    from pipeline.predict.submission import score_submission

    name, value = score_submission(cfg, "p.csv", "s.csv")
    expect = -np.mean(np.log([0.9, 0.9, 0.8, 0.8, 0.5]))
    assert name == "logloss" and value == pytest.approx(expect)


# ---- experiment log and leaderboard ---------------------------------------------------------


def test_cv_score_sources(tmp_path):
    y, folds = np.array([0, 1, 0, 1, 1, 0]), np.array([0, 0, 0, 1, 1, 1])
    probs = np.eye(2)[[0, 1, 0, 0, 0, 0]]  # fold 0 all right, fold 1 one right of three
    run = fake_run("a", probs, y, folds)
    mean, std, src = cv_score(run, "accuracy")
    assert (
        src == "oof.csv" and mean == pytest.approx((1 + 1 / 3) / 2) and std == pytest.approx(np.std([1, 1 / 3], ddof=1))
    )
    (run / "metrics.json").write_text(json.dumps({"cv_mean": {"accuracy": 0.7}, "cv_std": {"accuracy": 0.05}}))
    assert cv_score(run, "accuracy") == (0.7, 0.05, "metrics.json")
    (run / "oof.csv").unlink(), (run / "metrics.json").unlink()
    for k, v in enumerate([0.8, 0.6]):
        (run / f"fold_{k}").mkdir()
        (run / f"fold_{k}" / "done.json").write_text(json.dumps({"val_accuracy": v}))
    assert cv_score(run, "accuracy") == (pytest.approx(0.7), pytest.approx(np.std([0.8, 0.6], ddof=1)), "done.json")


def test_experiments_and_lb(digits_cfg, capsys):
    y, folds = np.arange(30) % 10, np.arange(30) % 3
    fake_run("alpha", np.eye(10)[y], y, folds)
    fake_run("beta", np.full((30, 10), 0.1), y, folds, {"cv_mean": {"accuracy": 0.25}, "cv_std": {"accuracy": 0.01}})
    (Path("runs/comp/tune/study")).mkdir(parents=True)  # a tune folder is not an experiment
    sub = write_submission(
        digits_cfg,
        [str(i) for i in range(1, 101)],
        digits_probs(),
        DIGITS,
        "alpha",
        {"metric": "accuracy", "oof_score": 1.0},
        now=NOW,
    )
    assert run_cli("lb", sub, "0.987") == 0
    out = capsys.readouterr().out
    assert f"recorded LB 0.987 for {sub.name} (CV accuracy 1.00000) in submissions/leaderboard.csv" in out
    assert json.loads(sub.with_suffix(".json").read_text())["lb_score"] == 0.987
    record_lb(sub, 0.99)
    board = pd.read_csv("submissions/leaderboard.csv")
    assert board["lb_score"].tolist() == [0.987, 0.99] and board["experiment"].tolist() == ["alpha", "alpha"]
    assert board["cv"].tolist() == [1.0, 1.0]
    df = list_experiments(digits_cfg)
    assert df["experiment"].tolist() == ["alpha", "beta"]
    assert df["cv_accuracy"].tolist() == [1.0, 0.25] and df["cv_from"].tolist() == ["oof.csv", "metrics.json"]
    assert df["hash"].tolist() == ["hashalpha", "hashbeta"]
    assert df["submissions"].tolist() == [f"{sub.name} (LB 0.99)", ""]
    out = capsys.readouterr().out
    assert "alpha" in out and "0.99000" in out and "1.00000" in out  # CV beside LB
    assert run_cli("experiments", digits_cfg.path) == 0


def test_lb_errors(capsys):
    with pytest.raises(PipelineError, match=r"nope.csv: submission file not found"):
        record_lb("nope.csv", 0.5)
    Path("x.csv").write_text("id,label\n")
    with pytest.raises(PipelineError, match=r"lb: score nan is not a finite number"):
        record_lb("x.csv", float("nan"))
    # a file from elsewhere (no sidecar JSON recording its sha256) is refused: nothing is recorded
    assert cli_error(capsys, "lb", "x.csv", "0.5") == (
        "error: x.json: not found beside x.csv; a submission file comes with its JSON from `pipeline predict CONFIG` "
        "or `pipeline ensemble FILE`"
    )
    assert not Path("leaderboard.csv").exists()


def test_experiments_without_runs(digits_cfg, capsys):
    assert list_experiments(digits_cfg).empty
    assert "no runs under runs/comp yet" in capsys.readouterr().out
