"""Operating-system faults and bugs through ``main(argv)``: one line, a documented exit code, nothing
half-written. This machine runs as root, so permission bits cannot make a write fail: faults are injected."""

import errno
import os
from pathlib import Path

import pytest
from conftest import cli_error, run_cli


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _fail_with(code: int):
    def fail(*args, **kwargs):
        path = args[0] if args else "?"
        raise OSError(code, os.strerror(code), str(path))

    return fail


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
@pytest.mark.parametrize("where", ["create", "write", "rename"])
def test_fold_write_fault_is_one_line_and_leaves_nothing(
    make_config, iceberg_dir, tmp_path, monkeypatch, capsys, code, where
):
    import pandas as pd

    import pipeline.core.io as pio

    cfg = make_config(iceberg_dir)
    before = _tree(tmp_path)
    target = {"create": (pio.tempfile, "mkstemp"), "write": (pd.DataFrame, "to_csv"), "rename": (pio.os, "replace")}[
        where
    ]
    monkeypatch.setattr(*target, _fail_with(code))
    err = cli_error(capsys, "fold", cfg)
    assert (
        err == f"error: folds/comp.csv: {os.strerror(code)} ({errno.errorcode[code]})"
    )  # the artifact, not a temp name
    monkeypatch.undo()
    after = _tree(tmp_path)
    assert not [p for p in after if p not in before], "a failed write left files behind"
    assert not Path("folds/comp.csv").exists()


def test_fault_keeps_an_earlier_artifact(make_config, iceberg_dir, monkeypatch, capsys):
    import pipeline.core.io as pio

    cfg = make_config(iceberg_dir)
    assert run_cli("fold", cfg) == 0
    folds = Path("folds/comp.csv")
    text, mtime = folds.read_text(), folds.stat().st_mtime_ns
    monkeypatch.setattr(pio.os, "replace", _fail_with(errno.ENOSPC))
    err = cli_error(capsys, "fold", cfg, "folds.seed=7")
    assert "No space left on device (ENOSPC)" in err
    assert folds.read_text() == text and folds.stat().st_mtime_ns == mtime


def test_unexpected_error_is_exit_1_with_a_saved_traceback(make_config, iceberg_dir, monkeypatch, capsys, tmp_path):
    import pipeline.data.folds as fold

    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))

    def bug(*a, **k):
        return 1 / 0

    monkeypatch.setattr(fold, "run_fold", bug)
    capsys.readouterr()
    assert run_cli("fold", make_config(iceberg_dir)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("internal error: ZeroDivisionError: division by zero (traceback saved to ")
    saved = Path(err.split("traceback saved to ")[1].rstrip(")\n"))
    assert saved.is_file() and saved.parent == tmp_path / "cache" / "logs"
    assert "Traceback (most recent call last)" in saved.read_text() and "1 / 0" in saved.read_text()


@pytest.mark.parametrize(
    "argv, says",
    [
        (["lb", "sub.csv", "nan"], "'nan': expected a finite number"),
        (["lb", "sub.csv", "inf"], "'inf': expected a finite number"),
        (["tune", "cfg.yaml", "--timeout", "1e999"], "expected a finite number"),
        (["augment", "cfg.yaml", "--n", "0"], "expected a positive whole number"),
        (["demo-data", "iceberg", "--out", "x", "--n-train", "-3"], "expected a positive whole number"),
        (["fold"], "the following arguments are required: config"),
        (["no-such-stage"], "invalid choice"),
        (["fold", "cfg.yaml", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_command_line_errors_are_one_line(capsys, argv, says, tmp_path):
    capsys.readouterr()
    assert run_cli(*argv) == 2  # main(argv) returns the code; it does not exit
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: pipeline") and says in err, err
    assert not list(tmp_path.iterdir()) or not Path("x").exists()


def test_a_message_with_a_newline_stays_one_line(monkeypatch, capsys, make_config, iceberg_dir):
    import pipeline.data.folds as fold
    from pipeline.core.errors import PipelineError

    def bad(*a, **k):
        raise PipelineError("data/evil\nname.csv: broken")

    monkeypatch.setattr(fold, "run_fold", bad)
    err = cli_error(capsys, "fold", make_config(iceberg_dir))
    assert err == "error: data/evil\\nname.csv: broken"


@pytest.mark.parametrize("stage", ["train", "evaluate", "predict"])
@pytest.mark.parametrize("code, where", [(errno.ENOSPC, "rename"), (errno.EROFS, "create"), (errno.EACCES, "rename")])
def test_every_stage_turns_a_write_fault_into_one_line(digits_config, monkeypatch, capsys, stage, code, where):
    """The fault hits the stage's first write of an artifact; the line names it and its cause."""
    import pipeline.core.io as pio

    path = digits_config(train={"epochs": 1}, evaluate={"gradcam_samples": 0})
    assert run_cli("fold", path) == 0
    if stage != "train":
        assert run_cli("train", path) == 0
    if stage == "predict":
        assert run_cli("evaluate", path) == 0
    real = {"rename": pio.os.replace, "create": pio.tempfile.mkstemp}[where]

    def fail(*a, **k):
        target = str(a[1] if where == "rename" else k.get("dir", ""))
        if "runs" in target or "submissions" in target:
            raise OSError(code, os.strerror(code), target)
        return real(*a, **k)

    monkeypatch.setattr(*((pio.os, "replace") if where == "rename" else (pio.tempfile, "mkstemp")), fail)
    err = cli_error(capsys, stage, path)
    assert err.startswith("error: ") and f"{os.strerror(code)} ({errno.errorcode[code]})" in err
    assert "runs/comp/exp" in err or "submissions" in err
    assert ".tmp" not in err  # the artifact, never its temporary name
