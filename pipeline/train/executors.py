"""Where training jobs run: one after another in this process, ``train.fold_jobs`` spawned processes,
or Ray tasks on a cluster (``train.executor``). Each executor runs a list of jobs and yields (job, its
done.json contents, or None when another process holds it), and gives each job its deadline by the one
budget rule (``pipeline.train.budget.job_deadline``).

A small model on small images (tf_efficientnet_lite0 at 75x75, batch 32) spreads badly over CPU
threads: on 2 cores, two 1-thread processes training two folds get ~1.3x the images per second of
one process with 2 threads (benchmarks/train_throughput.py). Folds are independent, so they are the
natural unit to run side by side.

Determinism: results depend on the thread count (reductions split differently), so a job's thread
count is a function of its place in the job list, never of timing (``thread_plan``): jobs in full
waves of N get ``cores // N`` threads; the r jobs of a last partial wave get ``cores // r``. The same
config gives the same predictions on the same machine. Each worker process reads the training table
once (memory-mapped formats share their pages); a Ray worker process may run many jobs, so it keeps
the tables of the last data it read (``run_ray_job``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from pipeline.config.schema import Config
from pipeline.core import logs
from pipeline.core.errors import LockHeld, PipelineError
from pipeline.data.table import Table
from pipeline.models.backbones import build_model
from pipeline.models.inference import to_tensor
from pipeline.runs.layout import JobDir
from pipeline.train.budget import job_deadline, waves
from pipeline.train.distributed import DistContext
from pipeline.train.job import FoldTrainer
from pipeline.train.trainer import caches_embeddings, derive_seed, seed_everything

log = logging.getLogger(__name__)

_STATE: dict = {}  # a worker process's table, folds and pseudo-labels (``_start_worker``)


# what job ``fold`` trains on: (table, fold_of, facts for its done.json or None)
JobRows = Callable[[int], tuple[Table, np.ndarray, dict | None]]


def job_rows(table: Table, fold_of: np.ndarray, pseudo=None, base: Table | None = None) -> JobRows:
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
        out = [model.embed(to_tensor(table.images[s : s + 256], device)) for s in range(0, len(table), 256)]
    log.info(f"head-only: cached backbone features of {len(table)} images in {time.time() - t0:.1f}s")
    return torch.cat(out)


def thread_plan(n_jobs: int, n_par: int, cores: int) -> list[int]:
    """Threads for each of ``n_jobs`` jobs run ``n_par`` at a time on ``cores`` cores: a function of a job's
    place in the list, never of timing, so results are reproducible."""
    full = (n_jobs // n_par) * n_par
    rest = n_jobs - full
    return [max(1, cores // n_par)] * full + [max(1, cores // max(rest, 1))] * rest


def executor_width(cfg: Config, n_jobs: int, device_type: str, hooks: bool = False) -> int:
    """How many jobs run at once on this machine: ``train.fold_jobs`` processes on CPU with ``train.executor``
    auto or processes, else one. A Ray cluster is not this machine: its jobs are planned as if they ran one
    after another here, which errs on the long side."""
    if cfg.train.executor not in ("auto", "processes"):
        return 1
    n_par = min(cfg.train.fold_jobs, n_jobs)
    return n_par if n_par > 1 and device_type == "cpu" and not hooks and not caches_embeddings(cfg) else 1


# ---- executors ------------------------------------------------------------------------------


def build_executor(
    cfg: Config,
    *,
    todo: list[JobDir],
    table: Table,
    rows: JobRows,
    device: torch.device,
    run_hash: str,
    precision: str,
    t_start: float,
    n_refit: int,
    on_epoch,
    hooks: bool,
    pseudo=None,
    dist: DistContext = DistContext(),
):
    """The executor ``train.executor`` asks for, where it can run: per-epoch hooks (tuning) and cached
    embeddings need this process."""
    if cfg.train.executor == "ray":
        if not hooks and not caches_embeddings(cfg):
            return RayExecutor(
                cfg=cfg,
                run_hash=run_hash,
                precision=precision,
                t_start=t_start,
                n_jobs=len(todo),
                n_refit=n_refit,
                pseudo=pseudo,
            )
        log.info(
            "train.executor ray: "
            + ("per-epoch hooks run" if hooks else "cached backbone features are shared")
            + " in this process; training here"
        )
    n_par = executor_width(cfg, len(todo), device.type, hooks=hooks)
    if n_par > 1:
        return ProcessExecutor(
            cfg=cfg,
            width=n_par,
            run_hash=run_hash,
            precision=precision,
            t_start=t_start,
            n_refit=n_refit,
            pseudo=pseudo,
        )
    return SequentialExecutor(
        cfg=cfg,
        table=table,
        rows=rows,
        device=device,
        run_hash=run_hash,
        precision=precision,
        on_epoch=on_epoch,
        dist=dist,
        t_start=t_start,
        n_refit=n_refit,
    )


class SequentialExecutor:
    """Jobs one after another in this process; the only one that takes per-epoch hooks."""

    def __init__(
        self,
        *,
        cfg: Config,
        table: Table,
        rows: JobRows,
        device: torch.device,
        run_hash: str,
        precision: str,
        t_start: float,
        n_refit: int = 0,
        on_epoch: Callable | None = None,
        dist: DistContext = DistContext(),
    ):
        # ``table``: every row any job reads (the cached embeddings are of it); ``rows``: each job's view
        self.cfg, self.table, self.rows, self.device = cfg, table, rows, device
        self.run_hash, self.precision, self.on_epoch = run_hash, precision, on_epoch
        self.t_start, self.n_refit = t_start, n_refit  # the refits after these jobs share the budget too
        self.dist = dist  # under torchrun: every rank runs the same jobs in the same order, together

    def run(self, jobs: list[JobDir]) -> Iterator[tuple[JobDir, dict | None]]:
        embeddings, emb_seed = None, None
        for j, job in enumerate(jobs):
            if emb_seed != job.seed:
                embeddings, emb_seed = _head_embeddings(self.cfg, self.table, self.device, job.seed), job.seed
            table, fold_of, extra = self.rows(job.fold)
            trainer = FoldTrainer(
                cfg=self.cfg,
                table=table,
                fold_of=fold_of,
                job=job,
                device=self.device,
                run_hash=self.run_hash,
                precision=self.precision,
                embeddings=embeddings,
                on_epoch=self.on_epoch,
                done_extra=extra,
                deadline=job_deadline(self.cfg.train.time_budget_s, self.t_start, len(jobs) - j + self.n_refit),
                dist=self.dist,
            )
            yield job, job_outcome(job, trainer.run)


class ProcessExecutor:
    """``train.fold_jobs: N`` on CPU: N jobs at once, each in its own spawned process."""

    def __init__(
        self, *, cfg: Config, width: int, run_hash: str, precision: str, t_start: float, n_refit: int = 0, pseudo=None
    ):
        self.cfg, self.width, self.run_hash, self.precision = cfg, width, run_hash, precision
        self.t_start, self.n_refit, self.pseudo = t_start, n_refit, pseudo

    def run(self, jobs: list[JobDir]) -> Iterator[tuple[JobDir, dict | None]]:
        """Yields (job, its done.json contents or None when held elsewhere) as each job ends. A job is handed
        to a worker when one is free, so its share of the budget counts the waves still to start; the refits
        run after these jobs, one at a time in the driver."""
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        cores = torch.get_num_threads()
        plan = thread_plan(len(jobs), self.width, cores)
        log.info(f"fold_jobs {self.width}: {len(jobs)} fold(s) in {self.width} processes, threads per fold {plan}")
        budget_s = self.cfg.train.time_budget_s
        queue = list(zip(jobs, plan))
        # spawn, not fork: a forked copy of a process that already ran torch ops can deadlock in OpenMP
        with ProcessPoolExecutor(
            self.width,
            mp_context=mp.get_context("spawn"),
            initializer=_start_worker,
            initargs=(self.cfg, self.pseudo, logs.on_stdout()),
        ) as ex:
            running: dict = {}

            def submit():
                job, threads = queue.pop(0)
                budget = (
                    (budget_s, self.t_start, waves(len(queue) + 1 + len(running), self.width) + self.n_refit)
                    if budget_s
                    else None
                )
                running[ex.submit(_run_job, job, self.run_hash, self.precision, threads, budget)] = job

            while queue and len(running) < self.width:
                submit()
            while running:
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for f in finished:
                    job = running.pop(f)
                    if queue:
                        submit()
                    yield job, job_outcome(job, f.result)


RAY_MISSING = (
    "train.executor: ray needs the ray package, which is not installed; "
    "pip install -e .[ray] (or pip install 'ray>=2.9,<3')"
)


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
        raise PipelineError(
            f"train.ray_address: nothing answers at {cfg.train.ray_address} ({e.strerror or e}); start the "
            "head there with `ray start --head --port=PORT`, or set train.ray_address=auto"
        ) from None


class RayExecutor:
    """``train.executor: ray``: every job a Ray task asking for ``train.ray_num_cpus`` CPUs (its torch
    threads) and ``train.ray_num_gpus`` GPUs, on whichever node has them free; results are collected as
    they finish (``ray.wait``). A task whose worker or node dies is rerun by Ray up to
    ``train.ray_max_retries`` times and resumes from the job's last.pt; the job's lock keeps a second
    copy out. The task runs ``pipeline.train.executors.run_ray_job`` in the driver's working directory, so
    every node sees the same data, folds and runs folders at the same paths (a shared mount)."""

    def __init__(
        self, *, cfg: Config, run_hash: str, precision: str, t_start: float, n_jobs: int, n_refit: int, pseudo=None
    ):
        self.cfg, self.run_hash, self.precision, self.t_start = cfg, run_hash, precision, t_start
        self.n_jobs, self.n_refit, self.pseudo = n_jobs, n_refit, pseudo
        self.ray, self.started, self.slots = None, False, 1

    def _connect(self):
        if self.ray is not None:
            return self.ray
        ray, t = import_ray(), self.cfg.train
        if not ray.is_initialized():
            address = None if t.ray_address == "auto" else t.ray_address  # None: join a running cluster, else start one
            try:
                ray.init(address=address, logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise PipelineError(
                    f"train.ray_address: no Ray cluster at {t.ray_address} ({str(e).splitlines()[0][:200]}); "
                    "start one with `ray start --head`, or set train.ray_address=auto"
                ) from None
            self.started = True
        res = ray.cluster_resources()
        slots = res.get("CPU", 1) // t.ray_num_cpus
        if t.ray_num_gpus:
            slots = min(slots, res.get("GPU", 0) // t.ray_num_gpus)
        slots = max(int(slots), 1)
        self.slots = slots
        log.info(
            f"ray: {len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPU {res.get('GPU', 0):g} GPU: "
            f"{slots} job(s) at once of {t.ray_num_cpus} CPU {t.ray_num_gpus:g} GPU"
        )
        self.ray = ray
        return ray

    def run(self, jobs: list[JobDir], cfgs: list[Config] | None = None) -> Iterator[tuple[JobDir, dict | None]]:
        """``cfgs``: each job's own config (a refit's epochs), else the run's. A job is submitted when a slot
        is free, so its share of the budget (``budget.job_deadline``) counts the waves still to start."""
        if not jobs:
            return
        ray, t = self._connect(), self.cfg.train
        task = ray.remote(num_cpus=t.ray_num_cpus, num_gpus=t.ray_num_gpus, max_retries=t.ray_max_retries)(run_ray_job)
        cwd = os.getcwd()
        pseudo = ray.put(self.pseudo)  # once, not once per job
        stdout = logs.on_stdout()
        queue = list(zip(jobs, cfgs or [self.cfg] * len(jobs)))
        refs: dict = {}

        def submit():
            job, c = queue.pop(0)
            # the refits run after these jobs, one wave of them
            # the waves left count the jobs still running: they share the budget with this one
            left = waves(len(queue) + 1 + len(refs), self.slots) + (
                waves(self.n_refit, self.slots) if c is self.cfg else 0
            )
            budget = (t.time_budget_s, self.t_start, left) if t.time_budget_s else None
            refs[task.remote(cwd, c, job, self.run_hash, self.precision, t.ray_num_cpus, budget, pseudo, stdout)] = job

        try:
            while queue and len(refs) < self.slots:
                submit()
            while refs:
                (ref,), _ = ray.wait(list(refs), num_returns=1)
                job = refs.pop(ref)
                if queue:
                    submit()
                yield job, job_outcome(job, lambda ref=ref: self._result(ref))
        finally:  # stopped early (an error, Ctrl-C): the jobs still queued or running are ended; each resumes
            for ref in refs:
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
            raise PipelineError(
                f"ray: {_one_line(e)}; rerun the same command to resume from the jobs' last.pt"
            ) from None

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False


def _one_line(e: Exception) -> str:
    """A Ray error as one short line."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return f"{type(e).__name__}: {first[:200]}"


# ---- the worker side: a spawned process, or a Ray task -----------------------------------------


def _start_worker(cfg, pseudo=None, stdout: bool = False) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    logs.worker_setup(stdout)  # the parent's output: the CLI's stdout, or the library's NullHandler
    import cv2

    cv2.setNumThreads(0)  # augmentation stays in this worker's own thread budget (albumentations #1246)
    from pipeline.data.folds import load_folds
    from pipeline.data.formats import read_table

    table = read_table(cfg, "train")
    # ``pseudo`` (pipeline.train.pseudo.PseudoLabels): the rows the driver selected per job, joined to this
    # worker's tables
    base = pseudo.combine(table, read_table(cfg, "test")) if pseudo is not None else None
    _STATE.update(cfg=cfg, table=table, fold_of=load_folds(cfg, table), pseudo=pseudo, base=base)


def _run_job(job, run_hash: str, precision: str, threads: int, budget: tuple | None, cfg=None, on_epoch=None) -> dict:
    """One fold (or, with its own ``cfg``, a refit) in a worker; returns done.json's contents (a held
    fold's LockHeld reaches the parent). ``budget``: (budget_s, t_start, waves left) for ``job_deadline``."""
    from pipeline.core.device import prepare_training_device

    torch.set_num_threads(threads)
    cfg, table, fold_of, pseudo = cfg or _STATE["cfg"], _STATE["table"], _STATE["fold_of"], _STATE["pseudo"]
    extra = None
    if pseudo is not None:
        table, fold_of, extra = pseudo.job_view(_STATE["base"], fold_of, job.fold)
    deadline = job_deadline(*budget) if budget is not None else None
    # a refit job (fold -1) trains on every row whatever the folds say: fold_of != -1 everywhere;
    # the device as the driver prepares its own (a Ray task may be on a GPU node: cuda:K, cuDNN flags)
    return FoldTrainer(
        cfg=cfg,
        table=table,
        fold_of=fold_of,
        job=job,
        device=prepare_training_device(cfg.train),
        run_hash=run_hash,
        precision=precision,
        deadline=deadline,
        done_extra=extra,
        on_epoch=on_epoch,
    ).run()


def run_ray_job(
    cwd: str,
    cfg,
    job,
    run_hash: str,
    precision: str,
    threads: int,
    budget: tuple | None,
    pseudo=None,
    stdout: bool = False,
) -> dict:
    """One job as a Ray task, in the driver's working directory ``cwd``: relative paths (data, folds,
    runs) mean there what they mean to the driver, so every node needs that folder at that path."""
    import os

    os.chdir(cwd)  # a Ray worker runs one task at a time
    key = (
        cwd,
        cfg.data.model_dump_json(),
        cfg.folds.model_dump_json(),
        cfg.paths.model_dump_json(),
        pseudo and pseudo.digest,
    )
    if _STATE.get("key") != key:
        _start_worker(cfg, pseudo, stdout)
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
