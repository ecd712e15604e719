"""``train.fold_jobs: N`` on CPU: N folds at once, each in its own process.

A small model on small images (tf_efficientnet_lite0 at 75x75, batch 32) spreads badly over
CPU threads: on 2 cores, two 1-thread processes training two folds get ~1.3x the images per
second of one process with 2 threads (benchmarks/train_throughput.py). Folds are independent, so
they are the natural unit to run side by side.

Determinism: results depend on the thread count (reductions split differently), so a job's
thread count is a function of its place in the job list, never of timing: jobs in full waves of
N get ``cores // N`` threads; the r jobs of a last partial wave get ``cores // r``. The same
config gives the same predictions on the same machine. Each worker process reads the training
table once (memory-mapped formats share their pages).
"""
from __future__ import annotations

import logging
import time
from typing import Iterator

log = logging.getLogger(__name__)

_STATE: dict = {}


def _start_worker(cfg, pseudo=None) -> None:
    import os

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import cv2

    cv2.setNumThreads(0)  # augmentation stays in this worker's own thread budget (albumentations #1246)
    from .fold import load_folds
    from .formats import read_table

    table = read_table(cfg, "train")
    # ``pseudo`` (pipeline.pseudo.PseudoLabels): the rows the driver selected per job, joined to this worker's tables
    base = pseudo.combine(table, read_table(cfg, "test")) if pseudo is not None else None
    _STATE.update(cfg=cfg, table=table, fold_of=load_folds(cfg, table), pseudo=pseudo, base=base)


def _run_job(job, run_hash: str, precision: str, threads: int, budget: tuple | None) -> dict:
    """One fold in a worker; returns done.json's contents (a held fold's LockHeld reaches the parent)."""
    import torch

    from .device import resolve_device
    from .trainer import FoldTrainer

    torch.set_num_threads(threads)
    cfg, table, fold_of, pseudo = _STATE["cfg"], _STATE["table"], _STATE["fold_of"], _STATE["pseudo"]
    extra = None
    if pseudo is not None:
        table, fold_of = pseudo.fold_view(_STATE["base"], fold_of, job.fold)
        extra = {"pseudo": pseudo.record(job.fold)}
    deadline = None
    if budget is not None:  # this job's share: the budget over the jobs, times the jobs run at once
        t_start, total_s, share_s = budget
        deadline = min(time.time() + share_s, t_start + total_s)
    return FoldTrainer(cfg=cfg, table=table, fold_of=fold_of, job=job,
                       device=resolve_device(cfg.train.device), run_hash=run_hash, precision=precision,
                       deadline=deadline, done_extra=extra).run()


def run_parallel(cfg, jobs: list, *, n_par: int, run_hash: str, precision: str, t_start: float,
                 n_waves: int, pseudo=None) -> Iterator[tuple]:
    """Train ``jobs`` (``runs.JobDir``) in ``n_par`` spawned processes; yields (job, result) as each ends,
    ``result()`` returning its done.json contents or raising what the worker raised."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    from .plan import thread_plan

    cores = torch.get_num_threads()
    plan = thread_plan(len(jobs), n_par, cores)
    budget = None
    if cfg.train.time_budget_s:
        # a job's share is a wave's: the last, partial wave's jobs get as long as the full ones
        budget = (t_start, cfg.train.time_budget_s, cfg.train.time_budget_s / max(n_waves, 1))
    log.info(f"fold_jobs {n_par}: {len(jobs)} fold(s) in {n_par} processes, threads per fold {plan}")
    # spawn, not fork: a forked copy of a process that already ran torch ops can deadlock in OpenMP
    with ProcessPoolExecutor(n_par, mp_context=mp.get_context("spawn"), initializer=_start_worker, initargs=(cfg, pseudo)) as ex:
        futures = {ex.submit(_run_job, j, run_hash, precision, t, budget): j for j, t in zip(jobs, plan)}
        for f in as_completed(futures):
            yield futures[f], f.result
