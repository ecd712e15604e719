"""When a training job stops: its callbacks, each called after every epoch with ``(job, epoch, row,
progress)`` and returning why to stop after this epoch, or None. Early stopping, the job's share of the
time budget (``Deadline``), and a caller's hook such as an Optuna pruner (``EpochHook``, which stops by
raising); ``pipeline.train.job.FoldTrainer`` runs them in that order, hook first."""

from __future__ import annotations

import time
from collections.abc import Callable

from pipeline.runs.layout import JobDir
from pipeline.train.artifacts import Progress


class EarlyStopping:
    def __init__(self, *, patience: int):
        self.patience = patience

    def __call__(self, job: JobDir, epoch: int, row: dict, progress: Progress) -> str | None:
        if self.patience and progress.bad_epochs >= self.patience:
            return f"{job.label}: early stop after {progress.bad_epochs} epochs without val_loss improvement"
        return None


class Deadline:
    """The job's share of ``train.time_budget_s``: stop at the first epoch boundary past it."""

    def __init__(self, *, at: float | None, epochs: int):
        self.at, self.epochs = at, epochs

    def __call__(self, job: JobDir, epoch: int, row: dict, progress: Progress) -> str | None:
        if self.at is not None and time.time() >= self.at and epoch < self.epochs:
            return (
                f"{job.label}: time budget share spent after epoch {epoch}; "
                f"keeping the best epoch ({progress.best['epoch']})"
            )
        return None


class EpochHook:
    """A caller's ``on_epoch(job, epoch, row)`` (e.g. an Optuna pruner); it stops by raising."""

    def __init__(self, *, fn: Callable):
        self.fn = fn

    def __call__(self, job: JobDir, epoch: int, row: dict, progress: Progress) -> None:
        self.fn(job, epoch, row)
