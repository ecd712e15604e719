"""Training stage, the CV driver: one job per fold and seed over an executor, out-of-fold predictions, refit.

Layout under ``runs/<competition>/<experiment>/``:
  config.train.yaml / .hash   resolved config and its train-stage hash
  fold_<k>/                   (``fold_<k>_seed<s>/`` when ``train.seeds`` has several)
      best.safetensors + best.json   best epoch's weights and what built them
      last.pt                        resume state (weights_only-loadable), removed when done
      history.csv                    epoch,train_loss,val_loss,val_<metric>,lr,seconds
      oof.csv                        this fold's validation predictions at the best epoch
      done.json                      written last: the fold is finished
      tb/                            TensorBoard scalars
  oof.csv                     id,fold,target,p_<class>... every training row exactly once

One job is trained by ``pipeline.trainer.FoldTrainer``; this module decides which jobs are left,
shares the time budget among them, runs them through an executor (``sequential`` in this process,
or ``processes``: ``train.fold_jobs`` spawned workers, see ``pipeline.fold_jobs``), collects the OOF
predictions and trains the refit models.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from .config import STAGE_SECTIONS, Config, write_snapshot
from .device import resolve_device
from .errors import LockHeld, PipelineError
from .fold import folds_digest, load_folds
from .inference import features_tensor, to_tensor
from .io import atomic_write_csv, atomic_write_json, sweep_temps
from .metrics import logloss, score
from .models import build_model
from .table import Table
from .trainer import FoldTrainer, Job, derive_seed, seed_everything

log = logging.getLogger(__name__)


def job_name(fold: int, seed: int, n_seeds: int) -> str:
    return f"fold_{fold}" if n_seeds == 1 else f"fold_{fold}_seed{seed}"


def job_hash(cfg: Config) -> str:
    """What a finished fold is valid for: this training config *and* these fold assignments (a
    regenerated folds file with the same settings, e.g. from changed data, retrains)."""
    return f"{cfg.hash(*STAGE_SECTIONS['train'])}-{folds_digest(cfg)}"


def job_outcome(job: Job, run: Callable[[], dict]) -> dict | None:
    """``run()`` a job and say how it ended: its done.json contents, or None when another
    process (GPU, machine) holds the job, which is then left to it."""
    try:
        res = run()
    except LockHeld as e:
        log.info(f"{job.label}: skipping, {e}")
        return None
    log.info(f"{job.label}: best epoch {res['best_epoch']}, val_loss {res['val_loss']:.4f}")
    return res


def _deadline(cfg: Config, t_start: float, jobs_left: int) -> float | None:
    """When the next job must stop: the budget left, shared equally by the jobs left."""
    if not cfg.train.time_budget_s:
        return None
    left = cfg.train.time_budget_s - (time.time() - t_start)
    return time.time() + max(left, 0) / max(jobs_left, 1)


def _caches_embeddings(cfg: Config) -> bool:
    m = cfg.model  # mixing, augmentation and unfreezing all need the images themselves
    return m.finetune == "head" and not (cfg.augment or m.unfreeze_after or cfg.train.mixup_alpha or cfg.train.cutmix_alpha)


def _head_embeddings(cfg: Config, table: Table, device: torch.device, seed: int) -> torch.Tensor | None:
    """With a frozen backbone and no augmentation, features are computed once for every fold."""
    if not _caches_embeddings(cfg):
        return None
    seed_everything(derive_seed("init", seed))  # the same init as each fold's model
    model, _ = build_model(cfg, table.channels, table.num_classes, len(table.feature_names), table.image_size)
    model.fit_normalisation(table.images, table.features)
    model.to(device).eval()
    t0 = time.time()
    with torch.no_grad():
        out = [model.embed(to_tensor(table.images[s:s + 256], device)) for s in range(0, len(table), 256)]
    log.info(f"head-only: cached backbone features of {len(table)} images in {time.time() - t0:.1f}s")
    return torch.cat(out)


# ---- executors: run a list of jobs, yield (job, done.json contents or None when held elsewhere) ----

class SequentialExecutor:
    """Jobs one after another in this process; the only one that takes per-epoch hooks."""

    def __init__(self, *, cfg: Config, table: Table, fold_of: np.ndarray, device: torch.device, run_hash: str,
                 precision: str, deadline: Callable[[int], float | None], on_epoch: Callable | None = None):
        self.cfg, self.table, self.fold_of, self.device = cfg, table, fold_of, device
        self.run_hash, self.precision, self.deadline, self.on_epoch = run_hash, precision, deadline, on_epoch

    def run(self, jobs: list[Job]) -> Iterator[tuple[Job, dict | None]]:
        embeddings, emb_seed = None, None
        for j, job in enumerate(jobs):
            if emb_seed != job.seed:
                embeddings, emb_seed = _head_embeddings(self.cfg, self.table, self.device, job.seed), job.seed
            trainer = FoldTrainer(cfg=self.cfg, table=self.table, fold_of=self.fold_of, job=job, device=self.device,
                                  run_hash=self.run_hash, precision=self.precision, embeddings=embeddings,
                                  on_epoch=self.on_epoch, deadline=self.deadline(len(jobs) - j))
            yield job, job_outcome(job, trainer.run)


class ProcessExecutor:
    """``train.fold_jobs: N`` on CPU: N jobs at once in spawned processes (``pipeline.fold_jobs``)."""

    def __init__(self, *, cfg: Config, width: int, run_hash: str, precision: str, t_start: float, n_budget_jobs: int):
        self.cfg, self.width, self.run_hash, self.precision = cfg, width, run_hash, precision
        self.t_start, self.n_budget_jobs = t_start, n_budget_jobs

    def run(self, jobs: list[Job]) -> Iterator[tuple[Job, dict | None]]:
        from .fold_jobs import run_parallel

        for job, result in run_parallel(self.cfg, jobs, n_par=self.width, run_hash=self.run_hash, precision=self.precision,
                                        t_start=self.t_start, n_budget_jobs=self.n_budget_jobs):
            yield job, job_outcome(job, result)


def _needs_training(job: Job, run_hash: str, n_seeds: int) -> bool:
    """False for a job finished under this run hash; a job finished under another one starts over."""
    done = job.dir / "done.json"
    if done.exists() and json.loads(done.read_text()).get("hash") == run_hash:
        log.info(f"fold {job.fold}{'' if n_seeds == 1 else f' seed {job.seed}'}: done, skipping")
        return False
    if done.exists():
        log.info(f"fold {job.fold}: finished under another config; retraining")
        done.unlink()
    return True


def train_cv(cfg: Config, folds: list[int] | None = None, table: Table | None = None,
             on_epoch=None, on_fold=None) -> pd.DataFrame | None:
    """Train every requested fold (skipping finished ones); returns the OOF frame once all folds are done.

    ``on_epoch(job, epoch, history_row)`` runs after each epoch and ``on_fold(job, done)`` after each
    finished fold (done.json contents); either may raise to stop training (e.g. optuna.TrialPruned).
    """
    from .formats import read_table

    table = table if table is not None else read_table(cfg, "train")
    fold_of = load_folds(cfg, table)
    n_folds = int(fold_of.max()) + 1
    wanted = list(range(n_folds)) if folds is None else folds
    bad = [k for k in wanted if not 0 <= k < n_folds]
    if bad:
        raise PipelineError(f"--folds: no fold {bad[0]}; {cfg.folds_path} has folds 0..{n_folds - 1}")
    device = resolve_device(cfg.train.device)
    run = cfg.run_dir
    run.mkdir(parents=True, exist_ok=True)
    for tmp in sweep_temps(run):
        log.info(f"removed {tmp}, left by a killed run")
    config_hash = cfg.hash(*STAGE_SECTIONS["train"])
    run_hash = job_hash(cfg)
    seeds = cfg.train.seeds or [cfg.train.seed]
    precision = _run_precision(cfg, table, device, run, config_hash)
    write_snapshot(cfg, run / "config.train.yaml", "train",
                   {"train.precision": precision} if cfg.train.precision == "auto" else None)
    n_refit = len(seeds) if cfg.train.refit else 0  # the time budget is shared by the refit models too
    t_start = time.time()
    log.info(f"train {cfg.name}: {cfg.model.backbone} ({'pretrained' if cfg.model.pretrained else 'from scratch'}, finetune {cfg.model.finetune}) "
             f"on {len(table)} images {table.channels}x{table.image_size[0]}x{table.image_size[1]}, folds {wanted}, seeds {seeds}, device {device}")
    todo = [job for job in (Job(k, seed, run / job_name(k, seed, len(seeds))) for seed in seeds for k in wanted)
            if _needs_training(job, run_hash, len(seeds))]
    n_par = min(cfg.train.fold_jobs, len(todo))
    if n_par > 1 and device.type == "cpu" and on_epoch is None and on_fold is None and not _caches_embeddings(cfg):
        executor = ProcessExecutor(cfg=cfg, width=n_par, run_hash=run_hash, precision=precision, t_start=t_start,
                                   n_budget_jobs=len(todo) + n_refit)
    else:
        executor = SequentialExecutor(cfg=cfg, table=table, fold_of=fold_of, device=device, run_hash=run_hash,
                                      precision=precision, on_epoch=on_epoch,
                                      deadline=lambda jobs_left: _deadline(cfg, t_start, jobs_left + n_refit))
    for job, res in executor.run(todo):
        if res is not None and on_fold is not None:
            on_fold(job, res)
    oof = collect_oof(cfg, table, fold_of, run_hash)
    if oof is not None and cfg.train.refit:
        for i, seed in enumerate(seeds):
            refit(cfg, table, fold_of, seed, device, run_hash, precision, _deadline(cfg, t_start, len(seeds) - i))
    return oof


def refit(cfg: Config, table: Table, fold_of: np.ndarray, seed: int, device, run_hash: str, precision: str,
          deadline: float | None = None) -> dict:
    """Train on every row for the epoch count CV chose (median best epoch); saved under ``refit[_seed<s>]/``."""
    seeds = cfg.train.seeds or [cfg.train.seed]
    n_folds = int(fold_of.max()) + 1
    best = [json.loads((cfg.run_dir / job_name(k, seed, len(seeds)) / "done.json").read_text())["best_epoch"] for k in range(n_folds)]
    epochs = max(1, int(np.median(best)))
    d = cfg.run_dir / ("refit" if len(seeds) == 1 else f"refit_seed{seed}")
    done = d / "done.json"
    if done.exists() and json.loads(done.read_text()).get("hash") == run_hash:
        log.info(f"refit{'' if len(seeds) == 1 else f' seed {seed}'}: done, skipping")
        return json.loads(done.read_text())
    log.info(f"refit on all {len(table)} rows for {epochs} epochs (median best epoch of the folds: {best})")
    rcfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs, "patience": 0})})
    return FoldTrainer(cfg=rcfg, table=table, fold_of=np.full(len(table), 0), job=Job(-1, seed, d), device=device,
                       run_hash=run_hash, precision=precision, deadline=deadline).run()


def _run_precision(cfg: Config, table: Table, device, run: Path, config_hash: str) -> str:
    """Resolve ``train.precision`` once per run and keep it in ``precision.json`` so resumes (and
    folds trained later, elsewhere) reuse it; a changed config resolves it again."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    path = run / "precision.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("hash") == config_hash:
            return saved["precision"]
    from .precision import resolve_precision

    seed_everything(0)
    model, _ = build_model(cfg, table.channels, table.num_classes, len(table.feature_names), table.image_size, load_weights=False)
    model.to(device)
    bs = min(cfg.train.batch_size, len(table))
    x = to_tensor(table.images[:bs], device, cfg.train.channels_last)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    feats = features_tensor(table.features, np.arange(bs), device)
    choice = resolve_precision("auto", model, x, feats, f"{cfg.model.backbone}|cl={cfg.train.channels_last}")
    atomic_write_json(path, {"precision": choice, "hash": config_hash})
    return choice


def collect_oof(cfg: Config, table: Table, fold_of: np.ndarray, run_hash: str) -> pd.DataFrame | None:
    """Average seeds per fold and write ``oof.csv`` when every fold is finished."""
    run = cfg.run_dir
    seeds = cfg.train.seeds or [cfg.train.seed]
    n_folds = int(fold_of.max()) + 1
    frames, waiting = [], []
    for k in range(n_folds):
        per_seed = []
        for s in seeds:
            d = run / job_name(k, s, len(seeds))
            ok = (d / "done.json").exists() and json.loads((d / "done.json").read_text()).get("hash") == run_hash
            if not ok:
                waiting.append(k)
                break
            per_seed.append(pd.read_csv(d / "oof.csv", dtype={"id": str}))
        else:
            df = per_seed[0].copy()
            pcols = [c for c in df.columns if c.startswith("p_")]
            df[pcols] = np.mean([f[pcols].to_numpy() for f in per_seed], axis=0)
            frames.append(df)
    if waiting:
        log.info(f"oof.csv waits for fold(s) {sorted(set(waiting))}")
        return None
    oof = pd.concat(frames).set_index("id").reindex(pd.Index(table.ids.astype(str), name="id")).reset_index()
    if oof["fold"].isna().any() or len(oof) != len(table):
        raise PipelineError(f"{run}: fold predictions do not cover every training row exactly once; rerun `pipeline train {cfg.path}`")
    oof["fold"] = oof["fold"].astype(int)
    oof["target"] = oof["target"].astype(int)
    atomic_write_csv(run / "oof.csv", oof, float_format="%.8g")
    probs = oof[[f"p_{c}" for c in table.class_names]].to_numpy()
    log.info(f"wrote {run / 'oof.csv'}: OOF {cfg.metric} {score(cfg.metric, oof['target'].to_numpy(), probs):.4f}, "
             f"logloss {logloss(oof['target'].to_numpy(), probs):.4f}")
    return oof
