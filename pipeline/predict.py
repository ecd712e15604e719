"""Predict stage: every fold model (and seed) predicts the test set, with test-time augmentation.

Artifacts in the run folder (layout: pipeline/runs.py; files: pipeline/predictions.py):
  test_pred.csv          id,p_<class>...  mean over every fold model and TTA transform (of probabilities
                         or of logits: ``predict.average``)
  test_pred_fold<k>.csv  the same from fold k's model(s) alone (averaged over its seeds): with
                         probability averaging, test_pred.csv is the mean of these
  oof_tta.csv            with ``predict.tta_oof``: id,fold,target,p_<class>... like oof.csv, each fold's
                         model on its own validation rows with the same TTA (blends compare like with like)
  predict.json           how test_pred.csv was made: models, tta, average, the temperature the submission
                         used, which OOF file matches it and that OOF's scores (the ensemble stage reads it)
  config.predict.yaml / .hash   written last: the stage is done

  test_pred_refit.csv    with ``train.refit``: the same from the model(s) refit on every row, kept beside
                         the fold models' (it has no OOF of its own; the folds' CV is its estimate)

Every prediction file holds RAW probabilities. A temperature the evaluate stage kept
(``calibration.json``) is applied when reading them (``read_predictions(..., scaled=True)``): to the
submission files and to the OOF scores in predict.json. ``predict.clip`` applies to the submission only.
"""
from __future__ import annotations

import logging
import json
from pathlib import Path

import numpy as np
import pandas as pd

from .calibration import load_temperature
from .config import Config
from .errors import PipelineError
from .io import atomic_write_json
from .metrics import logloss, score
from .predictions import pred_frame, probs_of, read_predictions, write_predictions
from .runs import JobDir, RunDir

log = logging.getLogger(__name__)


# ---- clipping and scores -------------------------------------------------------------------

def check_clip(clip, where: str = "predict.clip") -> None:
    if clip is not None and not 0 <= clip[0] < clip[1] <= 1:
        raise PipelineError(f"{where}: got {list(clip)}; expected [lo, hi] with 0 <= lo < hi <= 1, e.g. [0.001, 0.999]")


def clip_probs(probs: np.ndarray, clip) -> np.ndarray:
    """Clip every probability into [lo, hi] and renormalise rows (a no-op renormalisation for 2 classes and hi = 1 - lo)."""
    if clip is None:
        return probs
    p = np.clip(probs, clip[0], clip[1])
    return p / p.sum(1, keepdims=True)


def fmt_scores(metric: str, value: float, ll: float) -> str:
    """'accuracy 0.9500, logloss 0.1700' (log-loss once when it is the metric)."""
    return f"logloss {ll:.4f}" if metric == "logloss" else f"{metric} {value:.4f}, logloss {ll:.4f}"


def oof_scores(metric: str, y: np.ndarray, probs: np.ndarray, clip=None) -> dict:
    out = {"metric": metric, "oof_score": score(metric, y, probs), "oof_logloss": logloss(y, probs)}
    if clip is not None:
        out["oof_logloss_clipped"] = logloss(y, clip_probs(probs, clip))
    return out


# ---- the models ------------------------------------------------------------------------

class _Models:
    """Loads checkpoints one at a time (keeps memory flat) and predicts with TTA."""

    def __init__(self, cfg: Config, run: RunDir):
        from .device import resolve_device

        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.channels_last = cfg.train.channels_last and self.device.type != "mps"
        self.precision = cfg.train.precision
        if self.precision == "auto":  # the run's resolved choice (train writes it)
            self.precision = run.read_precision() or "fp32"

    def transforms(self, model: JobDir, image_size):
        from .tta import build_tta, model_input_size

        meta = json.loads(model.best_meta.read_text())
        return build_tta(self.cfg.predict.tta, image_size, model_input_size(meta))

    def predict(self, model_dir: JobDir, images, features, table) -> np.ndarray:
        """Mean over TTA transforms for rows ``images`` (which may be a lazy subset of ``table.images``)."""
        from .models import load_checkpoint
        from .tta import predict_tta

        model, meta = load_checkpoint(model_dir.best_weights)
        if list(meta["class_names"]) != list(table.class_names):
            raise PipelineError(f"{model_dir.best_meta}: model classes {meta['class_names']} differ from the data's {list(table.class_names)}; "
                                f"retrain with `pipeline train {self.cfg.path}`")
        if meta["in_chans"] != table.channels:
            raise PipelineError(f"{model_dir.best_meta}: model takes {meta['in_chans']} channels but the images have {table.channels}")
        model.to(self.device)
        if self.channels_last:
            import torch

            model.to(memory_format=torch.channels_last)
        return predict_tta(model, images, features, self.transforms(model_dir, table.image_size), self.cfg.predict.average,
                           self.cfg.train.batch_size * 2, self.device, self.channels_last, self.precision)

    def total(self, dirs: list[JobDir], table) -> np.ndarray:
        """Sum over ``dirs`` of each model's TTA mean (probabilities or logits) on every row of ``table``."""
        acc = None
        for d in dirs:
            p = self.predict(d, table.images, table.features, table)
            acc = p if acc is None else acc + p
        return acc


def _to_probs(avg: np.ndarray, average: str) -> np.ndarray:
    from .inference import softmax

    return softmax(avg) if average == "logit" else avg


def _oof_tta(cfg: Config, run: RunDir, models: _Models) -> pd.DataFrame:
    """Each fold's model(s) on its own validation rows, with the configured TTA."""
    from .fold import load_folds
    from .formats import read_table
    from .inference import Rows

    table = read_table(cfg, "train")
    fold_of = load_folds(cfg, table)
    acc = np.zeros((len(table), table.num_classes))
    for k, group in enumerate(run.models_by_fold()):
        idx = np.flatnonzero(fold_of == k)
        feats = Rows(table.features, idx) if table.features is not None else None
        for d in group:
            acc[idx] += models.predict(d, Rows(table.images, idx), feats, table) / len(group)
    probs = _to_probs(acc, cfg.predict.average)
    log.info(f"OOF with TTA {cfg.predict.tta}: {fmt_scores(cfg.metric, score(cfg.metric, table.labels, probs), logloss(table.labels, probs))}")
    return pred_frame(table.ids, probs, table.class_names, fold=fold_of, target=table.labels)


def _check_tta(cfg: Config, models: _Models, model: JobDir, test) -> list:
    """The TTA transforms (bad names fail before any work), with a warning for crops training never saw."""
    transforms = models.transforms(model, test.image_size)
    crops = [n for n in cfg.predict.tta if n in ("fivecrop", "tencrop")]
    if crops and not any("Crop" in a.get("name", "") for a in cfg.augment):
        log.info(f"warning: predict.tta {crops[0]} feeds the model crops at the images' own scale, but training resized "
             f"whole images (no crop in augment); add e.g. RandomCrop or RandomResizedCrop to the model's input size")
    return transforms


def _write_test_preds(cfg: Config, run: RunDir, models: _Models, by_fold: list[list[JobDir]], test) -> pd.DataFrame:
    """test_pred.csv (every fold model) and test_pred_fold<k>.csv (fold k's own), raw; returns test_pred.csv's frame."""
    average, names = cfg.predict.average, test.class_names
    totals = [models.total(group, test) for group in by_fold]
    n_models = sum(len(g) for g in by_fold)
    written = []
    for k, (t, group) in enumerate(zip(totals, by_fold)):
        write_predictions(run.test_pred_fold(k), pred_frame(test.ids, _to_probs(t / len(group), average), names), "test")
        written.append(k)
    for k, p in run.test_pred_fold_files().items():
        if k not in written:
            p.unlink()  # a fold of an earlier folds file
    return write_predictions(run.test_pred, pred_frame(test.ids, _to_probs(sum(totals) / n_models, average), names), "test")


def _write_refit_preds(cfg: Config, run: RunDir, models: _Models, test) -> list[JobDir]:
    if not cfg.train.refit:
        run.test_pred_refit.unlink(missing_ok=True)  # a stale refit file must not be submitted
        return []
    dirs = run.model_dirs(refit=True)
    probs = _to_probs(models.total(dirs, test) / len(dirs), cfg.predict.average)
    write_predictions(run.test_pred_refit, pred_frame(test.ids, probs, test.class_names), "test")
    log.info(f"wrote {run.test_pred_refit}: {len(test)} rows from {', '.join(d.name for d in dirs)}")
    return dirs


def predict_test(cfg: Config) -> pd.DataFrame:
    """Raw test-set probabilities of the experiment (written to ``test_pred.csv``, beside each fold's
    own ``test_pred_fold<k>.csv``); returns test_pred.csv's frame."""
    from .formats import read_table

    run = RunDir.of(cfg)
    check_clip(cfg.predict.clip, f"{cfg.path}: predict.clip")
    by_fold = run.models_by_fold()
    dirs = [d for group in by_fold for d in group]
    if cfg.train.refit:
        run.model_dirs(refit=True)  # unfinished refit models fail before any work
    if not cfg.predict.tta_oof and not run.oof.is_file():
        raise PipelineError(f"{run.oof}: not found although every fold is done; rerun `pipeline train {cfg.path}` to collect it")
    test = read_table(cfg, "test")
    models = _Models(cfg, run)
    transforms = _check_tta(cfg, models, dirs[0], test)
    log.info(f"predict {cfg.name}: {len(dirs)} model(s) x {len(transforms)} TTA transform(s) "
         f"({', '.join(t.name for t in transforms)}) on {len(test)} test images, averaging {cfg.predict.average}s")
    df = _write_test_preds(cfg, run, models, by_fold, test)
    refit_dirs = _write_refit_preds(cfg, run, models, test)

    if cfg.predict.tta_oof:
        oof_path, hint = run.oof_tta, f"pipeline predict {cfg.path}"
        write_predictions(oof_path, _oof_tta(cfg, run, models), "oof")
    else:
        oof_path, hint = run.oof, f"pipeline train {cfg.path}"
    temperature = load_temperature(run.path)  # fitted on the folds' OOF; applied to the refit models' submission too
    if temperature is not None:
        log.info(f"temperature {temperature:.4f} from {run.calibration_json}: applied to the OOF scores and the submission "
                 f"(prediction files stay raw)")
    oof = read_predictions(oof_path, "oof", class_names=test.class_names, scaled=True, hint=hint)
    scores = oof_scores(cfg.metric, oof["target"].to_numpy(), probs_of(oof, test.class_names), cfg.predict.clip)
    clip_note = f" (clipped to {list(cfg.predict.clip)}: {scores['oof_logloss_clipped']:.4f})" if cfg.predict.clip else ""
    log.info(f"OOF ({oof_path.name}{', temperature-scaled' if temperature else ''}): "
         f"{fmt_scores(cfg.metric, scores['oof_score'], scores['oof_logloss'])}{clip_note}")

    atomic_write_json(run.predict_json, {
        "models": [d.name for d in dirs], "refit_models": [d.name for d in refit_dirs], "tta": [t.name for t in transforms], "average": cfg.predict.average,
        "temperature": temperature, "clip": list(cfg.predict.clip) if cfg.predict.clip else None,
        "oof": oof_path.name, "test_pred_folds": [run.test_pred_fold(k).name for k in range(len(by_fold))],
        "class_names": list(test.class_names), **scores, "train_hash": run.snapshot_hash("train"),
    })
    run.write_snapshot("predict")  # last: marks the stage done
    log.info(f"wrote {run.test_pred}: {len(df)} rows, and {len(by_fold)} test_pred_fold<k>.csv")
    return df


def submit_experiment(cfg: Config) -> Path:
    """``predict_test`` then a submission file for this experiment (temperature and ``predict.clip``
    applied); with ``train.refit`` a second one, ``<competition>-<experiment>-refit-<utc>.csv``, from
    the refit models. Returns the fold models' file."""
    from .submission import write_submission

    predict_test(cfg)
    run = RunDir.of(cfg)
    info = run.read_predict_info()
    names, hint = info["class_names"], f"pipeline predict {cfg.path}"
    hashes = {cfg.name: {"config": cfg.hash(), "train": info["train_hash"], "predict": run.snapshot_hash("predict")}}
    meta = {"experiments": [cfg.name], "weights": [1.0], "method": "single",
            **{k: info[k] for k in ("metric", "oof_score", "oof_logloss", "tta", "average", "temperature", "clip", "oof")},
            "config_hashes": hashes}
    if "oof_logloss_clipped" in info:
        meta["oof_logloss_clipped"] = info["oof_logloss_clipped"]
    df = read_predictions(run.test_pred, "test", class_names=names, scaled=True, hint=hint)
    ids = df["id"].to_numpy()
    path = write_submission(cfg, ids, clip_probs(probs_of(df, names), cfg.predict.clip), names, cfg.name,
                            meta | {"models": info["models"]}, test_ids=ids)
    if info.get("refit_models"):
        refit = read_predictions(run.test_pred_refit, "test", class_names=names, scaled=True, hint=hint)
        write_submission(cfg, refit["id"].to_numpy(), clip_probs(probs_of(refit, names), cfg.predict.clip),
                         names, f"{cfg.name}-refit", meta | {"method": "refit", "models": info["refit_models"],
                                                             "oof_note": "oof scores are the fold models' CV"}, test_ids=refit["id"].to_numpy())
    return path
