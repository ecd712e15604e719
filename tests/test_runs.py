"""Run folders have one owner (pipeline/runs/layout.py); their roots (paths.*) are runtime keys."""

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli

from pipeline.config.load import load_config
from pipeline.config.schema import STAGE_SECTIONS
from pipeline.core.errors import PipelineError
from pipeline.runs.layout import JobDir, RunDir
from pipeline.train.precision import read_precision, write_precision


def test_job_and_refit_folders_with_one_and_several_seeds(digits_config):
    one = RunDir.of(load_config(digits_config()))
    assert one.seeds == [42] and one.path == Path("runs/comp/exp")
    assert one.job_dir(2, 42).path == Path("runs/comp/exp/fold_2") and one.job_label(2, 42) == "fold 2"
    assert one.refit_dir(42).path == Path("runs/comp/exp/refit") and one.refit_dir(42).label == "refit"
    assert one.job_dir(-1, 42) == one.refit_dir(42) and one.refit_dir(42).is_refit
    many = RunDir.of(load_config(digits_config(train={"seeds": [1, 2]})))
    assert many.seeds == [1, 2]
    assert many.job_dir(0, 2).name == "fold_0_seed2" and many.job_dir(0, 2).label == "fold 0 seed 2"
    assert many.refit_dir(1).name == "refit_seed1" and many.job_label(-1, 1) == "refit seed 1"
    assert [(j.fold, j.seed) for j in many.jobs([0, 1])] == [(0, 1), (1, 1), (0, 2), (1, 2)]  # seed-major, as trained
    j = many.job_dir(1, 2)
    assert [p.name for p in (j.best_weights, j.best_meta, j.last, j.history, j.oof, j.tb, j.lock, j.done)] == [
        "best.safetensors",
        "best.json",
        "last.pt",
        "history.csv",
        "oof.csv",
        "tb",
        "lock",
        "done.json",
    ]
    assert str(j) == str(j.path) and Path(j) == j.path
    names = [
        p.name
        for p in (
            many.oof,
            many.oof_tta,
            many.test_pred,
            many.test_pred_refit,
            many.test_pred_fold(3),
            many.predict_json,
            many.metrics_json,
            many.calibration_json,
            many.precision_json,
            many.ensemble_json,
            many.report_dir,
            many.snapshot("train"),
            many.snapshot("predict"),
        )
    ]
    assert names == [
        "oof.csv",
        "oof_tta.csv",
        "test_pred.csv",
        "test_pred_refit.csv",
        "test_pred_fold3.csv",
        "predict.json",
        "metrics.json",
        "calibration.json",
        "precision.json",
        "ensemble.json",
        "report",
        "config.train.yaml",
        "config.predict.yaml",
    ]


def test_constructor_is_keyword_only_and_a_bare_folder_knows_no_seeds():
    with pytest.raises(TypeError):
        RunDir("runs/c/e")
    with pytest.raises(TypeError):
        JobDir(Path("x"), 0, 0, "fold 0")
    bare = RunDir(path="runs/c/e")
    assert bare.oof == Path("runs/c/e/oof.csv")
    with pytest.raises(ValueError, match="seeds are unknown"):
        bare.job_dir(0, 0)
    with pytest.raises(ValueError, match="no run-folder stage 'fold'"):
        bare.snapshot("fold")
    with pytest.raises(PipelineError, match=r"predict.json: oof is 'x.csv'; expected one of oof.csv, oof_tta.csv"):
        bare.oof_file("x.csv")


def test_done_markers(digits_config):
    run = RunDir.of(load_config(digits_config(train={"seeds": [1, 2]})))
    job = run.job_dir(0, 1)
    assert job.read_done() is None and not job.is_done("h")
    job.write_done({"hash": "h", "best_epoch": 3})
    assert (
        job.read_done() == {"hash": "h", "best_epoch": 3}
        and job.is_done("h")
        and not job.is_done("other")
        and job.is_done(None)
    )
    with pytest.raises(ValueError):
        job.write_done({"best_epoch": 3})
    # fold 0 waits for its second seed; fold 1 has not started
    ready, waiting = run.finished_fold_oofs(2, "h")
    assert ready == {} and waiting == [0, 1]
    run.job_dir(0, 2).write_done({"hash": "h"})
    ready, waiting = run.finished_fold_oofs(2, "h")
    assert ready == {0: [run.job_dir(0, 1).oof, run.job_dir(0, 2).oof]} and waiting == [1]
    assert run.done_records() == [{"hash": "h", "best_epoch": 3}, {"hash": "h"}]
    job.done.write_text("{half")
    with pytest.raises(
        PipelineError, match=r"fold_0_seed1/done.json: not a JSON object; delete it to train fold 0 seed 1 again"
    ):
        job.is_done("h")
    job.clear_done()
    assert job.read_done() is None


def test_precision_record(digits_config):
    run = RunDir.of(load_config(digits_config()))
    assert read_precision(run) is None
    write_precision(run, "bf16", "abc")
    assert (
        read_precision(run) == "bf16" and read_precision(run, "abc") == "bf16" and read_precision(run, "other") is None
    )


# ---- paths.* -----------------------------------------------------------------------------------


def test_paths_are_runtime_keys(digits_config, tmp_path):
    path = digits_config()
    base = load_config(path)
    moved = load_config(path, ["paths.runs=/elsewhere/r", "paths.folds=/elsewhere/f", "paths.submissions=/elsewhere/s"])
    assert moved.run_dir == Path("/elsewhere/r/comp/exp") and moved.folds_path == Path("/elsewhere/f/comp.csv")
    for stage in STAGE_SECTIONS:
        assert moved.hash(*STAGE_SECTIONS[stage]) == base.hash(*STAGE_SECTIONS[stage]), stage
    assert moved.hash() == base.hash()
    assert load_config(path, ["folds.file=my.csv", "paths.folds=/x"]).folds_path == Path("my.csv")  # folds.file wins
    assert load_config(path, ["train.lr=0.5"]).hash(*STAGE_SECTIONS["train"]) != base.hash(*STAGE_SECTIONS["train"])
    with pytest.raises(PipelineError, match=r"unknown key 'paths.run'; did you mean paths.runs"):
        load_config(path, ["paths.run=x"])


def test_metric_joins_the_predict_hash(digits_config):
    """A changed metric changes predict.json's scores: predict must be stale even where evaluate is not."""
    from pipeline.stages import stage_states

    path = digits_config()
    acc, ll = load_config(path), load_config(path, ["metric=logloss"])
    assert acc.hash(*STAGE_SECTIONS["predict"]) != ll.hash(*STAGE_SECTIONS["predict"])
    run = RunDir.of(acc)
    for f in (acc.folds_path, run.oof, run.metrics_json, run.test_pred):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    from pipeline.config.load import write_snapshot

    write_snapshot(acc, acc.folds_path.with_suffix(".config.yaml"), "fold")
    run.write_snapshot("train")
    run.write_snapshot("predict")
    RunDir.of(ll).write_snapshot("evaluate")  # evaluate done for the new metric
    states = {st.name: state for st, state in stage_states(ll)}
    assert states == {"fold": "done", "train": "done", "evaluate": "done", "predict": "stale"}


def test_a_run_writes_only_under_the_configured_roots(digits_config, tmp_path_factory, capsys):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    roots = {k: elsewhere / k for k in ("runs", "folds", "submissions")}
    path = digits_config(
        train={"epochs": 1}, evaluate={"gradcam_samples": 1}, paths={k: str(v) for k, v in roots.items()}
    )
    assert run_cli("run", path) == 0
    for d in ("runs", "folds", "submissions"):
        assert not Path(d).exists(), d
    run = roots["runs"] / "comp" / "exp"
    for f in (
        "oof.csv",
        "metrics.json",
        "calibration.json",
        "report/report.html",
        "test_pred.csv",
        "test_pred_fold0.csv",
        "predict.json",
        "fold_0/done.json",
        "config.predict.yaml",
    ):
        assert (run / f).exists(), f
    assert (roots["folds"] / "comp.csv").is_file()
    subs = list(roots["submissions"].glob("comp-exp-*.csv"))
    assert len(subs) == 1
    capsys.readouterr()
    assert run_cli("experiments", path) == 0  # the experiment log reads the same roots
    out = capsys.readouterr().out
    assert "exp" in out and subs[0].name in out
    assert run_cli("status", path) == 0
    assert capsys.readouterr().out.count("done") == 4
    cfg = load_config(path)
    assert pd.read_csv(cfg.folds_path).shape[0] == 600 and json.loads((run / "predict.json").read_text())["models"] == [
        "fold_0",
        "fold_1",
        "fold_2",
    ]


def test_tuning_studies_and_histories_follow_the_runs_root(digits_config, tmp_path):
    from pipeline.runs.layout import RunDir, tune_dir
    from pipeline.tune.study import default_storage

    cfg = load_config(digits_config(), [f"paths.runs={tmp_path / 'big-disk'}"])
    assert tune_dir(cfg, "s1") == tmp_path / "big-disk" / "comp" / "tune" / "s1"
    assert default_storage(cfg) == f"sqlite:///{(tmp_path / 'big-disk' / 'comp' / 'tune' / 'optuna.db').resolve()}"
    run = RunDir(path=tmp_path / "r")
    for name in ("fold_10", "fold_2_seed7", "fold_2_seed3", "fold_x", "refit"):
        (run.path / name).mkdir(parents=True)
        (run.path / name / "history.csv").write_text("epoch\n1\n")
    assert [label for label, _ in run.histories()] == ["fold 2 seed 3", "fold 2 seed 7", "fold 10"]
