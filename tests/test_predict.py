"""Predict stage on tiny real runs (scikit-learn's 8x8 digits, simple_cnn): averages, TTA OOF, temperature,
submission."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli

from pipeline.config.load import load_config
from pipeline.core.errors import PipelineError
from pipeline.data.folds import run_fold
from pipeline.data.formats import read_table
from pipeline.evaluate.evaluator import evaluate
from pipeline.models.backbones import load_checkpoint
from pipeline.models.inference import predict_logits
from pipeline.predict.predictor import predict_test, submit_experiment
from pipeline.predict.submission import validate_submission
from pipeline.runs.predictions import load_temperature
from pipeline.tasks.calibration import apply_temperature
from pipeline.tasks.classification import softmax
from pipeline.train.cv import train_cv

quiet = lambda *a: None  # noqa: E731
RUN = Path("runs/comp/exp")


def trained(path, overrides=()):
    cfg = load_config(path, list(overrides))
    run_fold(cfg)
    train_cv(cfg)
    return cfg


def fold_logits(cfg, images, dirs=None):
    dirs = dirs or [RUN / f"fold_{k}" for k in range(cfg.folds.n_splits)]
    out = []
    for d in dirs:
        model, _ = load_checkpoint(d / "best.safetensors")
        out.append(predict_logits(model, images, None, 64, torch.device("cpu")))
    return out


def test_predict_end_to_end_submission_validates(digits_config, capsys):
    path = digits_config(train={"epochs": 1})
    trained(path)
    assert run_cli("predict", path) == 0
    out = capsys.readouterr().out
    assert "predict exp: 3 model(s) x 1 TTA transform(s) (identity) on 100 test images" in out
    cfg = load_config(path)
    test = read_table(cfg, "test")
    pred = pd.read_csv(RUN / "test_pred.csv", dtype={"id": str})
    assert list(pred.columns) == ["id"] + [f"p_{c}" for c in test.class_names]
    assert pred["id"].tolist() == list(test.ids)
    # mean of the fold models' probabilities, by hand
    expect = np.mean([softmax(lg) for lg in fold_logits(cfg, test.images)], 0)
    np.testing.assert_allclose(pred.filter(like="p_").to_numpy(), expect, atol=1e-6)
    assert (RUN / "config.predict.yaml").is_file() and (RUN / "config.predict.hash").is_file()
    subs = sorted(Path("submissions").glob("comp-exp-*.csv"))
    assert len(subs) == 1 and f"wrote {subs[0]}" in out
    assert validate_submission(cfg, subs[0]) == []
    sub = pd.read_csv(subs[0])
    assert list(sub.columns) == ["ImageId", "Label"] and sub["Label"].tolist() == expect.argmax(1).tolist()
    meta = json.loads(subs[0].with_suffix(".json").read_text())
    assert meta["experiments"] == ["exp"] and meta["weights"] == [1.0] and meta["metric"] == "accuracy"
    assert set(meta["config_hashes"]["exp"]) == {"config", "train", "predict"} and 0 <= meta["oof_score"] <= 1
    assert run_cli("validate-submission", path, subs[0]) == 0
    assert "valid comp submission (100 rows)" in capsys.readouterr().out
    # predicting again writes a new submission beside the old one
    assert run_cli("predict", path) == 0
    assert len(list(Path("submissions").glob("comp-exp-*.csv"))) == 2


def test_logit_average_and_tta(digits_config):
    path = digits_config(train={"epochs": 1})
    cfg = trained(path, ["predict.average=logit", "predict.tta=[identity,hflip]"])
    evaluate(cfg, report=False)  # with TTA on, evaluate makes the TTA OOF that predict scores and calibrates by
    df = predict_test(cfg)
    test = read_table(cfg, "test")
    flipped = test.images[..., ::-1].copy()
    logits = fold_logits(cfg, test.images) + fold_logits(cfg, flipped)
    np.testing.assert_allclose(df.filter(like="p_").to_numpy(), softmax(np.mean(logits, 0)), atol=1e-6)
    assert json.loads((RUN / "predict.json").read_text())["tta"] == ["identity", "hflip"]


def test_tta_oof_uses_each_fold_model_on_its_own_rows(digits_config, capsys):
    from pipeline.data.folds import load_folds
    from pipeline.predict.predictor import oof_with_tta
    from pipeline.tasks.calibration import calibrate

    path = digits_config(train={"epochs": 1})  # predict.tta_oof is on by default
    cfg = trained(path)
    table = read_table(cfg, "train")
    fold_of = load_folds(cfg, table)
    oof = pd.read_csv(RUN / "oof.csv", dtype={"id": str})
    # with identity TTA it reproduces training's OOF predictions exactly (right model for each fold)
    same = oof_with_tta(cfg, table, fold_of)
    pd.testing.assert_frame_equal(same[["id", "fold", "target"]], oof[["id", "fold", "target"]])
    np.testing.assert_allclose(same.filter(like="p_").to_numpy(), oof.filter(like="p_").to_numpy(), atol=1e-6)

    # with TTA on, evaluate writes oof_tta.csv (each fold's model on its rows and their mirror) and
    # fits the calibration on it, the kind of prediction the submission gets; predict scores it
    cfg = load_config(path, ["predict.tta=[identity,hflip]"])
    evaluate(cfg, report=False)
    tta = pd.read_csv(RUN / "oof_tta.csv", dtype={"id": str})
    assert list(tta.columns) == list(oof.columns)
    pd.testing.assert_frame_equal(tta[["id", "fold", "target"]], oof[["id", "fold", "target"]])
    flipped = [softmax(lg) for lg in fold_logits(cfg, np.ascontiguousarray(table.images[..., ::-1]))]
    plain = [softmax(lg) for lg in fold_logits(cfg, table.images)]
    want = np.choose(fold_of[:, None], [(p + f) / 2 for p, f in zip(plain, flipped)])
    np.testing.assert_allclose(tta.filter(like="p_").to_numpy(), want, atol=1e-6)
    m = json.loads((RUN / "metrics.json").read_text())
    assert (
        m["oof"].endswith("oof_tta.csv")
        and m["tta"] == ["identity", "hflip"]
        and m["oof_without_tta"]["file"] == "oof.csv"
    )
    # a TTA that raises the raw OOF log-loss is flagged in evaluate's summary (a mirrored digit is no digit)
    from pipeline.evaluate.evaluator import summary_table

    for without, flagged in ((m["logloss"] - 0.01, True), (m["logloss"] + 0.01, False)):
        text = summary_table({**m, "oof_without_tta": {**m["oof_without_tta"], "logloss": without}})
        assert ("warning: the TTA raises the OOF log-loss" in text) == flagged, text
    summary, _ = calibrate(tta["target"].to_numpy(), tta.filter(like="p_").to_numpy(), tta["fold"].to_numpy())
    cal = json.loads((RUN / "calibration.json").read_text())
    assert cal["temperature"] == pytest.approx(summary["temperature"], rel=1e-6)
    capsys.readouterr()
    predict_test(cfg)
    assert json.loads((RUN / "predict.json").read_text())["oof"] == "oof_tta.csv"
    assert "OOF (oof_tta.csv" in capsys.readouterr().out


def test_predict_with_tta_needs_a_fresh_evaluate(digits_config, capsys):
    """The TTA OOF and its calibration come from evaluate: predict without it, or after the TTA changed, is refused."""
    path = digits_config(train={"epochs": 1}, predict={"tta": ["identity", "hflip"]})
    trained(path)
    assert run_cli("predict", path) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: runs/comp/exp/oof_tta.csv: not found; run `pipeline evaluate {path}` first: it makes the OOF "
        f"with the TTA ['identity', 'hflip'] and fits the calibration on it"
    )
    assert not (RUN / "test_pred.csv").exists() and not list(Path("submissions").glob("*.csv"))
    assert run_cli("evaluate", path) == 0
    assert run_cli("predict", path, "predict.tta=[identity,vflip]") == 2
    assert "oof_tta.csv: stale; run `pipeline evaluate" in capsys.readouterr().err
    assert not (RUN / "test_pred.csv").exists()
    # tta_oof false stays allowed: the plain OOF, with a warning that the calibration did not see the TTA
    assert run_cli("predict", path, "predict.tta_oof=false") == 0
    assert "warning: predict.tta_oof is false" in capsys.readouterr().out
    assert json.loads((RUN / "predict.json").read_text())["oof"] == "oof.csv"


def test_temperature_from_calibration_json(digits_config, monkeypatch):
    """Prediction files stay raw; a kept temperature is applied when they are read scaled: to the
    submission's probabilities and to predict.json's OOF scores."""
    import pipeline.predict.submission as submission
    from pipeline.core.metrics import logloss
    from pipeline.predict.predictor import clip_probs
    from pipeline.runs.predictions import read_predictions

    path = digits_config(train={"epochs": 1}, predict={"clip": [0.01, 0.99]})
    cfg = trained(path)
    plain = predict_test(cfg).filter(like="p_").to_numpy()
    (RUN / "calibration.json").write_text(json.dumps({"temperature": 0.5, "kept": False}))
    np.testing.assert_allclose(predict_test(cfg).filter(like="p_").to_numpy(), plain, atol=1e-7)
    assert json.loads((RUN / "predict.json").read_text())["temperature"] is None
    (RUN / "calibration.json").write_text(json.dumps({"temperature": 0.5, "kept": True}))
    np.testing.assert_allclose(predict_test(cfg).filter(like="p_").to_numpy(), plain, atol=1e-7)  # raw
    file_probs = pd.read_csv(RUN / "test_pred.csv", dtype={"id": str}).filter(like="p_").to_numpy()
    np.testing.assert_allclose(file_probs, plain, atol=1e-7)
    info = json.loads((RUN / "predict.json").read_text())
    assert info["temperature"] == 0.5
    sharp = read_predictions(RUN / "test_pred.csv", "test", scaled=True).filter(like="p_").to_numpy()
    np.testing.assert_allclose(sharp, apply_temperature(plain, 0.5), atol=1e-6)
    assert not np.allclose(sharp, plain, atol=1e-3)
    oof = pd.read_csv(RUN / "oof.csv", dtype={"id": str})
    assert info["oof_logloss"] == pytest.approx(
        logloss(oof["target"].to_numpy(), apply_temperature(oof.filter(like="p_").to_numpy(), 0.5))
    )
    # T = 0.5 squares and renormalises the probabilities
    np.testing.assert_allclose(apply_temperature(np.array([[0.25, 0.75]]), 0.5), [[0.1, 0.9]])
    seen = []
    real = submission.write_submission

    def spy(cfg, ids, probs, *a, **kw):
        seen.append(np.asarray(probs))
        return real(cfg, ids, probs, *a, **kw)

    monkeypatch.setattr(submission, "write_submission", spy)
    sub = submit_experiment(cfg)
    assert len(seen) == 1
    np.testing.assert_allclose(seen[0], clip_probs(apply_temperature(plain, 0.5), (0.01, 0.99)), atol=1e-6)
    meta = json.loads(sub.with_suffix(".json").read_text())
    assert meta["clip"] == [0.01, 0.99] and meta["temperature"] == 0.5
    (RUN / "calibration.json").write_text(json.dumps({"temperature": -1, "kept": True}))
    with pytest.raises(PipelineError, match=r"calibration.json: temperature is -1; expected a positive number"):
        load_temperature(RUN)
    (RUN / "calibration.json").write_text("{oops")
    with pytest.raises(PipelineError, match=r"calibration.json: expected JSON \{\"temperature\": T"):
        load_temperature(RUN)


def test_seeds_and_refit_models(digits_config):
    path = digits_config(train={"epochs": 1, "seeds": [1, 2]})
    cfg = trained(path)
    df = predict_test(cfg)
    info = json.loads((RUN / "predict.json").read_text())
    assert info["models"] == [f"fold_{k}_seed{s}" for k in range(3) for s in (1, 2)]
    # each fold's own test predictions (its seeds averaged) beside test_pred.csv, which is their mean
    from pipeline.runs.predictions import read_predictions

    test = read_table(cfg, "test")
    assert info["test_pred_folds"] == [f"test_pred_fold{k}.csv" for k in range(3)]
    per_fold = [
        read_predictions(RUN / f"test_pred_fold{k}.csv", "test", class_names=test.class_names) for k in range(3)
    ]
    for k, f in enumerate(per_fold):
        assert f["id"].tolist() == list(test.ids)
        seeds = [RUN / f"fold_{k}_seed{s}" for s in (1, 2)]
        np.testing.assert_allclose(
            f.filter(like="p_").to_numpy(),
            np.mean([softmax(z) for z in fold_logits(cfg, test.images, seeds)], 0),
            atol=1e-6,
        )
    np.testing.assert_allclose(
        np.mean([f.filter(like="p_").to_numpy() for f in per_fold], 0), df.filter(like="p_").to_numpy(), atol=1e-7
    )
    assert not np.allclose(
        per_fold[0].filter(like="p_").to_numpy(), per_fold[1].filter(like="p_").to_numpy(), atol=1e-4
    )
    cfg = trained(path, ["train.seeds=null", "train.refit=true"])
    df = predict_test(cfg)
    info = json.loads((RUN / "predict.json").read_text())
    assert info["models"] == [f"fold_{k}" for k in range(3)] and info["refit_models"] == ["refit"]
    test = read_table(cfg, "test")
    # the fold models' predictions stay test_pred.csv; the refit model's are kept beside them
    folds = np.mean([softmax(z) for z in fold_logits(cfg, test.images)], axis=0)
    np.testing.assert_allclose(df.filter(like="p_").to_numpy(), folds, atol=1e-6)
    refit = pd.read_csv(RUN / "test_pred_refit.csv", dtype={"id": str})
    np.testing.assert_allclose(
        refit.filter(like="p_").to_numpy(), softmax(fold_logits(cfg, test.images, [RUN / "refit"])[0]), atol=1e-6
    )
    sub = submit_experiment(cfg)
    refit_sub = [p for p in Path("submissions").glob("comp-exp-refit-*.csv")]
    assert len(refit_sub) == 1 and validate_submission(cfg, refit_sub[0]) == []
    assert json.loads(refit_sub[0].with_suffix(".json").read_text())["models"] == ["refit"]
    assert json.loads(sub.with_suffix(".json").read_text())["models"] == info["models"]


def test_predict_refuses_missing_or_stale_models(digits_config, capsys):
    path = digits_config(train={"epochs": 1})
    cfg = load_config(path)
    with pytest.raises(PipelineError, match=r"runs/comp/exp: no trained models; run `pipeline train .*exp.yaml` first"):
        predict_test(cfg)
    trained(path)
    with pytest.raises(
        PipelineError,
        match=r"config.train.yaml: models were trained under another config "
        r"\(train hash \w+, this config \w+\); rerun `pipeline train",
    ):
        predict_test(load_config(path, ["train.lr=0.1"]))
    (RUN / "fold_1" / "done.json").unlink()
    with pytest.raises(PipelineError, match=r"runs/comp/exp/fold_1: model not finished"):
        predict_test(cfg)


def test_bad_tta_name_fails_before_any_work(digits_config, capsys):
    path = digits_config(train={"epochs": 1})
    trained(path)
    assert run_cli("predict", path, "predict.tta=[identity,spin]") == 2
    err = capsys.readouterr().err
    assert (
        err.strip() == f"error: {path}: predict.tta: unknown TTA 'spin'; "
        "known: identity, hflip, vflip, rot90, rot180, rot270, dihedral, fivecrop, tencrop, rotate<N>, zoom<N>"
    )
    assert run_cli("predict", path, "predict.tta=[identity,zoom60]") == 2  # a view family out of its range
    assert capsys.readouterr().err.strip() == f"error: {path}: predict.tta: 'zoom60': zoom<N> takes N from 1 to 50"
    assert not (RUN / "test_pred.csv").exists() and not Path("submissions").exists()
    assert run_cli("predict", path, "predict.clip=[0.9,0.1]") == 2
    assert "predict.clip: got [0.9, 0.1]; expected [lo, hi] with 0 <= lo < hi <= 1" in capsys.readouterr().err


def test_registered_tta_end_to_end(digits_config, request):
    """A TTA transform is one TTA.register line: the config accepts its name and predict averages it in."""
    from pipeline.config.registries import TTA
    from pipeline.models.tta import TtaTransform

    path = digits_config(train={"epochs": 1})
    with pytest.raises(PipelineError, match=r"predict.tta: unknown TTA 'transpose'"):
        load_config(path, ["predict.tta=[identity,transpose]"])
    TTA.register(
        "transpose", lambda s, m: [TtaTransform("transpose", lambda x: x.transpose(-2, -1), ("custom", "transpose"))]
    )
    request.addfinalizer(lambda: TTA.unregister("transpose"))
    cfg = trained(path, ["predict.tta=[identity,transpose]"])
    evaluate(cfg, report=False)
    df = predict_test(cfg)
    test = read_table(cfg, "test")
    plain = [softmax(lg) for lg in fold_logits(cfg, test.images)]
    transposed = [softmax(lg) for lg in fold_logits(cfg, np.ascontiguousarray(test.images.transpose(0, 1, 3, 2)))]
    np.testing.assert_allclose(
        df.filter(like="p_").to_numpy(), (np.mean(plain, 0) + np.mean(transposed, 0)) / 2, atol=1e-6
    )
    assert json.loads((RUN / "predict.json").read_text())["tta"] == ["identity", "transpose"]


@pytest.mark.parametrize("views_help", [False, True])
def test_auto_tta_keeps_the_affine_views_only_when_they_lower_the_oof_logloss(
    digits_config, monkeypatch, capsys, views_help
):
    """Evaluate judges the affine views on the OOF; the calibration and the submission use what it kept."""
    import pipeline.predict.predictor as predict_mod
    from pipeline.models.tta import build_tta
    from pipeline.models.tta import predict_tta as tta_mean

    path = digits_config(train={"epochs": 1}, augment=[{"name": "Affine", "rotate": [-20, 20], "p": 0.5}])
    cfg = trained(path)
    assert predict_mod.resolve_tta(cfg) == ["identity", "rotate10"]
    real = predict_mod.oof_with_tta

    def judged(cfg, table, fold_of, names=None):
        """The views' OOF made perfect (they help) or uniform (they do not): either way a clear verdict."""
        frame = real(cfg, table, fold_of, names)
        if names and "rotate10" in names:
            cols = [c for c in frame.columns if c.startswith("p_")]
            frame[cols] = (
                np.eye(len(cols))[frame["target"].to_numpy()] * 0.98 + 0.02 / len(cols) if views_help else 1 / len(cols)
            )
        return frame

    monkeypatch.setattr(predict_mod, "oof_with_tta", judged)
    # a budgeted run's plan writes the auto TTA out as a list: still auto, still judged
    from pipeline.config.auto import tta_auto

    assert tta_auto(cfg) and tta_auto(
        cfg.model_copy(
            update={
                "predict": cfg.predict.model_copy(update={"tta": ["identity", "rotate10"]}),
                "plan": {"values": {"predict.tta": ["identity", "rotate10"]}},
            }
        )
    )
    assert not tta_auto(load_config(path, ["predict.tta=[identity,rotate10]"]))
    m = evaluate(cfg, report=False)
    kept = ["identity", "rotate10"] if views_help else ["identity"]
    assert m["tta_views"]["views"] == ["rotate10"] and m["tta_views"]["kept"] is views_help and m["tta"] == kept
    assert (m["tta_views"]["logloss_with"] < m["tta_views"]["logloss_without"]) is views_help
    out = capsys.readouterr().out
    assert ("without -> kept" in out) is views_help and ("dropped (predict uses ['identity'])" in out) is not views_help
    oof, oof_tta = (pd.read_csv(RUN / f, dtype={"id": str}) for f in ("oof.csv", "oof_tta.csv"))
    if not views_help:  # the calibration is fitted on the OOF the submission is made like: the plain one here
        np.testing.assert_allclose(oof_tta.filter(like="p_").to_numpy(), oof.filter(like="p_").to_numpy(), atol=1e-6)
    predict_test(cfg)
    info = json.loads((RUN / "predict.json").read_text())
    assert info["tta"] == [t.name for t in build_tta(kept, (8, 8))]
    test = read_table(cfg, "test")
    models = [load_checkpoint(RUN / f"fold_{k}" / "best.safetensors")[0] for k in range(cfg.folds.n_splits)]
    want = np.mean([tta_mean(mdl, test.images, None, build_tta(kept, (8, 8))) for mdl in models], axis=0)
    got = pd.read_csv(RUN / "test_pred.csv", dtype={"id": str}).filter(like="p_").to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert ("dropped by evaluate" in capsys.readouterr().out) is not views_help


def test_judging_the_views_predicts_each_view_once(digits_config, monkeypatch, capsys):
    """With flips and affine views, evaluate averages both TTAs (with and without the views) from one
    pass per view, and each equals its own ``oof_with_tta``; a plan's list is still logged as auto."""
    import pipeline.models.inference as inference
    from pipeline.config.auto import resolve_tta
    from pipeline.predict.predictor import oof_with_tta, oof_with_tta_subsets

    path = digits_config(
        train={"epochs": 1},
        augment=[{"name": "HorizontalFlip", "p": 0.5}, {"name": "Affine", "rotate": [-20, 20], "p": 0.5}],
    )
    cfg = trained(path)
    tta = ["identity", "hflip", "rotate10"]
    assert resolve_tta(cfg) == tta
    real, calls = inference.predict_logits, []

    def counted(*a, transform=None, **k):
        calls.append(transform.key)
        return real(*a, transform=transform, **k)

    monkeypatch.setattr(inference, "predict_logits", counted)
    m = evaluate(cfg, report=False)
    assert m["tta_views"]["views"] == ["rotate10"]
    assert len(calls) == 4 * cfg.folds.n_splits and len(set(calls)) == 4  # identity, hflip, rotate+10, rotate-10
    table = read_table(cfg, "train")
    monkeypatch.setattr(inference, "predict_logits", real)
    oof = pd.read_csv(RUN / "oof.csv", dtype={"id": str})
    fold_of = oof.set_index("id").loc[list(table.ids), "fold"].to_numpy()
    both = oof_with_tta_subsets(cfg, table, fold_of, [tta, ["identity", "hflip"]])
    for frame, names in zip(both, [tta, ["identity", "hflip"]]):
        alone = oof_with_tta(cfg, table, fold_of, names)
        np.testing.assert_allclose(frame.filter(like="p_").to_numpy(), alone.filter(like="p_").to_numpy(), atol=1e-6)
    kept = m["tta"]
    planned_cfg = cfg.model_copy(
        update={"predict": cfg.predict.model_copy(update={"tta": tta}), "plan": {"values": {"predict.tta": tta}}}
    )
    evaluate(planned_cfg, report=False)
    capsys.readouterr()
    predict_test(planned_cfg)
    assert f"tta auto -> {kept} from the augment list and the plan" in capsys.readouterr().out
