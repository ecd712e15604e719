"""Calibrated out of the box: the ``auto`` defaults (TTA from augment, tta_oof, clip, label smoothing),
the nested shrink toward the class prior, and per-fold calibration error in evaluate's outputs."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config.auto import (
    AFFINE_TTA_MIN,
    AUTO_CLIP,
    auto_tta,
    resolve_clip,
    resolve_label_smoothing,
    resolve_tta,
    tta_is_on,
    uses_tta_oof,
)
from pipeline.config.load import load_config
from pipeline.config.schema import STAGE_SECTIONS
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import logloss
from pipeline.models.tta import build_tta
from pipeline.runs.predictions import load_calibration, read_predictions
from pipeline.tasks import build_task
from pipeline.tasks.calibration import (
    MIN_GAIN,
    SHRINK_MAX,
    Calibration,
    apply_shrink,
    apply_temperature,
    calibrate,
    class_prior,
    fit_shrink,
    nested_shrink,
    nested_temperature,
)
from pipeline.tasks.classification import softmax

RUN = Path("runs/comp/exp")


def drawn(rng, probs):
    """Labels drawn from the predicted probabilities: calibrated by construction."""
    u = rng.random(len(probs))
    return (u[:, None] > np.cumsum(probs, 1)).sum(1).clip(0, probs.shape[1] - 1)


# ---- the auto rules --------------------------------------------------------------------------

FLIP, VFLIP, ROT = (
    {"name": "HorizontalFlip", "p": 0.5},
    {"name": "VerticalFlip", "p": 0.5},
    {"name": "RandomRotate90", "p": 0.5},
)
AFFINE = {"name": "Affine", "rotate": [-10, 10], "p": 0.5}


@pytest.mark.parametrize(
    "augment, want",
    [
        ([], ["identity"]),
        ([AFFINE], ["identity", "rotate5"]),  # digits: a mirrored digit is another digit, a slightly turned one is not
        ([FLIP, AFFINE], ["identity", "hflip", "rotate5"]),
        ([VFLIP], ["identity", "vflip"]),
        ([FLIP, VFLIP], ["identity", "hflip", "vflip", "rot180"]),  # the group the two flips generate
        ([FLIP, VFLIP, ROT, AFFINE], ["dihedral", "rotate5"]),  # the iceberg config
        ([ROT, FLIP], ["dihedral"]),
        ([ROT], ["identity", "rot90", "rot180", "rot270"]),
        ([{"name": "D4", "p": 1.0}], ["dihedral"]),
        (
            [{"name": "HorizontalFlip", "p": 0.0}, AFFINE],
            ["identity", "rotate5"],
        ),  # never applied: training saw no mirror
        # the affine views: half of the smaller side of each range, from 3 degrees / 3% up
        ([{"name": "Affine", "rotate": [-12, 12], "scale": [0.85, 1.15], "p": 0.8}], ["identity", "rotate6", "zoom7"]),
        ([{"name": "Affine", "rotate": 15, "scale": [0.9, 1.1]}], ["identity", "rotate7", "zoom5"]),
        ([{"name": "Affine", "rotate": [-20, 8], "scale": [0.8, 1.05]}], ["identity", "rotate4"]),  # 1.05: 2.5% < 3%
        (
            [{"name": "Affine", "rotate": [0, 30], "scale": {"x": [0.8, 1.2], "y": [0.9, 1.1]}}],
            ["identity"],
        ),  # one-sided; per axis
        ([{"name": "Affine", "rotate": [-5, 5]}], ["identity"]),  # 2.5 degrees: under the smallest view
        ([{"name": "Affine", "rotate": [-30, 30], "p": 0.0}], ["identity"]),
        (
            [{"name": "Affine", "rotate": [-10, 10]}, {"name": "SafeRotate", "limit": 30}],
            ["identity", "rotate15"],
        ),  # the widest
        ([{"name": "ShiftScaleRotate"}], ["identity", "rotate22", "zoom5"]),  # its defaults: +-45 degrees, +-10%
        ([{"name": "Rotate", "limit": [-120, 120]}], ["identity", "rotate45"]),  # capped at the family's largest
    ],
)
def test_auto_tta_from_the_augment_list(augment, want):
    assert auto_tta(augment) == want


@given(
    lo=st.floats(-120, 0),
    hi=st.floats(0, 120),
    s_lo=st.floats(0.3, 1.0),
    s_hi=st.floats(1.0, 2.0),
    p=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_affine_views_stay_inside_what_training_showed(lo, hi, s_lo, s_hi, p):
    """Any Affine: a view's turn or scale is at most half the smaller side of its range (never one
    training did not show), at least AFFINE_TTA_MIN, within the family's limits; none when p is 0."""
    got = auto_tta([{"name": "Affine", "rotate": [lo, hi], "scale": [s_lo, s_hi], "p": p}])
    assert got[0] == "identity"
    views = {n.rstrip("0123456789"): int(n[len(n.rstrip("0123456789")) :]) for n in got[1:]}
    assert set(views) <= {"rotate", "zoom"}
    if p == 0:
        assert not views
        return
    turn, zoom = min(-lo, hi) / 2, 100 * min(1 - s_lo, s_hi - 1) / 2
    for family, half, cap in (("rotate", turn, 45), ("zoom", zoom, 50)):
        if family in views:
            assert AFFINE_TTA_MIN <= views[family] <= min(half + 1e-6, cap)
        else:
            assert half < AFFINE_TTA_MIN + 1e-6
    build_tta(got, (16, 16))  # every name it makes is a valid TTA


def test_auto_keys_resolve_from_the_config(digits_config):
    path = digits_config(augment=[FLIP])
    cfg = load_config(path)
    assert cfg.predict.tta == "auto" and cfg.predict.tta_oof is True  # the defaults
    assert resolve_tta(cfg) == ["identity", "hflip"] and tta_is_on(cfg) and uses_tta_oof(cfg)
    assert not uses_tta_oof(load_config(path, ["predict.tta_oof=false"]))
    # explicit lists keep working; identity means no TTA OOF at all (oof.csv is it)
    assert resolve_tta(load_config(path, ["predict.tta=[identity,vflip]"])) == ["identity", "vflip"]
    assert not uses_tta_oof(load_config(path, ["predict.tta=[identity]"]))
    # resolved from the config alone: the same hash on every load, and auto hashes as written
    assert load_config(path).hash() == cfg.hash()
    assert cfg.hash(*STAGE_SECTIONS["evaluate"]) != load_config(path, ["predict.tta=[identity,vflip]"]).hash(
        *STAGE_SECTIONS["evaluate"]
    )
    assert cfg.hash(*STAGE_SECTIONS["evaluate"]) == load_config(path, ["predict.clip=[0.01,0.99]"]).hash(
        *STAGE_SECTIONS["evaluate"]
    )
    # the config still refuses a bad name or value
    with pytest.raises(PipelineError, match=r"predict.tta: unknown TTA 'spin'"):
        load_config(path, ["predict.tta=[spin]"])
    with pytest.raises(PipelineError, match=r"predict.tta: got 'automatic'; expected auto or a list of TTA names"):
        load_config(path, ["predict.tta=automatic"])
    with pytest.raises(
        PipelineError,
        match=r"train.label_smoothing: Input should be less than 1; expected auto or a number >= 0 and < 1 \(got 1.5\)",
    ):
        load_config(path, ["train.label_smoothing=1.5"])
    with pytest.raises(PipelineError, match=r"train.lr: got 'fast'; expected auto or a number > 0"):
        load_config(path, ["train.lr=fast"])
    with pytest.raises(PipelineError, match=r"train.lr: Input should be greater than 0; expected auto or a number > 0"):
        load_config(path, ["train.lr=0"])


@pytest.mark.parametrize(
    "metric, k, given, want",
    [
        ("logloss", 10, "auto", 0.1),
        ("logloss", 3, "auto", 0.1),
        ("logloss", 2, "auto", 0.0),
        ("accuracy", 10, "auto", 0.0),
        ("logloss", 10, 0.05, 0.05),
        ("accuracy", 10, 0.2, 0.2),
        ("logloss", 10, 0.0, 0.0),
    ],
)
def test_label_smoothing_auto(digits_config, metric, k, given, want):
    cfg = load_config(digits_config(metric=metric, train={"label_smoothing": given}))
    assert resolve_label_smoothing(cfg, build_task(k)) == want


@pytest.mark.parametrize(
    "metric, given, want",
    [
        ("logloss", "auto", AUTO_CLIP),
        ("accuracy", "auto", None),
        ("f1", "auto", None),
        ("logloss", None, None),
        ("accuracy", [0.01, 0.99], (0.01, 0.99)),
    ],
)
def test_clip_auto(digits_config, metric, given, want):
    cfg = load_config(digits_config(metric=metric, predict={"clip": given}))
    assert resolve_clip(cfg) == want


# ---- the shrink toward the class prior ---------------------------------------------------------


def test_shrink_is_fitted_fold_by_fold_on_the_other_folds():
    """Fold 0 holds confident mistakes, the other folds are calibrated: fold 0's share comes from the
    calibrated rows only (small), while its own rows alone would ask for a large one."""
    rng = np.random.default_rng(0)
    n, k = 3000, 4
    probs = softmax(rng.normal(0, 2.0, (n, k)))
    y = drawn(rng, probs)
    fold = np.arange(n) % 3
    bad = np.flatnonzero(fold == 0)[:300]
    y[bad] = (probs[bad].argmax(1) + 1) % k  # confidently wrong
    out, shares = nested_shrink(y, probs, fold, None)
    for f in range(3):
        m = fold == f
        prior = class_prior(y[~m], k)
        assert shares[f] == pytest.approx(fit_shrink(y[~m], probs[~m], prior), abs=1e-9)
        np.testing.assert_allclose(out[m], apply_shrink(probs[m], shares[f], prior))
    own = fit_shrink(y[fold == 0], probs[fold == 0], class_prior(y[fold == 0], k))
    assert own > shares[0] + 0.05  # a fit that saw fold 0's own rows would not pass the line above


def test_shrink_after_the_per_fold_temperature():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.2, (2000, 3))
    y = drawn(rng, softmax(logits))
    over = softmax(3 * logits)
    fold = np.arange(2000) % 4
    _, temps = nested_temperature(y, over, fold)
    out, shares = nested_shrink(y, over, fold, temps)
    m = fold == 2
    prior = class_prior(y[~m], 3)
    a = fit_shrink(y[~m], apply_temperature(over[~m], temps[2]), prior)
    assert shares[2] == pytest.approx(a) and 0 <= a <= SHRINK_MAX
    np.testing.assert_allclose(out[m], apply_shrink(apply_temperature(over[m], temps[2]), a, prior))


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_shrink_dropped_on_calibrated_predictions(seed):
    rng = np.random.default_rng(seed)
    probs = softmax(rng.normal(0, 1.5, (4000, 3)))
    y = drawn(rng, probs)
    summary, delivered = calibrate(y, probs, np.arange(4000) % 5, shrink=True)
    sh = summary["shrink"]
    assert not sh["kept"] and sh["nested_logloss"] >= sh["base_logloss"] * (1 - MIN_GAIN)
    assert not summary["kept"]
    np.testing.assert_array_equal(delivered, probs)  # nothing kept: what predict applies is nothing
    assert summary["calibrated_logloss"] == pytest.approx(summary["raw_logloss"])


def test_shrink_kept_on_overconfident_predictions_and_lowers_nested_logloss():
    """Sure of the top class, and the other classes' probabilities orders of magnitude apart; 15% of
    labels are another class, often an 'impossible' one: the temperature cannot lift those without
    flattening everything, the floor of the shrink can (what test data unlike training does)."""
    rng = np.random.default_rng(2)
    n, k = 4000, 10
    probs = softmax(rng.normal(0, 6, (n, k)))
    top = probs.argmax(1)
    y = np.where(rng.random(n) < 0.85, top, (top + rng.integers(1, k, n)) % k)
    fold = np.arange(n) % 5
    summary, delivered = calibrate(y, probs, fold, shrink=True)
    sh = summary["shrink"]
    assert sh["kept"] and 0 < sh["a"] <= SHRINK_MAX and len(sh["fold_shares"]) == 5
    assert sh["nested_logloss"] < sh["base_logloss"] * (1 - MIN_GAIN)
    assert summary["calibrated_logloss"] == pytest.approx(sh["nested_logloss"])
    assert summary["calibrated_logloss"] < summary["nested_logloss"] * (1 - MIN_GAIN)  # beyond what the temperature did
    assert logloss(y, delivered) == pytest.approx(summary["calibrated_logloss"])
    # the floor that guards the worst case: no probability below its fold's share of the prior
    assert delivered.min() >= min(sh["fold_shares"]) * min(sh["prior"]) * 0.9 > 0  # (each fold: the other folds' prior)
    np.testing.assert_allclose(delivered.sum(1), 1)
    assert calibrate(y, probs, fold)[0].get("shrink") is None  # only asked for with a log-loss metric


def test_shrink_applied_on_read(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(3)
    probs = softmax(rng.normal(0, 3, (50, 3)))
    df = pd.DataFrame({"id": [str(i) for i in range(50)], **{f"p_{c}": probs[:, j] for j, c in enumerate("abc")}})
    df.to_csv(run / "test_pred.csv", index=False, float_format="%.8g")
    prior = [0.2, 0.3, 0.5]
    cal = {"temperature": 1.7, "kept": True, "shrink": {"a": 0.1, "prior": prior, "kept": True}}
    (run / "calibration.json").write_text(json.dumps(cal))
    assert load_calibration(run) == Calibration(temperature=1.7, shrink=0.1, prior=tuple(prior))
    got = read_predictions(run / "test_pred.csv", "test", scaled=True).filter(like="p_").to_numpy()
    raw = read_predictions(run / "test_pred.csv", "test").filter(like="p_").to_numpy()
    np.testing.assert_allclose(got, apply_shrink(apply_temperature(raw, 1.7), 0.1, prior), atol=1e-12)
    cal["shrink"]["kept"] = False  # not kept: the temperature alone
    (run / "calibration.json").write_text(json.dumps(cal))
    np.testing.assert_allclose(
        read_predictions(run / "test_pred.csv", "test", scaled=True).filter(like="p_").to_numpy(),
        apply_temperature(raw, 1.7),
        atol=1e-12,
    )
    for shrink, msg in [
        ({"a": 0.9, "prior": prior, "kept": True}, r"shrink.a is 0.9; expected a number in \[0, 0.5\]"),
        ({"a": 0.1, "prior": [0.5, 0.6], "kept": True}, r"shrink.prior is \[0.5, 0.6\]; expected class frequencies"),
        ({"a": True, "prior": prior, "kept": True}, r"shrink.a is True"),
    ]:
        (run / "calibration.json").write_text(json.dumps({**cal, "shrink": shrink}))
        with pytest.raises(PipelineError, match=msg) as e:
            read_predictions(run / "test_pred.csv", "test", scaled=True)
        assert str(e.value).startswith(str(run / "calibration.json")) and "\n" not in str(e.value)
    (run / "calibration.json").write_text(json.dumps({**cal, "shrink": {"a": 0.1, "prior": [0.5, 0.5], "kept": True}}))
    with pytest.raises(PipelineError, match=r"shrink.prior has 2 classes, the predictions 3"):
        read_predictions(run / "test_pred.csv", "test", scaled=True)


# ---- end to end: a log-loss run with every auto default ----------------------------------------


def test_logloss_run_with_auto_defaults(digits_config, capsys):
    """Multi-class log-loss with a flip in augment: label smoothing 0.1 in training, evaluate makes and
    calibrates the TTA OOF, per-fold ECE in metrics.json, the table and report.html, predict clips."""
    path = digits_config(
        metric="logloss", train={"epochs": 1, "lr": "auto"}, augment=[FLIP], evaluate={"gradcam_samples": 0}
    )
    assert run_cli("fold", path) == 0 and run_cli("train", path) == 0
    out = capsys.readouterr().out
    assert "train.label_smoothing auto -> 0.1 (metric logloss, 10 classes)" in out
    assert "train.lr auto -> 0.003 (from scratch)" in out
    snapshot = (RUN / "config.train.yaml").read_text()
    assert (
        "# train.label_smoothing: auto resolved to 0.1" in snapshot and "# train.lr: auto resolved to 0.003" in snapshot
    )
    assert run_cli("evaluate", path) == 0
    out = capsys.readouterr().out
    assert (
        "OOF with predict.tta ['identity', 'hflip'] (auto)" in out
        and "cal_ece" in out
        and "shrink toward the class prior" in out
    )
    m = json.loads((RUN / "metrics.json").read_text())
    assert m["tta"] == ["identity", "hflip"] and m["oof"].endswith("oof_tta.csv")
    folds = m["calibrated"]["folds"]
    assert [f["fold"] for f in folds] == [0, 1, 2]
    for f, raw in zip(folds, m["folds"]):
        assert {"ece", "raw_ece", "logloss", "confidence_gap", "raw_confidence_gap"} <= set(f)
        assert f["raw_ece"] == pytest.approx(raw["ece"]) and raw["confidence_gap"] == pytest.approx(
            f["raw_confidence_gap"]
        )
    cal = json.loads((RUN / "calibration.json").read_text())
    assert "a" in cal["shrink"] and len(cal["shrink"]["prior"]) == 10
    html = (RUN / "report" / "report.html").read_text()
    assert "Calibration per fold" in html and "with TTA identity, hflip" in html
    assert f"{folds[1]['ece']:.4f}" in html and f"{folds[1]['raw_ece']:.4f}" in html
    assert run_cli("predict", path) == 0
    info = json.loads((RUN / "predict.json").read_text())
    assert info["clip"] == list(AUTO_CLIP) and info["oof"] == "oof_tta.csv" and info["tta"] == ["identity", "hflip"]
    assert info["shrink"] == (cal["shrink"]["a"] if cal["shrink"]["kept"] else 0.0)
    oof = read_predictions(RUN / "oof_tta.csv", "oof", scaled=True)
    assert info["oof_logloss"] == pytest.approx(logloss(oof["target"].to_numpy(), oof.filter(like="p_").to_numpy()))
