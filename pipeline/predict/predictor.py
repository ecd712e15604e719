"""Predict stage: every fold model (and seed) predicts the test set, with test-time augmentation.

Artifacts in the run folder (layout: pipeline/runs/layout.py; files: pipeline/runs/predictions.py):
  test_pred.csv          id,p_<class>...  mean over every fold model and TTA transform (of probabilities
                         or of logits: ``predict.average``)
  test_pred_fold<k>.csv  the same from fold k's model(s) alone (averaged over its seeds): with
                         probability averaging, test_pred.csv is the mean of these
  (oof_tta.csv           with TTA on and ``predict.tta_oof``, the OOF through the same TTA: written by the
                         evaluate stage, which calibrates on it (``oof_with_tta`` here makes it); predict
                         reads it for its OOF scores and names it in predict.json for blends)
  predict.json           how test_pred.csv was made: models, tta, average, the temperature the submission
                         used, which OOF file matches it and that OOF's scores (the ensemble stage reads it)
  config.predict.yaml / .hash   written last: the stage is done

All or nothing: every file is written into a staging folder inside the run folder and checked,
then the submission file(s), then the files are moved into place, the done marker last
(``RunDir.staged``). A failure anywhere before leaves the run folder and submissions/ as they were.

  test_pred_refit.csv    with ``train.refit``: the same from the model(s) refit on every row, kept beside
                         the fold models' (it has no OOF of its own; the folds' CV is its estimate)

Every prediction file holds RAW probabilities. The calibration the evaluate stage kept
(``calibration.json``: temperature, shrink toward the prior) is applied when reading them
(``read_predictions(..., scaled=True)``): to the submission files and to the OOF scores in
predict.json. ``predict.clip`` applies to the submission only. ``predict.tta``, ``predict.tta_oof``
and ``predict.clip`` default to ``auto`` rules (pipeline/config/auto.py), logged when resolved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config.auto import resolve_clip, resolve_tta, tta_auto, tta_is_on, uses_tta_oof
from pipeline.config.load import read_stage_hash
from pipeline.config.schema import Config, stage_sections
from pipeline.core.errors import PipelineError
from pipeline.core.io import Staging, atomic_write_json, file_sha256
from pipeline.core.metrics import logloss, score
from pipeline.runs.layout import JobDir, RunDir
from pipeline.runs.predictions import load_calibration, pred_frame, probs_of, read_predictions, scale, write_predictions
from pipeline.runs.records import read_metrics
from pipeline.tasks import build_task
from pipeline.train.finished import model_dirs, models_by_fold
from pipeline.train.precision import read_precision

log = logging.getLogger(__name__)


# ---- clipping and scores -------------------------------------------------------------------


def check_clip(clip, where: str = "predict.clip") -> None:
    if clip is not None and not 0 <= clip[0] < clip[1] <= 1:
        raise PipelineError(f"{where}: got {list(clip)}; expected [lo, hi] with 0 <= lo < hi <= 1, e.g. [0.001, 0.999]")


def clip_probs(probs: np.ndarray, clip) -> np.ndarray:
    """Clip every probability into [lo, hi] and renormalise rows (a no-op renormalisation for 2 classes and
    hi = 1 - lo)."""
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
    """Loads checkpoints one at a time (keeps memory flat) and predicts with the TTA ``names`` (default:
    ``predict.tta`` as resolved)."""

    def __init__(self, cfg: Config, run: RunDir, names: list[str] | None = None):
        from pipeline.core.device import resolve_device

        self.cfg = cfg
        self.names = list(names) if names else resolve_tta(cfg)
        self.device = resolve_device(cfg.train.device)
        self.channels_last = cfg.train.channels_last and self.device.type != "mps"
        self.precision = cfg.train.precision
        if self.precision == "auto":  # the run's resolved choice (train writes it)
            self.precision = read_precision(run) or "fp32"

    def transforms(self, model: JobDir, image_size):
        from pipeline.models.tta import build_tta, model_input_size

        meta = model.read_best_meta()
        return build_tta(self.names, image_size, model_input_size(meta))

    def predict(self, model_dir: JobDir, images, features, table) -> np.ndarray:
        """Mean over TTA transforms for rows ``images`` (which may be a lazy subset of ``table.images``)."""
        parts = self.predict_parts(model_dir, images, features, table)
        return sum(parts.values()) / len(parts)

    def predict_parts(self, model_dir: JobDir, images, features, table) -> dict:
        """Each TTA transform's own prediction by its key (``tta.predict_tta_parts``)."""
        from pipeline.models.backbones import load_checkpoint
        from pipeline.models.tta import predict_tta_parts

        meta = model_dir.read_best_meta()  # checked here: load_checkpoint rebuilds the model from it
        if self.cfg.predict.engine == "onnx":
            from pipeline.predict.export import exported_model

            model = exported_model(self.cfg, model_dir)
        else:
            model, meta = load_checkpoint(model_dir.best_weights)
        if list(meta["class_names"]) != list(table.class_names):
            raise PipelineError(
                f"{model_dir.best_meta}: model classes {meta['class_names']} "
                f"differ from the data's {list(table.class_names)}; "
                f"retrain with `pipeline train {self.cfg.path}`"
            )
        if meta["in_chans"] != table.channels:
            raise PipelineError(
                f"{model_dir.best_meta}: model takes {meta['in_chans']} channels but the images have {table.channels}"
            )
        model.to(self.device)
        if self.channels_last:
            import torch

            model.to(memory_format=torch.channels_last)
        return predict_tta_parts(
            model,
            images,
            features,
            self.transforms(model_dir, table.image_size),
            self.cfg.predict.average,
            self.cfg.train.batch_size * 2,
            self.device,
            self.channels_last,
            self.precision,
            task=build_task(len(table.class_names)),
        )

    def total(self, dirs: list[JobDir], table) -> np.ndarray:
        """Sum over ``dirs`` of each model's TTA mean (probabilities or logits) on every row of ``table``."""
        acc = None
        for d in dirs:
            p = self.predict(d, table.images, table.features, table)
            acc = p if acc is None else acc + p
        return acc


def _to_probs(avg: np.ndarray, average: str) -> np.ndarray:
    """The averaged TTA views as predictions: logits averaged are activated by the task of their width."""
    return build_task(avg.shape[1]).activate(avg) if average == "logit" else avg


def oof_with_tta(cfg: Config, table, fold_of: np.ndarray, names: list[str] | None = None) -> pd.DataFrame:
    """Each fold's model(s) on its own validation rows, with the TTA ``names`` (default the configured
    one): the OOF frame (raw probabilities) the evaluate stage writes as oof_tta.csv and calibrates on."""
    return oof_with_tta_subsets(cfg, table, fold_of, [names or resolve_tta(cfg)])[0]


def oof_with_tta_subsets(cfg: Config, table, fold_of: np.ndarray, subsets: list[list[str]]) -> list[pd.DataFrame]:
    """``oof_with_tta`` for each of several TTAs from one pass per view: every view any of them names is
    predicted once and each TTA averages its own (evaluate judges a TTA with and without views)."""
    from pipeline.models.inference import Rows
    from pipeline.models.tta import build_tta, model_input_size

    run = RunDir.of(cfg)
    union = list(dict.fromkeys(n for s in subsets for n in s))
    models = _Models(cfg, run, union)
    accs = [np.zeros((len(table), table.num_classes)) for _ in subsets]
    for k, group in enumerate(models_by_fold(cfg)):
        idx = np.flatnonzero(fold_of == k)
        feats = Rows(table.features, idx) if table.features is not None else None
        for d in group:
            parts = models.predict_parts(d, Rows(table.images, idx), feats, table)
            size = model_input_size(d.read_best_meta())
            for acc, names in zip(accs, subsets):
                keys = [t.key for t in build_tta(names, table.image_size, size)]
                acc[idx] += sum(parts[key] for key in keys) / len(keys) / len(group)
    frames = []
    for acc, names in zip(accs, subsets):
        probs = _to_probs(acc, cfg.predict.average)
        log.info(
            f"OOF with TTA {names}: "
            f"{fmt_scores(cfg.metric, score(cfg.metric, table.labels, probs), logloss(table.labels, probs))}"
        )
        frames.append(pred_frame(table.ids, probs, table.class_names, fold=fold_of, target=table.labels))
    return frames


def _check_tta(cfg: Config, models: _Models, model: JobDir, test) -> list:
    """The TTA transforms (bad names fail before any work), with a warning for crops training never saw."""
    transforms = models.transforms(model, test.image_size)
    crops = [n for n in models.names if n in ("fivecrop", "tencrop")]
    if crops and not any("Crop" in a.get("name", "") for a in cfg.augment):
        log.info(
            f"warning: predict.tta {crops[0]} feeds the model crops at the images' own scale, but training resized "
            f"whole images (no crop in augment); add e.g. RandomCrop or RandomResizedCrop to the model's input size"
        )
    return transforms


def _write_test_preds(
    cfg: Config, run: RunDir, stage: Staging, models: _Models, by_fold: list[list[JobDir]], test
) -> pd.DataFrame:
    """test_pred.csv (every fold model) and test_pred_fold<k>.csv (fold k's own), raw, into ``stage``;
    returns test_pred.csv's frame as read back from its file."""
    average, names = cfg.predict.average, test.class_names
    totals = [models.total(group, test) for group in by_fold]
    n_models = sum(len(g) for g in by_fold)
    for k, (t, group) in enumerate(zip(totals, by_fold)):
        write_predictions(
            stage.path(run.test_pred_fold(k)), pred_frame(test.ids, _to_probs(t / len(group), average), names), "test"
        )
    for k, p in run.test_pred_fold_files().items():
        if k >= len(by_fold):
            stage.remove(p)  # a fold of an earlier folds file
    return _write_and_read(
        stage.path(run.test_pred),
        pred_frame(test.ids, _to_probs(sum(totals) / n_models, average), names),
        names,
        f"pipeline predict {cfg.path}",
    )


def _write_and_read(path: Path, frame: pd.DataFrame, names, hint: str) -> pd.DataFrame:
    """Write a test prediction file and read it back through the one reader: what later stages will see."""
    write_predictions(path, frame, "test")
    return read_predictions(path, "test", class_names=names, hint=hint)


def _write_refit_preds(
    cfg: Config, run: RunDir, stage: Staging, models: _Models, test
) -> tuple[list[JobDir], pd.DataFrame | None]:
    if not cfg.train.refit:
        stage.remove(run.test_pred_refit)  # a stale refit file must not be submitted
        return [], None
    dirs = model_dirs(cfg, refit=True)
    probs = _to_probs(models.total(dirs, test) / len(dirs), cfg.predict.average)
    df = _write_and_read(
        stage.path(run.test_pred_refit),
        pred_frame(test.ids, probs, test.class_names),
        test.class_names,
        f"pipeline predict {cfg.path}",
    )
    log.info(f"{run.test_pred_refit.name}: {len(test)} rows from {', '.join(d.name for d in dirs)}")
    return dirs, df


@dataclass
class _Predicted:
    """What one predict stage made (raw probabilities, as their files hold them) before it is committed."""

    test_pred: pd.DataFrame
    refit: pd.DataFrame | None
    info: dict  # predict.json
    predict_hash: str
    calibration: object = None  # the run's kept Calibration (None: raw)


def _oof_file(cfg: Config, run: RunDir) -> Path:
    """The OOF the submission's scores (and blends) use: oof_tta.csv, made and calibrated by a fresh
    evaluate stage, when TTA and ``predict.tta_oof`` are on; else oof.csv. Checked before any work."""
    if not uses_tta_oof(cfg):
        if not run.oof.is_file():
            raise PipelineError(
                f"{run.oof}: not found although every fold is done; rerun `pipeline train {cfg.path}` to collect it"
            )
        if tta_is_on(cfg):
            log.info(
                "warning: predict.tta_oof is false: the calibration was fitted on OOF "
                f"without the TTA {resolve_tta(cfg)} "
                f"that the test predictions get"
            )
        return run.oof
    if not run.oof_tta.is_file() or read_stage_hash(run.snapshot("evaluate")) != cfg.hash(
        *stage_sections(cfg, "evaluate")
    ):
        raise PipelineError(
            f"{run.oof_tta}: {'stale' if run.oof_tta.is_file() else 'not found'}; run `pipeline evaluate {cfg.path}` "
            f"first: it makes the OOF with the TTA {resolve_tta(cfg)} and fits the calibration on it"
        )
    return run.oof_tta


def _evaluated_tta(cfg: Config, run: RunDir) -> list[str]:
    """The TTA the submission gets: ``predict.tta`` as resolved; under ``auto`` with the TTA OOF, the
    names the evaluate stage kept of it (it drops the affine views when they do not lower the OOF
    log-loss; its freshness is checked by ``_oof_file`` first)."""
    names = resolve_tta(cfg)
    if not tta_auto(cfg) or not uses_tta_oof(cfg):
        return names
    kept = (read_metrics(run) or {}).get("tta")
    if not isinstance(kept, list) or not kept or not set(kept) <= set(names):
        raise PipelineError(
            f"{run.metrics_json}: tta is {kept!r}; expected names among {names}; rerun `pipeline evaluate {cfg.path}`"
        )
    return kept


def _predict_into(cfg: Config, run: RunDir, stage: Staging) -> _Predicted:
    """Every file of the predict stage, written into ``stage`` (nothing in the run folder changes yet)."""
    from pipeline.data.formats import read_table

    clip = resolve_clip(cfg)
    check_clip(clip, f"{cfg.path}: predict.clip")
    by_fold = models_by_fold(cfg)
    dirs = [d for group in by_fold for d in group]
    if cfg.train.refit:
        model_dirs(cfg, refit=True)  # unfinished refit models fail before any work
    oof_path = _oof_file(cfg, run)
    test = read_table(cfg, "test")
    models = _Models(cfg, run, _evaluated_tta(cfg, run))
    transforms = _check_tta(cfg, models, dirs[0], test)
    auto = []
    if tta_auto(cfg):  # a plan writes auto out as a list (defaults.tta_auto)
        dropped = [n for n in resolve_tta(cfg) if n not in models.names]
        auto.append(
            f"tta auto -> {models.names} from the augment list"
            + ("" if cfg.predict.tta == "auto" else " and the plan")
            + (f" ({', '.join(dropped)} dropped by evaluate: no lower OOF log-loss)" if dropped else "")
        )
    if cfg.predict.clip == "auto":
        auto.append(f"clip auto -> {list(clip) if clip else 'none'} for metric {cfg.metric}")
    log.info(
        f"predict {cfg.name}: {len(dirs)} model(s) x {len(transforms)} TTA transform(s) "
        f"({', '.join(t.name for t in transforms)}) on {len(test)} test images, averaging {cfg.predict.average}s"
        + (f" ({'; '.join(auto)}, pipeline/config/auto.py)" if auto else "")
    )
    df = _write_test_preds(cfg, run, stage, models, by_fold, test)
    refit_dirs, refit = _write_refit_preds(cfg, run, stage, models, test)

    cal = load_calibration(run.path)  # fitted on the folds' OOF; applied to the refit models' submission too
    if cal is not None:
        what = [f"temperature {cal.temperature:.4f}"] if cal.temperature is not None else []
        if cal.shrink:
            what.append(f"shrink {cal.shrink:.4f} toward the class prior")
        log.info(
            f"calibration from {run.calibration_json}: {', '.join(what)}; applied to the OOF scores and the submission "
            f"(prediction files stay raw)"
        )
    remake = f"pipeline {'evaluate' if oof_path == run.oof_tta else 'train'} {cfg.path}"
    oof = scale(read_predictions(oof_path, "oof", class_names=test.class_names, hint=remake), cal)
    scores = oof_scores(cfg.metric, oof["target"].to_numpy(), probs_of(oof, test.class_names), clip)
    clip_note = f" (clipped to {list(clip)}: {scores['oof_logloss_clipped']:.4f})" if clip else ""
    log.info(
        f"OOF ({oof_path.name}{', calibrated' if cal else ''}): "
        f"{fmt_scores(cfg.metric, scores['oof_score'], scores['oof_logloss'])}{clip_note}"
    )

    info = {
        "models": [d.name for d in dirs],
        "refit_models": [d.name for d in refit_dirs],
        "tta": [t.name for t in transforms],
        "average": cfg.predict.average,
        "temperature": cal.temperature if cal else None,
        "shrink": cal.shrink if cal else 0.0,
        "clip": list(clip) if clip else None,
        "oof": oof_path.name,
        "test_pred_folds": [run.test_pred_fold(k).name for k in range(len(by_fold))],
        "class_names": list(test.class_names),
        **scores,
        "train_hash": run.snapshot_hash("train"),
        "oof_sha256": file_sha256(run.oof),  # the training these predictions belong to (RunDir.stale_predictions)
    }
    atomic_write_json(stage.path(run.predict_json), info)
    predict_hash = run.write_snapshot("predict", into=stage)  # moved into place last: marks the stage done
    return _Predicted(df, refit, info, predict_hash, cal)


def _predict_stage(cfg: Config, *, submit: bool) -> tuple[_Predicted, Path | None]:
    """The predict stage, all or nothing: its files are staged, then the submission(s) written, then
    the files moved into place (a submission whose run files could not be is removed again)."""
    from pipeline.plan.store import planned

    cfg = planned(cfg, create=False)
    run = RunDir.of(cfg)
    if cfg.predict.engine == "onnx":  # every graph there and current before anything is staged
        from pipeline.predict.export import check_exported

        check_exported(cfg)
    with run.staged("predict") as stage:
        made = _predict_into(cfg, run, stage)
        sub = _write_submissions(cfg, stage, made) if submit else None
    log.info(
        f"wrote {run.test_pred}: {len(made.test_pred)} rows, and "
        f"{len(made.info['test_pred_folds'])} test_pred_fold<k>.csv"
    )
    return made, sub


def predict_test(cfg: Config) -> pd.DataFrame:
    """Raw test-set probabilities of the experiment (written to ``test_pred.csv``, beside each fold's
    own ``test_pred_fold<k>.csv``); returns test_pred.csv's frame."""
    return _predict_stage(cfg, submit=False)[0].test_pred


def submit_experiment(cfg: Config) -> Path:
    """The predict stage and a submission file for this experiment (temperature and ``predict.clip``
    applied); with ``train.refit`` a second one, ``<competition>-<experiment>-refit-<utc>.csv``, from
    the refit models. Returns the fold models' file."""
    return _predict_stage(cfg, submit=True)[1]


def _write_submissions(cfg: Config, stage: Staging, made: _Predicted) -> Path:
    from pipeline.predict.submission import remove_submission, write_submission

    info, clip = made.info, resolve_clip(cfg)
    names, t = info["class_names"], made.calibration
    hashes = {cfg.name: {"config": cfg.hash(), "train": info["train_hash"], "predict": made.predict_hash}}
    meta = {
        "experiments": [cfg.name],
        "weights": [1.0],
        "method": "single",
        **{
            k: info[k]
            for k in ("metric", "oof_score", "oof_logloss", "tta", "average", "temperature", "shrink", "clip", "oof")
        },
        "config_hashes": hashes,
    }
    if "oof_logloss_clipped" in info:
        meta["oof_logloss_clipped"] = info["oof_logloss_clipped"]
    ids = made.test_pred["id"].to_numpy()
    path = write_submission(
        cfg,
        ids,
        clip_probs(probs_of(scale(made.test_pred, t), names), clip),
        names,
        cfg.name,
        meta | {"models": info["models"]},
        test_ids=ids,
    )
    stage.undo(lambda: remove_submission(path))
    if made.refit is not None:
        rids = made.refit["id"].to_numpy()
        refit = write_submission(
            cfg,
            rids,
            clip_probs(probs_of(scale(made.refit, t), names), clip),
            names,
            f"{cfg.name}-refit",
            meta
            | {"method": "refit", "models": info["refit_models"], "oof_note": "oof scores are the fold models' CV"},
            test_ids=rids,
        )
        stage.undo(lambda: remove_submission(refit))
    return path
