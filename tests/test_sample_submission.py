"""Submissions that follow the competition's ``sample_submission.csv``: its header decides the columns (a
label column, one probability column per class, or P(class 1)), its rows the ids and their order; without
``test.csv`` its ids name the test files; a sample that fits no target is refused before anything is written."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.config.load import load_config
from pipeline.core.errors import PipelineError
from pipeline.data.formats import build_reader, read_table
from pipeline.data.sample import read_sample
from pipeline.predict.submission import score_submission, validate_submission, write_submission

CLASSES = ["cat", "dog", "fox"]


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)


@pytest.fixture
def comp(tmp_path) -> Path:
    """train/<class>/ (3 classes x 4 images), test/ flat (5 images, no test.csv)."""
    d = tmp_path / "comp"
    for c, cls in enumerate(CLASSES):
        for k in range(4):
            _png(d / "train" / cls / f"{cls}{k}.png", 40 * c + k)
    for k in range(5):
        _png(d / "test" / f"t{k}.png", 200 + k)
    return d


def _cfg(make_config, d, **data):
    return make_config(d, "image_folder", data={"image_size": 8, "channels": 1, **data}, folds={"n_splits": 2})


def _sample(d: Path, header: list[str], ids: list[str], value="0.5") -> Path:
    rows = [[i] + [value] * (len(header) - 1) for i in ids]
    p = d / "sample_submission.csv"
    pd.DataFrame(rows, columns=header).to_csv(p, index=False)
    return p


def _files(root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if ".cache" not in p.parts}


def test_per_class_sample_gives_columns_ids_order_and_rows_summing_to_1(make_config, comp, tmp_path):
    ids = ["t3", "t0.png", "t4", "t1", "t2"]  # with and without the extension, in the sample's order
    _sample(comp, ["image_id", "fox", "cat", "dog"], ids)
    cfg = load_config(_cfg(make_config, comp))
    test = read_table(cfg, "test")
    assert list(test.ids) == ids  # the sample's ids name the test files
    assert int(np.asarray(test.images)[0].max()) == 203 and int(np.asarray(test.images)[1].max()) == 200
    spec = build_reader(cfg).submission_spec(test.class_names)
    assert (spec.encoding, spec.header) == ("per_class", ["image_id", "fox", "cat", "dog"])
    probs = np.random.default_rng(0).dirichlet(np.ones(3), 5)
    shuffled = np.array(ids)[[4, 2, 0, 1, 3]]
    path = write_submission(cfg, shuffled, probs, test.class_names, "e", {}, test_ids=test.ids)
    sub = pd.read_csv(path, dtype={"image_id": str})
    assert list(sub.columns) == ["image_id", "fox", "cat", "dog"] and sub["image_id"].tolist() == ids
    np.testing.assert_allclose(sub[["fox", "cat", "dog"]].sum(1), 1, atol=1e-6)
    row = {i: k for k, i in enumerate(shuffled)}["t0.png"]  # the sample's second id
    np.testing.assert_allclose(sub.loc[1, ["cat", "dog", "fox"]].to_numpy(float), probs[row], rtol=1e-6)
    assert validate_submission(cfg, path, test_ids=test.ids, class_names=test.class_names) == []
    # scored as log-loss against one-hot answers in the same columns
    truth = pd.DataFrame({"image_id": ids, "fox": 0, "cat": 1, "dog": 0})
    truth.to_csv(tmp_path / "solution.csv", index=False)
    name, value = score_submission(cfg, path, tmp_path / "solution.csv", class_names=test.class_names)
    expected = -np.mean(np.log(sub["cat"] / sub[["fox", "cat", "dog"]].sum(1)))
    assert name == "logloss" and value == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda s: s.assign(dog=(s["dog"].astype(float) + 0.3).astype(str)), "do not sum to 1"),
        (lambda s: s.assign(cat="x"), "non-numeric values in cat"),
        (lambda s: s[["image_id", "cat", "fox", "dog"]], "expected exactly image_id,fox,cat,dog"),
        (lambda s: s.iloc[1:], "test ids missing"),
    ],
)
def test_validator_checks_against_the_sample(make_config, comp, edit, needle):
    ids = [f"t{k}" for k in range(5)]
    _sample(comp, ["image_id", "fox", "cat", "dog"], ids)
    cfg = load_config(_cfg(make_config, comp))
    test = read_table(cfg, "test")
    probs = np.full((5, 3), 1 / 3)
    good = write_submission(cfg, test.ids, probs, test.class_names, "e", {}, test_ids=test.ids)
    bad = good.with_name("bad.csv")
    edit(pd.read_csv(good, dtype=str)).to_csv(bad, index=False)
    problems = validate_submission(cfg, bad, test_ids=test.ids, class_names=test.class_names)
    assert any(needle in p for p in problems), problems


def test_label_column_sample_keeps_the_label_and_the_sample_order(make_config, comp):
    ids = ["t4", "t3", "t2", "t1", "t0"]
    _sample(comp, ["id", "label"], ids, value="cat")
    cfg = load_config(_cfg(make_config, comp))
    test = read_table(cfg, "test")
    spec = build_reader(cfg).submission_spec(test.class_names)
    assert (spec.encoding, spec.header) == ("name", ["id", "label"])
    frame = build_reader(cfg).submission_frame(test.ids, np.eye(3)[[0, 1, 2, 0, 1]], test.class_names)
    assert frame["id"].tolist() == ids and frame["label"].tolist() == ["cat", "dog", "fox", "cat", "dog"]


def test_binary_sample_of_fractions_is_a_probability(make_config, tmp_path):
    d = tmp_path / "bin"
    for c, cls in enumerate(["cat", "dog"]):
        for k in range(4):
            _png(d / "train" / cls / f"{k}.png", 60 * c + k)
    for k in range(3):
        _png(d / "test" / f"{k}.png", k)
    _sample(d, ["id", "label"], ["0", "1", "2"], value="0.5")
    cfg = load_config(_cfg(make_config, d))
    test = read_table(cfg, "test")
    frame = build_reader(cfg).submission_frame(test.ids, np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]), ["cat", "dog"])
    np.testing.assert_allclose(frame["label"], [0.1, 0.8, 0.5])


def test_statoil_sample_reorders_and_ids_must_match(make_config, iceberg_dir, tmp_path):
    import shutil

    d = tmp_path / "ice"
    shutil.copytree(iceberg_dir, d)
    cfg = load_config(make_config(d))
    test = read_table(cfg, "test")
    ids = list(test.ids)[::-1]
    _sample(d, ["id", "is_iceberg"], ids)
    frame = build_reader(cfg).submission_frame(test.ids, np.tile([0.3, 0.7], (len(ids), 1)), test.class_names)
    assert frame["id"].tolist() == ids and np.allclose(frame["is_iceberg"], 0.7)
    _sample(d, ["id", "is_iceberg"], ids[1:] + ["nope"])
    with pytest.raises(PipelineError, match=r"sample_submission.csv: 1 ids not in the test data \(e.g. nope\)"):
        build_reader(cfg).submission_frame(test.ids, np.tile([0.3, 0.7], (len(ids), 1)), test.class_names)


@pytest.mark.parametrize(
    "header, ids, needle",
    [
        (["id", "cat", "dog", "wolf"], ["t0"], "column 'wolf' names a class train does not have"),
        (["id", "cat", "dog"], ["t0"], "no column for class 'fox'"),
        (["id", "score"], ["t0"], "column 'score' matches no target kind"),
        (["id", "a", "b"], ["t0"], "column 'a' matches no target kind"),
        (["id", "cat", "cat", "dog", "fox"], ["t0"], "column 'cat' appears more than once"),
        (["id"], ["t0"], "expected an id column and at least one target column"),
        (["id", "label"], ["t0", "t0"], "id 't0' appears more than once"),
        (["id", "label"], ["t0", ""], "line 3: the id (id) is empty or NaN"),
    ],
)
def test_bad_sample_is_refused_before_the_folds_file(capsys, make_config, comp, header, ids, needle):
    cfg = _cfg(make_config, comp)
    rows = [",".join([i] + ["0.5"] * (len(header) - 1)) for i in ids]
    (comp / "sample_submission.csv").write_text(",".join(header) + "\n" + "\n".join(rows) + "\n")
    before = _files(comp.parent)
    err = cli_error(capsys, "fold", cfg)
    assert "sample_submission.csv" in err and needle in err, err
    assert _files(comp.parent) == before  # no folds file, nothing else


def test_sample_probabilities_for_many_classes_are_refused(capsys, make_config, comp):
    _sample(comp, ["id", "label"], ["t0"], value="0.25")
    err = cli_error(capsys, "fold", _cfg(make_config, comp))
    assert "sample_submission.csv" in err and "holds probabilities" in err and "3 classes" in err


def test_named_sample_missing_and_null_keeps_the_format(capsys, make_config, comp):
    err = cli_error(capsys, "fold", _cfg(make_config, comp, sample_submission="other.csv"))
    assert "other.csv: sample submission not found" in err
    _sample(comp, ["id", "wolf", "cat"], ["t0"])  # would be refused, but null ignores it
    cfg = load_config(_cfg(make_config, comp, sample_submission=None))
    spec = build_reader(cfg).submission_spec(CLASSES)
    assert spec.header == ["id", "label"] and spec.ids is None


def test_the_sample_setting_is_not_part_of_the_run(make_config, comp):
    a = load_config(_cfg(make_config, comp))
    b = load_config(_cfg(make_config, comp, sample_submission=None))
    assert a.hash() == b.hash()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("ab,\n\r \"'0.5x")), max_size=60))
def test_read_sample_refuses_in_one_line_or_returns_a_checked_header(tmp_path, text):
    p = tmp_path / "sample_submission.csv"
    p.write_text(text)
    try:
        header, ids, _ = read_sample(p)
    except PipelineError as e:
        assert "\n" not in str(e) and str(p) in str(e)
        return
    assert len(header) >= 2 and all(header) and len(set(header)) == len(header)
    assert ids and all(i.strip() == i and i for i in ids) and len(set(ids)) == len(ids)


def test_through_predict(make_config, comp, capsys):
    """A real (tiny) run: fold, train, predict; the submission follows the per-class sample."""
    ids = [f"t{k}" for k in (2, 0, 1, 4, 3)]
    _sample(comp, ["id", "dog", "cat", "fox"], ids)
    for c, cls in enumerate(CLASSES):  # 8 images per class for 2 folds
        for k in range(4, 8):
            _png(comp / "train" / cls / f"{cls}{k}.png", 40 * c + k)
    cfg = make_config(
        comp,
        "image_folder",
        data={"image_size": 16, "channels": 1},
        folds={"n_splits": 2},
        model={"backbone": "simple_cnn", "pretrained": False},
        train={"epochs": 1, "batch_size": 8, "device": "cpu", "precision": "fp32", "num_workers": 0},
        predict={"tta": ["identity"]},
        evaluate={"adversarial": False, "gradcam_samples": 0},
    )
    assert run_cli("run", cfg) == 0
    assert re.search(r"peak memory: \d+\.\d\d GiB in this process", capsys.readouterr().out)
    subs = sorted(Path("submissions").glob("*.csv"))
    sub = pd.read_csv(subs[0], dtype={"id": str})
    assert list(sub.columns) == ["id", "dog", "cat", "fox"] and sub["id"].tolist() == ids
    np.testing.assert_allclose(sub[["dog", "cat", "fox"]].sum(1), 1, atol=1e-6)
    assert run_cli("validate-submission", cfg, subs[0]) == 0
