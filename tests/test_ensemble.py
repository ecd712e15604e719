"""Blenders against hand-computed values, stacking without leakage, member checks, the ensemble stage."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import run_cli, write_yaml
from helpers import N_TEST, N_TRAIN, binary, ens_file, fake_member, make_base_cfg

from pipeline.core.errors import PipelineError
from pipeline.core.metrics import logloss
from pipeline.ensemble.blend import EnsembleConfig, run_ensemble
from pipeline.ensemble.blenders import (
    BLENDERS,
    _lr_fit,
    blend_geometric,
    blend_mean,
    blend_rank,
    blend_stack,
    blend_weights,
    build_blender,
    optimise_weights,
    rank_average,
    stack_features,
)
from pipeline.predict.submission import validate_submission

quiet = lambda *a: None  # noqa: E731
ROOT = Path(__file__).resolve().parents[1]


# ---- blenders, by hand -----------------------------------------------------------------------


def test_mean_and_geometric_by_hand():
    p = binary([[0.2, 0.1], [0.8, 0.4]])  # members A, B on two rows
    oof, test, w = blend_mean(p, p)
    np.testing.assert_allclose(oof[:, 1], [0.5, 0.25])
    assert w == [0.5, 0.5]
    oof, _, _ = blend_geometric(p, p)
    # row 0: sqrt(.2*.8)=.4 for both classes -> .5; row 1: sqrt(.1*.4)=.2 vs sqrt(.9*.6)=.7348 -> .2/.9348
    np.testing.assert_allclose(oof[:, 1], [0.5, 0.2 / (0.2 + np.sqrt(0.54))])
    np.testing.assert_allclose(oof.sum(1), 1)


def test_rank_average_by_hand():
    # class 1: A = [.1, .5, .6] (ranks 1 2 3), B = [.9, .1, .2] (ranks 3 1 2): mean rank [2, 1.5, 2.5]
    # -> order row1 < row0 < row2; the mean blend's values [.5, .3, .4] sorted [.3, .4, .5] go in that order
    p = binary([[0.1, 0.5, 0.6], [0.9, 0.1, 0.2]])
    np.testing.assert_allclose(rank_average(p), [[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    oof, test, _ = blend_rank(p, p[:, :2])  # test rows ranked among themselves
    # two rows tie in mean rank (1.5 each): both get the midpoint of the mean blend's values .5 and .3
    np.testing.assert_allclose(test[:, 1], [0.4, 0.4])


def test_weights_by_hand():
    # y = [1, 0]; A gives p1 [.9, .5], B gives [.3, .1]. With w on A the log-loss is
    # -log(.3 + .6w) - log(.9 - .4w); its derivative vanishes at .6(.9 - .4w) = .4(.3 + .6w) -> w = .42/.48 = .875
    p, y = binary([[0.9, 0.5], [0.3, 0.1]]), np.array([1, 0])
    np.testing.assert_allclose(optimise_weights(p, y), [0.875, 0.125], atol=1e-4)
    # a useless member gets weight 0, and weights are non-negative and sum to one
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    good = np.where(y == 1, 0.8, 0.2)
    w = optimise_weights(binary([good, 1 - good, np.full(200, 0.5)]), y)
    assert w.min() >= 0 and w.sum() == pytest.approx(1) and w[0] > 0.99
    folds = np.arange(200) % 4
    oof, test, weights = blend_weights(binary([good, 1 - good]), binary([[0.7], [0.4]]), y, folds)
    assert weights == pytest.approx([1, 0], abs=1e-4)
    np.testing.assert_allclose(test[:, 1], [0.7], atol=1e-4)


def test_stacking_on_noise_is_not_better_than_chance():
    """Shuffle test: 40 pure-noise members. The honest stacked OOF (fit on other folds) is no better than
    predicting the class prior; the leaky version (fit and scored on the same rows) looks better."""
    rng = np.random.default_rng(0)
    n, m = 300, 40
    y, folds = rng.integers(0, 2, n), np.arange(n) % 5
    noise = binary(rng.uniform(0.05, 0.95, (m, n)))
    oof, test, _ = blend_stack(noise, noise[:, :20], y, folds)
    chance = logloss(y, np.tile(np.bincount(y) / n, (n, 1)))
    leaky = _lr_fit(stack_features(noise), y, 2, 1.0)(stack_features(noise))
    assert logloss(y, oof) > chance
    assert logloss(y, leaky) < chance - 0.03  # the test has teeth
    assert test.shape == (20, 2)


def test_stacking_learns_from_signal_multiclass():
    rng = np.random.default_rng(1)
    n, k = 300, 3
    y, folds = rng.integers(0, k, n), np.arange(n) % 3
    good = np.full((n, k), 0.2)
    good[np.arange(n), y] = 0.6
    p = np.stack([good, rng.dirichlet(np.ones(k), n)])
    oof, _, _ = blend_stack(p, p, y, folds)
    assert oof.shape == (n, k) and np.allclose(oof.sum(1), 1)
    assert logloss(y, oof) < logloss(y, np.full((n, k), 1 / k)) - 0.1
    assert stack_features(p).shape == (n, 2 * k)


def test_blender_registry():
    assert list(BLENDERS) == ["mean", "geometric", "rank", "weights", "stack", "hillclimb", "gbm"]
    with pytest.raises(PipelineError, match=r"method: unknown blender 'median'; did you mean mean"):
        build_blender("median")


# ---- the stage on fabricated members ----------------------------------------------------------


@pytest.fixture
def base_cfg(make_config, sk_digits_dir):
    return make_base_cfg(make_config, sk_digits_dir)


@pytest.mark.parametrize("method", list(BLENDERS))
def test_ensemble_stage_writes_valid_submission(base_cfg, method, capsys):
    fake_member("a", 1, quality=0.3), fake_member("b", 2, quality=0.5)
    sub = run_ensemble(
        ens_file(base_cfg, ["runs/comp/a", "runs/comp/b"], method=method, clip=[0.001, 0.999], gbm={"rounds": 60})
    )  # gbm: 10 classes x 500 rounds would dominate the file's time
    out = capsys.readouterr().out
    assert "member a" in out and "member b" in out and f"blend  blend ({method})" in out
    assert "clipping to [0.001, 0.999]: OOF logloss" in out and " without, " in out
    from pipeline.config.load import load_config

    assert validate_submission(load_config(base_cfg), sub) == []
    meta = json.loads(sub.with_suffix(".json").read_text())
    assert sub.name.startswith("comp-blend-") and meta["experiments"] == ["a", "b"] and meta["method"] == method
    assert set(meta["config_hashes"]) == {"a", "b"} and meta["oof_logloss"] > 0
    run = Path("runs/comp/blend")
    oof = pd.read_csv(run / "oof.csv", dtype={"id": str})
    assert list(oof.columns[:3]) == ["id", "fold", "target"] and len(oof) == N_TRAIN
    np.testing.assert_allclose(oof.filter(like="p_").sum(1), 1, atol=1e-6)
    assert len(pd.read_csv(run / "test_pred.csv")) == N_TEST
    # the clipped OOF log-loss is measured on the blend's OOF, as printed
    from pipeline.core.metrics import logloss
    from pipeline.predict.predictor import clip_probs

    blend = oof.filter(like="p_").to_numpy()
    want = logloss(oof["target"].to_numpy(), clip_probs(blend, (0.001, 0.999)))
    assert meta["oof_logloss_clipped"] == pytest.approx(want, rel=1e-5) and f"{want:.4f} with" in out


def test_blend_of_a_member_with_itself_warns(base_cfg, capsys):
    fake_member("a", 1)
    run_dir_copy = fake_member("b", 1)  # identical predictions
    run_ensemble(ens_file(base_cfg, ["runs/comp/a", str(run_dir_copy)]))
    assert "warning: the blend's OOF logloss" in capsys.readouterr().out


def test_members_with_different_folds_are_refused(base_cfg):
    fake_member("a", 1)
    fake_member("c", 3, folds=(np.arange(N_TRAIN) + 1) % 3)
    with pytest.raises(
        PipelineError,
        match=r"blend.yaml: members a and c were trained on different folds "
        r"\(600 rows differ, e.g. id '1': fold 0 vs 1\); expected experiments that share one folds file",
    ):
        run_ensemble(ens_file(base_cfg, ["runs/comp/a", "runs/comp/c"]))
    assert not Path("submissions").exists()


def test_member_mismatches_are_refused(base_cfg):
    fake_member("a", 1)
    b = fake_member("b", 2)
    oof = pd.read_csv(b / "oof.csv", dtype={"id": str})
    oof.iloc[:-1].to_csv(b / "oof.csv", index=False)
    with pytest.raises(PipelineError, match=r"member b has OOF predictions for other training ids than a"):
        run_ensemble(ens_file(base_cfg, ["runs/comp/a", "runs/comp/b"]))
    oof.assign(target=(oof["target"] + 1) % 10).to_csv(b / "oof.csv", index=False)
    with pytest.raises(PipelineError, match=r"members a and b disagree on training labels"):
        run_ensemble(ens_file(base_cfg, ["runs/comp/a", "runs/comp/b"]))
    oof.drop(columns="p_9").to_csv(b / "oof.csv", index=False)
    with pytest.raises(PipelineError, match=r"member b predicts classes \['p_0', .*'p_8'\]; expected"):
        run_ensemble(ens_file(base_cfg, ["runs/comp/a", "runs/comp/b"]))
    (b / "test_pred.csv").unlink()
    with pytest.raises(
        PipelineError, match=r"blend.yaml: members\[1\]: runs/comp/b/test_pred.csv not found; run `pipeline predict`"
    ):
        run_ensemble(ens_file(base_cfg, ["runs/comp/a", "runs/comp/b"]))
    with pytest.raises(PipelineError, match=r"blend.yaml: members: experiment 'a' is listed twice"):
        run_ensemble(ens_file(base_cfg, ["runs/comp/a", "runs/comp/a"]))
    with pytest.raises(
        PipelineError, match=r"blend.yaml: members\[1\]: runs/comp/zz not found; expected a run directory"
    ):
        run_ensemble(ens_file(base_cfg, ["runs/comp/a", "runs/comp/zz"]))


def test_member_temperature_is_applied_to_its_oof(base_cfg, capsys):
    fake_member("a", 1), fake_member("b", 2)
    fake_member("c", 2, temperature=3.0)  # b's predictions, softened
    run_ensemble(ens_file(base_cfg, ["runs/comp/a", "runs/comp/b"]))
    run_ensemble(ens_file(base_cfg, ["runs/comp/a", "runs/comp/c"], name="blend2"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("member ")]
    ll = {line.split()[1]: float(line.split()[-1]) for line in lines}
    assert ll["c"] != pytest.approx(ll["b"])


def test_member_temperature_scales_its_oof_and_test_alike(base_cfg):
    """One rule: a member that kept T contributes scaled OOF *and* scaled test predictions (files stay raw)."""
    from pipeline.tasks.calibration import apply_temperature

    a, c = fake_member("a", 1), fake_member("c", 2, temperature=3.0)
    run_ensemble(ens_file(base_cfg, ["runs/comp/a", "runs/comp/c"], method="mean"))
    blend = Path("runs/comp/blend")
    for name in ("oof.csv", "test_pred.csv"):
        raw_a = pd.read_csv(a / name, dtype={"id": str}).filter(like="p_").to_numpy()
        raw_c = pd.read_csv(c / name, dtype={"id": str}).filter(like="p_").to_numpy()
        got = pd.read_csv(blend / name, dtype={"id": str}).filter(like="p_").to_numpy()
        np.testing.assert_allclose(got, (raw_a + apply_temperature(raw_c, 3.0)) / 2, atol=1e-7)
        assert not np.allclose(got, (raw_a + raw_c) / 2, atol=1e-3)  # the test has teeth


SCHEMA_ERRORS = [
    ({"methd": "mean"}, r"blend.yaml: unknown key 'methd'; did you mean method\?"),
    ({"method": "median"}, r"blend.yaml: method: unknown blender 'median'; did you mean mean\?$"),
    ({"clip": [0.9, 0.1]}, r"blend.yaml: clip: got \[0.9, 0.1\]; expected \[lo, hi\] with 0 <= lo < hi <= 1"),
    ({"members": ["runs/comp/a"]}, r"blend.yaml: members: List should have at least 2 items"),
    ({"competition": "other"}, r"blend.yaml: competition is 'other' but config .*base.yaml is for 'comp'"),
    ({"config": "nope.yaml"}, r"blend.yaml: config: nope.yaml not found"),
]


@pytest.mark.parametrize("change,message", SCHEMA_ERRORS)
def test_schema_errors_are_one_line(base_cfg, change, message):
    fake_member("a", 1), fake_member("b", 2)
    d = {"competition": "comp", "config": str(base_cfg), "members": ["runs/comp/a", "runs/comp/b"], **change}
    write_yaml(Path("blend.yaml"), d)
    with pytest.raises(PipelineError, match=message):
        run_ensemble("blend.yaml")


def test_missing_key_and_name_collision(base_cfg, capsys):
    write_yaml(Path("blend.yaml"), {"competition": "comp", "members": ["a", "b"]})
    assert run_cli("ensemble", "blend.yaml") == 2
    assert capsys.readouterr().err.strip() == "error: blend.yaml: missing required key 'config'"
    fake_member("a", 1), fake_member("b", 2)
    Path("runs/comp/a/config.train.yaml").write_text("x")
    with pytest.raises(
        PipelineError, match=r"name 'a' is a trained experiment in runs/comp/a; give the ensemble another name"
    ):
        run_ensemble(ens_file(base_cfg, ["runs/comp/a", "runs/comp/b"], name="a"))


def test_competition_config_given_to_ensemble(base_cfg):
    with pytest.raises(
        PipelineError,
        match=r"base.yaml: is a competition config, not an ensemble file; expected keys competition, config, members",
    ):
        run_ensemble(base_cfg)


def test_example_blend_file_is_valid():
    path = ROOT / "competitions" / "iceberg-blend.yaml"
    ens = EnsembleConfig(**yaml.safe_load(path.read_text()))
    assert ens.competition == "iceberg-demo" and len(ens.members) == 2 and ens.clip == (0.001, 0.999)
    assert (path.parent / ens.config).is_file()


def test_ensemble_of_two_real_runs(digits_config, capsys):
    """End to end: train and predict two tiny digit experiments (different seeds, one with TTA), blend them."""
    from pipeline.config.load import load_config

    paths = [
        digits_config(name="a", train={"epochs": 1}, predict={"tta": ["identity", "hflip"]}),
        digits_config(name="b", train={"epochs": 1, "seed": 7}),
    ]
    assert run_cli("fold", paths[0]) == 0
    for p in paths:  # evaluate makes a's TTA OOF (tta_oof is on by default) and calibrates on it
        assert run_cli("train", p) == 0 and run_cli("evaluate", p) == 0 and run_cli("predict", p) == 0
    write_yaml(
        Path("blend.yaml"),
        {"competition": "comp", "config": str(paths[0]), "members": [str(p) for p in paths], "method": "mean"},
    )
    capsys.readouterr()
    assert run_cli("ensemble", "blend.yaml", "method=stack") == 0
    out = capsys.readouterr().out
    assert "blend  blend (stack)" in out
    sub = sorted(Path("submissions").glob("comp-blend-*.csv"))
    assert len(sub) == 1 and validate_submission(load_config(paths[0]), sub[0]) == []
    assert json.loads(sub[0].with_suffix(".json").read_text())["experiments"] == ["a", "b"]
