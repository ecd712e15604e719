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
import os
import time
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from pipeline.config.schema import Config
from pipeline.train.distributed import DistContext
from pipeline.core.errors import LockHeld, PipelineError
from pipeline.data.folds import check_learnable, load_folds
from pipeline.models.inference import features_tensor, to_tensor
from pipeline.core.io import atomic_write_json, sweep_temps
from pipeline.core.metrics import logloss, score
from pipeline.models.backbones import build_model
from pipeline.runs.predictions import average_predictions, probs_of, write_predictions
from pipeline.train.pseudo import check_source, prepare as prepare_pseudo
from pipeline.runs.layout import JobDir, RunDir
from pipeline.data.table import Table
from pipeline.train.trainer import FoldTrainer, caches_embeddings, derive_seed, seed_everything

log = logging.getLogger(__name__)

# what job ``fold`` trains on: (table, fold_of, facts for its done.json or None)
JobRows = Callable[[int], tuple[Table, np.ndarray, dict | None]]


def _job_rows(table: Table, fold_of: np.ndarray, pseudo=None, base: Table | None = None) -> JobRows:
    """The training table for every job; with pseudo-labels (``base``: training rows then test rows), each
    job's own view of it."""
    if pseudo is None:
        return lambda fold: (table, fold_of, None)
    return lambda fold: pseudo.job_view(base, fold_of, fold)


def job_outcome(job: JobDir, run: Callable[[], dict]) -> dict | None:
    """``run()`` a job and say how it ended: its done.json contents, or None when another
    process (GPU, machine) holds the job, which is then left to it."""
    try:
        res = run()
    except LockHeld as e:
        log.info(f"{job.label}: skipping, {e}")
        return None
    world = f", world_size {res['world_size']}" if res.get("world_size", 1) > 1 else ""
    log.info(f"{job.label}: best epoch {res['best_epoch']}, val_loss {res['val_loss']:.4f}{world}")
    return res


def _deadline(cfg: Config, t_start: float, jobs_left: int) -> float | None:
    """When the next job must stop: the budget left, shared equally by the jobs left."""
    if not cfg.train.time_budget_s:
        return None
    left = cfg.train.time_budget_s - (time.time() - t_start)
    return time.time() + max(left, 0) / max(jobs_left, 1)


def _head_embeddings(cfg: Config, table: Table, device: torch.device, seed: int) -> torch.Tensor | None:
    """With a frozen backbone and no augmentation, features are computed once for every fold."""
    if not caches_embeddings(cfg):
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

    def __init__(self, *, cfg: Config, table: Table, rows: JobRows, device: torch.device, run_hash: str,
                 precision: str, deadline: Callable[[int], float | None], on_epoch: Callable | None = None,
                 dist: DistContext = DistContext()):
        # ``table``: every row any job reads (the cached embeddings are of it); ``rows``: each job's view
        self.cfg, self.table, self.rows, self.device = cfg, table, rows, device
        self.run_hash, self.precision, self.deadline, self.on_epoch = run_hash, precision, deadline, on_epoch
        self.dist = dist  # under torchrun: every rank runs the same jobs in the same order, together

    def run(self, jobs: list[JobDir]) -> Iterator[tuple[JobDir, dict | None]]:
        embeddings, emb_seed = None, None
        for j, job in enumerate(jobs):
            if emb_seed != job.seed:
                embeddings, emb_seed = _head_embeddings(self.cfg, self.table, self.device, job.seed), job.seed
            table, fold_of, extra = self.rows(job.fold)
            trainer = FoldTrainer(cfg=self.cfg, table=table, fold_of=fold_of, job=job, device=self.device,
                                  run_hash=self.run_hash, precision=self.precision, embeddings=embeddings,
                                  on_epoch=self.on_epoch, deadline=self.deadline(len(jobs) - j), done_extra=extra,
                                  dist=self.dist)
            yield job, job_outcome(job, trainer.run)


class ProcessExecutor:
    """``train.fold_jobs: N`` on CPU: N jobs at once in spawned processes (``pipeline.train.executors``)."""

    def __init__(self, *, cfg: Config, width: int, run_hash: str, precision: str, t_start: float, n_waves: int,
                 pseudo=None):
        self.cfg, self.width, self.run_hash, self.precision = cfg, width, run_hash, precision
        self.t_start, self.n_waves, self.pseudo = t_start, n_waves, pseudo

    def run(self, jobs: list[JobDir]) -> Iterator[tuple[JobDir, dict | None]]:
        from pipeline.train.executors import run_parallel

        for job, result in run_parallel(self.cfg, jobs, n_par=self.width, run_hash=self.run_hash, precision=self.precision,
                                        t_start=self.t_start, n_waves=self.n_waves, pseudo=self.pseudo):
            yield job, job_outcome(job, result)


RAY_MISSING = "train.executor: ray needs the ray package, which is not installed; pip install -e .[ray] (or pip install 'ray>=2.9,<3')"


def import_ray():
    """``ray``, imported here only (an optional extra); missing, one line naming the key and the install."""
    try:
        import ray
    except ImportError:
        raise PipelineError(RAY_MISSING) from None
    return ray


def check_ray(cfg: Config) -> None:
    """Before anything is written: ray importable, and the head at ``train.ray_address`` listening
    (ray.init itself retries an address nobody answers for minutes)."""
    import socket

    import_ray()
    if cfg.train.ray_address == "auto":
        return
    host, _, port = cfg.train.ray_address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        raise PipelineError(f"train.ray_address: nothing answers at {cfg.train.ray_address} ({e.strerror or e}); start the "
                            "head there with `ray start --head --port=PORT`, or set train.ray_address=auto") from None


class RayExecutor:
    """``train.executor: ray``: every job a Ray task asking for ``train.ray_num_cpus`` CPUs (its torch
    threads) and ``train.ray_num_gpus`` GPUs, on whichever node has them free; results are collected as
    they finish (``ray.wait``). A task whose worker or node dies is rerun by Ray up to
    ``train.ray_max_retries`` times and resumes from the job's last.pt; the job's lock keeps a second
    copy out. The task runs ``pipeline.train.executors.run_ray_job`` in the driver's working directory, so
    every node sees the same data, folds and runs folders at the same paths (a shared mount)."""

    def __init__(self, *, cfg: Config, run_hash: str, precision: str, t_start: float, n_jobs: int, n_refit: int,
                 pseudo=None):
        self.cfg, self.run_hash, self.precision, self.t_start = cfg, run_hash, precision, t_start
        self.n_jobs, self.n_refit, self.pseudo = n_jobs, n_refit, pseudo
        self.ray, self.started, self.budget = None, False, None

    def _connect(self):
        if self.ray is not None:
            return self.ray
        ray, t = import_ray(), self.cfg.train
        if not ray.is_initialized():
            address = None if t.ray_address == "auto" else t.ray_address  # None: join a running cluster, else start one
            try:
                ray.init(address=address, logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise PipelineError(f"train.ray_address: no Ray cluster at {t.ray_address} ({str(e).splitlines()[0][:200]}); "
                                    "start one with `ray start --head`, or set train.ray_address=auto") from None
            self.started = True
        res = ray.cluster_resources()
        slots = res.get("CPU", 1) // t.ray_num_cpus
        if t.ray_num_gpus:
            slots = min(slots, res.get("GPU", 0) // t.ray_num_gpus)
        slots = max(int(slots), 1)
        if t.time_budget_s:  # a job's share is a wave's, as with processes (pipeline/train/executors.py)
            n_waves = -(-self.n_jobs // slots) + -(-self.n_refit // slots)
            self.budget = (self.t_start, t.time_budget_s, t.time_budget_s / max(n_waves, 1))
        log.info(f"ray: {len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPU {res.get('GPU', 0):g} GPU: "
                 f"{slots} job(s) at once of {t.ray_num_cpus} CPU {t.ray_num_gpus:g} GPU")
        self.ray = ray
        return ray

    def run(self, jobs: list[JobDir], cfgs: list[Config] | None = None) -> Iterator[tuple[JobDir, dict | None]]:
        """``cfgs``: each job's own config (a refit's epochs), else the run's."""
        from pipeline.train.executors import run_ray_job

        if not jobs:
            return
        ray, t = self._connect(), self.cfg.train
        task = ray.remote(num_cpus=t.ray_num_cpus, num_gpus=t.ray_num_gpus, max_retries=t.ray_max_retries)(run_ray_job)
        cwd = os.getcwd()
        pseudo = ray.put(self.pseudo)  # once, not once per job
        refs = {task.remote(cwd, c, job, self.run_hash, self.precision, t.ray_num_cpus, self.budget, pseudo): job
                for job, c in zip(jobs, cfgs or [self.cfg] * len(jobs))}
        pending = list(refs)
        try:
            while pending:
                (ref,), pending = ray.wait(pending, num_returns=1)
                yield refs[ref], job_outcome(refs[ref], lambda: self._result(ref))
        finally:  # stopped early (an error, Ctrl-C): the jobs still queued or running are ended; each resumes
            for ref in pending:
                ray.cancel(ref)

    def _result(self, ref) -> dict:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the job raised: its own error, not Ray's wrapper
            if isinstance(e.cause, PipelineError):
                raise e.cause from None
            raise
        except ray.exceptions.RayError as e:  # retries spent (a node kept dying, out of memory)
            raise PipelineError(f"ray: {_one_line(e)}; rerun the same command to resume from the jobs' last.pt") from None

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False


def _one_line(e: Exception) -> str:
    """A Ray error as one short line."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return f"{type(e).__name__}: {first[:200]}"


def _executor(cfg: Config, *, todo: list[JobDir], table: Table, rows: JobRows, device: torch.device, run_hash: str,
              precision: str, t_start: float, n_refit: int, on_epoch, hooks: bool, pseudo=None,
              dist: DistContext = DistContext()):
    """The executor ``train.executor`` asks for, where it can run: per-epoch hooks (tuning) and cached
    embeddings need this process."""
    from pipeline.plan.planner import executor_width

    if cfg.train.executor == "ray":
        if not hooks and not caches_embeddings(cfg):
            return RayExecutor(cfg=cfg, run_hash=run_hash, precision=precision, t_start=t_start, n_jobs=len(todo),
                               n_refit=n_refit, pseudo=pseudo)
        log.info("train.executor ray: " + ("per-epoch hooks run" if hooks else "cached backbone features are shared")
                 + " in this process; training here")
    n_par = executor_width(cfg, len(todo), device.type, hooks=hooks)
    if n_par > 1:
        return ProcessExecutor(cfg=cfg, width=n_par, run_hash=run_hash, precision=precision, t_start=t_start,
                               # waves of n_par jobs side by side, then each refit alone
                               n_waves=-(-len(todo) // n_par) + n_refit, pseudo=pseudo)
    return SequentialExecutor(cfg=cfg, table=table, rows=rows, device=device, run_hash=run_hash,
                              precision=precision, on_epoch=on_epoch, dist=dist,
                              deadline=lambda jobs_left: _deadline(cfg, t_start, jobs_left + n_refit))


def _needs_training(job: JobDir, run_hash: str) -> bool:
    """False for a job finished under this run hash; a job finished under another one starts over."""
    done = job.read_done()
    if done is not None and done.get("hash") == run_hash:
        log.info(f"{job.label}: done, skipping")
        return False
    if done is not None:
        log.info(f"{job.label}: finished under another config; retraining")
        job.clear_done()
    return True


def _resolved_train_keys(cfg: Config, table, precision: str) -> dict | None:
    """``auto`` training keys as this run resolved them, shown in its config snapshot (its hash stays the config's)."""
    from pipeline.config.auto import resolve_label_smoothing, resolve_lr

    resolved = {"train.precision": precision} if cfg.train.precision == "auto" else {}
    if cfg.train.label_smoothing == "auto":
        resolved["train.label_smoothing"] = v = resolve_label_smoothing(cfg, table.num_classes)
        log.info(f"train.label_smoothing auto -> {v} (metric {cfg.metric}, {table.num_classes} classes)")
    if cfg.train.lr == "auto":
        resolved["train.lr"] = v = resolve_lr(cfg)
        log.info(f"train.lr auto -> {v:g} ({'fine-tuning pretrained weights' if cfg.model.pretrained else 'from scratch'})")
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


def train_cv(cfg: Config, folds: list[int] | None = None, table: Table | None = None,
             on_epoch=None, on_fold=None, dist: DistContext = DistContext()) -> pd.DataFrame | None:
    """Train every requested fold (skipping finished ones); returns the OOF frame once all folds are done.

    ``on_epoch(job, epoch, history_row)`` runs after each epoch and ``on_fold(job, done)`` after each
    finished fold (done.json contents); either may raise to stop training (e.g. optuna.TrialPruned).
    ``dist``: this process's place in a torchrun world (every rank calls ``train_cv`` alike; the
    hooks run on rank 0).
    """
    from pipeline.data.formats import read_table
    from pipeline.plan.planner import check_plan_data, describe, planned

    source = check_source(cfg) if cfg.pseudo is not None else None  # before the plan writes anything
    hooks = on_epoch is not None or on_fold is not None
    if cfg.train.executor == "ray" and not hooks:
        check_ray(cfg)  # before the plan or anything else is written
    cfg = planned(cfg)
    device = dist.check(cfg)  # before the data is read (its cache) or a run folder is made
    table = table if table is not None else dist.main_first(lambda: read_table(cfg, "train"))
    check_plan_data(cfg, table)
    check_learnable(cfg, table)  # before any done.json of an earlier run is deleted
    fold_of = load_folds(cfg, table)
    n_folds = int(fold_of.max()) + 1
    wanted = list(range(n_folds)) if folds is None else folds
    bad = [k for k in wanted if not 0 <= k < n_folds]
    if bad:
        raise PipelineError(f"--folds: no fold {bad[0]}; {cfg.folds_path} has folds 0..{n_folds - 1}")
    pseudo, base = None, table
    if source is not None:
        test = read_table(cfg, "test")
        pseudo = prepare_pseudo(cfg, source, table, fold_of, test)
        base = pseudo.combine(table, test)
    rows = _job_rows(table, fold_of, pseudo, base)
    run = RunDir.of(cfg)
    run_hash, seeds = run.run_hash(), run.seeds
    precision = dist.broadcast_decision(lambda: _start_run(cfg, table, device, run, pseudo))
    n_refit = len(seeds) if cfg.train.refit else 0  # the time budget is shared by the refit models too
    t_start = time.time()
    log.info(f"train {cfg.name}: {cfg.model.backbone} ({'pretrained' if cfg.model.pretrained else 'from scratch'}, finetune {cfg.model.finetune}) "
             f"on {len(table)} images {table.channels}x{table.image_size[0]}x{table.image_size[1]}, folds {wanted}, seeds {seeds}, device {device}"
             + (f", {dist.describe()} (global batch {cfg.train.batch_size})" if dist.active else ""))
    if cfg.plan is not None:
        log.info(describe(cfg, cfg.plan) + f" ({run.plan_json})")
    for line in pseudo.describe() if pseudo is not None else []:
        log.info(line)
    todo = dist.broadcast_decision(lambda: [job for job in run.jobs(wanted) if _needs_training(job, run_hash)])
    executor = _executor(cfg, todo=todo, table=base, rows=rows, device=device, run_hash=run_hash, precision=precision,
                         t_start=t_start, n_refit=n_refit, on_epoch=on_epoch, hooks=hooks, pseudo=pseudo, dist=dist)
    try:
        for job, res in executor.run(todo):
            if res is not None and on_fold is not None:
                dist.broadcast_decision(lambda: on_fold(job, res))
        oof = dist.broadcast_decision(lambda: _finish_cv(cfg, table, fold_of, run_hash, run))
        if oof is not None and cfg.train.refit:
            _refits(cfg, executor, table, fold_of, seeds=seeds, device=device, run_hash=run_hash, precision=precision,
                    t_start=t_start, rows=rows, pseudo=pseudo, dist=dist)
    finally:
        if isinstance(executor, RayExecutor):
            executor.close()
    _log_spent(cfg, time.time() - t_start, trained=bool(todo))
    return oof


def _refits(cfg: Config, executor, table: Table, fold_of: np.ndarray, *, seeds: list[int], device, run_hash: str,
            precision: str, t_start: float, rows: JobRows, pseudo, dist: DistContext) -> None:
    """One refit per seed: Ray tasks side by side with the ray executor, else one after another in this
    process with all its threads (local and processes)."""
    if isinstance(executor, RayExecutor):
        todo = [r for seed in seeds if (r := _refit_job(cfg, fold_of, seed, run_hash, pseudo)) is not None]
        for job, res in executor.run([job for _, job in todo], cfgs=[c for c, _ in todo]):
            if res is None:  # as a held refit in this process raises LockHeld
                raise LockHeld(f"{job.label}: held by another process; rerun `pipeline train {cfg.path}` when it ends")
        return
    for i, seed in enumerate(seeds):
        refit(cfg, table, fold_of, seed=seed, device=device, run_hash=run_hash, precision=precision,
              deadline=_deadline(cfg, t_start, len(seeds) - i), rows=rows,
              pseudo=pseudo, dist=dist)


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


def refit(cfg: Config, table: Table, fold_of: np.ndarray, *, seed: int, device, run_hash: str, precision: str,
          deadline: float | None = None, rows: JobRows | None = None, pseudo=None,
          dist: DistContext = DistContext()) -> dict:
    """Train on every row for the epoch count CV chose (median best epoch); saved in ``RunDir.refit_dir``.
    ``rows``: the jobs' views of the table (``_job_rows``: with ``pseudo``, the refit's rows too)."""
    todo = _refit_job(cfg, fold_of, seed, run_hash, pseudo, dist)
    if todo is None:
        return dist.broadcast_decision(RunDir.of(cfg).refit_dir(seed).read_done)
    rcfg, job = todo
    # the refit job's fold (< 0) is none of the rows': every real row (and every selected pseudo row) trains
    rtable, rfold, extra = rows(job.fold) if rows is not None else (table, fold_of, None)
    return FoldTrainer(cfg=rcfg, table=rtable, fold_of=rfold, job=job, device=device, run_hash=run_hash,
                       precision=precision, deadline=deadline, done_extra=extra, dist=dist).run()


def _refit_job(cfg: Config, fold_of: np.ndarray, seed: int, run_hash: str, pseudo=None,
               dist: DistContext = DistContext()) -> tuple[Config, JobDir] | None:
    """The refit job of ``seed`` and its config (the median best epoch of the folds, no early stop);
    None when it is done under ``run_hash``."""
    run = RunDir.of(cfg)
    n_folds = int(fold_of.max()) + 1
    best = dist.broadcast_decision(lambda: [run.job_dir(k, seed).read_done()["best_epoch"] for k in range(n_folds)])
    epochs = max(1, int(np.median(best)))
    job = run.refit_dir(seed)
    done = dist.broadcast_decision(job.read_done)
    if done is not None and done.get("hash") == run_hash:
        log.info(f"{job.label}: done, skipping")
        return None
    more = f" and {pseudo.record(job.fold)['rows']} pseudo-labelled test rows" if pseudo is not None else ""
    log.info(f"refit on all {len(fold_of)} rows{more} for {epochs} epochs (median best epoch of the folds: {best})")
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs, "patience": 0})}), job


def _run_precision(cfg: Config, table: Table, device, run: RunDir) -> str:
    """Resolve ``train.precision`` once per run and keep it in ``precision.json`` so resumes (and
    folds trained later, elsewhere) reuse it; a changed config resolves it again."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    saved = run.read_precision(run.train_hash)
    if saved is not None:
        return saved
    from pipeline.train.precision import resolve_precision

    seed_everything(0)
    model, _ = build_model(cfg, table.channels, table.num_classes, len(table.feature_names), table.image_size, load_weights=False)
    model.to(device)
    bs = min(cfg.train.batch_size, len(table))
    x = to_tensor(table.images[:bs], device, cfg.train.channels_last)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    feats = features_tensor(table.features, np.arange(bs), device)
    choice = resolve_precision("auto", model, x, feats, f"{cfg.model.backbone}|cl={cfg.train.channels_last}")
    run.write_precision(choice, run.train_hash)
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
