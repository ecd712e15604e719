"""`pipeline run` end to end on each demo format with the shipped configs (scaled down), and
stage skipping / staleness through `pipeline status`."""

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli

from pipeline.config.load import load_config
from pipeline.predict.submission import validate_submission

COMPETITIONS = Path(__file__).parents[1] / "competitions"
FAST = ["folds.n_splits=2", "train.epochs=1", "evaluate.gradcam_samples=1"]


def _run(config: str, data_dir: Path, extra=()) -> list[str]:
    overrides = [f"data.dir={data_dir}", *FAST, *extra]
    assert run_cli("run", COMPETITIONS / config, *overrides) == 0
    return overrides


@pytest.mark.parametrize(
    "config, fixture, extra, min_accuracy",
    [
        # the real iceberg config (pretrained tf_efficientnet_lite0, angle features, TTA, clipping)
        pytest.param(
            "iceberg-demo.yaml", "iceberg_dir", ["predict.tta=[identity,hflip]"], None, marks=pytest.mark.slow
        ),
        # digits: one short epoch on 2 folds; chance is 0.1
        pytest.param("digits-demo.yaml", "digits_dir", ["train.max_steps_per_epoch=40"], 0.5, marks=pytest.mark.slow),
        (
            "folder-demo.yaml",
            "folder_dir",
            ["train.epochs=6"],
            0.3,
        ),  # 100 training images per fold; the fast tier's end-to-end run
    ],
)
def test_run_end_to_end_writes_a_valid_submission(config, fixture, extra, min_accuracy, request, capsys):
    data_dir = request.getfixturevalue(fixture)
    overrides = _run(config, data_dir, extra)
    out = capsys.readouterr().out
    for stage in ("fold", "train", "evaluate", "predict"):
        assert f"[{stage}] running" in out and f"[{stage}] done in" in out
    assert "stage times: fold" in out
    cfg = load_config(COMPETITIONS / config, overrides)
    run = cfg.run_dir
    for f in ("oof.csv", "metrics.json", "report/report.html", "test_pred.csv", "predict.json"):
        assert (run / f).is_file(), f
    subs = sorted(Path("submissions").glob(f"{cfg.competition}-{cfg.name}-*.csv"))
    assert len(subs) == 1 and validate_submission(cfg, subs[0]) == []
    meta = json.loads(subs[0].with_suffix(".json").read_text())
    assert meta["experiments"] == [cfg.name] and meta["metric"] == cfg.metric
    if min_accuracy is not None:  # the digit demos hold out answers: the file scores against them
        from pipeline.predict.submission import score_submission

        name, value = score_submission(cfg, subs[0], data_dir / "solution.csv")
        assert name == "accuracy" and value > min_accuracy
    # everything is fresh now: a second run skips every stage
    assert run_cli("run", COMPETITIONS / config, *overrides) == 0
    assert capsys.readouterr().out.count("up to date") == 4
    assert len(list(Path("submissions").glob("*.csv"))) == 1


def _states(capsys, config, overrides) -> dict:
    capsys.readouterr()
    assert run_cli("status", COMPETITIONS / config, *overrides) == 0
    return {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}


@pytest.mark.slow  # heavy: full tier (make test-all)
def test_status_and_staleness(digits_dir, capsys):
    cfg = "digits-demo.yaml"
    base = [f"data.dir={digits_dir}", *FAST, "train.max_steps_per_epoch=5", "evaluate.gradcam_samples=0"]
    assert _states(capsys, cfg, base) == {s: "missing" for s in ("fold", "train", "evaluate", "predict")}
    assert run_cli("run", COMPETITIONS / cfg, *base) == 0
    assert _states(capsys, cfg, base) == {s: "done" for s in ("fold", "train", "evaluate", "predict")}
    # a TTA change reaches evaluate (it makes the TTA OOF and calibrates on it), not training; a clip only predict
    tta = base + ["predict.tta=[identity,hflip]"]
    assert _states(capsys, cfg, tta) == {"fold": "done", "train": "done", "evaluate": "stale", "predict": "stale"}
    clip = base + ["predict.clip=[0.01,0.99]"]
    assert _states(capsys, cfg, clip) == {"fold": "done", "train": "done", "evaluate": "done", "predict": "stale"}
    # a learning-rate change retrains and everything downstream is stale; the folds stay
    lr = base + ["train.lr=0.002"]
    assert _states(capsys, cfg, lr) == {"fold": "done", "train": "stale", "evaluate": "stale", "predict": "stale"}
    assert run_cli("run", COMPETITIONS / cfg, *lr) == 0
    out = capsys.readouterr().out
    assert "[fold] up to date" in out and "[train] rerunning (stale)" in out and "[predict] rerunning (stale)" in out
    assert _states(capsys, cfg, lr) == {s: "done" for s in ("fold", "train", "evaluate", "predict")}
    assert len(list(Path("submissions").glob("*.csv"))) == 2  # never overwritten
    # a different folds seed re-folds, which makes the rest stale too
    seed = lr + ["folds.seed=1"]
    assert _states(capsys, cfg, seed)["fold"] == "stale" and _states(capsys, cfg, seed)["train"] == "stale"
    folds = pd.read_csv("folds/digits-demo.csv")  # still the first seed's: status reads, never writes
    assert len(folds) == len(pd.read_csv(digits_dir / "train.csv")) and folds["fold"].nunique() == 2
