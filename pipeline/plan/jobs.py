"""The jobs a plan times: folds x seeds (+ refits), how they run side by side (waves of ``train.fold_jobs``
processes and their threads, ``pipeline.train.executors``), and the seconds they take at a speed."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config.sections import SEED_MAX
from pipeline.plan.speed import Speed
from pipeline.train.executors import thread_plan

MAX_EPOCHS = 60  # more than this rarely helps a fine-tune; a bigger budget is left to seeds or tuning
TARGET = 0.96  # share of the budget the plan fills at the timed speed. This machine trained 0.75-1.25x as
# fast as it timed (2026-12-04): a faster run still spends 85% up to 1.13x, a slower one is
# stopped by its job's deadline at the first epoch past its share (pipeline/train/callbacks.py)
HEAD_ON_FEATURES = 50.0  # a head trained on cached features runs this many times the whole network's img/s
SPAWN_S = 8.0  # a fold_jobs worker's start: a fresh interpreter imports torch and timm, reads the table


@dataclass(frozen=True)
class Shape:
    """The jobs a plan times: folds x seeds (+ refits), and how they run."""

    n_rows: int
    n_folds: int
    n_seeds: int
    refit: bool
    width: int
    cores: int
    max_train_rows: int | None = None  # train.max_steps_per_epoch x batch_size
    extra_rows: int = 0  # pseudo-labelled test rows in every job's training part (Facts.n_pseudo)
    n_splits: int | None = None  # the validation share is 1 / n_splits (folds = n_splits x repeats); None: n_folds
    model: object = None  # the config's model section: which epochs train a frozen backbone (models.finetune_stage)
    cached: bool = False  # a frozen backbone without augmentation: its features computed once per seed, in process

    def threads(self) -> list[int]:
        n_jobs = self.n_folds * self.n_seeds
        return thread_plan(n_jobs, self.width, self.cores) if self.width > 1 else [self.cores] * n_jobs

    def val_rows(self) -> int:
        return math.ceil(self.n_rows / (self.n_splits or self.n_folds))

    def train_rows(self) -> int:
        """Rows a fold job trains on per epoch."""
        rows = self.n_rows - self.val_rows() + self.extra_rows
        return min(rows, self.max_train_rows or rows)

    def seconds(self, epochs: int, speed: Callable[[int], Speed]) -> float:
        """Expected training time for ``epochs`` per job, ``speed(threads)`` per thread count."""
        from pipeline.models.backbones import finetune_stage

        n_val, n_train = self.val_rows(), self.train_rows()
        if self.cached:
            return self._cached_seconds(epochs, speed(self.cores), n_train, n_val)
        stages = [
            finetune_stage(self.model, e, epochs) if self.model is not None else "full" for e in range(1, epochs + 1)
        ]

        def job(s: Speed, rows: int, n_val: int) -> float:
            return s.build_s + sum(s.epoch_seconds(rows, n_val, st) for st in stages)

        threads = self.threads()
        total = SPAWN_S if self.width > 1 else 0.0
        for w in range(0, len(threads), self.width):  # waves of ``width`` jobs side by side
            total += max(job(speed(th), n_train, n_val) for th in threads[w : w + self.width])
        if self.refit:
            rows = self.n_rows + self.extra_rows
            total += self.n_seeds * job(speed(self.cores), min(rows, self.max_train_rows or rows), 0)
        return total

    def _cached_seconds(self, epochs: int, s: Speed, n_train: int, n_val: int) -> float:
        """Frozen features: one pass of the backbone over every row per seed, then epochs of the head alone."""
        features = s.build_s + (self.n_rows + self.extra_rows) / s.val_img_s
        epoch = (n_train + n_val) / (s.train_img_s * HEAD_ON_FEATURES) + s.epoch_s
        jobs = self.n_folds + (1 if self.refit else 0)
        return self.n_seeds * (features + jobs * (s.build_s + epochs * epoch))

    def epochs_for(self, budget: float, speed: Callable[[int], Speed]) -> int:
        """The most epochs (1..MAX_EPOCHS) whose expected time fits ``TARGET`` of ``budget``."""
        fits = [e for e in range(1, MAX_EPOCHS + 1) if self.seconds(e, speed) <= TARGET * budget]
        return max(fits, default=1)


def auto_seeds(seed: int, n: int) -> list[int]:
    """``train.seed`` then seeds derived from it: two experiments at seeds 1 and 2 (zoo members) get disjoint
    sets, where ``seed, seed+1, ...`` would train most of their models twice."""
    from pipeline.train.trainer import derive_seed

    return [seed] + [derive_seed("auto seeds", seed, i) % (SEED_MAX + 1) for i in range(1, n)]
