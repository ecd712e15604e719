"""All or nothing: a stage's files are written into a staging folder and checked, the submission is
written, then the files move into place with the done marker last. A failure anywhere before leaves
every earlier artifact byte for byte as it was; a member's bad prediction file is refused by name."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_error, run_cli, write_yaml
from helpers import CLASSES, fake_member

from pipeline.core.io import staged


def _tree(*roots) -> dict:
    """Every file under ``roots`` with its bytes and mtime: what "unchanged" means here."""
    out = {}
    for root in map(Path, roots):
        if root.exists():
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    out[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def _enospc_for(match):
    """os.replace that fails with ENOSPC for destinations ``match(dest)`` picks, and works otherwise."""
    real = os.replace

    def replace(src, dst, *a, **kw):
        if match(Path(dst)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **kw)

    return replace


# ---- io.staged ------------------------------------------------------------------------------


def test_staged_moves_everything_with_the_markers_last(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "stale.csv").write_text("old")
    order = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda s, d: (order.append(Path(d).name), real(s, d))[1])
    with staged(folder, last=[folder / "marker.yaml", folder / "marker.hash"]) as stage:
        for name in ("marker.hash", "marker.yaml", "a.csv", "b.json"):  # staged in any order
            stage.path(folder / name).write_text(name)
        stage.remove(folder / "stale.csv")
        assert not (folder / "a.csv").exists() and (folder / "stale.csv").exists()  # nothing moves before the end
    assert order == ["a.csv", "b.json", "marker.yaml", "marker.hash"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "a.csv",
        "b.json",
        "marker.hash",
        "marker.yaml",
    ]  # no staging folder left
    with pytest.raises(ValueError, match="not a file of"):
        with staged(folder) as stage:
            stage.path(tmp_path / "elsewhere.csv")


def test_staged_failure_changes_nothing_and_undoes(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "a.csv").write_text("old")
    (folder / "marker").write_text("done")
    before, undone = _tree(folder), []
    with pytest.raises(RuntimeError, match="boom"):
        with staged(folder, last=[folder / "marker"]) as stage:
            stage.path(folder / "a.csv").write_text("new")
            stage.path(folder / "marker").write_text("new")
            stage.remove(folder / "a.csv")
            stage.undo(lambda: undone.append("submission"))
            raise RuntimeError("boom")
    assert _tree(folder) == before and undone == ["submission"] and sorted(os.listdir(folder)) == ["a.csv", "marker"]
    # a folder the stage made for itself is gone again
    with pytest.raises(RuntimeError):
        with staged(tmp_path / "new") as stage:
            stage.path(tmp_path / "new" / "x").write_text("x")
            raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()
    # a file staged but never written is a bug of the stage: refused before anything moves
    with pytest.raises(RuntimeError, match="staged but never written"):
        with staged(folder, last=[folder / "marker"]) as stage:
            stage.path(folder / "marker").write_text("new")
            stage.path(folder / "b.csv")
    assert _tree(folder) == before


def test_a_cut_short_commit_reads_as_not_done(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "a.csv").write_text("old")
    (folder / "marker").write_text("done")
    monkeypatch.setattr(os, "replace", _enospc_for(lambda d: d.name == "b.csv"))
    undone = []
    with pytest.raises(OSError) as e:
        with staged(folder, last=[folder / "marker"]) as stage:
            stage.path(folder / "a.csv").write_text("new")
            stage.path(folder / "b.csv").write_text("new")
            stage.path(folder / "marker").write_text("new")
            stage.undo(lambda: undone.append(1))
    assert e.value.filename == str(folder / "b.csv") and undone == [1]
    assert not (folder / "marker").exists()  # the old marker went first: not "done" with half the new files
    assert [p.name for p in folder.iterdir()] == ["a.csv"]


def test_a_killed_writers_staging_folder_is_swept(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    host = socket.gethostname().replace(".", "_")
    dead = folder / f".staging.{host}-{int(proc.stdout)}.abc123.tmp"
    live = folder / f".staging.{host}-{os.getpid()}.zzz999.tmp"
    for d in (dead, live):
        d.mkdir()
        (d / "test_pred.csv").write_text("half")
    with staged(folder) as stage:
        stage.path(folder / "x").write_text("x")
    assert not dead.exists() and live.exists()


# ---- ensemble ---------------------------------------------------------------------------------


@pytest.fixture
def two_members(make_config, sk_digits_dir):
    cfg = make_config(sk_digits_dir, "pixel_csv", name="base", metric="logloss")
    a, b = fake_member("a", 1), fake_member("b", 2)
    write_yaml(
        Path("blend.yaml"), {"competition": "comp", "config": str(cfg), "members": ["runs/comp/a", "runs/comp/b"]}
    )
    assert run_cli("ensemble", "blend.yaml") == 0  # an earlier blend, which a failed one must leave alone
    return a, b


def _spoil(path: Path, row: int, change):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    change(df, row)
    df.to_csv(path, index=False)


SPOILS = [  # (what, change, message after "line 7 (id '6'): ")
    (
        "above 1",
        lambda df, i: df.__setitem__("p_3", df["p_3"].where(df.index != i, "1.5")),
        "p_3 is 1.5; expected a probability in [0, 1]",
    ),
    (
        "NaN",
        lambda df, i: df.__setitem__("p_4", df["p_4"].where(df.index != i, "nan")),
        "p_4 is NaN or empty; expected a probability in [0, 1]",
    ),
    (
        "not summing to 1",
        lambda df, i: df.__setitem__("p_0", df["p_0"].where(df.index != i, "0")),
        "probabilities sum to",
    ),
]


@pytest.mark.parametrize("what,change,message", SPOILS, ids=[s[0] for s in SPOILS])
@pytest.mark.parametrize("name", ["test_pred.csv", "oof.csv"])
def test_a_members_bad_predictions_are_refused_and_nothing_changes(two_members, what, change, message, name, capsys):
    a, b = two_members
    f = b / name
    _spoil(f, 5, change)
    if what == "not summing to 1":  # p_0 of that row set to 0: unless it was ~0 already, the row no longer sums to 1
        assert abs(pd.read_csv(f).filter(like="p_").iloc[5].sum() - 1) > 1e-3
    before = _tree("runs", "submissions")
    err = cli_error(capsys, "ensemble", "blend.yaml", "name=blend2")
    assert err.startswith(f"error: {f}: line 7 (id '6'): {message}") and "pipeline predict <config of b>" in err
    assert _tree("runs", "submissions") == before and not Path("runs/comp/blend2").exists()
    err = cli_error(capsys, "ensemble", "blend.yaml")  # the same name as the earlier blend: it stays as it was
    assert _tree("runs", "submissions") == before


def test_ensemble_submission_fault_leaves_the_earlier_blend(two_members, monkeypatch, capsys):
    import pipeline.ensemble.blend as ensemble

    before = _tree("runs", "submissions")
    with monkeypatch.context() as m:  # the sidecar JSON of the new submission cannot be written
        m.setattr(os, "replace", _enospc_for(lambda d: d.parent.name == "submissions"))
        err = cli_error(capsys, "ensemble", "blend.yaml")
    assert err.startswith("error: submissions/comp-blend-") and err.endswith(".json: No space left on device (ENOSPC)")
    assert _tree("runs", "submissions") == before
    mean = ensemble.BLENDERS.get("mean")  # the blend's test predictions are invalid (a bug upstream), its OOF fine
    ensemble.BLENDERS.register("mean", lambda oof, test, y, folds, **_: (oof.mean(0), test.mean(0) * 2, None))
    try:
        err = cli_error(capsys, "ensemble", "blend.yaml")
    finally:
        ensemble.BLENDERS.register("mean", mean)
    assert err.startswith(
        "error: refusing to write invalid predictions: runs/comp/blend/test_pred.csv: line 2 (id '1'): p_"
    )
    assert err.endswith("expected a probability in [0, 1]")
    assert _tree("runs", "submissions") == before


def test_ensemble_commit_fault_takes_the_submission_back(two_members, monkeypatch, capsys):
    subs = sorted(Path("submissions").iterdir())
    with monkeypatch.context() as m:
        m.setattr(
            os, "replace", _enospc_for(lambda d: d == Path("runs/comp/blend/ensemble.json"))
        )  # the move, not the staged write
        err = cli_error(capsys, "ensemble", "blend.yaml")
    assert err == "error: runs/comp/blend/ensemble.json: No space left on device (ENOSPC)"
    assert sorted(Path("submissions").iterdir()) == subs  # the new submission (and its JSON) were removed
    assert not Path("runs/comp/blend/ensemble.json").exists()  # not marked done with half-new files
    assert not [p for p in Path("runs/comp/blend").iterdir() if p.name.startswith(".")]  # no staging folder left
    assert run_cli("ensemble", "blend.yaml") == 0 and Path("runs/comp/blend/ensemble.json").is_file()


# ---- predict ---------------------------------------------------------------------------------

RUN = Path("runs/comp/exp")


def test_predict_faults_leave_the_earlier_predictions(digits_config, monkeypatch, capsys):
    import pipeline.predict.submission as submission

    path = digits_config(train={"epochs": 1, "refit": True})
    assert run_cli("fold", path) == 0 and run_cli("train", path) == 0 and run_cli("predict", path) == 0
    before = _tree("runs", "submissions")
    # TTA below: every prediction file would differ from the earlier ones (scored on plain oof.csv:
    # with tta_oof on, predict would first need evaluate's oof_tta.csv, which is not this test's point)
    tta = ["predict.tta=[identity,hflip]", "predict.tta_oof=false"]
    # 1. the first submission's sidecar cannot be written (disk full)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", _enospc_for(lambda d: d.parent.name == "submissions"))
        err = cli_error(capsys, "predict", path, *tta)
    assert err.endswith(".json: No space left on device (ENOSPC)") and "submissions/comp-exp-" in err
    assert _tree("runs", "submissions") == before
    # 2. the second (refit) submission fails: the first one is taken back
    real, calls = submission.write_submission, []

    def second_fails(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "submissions/refit.csv")
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(submission, "write_submission", second_fails)
        err = cli_error(capsys, "predict", path, *tta)
    assert err == "error: submissions/refit.csv: No space left on device (ENOSPC)"
    assert len(calls) == 2 and _tree("runs", "submissions") == before
    # 3. the validator refuses the submission
    with monkeypatch.context() as m:
        m.setattr(
            submission, "validate_submission", lambda cfg, path, **kw: [f"{path}: 1 labels not among the classes"]
        )
        err = cli_error(capsys, "predict", path)
    assert "refusing to write an invalid submission for exp: 1 labels not among the classes" in err
    assert _tree("runs", "submissions") == before
    # 4. the run folder's done marker cannot be moved into place: the new submissions are taken back
    with monkeypatch.context() as m:
        m.setattr(
            os, "replace", _enospc_for(lambda d: d == RUN / "config.predict.hash")
        )  # the move, not the staged write
        err = cli_error(capsys, "predict", path)
    assert err == "error: runs/comp/exp/config.predict.hash: No space left on device (ENOSPC)"
    assert sorted(Path("submissions").iterdir()) == sorted(Path(p) for p in before if p.startswith("submissions"))
    assert not (RUN / "config.predict.hash").exists()  # the stage reads as not done, never as done with mixed files
    from pipeline.config.load import load_config
    from pipeline.stages import stage_states

    assert dict((st.name, state) for st, state in stage_states(load_config(path)))["predict"] == "stale"
    assert not [p for p in RUN.iterdir() if p.name.startswith(".staging")]
    # and a run that works commits everything, the refit file and each fold's file included
    assert run_cli("predict", path, *tta) == 0
    info = json.loads((RUN / "predict.json").read_text())
    assert info["tta"] == ["identity", "hflip"] and (RUN / "config.predict.hash").is_file()
    for name in ("test_pred.csv", "test_pred_refit.csv", "test_pred_fold0.csv", "predict.json"):
        assert (RUN / name).read_bytes() != before[str(RUN / name)][0]
    assert len(list(Path("submissions").glob("comp-exp-*.csv"))) == 4


def test_predict_test_alone_removes_stale_files_only_on_success(digits_config):
    from pipeline.config.load import load_config
    from pipeline.predict.predictor import predict_test

    path = digits_config(train={"epochs": 1})
    assert run_cli("fold", path) == 0 and run_cli("train", path) == 0
    cfg = load_config(path)
    predict_test(cfg)
    stale = RUN / "test_pred_fold7.csv"  # from an earlier folds file with more folds
    stale.write_bytes((RUN / "test_pred_fold0.csv").read_bytes())
    (RUN / "test_pred_refit.csv").write_bytes((RUN / "test_pred.csv").read_bytes())
    df = predict_test(cfg)
    assert not stale.exists() and not (RUN / "test_pred_refit.csv").exists()
    assert list(df.columns) == ["id"] + [f"p_{c}" for c in CLASSES] and np.allclose(df.filter(like="p_").sum(1), 1)


def test_evaluate_writes_its_files_all_or_nothing(digits_config, monkeypatch, capsys):
    """A fault while evaluate writes leaves calibration.json, metrics.json and the done marker as they were."""
    import errno
    import os

    from conftest import cli_error, run_cli

    import pipeline.core.io as pio
    from pipeline.config.load import load_config
    from pipeline.data.folds import run_fold
    from pipeline.train.cv import train_cv

    path = digits_config(train={"epochs": 1})
    cfg = load_config(path)
    run_fold(cfg)
    train_cv(cfg)
    assert run_cli("evaluate", path, "evaluate.gradcam_samples=0") == 0
    run = Path("runs/comp/exp")
    files = ["calibration.json", "metrics.json", "config.evaluate.yaml", "config.evaluate.hash"]
    before = {f: ((run / f).read_bytes(), (run / f).stat().st_mtime_ns) for f in files}
    real = os.replace

    def fail_on_metrics(src, dst, *a, **k):
        if str(dst).endswith("metrics.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(pio.os, "replace", fail_on_metrics)
    err = cli_error(capsys, "evaluate", path, "evaluate.gradcam_samples=0", "evaluate.n_bins=7")
    assert "metrics.json: No space left on device (ENOSPC)" in err
    after = {f: ((run / f).read_bytes(), (run / f).stat().st_mtime_ns) for f in files if (run / f).exists()}
    assert after == before  # the fault hit the staged write: nothing in the run folder moved
    assert not list(run.glob(".staging.*"))
