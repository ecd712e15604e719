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

``run_ray_job`` is the same worker as a Ray task (``train.executor: ray``, ``pipeline.train.cv.RayExecutor``):
a Ray worker process may run many jobs, so it keeps the tables of the last data it read.
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
    from pipeline.data.folds import load_folds
    from pipeline.data.formats import read_table

    table = read_table(cfg, "train")
    # ``pseudo`` (pipeline.train.pseudo.PseudoLabels): the rows the driver selected per job, joined to this worker's tables
    base = pseudo.combine(table, read_table(cfg, "test")) if pseudo is not None else None
    _STATE.update(cfg=cfg, table=table, fold_of=load_folds(cfg, table), pseudo=pseudo, base=base)


def _run_job(job, run_hash: str, precision: str, threads: int, budget: tuple | None, cfg=None, on_epoch=None) -> dict:
    """One fold (or, with its own ``cfg``, a refit) in a worker; returns done.json's contents (a held
    fold's LockHeld reaches the parent)."""
    import torch

    from pipeline.core.device import prepare_training_device
    from pipeline.train.trainer import FoldTrainer

    torch.set_num_threads(threads)
    cfg, table, fold_of, pseudo = cfg or _STATE["cfg"], _STATE["table"], _STATE["fold_of"], _STATE["pseudo"]
    extra = None
    if pseudo is not None:
        table, fold_of, extra = pseudo.job_view(_STATE["base"], fold_of, job.fold)
    deadline = None
    if budget is not None:  # this job's share: the budget over the jobs, times the jobs run at once
        t_start, total_s, share_s = budget
        deadline = min(time.time() + share_s, t_start + total_s)
    # a refit job (fold -1) trains on every row whatever the folds say: fold_of != -1 everywhere;
    # the device as the driver prepares its own (a Ray task may be on a GPU node: cuda:K, cuDNN flags)
    return FoldTrainer(cfg=cfg, table=table, fold_of=fold_of, job=job,
                       device=prepare_training_device(cfg.train), run_hash=run_hash, precision=precision,
                       deadline=deadline, done_extra=extra, on_epoch=on_epoch).run()


def run_ray_job(cwd: str, cfg, job, run_hash: str, precision: str, threads: int, budget: tuple | None,
                pseudo=None) -> dict:
    """One job as a Ray task, in the driver's working directory ``cwd``: relative paths (data, folds,
    runs) mean there what they mean to the driver, so every node needs that folder at that path."""
    import os

    os.chdir(cwd)  # a Ray worker runs one task at a time
    key = (cwd, cfg.data.model_dump_json(), cfg.folds.model_dump_json(), cfg.paths.model_dump_json(),
           pseudo and pseudo.digest)
    if _STATE.get("key") != key:
        _start_worker(cfg, pseudo)
        _STATE["key"] = key
    return _run_job(job, run_hash, precision, threads, budget, cfg=cfg, on_epoch=_test_barrier())


def _test_barrier():
    """For tests/test_ray.py only: with ``PIPELINE_TEST_BARRIER=<dir>`` in a node's environment, a job
    writes its pid to ``<dir>/<job folder>.epoch<e>[.<hold>]`` once epoch e's resume state is saved, and with
    ``PIPELINE_TEST_HOLD=<name>`` as well it then waits after epoch 1 (up to 10 minutes) for the test to
    kill the node: a barrier made of a file, not of a sleep in the test."""
    import os
    from pathlib import Path

    where, hold = os.environ.get("PIPELINE_TEST_BARRIER"), os.environ.get("PIPELINE_TEST_HOLD")
    if not where:
        return None

    def touch(job, epoch: int, row: dict) -> None:
        Path(where, f"{job.name}.epoch{epoch}" + (f".{hold}" if hold else "")).write_text(str(os.getpid()))
        if hold and epoch == 1:
            time.sleep(600)

    return touch


def run_parallel(cfg, jobs: list, *, n_par: int, run_hash: str, precision: str, t_start: float,
                 n_waves: int, pseudo=None) -> Iterator[tuple]:
    """Train ``jobs`` (``runs.JobDir``) in ``n_par`` spawned processes; yields (job, result) as each ends,
    ``result()`` returning its done.json contents or raising what the worker raised."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    from pipeline.plan.planner import thread_plan

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
