"""TensorBoard HParams (the seeds' "HParams dashboard"): one session per training run and per tuning trial.

``tensorboard --logdir runs/<competition>`` then shows every run and trial of the competition in the
HParams table and parallel-coordinates views, beside optuna-dashboard's view of the study.

  training run (``cv.train_cv``, once oof.csv exists)   the headline keys (``HEADLINE``: backbone, image
                                                        size, lr, batch size, epochs, optimizer)
  tuning trial (``tune.objective.Objective``, once done)  the headline keys and the trial's searched keys

with the metrics ``cv_<metric>`` (the mean of the per-fold scores, what a trial's objective is) and
``cv_<metric>_std``; a run adds ``oof_<metric>``, the score of the pooled OOF predictions. Hyperparameters
are named by their config keys (``train.lr``), so a trial's searched ``train.lr`` is the runs' column too.

Only the session records are written (start with the hyperparameters, end), never an experiment
summary: TensorBoard shows the *first* experiment summary it finds, which would hide the columns of
every other run; without one it gathers the columns of all sessions. The folder is
``RunDir.tb_hparams``; a later write replaces it, so a run is one session however often it is written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.core.io import _UMASK
from pipeline.core.metrics import cv_std

log = logging.getLogger(__name__)

# the headline config keys, named as in the config; ``image_size`` (the size the model sees, from the data) joins them
HEADLINE = ("model.backbone", "train.lr", "train.batch_size", "train.epochs", "train.optimizer")


def headline(cfg, image_size: tuple[int, int]) -> dict:
    """The headline hyperparameters of a (planned) config; ``image_size`` the training table's (h, w)."""
    from pipeline.config.auto import resolve_lr
    from pipeline.core.keys import lookup

    d = cfg.to_dict()
    out = {key: lookup(d, key) for key in HEADLINE}
    out["train.lr"] = resolve_lr(cfg)  # the rate trained with, also for auto (a number for the hparams plugin)
    h, w = cfg.model.input_size or image_size[0], cfg.model.input_size or image_size[1]
    out["image_size"] = int(h) if h == w else f"{h}x{w}"  # one number for square inputs, the usual case
    return out


def cv_metrics(metric: str, fold_scores: list[float]) -> dict[str, float]:
    """``cv_<metric>`` and ``cv_<metric>_std`` of per-fold scores (``metrics.cv_std``)."""
    return {f"cv_{metric}": float(sum(fold_scores) / len(fold_scores)), f"cv_{metric}_std": cv_std(fold_scores)}


def _value(v):
    """A value the HParams plugin takes (number, text, bool); lists and the like as their JSON text."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, float)):
        return v if math.isfinite(v) else str(v)
    return json.dumps(v, default=str)


def write_hparams(folder: str | Path, hparams: dict, metrics: dict[str, float]) -> Path:
    """Write one HParams session (``hparams`` and the final ``metrics``) as ``folder``, replacing any
    earlier one. The events go to a temporary folder beside it first, so a crash leaves the old session."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_pb

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    hp = {k: _value(v) for k, v in hparams.items() if v is not None}
    values = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
    _, start, end = hparams_pb(hp, values)  # the experiment summary is left out (module docstring)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; run folders get the usual permissions
    try:
        with SummaryWriter(log_dir=str(tmp)) as w:
            w.file_writer.add_summary(start)
            for tag, v in values.items():
                w.add_scalar(tag, v, 0)
            w.file_writer.add_summary(end)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_run_hparams(run, table, oof) -> Path | None:
    """A training run's session (``run``: ``RunDir.of(cfg)``, ``oof``: its out-of-fold frame). A
    failure to write is a warning: the run's models and predictions stand without it."""
    from pipeline.core.metrics import score
    from pipeline.runs.predictions import probs_of

    cfg, names = run.cfg, list(table.class_names)
    per_fold = [score(cfg.metric, g["target"].to_numpy(int), probs_of(g, names)) for _, g in oof.groupby("fold")]
    metrics = {
        **cv_metrics(cfg.metric, per_fold),
        f"oof_{cfg.metric}": score(cfg.metric, oof["target"].to_numpy(int), probs_of(oof, names)),
    }
    try:
        return write_hparams(run.tb_hparams, headline(cfg, table.image_size), metrics)
    except OSError as e:
        log.info(f"warning: could not write TensorBoard HParams to {run.tb_hparams}: {e}")
        return None
