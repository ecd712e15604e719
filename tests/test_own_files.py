"""The pipeline's own files are read through checked readers: an empty, corrupt or wrong-shaped
best.json, done.json, metrics.json, predict.json, leaderboard.csv, submission sidecar JSON or
``--solution`` file is one line naming the file and the command that rebuilds it (exit 2), never a
traceback. ``pipeline lb`` accepts only a submission file the pipeline wrote, unchanged since."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_error, run_cli, write_yaml
from helpers import DIGITS, NOW, digits_probs, fake_member, fake_run

BROKEN_JSON = {
    "empty": b"",
    "garbage": b"\xff\xfe{not json",
    "truncated": b'{"hash": "ab',
    "a list": b"[1, 2, 3]",
    "a number": b"3",
}


def _same(paths) -> dict:
    return {str(p): p.read_bytes() for p in map(Path, paths) if p.is_file()}


# ---- best.json and done.json (read by predict) -------------------------------------------------


def test_corrupt_model_files_name_the_file_and_the_retrain(digits_config, capsys):
    path = digits_config(train={"epochs": 1})
    assert run_cli("fold", path) == 0 and run_cli("train", path) == 0
    job = Path("runs/comp/exp/fold_1")
    retrain = f"to train fold 1 again with `pipeline train {path}`"
    wrong_shapes = {
        "img_size": lambda d: d.update(img_size=[8]),
        "class_names": lambda d: d.update(class_names="0123456789"),
        "in_chans": lambda d: d.update(in_chans="1"),
        "model": lambda d: d.update(model=["simple_cnn"]),
        "drop_rate": lambda d: d["model"].update(drop_rate=None),
        "pretrained": lambda d: d["model"].pop("pretrained"),
        "input_norm": lambda d: d["model"].update(input_norm="per_image"),
    }
    good = (job / "best.json").read_bytes()
    cases = [(what, data) for what, data in BROKEN_JSON.items()]
    for what, change in wrong_shapes.items():
        d = json.loads(good)
        change(d)
        cases.append((what, json.dumps(d).encode()))
    for what, data in cases:
        (job / "best.json").write_bytes(data)
        err = cli_error(capsys, "predict", path)
        assert err.startswith(f"error: {job}/best.json: ") and f"delete {job}/done.json {retrain}" in err, (what, err)
        assert not Path("runs/comp/exp/test_pred.csv").exists()
    (job / "best.json").unlink()
    assert (
        cli_error(capsys, "predict", path)
        == f"error: {job}/best.json: file not found; delete {job}/done.json {retrain}"
    )
    (job / "best.json").write_bytes(good)
    good_done = (job / "done.json").read_bytes()
    for what, data in BROKEN_JSON.items():
        (job / "done.json").write_bytes(data)
        err = cli_error(capsys, "predict", path)
        assert err.startswith(f"error: {job}/done.json: not a JSON object; delete it {retrain} (found "), (what, err)
    (job / "done.json").write_bytes(good_done)
    assert run_cli("predict", path) == 0


# ---- metrics.json, done.json and predict.json of runs read by other commands ---------------------


@pytest.fixture
def digits_cfg_path(make_config, sk_digits_dir):
    return make_config(sk_digits_dir, "pixel_csv", metric="accuracy")


def _two_runs():
    y, folds = np.arange(30) % 10, np.arange(30) % 3
    return fake_run("alpha", np.eye(10)[y], y, folds), fake_run("beta", np.full((30, 10), 0.1), y, folds)


METRICS_SHAPES = {
    **BROKEN_JSON,
    "cv_mean a list": b'{"cv_mean": [0.5], "cv_std": {}}',
    "a score as text": b'{"cv_mean": {"accuracy": "high"}, "cv_std": {"accuracy": 0.1}}',
    "metric a number": b'{"metric": 3}',
}


@pytest.mark.parametrize("what", list(METRICS_SHAPES))
def test_corrupt_metrics_json(digits_cfg_path, what, capsys):
    alpha, beta = _two_runs()
    (beta / "metrics.json").write_bytes(METRICS_SHAPES[what])
    for argv in (
        ("experiments", digits_cfg_path),
        ("evaluate", "--compare", alpha, beta),
        ("evaluate", "--compare", beta, alpha),
    ):
        err = cli_error(capsys, *argv)
        assert (
            err.startswith(f"error: {beta}/metrics.json: ") and "rerun `pipeline evaluate <config of beta>`" in err
        ), (argv, err)
    (beta / "metrics.json").write_text(
        json.dumps({"metric": "accuracy", "cv_mean": {"accuracy": 0.3}, "cv_std": {"accuracy": 0.1}})
    )
    assert run_cli("experiments", digits_cfg_path) == 0 and run_cli("evaluate", "--compare", alpha, beta) == 0


def test_corrupt_done_json_and_config_snapshot_in_listings(digits_cfg_path, capsys):
    alpha, beta = _two_runs()
    (beta / "oof.csv").unlink()  # CV from the folds' done.json
    (beta / "config.train.yaml").write_text("competition: comp\n")  # still a run
    (beta / "fold_0").mkdir()
    (beta / "fold_0" / "done.json").write_text(json.dumps({"hash": "h", "val_accuracy": "0.9"}))
    err = cli_error(capsys, "experiments", digits_cfg_path)
    assert err == (
        f"error: {beta}/fold_0/done.json: val_accuracy is '0.9'; expected a number; delete it to train fold_0 again "
        "with `pipeline train <config of beta>`"
    )
    for what, data in BROKEN_JSON.items():
        (beta / "fold_0" / "done.json").write_bytes(data)
        err = cli_error(capsys, "experiments", digits_cfg_path)
        assert err.startswith(f"error: {beta}/fold_0/done.json: not a JSON object; delete it to train fold_0 again"), (
            what,
            err,
        )
    (beta / "fold_0" / "done.json").write_text(json.dumps({"hash": "h", "val_accuracy": 0.9}))
    assert run_cli("experiments", digits_cfg_path) == 0
    # evaluate --compare reads a run's config snapshot for its eps
    (alpha / "config.evaluate.yaml").write_bytes(b"- just\n- a list\n")
    err = cli_error(
        capsys,
        "evaluate",
        "--compare",
        alpha,
        fake_run("gamma", np.eye(10)[np.arange(30) % 10], np.arange(30) % 10, np.arange(30) % 3),
    )
    assert (
        err == f"error: {alpha}/config.evaluate.yaml: not a config snapshot the pipeline wrote; "
        "rerun `pipeline evaluate <config of alpha>`"
    )


def test_corrupt_predict_json_of_an_ensemble_member(make_config, sk_digits_dir, capsys):
    cfg = make_config(sk_digits_dir, "pixel_csv", name="base", metric="logloss")
    fake_member("a", 1), fake_member("b", 2)
    write_yaml(
        Path("blend.yaml"), {"competition": "comp", "config": str(cfg), "members": ["runs/comp/a", "runs/comp/b"]}
    )
    for data in BROKEN_JSON.values():
        Path("runs/comp/b/predict.json").write_bytes(data)
        err = cli_error(capsys, "ensemble", "blend.yaml")
        assert err.startswith(
            "error: runs/comp/b/predict.json: not a JSON object; rerun `pipeline predict <config of b>` (found "
        ), err
    assert not Path("submissions").exists() and not Path("runs/comp/blend").exists()


# ---- submissions: sidecar JSON, leaderboard.csv, lb --------------------------------------------


@pytest.fixture
def submission(digits_cfg_path):
    from pipeline.config.load import load_config
    from pipeline.predict.submission import write_submission

    _two_runs()
    return write_submission(
        load_config(digits_cfg_path),
        [str(i) for i in range(1, 101)],
        digits_probs(),
        DIGITS,
        "alpha",
        {"metric": "accuracy", "oof_score": 1.0},
        now=NOW,
    )


SIDECAR_SHAPES = {
    **BROKEN_JSON,
    "no experiment": lambda d: d.pop("experiment"),
    "file a number": lambda d: d.update(file=3),
    "oof_score as text": lambda d: d.update(oof_score="1.0"),
    "lb_score true": lambda d: d.update(lb_score=True),
}


@pytest.mark.parametrize("what", list(SIDECAR_SHAPES))
def test_corrupt_sidecar_json(digits_cfg_path, submission, what, capsys):
    j = submission.with_suffix(".json")
    shape = SIDECAR_SHAPES[what]
    if callable(shape):
        d = json.loads(j.read_text())
        shape(d)
        j.write_text(json.dumps(d))
    else:
        j.write_bytes(shape)
    before = _same([j, "submissions/leaderboard.csv"])
    for argv in (("experiments", digits_cfg_path), ("lb", submission, "0.5")):
        err = cli_error(capsys, *argv)
        assert err.startswith(f"error: {j}: ") and "`pipeline predict CONFIG` or `pipeline ensemble FILE`" in err, (
            argv,
            err,
        )
    assert _same([j, "submissions/leaderboard.csv"]) == before


BOARD_SHAPES = {
    "empty": b"",
    "garbage": b"\xff\xfe\x00\x01garbage\n\x00",
    "other columns": b"a,b\n1,2\n",
    "no lb_score column": b"recorded_utc,file,competition,experiment,metric,cv\nx,f.csv,comp,alpha,accuracy,0.9\n",
    "a text score": b"recorded_utc,file,competition,experiment,metric,cv,lb_score\n"
    b"x,f.csv,comp,alpha,accuracy,0.9,high\n",
    "an inf score": b"recorded_utc,file,competition,experiment,metric,cv,lb_score\n"
    b"x,f.csv,comp,alpha,accuracy,0.9,inf\n",
    "no file": b"recorded_utc,file,competition,experiment,metric,cv,lb_score\nx,,comp,alpha,accuracy,0.9,0.5\n",
    "a text cv": b"recorded_utc,file,competition,experiment,metric,cv,lb_score\nx,f.csv,comp,alpha,accuracy,good,0.5\n",
}


@pytest.mark.parametrize("what", list(BOARD_SHAPES))
def test_corrupt_leaderboard_csv(digits_cfg_path, submission, what, capsys):
    board = Path("submissions/leaderboard.csv")
    board.write_bytes(BOARD_SHAPES[what])
    before = _same([board, submission.with_suffix(".json")])
    for argv in (("experiments", digits_cfg_path), ("lb", submission, "0.5")):
        err = cli_error(capsys, *argv)
        assert (
            err.startswith(f"error: {board}: ") and "record the scores again with `pipeline lb SUBMISSION SCORE`" in err
        ), (argv, err)
    assert _same([board, submission.with_suffix(".json")]) == before
    board.unlink()
    assert run_cli("lb", submission, "0.5") == 0 and run_cli("experiments", digits_cfg_path) == 0


def test_lb_accepts_only_an_unchanged_file_the_pipeline_wrote(submission, capsys):
    j, board = submission.with_suffix(".json"), Path("submissions/leaderboard.csv")
    assert json.loads(j.read_text())["sha256"] == __import__("hashlib").sha256(submission.read_bytes()).hexdigest()
    assert run_cli("lb", submission, "0.9") == 0
    before = _same([submission, j, board])
    # the CSV changed after the pipeline wrote it
    submission.write_bytes(submission.read_bytes().replace(b"\n1,", b"\n1 ,", 1))
    assert cli_error(capsys, "lb", submission, "0.5") == (
        f"error: {submission}: its sha256 differs from the one {j.name} recorded: "
        "the file was changed after the pipeline wrote it; "
        "a submission file comes with its JSON from `pipeline predict CONFIG` or `pipeline ensemble FILE`"
    )
    submission.write_bytes(before[str(submission)])
    # a sidecar without sha256 (an older pipeline's, or edited)
    d = json.loads(j.read_text())
    j.write_text(json.dumps({k: v for k, v in d.items() if k != "sha256"}))
    assert cli_error(capsys, "lb", submission, "0.5") == (
        f"error: {j}: no sha256 of {submission.name} (written before submission files recorded it); "
        "a submission file comes with its JSON from `pipeline predict CONFIG` or `pipeline ensemble FILE`"
    )
    # a sidecar of another file
    j.write_text(json.dumps(d | {"file": "other.csv"}))
    assert cli_error(capsys, "lb", submission, "0.5").startswith(
        f"error: {j}: describes 'other.csv', not {submission.name}; "
    )
    # no sidecar at all
    j.unlink()
    assert cli_error(capsys, "lb", submission, "0.5") == (
        f"error: {j}: not found beside {submission.name}; "
        "a submission file comes with its JSON from `pipeline predict CONFIG` or `pipeline ensemble FILE`"
    )
    assert _same([submission, board]) == {k: v for k, v in before.items() if k != str(j)}  # nothing recorded
    assert pd.read_csv(board)["lb_score"].tolist() == [0.9]


def test_lb_writes_both_records_or_neither(submission, monkeypatch, capsys):
    import errno
    import os

    board = Path("submissions/leaderboard.csv")
    assert run_cli("lb", submission, "0.9") == 0
    before = _same([board, submission.with_suffix(".json")])
    real = os.replace

    def replace(src, dst):
        if Path(dst).suffix == ".json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        assert (
            cli_error(capsys, "lb", submission, "0.5")
            == f"error: {submission.with_suffix('.json')}: No space left on device (ENOSPC)"
        )
    assert _same([board, submission.with_suffix(".json")]) == before


# ---- --solution files ---------------------------------------------------------------------------


def _solution(rows: list[str]) -> Path:
    p = Path("solution.csv")
    p.write_text("\n".join(["ImageId,Label"] + rows) + "\n")
    return p


GOOD = [f"{i},{i % 10}" for i in range(1, 101)]
SOLUTIONS = {  # rows 1..100 as "id,label" with one change -> the message after "solution.csv: "
    "unknown class": (
        lambda r: r[:4] + ["5,x"] + r[5:],
        "line 6 (ImageId '5'): Label 'x' is not a true answer; expected one of 0, 1, 2",
    ),
    "out of range": (lambda r: r[:4] + ["5,12"] + r[5:], "line 6 (ImageId '5'): Label '12' is not a true answer"),
    "NaN label": (lambda r: r[:4] + ["5,nan"] + r[5:], "line 6 (ImageId '5'): Label is empty or NaN"),
    "empty label": (lambda r: r[:4] + ["5,"] + r[5:], "line 6 (ImageId '5'): Label is empty or NaN"),
    "missing id": (lambda r: r[:4] + [",5"] + r[5:], "line 6: ImageId is empty or NaN"),
    "duplicate id": (lambda r: r[:4] + ["4,5"] + r[5:], "line 6: ImageId '4' appears more than once"),
    "a float label": (lambda r: r[:4] + ["5,5.0"] + r[5:], "line 6 (ImageId '5'): Label '5.0' is not a true answer"),
    "no rows": (lambda r: [], "no rows"),
}


@pytest.mark.parametrize("what", list(SOLUTIONS))
def test_bad_solution_files(digits_cfg_path, what, capsys):
    pd.DataFrame({"ImageId": range(1, 101), "Label": np.arange(100) % 10}).to_csv("good.csv", index=False)
    change, message = SOLUTIONS[what]
    sol = _solution(change(list(GOOD)))
    err = cli_error(capsys, "validate-submission", digits_cfg_path, "good.csv", "--solution", sol)
    assert err.startswith(f"error: solution.csv: {message}") and err.endswith(
        "rebuilt by `pipeline demo-data KIND --out DIR`)"
    ), err


def test_unreadable_solution_files(digits_cfg_path, make_config, iceberg_dir, capsys):
    pd.DataFrame({"ImageId": range(1, 101), "Label": np.arange(100) % 10}).to_csv("good.csv", index=False)
    for data in (b"", b"\xff\xfe\x00garbage\n\x01\x02", b'ImageId,Label\n"1,2\n'):
        Path("solution.csv").write_bytes(data)
        err = cli_error(capsys, "validate-submission", digits_cfg_path, "good.csv", "--solution", "solution.csv")
        assert err.startswith("error: solution.csv: "), err
    # probability submissions are scored against 0/1 answers
    from pipeline.config.load import load_config
    from pipeline.data.formats import read_table

    cfg = make_config(iceberg_dir, "statoil_json", name="ice")
    ids = read_table(load_config(cfg), "test").ids
    pd.DataFrame({"id": ids, "is_iceberg": 0.5}).to_csv("p.csv", index=False)
    for bad, message in (
        ("2", "is_iceberg '2' is not a true answer; expected one of 0, 1"),
        ("0.5", "is_iceberg '0.5' is not a true answer"),
    ):
        pd.DataFrame({"id": ids, "is_iceberg": [bad] + [0] * (len(ids) - 1)}).to_csv("s.csv", index=False)
        err = cli_error(capsys, "validate-submission", cfg, "p.csv", "--solution", "s.csv")
        assert err.startswith(f"error: s.csv: line 2 (id {ids[0]!r}): {message}"), err
    pd.DataFrame({"id": ids, "is_iceberg": np.arange(len(ids)) % 2}).to_csv("s.csv", index=False)
    assert run_cli("validate-submission", cfg, "p.csv", "--solution", "s.csv") == 0
    assert f"logloss {np.log(2):.5f} against s.csv" in capsys.readouterr().out
    # the file after an option that follows overrides (argparse alone took the last override for the file)
    assert run_cli("validate-submission", cfg, "predict.clip=[0.001,0.999]", "--solution", "s.csv", "p.csv") == 0
    assert f"logloss {np.log(2):.5f} against s.csv" in capsys.readouterr().out
    err = cli_error(capsys, "validate-submission", cfg, "data.dir=nowhere", "--solution", "s.csv", "p.csv")
    assert "nowhere" in err, err  # the override is applied, not dropped
