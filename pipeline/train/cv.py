"""Training stage, the CV driver: one job per fold and seed over an executor, out-of-fold predictions, refit.

One job is trained by ``pipeline.train.trainer.FoldTrainer``; this module decides which jobs are left,
shares the time budget among them, runs them through an executor (``train.executor``: ``local``,
one after another in this process; ``processes``, ``train.fold_jobs`` spawned workers, see
``pipeline.train.executors``; ``ray``, Ray tasks on a cluster, refits included), collects the OOF
predictions (``oof.csv``: every training row exactly once) and trains the refit models. It decides
what each job trains on: the training table, and with ``pseudo`` the test rows the job's fold
selects (``pipeline.train.pseudo``), which join its training part and never its validation part. Where each
file goes is ``pipeline.runs.layout``' business; what a prediction file holds, ``pipeline.runs.predictions``'.

Under torchrun (``dist``: ``pipeline.train.distributed.DistContext``) every rank runs this same driver
over the same job list, one job at a time, each job trained by all ranks together; what is decided
once (which jobs are left, the precision, the OOF file) is done on rank 0 and broadcast.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch

from pipeline.config.auto import without_plan
from pipeline.config.schema import Config
from pipeline.core.errors import LockHeld, PipelineError
from pipeline.core.io import atomic_write_json, sweep_temps
from pipeline.core.metrics import logloss, score
from pipeline.data.folds import check_learnable, load_folds
from pipeline.data.table import Table
from pipeline.models.backbones import build_model
from pipeline.models.backbones import check_config as check_names
from pipeline.models.inference import features_tensor, to_tensor
from pipeline.runs.kept import keep, restore
from pipeline.runs.layout import JobDir, RunDir
from pipeline.runs.predictions import average_predictions, probs_of, write_predictions
from pipeline.tasks import build_task
from pipeline.train.budget import job_deadline
from pipeline.train.distributed import DistContext
from pipeline.train.executors import JobRows, RayExecutor, build_executor, check_ray, job_rows
from pipeline.train.finished import run_hash as finished_run_hash
from pipeline.train.job import FoldTrainer
from pipeline.train.precision import read_precision, write_precision
from pipeline.train.pseudo import check_source
from pipeline.train.pseudo import prepare as prepare_pseudo
from pipeline.train.trainer import seed_everything

log = logging.getLogger(__name__)


def _check_plan_data(cfg: Config, table: Table) -> None:
    """The plan was made for this data: ``data.dir`` is a runtime key, so a plan made on a demo folder
    would otherwise be reused on the real one."""
    facts = (cfg.plan or {}).get("facts")
    if not facts:
        return
    have = {"n_rows": len(table), "classes": table.num_classes, "channels": table.channels}
    diff = [f"{k} {facts[k]} -> {v}" for k, v in have.items() if facts.get(k) != v]
    if diff:
        raise PipelineError(
            f"{RunDir.of(cfg).plan_json}: planned for other data ({', '.join(diff)}); delete it (or the run "
            f"folder) to plan for {cfg.data.dir}"
        )


def _needs_training(job: JobDir, run_hash: str, run: RunDir) -> bool:
    """False for a job finished under this run hash, or kept from when this config trained it before; a job
    finished under another config is kept aside (``runs/<comp>/<exp>/kept/<hash>/``), never discarded."""
    done = job.read_done()
    if done is not None and done.get("hash") == run_hash:
        log.info(f"{job.label}: done, skipping")
        return False
    if done is not None:
        kept = keep(run, job, done.get("hash"))
        log.info(f"{job.label}: finished under another config; kept in {kept}, training this one")
    restored = restore(run, job, run_hash)
    if restored is not None:
        log.info(f"{job.label}: finished under this config before; restored from {restored}")
        return False
    return True


def _resolved_train_keys(cfg: Config, table, precision: str) -> dict | None:
    """``auto`` training keys as this run resolved them, shown in its config snapshot (its hash stays the config's)."""
    from pipeline.config.auto import resolve_label_smoothing, resolve_lr

    resolved = {"train.precision": precision} if cfg.train.precision == "auto" else {}
    if cfg.train.label_smoothing == "auto":
        resolved["train.label_smoothing"] = v = resolve_label_smoothing(cfg, build_task(table.num_classes))
        log.info(f"train.label_smoothing auto -> {v} (metric {cfg.metric}, {table.num_classes} classes)")
    if cfg.train.lr == "auto":
        resolved["train.lr"] = v = resolve_lr(cfg)
        log.info(
            f"train.lr auto -> {v:g} ({'fine-tuning pretrained weights' if cfg.model.pretrained else 'from scratch'})"
        )
    return resolved or None


def _start_run(cfg: Config, table: Table, device: torch.device, run: RunDir, pseudo) -> str:
    """The run folder made and swept, its pseudo-label summary, the precision resolved and the config
    snapshot written (on rank 0 under torchrun); returns the precision."""
    run.path.mkdir(parents=True, exist_ok=True)
    for tmp in sweep_temps(run.path):
        log.info(f"removed {tmp}, left by a killed run")
    if pseudo is not None:
        atomic_write_json(run.pseudo_json, pseudo.summary(cfg))
    else:
        run.pseudo_json.unlink(missing_ok=True)  # from an earlier config of this experiment
    precision = _run_precision(cfg, table, device, run)
    run.write_snapshot("train", _resolved_train_keys(cfg, table, precision))
    return precision


def train_cv(
    cfg: Config,
    folds: list[int] | None = None,
    table: Table | None = None,
    on_epoch=None,
    on_fold=None,
    dist: DistContext = DistContext(),
) -> pd.DataFrame | None:
    """Train every requested fold (skipping finished ones); returns the OOF frame once all folds are done.

    ``on_epoch(job, epoch, history_row)`` runs after each epoch and ``on_fold(job, done)`` after each
    finished fold (done.json contents); either may raise to stop training (e.g. optuna.TrialPruned).
    ``dist``: this process's place in a torchrun world (every rank calls ``train_cv`` alike; the
    hooks run on rank 0).
    """
    cfg = without_plan(cfg)
    check_names(cfg)  # a mistyped backbone is one line before any finished fold is looked at
    source = check_source(cfg) if cfg.pseudo is not None else None
    hooks = on_epoch is not None or on_fold is not None
    if cfg.train.executor == "ray" and not hooks:
        check_ray(cfg)  # before anything is written
    device = dist.check(cfg)  # before the data is read (its cache) or a run folder is made
    table, fold_of, wanted = _training_data(cfg, table, folds, dist)
    pseudo, base = _pseudo_rows(cfg, source, table, fold_of)
    rows = job_rows(table, fold_of, pseudo, base)
    run = RunDir.of(cfg)
    run_hash, seeds = finished_run_hash(cfg), run.seeds
    precision = dist.broadcast_decision(lambda: _start_run(cfg, table, device, run, pseudo))
    n_refit = len(seeds) if cfg.train.refit else 0  # the time budget is shared by the refit models too
    t_start = time.time()
    _log_start(cfg, table, run, pseudo, wanted=wanted, seeds=seeds, device=device, dist=dist)
    todo = dist.broadcast_decision(lambda: [job for job in run.jobs(wanted) if _needs_training(job, run_hash, run)])
    executor = build_executor(
        cfg,
        todo=todo,
        table=base,
        rows=rows,
        device=device,
        run_hash=run_hash,
        precision=precision,
        t_start=t_start,
        n_refit=n_refit,
        on_epoch=on_epoch,
        hooks=hooks,
        pseudo=pseudo,
        dist=dist,
    )
    try:
        for job, res in executor.run(todo):
            if res is not None and on_fold is not None:
                dist.broadcast_decision(lambda job=job, res=res: on_fold(job, res))
        oof = dist.broadcast_decision(lambda: _finish_cv(cfg, table, fold_of, run_hash, run))
        if oof is not None and cfg.train.refit:
            _refits(
                cfg,
                executor,
                table,
                fold_of,
                seeds=seeds,
                device=device,
                run_hash=run_hash,
                precision=precision,
                t_start=t_start,
                rows=rows,
                pseudo=pseudo,
                dist=dist,
            )
    finally:
        if isinstance(executor, RayExecutor):
            executor.close()
    _log_spent(cfg, time.time() - t_start, trained=bool(todo))
    return oof


def _training_data(
    cfg: Config, table: Table | None, folds: list[int] | None, dist: DistContext
) -> tuple[Table, np.ndarray, list[int]]:
    """The training table (read unless given), checked against the plan and for learnable folds, its
    fold of each row, and the folds asked for (all by default): (table, fold_of, wanted)."""
    from pipeline.data.formats import read_table

    table = table if table is not None else dist.main_first(lambda: read_table(cfg, "train"))
    _check_plan_data(cfg, table)
    check_learnable(cfg, table)  # before any done.json of an earlier run is deleted
    fold_of = load_folds(cfg, table)
    n_folds = int(fold_of.max()) + 1
    wanted = list(range(n_folds)) if folds is None else folds
    bad = [k for k in wanted if not 0 <= k < n_folds]
    if bad:
        raise PipelineError(f"--folds: no fold {bad[0]}; {cfg.folds_path} has folds 0..{n_folds - 1}")
    return table, fold_of, wanted


def _pseudo_rows(cfg: Config, source, table: Table, fold_of: np.ndarray) -> tuple:
    """With ``pseudo`` (``source``: its checked source), the test rows each job's fold selects and the
    table they join: (pseudo, base); else (None, table)."""
    from pipeline.data.formats import read_table

    if source is None:
        return None, table
    test = read_table(cfg, "test")
    pseudo = prepare_pseudo(cfg, source, table, fold_of, test)
    return pseudo, pseudo.combine(table, test)


def _log_start(
    cfg: Config, table: Table, run: RunDir, pseudo, *, wanted: list[int], seeds: list[int], device, dist: DistContext
) -> None:
    """What this run trains, on what, where; the plan's line and the pseudo-label lines."""
    log.info(
        f"train {cfg.name}: {cfg.model.backbone} "
        f"({'pretrained' if cfg.model.pretrained else 'from scratch'}, finetune {cfg.model.finetune}) "
        f"on {len(table)} images {table.channels}x{table.image_size[0]}x{table.image_size[1]}, "
        f"folds {wanted}, seeds {seeds}, device {device}"
        + (f", {dist.describe()} (global batch {cfg.train.batch_size})" if dist.active else "")
    )
    if (cfg.plan or {}).get("line"):
        log.info(cfg.plan["line"] + f" ({run.plan_json})")
    for line in pseudo.describe() if pseudo is not None else []:
        log.info(line)


def _refits(
    cfg: Config,
    executor,
    table: Table,
    fold_of: np.ndarray,
    *,
    seeds: list[int],
    device,
    run_hash: str,
    precision: str,
    t_start: float,
    rows: JobRows,
    pseudo,
    dist: DistContext,
) -> None:
    """One refit per seed: Ray tasks side by side with the ray executor, else one after another in this
    process with all its threads (local and processes)."""
    if isinstance(executor, RayExecutor):
        todo = [r for seed in seeds if (r := _refit_job(cfg, fold_of, seed, run_hash, pseudo)) is not None]
        for job, res in executor.run([job for _, job in todo], cfgs=[c for c, _ in todo]):
            if res is None:  # as a held refit in this process raises LockHeld
                raise LockHeld(f"{job.label}: held by another process; rerun `pipeline train {cfg.path}` when it ends")
        return
    for i, seed in enumerate(seeds):
        refit(
            cfg,
            table,
            fold_of,
            seed=seed,
            device=device,
            run_hash=run_hash,
            precision=precision,
            deadline=job_deadline(cfg.train.time_budget_s, t_start, len(seeds) - i),
            rows=rows,
            pseudo=pseudo,
            dist=dist,
        )


def _finish_cv(cfg: Config, table: Table, fold_of: np.ndarray, run_hash: str, run: RunDir) -> pd.DataFrame | None:
    """``oof.csv`` once every fold is finished, and the run's TensorBoard HParams session (its CV metric
    is known here); on rank 0 under torchrun."""
    oof = collect_oof(cfg, table, fold_of, run_hash)
    if oof is not None:
        from pipeline.train.hparams import write_run_hparams

        write_run_hparams(run, table, oof)
    return oof


def _log_spent(cfg: Config, spent: float, trained: bool) -> None:
    """The time training took, beside the budget and the plan's expectation."""
    if not trained:
        return
    budget, expected = cfg.train.time_budget_s, (cfg.plan or {}).get("expected_train_s")
    parts = [f"training took {spent:.0f} s"]
    if budget:
        parts.append(f"{spent / budget:.0%} of the {budget:.0f} s budget")
    if expected:
        parts.append(f"planned {expected:.0f} s")
    log.info(", ".join(parts))


def refit(
    cfg: Config,
    table: Table,
    fold_of: np.ndarray,
    *,
    seed: int,
    device,
    run_hash: str,
    precision: str,
    deadline: float | None = None,
    rows: JobRows | None = None,
    pseudo=None,
    dist: DistContext = DistContext(),
) -> dict:
    """Train on every row for the epoch count CV chose (median best epoch); saved in ``RunDir.refit_dir``.
    ``rows``: the jobs' views of the table (``executors.job_rows``: with ``pseudo``, the refit's rows too)."""
    todo = _refit_job(cfg, fold_of, seed, run_hash, pseudo, dist)
    if todo is None:
        return dist.broadcast_decision(RunDir.of(cfg).refit_dir(seed).read_done)
    rcfg, job = todo
    # the refit job's fold (< 0) is none of the rows': every real row (and every selected pseudo row) trains
    rtable, rfold, extra = rows(job.fold) if rows is not None else (table, fold_of, None)
    return FoldTrainer(
        cfg=rcfg,
        table=rtable,
        fold_of=rfold,
        job=job,
        device=device,
        run_hash=run_hash,
        precision=precision,
        deadline=deadline,
        done_extra=extra,
        dist=dist,
    ).run()


def _refit_job(
    cfg: Config, fold_of: np.ndarray, seed: int, run_hash: str, pseudo=None, dist: DistContext = DistContext()
) -> tuple[Config, JobDir] | None:
    """The refit job of ``seed`` and its config (the median best epoch of the folds, no early stop);
    None when it is done under ``run_hash``."""
    run = RunDir.of(cfg)
    n_folds = int(fold_of.max()) + 1
    best = dist.broadcast_decision(lambda: [run.job_dir(k, seed).read_done()["best_epoch"] for k in range(n_folds)])
    epochs = max(1, int(np.median(best)))
    job = run.refit_dir(seed)
    if not dist.broadcast_decision(lambda: _needs_training(job, run_hash, run)):
        return None
    more = f" and {pseudo.record(job.fold)['rows']} pseudo-labelled test rows" if pseudo is not None else ""
    log.info(f"refit on all {len(fold_of)} rows{more} for {epochs} epochs (median best epoch of the folds: {best})")
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs, "patience": 0})}), job


def _run_precision(cfg: Config, table: Table, device, run: RunDir) -> str:
    """Resolve ``train.precision`` once per run and keep it in ``precision.json`` so resumes (and
    folds trained later, elsewhere) reuse it; a changed config resolves it again."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    saved = read_precision(run, run.train_hash)
    if saved is not None:
        return saved
    from pipeline.train.precision import resolve_precision

    seed_everything(0)
    model, _ = build_model(
        cfg, table.channels, table.num_classes, len(table.feature_names), table.image_size, load_weights=False
    )
    model.to(device)
    bs = min(cfg.train.batch_size, len(table))
    x = to_tensor(table.images[:bs], device, cfg.train.channels_last)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    feats = features_tensor(table.features, np.arange(bs), device)
    choice = resolve_precision("auto", model, x, feats, f"{cfg.model.backbone}|cl={cfg.train.channels_last}")
    write_precision(run, choice, run.train_hash)
    return choice


def collect_oof(cfg: Config, table: Table, fold_of: np.ndarray, run_hash: str) -> pd.DataFrame | None:
    """Average seeds per fold and write ``oof.csv`` when every fold is finished."""
    run = RunDir.of(cfg)
    ready, waiting = run.finished_fold_oofs(int(fold_of.max()) + 1, run_hash)
    if waiting:
        log.info(f"oof.csv waits for fold(s) {waiting}")
        return None
    hint = f"pipeline train {cfg.path}"
    frames = [average_predictions(paths, "oof", class_names=table.class_names, hint=hint) for paths in ready.values()]
    oof = pd.concat(frames).set_index("id").reindex(pd.Index(table.ids.astype(str), name="id")).reset_index()
    if oof["fold"].isna().any() or len(oof) != len(table):
        raise PipelineError(f"{run}: fold predictions do not cover every training row exactly once; rerun `{hint}`")
    oof["fold"] = oof["fold"].astype(int)
    oof["target"] = oof["target"].astype(int)
    write_predictions(run.oof, oof, "oof", class_names=table.class_names)
    probs, y = probs_of(oof, table.class_names), oof["target"].to_numpy()
    log.info(f"wrote {run.oof}: OOF {cfg.metric} {score(cfg.metric, y, probs):.4f}, logloss {logloss(y, probs):.4f}")
    return oof
