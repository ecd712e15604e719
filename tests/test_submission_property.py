"""Property tests of the submission-side readers: the submission validator, the ``--solution``
reader, ``pipeline lb`` (sidecar JSON and sha256), leaderboard.csv and metrics.json. Random
corruptions of a valid file (``helpers.corrupt``) never end in a traceback, and never
in an accepted file with wrong content. ``HYPOTHESIS_PROFILE=slow`` runs more examples."""

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import CORRUPTIONS, corrupt
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config.load import load_config
from pipeline.core.errors import PipelineError

_CACHE: dict = {}

# Besides the generic ones: one cell (of any column) replaced by a value a byte flip rarely makes.
CELLS = st.tuples(
    st.just("cell"),
    st.tuples(
        st.floats(0, 1),
        st.integers(0, 5),
        st.sampled_from(
            [
                "1.5",
                "-0.1",
                "12",
                "10",
                "2",
                "-1",
                "1.0001",
                "x",
                "1e999",
                "-inf",
                " 3 ",
                "0x1",
                "1,2",
                '"',
                "nan",
                "",
                "1e-3",
                "zero",
                "img0",
                "1",
            ]
        ),
    ),
)
SUB_CORRUPTIONS = st.one_of(CORRUPTIONS, CELLS)


def corrupt_any(data: bytes, how) -> bytes:
    """``corrupt``, or (``cell``) one cell of a data line replaced by a token."""
    if how[0] != "cell":
        return corrupt(data, how)
    where, col, token = how[1]
    lines = data.split(b"\n")
    i = 1 + min(int(where * (len(lines) - 2)), len(lines) - 3)  # a data line (the last line is empty)
    cells = lines[i].split(b",")
    cells[min(col, len(cells) - 1)] = token.encode()
    lines[i] = b",".join(cells)
    return b"\n".join(lines)


def _one_line(e: PipelineError) -> None:
    assert str(e) and "\n" not in str(e)


@pytest.fixture
def kinds(make_config, sk_digits_dir, iceberg_dir):
    """(config, test ids, class names, a valid submission's bytes) of a label and a probability competition."""
    if "kinds" not in _CACHE:
        from pipeline.data.formats import build_reader, read_table

        out = {}
        for kind, (d, fmt) in {
            "label": (sk_digits_dir, "pixel_csv"),
            "probability": (iceberg_dir, "statoil_json"),
        }.items():
            cfg = load_config(make_config(d, fmt, name=kind))
            test = read_table(cfg, "test")
            probs = np.random.default_rng(0).dirichlet(np.ones(test.num_classes), len(test))
            frame = build_reader(cfg).submission_frame(np.asarray(test.ids), probs, list(test.class_names))
            out[kind] = (
                cfg,
                list(map(str, test.ids)),
                list(test.class_names),
                frame.to_csv(index=False, float_format="%.8g").encode(),
            )
        _CACHE["kinds"] = out
    else:  # the configs name files of this test's folder only by absolute data paths: still valid here
        out = _CACHE["kinds"]
    return out


def _valid_submission(data: bytes, cfg, test_ids, class_names) -> None:
    """An independent look at an accepted file: exactly the competition's columns, every test id
    once, and a valid value in every row."""
    from pipeline.data.formats import build_reader

    reader = build_reader(cfg)
    id_col, val_col = reader.submission_columns
    df = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    assert list(df.columns) == [id_col, val_col]
    ids, vals = df[id_col].str.strip(), df[val_col].str.strip()
    assert len(df) == len(test_ids) and not ids.duplicated().any() and set(ids) == set(test_ids)
    if reader.submission_kind == "probability":
        v = vals.astype(float).to_numpy()
        assert np.isfinite(v).all() and ((v >= 0) & (v <= 1)).all()
    else:
        allowed = [str(i) for i in range(len(class_names))] if reader.submission_kind == "index" else class_names
        assert vals.isin(allowed).all()


def _validate_corrupted(kinds, how, kind):
    from pipeline.predict.submission import validate_submission

    cfg, test_ids, class_names, good = kinds[kind]
    data = corrupt_any(good, how)
    path = Path("sub.csv")
    path.write_bytes(data)
    problems = validate_submission(cfg, path, test_ids=test_ids, class_names=class_names)
    assert all(isinstance(p, str) and p.startswith(f"{path}: ") and "\n" not in p for p in problems)
    if not problems:
        _valid_submission(data, cfg, test_ids, class_names)


@given(how=CORRUPTIONS, kind=st.sampled_from(["label", "probability"]))
def test_submission_validator_corruptions(kinds, how, kind):
    _validate_corrupted(kinds, how, kind)


@given(how=CELLS, kind=st.sampled_from(["label", "probability"]))
def test_submission_validator_bad_cells(kinds, how, kind):
    _validate_corrupted(kinds, how, kind)


@given(how=SUB_CORRUPTIONS, kind=st.sampled_from(["label", "probability"]))
def test_solution_reader_corruptions(kinds, how, kind):
    from pipeline.data.formats import build_reader
    from pipeline.predict.submission import read_solution

    cfg, test_ids, class_names, _ = kinds[kind]
    id_col, val_col = build_reader(cfg).submission_columns
    answers = [str(i % 2) if kind == "probability" else class_names[i % len(class_names)] for i in range(len(test_ids))]
    good = pd.DataFrame({id_col: test_ids, val_col: answers}).to_csv(index=False).encode()
    path = Path("solution.csv")
    path.write_bytes(corrupt_any(good, how))
    try:
        truth = read_solution(cfg, path, class_names)
    except PipelineError as e:
        _one_line(e)
        return
    allowed = ["0", "1"] if kind == "probability" else class_names
    assert truth.index.is_unique and all(i.strip() == i and i for i in truth.index)
    assert truth.isin(allowed).all().all() and len(truth) > 0


@pytest.fixture
def own_submission(kinds):
    """A submission the pipeline wrote (CSV and sidecar), as bytes: copied afresh for every example."""
    if "own" not in _CACHE:
        from pipeline.predict.submission import write_submission

        cfg, test_ids, class_names, _ = kinds["label"]
        probs = np.random.default_rng(1).dirichlet(np.ones(len(class_names)), len(test_ids))
        p = write_submission(
            cfg, test_ids, probs, class_names, "alpha", {"metric": "accuracy", "oof_score": 0.9}, test_ids=test_ids
        )
        _CACHE["own"] = (p.name, p.read_bytes(), p.with_suffix(".json").read_bytes())
    return _CACHE["own"]


def _fresh(name: str) -> Path:
    d = Path(name)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    return d


@given(how=CORRUPTIONS, which=st.sampled_from(["csv", "json"]))
def test_lb_corruptions(own_submission, how, which):
    from pipeline.evaluate.experiments import record_lb

    name, csv, side = own_submission
    d = _fresh("lbcase")
    sub = d / name
    sub.write_bytes(corrupt(csv, how) if which == "csv" else csv)
    sub.with_suffix(".json").write_bytes(corrupt(side, how) if which == "json" else side)
    try:
        record_lb(sub, 0.5)
    except PipelineError as e:
        _one_line(e)
        assert not (d / "leaderboard.csv").exists()
        return
    assert sub.read_bytes() == csv  # a changed CSV is never recorded
    row = pd.read_csv(d / "leaderboard.csv").iloc[-1]
    assert row["file"] == name and row["lb_score"] == 0.5
    assert json.loads(sub.with_suffix(".json").read_text())["lb_score"] == 0.5


@given(how=SUB_CORRUPTIONS)
def test_leaderboard_corruptions(own_submission, how):
    from pipeline.evaluate.experiments import LEADERBOARD_COLUMNS, read_leaderboard, record_lb

    if "board" not in _CACHE:
        name, csv, side = own_submission
        d = _fresh("boardsrc")
        (d / name).write_bytes(csv)
        (d / name).with_suffix(".json").write_bytes(side)
        for score in (0.5, 0.75, 1.0):
            record_lb(d / name, score)
        _CACHE["board"] = (d / "leaderboard.csv").read_bytes()
    path = _fresh("boardcase") / "leaderboard.csv"
    path.write_bytes(corrupt_any(_CACHE["board"], how))
    try:
        df = read_leaderboard(path)
    except PipelineError as e:
        _one_line(e)
        return
    assert list(df.columns) == LEADERBOARD_COLUMNS
    assert all(math.isfinite(v) for v in df["lb_score"]) and all(f.strip() for f in df["file"])
    assert df["cv"].dtype == float


@given(how=CORRUPTIONS)
def test_metrics_json_corruptions(how):
    from pipeline.evaluate.experiments import cv_score

    good = json.dumps(
        {
            "metric": "accuracy",
            "headline": 0.8,
            "cv_mean": {"accuracy": 0.8, "logloss": 0.4},
            "cv_std": {"accuracy": 0.05, "logloss": None},
        },
        indent=2,
    ).encode()
    run = _fresh("runs_metrics")
    (run / "metrics.json").write_bytes(corrupt(good, how))
    try:
        mean, std, src = cv_score(run, "accuracy")
    except PipelineError as e:
        _one_line(e)
        assert "metrics.json" in str(e) and "pipeline evaluate" in str(e)
        return
    # accepted: the numbers the file holds, or (no score for this metric left) nothing at all
    assert (src == "metrics.json" and math.isfinite(mean) and math.isfinite(std)) or (src == "" and math.isnan(mean))
