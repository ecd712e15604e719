from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from pipeline.config.load import load_config
from pipeline.core.errors import PipelineError
from pipeline.data.folds import load_folds, make_folds, run_fold
from pipeline.data.formats import read_table


def test_fold_cli_writes_stratified_deterministic_file(make_config, iceberg_dir, capsys):
    cfg_path = make_config(iceberg_dir, folds={"n_splits": 4, "seed": 3})
    assert run_cli("fold", cfg_path) == 0
    out = capsys.readouterr().out
    assert "wrote folds/comp.csv" in out and "iceberg" in out  # per-fold class balance printed
    first = open("folds/comp.csv", "rb").read()
    df = pd.read_csv("folds/comp.csv", dtype={"id": str})
    assert list(df.columns) == ["id", "fold"] and sorted(df["fold"].unique()) == [0, 1, 2, 3]
    cfg = load_config(cfg_path)
    tr = read_table(cfg, "train")
    assert list(df["id"]) == list(tr.ids)
    # stratified: each fold's iceberg share is within one row of the overall share
    share = tr.labels.mean()
    for k in range(4):
        m = df["fold"].to_numpy() == k
        assert abs(tr.labels[m].sum() - share * m.sum()) <= 1.0
    assert run_cli("fold", cfg_path) == 0
    assert open("folds/comp.csv", "rb").read() == first  # byte for byte
    assert run_cli("fold", cfg_path, "folds.seed=4") == 0
    assert open("folds/comp.csv", "rb").read() != first
    assert open("folds/comp.config.yaml").read().startswith("# resolved from")


def test_group_folds_keep_angles_together(make_config, iceberg_dir):
    cfg = load_config(make_config(iceberg_dir, folds={"n_splits": 3, "group": "inc_angle"}))
    tr = read_table(cfg, "train")
    folds = make_folds(cfg, tr)
    angle = tr.meta["inc_angle"].to_numpy()
    df = pd.DataFrame({"a": angle, "f": folds["fold"]}).dropna()
    assert (df.groupby("a")["f"].nunique() == 1).all()
    assert df["a"].duplicated().any()  # the demo really has repeated angles, so the test means something
    # rows with a missing angle each form their own group: they spread over folds
    na = np.isnan(angle)
    assert folds["fold"][na].nunique() > 1


def test_repeats_add_columns(make_config, iceberg_dir):
    cfg = load_config(make_config(iceberg_dir, folds={"n_splits": 3, "repeats": 2}))
    folds = make_folds(cfg, read_table(cfg, "train"))
    assert list(folds.columns) == ["id", "fold", "fold_1"]
    assert (folds["fold"] != folds["fold_1"]).any()


def test_bad_fold_inputs(make_config, iceberg_dir, digits_dir):
    cfg = load_config(make_config(iceberg_dir, folds={"group": "angle"}))
    with pytest.raises(
        PipelineError, match=r"folds.group: column 'angle' is not in the statoil_json data; available: inc_angle"
    ):
        make_folds(cfg, read_table(cfg, "train"))
    cfg = load_config(make_config(iceberg_dir, folds={"n_splits": 200}))
    with pytest.raises(PipelineError, match=r"folds.n_splits is 200 but class '\w+' has only \d+ rows"):
        make_folds(cfg, read_table(cfg, "train"))


def test_load_folds_refuses_other_data(make_config, iceberg_dir, digits_dir):
    cfg = load_config(make_config(iceberg_dir))
    tr = read_table(cfg, "train")
    with pytest.raises(PipelineError, match=r"folds/comp.csv: folds file not found; run `pipeline fold"):
        load_folds(cfg, tr)
    run_fold(cfg, tr)
    written = pd.read_csv("folds/comp.csv", dtype={"id": str}).set_index("id")["fold"]
    np.testing.assert_array_equal(
        load_folds(cfg, tr), written.loc[tr.ids.astype(str)].to_numpy()
    )  # aligned to the table's rows
    other = load_config(make_config(digits_dir, "pixel_csv", name="other"))
    with pytest.raises(PipelineError, match=r"folds/comp.csv: folds file does not match the training data"):
        load_folds(other, read_table(other, "train"))
    df = pd.read_csv("folds/comp.csv", dtype={"id": str})
    df.loc[df["fold"] == 2, "fold"] = 1
    df.to_csv("folds/comp.csv", index=False)
    with pytest.raises(PipelineError, match=r"fold 2 is empty"):
        load_folds(cfg, tr)


def test_too_few_groups_is_one_line_error(tmp_path, make_config, iceberg_dir, capsys):
    from conftest import copy_json, run_cli

    d = tmp_path / "angles"
    copy_json(
        iceberg_dir / "train.json",
        d / "train.json",
        lambda recs: [r.update(inc_angle=30.0 + i % 3) for i, r in enumerate(recs)],
    )
    (d / "test.json").write_text((iceberg_dir / "test.json").read_text())
    path = make_config(d, folds={"group": "inc_angle", "n_splits": 5})
    assert run_cli("fold", path) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "folds.group 'inc_angle'" in err and "expected more groups than folds.n_splits" in err


def _one_class_copy(fmt, src, dst):
    """A copy of a demo competition whose training rows all carry one label."""
    import json
    import shutil

    shutil.copytree(src, dst)
    if fmt == "statoil_json":
        recs = json.loads((dst / "train.json").read_text())
        for r in recs:
            r["is_iceberg"] = 0
        (dst / "train.json").write_text(json.dumps(recs))
    else:
        df = pd.read_csv(dst / "train.csv")
        df["label"] = df["label"].iloc[0]
        df.to_csv(dst / "train.csv", index=False)


@pytest.mark.parametrize(
    "fmt, fixture", [("statoil_json", "iceberg_dir"), ("pixel_csv", "digits_dir"), ("image_folder", "folder_dir")]
)
def test_one_class_is_refused_at_fold_before_anything_is_written(fmt, fixture, request, make_config, tmp_path, capsys):
    from conftest import cli_error

    data = tmp_path / "one-class"
    _one_class_copy(fmt, request.getfixturevalue(fixture), data)
    extra = {"data": {"image_size": 16}} if fmt == "image_folder" else {}
    cfg = make_config(data, fmt, **extra)
    before = sorted(p for p in tmp_path.rglob("*") if ".cache" not in p.parts)
    err = cli_error(capsys, "fold", cfg)
    assert (
        err.startswith(f"error: {data}: the training data has only class ") and "expected at least two classes" in err
    )
    assert not Path("folds").exists() or not any(Path("folds").iterdir())
    assert sorted(p for p in tmp_path.rglob("*") if ".cache" not in p.parts) == before


@pytest.mark.parametrize(
    "content", [b"", b"\x00\xff\xfe garbage\n\x81", b"id,fold\n", b"id,fold\n1,0\n2", b"id\tfold\nx\t0\n"]
)
def test_corrupt_folds_file_is_one_line(make_config, iceberg_dir, capsys, content):
    from conftest import cli_error

    cfg = make_config(iceberg_dir)
    Path("folds").mkdir()
    Path("folds/comp.csv").write_bytes(content)
    err = cli_error(capsys, "train", cfg)
    assert err.startswith("error: folds/comp.csv: ") and f"pipeline fold {cfg}" in err
    assert Path("folds/comp.csv").read_bytes() == content and not Path("runs").exists()


def test_one_class_after_folding_is_refused_by_train_before_anything_is_deleted(digits_config, capsys):
    """Labels changed to one class after a run finished: train refuses before touching the run."""
    from conftest import cli_error, run_cli

    path = digits_config(train={"epochs": 1})
    assert run_cli("fold", path) == 0 and run_cli("train", path) == 0
    run = Path("runs/comp/exp")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    data = Path(load_config(path).data.dir)
    saved = (data / "train.csv").read_bytes()
    try:
        df = pd.read_csv(data / "train.csv")
        df["label"] = 3
        df.to_csv(data / "train.csv", index=False)
        err = cli_error(capsys, "train", path, "train.lr=0.002")
        assert "the training data has only class '3'" in err
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    finally:
        (data / "train.csv").write_bytes(saved)  # the data folder is shared by the session's tests
