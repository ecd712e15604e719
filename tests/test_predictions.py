"""Prediction files: one reader and one writer (pipeline/runs/predictions.py), checked at the boundary;
a property test corrupts valid files at random."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.core.errors import PipelineError
from pipeline.runs.predictions import (
    SUM_TOL,
    average_predictions,
    check_predictions,
    pred_frame,
    probs_of,
    read_classes,
    read_predictions,
    write_predictions,
)
from pipeline.tasks.calibration import apply_temperature

NAMES = ["ship", "iceberg", "other"]


def frame(kind="oof", n=6, k=3, seed=0, ids=None):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(k), n)
    ids = ids if ids is not None else [f"r{i}" for i in range(n)]
    extra = {"fold": np.arange(n) % 2, "target": np.arange(n) % k} if kind == "oof" else {}
    return pred_frame(ids, p, NAMES[:k], **extra)


def test_round_trip_canonical_columns_and_types():
    df = frame()
    written = write_predictions("run/oof.csv", df, "oof")
    back = read_predictions("run/oof.csv", "oof", class_names=NAMES)
    assert list(back.columns) == ["id", "fold", "target", "p_ship", "p_iceberg", "p_other"]
    assert (
        back["fold"].dtype == np.int64 and back["target"].dtype == np.int64 and back["id"].tolist() == df["id"].tolist()
    )
    np.testing.assert_allclose(probs_of(back, NAMES), probs_of(df, NAMES), rtol=1e-7)
    pd.testing.assert_frame_equal(
        written.drop(columns=["p_ship", "p_iceberg", "p_other"]), back.drop(columns=["p_ship", "p_iceberg", "p_other"])
    )
    assert Path("run/oof.csv").read_text().splitlines()[0] == "id,fold,target,p_ship,p_iceberg,p_other"
    assert read_classes("run/oof.csv", "oof") == NAMES
    # test files: id and probabilities only; columns in any order come back in the canonical one
    t = frame("test")
    t[["p_other", "id", "p_ship", "p_iceberg"]].to_csv("test_pred.csv", index=False)
    back = read_predictions("test_pred.csv", "test", class_names=NAMES)
    assert list(back.columns) == ["id", "p_ship", "p_iceberg", "p_other"]
    np.testing.assert_allclose(probs_of(back, NAMES), probs_of(t, NAMES))


def test_ids_are_text_as_written():
    df = frame("test", n=4, ids=["007", "NA", "nan ", "1e3"])
    write_predictions("t.csv", df, "test")
    assert read_predictions("t.csv", "test")["id"].tolist() == ["007", "NA", "nan ", "1e3"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda d: d.assign(p_ship=np.nan),
            r"t.csv: line 2 \(id 'r0'\): p_ship is NaN or empty; expected a probability in \[0, 1\]",
        ),
        (
            lambda d: d.assign(p_ship=d["p_ship"] + 0.01),
            r"t.csv: line 2 \(id 'r0'\): probabilities sum to 1.01; expected 1 \(within 0.001\)",
        ),
        (lambda d: pd.concat([d, d.iloc[[2]]]), r"t.csv: line 8: id 'r2' appears 2 times; expected each test id once"),
        (lambda d: d.assign(id=[""] + list(d["id"][1:])), r"t.csv: line 2: id is empty; expected the test image's id"),
        (lambda d: d.drop(columns="p_other"), r"t.csv: missing column 'p_other' \(class 'other'\)"),
        (lambda d: d.iloc[:0], r"t.csv: no rows; expected one row per test image"),
    ],
)
def test_writer_refuses_invalid_frames_and_writes_nothing(mutate, message):
    with pytest.raises(PipelineError, match="refusing to write invalid predictions: " + message) as e:
        write_predictions("t.csv", mutate(frame("test")), "test", class_names=NAMES)
    assert "\n" not in str(e.value)
    assert not Path("t.csv").exists() and not list(Path(".").glob(".t.csv.*"))


def test_reader_messages_name_file_line_and_rerun():
    df = frame()
    df["fold"] = df["fold"].astype(object)
    df.loc[3, "fold"] = "x"
    df.to_csv("oof.csv", index=False)
    with pytest.raises(PipelineError) as e:
        read_predictions("oof.csv", "oof", hint="pipeline train exp.yaml")
    assert str(e.value) == (
        "oof.csv: line 5 (id 'r3'): fold 'x' is not valid; expected a fold number 0, 1, ...; "
        "rerun `pipeline train exp.yaml`"
    )
    with pytest.raises(
        PipelineError, match=r"^nope.csv: file not found; expected test predictions from `pipeline predict CONFIG`$"
    ):
        read_predictions("nope.csv", "test")
    Path("bin.csv").write_bytes(b"id,p_a,p_b\n\xff\xfe,0.5,0.5\n")
    with pytest.raises(
        PipelineError,
        match=r"^bin.csv: not a readable CSV .*; expected id,p_<class>...; rerun `pipeline predict CONFIG`$",
    ):
        read_predictions("bin.csv", "test")
    pd.DataFrame({"id": ["a"], "p_a": [1.0]}).to_csv("one.csv", index=False)
    with pytest.raises(PipelineError, match=r"one.csv: 1 p_<class> column\(s\); expected one per class, at least 2"):
        read_predictions("one.csv", "test")


def test_scaled_reads_the_runs_calibration():
    run = Path("runs/c/e")
    write_predictions(run / "test_pred.csv", frame("test"), "test")
    raw = probs_of(read_predictions(run / "test_pred.csv", "test"))
    np.testing.assert_allclose(
        probs_of(read_predictions(run / "test_pred.csv", "test", scaled=True)), raw
    )  # no calibration.json
    (run / "calibration.json").write_text(json.dumps({"temperature": 2.0, "kept": False}))
    np.testing.assert_allclose(probs_of(read_predictions(run / "test_pred.csv", "test", scaled=True)), raw)
    (run / "calibration.json").write_text(json.dumps({"temperature": 2.0, "kept": True}))
    scaled = probs_of(read_predictions(run / "test_pred.csv", "test", scaled=True))
    np.testing.assert_allclose(scaled, apply_temperature(raw, 2.0))
    assert not np.allclose(scaled, raw, atol=1e-3)
    np.testing.assert_allclose(probs_of(read_predictions(run / "test_pred.csv", "test")), raw)  # the file stays raw


def test_average_aligns_by_id_and_checks_folds():
    a, b = frame(seed=1), frame(seed=2)
    write_predictions("a.csv", a, "oof")
    write_predictions("b.csv", b.iloc[::-1], "oof")  # other row order, same rows
    mean = average_predictions([Path("a.csv"), Path("b.csv")], "oof", class_names=NAMES)
    assert mean["id"].tolist() == a["id"].tolist()
    np.testing.assert_allclose(probs_of(mean, NAMES), (probs_of(a, NAMES) + probs_of(b, NAMES)) / 2, rtol=1e-6)
    write_predictions("c.csv", b.assign(fold=1 - b["fold"]), "oof")
    with pytest.raises(PipelineError, match=r"c.csv: fold differs from a.csv for the same ids"):
        average_predictions([Path("a.csv"), Path("c.csv")], "oof")
    write_predictions("d.csv", b.iloc[1:], "oof")
    with pytest.raises(PipelineError, match=r"d.csv: other ids or classes than a.csv"):
        average_predictions([Path("a.csv"), Path("d.csv")], "oof")


# ---- property: random corruptions of a valid file -------------------------------------------

NONFINITE = ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", ""]


def _invariants(df, kind, k):
    keys = ["id", "fold", "target"] if kind == "oof" else ["id"]
    assert list(df.columns) == keys + [f"p_{c}" for c in NAMES[:k]]
    ids = df["id"]
    assert ids.map(lambda v: isinstance(v, str) and v.strip() != "").all() and not ids.duplicated().any()
    p = probs_of(df)
    assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all() and (np.abs(p.sum(1) - 1) <= SUM_TOL).all()
    if kind == "oof":
        assert df["fold"].dtype == np.int64 and (df["fold"] >= 0).all()
        assert df["target"].dtype == np.int64 and df["target"].between(0, k - 1).all()


@st.composite
def corruption(draw):
    kind = draw(st.sampled_from(["oof", "test"]))
    n, k = draw(st.integers(2, 6)), draw(st.integers(2, 3))
    ids = draw(
        st.lists(
            st.text("ab1 ._-", min_size=1, max_size=3).filter(lambda s: s.strip()), min_size=n, max_size=n, unique=True
        )
    )
    ops = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["delete", "duplicate", "swap", "nonfinite"]),
                st.integers(0, 99),
                st.integers(0, 99),
                st.sampled_from(NONFINITE),
            ),
            max_size=2,
        )
    )
    byte_op = draw(
        st.one_of(st.none(), st.tuples(st.sampled_from(["truncate", "flip"]), st.floats(0, 1), st.integers(1, 255)))
    )
    return kind, n, k, ids, draw(st.integers(0, 2**16)), ops, byte_op


def _apply(df, ops):
    """Frame-level corruptions; returns (text frame, whether the reader must refuse it)."""
    df = df.astype(str)
    for op, i, j, token in ops:
        if op == "delete" and len(df) > 1:
            df = df.drop(index=df.index[i % len(df)])
        elif op == "duplicate":
            df = pd.concat([df, df.iloc[[i % len(df)]]])
        elif op == "swap":  # whole columns, header and cells: the same content
            cols = list(df.columns)
            a, b = i % len(cols), j % len(cols)
            cols[a], cols[b] = cols[b], cols[a]
            df = df[cols]
        elif op == "nonfinite":
            numeric = [c for c in df.columns if c != "id"]
            df = df.copy()
            df.iloc[i % len(df), df.columns.get_loc(numeric[j % len(numeric)])] = token
        df = df.reset_index(drop=True)
    numeric = [c for c in df.columns if c != "id"]
    return df, bool(df["id"].duplicated().any() or df[numeric].isin(NONFINITE).any().any())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(corruption())
def test_corrupted_files_are_refused_or_read_right(tmp_path, case):
    kind, n, k, ids, seed, ops, byte_op = case
    rng = np.random.default_rng(seed)
    extra = {"fold": rng.integers(0, 3, n), "target": rng.integers(0, k, n)} if kind == "oof" else {}
    good = tmp_path / f"good_{kind}.csv"
    write_predictions(good, pred_frame(ids, rng.dirichlet(np.ones(k), n), NAMES[:k], **extra), kind)
    ref = read_predictions(good, kind, class_names=NAMES[:k]).set_index("id")
    text_df, must_fail = _apply(pd.read_csv(good, dtype=str, keep_default_na=False), ops)
    data = text_df.to_csv(index=False).encode()
    if byte_op is not None:
        what, where, x = byte_op
        pos = min(int(where * len(data)), len(data) - 1)
        data = data[:pos] if what == "truncate" else data[:pos] + bytes([data[pos] ^ x]) + data[pos + 1 :]
    bad = tmp_path / "bad.csv"
    bad.write_bytes(data)
    try:
        got = read_predictions(bad, kind, class_names=NAMES[:k])
    except PipelineError as e:
        assert "\n" not in str(e) and str(e).startswith(str(bad))
        assert byte_op is not None or must_fail, f"a valid file was refused: {e}"
        return
    assert not must_fail or byte_op is not None, "an invalid file was accepted"
    _invariants(got, kind, k)
    if byte_op is None:  # frame-level corruptions only: exactly the rows left, with their values
        want = ref.loc[text_df["id"]].reset_index()
        pd.testing.assert_frame_equal(got, want[got.columns.tolist()], check_exact=True)
        return
    intact = set(data.replace(b"\r", b"\n").split(b"\n"))
    lines = dict(zip(text_df["id"], text_df.to_csv(index=False, header=False).encode().splitlines()))
    header_intact = text_df.to_csv(index=False).encode().splitlines()[0] in intact
    for _, row in got.iterrows():  # a row whose line survived intact reads as it was written
        if header_intact and row["id"] in lines and lines[row["id"]] in intact:
            np.testing.assert_array_equal(
                row.drop("id").to_numpy(float), ref.loc[row["id"]][got.columns[1:]].to_numpy(float)
            )


def test_check_predictions_accepts_in_memory_frames():
    df = frame()
    out = check_predictions(df, "oof", class_names=NAMES)
    assert out["fold"].dtype == np.int64 and list(out.columns[:3]) == ["id", "fold", "target"]
