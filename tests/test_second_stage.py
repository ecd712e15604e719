"""Second-stage blenders: ensemble selection (hillclimb) and LightGBM (gbm) over the members' OOF, fitted
fold by fold; tests that would catch a leak, the scalar features, bad settings, and the stage end to end."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_error, run_cli, write_yaml
from helpers import binary, ens_file, fake_member, make_base_cfg

import pipeline.ensemble.blenders as ens_mod
from pipeline.config.load import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import logloss, score
from pipeline.data.formats import read_table
from pipeline.data.table import Table
from pipeline.ensemble.blenders import blend_gbm, blend_hillclimb, hillclimb_weights, stack_features
from pipeline.ensemble.scalars import scalars_for, table_scalars
from pipeline.runs.predictions import read_predictions


@pytest.fixture
def base_cfg(make_config, sk_digits_dir):
    return make_base_cfg(make_config, sk_digits_dir)


def members_with_noise(seed, n=300, n_noise=30, lo=0.05, hi=0.95):
    """One real, calibrated member (index 0) and ``n_noise`` members of pure noise, on 5 folds."""
    rng = np.random.default_rng(seed)
    p_real = 1 / (1 + np.exp(-rng.normal(0, 1.5, n)))
    y = (rng.uniform(size=n) < p_real).astype(int)
    return binary(np.vstack([p_real[None], rng.uniform(lo, hi, (n_noise, n))])), y, np.arange(n) % 5


# ---- hillclimb ------------------------------------------------------------------------------


def test_hillclimb_weights_are_a_distribution_and_deterministic():
    p, y, folds = members_with_noise(0, n_noise=5)
    details = {}
    oof, test, w = blend_hillclimb(p, p[:, :40], y, folds, metric="logloss", iterations=20, details=details)
    assert min(w) >= 0 and sum(w) == pytest.approx(1)
    for fw in details["fold_weights"].values():
        assert min(fw) >= 0 and sum(fw) == pytest.approx(1)
    assert set(details["fold_weights"]) == {0, 1, 2, 3, 4} and details["iterations"] == 20
    np.testing.assert_allclose(test, np.tensordot(w, p[:, :40], 1))
    np.testing.assert_allclose(oof.sum(1), 1)
    again = blend_hillclimb(p, p[:, :40], y, folds, metric="logloss", iterations=20)
    np.testing.assert_array_equal(oof, again[0])
    np.testing.assert_array_equal(test, again[1])
    # a tie between identical members goes to the lower index
    twins = np.stack([p[1], p[0], p[0]])
    assert hillclimb_weights(twins, y, "logloss", 10).tolist() == [0.0, 1.0, 0.0]


def test_hillclimb_scores_with_the_metric_and_its_direction():
    """A member accurate but overconfident where wrong wins on accuracy, a calibrated one on log-loss."""
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    sharp = binary([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]])[0]  # 6/8 right, two certain mistakes
    soft = binary([[0.6, 0.6, 0.4, 0.4, 0.4, 0.4, 0.6, 0.6]])[0]  # 4/8 right, never far off
    p = np.stack([sharp, soft])
    assert score("accuracy", y, sharp) > score("accuracy", y, soft) and logloss(y, sharp) > logloss(y, soft)
    assert hillclimb_weights(p, y, "accuracy", 0).tolist() == [1.0, 0.0]
    assert hillclimb_weights(p, y, "logloss", 0).tolist() == [0.0, 1.0]


def test_hillclimb_selects_each_fold_on_the_other_folds_only(monkeypatch):
    p, y, folds = members_with_noise(1, n=100, n_noise=4)
    calls = []
    real = ens_mod.hillclimb_weights

    def spy(pp, yy, metric, iterations):
        calls.append((pp.copy(), yy.copy()))
        return real(pp, yy, metric, iterations)

    monkeypatch.setattr(ens_mod, "hillclimb_weights", spy)
    blend_hillclimb(p, p, y, folds, metric="logloss", iterations=5)
    assert len(calls) == 6  # one per fold, then the test weights on all rows
    for k, (pp, yy) in enumerate(calls[:5]):
        np.testing.assert_array_equal(pp, p[:, folds != k])
        np.testing.assert_array_equal(yy, y[folds != k])
    np.testing.assert_array_equal(calls[5][0], p)


@pytest.mark.parametrize("seed", [0, 1])
def test_hillclimb_over_noise_is_not_better_nested_but_is_in_sample(seed):
    """31 members: one real, 30 pure noise. On accuracy, selection on the scored rows picks noise that
    happens to flip borderline rows (the in-sample score beats the real member); the nested score,
    selected on the other folds, does not beat it by more than noise."""
    p, y, folds = members_with_noise(seed)
    details = {}
    oof, _, w = blend_hillclimb(p, p[:, :10], y, folds, metric="accuracy", iterations=50, details=details)
    real = score("accuracy", y, p[0])
    assert score("accuracy", y, oof) <= real + 0.02
    assert details["in_sample_score"] > real + 0.03  # the test has teeth: a leak would show this much
    assert details["in_sample_score"] == pytest.approx(score("accuracy", y, np.tensordot(w, p, 1)))
    # log-loss: noise cannot help a calibrated member, nested or not by much
    oof, _, _ = blend_hillclimb(p, p[:, :10], y, folds, metric="logloss", iterations=50)
    assert logloss(y, oof) >= logloss(y, p[0]) - 0.005


def test_member_perfect_on_one_fold_gets_no_weight_there_from_that_fold():
    rng = np.random.default_rng(3)
    n = 250
    y, folds = rng.integers(0, 2, n), np.arange(n) % 5
    decent = np.clip(np.where(y == 1, 0.7, 0.3) + rng.normal(0, 0.1, n), 0.05, 0.95)
    lucky = np.where(folds == 0, y.astype(float), rng.uniform(0.05, 0.95, n))  # perfect on fold 0 only
    p = binary([decent, lucky])
    details = {}
    oof, _, _ = blend_hillclimb(p, p, y, folds, metric="logloss", iterations=30, details=details)
    assert details["fold_weights"][0][1] == 0.0
    f0 = folds == 0
    np.testing.assert_allclose(oof[f0], p[0, f0])  # fold 0 blended by the decent member alone
    assert logloss(y[f0], oof[f0]) > 0.2  # not perfect
    # the test has teeth: selected on fold 0's own rows, the lucky member takes all the weight
    assert hillclimb_weights(p[:, f0], y[f0], "logloss", 30).tolist() == [0.0, 1.0]


# ---- scalar features --------------------------------------------------------------------------


def _statoil_record(rid, band_1, band_2, angle, label=None):
    rec = {"id": rid, "band_1": band_1, "band_2": band_2, "inc_angle": angle}
    return rec if label is None else {**rec, "is_iceberg": label}


@pytest.mark.parametrize("channels", [2, 3])
def test_statoil_scalars_by_hand(make_config, tmp_path, channels):
    d = tmp_path / "statoil"
    d.mkdir()
    n = 75 * 75
    a1 = [1.0] * (n - 1) + [-4624.0]  # mean (5624 - 4624) / 5625, min -4624, max 1
    a2 = [2.0] * n
    recs = [_statoil_record("a", a1, a2, 40.5, 1), _statoil_record("b", a2, a2, "na", 0)]
    (d / "train.json").write_text(json.dumps(recs))
    (d / "test.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "is_iceberg"} for r in recs]))
    cfg = load_config(
        make_config(d, "statoil_json", data={"format": "statoil_json", "dir": str(d), "channels": channels})
    )
    x, names = table_scalars(read_table(cfg, "train"), "statoil_json")
    assert names == [
        "inc_angle",
        "inc_angle_missing",
        "band_1_min",
        "band_1_max",
        "band_1_mean",
        "band_1_std",
        "band_2_min",
        "band_2_max",
        "band_2_mean",
        "band_2_std",
        "band_mean_diff",
    ]
    m1 = 1000 / n
    std1 = np.std(np.asarray(a1, np.float32).astype(np.float64))
    np.testing.assert_allclose(x[0], [40.5, 0, -4624, 1, m1, std1, 2, 2, 2, 0, m1 - 2], rtol=1e-6)
    assert np.isnan(x[1, 0]) and x[1, 1] == 1  # "na": NaN for LightGBM, and flagged
    np.testing.assert_allclose(x[1, 2:], [2, 2, 2, 0, 2, 2, 2, 0, 0])
    # in the order of the ids asked for; an id the data does not hold is one line
    xs, _ = scalars_for(cfg, "test", ["b", "a"])
    np.testing.assert_allclose(xs[:, 2], [2, -4624])
    with pytest.raises(PipelineError, match=r"the train data has no row for id 'zz' \(1 ids missing\)"):
        scalars_for(cfg, "train", ["a", "zz"])


def test_pixel_and_folder_scalars_are_channel_mean_and_std(sk_digits_dir, make_config):
    grey = Table(
        ids=np.array(["1", "2"], dtype=object),
        images=np.array([[[[0, 2], [4, 6]]], [[[5, 5], [5, 5]]]], np.uint8),
        class_names=["0", "1"],
    )
    x, names = table_scalars(grey, "pixel_csv")
    assert names == ["c0_mean", "c0_std"]
    np.testing.assert_allclose(x, [[3, np.sqrt(5)], [5, 0]])
    rgb = Table(
        ids=np.array(["a"], dtype=object),
        images=np.stack([np.full((3, 3), v, np.uint8) for v in (10, 20, 30)])[None],
        class_names=["x"],
    )
    x, names = table_scalars(rgb, "image_folder")
    assert names == ["c0_mean", "c0_std", "c1_mean", "c1_std", "c2_mean", "c2_std"]
    np.testing.assert_allclose(x, [[10, 0, 20, 0, 30, 0]])
    cfg = load_config(make_config(sk_digits_dir, "pixel_csv"))
    x, _ = scalars_for(cfg, "train", ["3", "1"])
    raw = pd.read_csv(sk_digits_dir / "train.csv").drop(columns="label").to_numpy(float)
    np.testing.assert_allclose(x, np.stack([raw[[2, 0]].mean(1), raw[[2, 0]].std(1)], 1))


# ---- gbm ----------------------------------------------------------------------------------------


def gbm_data(seed=0, n=240, k=2):
    """Two members of signal; a scalar feature that holds more (the label's own noise-free driver)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    y = (z > 0).astype(int) if k == 2 else np.digitize(z, [-0.5, 0.5])
    folds = np.arange(n) % 4
    p = []
    for s in (0.8, 1.2):
        logits = np.stack([-((z - c) ** 2) for c in np.linspace(-1, 1, k)], 1) * 2 + rng.normal(0, s, (n, k))
        e = np.exp(logits - logits.max(1, keepdims=True))
        p.append(e / e.sum(1, keepdims=True))
    scal = np.stack([z + rng.normal(0, 0.05, n), rng.normal(size=n)], 1)
    return np.stack(p), y, folds, scal


@pytest.mark.parametrize("k", [2, 3])
def test_gbm_rows_sum_to_one_deterministic_and_uses_scalars(k):
    p, y, folds, scal = gbm_data(k=k)
    test, scal_t = p[:, :30], scal[:30]
    details = {}
    oof, tb, w = blend_gbm(
        p,
        test,
        y,
        folds,
        scalars=(scal, scal_t),
        scalar_names=["z", "junk"],
        member_names=["a", "b"],
        gbm={"rounds": 200},
        details=details,
    )
    assert w is None and oof.shape == (len(y), k) and tb.shape == (30, k)
    np.testing.assert_allclose(oof.sum(1), 1)
    np.testing.assert_allclose(tb.sum(1), 1)
    again = blend_gbm(p, test, y, folds, scalars=(scal, scal_t), gbm={"rounds": 200})
    np.testing.assert_array_equal(oof, again[0])
    np.testing.assert_array_equal(tb, again[1])
    want = ["a:logodds", "b:logodds"] if k == 2 else [f"{m}:logp_{c}" for m in "ab" for c in range(k)]
    assert details["feature_names"] == want + ["z", "junk"]
    assert set(details["best_iterations"]) == {0, 1, 2, 3} and 1 <= details["test_rounds"] <= 200
    assert details["test_rounds"] == round(float(np.median(list(details["best_iterations"].values()))))
    best_member = min(logloss(y, m) for m in p)
    assert logloss(y, oof) < best_member  # the scalar feature carries what the members miss
    assert details["importance_gain"]["z"] > details["importance_gain"]["junk"]


def test_gbm_never_trains_on_the_rows_it_predicts(monkeypatch):
    p, y, folds, scal = gbm_data(1)
    x = np.concatenate([stack_features(p), scal], 1)
    fits, preds = [], []
    real_fit, real_predict = ens_mod.gbm_fit, ens_mod.gbm_predict

    def fit(xx, yy, k, s, rounds=None):
        fits.append((xx.copy(), rounds))
        return real_fit(xx, yy, k, s, rounds)

    def predict(booster, xx, rounds, k):
        preds.append(xx.copy())
        return real_predict(booster, xx, rounds, k)

    monkeypatch.setattr(ens_mod, "gbm_fit", fit)
    monkeypatch.setattr(ens_mod, "gbm_predict", predict)
    blend_gbm(p, p[:, :20], y, folds, scalars=(scal, scal[:20]), gbm={"rounds": 50})
    assert len(fits) == 5 and len(preds) == 5
    rows = lambda a: {r.tobytes() for r in a}  # noqa: E731  (continuous features: every row is unique)
    for k in range(4):
        np.testing.assert_array_equal(fits[k][0], x[folds != k])
        np.testing.assert_array_equal(preds[k], x[folds == k])
        assert not rows(fits[k][0]) & rows(preds[k]) and fits[k][1] is None  # early-stopped
    np.testing.assert_array_equal(fits[4][0], x)  # the test model: all rows, a fixed number of rounds
    assert fits[4][1] >= 1


# ---- per-fold test blends: what an ensemble pseudo-label source keeps --------------------------


@pytest.mark.parametrize("method", sorted(ens_mod.BLENDERS))
@pytest.mark.parametrize("k", [2, 3])
def test_fold_k_test_blend_is_the_blender_fitted_without_fold_k(method, k):
    """With fold k's 'test' being the OOF rows themselves, fold k's test blend must give fold k's rows
    exactly the nested OOF blend: the same fitted-on-the-other-folds model, never the all-rows one."""
    p, y, folds, scal = gbm_data(k=k)
    fold_tests = {f: p.copy() for f in range(4)}
    details = {}
    oof, _, _ = ens_mod.build_blender(method)(
        p,
        p,
        y,
        folds,
        details=details,
        fold_tests=fold_tests,
        metric="logloss",
        scalars=(scal, scal),
        gbm={"rounds": 60},
    )
    assert set(details["fold_test"]) == {0, 1, 2, 3}
    for f, blend in details["fold_test"].items():
        assert blend.shape == (len(y), k)
        np.testing.assert_allclose(blend.sum(1), 1, atol=1e-9)
        np.testing.assert_allclose(blend[folds == f], oof[folds == f], atol=1e-12)
    if method in ("stack", "gbm"):  # models of real-valued parameters differ by fold: fold 0's blend of fold 1's
        # rows is not fold 1's (weights here sit at a corner, and hillclimb's pick counts may agree across folds)
        assert not np.allclose(details["fold_test"][0][folds == 1], oof[folds == 1])


# ---- the stage: bad settings, and runs through the CLI -----------------------------------------

BAD = [
    ({"method": "hillclimbing"}, "method: unknown blender 'hillclimbing'; did you mean hillclimb?"),
    ({"iterations": 0}, "iterations: Input should be greater than or equal to 1"),
    ({"iterations": "many"}, "iterations: Input should be a valid integer"),
    ({"iterations": True}, "iterations: got True; expected a number, not true/false"),
    ({"gbm": {"num_leafs": 7}}, "unknown key 'gbm.num_leafs'; did you mean gbm.num_leaves"),
    ({"gbm": {"learning_rate": 0}}, "gbm.learning_rate: Input should be greater than 0"),
    ({"gbm": {"valid_share": 1.0}}, "gbm.valid_share: Input should be less than 1"),
    ({"gbm": 5}, "gbm: Input should be a valid dictionary or instance of GbmConfig"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_settings_exit_2_naming_the_key(base_cfg, capsys, change, message):
    fake_member("a", 1), fake_member("b", 2)
    ens_file(base_cfg, ["runs/comp/a", "runs/comp/b"], **{"method": "gbm", **change})
    before = sorted(Path(".").rglob("*"))
    err = cli_error(capsys, "ensemble", "blend.yaml")
    assert err.startswith("error: blend.yaml: ") and message in err, err
    assert sorted(Path(".").rglob("*")) == before  # nothing created


@pytest.mark.parametrize(
    "override,message",
    [
        ("iterations=-3", "iterations: Input should be greater than or equal to 1"),
        ("gbm.rounds=0", "gbm.rounds: Input should be greater than or equal to 1"),
        ("gbm.num_leafs=3", "unknown key 'gbm.num_leafs'; did you mean gbm.num_leaves"),
    ],
)
def test_bad_overrides_exit_2(base_cfg, capsys, override, message):
    fake_member("a", 1), fake_member("b", 2)
    ens_file(base_cfg, ["runs/comp/a", "runs/comp/b"])
    err = cli_error(capsys, "ensemble", "blend.yaml", "method=hillclimb", override)
    assert message in err, err
    assert not Path("runs/comp/blend").exists() and not Path("submissions").exists()


def iceberg_member(name, seed, train, test, quality):
    """A run dir of fabricated predictions for the iceberg data's real ids (3 folds)."""
    rng = np.random.default_rng(seed)
    run = Path("runs/comp") / name
    run.mkdir(parents=True)

    def frame(ids, y):
        p1 = np.clip(
            quality * (y if y is not None else rng.integers(0, 2, len(ids)))
            + (1 - quality) * rng.uniform(size=len(ids)),
            0.01,
            0.99,
        )
        return pd.DataFrame({"id": ids, "p_ship": 1 - p1, "p_iceberg": p1})

    oof = frame(train.ids, train.labels)
    oof.insert(1, "fold", np.arange(len(train)) % 3)
    oof.insert(2, "target", train.labels)
    oof.iloc[::-1].to_csv(run / "oof.csv", index=False)  # another row order than the data's
    frame(test.ids, None).to_csv(run / "test_pred.csv", index=False)
    (run / "predict.json").write_text(json.dumps({"oof": "oof.csv"}))


def test_gbm_and_hillclimb_on_statoil_through_the_cli(make_config, iceberg_dir, capsys):
    cfg_path = make_config(iceberg_dir, "statoil_json", name="base", metric="logloss")
    cfg = load_config(cfg_path)
    train, test = read_table(cfg, "train"), read_table(cfg, "test")
    iceberg_member("a", 1, train, test, 0.5), iceberg_member("b", 2, train, test, 0.3)
    write_yaml(
        Path("blend.yaml"),
        {
            "competition": "comp",
            "config": str(cfg_path),
            "members": ["runs/comp/a", "runs/comp/b"],
            "method": "gbm",
            "gbm": {"rounds": 100},
        },
    )
    capsys.readouterr()
    assert run_cli("ensemble", "blend.yaml") == 0
    out = capsys.readouterr().out
    assert (
        "blend  blend (gbm) (fitted on the other folds: nested): OOF logloss" in out and "best member a: logloss" in out
    )
    assert "gbm: best rounds per fold [" in out and "inc_angle_missing" in out
    info = json.loads(Path("runs/comp/blend/ensemble.json").read_text())
    assert info["method"] == "gbm" and info["oof_nested"] and info["best_member"]["name"] == "a"
    d = info["details"]
    assert d["feature_names"][:2] == ["a:logodds", "b:logodds"] and "band_mean_diff" in d["feature_names"]
    assert d["feature_names"][2:4] == ["inc_angle", "inc_angle_missing"] and set(d["best_iterations"]) == {
        "0",
        "1",
        "2",
    }
    assert d["settings"]["rounds"] == 100
    assert run_cli("ensemble", "blend.yaml", "method=hillclimb", "name=climb") == 0
    out = capsys.readouterr().out
    assert "blend  climb (hillclimb) (fitted on the other folds: nested)" in out and "chosen: a " in out
    assert "in-sample logloss" in out and "(selected and scored on all rows: optimistic), nested" in out
    d = json.loads(Path("runs/comp/climb/ensemble.json").read_text())["details"]
    assert set(d["fold_weights"]) == {"0", "1", "2"} and d["in_sample_score"] > 0


def test_second_stage_on_two_real_runs(digits_config, capsys):
    """End to end: two tiny digit experiments trained and predicted, then hillclimb and gbm over them."""
    paths = [
        digits_config(name=n, train={"epochs": 1, "seed": s, "max_steps_per_epoch": 3}, predict={"tta": ["identity"]})
        for n, s in (("a", 0), ("b", 7))
    ]
    assert run_cli("fold", paths[0]) == 0
    for p in paths:
        assert run_cli("train", p) == 0 and run_cli("predict", p) == 0
    write_yaml(Path("blend.yaml"), {"competition": "comp", "config": str(paths[0]), "members": [str(p) for p in paths]})
    capsys.readouterr()
    assert run_cli("ensemble", "blend.yaml", "method=hillclimb", "name=climb") == 0
    assert run_cli("ensemble", "blend.yaml", "method=gbm", "gbm.rounds=60", "name=gbm") == 0
    out = capsys.readouterr().out
    assert "blend  climb (hillclimb)" in out and "blend  gbm (gbm)" in out and "OOF accuracy" in out
    for name in ("climb", "gbm"):
        info = json.loads(Path(f"runs/comp/{name}/ensemble.json").read_text())
        oof = pd.read_csv(f"runs/comp/{name}/oof.csv", dtype={"id": str})
        assert info["metric"] == "accuracy" and info["oof_nested"] and len(oof) == 600
        np.testing.assert_allclose(oof.filter(like="p_").sum(1), 1, atol=1e-6)
        assert info["oof_score"] == pytest.approx(
            score("accuracy", oof["target"].to_numpy(), oof.filter(like="p_").to_numpy()), abs=1e-6
        )
    gbm = json.loads(Path("runs/comp/gbm/ensemble.json").read_text())["details"]
    assert gbm["feature_names"][-2:] == ["c0_mean", "c0_std"] and len(gbm["feature_names"]) == 2 * 10 + 2
    assert (
        len(list(Path("submissions").glob("comp-climb-*.csv"))) == 1
        and len(list(Path("submissions").glob("comp-gbm-*.csv"))) == 1
    )
    # every member kept its folds' own test predictions, so each blend keeps its own: fold k's members'
    # raw fold-k predictions, blended by the weights selected on the other folds' raw OOF
    info = json.loads(Path("runs/comp/climb/ensemble.json").read_text())
    assert info["test_pred_folds"] == [f"test_pred_fold{k}.csv" for k in range(3)]
    runs = [Path(f"runs/comp/{n}") for n in ("a", "b")]
    raw_oof = np.stack(
        [pd.read_csv(r / "oof.csv", dtype={"id": str}).sort_values("id").filter(like="p_").to_numpy() for r in runs]
    )
    oof = pd.read_csv(runs[0] / "oof.csv", dtype={"id": str}).sort_values("id")
    for k in range(3):
        tr = oof["fold"].to_numpy() != k
        w = hillclimb_weights(raw_oof[:, tr], oof["target"].to_numpy()[tr], "accuracy", 50)
        got = read_predictions(Path(f"runs/comp/climb/test_pred_fold{k}.csv"), "test").sort_values("id")
        fold_k = [read_predictions(r / f"test_pred_fold{k}.csv", "test").sort_values("id") for r in runs]
        want = np.tensordot(w, np.stack([f.filter(like="p_").to_numpy() for f in fold_k]), 1)
        np.testing.assert_allclose(got.filter(like="p_").to_numpy(), want / want.sum(1, keepdims=True), atol=1e-6)
