"""Predict stage: every fold model (and seed) predicts the test set, with test-time augmentation.

Artifacts under ``runs/<competition>/<experiment>/``:
  test_pred.csv        id,p_<class>...  mean over models and TTA transforms (of probabilities or of
                       logits: ``predict.average``), temperature-scaled when evaluation kept a temperature
  oof_tta.csv          with ``predict.tta_oof``: id,fold,target,p_<class>... like oof.csv, each fold's
                       model on its own validation rows with the same TTA (blends compare like with like)
  predict.json         how test_pred.csv was made: models, tta, average, temperature, which OOF file
                       matches it and that OOF's scores (the ensemble stage reads it)
  config.predict.yaml / .hash   written last: the stage is done

  test_pred_refit.csv  with ``train.refit``: the same from the model(s) refit on every row, kept beside
                       the fold models' (it has no OOF of its own; the folds' CV is its estimate)

``test_pred.csv`` is not clipped; ``predict.clip`` applies to the submission file only.
"""
from __future__ import annotations

import logging
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .config import STAGE_SECTIONS, Config, read_stage_hash, write_snapshot
from .errors import PipelineError
from .io import atomic_write_csv, atomic_write_json
from .metrics import logloss, score

log = logging.getLogger(__name__)


# ---- temperature (written by the evaluate stage) and clipping ----------------------------

def load_temperature(run_dir: Path) -> float | None:
    """T from ``calibration.json`` ({"temperature": T, "kept": bool}) when evaluation kept it, else None."""
    path = Path(run_dir) / "calibration.json"
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        t, kept = d["temperature"], d.get("kept", False)
    except (json.JSONDecodeError, KeyError, TypeError):
        raise PipelineError(f"{path}: expected JSON {{\"temperature\": T, \"kept\": true|false}}; rerun `pipeline evaluate`") from None
    if not kept:
        return None
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
        raise PipelineError(f"{path}: temperature is {t!r}; expected a positive number")
    return float(t)


def apply_temperature(probs: np.ndarray, t: float | None) -> np.ndarray:
    """softmax(log(p) / T): temperature scaling applied to probabilities (T > 1 softens)."""
    if t is None or t == 1.0:
        return probs
    z = np.log(np.clip(probs, 1e-15, 1.0)) / t
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def check_clip(clip, where: str = "predict.clip") -> None:
    if clip is not None and not 0 <= clip[0] < clip[1] <= 1:
        raise PipelineError(f"{where}: got {list(clip)}; expected [lo, hi] with 0 <= lo < hi <= 1, e.g. [0.001, 0.999]")


def clip_probs(probs: np.ndarray, clip) -> np.ndarray:
    """Clip every probability into [lo, hi] and renormalise rows (a no-op renormalisation for 2 classes and hi = 1 - lo)."""
    if clip is None:
        return probs
    p = np.clip(probs, clip[0], clip[1])
    return p / p.sum(1, keepdims=True)


# ---- reading and writing prediction tables ---------------------------------------------

def pcols(class_names) -> list[str]:
    return [f"p_{c}" for c in class_names]


def pred_frame(ids, probs: np.ndarray, class_names, extra: dict | None = None) -> pd.DataFrame:
    df = pd.DataFrame({"id": np.asarray(ids).astype(str), **(extra or {})})
    for k, c in enumerate(pcols(class_names)):
        df[c] = probs[:, k]
    return df


def fmt_scores(metric: str, value: float, ll: float) -> str:
    """'accuracy 0.9500, logloss 0.1700' (log-loss once when it is the metric)."""
    return f"logloss {ll:.4f}" if metric == "logloss" else f"{metric} {value:.4f}, logloss {ll:.4f}"


def oof_scores(metric: str, y: np.ndarray, probs: np.ndarray, clip=None) -> dict:
    out = {"metric": metric, "oof_score": score(metric, y, probs), "oof_logloss": logloss(y, probs)}
    if clip is not None:
        out["oof_logloss_clipped"] = logloss(y, clip_probs(probs, clip))
    return out


# ---- which models predict ---------------------------------------------------------------

def model_dirs(cfg: Config, refit: bool | None = None) -> list[Path]:
    """Finished model directories of the current training config (fold models, or refit ones)."""
    from .cv import job_hash, job_name

    run = cfg.run_dir
    snap = run / "config.train.yaml"
    want = cfg.hash(*STAGE_SECTIONS["train"])
    have = read_stage_hash(snap)
    if have is None:
        raise PipelineError(f"{run}: no trained models; run `pipeline train {cfg.path}` first")
    if have != want:
        raise PipelineError(f"{snap}: models were trained under another config (train hash {have}, this config {want}); "
                            f"rerun `pipeline train {cfg.path}`")
    seeds = cfg.train.seeds or [cfg.train.seed]
    refit = cfg.train.refit if refit is None else refit
    if refit:
        dirs = [run / ("refit" if len(seeds) == 1 else f"refit_seed{s}") for s in seeds]
    else:
        dirs = [run / job_name(k, s, len(seeds)) for k in range(n_folds(cfg)) for s in seeds]
    want_job = job_hash(cfg) if cfg.folds_path.is_file() else None  # have == want: the same config
    for d in dirs:
        done = d / "done.json"
        if not done.is_file() or json.loads(done.read_text()).get("hash") != want_job:
            raise PipelineError(f"{d}: model not finished; run `pipeline train {cfg.path}` first")
    return dirs


def n_folds(cfg: Config) -> int:
    """Folds in the folds file training used (a user-supplied file may differ from folds.n_splits)."""
    p = cfg.folds_path
    if p.is_file():
        try:
            return int(pd.read_csv(p, usecols=["fold"])["fold"].max()) + 1
        except (ValueError, KeyError):
            pass  # not a folds file: training would have refused it
    return cfg.folds.n_splits


class _Models:
    """Loads checkpoints one at a time (keeps memory flat) and predicts with TTA."""

    def __init__(self, cfg: Config):
        from .device import resolve_device

        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.channels_last = cfg.train.channels_last and self.device.type != "mps"
        self.precision = cfg.train.precision
        if self.precision == "auto":  # the run's resolved choice (train writes it)
            p = cfg.run_dir / "precision.json"
            self.precision = json.loads(p.read_text())["precision"] if p.is_file() else "fp32"

    def transforms(self, model_dir: Path, image_size):
        from .tta import build_tta, model_input_size

        meta = json.loads((model_dir / "best.json").read_text())
        return build_tta(self.cfg.predict.tta, image_size, model_input_size(meta))

    def predict(self, model_dir: Path, images, features, table) -> np.ndarray:
        """Mean over TTA transforms for rows ``images`` (which may be a lazy subset of ``table.images``)."""
        from .models import load_checkpoint
        from .tta import predict_tta

        model, meta = load_checkpoint(model_dir / "best.safetensors")
        if list(meta["class_names"]) != list(table.class_names):
            raise PipelineError(f"{model_dir}/best.json: model classes {meta['class_names']} differ from the data's {list(table.class_names)}; "
                                f"retrain with `pipeline train {self.cfg.path}`")
        if meta["in_chans"] != table.channels:
            raise PipelineError(f"{model_dir}/best.json: model takes {meta['in_chans']} channels but the images have {table.channels}")
        model.to(self.device)
        if self.channels_last:
            import torch

            model.to(memory_format=torch.channels_last)
        return predict_tta(model, images, features, self.transforms(model_dir, table.image_size), self.cfg.predict.average,
                           self.cfg.train.batch_size * 2, self.device, self.channels_last, self.precision)


def _to_probs(avg: np.ndarray, average: str) -> np.ndarray:
    from .inference import softmax

    return softmax(avg) if average == "logit" else avg


def _oof_tta(cfg: Config, models: _Models) -> pd.DataFrame:
    """Each fold's model(s) on its own validation rows, with the configured TTA."""
    from .fold import load_folds
    from .formats import read_table
    from .inference import Rows as _Rows

    table = read_table(cfg, "train")
    fold_of = load_folds(cfg, table)
    dirs = model_dirs(cfg, refit=False)
    per_fold = len(cfg.train.seeds or [cfg.train.seed])  # model_dirs lists fold-major: fold k's seeds together
    acc = np.zeros((len(table), table.num_classes))
    for i, d in enumerate(dirs):
        k = i // per_fold
        idx = np.flatnonzero(fold_of == k)
        feats = _Rows(table.features, idx) if table.features is not None else None
        acc[idx] += models.predict(d, _Rows(table.images, idx), feats, table)
    probs = _to_probs(acc / per_fold, cfg.predict.average)
    log.info(f"OOF with TTA {cfg.predict.tta}: {fmt_scores(cfg.metric, score(cfg.metric, table.labels, probs), logloss(table.labels, probs))}")
    return pred_frame(table.ids, probs, table.class_names, {"fold": fold_of, "target": table.labels})


def predict_test(cfg: Config) -> pd.DataFrame:
    """Test-set probabilities of the experiment (written to ``test_pred.csv``); returns that frame."""
    from .formats import read_table
    from .tta import build_tta, model_input_size

    run = cfg.run_dir
    check_clip(cfg.predict.clip, f"{cfg.path}: predict.clip")
    dirs = model_dirs(cfg, refit=False)
    refit_dirs = model_dirs(cfg, refit=True) if cfg.train.refit else []
    test = read_table(cfg, "test")
    models = _Models(cfg)
    first = json.loads((dirs[0] / "best.json").read_text())
    transforms = build_tta(cfg.predict.tta, test.image_size, model_input_size(first))  # bad names fail before any work
    crops = [n for n in cfg.predict.tta if n in ("fivecrop", "tencrop")]
    if crops and not any("Crop" in a.get("name", "") for a in cfg.augment):
        log.info(f"warning: predict.tta {crops[0]} feeds the model crops at the images' own scale, but training resized "
             f"whole images (no crop in augment); add e.g. RandomCrop or RandomResizedCrop to the model's input size")
    log.info(f"predict {cfg.name}: {len(dirs)} model(s) x {len(transforms)} TTA transform(s) "
         f"({', '.join(t.name for t in transforms)}) on {len(test)} test images, averaging {cfg.predict.average}s")
    temperature = load_temperature(run)  # fitted on the folds' OOF; applied to refit models too
    probs = apply_temperature(_mean_prediction(models, dirs, test), temperature)
    if temperature is not None:
        log.info(f"applied temperature {temperature:.4f} from {run / 'calibration.json'}")
    if refit_dirs:
        refit_probs = apply_temperature(_mean_prediction(models, refit_dirs, test), temperature)
        atomic_write_csv(run / "test_pred_refit.csv", pred_frame(test.ids, refit_probs, test.class_names), float_format="%.8g")
        log.info(f"wrote {run / 'test_pred_refit.csv'}: {len(test)} rows from {', '.join(d.name for d in refit_dirs)}")
    else:
        (run / "test_pred_refit.csv").unlink(missing_ok=True)  # a stale refit file must not be submitted

    if cfg.predict.tta_oof:
        oof = _oof_tta(cfg, models)
        atomic_write_csv(run / "oof_tta.csv", oof, float_format="%.8g")
        oof_name = "oof_tta.csv"
    else:
        oof_name = "oof.csv"
        if not (run / oof_name).is_file():
            raise PipelineError(f"{run / oof_name}: not found although every fold is done; rerun `pipeline train {cfg.path}` to collect it")
        oof = pd.read_csv(run / oof_name, dtype={"id": str})
    y = oof["target"].to_numpy()
    oof_probs = apply_temperature(oof[pcols(test.class_names)].to_numpy(), temperature)
    scores = oof_scores(cfg.metric, y, oof_probs, cfg.predict.clip)
    clip_note = f" (clipped to {list(cfg.predict.clip)}: {scores['oof_logloss_clipped']:.4f})" if cfg.predict.clip else ""
    log.info(f"OOF ({oof_name}{', temperature-scaled' if temperature else ''}): "
         f"{fmt_scores(cfg.metric, scores['oof_score'], scores['oof_logloss'])}{clip_note}")

    df = pred_frame(test.ids, probs, test.class_names)
    atomic_write_csv(run / "test_pred.csv", df, float_format="%.8g")
    atomic_write_json(run / "predict.json", {
        "models": [d.name for d in dirs], "refit_models": [d.name for d in refit_dirs], "tta": [t.name for t in transforms], "average": cfg.predict.average,
        "temperature": temperature, "clip": list(cfg.predict.clip) if cfg.predict.clip else None,
        "oof": oof_name, "class_names": list(test.class_names), **scores,
        "train_hash": read_stage_hash(run / "config.train.yaml"),
    })
    write_snapshot(cfg, run / "config.predict.yaml", "predict")  # last: marks the stage done
    log.info(f"wrote {run / 'test_pred.csv'}: {len(df)} rows")
    return df


def _mean_prediction(models: "_Models", dirs: list[Path], table) -> np.ndarray:
    acc = None
    for d in dirs:
        p = models.predict(d, table.images, table.features, table)
        acc = p if acc is None else acc + p
    return _to_probs(acc / len(dirs), models.cfg.predict.average)


def submit_experiment(cfg: Config) -> Path:
    """``predict_test`` then a submission file for this experiment (``predict.clip`` applied); with
    ``train.refit`` a second one, ``<competition>-<experiment>-refit-<utc>.csv``, from the refit models.
    Returns the fold models' file."""
    from .submission import write_submission

    df = predict_test(cfg)
    run = cfg.run_dir
    info = json.loads((run / "predict.json").read_text())
    class_names = info["class_names"]
    probs = clip_probs(df[pcols(class_names)].to_numpy(), cfg.predict.clip)
    hashes = {cfg.name: {"config": cfg.hash(), "train": info["train_hash"], "predict": read_stage_hash(run / "config.predict.yaml")}}
    meta = {"experiments": [cfg.name], "weights": [1.0], "method": "single",
            **{k: info[k] for k in ("metric", "oof_score", "oof_logloss", "tta", "average", "temperature", "clip", "oof")},
            "config_hashes": hashes}
    if "oof_logloss_clipped" in info:
        meta["oof_logloss_clipped"] = info["oof_logloss_clipped"]
    path = write_submission(cfg, df["id"].to_numpy(), probs, class_names, cfg.name, meta | {"models": info["models"]}, test_ids=df["id"].to_numpy())
    if info.get("refit_models"):
        refit = pd.read_csv(run / "test_pred_refit.csv", dtype={"id": str})
        write_submission(cfg, refit["id"].to_numpy(), clip_probs(refit[pcols(class_names)].to_numpy(), cfg.predict.clip),
                         class_names, f"{cfg.name}-refit", meta | {"method": "refit", "models": info["refit_models"],
                                                                   "oof_note": "oof scores are the fold models' CV"}, test_ids=refit["id"].to_numpy())
    return path
